//! `tkg bench`: time each stage of one generation (load, text, UNet step, VAE decode) and the
//! peak memory, as a table and optionally JSON.

use super::Ui;
use super::generate::{DTypeArg, ModelArgs, pick_device, pick_dtype, resolve_model};
use crate::bench::{self, BenchSettings};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A model from the registry; the built-in random-weight SD1.5 by default (no download).
    #[arg(long, default_value = "random-sd15", conflicts_with = "model_dir")]
    pub model: String,
    /// A diffusers-layout folder instead of a registry model.
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<PathBuf>,
    /// An extra models.toml merged over the built-in registry.
    #[arg(long, value_name = "FILE")]
    pub models_file: Option<PathBuf>,
    /// Where to run: cpu, auto, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights and activations type (default: f32 on CPU, f16 on a GPU).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// Image width in pixels.
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Denoising steps (each one UNet call on a batch of 2); the median step is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// CPU threads for candle and tkg's kernels (default: candle's choice, the physical cores
    /// or RAYON_NUM_THREADS).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The prompt (its content does not change the cost).
    #[arg(long, default_value = "a red apple on a table")]
    pub prompt: String,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

pub fn run(args: &BenchArgs, ui: Ui) -> Result<()> {
    // Before anything touches candle: its thread pools are sized once.
    let model_args = ModelArgs {
        model: args.model.clone(),
        model_dir: args.model_dir.clone(),
        models_file: args.models_file.clone(),
        device: args.device.clone(),
        dtype: args.dtype,
    };
    let device = pick_device(&args.device, ui)?;
    let dtype = pick_dtype(args.dtype, &device);
    let model = resolve_model(&model_args, ui)?;
    let settings = BenchSettings {
        width: args.width,
        height: args.height,
        steps: args.steps,
        dtype,
        device,
        prompt: args.prompt.clone(),
        negative_prompt: String::new(),
        seed: 0,
    };
    let report = bench::run(&model.name, &model.folder, &settings, &mut |s| ui.detail(s))?;
    print!("{}", report.table());
    let prof = crate::kernels::profile::take();
    if !prof.is_empty() {
        println!("kernel time (TKG_PROFILE=1), whole run:");
        for (name, d, n) in prof {
            println!("  {:>8.3} s {n:>6}x  {name}", d.as_secs_f64());
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
