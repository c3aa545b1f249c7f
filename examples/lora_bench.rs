//! Loading and merging a LoRA into a full-size model: load time without and with it.
//!
//! ```sh
//! cargo run --release --example lora_bench -- [MODEL] [RANK] [REPEATS]
//! ```
//! MODEL is a built-in model (default `random-sd15`, the real SD1.5 architecture, materialised
//! on first use), RANK the LoRA rank (default 128). The LoRA is a kohya-format f16 file made
//! here for every transformer linear of the UNet (attention q/k/v/out, feed-forward,
//! proj_in/out) and every attention and MLP linear of the text encoder(s), as kohya's
//! default LoRA network targets them. Prints the best of REPEATS (default 3) loads each way.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::time::Instant;
use tkg::models::builtin;
use tkg::models::hub::ModelFolder;
use tkg::models::lora::LoraSpec;
use tkg::models::weights::WeightFile;
use tkg::pipeline::{Adapters, LoadOptions, ModelSource, Pipeline};

const UNET: &[&str] = &[
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
];
const TE: &[&str] = &[
    "q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().map(String::as_str).unwrap_or("random-sd15");
    let rank: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let repeats: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let dir = builtin::ensure(model)?;
    let folder = ModelFolder::local(&dir)?;

    // The LoRA file.
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut modules = 0;
    let comps: &[(&str, &str, &[&str])] = &[
        (
            "unet/diffusion_pytorch_model.safetensors",
            "lora_unet_",
            UNET,
        ),
        ("text_encoder/model.safetensors", "lora_te1_", TE),
        ("text_encoder_2/model.safetensors", "lora_te2_", TE),
    ];
    let sdxl = dir.join("text_encoder_2").is_dir();
    for (file, prefix, targets) in comps {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let prefix = if !sdxl && *prefix == "lora_te1_" {
            "lora_te_"
        } else {
            prefix
        };
        let wf = WeightFile::open(&path)?;
        for name in wf.names() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            if !targets.iter().any(|t| module.ends_with(&format!(".{t}"))) {
                continue;
            }
            let shape = wf.shape(&name).unwrap().to_vec();
            let (out, inp) = (shape[0], shape[1..].iter().product::<usize>());
            let mut module = module.to_string();
            if prefix != "lora_unet_" && !module.starts_with("text_model.") {
                module = format!("text_model.{module}");
            }
            if sdxl && prefix == "lora_unet_" {
                let cfg: tkg::models::config::UNetConfig =
                    tkg::models::config::read_json(&dir.join("unet/config.json"))?;
                module = tkg::models::single_file::unet_to_ldm(&module, &cfg).unwrap();
            }
            let key = format!("{prefix}{}", module.replace('.', "_"));
            let dev = &Device::Cpu;
            let down = (Tensor::randn(0f32, 1.0, (rank, inp), dev)? / (inp as f64).sqrt())?;
            let up = Tensor::randn(0f32, 0.01, (out, rank), dev)?;
            tensors.insert(
                format!("{key}.lora_down.weight"),
                down.to_dtype(DType::F16)?,
            );
            tensors.insert(format!("{key}.lora_up.weight"), up.to_dtype(DType::F16)?);
            tensors.insert(format!("{key}.alpha"), Tensor::new(rank as f32 / 2.0, dev)?);
            modules += 1;
        }
    }
    let lora_path =
        std::env::temp_dir().join(format!("tkg-lora-bench-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&tensors, &lora_path)?;
    let size_mb = std::fs::metadata(&lora_path)?.len() as f64 / 1e6;
    drop(tensors);
    println!("{model}: rank-{rank} LoRA, {modules} modules, {size_mb:.0} MB (f16)");

    let opts = LoadOptions::cpu_f32();
    let adapters = Adapters {
        loras: vec![LoraSpec {
            path: lora_path.clone(),
            weight: 1.0,
            name: "bench".into(),
        }],
        ..Default::default()
    };
    let mut best_base = f64::MAX;
    let mut best_lora = f64::MAX;
    let mut best_merge = f64::MAX;
    for i in 0..repeats {
        let t = Instant::now();
        let p = Pipeline::load(&folder, &opts)?;
        let base = t.elapsed().as_secs_f64();
        drop(p);
        let t = Instant::now();
        let p = Pipeline::load_with(ModelSource::Folder(&folder), &opts, &adapters)?;
        let with = t.elapsed().as_secs_f64();
        let applied: usize = p.lora_reports[0].applied.values().sum();
        anyhow::ensure!(applied == modules, "applied {applied} of {modules} modules");
        let merge = p.lora_reports[0].merge_time.as_secs_f64();
        drop(p);
        println!(
            "run {}: load {base:.2} s; load + LoRA {with:.2} s, of which reading the LoRA and merging {merge:.2} s",
            i + 1,
        );
        best_base = best_base.min(base);
        best_lora = best_lora.min(with);
        best_merge = best_merge.min(merge);
    }
    println!("best: load {best_base:.2} s, load + LoRA {best_lora:.2} s, merge {best_merge:.2} s");
    std::fs::remove_file(&lora_path)?;
    Ok(())
}
