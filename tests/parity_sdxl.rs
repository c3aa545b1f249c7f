//! Parity with diffusers' StableDiffusionXLPipeline + DDIMScheduler on two tiny random-weight
//! SDXL models saved by `save_pretrained` (tests/golden/sdxl, made by make_golden.py), with an
//! empty negative prompt (zeros) and a real one.
//! Bars: final latent relative L2 <= 1e-4, 8-bit image max abs difference <= 1.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use tkg::models::hub::ModelFolder;
use tkg::pipeline::{LoadOptions, Pipeline};
use tkg::tkg::TkgSettings;

struct Golden {
    pipe: Pipeline,
    t: HashMap<String, Tensor>,
    json: serde_json::Value,
}

fn load(variant: &str, case: &str) -> Golden {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/sdxl")
        .join(variant);
    let folder = ModelFolder::local(&dir.join("model")).unwrap();
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        clip_skip: None,
    };
    let pipe = Pipeline::load(&folder, &opts).unwrap();
    let t = candle_core::safetensors::load(
        dir.join(format!("golden_{case}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let json = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("golden_{case}.json"))).unwrap(),
    )
    .unwrap();
    Golden { pipe, t, json }
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let num: f32 = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let den: f32 = b.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    (num / den).sqrt()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn green(g: &Golden) -> TkgSettings {
    let tkg = &g.json["tkg"];
    TkgSettings {
        signs: [0, 1, 1, 0],
        target_shift: tkg["target_shift"].as_f64().unwrap(),
        sigma: tkg["sigma"].as_f64().unwrap(),
        centers: vec![(0.0, 0.0)],
    }
}

fn check(variant: &str, case: &str) {
    let g = load(variant, case);
    let prompt = g.json["prompt"].as_str().unwrap();
    let negative = g.json["negative_prompt"].as_str().unwrap_or("");

    // Noise: torch.randn with a CPU generator.
    let seed = g.json["seed"].as_u64().unwrap();
    let want_noise = &g.t["noise"];
    let noise = tkg::rng::torch_cpu_randn(seed, want_noise.elem_count());
    let noise = Tensor::from_vec(noise, want_noise.shape(), &Device::Cpu).unwrap();
    assert!(
        max_abs(&noise, want_noise) < 1e-5,
        "noise differs from torch's"
    );

    // TKG-DM init from the golden noise.
    let (init, _) = tkg::tkg::apply(want_noise, &green(&g)).unwrap();
    let init_err = max_abs(&init, &g.t["init"]);
    assert!(init_err <= 1e-6, "TKG init max abs error {init_err}");

    // Conditioning.
    let mut cond = g.pipe.encode_prompt(prompt, negative, true).unwrap();
    let pooled_err = rel_l2(cond.pooled.as_ref().unwrap(), &g.t["pooled"]);
    assert!(pooled_err < 1e-5, "pooled rel L2 {pooled_err}");
    let m = &g.json["micro_conditioning"];
    let pair = |k: &str| {
        let v = m[k].as_array().unwrap();
        (
            v[0].as_u64().unwrap() as usize,
            v[1].as_u64().unwrap() as usize,
        )
    };
    cond.micro = Some(tkg::pipeline::MicroCond {
        original_size: pair("original_size"),
        crop_top_left: pair("crops_coords_top_left"),
        target_size: pair("target_size"),
    });
    let emb_err = rel_l2(&cond.context, &g.t["prompt_embeds"]);
    assert!(emb_err < 1e-5, "prompt embeddings rel L2 {emb_err}");

    // One UNet call.
    let t0 = g.json["timesteps"][0].as_u64().unwrap() as f64;
    let x = Tensor::cat(&[&g.t["init"], &g.t["init"]], 0).unwrap();
    let added = tkg::models::unet::AddedCond {
        text_embeds: g.t["pooled"].clone(),
        time_ids: g.t["add_time_ids"].clone(),
    };
    let eps = g
        .pipe
        .unet
        .forward(&x, t0, &g.t["prompt_embeds"], Some(&added))
        .unwrap();
    let unet_err = rel_l2(&eps, &g.t["unet_step0"]);
    if let Ok(dir) = std::env::var("TKG_PARITY_DUMP") {
        let mut dump = HashMap::new();
        g.pipe
            .unet
            .forward_traced(&x, t0, &g.t["prompt_embeds"], Some(&added), &mut |n, t| {
                dump.insert(n.to_string(), t.clone());
            })
            .unwrap();
        dump.insert("eps".to_string(), eps.clone());
        candle_core::safetensors::save(&dump, format!("{dir}/eps_xl_{variant}_{case}.safetensors"))
            .unwrap();
    }
    assert!(unet_err < 1e-5, "UNet step 0 rel L2 {unet_err}");

    // The whole loop from the golden init.
    let steps = g.json["steps"].as_u64().unwrap() as usize;
    let guidance = g.json["guidance"].as_f64().unwrap();
    let fin = g
        .pipe
        .denoise(&g.t["init"], &cond, steps, guidance, &mut |_, _| {})
        .unwrap();
    let fin_err = rel_l2(&fin, &g.t["final"]);
    assert!(fin_err <= 1e-4, "final latent rel L2 {fin_err}");

    // VAE decode and 8-bit image.
    let rgb = g.pipe.decode(&fin).unwrap();
    let want = g.t["image"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(rgb.len(), want.len());
    let worst = rgb
        .iter()
        .zip(&want)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    assert!(worst <= 1, "8-bit image max abs difference {worst}");
    eprintln!(
        "{variant}/{case}: pooled {pooled_err:.2e}, init {init_err:.2e}, embeds {emb_err:.2e}, unet {unet_err:.2e}, final {fin_err:.2e}, image {worst}"
    );
}

#[test]
fn variant_a_empty_negative_matches_diffusers() {
    check("a", "empty");
}

#[test]
fn variant_a_negative_prompt_matches_diffusers() {
    check("a", "neg");
}

#[test]
fn variant_b_empty_negative_matches_diffusers() {
    check("b", "empty");
}

#[test]
fn variant_b_negative_prompt_matches_diffusers() {
    check("b", "neg");
}
