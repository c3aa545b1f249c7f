//! img2img and inpainting against diffusers' StableDiffusion(XL)Img2Img and Inpaint pipelines
//! (tests/golden/insertion, made by its make_golden.py): the tiny SD1.5 models (epsilon /
//! leading and v-prediction / trailing), SDXL, and 9-channel inpainting models of both
//! families. Photo and mask go through tkg's own loading (the 2x mask through its resize).
//! Bars: final latent relative L2 <= 1e-4, 8-bit image within 1.

use crate::common::{self, max_u8_diff, rel_l2};

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;
use tkg::models::hub::ModelFolder;
use tkg::pipeline::{
    AestheticScores, InitNoise, LoadOptions, MicroCond, Pipeline, Request, Sampling, SourceImage,
};
use tkg::rng::RngKind;
use tkg::run::source;
use tkg::sampling::{SamplerKind, SamplerSettings, Schedule};
use tkg::settings::{Offset, Size};

fn cases() -> serde_json::Value {
    let path = common::golden().join("insertion/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// tkg's sampler for the diffusers class and overrides a case names.
fn sampler(case: &serde_json::Value) -> SamplerSettings {
    let kind = match case["scheduler"].as_str().unwrap() {
        "DDIMScheduler" => SamplerKind::Ddim,
        "EulerAncestralDiscreteScheduler" => SamplerKind::EulerAncestral,
        "EulerDiscreteScheduler" => SamplerKind::Euler,
        "DPMSolverMultistepScheduler" => SamplerKind::DpmPp2m,
        "UniPCMultistepScheduler" => SamplerKind::UniPc,
        other => panic!("no tkg sampler for {other}"),
    };
    let karras = case["scheduler_overrides"]["use_karras_sigmas"] == true;
    SamplerSettings {
        kind,
        schedule: if karras {
            Schedule::Karras
        } else {
            Schedule::Default
        },
        eta: case["eta"].as_f64().unwrap(),
        spacing: None,
    }
}

fn micro(case: &serde_json::Value) -> Option<MicroCond> {
    let m = &case["micro_conditioning"];
    if m.is_null() {
        return None;
    }
    // diffusers writes (height, width) and (top, left).
    let pair = |k: &str| {
        let v = m[k].as_array().unwrap();
        (
            v[0].as_u64().unwrap() as usize,
            v[1].as_u64().unwrap() as usize,
        )
    };
    let size = |k: &str| {
        let (h, w) = pair(k);
        Size::new(w, h)
    };
    let (top, left) = pair("crops_coords_top_left");
    Some(MicroCond {
        original_size: size("original_size"),
        crop_top_left: Offset { top, left },
        target_size: size("target_size"),
        aesthetic: Default::default(),
    })
}

fn request(case: &serde_json::Value) -> Request {
    let dir = common::golden().join("insertion");
    let size = Size::new(
        case["width"].as_u64().unwrap() as usize,
        case["height"].as_u64().unwrap() as usize,
    );
    let inputs = &case["inputs"];
    let photo = source::load_rgb(&dir.join(inputs["image"].as_str().unwrap())).unwrap();
    let mask = inputs["mask_image"]
        .as_str()
        .map(|m| Arc::new(source::load_mask(&dir.join(m), &photo, size).unwrap()));
    Request {
        prompt: case["prompt"].as_str().unwrap().into(),
        negative_prompt: case["negative_prompt"].as_str().unwrap_or("").into(),
        size,
        sampling: Sampling {
            sampler: sampler(case),
            steps: case["steps"].as_u64().unwrap() as usize,
            guidance: case["guidance"].as_f64().unwrap(),
        },
        seed: case["seed"].as_u64().unwrap(),
        init: InitNoise::Plain,
        micro: micro(case),
        source: Some(SourceImage {
            rgb: Arc::new(source::resized_rgb8(&photo, size).unwrap()),
            strength: case["strength"].as_f64().unwrap(),
            mask,
        }),
        preview: false,
    }
}

fn check_model(model: &str) {
    let all = cases();
    let cases: Vec<&serde_json::Value> = all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["model"] == model)
        .collect();
    assert!(!cases.is_empty(), "{model}: no cases");
    let folder =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(cases[0]["folder"].as_str().unwrap());
    let pipe = Pipeline::load(
        &ModelFolder::local(&folder).unwrap(),
        &LoadOptions::cpu_f32(),
    )
    .unwrap();
    let want: HashMap<String, Tensor> = candle_core::safetensors::load(
        common::golden().join(format!("insertion/{model}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let mut failed = Vec::new();
    for case in &cases {
        let name = case["case"].as_str().unwrap();
        let req = request(case);
        let runs = case["steps_run"].as_u64().unwrap() as usize;
        let calls = pipe
            .denoise_calls(&req.sampling, Some(req.source.as_ref().unwrap().strength))
            .unwrap();
        assert_eq!(calls, runs, "{model} {name}: UNet calls");
        let mut seen = 0;
        let g = pipe
            .generate_with(&req, RngKind::TorchCpu, &mut |i, n| {
                assert_eq!(n, runs);
                seen = i;
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, runs, "{model} {name}: progress");
        // Tensors shared by several cases are stored once: each case names its keys.
        let tensor = |t: &str| &want[case["tensors"][t]["key"].as_str().unwrap()];
        let noise_err = rel_l2(&g.noise, tensor("noise"));
        let err = rel_l2(&g.final_latents, tensor("final"));
        let image = tensor("image")
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let worst = max_u8_diff(&g.rgb, &image);
        eprintln!(
            "{model} {name}: noise rel L2 {noise_err:.1e}, final rel L2 {err:.2e}, image {worst}"
        );
        if !(err <= 1e-4 && worst <= 1 && noise_err == 0.0) {
            failed.push(format!(
                "{name} (noise {noise_err:.1e}, final {err:.2e}, image {worst})"
            ));
        }
    }
    assert!(failed.is_empty(), "{model}: {}", failed.join("; "));
}

#[test]
fn sd15_a_img2img_and_inpainting_match_diffusers() {
    check_model("sd15_a");
}

#[test]
fn sd15_b_v_prediction_img2img_and_inpainting_match_diffusers() {
    check_model("sd15_b");
}

#[test]
fn sdxl_img2img_and_inpainting_match_diffusers() {
    check_model("sdxl_a");
}

#[test]
fn sd15_nine_channel_inpainting_matches_diffusers() {
    check_model("sd15_inpaint");
}

#[test]
fn sdxl_nine_channel_inpainting_matches_diffusers() {
    check_model("sdxl_inpaint");
}

/// The SDXL refiner (no CLIP-L; 5 time ids ending in an aesthetic score, the negative rows
/// with the negative score and no crop) against diffusers' SDXL Img2Img and Inpaint pipelines
/// with `requires_aesthetics_score` (tests/golden/insertion/make_refiner_golden.py).
#[test]
fn sdxl_refiner_aesthetic_conditioning_matches_diffusers() {
    let dir = common::golden().join("insertion");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("refiner_cases.json")).unwrap())
            .unwrap();
    let pipe = Pipeline::load(
        &ModelFolder::local(&dir.join("sdxl_refiner/model")).unwrap(),
        &LoadOptions::cpu_f32(),
    )
    .unwrap();
    assert!(pipe.takes_aesthetic_score());
    let want: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("sdxl_refiner.safetensors"), &Device::Cpu).unwrap();
    let mut failed = Vec::new();
    for case in doc["cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let size = Size::new(64, 64);
        let photo = source::load_rgb(&dir.join(case["photo"].as_str().unwrap())).unwrap();
        let mask = case["mask"]
            .as_str()
            .map(|m| Arc::new(source::load_mask(&dir.join(m), &photo, size).unwrap()));
        let crop = case["crops_coords_top_left"].as_array().unwrap();
        let defaults = AestheticScores::default();
        let req = Request {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
            size,
            sampling: Sampling::new(10, 7.5),
            seed: case["seed"].as_u64().unwrap(),
            init: InitNoise::Plain,
            micro: Some(MicroCond {
                crop_top_left: Offset {
                    top: crop[0].as_u64().unwrap() as usize,
                    left: crop[1].as_u64().unwrap() as usize,
                },
                aesthetic: AestheticScores {
                    score: case["aesthetic_score"].as_f64().unwrap_or(defaults.score),
                    negative: case["negative_aesthetic_score"]
                        .as_f64()
                        .unwrap_or(defaults.negative),
                },
                ..MicroCond::for_size(size)
            }),
            source: Some(SourceImage {
                rgb: Arc::new(source::resized_rgb8(&photo, size).unwrap()),
                strength: case["strength"].as_f64().unwrap(),
                mask,
            }),
            preview: false,
        };
        let g = pipe
            .generate_with(&req, RngKind::TorchCpu, &mut |_, _| Ok(()))
            .unwrap();
        let err = rel_l2(&g.final_latents, &want[&format!("{name}.final")]);
        let image = want[&format!("{name}.image")]
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        let worst = max_u8_diff(&g.rgb, &image);
        eprintln!("sdxl_refiner {name}: final rel L2 {err:.2e}, image {worst}");
        if !(err <= 1e-4 && worst <= 1) {
            failed.push(format!("{name} (final {err:.2e}, image {worst})"));
        }
    }
    assert!(failed.is_empty(), "sdxl_refiner: {}", failed.join("; "));
}
