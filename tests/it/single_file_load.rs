//! Single-file checkpoints: the tiny golden models converted to the A1111 / ComfyUI layout
//! (LDM names) by tests/golden/single_file/make_manifest.py load to exactly what their
//! diffusers folders load to, for SD1.5 and SDXL.

use crate::common;

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tkg::models::hub::ModelFolder;
use tkg::pipeline::{Adapters, InitNoise, ModelSource, Pipeline, Request, VaeSource};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tkg-single-file-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Builds the single file of `family` from its manifest, plus `extra` tensors.
fn build(family: &str, out: &Path, extra: Vec<(&str, Tensor)>) -> PathBuf {
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            common::golden().join(format!("single_file/{family}.manifest.json")),
        )
        .unwrap(),
    )
    .unwrap();
    let folder = common::golden().join(doc["model"].as_str().unwrap());
    let mut files: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    let mut ckpt: HashMap<String, Tensor> = HashMap::new();
    for e in doc["entries"].as_array().unwrap() {
        let (ldm, op, file) = (
            e[0].as_str().unwrap(),
            e[1].as_str().unwrap(),
            e[2].as_str().unwrap(),
        );
        let src = files.entry(file.to_string()).or_insert_with(|| {
            candle_core::safetensors::load(folder.join(file), &Device::Cpu).unwrap()
        });
        let ts: Vec<Tensor> = e[3]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| src[n.as_str().unwrap()].clone())
            .collect();
        let t = match op {
            "copy" => ts[0].clone(),
            "cat" => Tensor::cat(&ts, 0).unwrap(),
            "t" => ts[0].t().unwrap().contiguous().unwrap(),
            "conv1x1" => {
                let (o, i) = ts[0].dims2().unwrap();
                ts[0].reshape((o, i, 1, 1)).unwrap()
            }
            other => panic!("unknown op {other}"),
        };
        assert!(ckpt.insert(ldm.to_string(), t).is_none(), "{ldm} twice");
    }
    for (k, v) in extra {
        ckpt.insert(k.to_string(), v);
    }
    let path = out.join(format!("{family}.safetensors"));
    candle_core::safetensors::save(&ckpt, &path).unwrap();
    path
}

fn folder_of(family: &str) -> ModelFolder {
    let sub = if family == "sd15" {
        "sd15/a/model"
    } else {
        "sdxl/a/model"
    };
    ModelFolder::local(&common::golden().join(sub)).unwrap()
}

fn generate(p: &Pipeline) -> (Tensor, Vec<u8>) {
    let req = Request {
        prompt: "a red vintage car, studio photo".into(),
        negative_prompt: "blurry".into(),
        size: tkg::settings::Size::new(64, 64),
        sampling: tkg::pipeline::Sampling::new(4, 7.5),
        seed: 42,
        init: InitNoise::Plain,
        micro: None,
        source: None,
        preview: false,
    };
    let g = p.generate(&req, &mut |_, _| {}).unwrap();
    (g.final_latents, g.rgb)
}

fn same(a: &Pipeline, b: &Pipeline) {
    let (la, ia) = generate(a);
    let (lb, ib) = generate(b);
    let d: f32 = (la - lb)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(d, 0.0, "final latents differ by {d}");
    assert_eq!(ia, ib, "images differ");
}

fn check(family: &str) {
    let dir = tmp(family);
    let cpu = &Device::Cpu;
    let junk = vec![
        ("model_ema.decay", Tensor::new(&[0.9999f32], cpu).unwrap()),
        (
            "alphas_cumprod",
            Tensor::ones(1000, DType::F32, cpu).unwrap(),
        ),
    ];
    let file = build(family, &dir, junk);
    let folder = folder_of(family);
    let from_folder = Pipeline::load(&folder, &common::cpu_f32()).unwrap();
    let source = ModelSource::File {
        path: &file,
        config: Some(&folder),
    };
    let from_file = Pipeline::load_with(source, &common::cpu_f32(), &Adapters::default()).unwrap();
    assert_eq!(from_file.family, from_folder.family);
    assert_eq!(
        from_file.unet_weights, file,
        "the model hash is the single file's"
    );
    same(&from_folder, &from_file);

    // --vae: the folder's VAE file, and the single file's VAE under a folder model.
    let vae_file = folder
        .root()
        .unwrap()
        .join("vae/diffusion_pytorch_model.safetensors");
    let with_vae = Pipeline::load_with(
        source,
        &common::cpu_f32(),
        &Adapters {
            vae: Some(VaeSource::File(vae_file)),
            ..Default::default()
        },
    )
    .unwrap();
    same(&from_folder, &with_vae);
    let folder_with_file_vae = Pipeline::load_with(
        ModelSource::Folder(&folder),
        &common::cpu_f32(),
        &Adapters {
            vae: Some(VaeSource::File(file.clone())),
            ..Default::default()
        },
    );
    // The whole checkpoint as --vae: only its first_stage_model.* is read.
    same(&from_folder, &folder_with_file_vae.unwrap());

    // Without a config folder, the built-in (full-size) architecture does not fit a tiny
    // file: a clear error, not a crash.
    let e = Pipeline::load_with(
        ModelSource::File {
            path: &file,
            config: None,
        },
        &common::cpu_f32(),
        &Adapters::default(),
    )
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("shape mismatch"), "{e:#}");

    // A tensor no network reads is an error.
    let odd = tmp(&format!("{family}-odd"));
    let odd_file = build(
        family,
        &odd,
        vec![(
            "model.diffusion_model.extra.weight",
            Tensor::ones(3, DType::F32, cpu).unwrap(),
        )],
    );
    let e = Pipeline::load_with(
        ModelSource::File {
            path: &odd_file,
            config: Some(&folder),
        },
        &common::cpu_f32(),
        &Adapters::default(),
    )
    .err()
    .unwrap();
    assert!(format!("{e:#}").contains("does not use"), "{e:#}");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&odd).unwrap();
}

#[test]
fn sd15_single_file_equals_its_folder() {
    check("sd15");
}

#[test]
fn sdxl_single_file_equals_its_folder() {
    check("sdxl");
}

#[test]
fn pickles_and_other_files_are_refused() {
    let dir = tmp("refuse");
    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let src = ModelSource::File {
        path: &ckpt,
        config: None,
    };
    let e = Pipeline::load_with(src, &common::cpu_f32(), &Adapters::default())
        .err()
        .unwrap();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("pickle") && msg.contains("safetensors"),
        "{msg}"
    );

    let lora = common::golden().join("lora/sd15_kohya.lora.safetensors");
    let src = ModelSource::File {
        path: &lora,
        config: None,
    };
    let e = Pipeline::load_with(src, &common::cpu_f32(), &Adapters::default())
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("--lora"), "{e:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}
