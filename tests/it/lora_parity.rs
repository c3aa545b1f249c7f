//! LoRA merging against diffusers' `load_lora_weights` + `fuse_lora` on the tiny golden models
//! (tests/golden/lora, made by make_golden.py): a PEFT file and a kohya file (LoCon convs
//! included) for SD1.5 and SDXL. Bar: final latent relative L2 <= 1e-4.

use crate::common;

use candle_core::{DType, Device, Tensor};
use std::path::Path;
use tkg::models::hub::ModelFolder;
use tkg::models::lora::LoraSpec;
use tkg::pipeline::{Adapters, ModelSource, Pipeline};

fn spec(path: &Path, weight: f32) -> LoraSpec {
    LoraSpec {
        path: path.to_path_buf(),
        weight,
        name: path.file_stem().unwrap().to_string_lossy().into_owned(),
    }
}

fn load_with(model: &str, loras: Vec<LoraSpec>, strict: bool) -> anyhow::Result<Pipeline> {
    let folder = ModelFolder::local(&common::golden().join(model)).unwrap();
    Pipeline::load_with(
        ModelSource::Folder(&folder),
        &common::cpu_f32(),
        &Adapters {
            loras,
            lora_strict: strict,
            vae: None,
        },
    )
}

fn check(case: &str) {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden().join("lora/golden.json")).unwrap(),
    )
    .unwrap();
    let c = &doc["cases"][case];
    let lora = common::golden()
        .join("lora")
        .join(c["lora"].as_str().unwrap());
    let weight = c["multiplier"].as_f64().unwrap() as f32;
    let pipe = load_with(
        c["model"].as_str().unwrap(),
        vec![spec(&lora, weight)],
        true,
    )
    .unwrap();

    // Every module applied, nothing unmatched.
    let report = &pipe.lora_reports[0];
    let applied: usize = report.applied.values().sum();
    assert_eq!(applied as u64, c["modules"].as_u64().unwrap(), "{report:?}");
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    assert_eq!(pipe.lora_hashes.len(), 1);
    assert_eq!(pipe.lora_hashes[0].1.len(), 12);

    let settings: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden().join(c["settings_from"].as_str().unwrap()))
            .unwrap(),
    )
    .unwrap();
    let init_file = c["init_from"].as_str().unwrap().trim_end_matches(" (init)");
    let init = candle_core::safetensors::load(common::golden().join(init_file), &Device::Cpu)
        .unwrap()["init"]
        .clone();
    let want = candle_core::safetensors::load(
        common::golden().join(format!("lora/{case}.golden.safetensors")),
        &Device::Cpu,
    )
    .unwrap()["final"]
        .clone();
    let neg = settings["negative_prompt"].as_str().unwrap_or("");
    let cond = pipe
        .encode_prompt(settings["prompt"].as_str().unwrap(), neg, true)
        .unwrap();
    let fin = pipe
        .denoise_ddim(
            &init,
            &cond,
            settings["steps"].as_u64().unwrap() as usize,
            settings["guidance"].as_f64().unwrap(),
        )
        .unwrap();
    let err = common::rel_l2(&fin, &want);
    eprintln!(
        "{case}: final latent rel L2 {err:.2e} ({})",
        report.summary()
    );
    assert!(err <= 1e-4, "{case}: final latent rel L2 {err}");
}

#[test]
fn sd15_peft_matches_diffusers() {
    check("sd15_peft");
}

#[test]
fn sd15_kohya_matches_diffusers() {
    check("sd15_kohya");
}

#[test]
fn sdxl_peft_matches_diffusers() {
    check("sdxl_peft");
}

#[test]
fn sdxl_kohya_matches_diffusers() {
    check("sdxl_kohya");
}

#[test]
fn a_lora_for_the_other_family_is_refused() {
    let xl = common::golden().join("lora/sdxl_kohya.lora.safetensors");
    let e = load_with("sd15/a/model", vec![spec(&xl, 1.0)], false)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("targets SDXL"), "{e:#}");
    let sd = common::golden().join("lora/sd15_peft.lora.safetensors");
    let e = load_with("sdxl/a/model", vec![spec(&sd, 1.0)], false)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("32-wide"), "{e:#}");
}

/// Writes `tensors` as a safetensors file.
fn save(path: &Path, tensors: Vec<(&str, Tensor)>) {
    let map: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn unmatched_tensors_are_reported_or_refused() {
    let dir = std::env::temp_dir().join(format!("tkg-lora-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    // One real module of the SD1.5 model (16 channels), one that matches nothing.
    let file = dir.join("partial.safetensors");
    save(
        &file,
        vec![
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                z(&[2, 16]),
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
                z(&[16, 2]),
            ),
            ("lora_unet_nowhere_to_q.lora_down.weight", z(&[2, 32])),
            ("lora_unet_nowhere_to_q.lora_up.weight", z(&[32, 2])),
        ],
    );
    let pipe = load_with("sd15/a/model", vec![spec(&file, 1.0)], false).unwrap();
    let r = &pipe.lora_reports[0];
    assert_eq!(r.applied.get("unet"), Some(&1));
    assert_eq!(r.unmatched.len(), 2, "{:?}", r.unmatched);
    let e = load_with("sd15/a/model", vec![spec(&file, 1.0)], true)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("--lora-strict"), "{e:#}");

    // Nothing matches: an error, not a silent no-op.
    let none = dir.join("none.safetensors");
    save(
        &none,
        vec![
            ("lora_unet_nowhere_to_q.lora_down.weight", z(&[2, 32])),
            ("lora_unet_nowhere_to_q.lora_up.weight", z(&[32, 2])),
        ],
    );
    let e = load_with("sd15/a/model", vec![spec(&none, 1.0)], false)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("none of its 1 modules"), "{e:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_loras_add_up() {
    // The same file twice at 0.35 each equals it once at 0.7 (the kohya golden's weight).
    let lora = common::golden().join("lora/sd15_kohya.lora.safetensors");
    let once = load_with("sd15/a/model", vec![spec(&lora, 0.7)], true).unwrap();
    let twice = load_with(
        "sd15/a/model",
        vec![spec(&lora, 0.35), spec(&lora, 0.35)],
        true,
    )
    .unwrap();
    let a = once.encode_prompt("a car", "", true).unwrap().context;
    let b = twice.encode_prompt("a car", "", true).unwrap().context;
    assert!(common::rel_l2(&b, &a) < 1e-5);
}
