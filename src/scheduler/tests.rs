//! Every sampler against diffusers: `tests/golden/samplers/golden.json` (made by
//! `make_golden.py` there) runs each diffusers class on a few configs with a synthetic float32
//! model; these tests run the same loop through [`build`] and compare.

use super::*;
use crate::rng::RngKind;
use candle_core::Device;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::OnceLock;

fn doc() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        serde_json::from_str(include_str!("../../tests/golden/samplers/golden.json")).unwrap()
    })
}

fn hex_f32(s: &str) -> Vec<f32> {
    assert_eq!(s.len() % 8, 0);
    (0..s.len() / 8)
        .map(|i| f32::from_bits(u32::from_str_radix(&s[i * 8..i * 8 + 8], 16).unwrap()))
        .collect()
}

/// The goldens' model, in float32 with one rounding per operation as torch computes it:
/// `(x * 0.9) / ((x * x) * 0.05 + 1.0) + f32(0.05 * cos(t / 100))`.
fn model(x: &Tensor, t: f64) -> Tensor {
    let c = (0.05 * (t / 100.0).cos()) as f32;
    let num = ops::mul(x, 0.9).unwrap();
    let den = ops::add(&ops::mul(&(x * x).unwrap(), 0.05).unwrap(), 1.0).unwrap();
    ops::add(&(num / den).unwrap(), c).unwrap()
}

fn config(name: &str, extra: &Value) -> SchedulerConfig {
    let mut cfg = doc()["configs"][name].clone();
    for (k, v) in extra.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    serde_json::from_value(cfg).unwrap()
}

fn settings(case: &Value) -> SamplerSettings {
    SamplerSettings {
        kind: SamplerKind::parse(case["sampler"].as_str().unwrap()).unwrap(),
        schedule: Schedule::parse(case["schedule"].as_str().unwrap()).unwrap(),
        eta: case["eta"].as_f64().unwrap(),
        spacing: case["spacing"].as_str().map(|s| Spacing::parse(s).unwrap()),
    }
}

struct Run {
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    mid: Option<Vec<f32>>,
    last: Vec<f32>,
}

/// diffusers' denoise loop with tkg's sampler.
fn run(case: &Value) -> Result<Run> {
    let cfg = config(case["config"].as_str().unwrap(), &case["extra"]);
    let steps = case["steps"].as_u64().unwrap() as usize;
    let mut sampler = build(&cfg, &settings(case), steps)?;
    let shape: Vec<usize> = doc()["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let per_row: usize = shape[1..].iter().product();
    let mut gens: Vec<Generator> = doc()["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| Generator::new(RngKind::TorchCpu, s.as_u64().unwrap()))
        .collect();
    let init: Vec<f32> = gens.iter_mut().flat_map(|g| g.randn(per_row)).collect();
    let mut noise = StepNoise::new(gens);
    let latents = Tensor::from_vec(init, shape.as_slice(), &Device::Cpu)?;
    let mut latents = ops::mul(&latents, sampler.init_noise_sigma() as f32)?;
    let timesteps = sampler.timesteps().to_vec();
    let mid_at = case["mid_index"].as_i64().unwrap();
    let mut mid = None;
    for (i, &t) in timesteps.iter().enumerate() {
        let x = sampler.scale_model_input(&latents, i)?;
        let out = model(&x, t);
        latents = sampler.step(&out, i, &latents, &mut noise)?;
        if i as i64 == mid_at {
            mid = Some(latents.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(Run {
        timesteps,
        init_noise_sigma: sampler.init_noise_sigma(),
        mid,
        last: latents.flatten_all()?.to_vec1::<f32>()?,
    })
}

/// max |a - b| / max |b|.
fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let err = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    err / scale.max(1e-30)
}

#[test]
fn every_case_matches_diffusers() {
    let mut worst: BTreeMap<String, (f64, usize, String)> = BTreeMap::new();
    let mut failures = Vec::new();
    let cases = doc()["cases"].as_array().unwrap();
    assert!(cases.len() >= 150, "only {} cases", cases.len());
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let r = match run(case) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{name}: {e:#}"));
                continue;
            }
        };
        let want_t: Vec<f64> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        if r.timesteps.len() != want_t.len()
            || r.timesteps
                .iter()
                .zip(&want_t)
                .any(|(a, b)| (a - b).abs() > 1e-6 * b.abs().max(1.0))
        {
            failures.push(format!("{name}: timesteps {:?} != {want_t:?}", r.timesteps));
        }
        let want_s = case["init_noise_sigma"].as_f64().unwrap();
        if (r.init_noise_sigma - want_s).abs() > 1e-6 * want_s {
            failures.push(format!(
                "{name}: init_noise_sigma {} != {want_s}",
                r.init_noise_sigma
            ));
        }
        let mut err = max_rel(&r.last, &hex_f32(case["final"].as_str().unwrap()));
        if let (Some(m), Some(w)) = (&r.mid, case["mid"].as_str()) {
            err = err.max(max_rel(m, &hex_f32(w)));
        }
        if err.is_nan() || err > 1e-5 {
            failures.push(format!("{name}: max relative error {err:.3e}"));
        }
        let key = format!(
            "{}/{}",
            case["sampler"].as_str().unwrap(),
            case["schedule"].as_str().unwrap()
        );
        let e = worst.entry(key).or_insert((0.0, 0, String::new()));
        if err >= e.0 {
            e.0 = err;
            e.2 = name.to_string();
        }
        e.1 += 1;
    }
    for (k, (e, n, at)) in &worst {
        println!("{k:28} {n:3} cases, max relative error {e:.2e} ({at})");
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn sd15() -> SchedulerConfig {
    config("sd15", &serde_json::json!({}))
}

fn with(kind: SamplerKind, schedule: Schedule) -> SamplerSettings {
    SamplerSettings {
        kind,
        schedule,
        ..Default::default()
    }
}

/// Each sampler x schedule either has goldens or is refused by `build` with a message that
/// names the schedule.
#[test]
fn every_combination_is_covered_or_refused() {
    let cases = doc()["cases"].as_array().unwrap();
    for kind in SamplerKind::ALL {
        for schedule in Schedule::ALL {
            let has_golden = cases.iter().any(|c| {
                c["sampler"].as_str() == Some(kind.name())
                    && c["schedule"].as_str() == Some(schedule.name())
            });
            let steps = if kind == SamplerKind::Lcm { 4 } else { 20 };
            match build(&sd15(), &with(kind, schedule), steps) {
                Ok(_) => assert!(has_golden, "{kind} {schedule} builds but has no golden"),
                Err(e) => {
                    assert!(
                        !has_golden,
                        "{kind} {schedule} has goldens but is refused: {e}"
                    );
                    let msg = format!("{e:#}");
                    assert!(msg.contains(schedule.name()), "{kind} {schedule}: {msg}");
                }
            }
        }
    }
    // The combinations diffusers has no option for.
    for (kind, schedule) in [
        (SamplerKind::Ddim, Schedule::Karras),
        (SamplerKind::Ddim, Schedule::Exponential),
        (SamplerKind::EulerAncestral, Schedule::Karras),
        (SamplerKind::EulerAncestral, Schedule::Exponential),
        (SamplerKind::Lcm, Schedule::Karras),
        (SamplerKind::Lcm, Schedule::Exponential),
    ] {
        assert!(
            build(&sd15(), &with(kind, schedule), 4).is_err(),
            "{kind} {schedule}"
        );
    }
}

fn err_of(cfg: Value, settings: SamplerSettings, steps: usize) -> String {
    let mut base = doc()["configs"]["sd15"].clone();
    for (k, v) in cfg.as_object().unwrap() {
        base[k] = v.clone();
    }
    let cfg: SchedulerConfig = serde_json::from_value(base).unwrap();
    match build(&cfg, &settings, steps) {
        Ok(_) => panic!("{settings:?} {steps} steps on {cfg:?} built"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn unsupported_settings_are_one_line_errors() {
    use serde_json::json;
    let k = |kind| with(kind, Schedule::Default);
    let cases: Vec<(Value, SamplerSettings, usize, &str)> = vec![
        (
            json!({"prediction_type": "sample"}),
            k(SamplerKind::EulerAncestral),
            20,
            "sample",
        ),
        (
            json!({"prediction_type": "flow_prediction"}),
            k(SamplerKind::DpmPp2m),
            20,
            "flow_prediction",
        ),
        (
            json!({"thresholding": true}),
            k(SamplerKind::UniPc),
            20,
            "thresholding",
        ),
        (
            json!({"thresholding": true}),
            k(SamplerKind::Euler),
            20,
            "thresholding",
        ),
        (
            json!({"rescale_betas_zero_snr": true}),
            k(SamplerKind::Lcm),
            4,
            "rescale_betas_zero_snr",
        ),
        (
            json!({"rescale_betas_zero_snr": true}),
            k(SamplerKind::Ddim),
            20,
            "rescale_betas_zero_snr",
        ),
        (
            json!({"use_beta_sigmas": true}),
            k(SamplerKind::Heun),
            20,
            "use_beta_sigmas",
        ),
        (
            json!({"use_karras_sigmas": true, "use_exponential_sigmas": true}),
            k(SamplerKind::Euler),
            20,
            "only one",
        ),
        (
            json!({"interpolation_type": "log_linear"}),
            k(SamplerKind::Euler),
            20,
            "log_linear",
        ),
        (
            json!({"final_sigmas_type": "max"}),
            k(SamplerKind::DpmPp2m),
            20,
            "final_sigmas_type",
        ),
        (
            json!({"variance_type": "learned_range"}),
            k(SamplerKind::DpmPp2m),
            20,
            "variance_type",
        ),
        (
            json!({"use_lu_lambdas": true}),
            k(SamplerKind::DpmPp2mSde),
            20,
            "use_lu_lambdas",
        ),
        (
            json!({"use_flow_sigmas": true}),
            k(SamplerKind::UniPc),
            20,
            "use_flow_sigmas",
        ),
        (
            json!({"solver_order": 4}),
            k(SamplerKind::UniPc),
            20,
            "solver_order",
        ),
        (
            json!({"solver_type": "bh1"}),
            k(SamplerKind::UniPc),
            20,
            "bh1",
        ),
        (
            json!({"predict_x0": false}),
            k(SamplerKind::UniPc),
            20,
            "predict_x0",
        ),
        (
            json!({"lower_order_final": false}),
            k(SamplerKind::UniPc),
            20,
            "lower_order_final",
        ),
        (
            json!({"timestep_spacing": "karras"}),
            k(SamplerKind::Euler),
            20,
            "timestep_spacing",
        ),
        (
            json!({"beta_schedule": "cosine"}),
            k(SamplerKind::Heun),
            20,
            "beta_schedule",
        ),
        (
            json!({}),
            k(SamplerKind::Lcm),
            51,
            "original_inference_steps",
        ),
        (
            json!({"original_inference_steps": 2000}),
            k(SamplerKind::Lcm),
            4,
            "original_inference_steps",
        ),
        (json!({}), k(SamplerKind::Euler), 1001, "training timesteps"),
        (
            json!({}),
            k(SamplerKind::DpmPp2m),
            1001,
            "training timesteps",
        ),
        (json!({}), k(SamplerKind::Heun), 0, "at least 1"),
        (
            json!({"timestep_spacing": "leading"}),
            k(SamplerKind::UniPc),
            1000,
            "leading",
        ),
        (
            json!({}),
            with(SamplerKind::EulerAncestral, Schedule::Karras),
            20,
            "karras",
        ),
        (
            json!({}),
            with(SamplerKind::Lcm, Schedule::Exponential),
            4,
            "exponential",
        ),
        (
            json!({}),
            with(SamplerKind::Ddim, Schedule::Karras),
            20,
            "karras",
        ),
        (
            json!({}),
            SamplerSettings {
                kind: SamplerKind::Euler,
                eta: 0.5,
                ..Default::default()
            },
            20,
            "eta",
        ),
    ];
    for (cfg, s, steps, want) in cases {
        let msg = err_of(cfg.clone(), s, steps);
        assert!(msg.contains(want), "{cfg} {s:?}: '{msg}' lacks '{want}'");
        assert!(!msg.contains('\n'), "{msg}");
    }
}

#[test]
fn class_defaults_differ_where_diffusers_does() {
    // A config without timestep_spacing: DDIM spaces "leading", Euler "linspace".
    let cfg = sd15();
    let ddim = build(&cfg, &with(SamplerKind::Ddim, Schedule::Default), 20).unwrap();
    assert_eq!(ddim.timesteps()[0], 951.0);
    let euler = build(&cfg, &with(SamplerKind::Euler, Schedule::Default), 20).unwrap();
    assert_eq!(euler.timesteps()[0], 999.0);
    assert!(euler.timesteps()[1].fract() != 0.0);
    // --timestep-spacing overrides the config.
    let mut s = with(SamplerKind::Euler, Schedule::Default);
    s.spacing = Some(Spacing::Leading);
    assert_eq!(build(&cfg, &s, 20).unwrap().timesteps()[0], 951.0);
    // Heun calls the UNet 2 * steps - 1 times.
    let heun = build(&cfg, &with(SamplerKind::Heun, Schedule::Default), 20).unwrap();
    assert_eq!(heun.timesteps().len(), 39);
    // LCM's own schedule.
    let lcm = build(&cfg, &with(SamplerKind::Lcm, Schedule::Default), 4).unwrap();
    assert_eq!(lcm.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
}
