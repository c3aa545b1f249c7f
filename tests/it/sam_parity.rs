//! SAM and a SlimSAM-style pruned SAM against transformers' SamProcessor + SamModel (goldens
//! from tests/golden/segment/make_sam_golden.py).

use crate::common::cli::scratch;
use crate::common::{golden, max_abs, rel_l2};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use tkg::segment::sam::SamModel;
use tkg::segment::sam::prompt_encoder::{ModelPrompt, PointLabel};
use tkg::segment::{Prompt, Segmenter};

const VARIANTS: [&str; 2] = ["sam", "slimsam"];

fn dir(variant: &str) -> PathBuf {
    golden().join("segment").join(variant)
}

fn meta(variant: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(variant).join("golden.json")).unwrap())
        .unwrap()
}

fn goldens(variant: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(variant).join("golden.safetensors"), &Device::Cpu).unwrap()
}

fn model(variant: &str) -> SamModel {
    SamModel::load_dir(&dir(variant), &Device::Cpu).unwrap()
}

fn image(variant: &str) -> image::RgbImage {
    image::open(dir(variant).join("image.png"))
        .unwrap()
        .to_rgb8()
}

/// The case's prompt in the model's coordinates, in transformers' order.
fn golden_prompt(case: &serde_json::Value, g: &HashMap<String, Tensor>) -> ModelPrompt {
    let name = case["name"].as_str().unwrap();
    let mut p = ModelPrompt::default();
    if let Some(pts) = g.get(&format!("{name}.input_points")) {
        let pts = pts.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let labels = case["labels"].as_array().unwrap();
        for (xy, l) in pts.chunks(2).zip(labels) {
            let label = match l.as_i64().unwrap() {
                1 => PointLabel::Positive,
                0 => PointLabel::Negative,
                other => panic!("label {other}"),
            };
            p.points.push((xy[0], xy[1], label));
        }
    }
    if let Some(b) = g.get(&format!("{name}.input_boxes")) {
        let b = b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        p.bbox = Some([b[0], b[1], b[2], b[3]]);
    }
    p
}

/// The case's prompt as a user gives it, in image pixels.
fn user_prompt(case: &serde_json::Value) -> Prompt {
    let mut p = Prompt::default();
    if let Some(points) = case["points"].as_array() {
        for (xy, l) in points.iter().zip(case["labels"].as_array().unwrap()) {
            let xy = [
                xy[0].as_f64().unwrap() as f32,
                xy[1].as_f64().unwrap() as f32,
            ];
            if l.as_i64() == Some(1) {
                p.points.push(xy);
            } else {
                p.negative_points.push(xy);
            }
        }
    }
    if let Some(b) = case["box"].as_array() {
        let v: Vec<f32> = b.iter().map(|v| v.as_f64().unwrap() as f32).collect();
        p.bbox = Some([v[0], v[1], v[2], v[3]]);
    }
    p
}

#[test]
fn the_processor_makes_transformers_pixels() {
    for v in VARIANTS {
        let m = model(v);
        let g = goldens(v);
        let ours = m.processor.preprocess(&image(v), &Device::Cpu).unwrap();
        let want = &g["pixel_values"];
        let reshaped = meta(v)["image"]["reshaped_hw"].clone();
        assert_eq!(
            [ours.reshaped.0, ours.reshaped.1],
            [
                reshaped[0].as_u64().unwrap() as usize,
                reshaped[1].as_u64().unwrap() as usize
            ],
            "{v}"
        );
        // Pillow's fixed-point bilinear, reproduced: the 8-bit images are equal, and so the
        // normalised pixels are, to f32 rounding.
        let d = max_abs(&ours.pixels, want);
        assert!(d <= 1e-6, "{v}: pixel values differ by {d}");
    }
}

#[test]
fn image_embeddings_match_transformers() {
    for v in VARIANTS {
        let m = model(v);
        let g = goldens(v);
        let emb = m.embed_image(&g["pixel_values"]).unwrap();
        let r = rel_l2(&emb, &g["image_embeddings"]);
        eprintln!("{v}: image embeddings rel L2 {r:.2e}");
        assert!(r <= 1e-4, "{v}: image embeddings rel L2 {r}");
    }
}

#[test]
fn mask_logits_and_iou_match_transformers() {
    for v in VARIANTS {
        let m = model(v);
        let g = goldens(v);
        let emb = &g["image_embeddings"];
        for case in meta(v)["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let multimask = case["multimask"].as_bool().unwrap();
            let mask = g.get(&format!("{name}.input_masks"));
            let out = m
                .decode_with_mask(emb, &golden_prompt(case, &g), mask, multimask)
                .unwrap();
            let want = g[&format!("{name}.pred_masks")].squeeze(1).unwrap();
            assert_eq!(out.masks.dims(), want.dims(), "{v}/{name}");
            let r = rel_l2(&out.masks, &want);
            eprintln!("{v}/{name}: mask logits rel L2 {r:.2e}");
            assert!(r <= 1e-4, "{v}/{name}: mask logits rel L2 {r}");
            let want = g[&format!("{name}.iou_scores")].squeeze(1).unwrap();
            let r = rel_l2(&out.iou, &want);
            eprintln!("{v}/{name}: IoU predictions rel L2 {r:.2e}");
            assert!(r <= 1e-4, "{v}/{name}: IoU predictions rel L2 {r}");
        }
        // A mask prompt must be the low-res logits' shape.
        let wrong = Tensor::zeros((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let case = &meta(v)["cases"][0];
        let e = m
            .decode_with_mask(emb, &golden_prompt(case, &g), Some(&wrong), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a mask prompt is [1, 1, 32, 32]"), "{e}");
    }
}

#[test]
fn prompts_are_moved_as_the_processor_moves_them() {
    for v in VARIANTS {
        let m = model(v);
        let g = goldens(v);
        let img = image(v);
        let size = (img.height() as usize, img.width() as usize);
        for case in meta(v)["cases"].as_array().unwrap() {
            let ours = m
                .processor
                .transform_prompt(&user_prompt(case), size)
                .unwrap();
            let mut want = golden_prompt(case, &g);
            // tkg's Prompt lists the subject's points before the background's.
            want.points.sort_by_key(|p| p.2 != PointLabel::Positive);
            assert_eq!(ours.points.len(), want.points.len());
            for (a, b) in ours.points.iter().zip(&want.points) {
                assert_eq!(a.2, b.2);
                // The user's points are f32 here, f64 in the script.
                assert!(
                    (a.0 - b.0).abs() < 1e-4 && (a.1 - b.1).abs() < 1e-4,
                    "{a:?} {b:?}"
                );
            }
            match (ours.bbox, want.bbox) {
                (Some(a), Some(b)) => {
                    for (x, y) in a.iter().zip(b) {
                        assert!((x - y).abs() < 1e-4, "{a:?} {b:?}");
                    }
                }
                (None, None) => {}
                other => panic!("{other:?}"),
            }
        }
    }
}

/// Intersection over union of two 0/1 masks.
fn iou(a: &[bool], b: &[bool]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let union = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

#[test]
fn masks_at_the_image_size_match_transformers() {
    for v in VARIANTS {
        let m = model(v);
        let g = goldens(v);
        let img = image(v);
        for case in meta(v)["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let multimask = case["multimask"].as_bool().unwrap();
            let mask = g.get(&format!("{name}.input_masks"));
            let p = m
                .predict_with_mask(&img, &user_prompt(case), mask, multimask)
                .unwrap();
            let want = g[&format!("{name}.masks")]
                .to_dtype(DType::U8)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let (count, h, w) = want.dims3().unwrap();
            assert_eq!(count, p.logits.len(), "{v}/{name}");
            assert_eq!((h, w), (img.height() as usize, img.width() as usize));
            let want = want.flatten_from(1).unwrap().to_vec2::<u8>().unwrap();
            for (i, want) in want.iter().enumerate() {
                let ours: Vec<bool> = p.logits[i].iter().map(|&x| x > 0.0).collect();
                let want: Vec<bool> = want.iter().map(|&x| x != 0).collect();
                assert!(want.iter().any(|&x| x) && !want.iter().all(|&x| x));
                let score = iou(&ours, &want);
                eprintln!("{v}/{name} mask {i}: IoU with transformers' mask {score}");
                assert!(score >= 0.999, "{v}/{name} mask {i}: IoU {score}");
            }
            let r = rel_l2(
                &Tensor::new(p.iou.as_slice(), &Device::Cpu).unwrap(),
                &g[&format!("{name}.iou_scores")].flatten_all().unwrap(),
            );
            assert!(r <= 1e-4, "{v}/{name}: IoU predictions rel L2 {r}");
        }
    }
}

#[test]
fn the_segmenter_gives_the_mask_sam_rates_best() {
    let m = model("sam");
    let img = image("sam");
    let case = &meta("sam")["cases"][0];
    let prompt = user_prompt(case);
    let p = m.predict(&img, &prompt, true).unwrap();
    let best = p.best();
    assert!(p.iou.iter().all(|&x| x <= p.iou[best]));
    let seg = tkg::segment::sam::SamSegmenter::load(&dir("sam"), "sam", &Device::Cpu).unwrap();
    let mask = seg.segment(&img, &prompt).unwrap();
    assert_eq!(mask, p.mask(best));
    assert_eq!((mask.width, mask.height), img.dimensions());
}

#[test]
fn broken_sam_folders_are_refused_by_name() {
    let root = scratch("sam-broken");
    let copy = |name: &str, skip: &str| -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "preprocessor_config.json",
        ] {
            if f != skip {
                std::fs::copy(dir("sam").join(f), d.join(f)).unwrap();
            }
        }
        d
    };
    let err = |d: &PathBuf| format!("{:#}", SamModel::load_dir(d, &Device::Cpu).err().unwrap());
    for f in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        let d = copy(&format!("no-{f}"), f);
        let e = err(&d);
        assert!(e.contains(&format!("has no {f}")), "{e}");
    }
    // A config whose widths do not match the weights: the tensor is named.
    let d = copy("wrong-mlp", "");
    let text = std::fs::read_to_string(d.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["vision_config"]["mlp_dim"] = 100.into();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let e = err(&d);
    assert!(
        e.contains("vision_encoder.layers.0.mlp.lin1.weight") && e.contains("[100, 32]"),
        "{e}"
    );
    // One layer fewer than the weights have: the unused tensors are reported.
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["vision_config"]["num_hidden_layers"] = 2.into();
    cfg["vision_config"]["global_attn_indexes"] = serde_json::json!([]);
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let e = err(&d);
    assert!(e.contains("does not use") && e.contains("layers.2"), "{e}");
    // Not JSON, and a truncated weights file.
    std::fs::write(d.join("config.json"), "{").unwrap();
    assert!(err(&d).contains("config.json"));
    std::fs::write(d.join("config.json"), &text).unwrap();
    let w = std::fs::read(dir("sam").join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    let e = err(&d);
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn post_processing_matches_transformers() {
    for v in VARIANTS {
        let m = model(v);
        let g = goldens(v);
        let img = image(v);
        let original = (img.height() as usize, img.width() as usize);
        let reshaped = m.processor.reshaped(original);
        for case in meta(v)["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let low = g[&format!("{name}.pred_masks")].flatten_to(2).unwrap();
            let (_, _, count, lh, lw) = g[&format!("{name}.pred_masks")].dims5().unwrap();
            let low = low.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = g[&format!("{name}.masks")]
                .flatten_from(2)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<u8>()
                .unwrap();
            for (i, want) in want.iter().enumerate().take(count) {
                let up = m
                    .processor
                    .upscale_logits(
                        &low[i * lh * lw..(i + 1) * lh * lw],
                        (lh, lw),
                        reshaped,
                        original,
                    )
                    .unwrap();
                let ours: Vec<bool> = up.iter().map(|&x| x > 0.0).collect();
                let want: Vec<bool> = want.iter().map(|&x| x != 0).collect();
                let score = iou(&ours, &want);
                assert!(score >= 0.999, "{v}/{name} mask {i}: IoU {score}");
            }
        }
    }
}

#[test]
fn tkg_segment_runs_sam_with_points_and_a_box() {
    use crate::common::cli::{assert_ok, s, tkg};
    let d = scratch("sam-cli");
    let img = dir("sam").join("image.png");
    let out = d.join("m.png");
    let model = dir("sam");
    let run = tkg(&[
        "segment",
        s(&img),
        "--model",
        s(&model),
        "--point",
        "15,14.8",
        "--neg-point",
        "40,7.4",
        "--all-masks",
        "--out",
        s(&out),
    ]);
    assert_ok(&run);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let listed: Vec<&str> = stdout.lines().collect();
    let numbered: Vec<PathBuf> = (0..3).map(|i| d.join(format!("m.{i}.png"))).collect();
    assert_eq!(listed.len(), 4, "{stdout}");
    assert_eq!(listed[0], s(&out));
    for (l, p) in listed[1..].iter().zip(&numbered) {
        assert_eq!(*l, s(p));
    }
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("predicted IoU"), "{stderr}");

    let m = model_for_cli();
    let prompt = Prompt {
        points: vec![[15.0, 14.8]],
        negative_points: vec![[40.0, 7.4]],
        bbox: None,
    };
    let want = m.predict(&image("sam"), &prompt, true).unwrap();
    let best = want.best();
    let written = image::open(&out).unwrap().to_luma8();
    assert_eq!(written.into_raw(), want.mask(best).to_u8());
    let text = tkg::output::read_png_text(&out).unwrap();
    let iou = text
        .iter()
        .find(|(k, _)| k == "TKG segment iou")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(iou, format!("{:.4}", want.iou[best]));
    for (i, p) in numbered.iter().enumerate() {
        let written = image::open(p).unwrap().to_luma8();
        assert_eq!(written.into_raw(), want.mask(i).to_u8(), "mask {i}");
    }

    // A box alone works too.
    let boxed = d.join("b.png");
    assert_ok(&tkg(&[
        "segment",
        s(&img),
        "--model",
        s(&model),
        "--box",
        "5,5.5,35,33",
        "--out",
        s(&boxed),
    ]));
    assert!(boxed.is_file());

    // A [segmenters.NAME] entry may name a SAM folder.
    std::fs::write(
        d.join("models.toml"),
        format!("[segmenters.slim]\nfile = {:?}\n", s(&model)),
    )
    .unwrap();
    let by_entry = d.join("e.png");
    let run = crate::common::cli::command(&[
        "segment",
        s(&img),
        "--model",
        "slim",
        "--box",
        "5,5.5,35,33",
        "--out",
        s(&by_entry),
    ])
    .env("TKG_MODELS", d.join("models.toml"))
    .output()
    .unwrap();
    assert_ok(&run);
    assert_eq!(
        image::open(&by_entry).unwrap().to_luma8().into_raw(),
        image::open(&boxed).unwrap().to_luma8().into_raw()
    );
}

fn model_for_cli() -> SamModel {
    model("sam")
}

#[test]
fn tkg_segment_refuses_bad_sam_input_in_one_line() {
    use crate::common::cli::{assert_fails, s, tkg};
    let d = scratch("sam-cli-bad");
    let img = dir("sam").join("image.png");
    let out = d.join("m.png");
    let model = dir("sam");
    let seg = |extra: &[&str]| {
        let mut a = vec!["segment", s(&img), "--out", s(&out)];
        a.extend_from_slice(extra);
        tkg(&a)
    };
    // The image is 50x37.
    assert_fails(
        &seg(&["--model", s(&model), "--point", "60,10"]),
        "outside the 50x37 image",
    );
    assert_fails(
        &seg(&["--model", s(&model), "--box", "30,5,10,20"]),
        "is empty",
    );
    assert_fails(&seg(&["--model", s(&model)]), "SAM needs a prompt");
    let broken = d.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(model.join(f), broken.join(f)).unwrap();
    }
    assert_fails(
        &seg(&["--model", s(&broken), "--point", "10,10"]),
        "has no model.safetensors",
    );
    assert_fails(
        &seg(&["--model", "tiny-u2net", "--point", "10,10"]),
        "takes no points or box",
    );
    assert_fails(
        &seg(&["--model", "tiny-u2net", "--all-masks"]),
        "--all-masks is for SAM",
    );
    assert_fails(
        &seg(&["--model", "slimsam"]),
        "transformers SamModel folder",
    );
    let bad = seg(&["--model", s(&model), "--point", "10;10"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("2 numbers"));
    assert!(!out.exists());
}

/// SlimSAM-uniform-77's shapes at the real 1024 input, random weights: the multi-chunk global
/// attention and the padded 14-wide windows of a 64x64 grid. The reference is not committed
/// (38 MB); make it with `make_sam_golden.py --full DIR`, then run
/// `TKG_SAM_FULL=DIR cargo test --release --test it sam_parity::full -- --ignored --nocapture`.
#[test]
#[ignore = "needs TKG_SAM_FULL, a folder from make_sam_golden.py --full"]
fn full_size_slimsam_matches_transformers() {
    let d = PathBuf::from(std::env::var("TKG_SAM_FULL").expect("TKG_SAM_FULL"));
    let m = SamModel::load_dir(&d, &Device::Cpu).unwrap();
    let g = candle_core::safetensors::load(d.join("golden.safetensors"), &Device::Cpu).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("golden.json")).unwrap()).unwrap();
    let img = image::open(d.join("image.png")).unwrap().to_rgb8();
    let ours = m.processor.preprocess(&img, &Device::Cpu).unwrap();
    let px = max_abs(&ours.pixels, &g["pixel_values"]);
    assert!(px <= 1e-6, "pixel values differ by {px}");
    let start = std::time::Instant::now();
    let emb = m.embed_image(&ours.pixels).unwrap();
    let took = start.elapsed();
    let r = rel_l2(&emb, &g["image_embeddings"]);
    eprintln!("full: image embeddings rel L2 {r:.2e}, encoder {took:.2?}");
    assert!(r <= 1e-4, "image embeddings rel L2 {r}");
    for case in info["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let multimask = case["multimask"].as_bool().unwrap();
        let start = std::time::Instant::now();
        let mask = g.get(&format!("{name}.input_masks"));
        let out = m
            .decode_with_mask(
                &g["image_embeddings"],
                &golden_prompt(case, &g),
                mask,
                multimask,
            )
            .unwrap();
        let took = start.elapsed();
        let rm = rel_l2(
            &out.masks,
            &g[&format!("{name}.pred_masks")].squeeze(1).unwrap(),
        );
        let ri = rel_l2(
            &out.iou,
            &g[&format!("{name}.iou_scores")].squeeze(1).unwrap(),
        );
        eprintln!("full/{name}: logits rel L2 {rm:.2e}, IoU rel L2 {ri:.2e}, decoder {took:.2?}");
        assert!(rm <= 1e-4 && ri <= 1e-4, "{name}: {rm} {ri}");
        let p = m
            .predict_with_mask(&img, &user_prompt(case), mask, multimask)
            .unwrap();
        let want = g[&format!("{name}.masks")]
            .flatten_from(2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<u8>()
            .unwrap();
        for (i, want) in want.iter().enumerate() {
            let ours: Vec<bool> = p.logits[i].iter().map(|&x| x > 0.0).collect();
            let want: Vec<bool> = want.iter().map(|&x| x != 0).collect();
            let score = iou(&ours, &want);
            eprintln!("full/{name} mask {i}: IoU {score}");
            assert!(score >= 0.999, "{name} mask {i}: IoU {score}");
        }
    }
}

/// `tkg key --segment-model SAM_DIR`: the keyer prompts SAM itself (box, points inside the
/// subject, points on the screen) and fuses its mask; the fusion is reported.
#[test]
fn tkg_key_prompts_sam_from_the_key() {
    use crate::common::cli::{s, tkg};
    let d = scratch("sam-key");
    // A grey disc on green, crossed by a screen-coloured band.
    let (w, h) = (96u32, 80u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let r = ((x as f32 - 48.0).powi(2) + (y as f32 - 40.0).powi(2)).sqrt();
        if r < 28.0 && !(36..44).contains(&y) {
            image::Rgb([128, 128, 128])
        } else {
            image::Rgb([0, 177, 64])
        }
    });
    let src = d.join("disc.png");
    img.save(&src).unwrap();
    let out = d.join("disc-key.png");
    let run = tkg(&[
        "-v",
        "key",
        s(&src),
        "--segment-model",
        s(&dir("sam")),
        "--out",
        s(&out),
    ]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(d.join("disc-key.matte.png").exists());
    // The tiny random SAM's mask is noise: what is checked is that it was asked and its
    // mask went through the fusion, which reports what it did with it.
    let source = format!("subject mask {}", dir("sam").display());
    assert!(err.contains(&source), "{err}");
}

/// Registry names (`sam-vit-base`, `slimsam-77`, ...) read SAM repositories through the
/// Hugging Face cache, offline like the SD models, with the same kind of error when a file
/// is not there.
#[test]
fn registry_sam_names_load_from_the_hub_cache() {
    use crate::common::cli::{command, s};
    let d = scratch("sam-hub");
    let hf = d.join("hf");
    let repo = hf.join("hub/models--facebook--sam-vit-base");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in [
        "config.json",
        "preprocessor_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(dir("sam").join(f), snap.join(f)).unwrap();
    }
    let img = dir("sam").join("image.png");
    let run = |model: &str, out: &str| {
        command(&[
            "segment",
            s(&img),
            "--model",
            model,
            "--point",
            "10,10",
            "--out",
            s(&d.join(out)),
        ])
        .env("HF_HOME", &hf)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
    };
    let ok = run("sam-vit-base", "hub.png");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let local = run(s(&dir("sam")), "local.png");
    assert!(local.status.success());
    assert_eq!(
        image::open(d.join("hub.png"))
            .unwrap()
            .to_luma8()
            .into_raw(),
        image::open(d.join("local.png"))
            .unwrap()
            .to_luma8()
            .into_raw(),
        "the cached repository is the same model as the folder"
    );
    let missing = run("slimsam-77", "none.png");
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("Zigeng/SlimSAM-uniform-77") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    // The advice is a segmenter's, not an SD model's.
    assert!(
        err.contains("--segment-model DIR") && !err.contains("--model-dir"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!d.join("none.png").exists());
}

/// The built-in `tiny-sam` is written by tkg's own code on first use, the same bytes on every
/// run, and serves `tkg segment` and `--segment` offline.
#[test]
fn tiny_sam_is_built_in() {
    use crate::common::cli::{command, s};
    let d = scratch("tiny-sam");
    let img = dir("sam").join("image.png");
    let weights = |home: &str| {
        let hf = d.join(home);
        let run = command(&[
            "segment",
            s(&img),
            "--model",
            "tiny-sam",
            "--point",
            "20,15",
            "--out",
            s(&d.join(format!("{home}.png"))),
        ])
        .env("HF_HOME", &hf)
        .output()
        .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        std::fs::read(hf.join("hub/tkg--builtin--tiny-sam/model.safetensors")).unwrap()
    };
    let a = weights("a");
    assert_eq!(a, weights("b"), "deterministic weights");
    assert_eq!(
        std::fs::read(d.join("a.png")).unwrap(),
        std::fs::read(d.join("b.png")).unwrap()
    );
    let key = command(&[
        "key",
        s(&img),
        "--segment",
        "tiny-sam",
        "--out",
        s(&d.join("keyed.png")),
    ])
    .env("HF_HOME", d.join("a"))
    .output()
    .unwrap();
    assert!(
        key.status.success(),
        "{}",
        String::from_utf8_lossy(&key.stderr)
    );
}
