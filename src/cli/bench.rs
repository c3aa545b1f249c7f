//! `tkg bench`: time each stage of one generation (load, text, UNet step, VAE decode) and the
//! peak memory, as a table and optionally JSON.

use super::Ui;
use super::args::DTypeArg;
use super::stdio::outln;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use tkg::bench::{self, BenchSettings};
use tkg::pipeline::{VaeTiling, WeightStorage};
use tkg::run::{RunConfig, device, model};
use tkg::settings::{ModelChoice, Settings, SettingsPatch};

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
    /// Compute type (default: f32 on CPU, f16 on a GPU). bf16 on the CPU keeps f32 tensors
    /// and rounds the inputs of the UNet's and VAE's matrix products to bf16 (AVX-512 BF16
    /// CPUs only: Zen 4, Sapphire Rapids and newer).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// How weights are kept with f32 compute: auto, stored, f32, f16 or bf16 (as for
    /// generate).
    #[arg(long, value_name = "DTYPE", default_value = "auto", value_parser = WeightStorage::parse)]
    pub weights_dtype: WeightStorage,
    /// VAE tiling: auto (images of at least 1024x1024 larger than one tile), on or off.
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = VaeTiling::parse)]
    pub vae_tiling: VaeTiling,
    /// Image width in pixels.
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Image height in pixels.
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Denoising steps (each one UNet call on a batch of 2); the median step is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[command(flatten)]
    pub sampler: super::args::SamplerArgs,
    /// Classifier-free guidance (1 or less: one UNet pass a step, as Turbo models run).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// CPU threads for candle and tkg's kernels (default: candle's choice, the physical cores
    /// or RAYON_NUM_THREADS).
    #[arg(long)]
    pub threads: Option<usize>,
    /// VAE decodes of the same latents: the first pays the one-time costs (packing the
    /// weights with --dtype bf16); the table then also gives the median of the others.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vae_calls: usize,
    /// The prompt (its content does not change the cost).
    #[arg(long, default_value = "a red apple on a table")]
    pub prompt: String,
    /// Also write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &BenchArgs, ui: Ui) -> Result<()> {
    if let Some(path) = &args.json {
        // Before the run, so that a taken name does not cost a long benchmark.
        tkg::output::check_targets(std::slice::from_ref(path), args.overwrite)?;
    }
    let (device, warning) = device::pick(&args.device)?;
    if let Some(w) = warning {
        ui.warn(w);
    }
    let dtype = args
        .dtype
        .map(DTypeArg::dtype)
        .unwrap_or_else(|| device::default_dtype(&device));
    let choice = match &args.model_dir {
        Some(d) => ModelChoice::Dir(d.clone()),
        None => ModelChoice::Named(args.model.clone()),
    };
    let settings = SettingsPatch {
        model: Some(choice),
        ..SettingsPatch::default()
    }
    .apply(&Settings::default());
    let cfg = RunConfig {
        registry_file: super::args::registry_file(args.models_file.as_deref()),
        download_progress: !ui.quiet,
        download_notices: Some(ui.download_notices()),
        memory_available: tkg::run::device::free_host_memory(),
        ..RunConfig::default()
    };
    let model = model::resolve(&settings, &cfg, &|m| ui.info(m))?;
    let settings = BenchSettings {
        width: args.width,
        height: args.height,
        steps: args.steps,
        sampler: args.sampler.settings(),
        guidance: args.guidance,
        dtype,
        weights: args.weights_dtype,
        vae_tiling: args.vae_tiling,
        device,
        prompt: args.prompt.clone(),
        negative_prompt: String::new(),
        seed: 0,
        vae_calls: args.vae_calls,
    };
    let report = bench::run(&model.name, &model.folder, &settings, &mut |s| ui.detail(s))?;
    outln!("{}", report.table().trim_end());
    let prof = tkg::kernels::profile::take();
    if !prof.is_empty() {
        outln!("kernel time (TKG_PROFILE=1), whole run:");
        for (name, d, n) in prof {
            outln!("  {:>8.3} s {n:>6}x  {name}", d.as_secs_f64());
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)? + "\n";
        tkg::output::write_atomic(path, args.overwrite, |w| Ok(w.write_all(text.as_bytes())?))?;
    }
    Ok(())
}
