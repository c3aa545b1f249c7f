//! How far f16 / bf16 on the CPU land from diffusers' f32 result, on the tiny SD1.5 golden
//! models (tests/golden/sd15/{a,b}): final-latent relative L2 and 8-bit image max difference,
//! and the time of the whole 50-step loop.
//!
//!   cargo run --release --example dtype_parity
//!   cargo run --release --example dtype_parity -- DIR SIZE STEPS
//!
//! With a diffusers folder (e.g. random-sd15 materialised by `tkg models materialize`), it
//! compares that model's bf16 run with its own f32 run instead (f16, 5-10x slower than f32
//! on the CPU, is left to the golden models): SIZE x SIZE, STEPS DDIM
//! steps, the same seeded start.

#[path = "../tests/it/common/mod.rs"]
mod common;

use candle_core::{DType, Device};
use std::path::PathBuf;
use std::time::Instant;
use tkg::models::hub::ModelFolder;
use tkg::pipeline::{LoadOptions, Pipeline};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [dir, size, steps] = &args[..] {
        return against_f32(&PathBuf::from(dir), size.parse()?, steps.parse()?);
    }
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
                let worst = common::max_u8_diff(&rgb, &want);
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

/// The model in `dir` with bf16 products against its own f32 run.
fn against_f32(dir: &std::path::Path, size: usize, steps: usize) -> anyhow::Result<()> {
    let folder = ModelFolder::local(dir)?;
    let noise = tkg::rng::torch_cpu_randn(7, 4 * (size / 8) * (size / 8));
    let init = candle_core::Tensor::from_vec(noise, (1, 4, size / 8, size / 8), &Device::Cpu)?;
    let run = |dtype| -> anyhow::Result<(candle_core::Tensor, Vec<u8>, f64)> {
        let opts = LoadOptions {
            dtype,
            ..LoadOptions::cpu_f32()
        };
        let pipe = Pipeline::load(&folder, &opts)?;
        let cond = pipe.encode_prompt("a red apple on a table", "", true)?;
        let start = Instant::now();
        let fin = pipe.denoise_ddim(&init, &cond, steps, 7.5)?;
        let secs = start.elapsed().as_secs_f64();
        let rgb = pipe.decode(&fin)?;
        Ok((fin, rgb, secs))
    };
    let (want, want_rgb, secs) = run(DType::F32)?;
    println!(
        "{} {size}x{size} {steps} steps: f32 loop {secs:.2} s",
        dir.display()
    );
    match run(DType::BF16) {
        Ok((fin, rgb, secs)) => {
            let worst = common::max_u8_diff(&rgb, &want_rgb);
            let mean = rgb
                .iter()
                .zip(&want_rgb)
                .map(|(&a, &b)| (a as f64 - b as f64).abs())
                .sum::<f64>()
                / rgb.len() as f64;
            println!(
                "  BF16: final rel L2 {:.2e} against f32, image max diff {worst}, mean {mean:.3}, loop {secs:.2} s",
                common::rel_l2(&fin, &want)
            );
        }
        Err(e) => println!("  BF16: fails: {e:#}"),
    }
    Ok(())
}
