//! Every sampler against diffusers' pipelines with that scheduler (tests/golden/sampler_pipelines,
//! made by its make_golden.py) on the tiny SD1.5 models (epsilon/leading and
//! v-prediction/trailing) and SDXL: the same TKG-DM init, the same generator stream for the
//! stochastic ones, 20 steps and CFG 7.5 (LCM 4 and 1.5; Turbo and Lightning cases without
//! guidance). Bars: final latent relative L2 <= 1e-4, 8-bit image within 1.

use crate::common::{self, max_u8_diff, rel_l2};

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use tkg::models::hub::ModelFolder;
use tkg::pipeline::{LoadOptions, Pipeline, Sampling};
use tkg::rng::{Generator, RngKind};
use tkg::sampling::{SamplerKind, SamplerSettings, Schedule, Spacing};
use tkg::scheduler::StepNoise;

struct Model {
    pipe: Pipeline,
    meta: serde_json::Value,
    init: Tensor,
    noise_len: usize,
    want: HashMap<String, Tensor>,
}

fn load(case: &serde_json::Value) -> Model {
    let g = common::golden();
    let folder = g.join(case["folder"].as_str().unwrap());
    let stem = case["stem"].as_str().unwrap();
    let pipe = Pipeline::load(
        &ModelFolder::local(&folder.join("model")).unwrap(),
        &LoadOptions::cpu_f32(),
    )
    .unwrap();
    let text = std::fs::read_to_string(folder.join(format!("{stem}.json"))).unwrap();
    let t =
        candle_core::safetensors::load(folder.join(format!("{stem}.safetensors")), &Device::Cpu)
            .unwrap();
    let model = case["model"].as_str().unwrap();
    let want = candle_core::safetensors::load(
        g.join(format!("sampler_pipelines/{model}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    Model {
        pipe,
        meta: serde_json::from_str(&text).unwrap(),
        init: t["init"].clone(),
        noise_len: t["noise"].elem_count(),
        want,
    }
}

fn sampling(case: &serde_json::Value) -> Sampling {
    let text = |k: &str| case[k].as_str().unwrap();
    Sampling {
        sampler: SamplerSettings {
            kind: SamplerKind::parse(text("sampler")).unwrap(),
            schedule: Schedule::parse(text("schedule")).unwrap(),
            eta: case["eta"].as_f64().unwrap(),
            spacing: case["spacing"].as_str().map(|s| Spacing::parse(s).unwrap()),
        },
        steps: case["steps"].as_u64().unwrap() as usize,
        guidance: case["guidance"].as_f64().unwrap(),
    }
}

fn check(m: &Model, case: &serde_json::Value) -> (f32, i32) {
    let name = case["case"].as_str().unwrap();
    let sampling = sampling(case);
    let prompt = m.meta["prompt"].as_str().unwrap();
    let negative = m.meta["negative_prompt"].as_str().unwrap_or("");
    let mut cond = m
        .pipe
        .encode_prompt(prompt, negative, sampling.uses_cfg())
        .unwrap();
    if cond.pooled.is_some() {
        cond.micro = Some(tkg::pipeline::MicroCond::for_size(
            tkg::settings::Size::new(
                m.meta["width"].as_u64().unwrap() as usize,
                m.meta["height"].as_u64().unwrap() as usize,
            ),
        ));
    }
    // The generator drew the noise first; the step noise continues its stream.
    let seed = m.meta["seed"].as_u64().unwrap();
    let mut generator = Generator::new(RngKind::TorchCpu, seed);
    generator.randn(m.noise_len);
    let mut noise = StepNoise::new(vec![generator]);
    let calls = m.pipe.denoise_calls(&sampling, None).unwrap();
    assert_eq!(
        calls,
        case["timesteps"].as_array().unwrap().len(),
        "{name}: UNet calls"
    );
    let fin = m
        .pipe
        .denoise(&m.init, &cond, &sampling, &mut noise, &mut |_, _| Ok(()))
        .unwrap();
    let err = rel_l2(&fin, &m.want[&format!("{name}.final")]);
    let rgb = m.pipe.decode(&fin).unwrap();
    let want = m.want[&format!("{name}.image")]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    (err, max_u8_diff(&rgb, &want))
}

fn check_model(model: &str) {
    let path = common::golden().join("sampler_pipelines/cases.json");
    let all: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases: Vec<&serde_json::Value> = all["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["model"] == model)
        .collect();
    assert!(cases.len() >= 14, "{model}: {} cases", cases.len());
    let m = load(cases[0]);
    let mut failed = Vec::new();
    for case in &cases {
        let name = case["case"].as_str().unwrap();
        let (err, worst) = check(&m, case);
        eprintln!("{model} {name}: final rel L2 {err:.2e}, image {worst}");
        if !(err <= 1e-4 && worst <= 1) {
            failed.push(format!("{name} (rel L2 {err:.2e}, image {worst})"));
        }
    }
    assert!(failed.is_empty(), "{model}: {}", failed.join("; "));
}

#[test]
fn sd15_a_every_sampler_matches_diffusers() {
    check_model("sd15_a");
}

#[test]
fn sd15_b_v_prediction_every_sampler_matches_diffusers() {
    check_model("sd15_b");
}

#[test]
fn sdxl_a_every_sampler_matches_diffusers() {
    check_model("sdxl_a");
}
