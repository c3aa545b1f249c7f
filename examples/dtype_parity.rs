//! How far f16 / bf16 on the CPU land from diffusers' f32 result, on the tiny SD1.5 golden
//! models (tests/golden/sd15/{a,b}): final-latent relative L2 and 8-bit image max difference,
//! and the time of the whole 50-step loop.
//!
//!   cargo run --release --example dtype_parity

#[path = "../tests/it/common/mod.rs"]
mod common;

use candle_core::{DType, Device};
use std::path::PathBuf;
use std::time::Instant;
use tkg::models::hub::ModelFolder;
use tkg::pipeline::{LoadOptions, Pipeline};

fn main() -> anyhow::Result<()> {
    for variant in ["a", "b"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/sd15")
            .join(variant);
        let t = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu)?;
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json"))?)?;
        let steps = json["steps"].as_u64().unwrap_or(50) as usize;
        let guidance = json["guidance"].as_f64().unwrap_or(7.5);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let folder = ModelFolder::local(&dir.join("model"))?;
            let opts = LoadOptions {
                dtype,
                ..LoadOptions::cpu_f32()
            };
            let result = (|| -> anyhow::Result<(f32, i32, f64)> {
                let pipe = Pipeline::load(&folder, &opts)?;
                let prompt = json["prompt"].as_str().unwrap_or("");
                let negative = json["negative_prompt"].as_str().unwrap_or("");
                let cond = pipe.encode_prompt(prompt, negative, true)?;
                let start = Instant::now();
                let fin = pipe.denoise_ddim(&t["init"], &cond, steps, guidance)?;
                let secs = start.elapsed().as_secs_f64();
                let rgb = pipe.decode(&fin)?;
                let want = t["image"].flatten_all()?.to_vec1::<u8>()?;
                let worst = rgb
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| (a as i32 - b as i32).abs())
                    .max()
                    .unwrap_or(0);
                Ok((common::rel_l2(&fin, &t["final"]), worst, secs))
            })();
            match result {
                Ok((err, worst, secs)) => println!(
                    "sd15/{variant} {dtype:?}: final rel L2 {err:.2e}, image max diff {worst}, loop {secs:.2} s"
                ),
                Err(e) => println!("sd15/{variant} {dtype:?}: fails: {e:#}"),
            }
        }
    }
    Ok(())
}
