//! The flags `generate`, `batch`, `key` and `bench` share, and their one conversion into
//! the library's settings: per-image flags become a [`SettingsPatch`], run-wide ones a
//! [`RunConfig`].

use super::Ui;
use anyhow::{Result, bail};
use candle_core::DType;
use clap::{Args, ValueEnum};
use std::path::PathBuf;
use tkg::color::KeyColor;
use tkg::key::{self, KeyOptions, KeyOutputFlags};
use tkg::models::registry::SegmenterSource;
use tkg::models::registry::UserFile;
use tkg::pipeline::{VaeTiling, WeightStorage};
use tkg::rng::RngKind;
use tkg::run::{KeySettings, RunConfig, Shard};
use tkg::sampling::{SamplerKind, SamplerSettings, Schedule, Spacing};
use tkg::segment::SharedSegmenter;
use tkg::settings::{
    ColorChoice, Keep, Method, ModelChoice, Offset, Settings, SettingsPatch, Size,
    default_auto_colors, parse_center, parse_colors,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// Model selection shared by commands that load a model.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A model from the registry (`tkg models list`): sd15, tiny-sd15, random-sd15, ...
    #[arg(long, default_value = "sd15", conflicts_with = "model_dir")]
    pub model: String,
    /// A diffusers-layout folder (as written by save_pretrained).
    #[arg(long, value_name = "DIR")]
    pub model_dir: Option<PathBuf>,
    /// An extra models.toml merged over the built-in registry.
    #[arg(long, value_name = "FILE")]
    pub models_file: Option<PathBuf>,
    /// Where to run: auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Compute type (default: f32 on CPU, f16 on a GPU). bf16 on the CPU keeps f32 tensors
    /// and rounds the inputs of the UNet's and VAE's matrix products to bf16 (AVX-512 BF16
    /// CPUs only: Zen 4, Sapphire Rapids and newer).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
    /// How weights are kept with f32 compute: stored (weights the files store in 16 bits stay
    /// 16-bit, widened per layer: half their memory, the same image, a little slower), f32, f16
    /// or bf16 (rounded); auto is stored for models above 4 GiB of files (SDXL), else f32.
    #[arg(long, value_name = "DTYPE", default_value = "auto", value_parser = WeightStorage::parse)]
    pub weights_dtype: WeightStorage,
    /// Decode (and encode init images) in overlapping tiles, as diffusers' enable_tiling():
    /// auto (only images of at least 1024x1024 larger than one VAE tile), on or off.
    #[arg(long, value_name = "WHEN", default_value = "auto", value_parser = VaeTiling::parse)]
    pub vae_tiling: VaeTiling,
}

/// Per-image settings and run options shared by `tkg generate` and `tkg batch` (where a
/// job line overrides the per-image ones).
#[derive(Debug, Args)]
pub struct JobOptions {
    /// What to avoid (the unconditional side of classifier-free guidance).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// The background key colour: a name or #RRGGBB, or auto: preview each of --colors for
    /// a few steps and keep the one whose preview keys best (a heuristic; docs/keying.md).
    #[arg(long, default_value = "green", value_parser = ColorChoice::parse)]
    pub color: ColorChoice,
    /// The candidates of --color auto, comma-separated [default: green,blue,magenta].
    #[arg(long, value_name = "COLOR,COLOR", value_parser = parse_color_list)]
    pub colors: Option<ColorList>,
    /// Try N seeds per image (seed, seed+1, ...; with --num-images M, seed, seed+M, ...) and
    /// keep the one whose key scores best (keyability, 0-100).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub best_of: usize,
    /// What to write of the tries: best (the image only) or all (also X.tryN.png for each,
    /// with its keyed outputs).
    #[arg(long, default_value = "best", value_parser = Keep::parse)]
    pub keep: Keep,
    /// Retry with the next seeds (up to --retries more) while the keyability score is
    /// below this (0-100); the best try is kept either way.
    #[arg(long, value_name = "SCORE", allow_hyphen_values = true)]
    pub min_keyability: Option<f64>,
    /// How many more seeds --min-keyability may try.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub retries: usize,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub extra: ExtraModelArgs,
    /// Denoising steps [default: the model's, else 50].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; 1 or less turns guidance off (one UNet pass a step)
    /// [default: the model's, else 7.5].
    #[arg(long)]
    pub guidance: Option<f64>,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Random seed of the first image; the next images use seed+1, seed+2, ...
    /// [default: random for `generate`, 0 for `batch`; a batch job without a seed gets
    /// SEED + its image index]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Initial-noise generator: torch-cpu (torch.randn with a CPU generator, as diffusers
    /// recommends; bit-exact) or torch-cuda (torch's CUDA Philox, A1111's "GPU" seed).
    #[arg(long, default_value = "torch-cpu", value_parser = RngKind::parse)]
    pub rng: RngKind,
    /// Image width in pixels (default: the model's).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's).
    #[arg(long)]
    pub height: Option<usize>,
    /// How to get a flat background: tkg (TKG-DM's shifted noise), prompt (plain noise and
    /// " isolated on a solid <colour> background" added to the prompt) or plain.
    #[arg(long, default_value = "tkg", value_parser = Method::parse)]
    pub method: Method,
    /// TKG-DM target shift of the positive fraction (default: 0.07 SD1.5, 0.11 SDXL).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Gaussian mask sigma (subject size) in the [-1, 1] frame.
    #[arg(long, default_value_t = 0.5)]
    pub mask_sigma: f64,
    /// Subject centre X,Y in [-1, 1]; repeat for several subjects.
    #[arg(long, value_name = "X,Y", value_parser = parse_center, allow_hyphen_values = true)]
    pub subject_center: Vec<(f64, f64)>,
    /// A1111 "clip skip": use the text encoder's n-th hidden state from the end.
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// The image file, or a template: fields {index}, {seed}, {slug}, {color}, {model},
    /// {date}, {image}, {line}; numbers take a width, e.g. {index:05}. The matte and cut-out
    /// go next to it (X.matte.png, X.cutout.png). [default: tkg-{seed}.png for generate,
    /// tkg-{index:05}-{seed}.png for batch]
    #[arg(long, short)]
    pub out: Option<String>,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
    /// Also write the noise, TKG init and final latents (f32 safetensors); a template like
    /// --out.
    #[arg(long, value_name = "FILE.safetensors")]
    pub save_latents: Option<String>,
    /// SDXL: the size the model is told the source image had, WIDTHxHEIGHT (default: the size).
    #[arg(long, value_name = "WxH", value_parser = Size::parse)]
    pub original_size: Option<Size>,
    /// SDXL: the crop offset the model is told about, TOP,LEFT (default 0,0).
    #[arg(long, value_name = "TOP,LEFT", value_parser = Offset::parse)]
    pub crop_top_left: Option<Offset>,
    /// SDXL: the target size the model is told about, WIDTHxHEIGHT (default: the size).
    #[arg(long, value_name = "WxH", value_parser = Size::parse)]
    pub target_size: Option<Size>,
    /// SDXL refiner: the aesthetic score the prompt is conditioned on, 0 to 10 [default: 6].
    #[arg(long, value_name = "SCORE")]
    pub aesthetic_score: Option<f64>,
    /// SDXL refiner: the aesthetic score of the negative prompt, 0 to 10 [default: 2.5].
    #[arg(long, value_name = "SCORE")]
    pub negative_aesthetic_score: Option<f64>,
    /// img2img: start from this photo (JPEG, PNG or WebP) instead of noise; resized to
    /// --width x --height (default: its own size, rounded down to a multiple of 8).
    #[arg(long, value_name = "IMAGE")]
    pub init_image: Option<PathBuf>,
    /// img2img: the fraction of the steps that runs, in (0, 1]; lower keeps more of the
    /// photo [default: diffusers': SD 0.8, or 1 with --mask; SDXL 0.3, or 0.9999 with --mask].
    #[arg(long)]
    pub strength: Option<f64>,
    /// Inpainting: repaint where this mask is white (any size; resized to the image).
    #[arg(long, value_name = "MASK")]
    pub mask: Option<PathBuf>,
    /// Skip keying: write only the image.
    #[arg(long)]
    pub no_key: bool,
    #[command(flatten)]
    pub key: KeyFlags,
    #[command(flatten)]
    pub run: RunOptions,
}

/// The sampler flags of `generate`, `batch` and `bench`.
#[derive(Debug, Clone, Args)]
pub struct SamplerArgs {
    /// ddim, euler, euler-a, heun, dpm++2m, dpm++2m-sde, unipc or lcm (the diffusers
    /// schedulers of those names) [default: the model's, else ddim].
    #[arg(long, value_parser = SamplerKind::parse)]
    pub sampler: Option<SamplerKind>,
    /// How the noise levels are spaced: default (the sampler's own), karras or exponential.
    #[arg(long, value_parser = Schedule::parse)]
    pub schedule: Option<Schedule>,
    /// DDIM's eta: 0 is deterministic, 1 adds DDPM's full noise each step.
    #[arg(long)]
    pub eta: Option<f64>,
    /// Where the steps sit among the training timesteps: leading, trailing or linspace
    /// [default: the model's, else its scheduler config's].
    #[arg(long, value_parser = Spacing::parse)]
    pub timestep_spacing: Option<Spacing>,
}

impl SamplerArgs {
    /// The flags alone, over tkg's defaults (for `tkg bench`, which has no model defaults).
    pub fn settings(&self) -> SamplerSettings {
        SamplerSettings {
            kind: self.sampler.unwrap_or_default(),
            schedule: self.schedule.unwrap_or_default(),
            eta: self.eta.unwrap_or(0.0),
            spacing: self.timestep_spacing,
        }
    }
}

/// How a run of several images goes.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Batch, resume and shards")]
pub struct RunOptions {
    /// Images per job: seeds SEED, SEED+1, ... (as A1111's batch count).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub num_images: u64,
    /// Images denoised together: one UNet call per step on a GPU, side by side on the CPU's
    /// cores. Gives the same pixels as 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub batch_size: u64,
    /// Skip images whose files all exist (a rerun does only the remaining work).
    #[arg(long, conflicts_with = "overwrite")]
    pub skip_existing: bool,
    /// Do image i only when i mod N == I: "I/N", or "auto" (Slurm array or Kubernetes
    /// Indexed Job from the environment).
    #[arg(long, value_name = "I/N|auto")]
    pub shard: Option<String>,
    /// The shard count for --shard auto: a Kubernetes Indexed Job's completions (a Slurm
    /// array gives its own; this may only repeat it).
    #[arg(long, value_name = "N")]
    pub shard_count: Option<usize>,
    /// Append one JSON line per finished image (paths, seed, settings, timings, keying).
    #[arg(long, value_name = "FILE.jsonl")]
    pub manifest: Option<PathBuf>,
    /// Progress on stderr: auto (a bar on a terminal, else plain lines), bar, plain, json
    /// (NDJSON events) or none.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Check everything (job lines, templates, paths, models) and print the plan; generate
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Where progress goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    Auto,
    Bar,
    Plain,
    Json,
    None,
}

/// LoRAs, single-file checkpoints and another VAE.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "LoRA, single-file checkpoints, VAE")]
pub struct ExtraModelArgs {
    /// A single-file checkpoint (A1111 / ComfyUI / civitai .safetensors), SD1.x or SDXL,
    /// instead of --model / --model-dir.
    #[arg(long, value_name = "FILE.safetensors", conflicts_with_all = ["model", "model_dir"])]
    pub model_file: Option<PathBuf>,
    /// Another VAE: a diffusers folder (or a VAE-only folder) or one .safetensors file.
    #[arg(long, value_name = "DIR|FILE")]
    pub vae: Option<PathBuf>,
    /// A LoRA to merge (kohya, diffusers/PEFT); WEIGHT defaults to 1. Repeat for several.
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    pub lora: Vec<String>,
    /// Where `<lora:NAME:WEIGHT>` tags in the prompt find NAME.safetensors.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Fail when a LoRA tensor matches no weight of the model (else it is reported).
    #[arg(long)]
    pub lora_strict: bool,
}

/// Keyer flags shared by `tkg key`, `tkg generate` and `tkg batch`.
#[derive(Debug, Clone, Args)]
pub struct KeyFlags {
    /// Clip black (0..1): raw alpha at or below this becomes fully transparent [default: from
    /// the measured noise, about 0.02-0.08].
    #[arg(long, value_name = "A", value_parser = unit_interval)]
    pub clip_black: Option<f32>,
    /// Clip white (0..1): raw alpha at or above this becomes fully opaque [default: from the
    /// measured noise, about 0.82-0.9].
    #[arg(long, value_name = "A", value_parser = unit_interval)]
    pub clip_white: Option<f32>,
    /// Spill suppression strength, 0 (off) to 1 (full).
    #[arg(long, value_name = "S", default_value_t = 1.0, value_parser = unit_interval)]
    pub despill: f32,
    /// Key against exactly this screen colour (#RRGGBB) instead of estimating it from the
    /// image border.
    #[arg(long, value_name = "COLOR", value_parser = KeyColor::parse)]
    pub screen: Option<KeyColor>,
    /// Key against one flat screen colour instead of a fitted clean plate.
    #[arg(long)]
    pub flat_screen: bool,
    /// Keep islands and pinholes (no connected-component clean-up).
    #[arg(long)]
    pub no_cleanup: bool,
    /// Light edge-aware (guided filter) refinement of the matte's soft edges.
    #[arg(long)]
    pub refine: bool,
    /// Bit depth of X.matte.png: 8 or 16.
    #[arg(long, value_name = "BITS", default_value_t = 8, value_parser = matte_depth)]
    pub matte_depth: u8,
    /// Also write X.premultiplied.png (premultiplied RGBA).
    #[arg(long)]
    pub premultiplied: bool,
    /// Also write the clean plate the matte was pulled against, X.plate.png.
    #[arg(long)]
    pub clean_plate: bool,
    /// Also write X.composite.png: the cut-out over this image, resized to cover.
    #[arg(long, value_name = "BG.png")]
    pub composite: Option<PathBuf>,
    /// Help the keyer with a segmenter's subject mask, so parts of the subject in the key
    /// colour stay: u2netp (the default), u2net, silueta (rembg's files, found in
    /// $U2NET_HOME, then ~/.u2net), tiny-u2net (built in, random weights), a
    /// [segmenters.NAME] entry of models.toml, or an .onnx path.
    #[arg(long, value_name = "MODEL", num_args = 0..=1, default_missing_value = "u2netp")]
    pub segment: Option<String>,
    /// The segmentation model file for --segment (rembg's ONNX layout); implies --segment.
    #[arg(long, value_name = "FILE.onnx")]
    pub segment_model: Option<PathBuf>,
}

fn unit_interval(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

fn matte_depth(s: &str) -> Result<u8, String> {
    match s.trim() {
        "8" => Ok(8),
        "16" => Ok(16),
        _ => Err(format!("matte depth must be 8 or 16, not '{s}'")),
    }
}

impl KeyFlags {
    /// Keyer options and output switches for a requested key colour. Fails (before any
    /// expensive work) on inconsistent thresholds or an unreadable composite background.
    pub fn to_options(&self, requested: KeyColor) -> Result<(KeyOptions, KeyOutputFlags)> {
        if let (Some(lo), Some(hi)) = (self.clip_black, self.clip_white)
            && hi <= lo
        {
            bail!("--clip-white ({hi}) must be greater than --clip-black ({lo})");
        }
        let mut opts = KeyOptions::new(requested);
        opts.screen = self.screen.as_ref().map(|c| c.rgb);
        opts.fit_plate = !self.flat_screen;
        opts.clip_black = self.clip_black;
        opts.clip_white = self.clip_white;
        opts.despill = self.despill;
        opts.cleanup = !self.no_cleanup;
        opts.refine = self.refine;
        let flags = KeyOutputFlags {
            matte16: self.matte_depth == 16,
            premultiplied: self.premultiplied,
            clean_plate: self.clean_plate,
            composite: self.composite.clone(),
        };
        key::check_output_flags(&flags)?;
        Ok((opts, flags))
    }

    /// The segmenter --segment / --segment-model name, loaded on the CPU (none without them).
    pub fn segmenter(&self) -> Result<Option<SharedSegmenter>> {
        let name = match (&self.segment_model, &self.segment) {
            (Some(file), None) => file.display().to_string(),
            (Some(_), Some(_)) => bail!("--segment-model names the model; drop --segment"),
            (None, Some(name)) => name.clone(),
            (None, None) => return Ok(None),
        };
        load_segmenter(&name).map(Some)
    }
}

/// Loads segmentation model `name` on the CPU: a `[segmenters.NAME]` entry of the user's
/// models.toml, else what [`SharedSegmenter::load`] finds in rembg's folders.
pub fn load_segmenter(name: &str) -> Result<SharedSegmenter> {
    let name = segmenter_name(name)?;
    SharedSegmenter::load(&name, &rembg_dirs(), &candle_core::Device::Cpu)
}

/// Where rembg keeps its models, from this process's environment.
pub fn rembg_dirs() -> Vec<PathBuf> {
    tkg::segment::rembg_dirs(&|k| std::env::var(k).ok())
}

/// What a segmentation model name stands for: its `[segmenters.NAME]` entry's file (or
/// folder), else the name itself.
pub fn segmenter_name(name: &str) -> Result<String> {
    let registry = tkg::models::registry::Registry::load(registry_file(None).as_ref())?;
    Ok(match registry.segmenter(name) {
        Some(entry) => match &entry.source {
            SegmenterSource::File(f) => f.display().to_string(),
            SegmenterSource::Hub { repo, revision } => {
                tkg::segment::sam::hub_folder(repo, revision)?
                    .display()
                    .to_string()
            }
        },
        None => name.to_string(),
    })
}

/// The user's models.toml: the flag, else where the environment says.
pub fn registry_file(explicit: Option<&std::path::Path>) -> Option<UserFile> {
    tkg::models::registry::default_user_file(explicit, &|k| std::env::var(k).ok())
}

/// `--colors`' list (one clap value, not one per colour).
#[derive(Debug, Clone)]
pub struct ColorList(pub Vec<KeyColor>);

fn parse_color_list(s: &str) -> Result<ColorList, String> {
    parse_colors(s).map(ColorList)
}

impl ModelArgs {
    /// The model these flags name.
    pub fn choice(&self) -> ModelChoice {
        match &self.model_dir {
            Some(d) => ModelChoice::Dir(d.clone()),
            None => ModelChoice::Named(self.model.clone()),
        }
    }
}

impl JobOptions {
    /// The per-image flags. Clap gives each its default, so every one is set; the seed is
    /// each command's own (a batch's `--seed` seeds the jobs that have none).
    pub fn patch(&self) -> SettingsPatch {
        SettingsPatch {
            model: Some(self.model.choice()),
            lora: None,
            prompt: None,
            negative_prompt: Some(self.negative_prompt.clone()),
            color: match &self.color {
                ColorChoice::Fixed(c) => Some(c.clone()),
                ColorChoice::Auto => None,
            },
            auto_colors: Some(self.auto_colors()),
            best_of: Some(self.best_of),
            keep: Some(self.keep),
            min_keyability: self.min_keyability,
            retries: Some(self.retries),
            seed: None,
            num_images: Some(self.run.num_images as usize),
            steps: self.steps,
            guidance: self.guidance,
            sampler: self.sampler.sampler,
            schedule: self.sampler.schedule,
            eta: self.sampler.eta,
            spacing: self.sampler.timestep_spacing,
            width: self.width,
            height: self.height,
            method: Some(self.method),
            shift: self.shift,
            mask_sigma: Some(self.mask_sigma),
            subject_center: Some(self.subject_center.clone()),
            clip_skip: self.clip_skip,
            rng: Some(self.rng),
            original_size: self.original_size,
            crop_top_left: self.crop_top_left,
            target_size: self.target_size,
            aesthetic_score: self.aesthetic_score,
            negative_aesthetic_score: self.negative_aesthetic_score,
            out: self.out.clone(),
            save_latents: self.save_latents.clone(),
            init_image: self.init_image.clone(),
            strength: self.strength,
            mask: self.mask.clone(),
        }
    }

    /// The candidates of --color auto (none for a fixed colour).
    fn auto_colors(&self) -> Vec<KeyColor> {
        match &self.color {
            ColorChoice::Fixed(_) => Vec::new(),
            ColorChoice::Auto => self
                .colors
                .clone()
                .map_or_else(default_auto_colors, |c| c.0),
        }
    }

    /// The command line's settings over the defaults, writing `default_out` unless --out.
    pub fn base_settings(&self, prompt: &str, default_out: &str) -> Settings {
        let base = Settings {
            prompt: prompt.to_string(),
            out: default_out.to_string(),
            ..Settings::default()
        };
        self.patch().apply(&base)
    }

    /// The run-wide flags. Checks the keyer flags (and reads the composite background's
    /// size) before any work.
    pub fn run_config(&self, create_dirs: bool, ui: Ui) -> Result<RunConfig> {
        let run = &self.run;
        if self.colors.is_some() && self.color != ColorChoice::Auto {
            bail!("--colors names the candidates of --color auto; give --color auto");
        }
        let shard = match run.shard.as_deref() {
            None => Shard::ALL,
            Some("auto") => Shard::auto(&|k| std::env::var(k).ok(), run.shard_count)?,
            Some(s) => {
                if run.shard_count.is_some() {
                    bail!("--shard-count goes with --shard auto");
                }
                Shard::parse(s)?
            }
        };
        let key = if self.no_key {
            None
        } else {
            // Each image keys in its own colour; this one is the default's.
            let colour = match &self.color {
                ColorChoice::Fixed(c) => c.clone(),
                ColorChoice::Auto => self.auto_colors()[0].clone(),
            };
            let (options, outputs) = self.key.to_options(colour)?;
            Some(KeySettings {
                options,
                outputs,
                segment: self.key.segmenter()?,
            })
        };
        Ok(RunConfig {
            device: self.model.device.clone(),
            dtype: self.model.dtype.map(DTypeArg::dtype),
            weights: self.model.weights_dtype,
            vae_tiling: self.model.vae_tiling,
            registry_file: registry_file(self.model.models_file.as_deref()),
            model_file: self.extra.model_file.clone(),
            vae: self.extra.vae.clone(),
            loras: self.extra.lora.clone(),
            lora_dir: self.extra.lora_dir.clone(),
            lora_strict: self.extra.lora_strict,
            key,
            overwrite: self.overwrite,
            skip_existing: run.skip_existing,
            shard,
            batch_size: run.batch_size as usize,
            create_dirs,
            manifest: run.manifest.clone(),
            download_progress: !ui.quiet,
            download_notices: Some(ui.download_notices()),
            memory_available: tkg::run::device::free_host_memory(),
            // For measurements: one UNet call for a whole CPU batch (not bit-identical).
            fuse_cpu_batch: std::env::var_os("TKG_FUSED_CPU_BATCH").is_some_and(|v| v == "1"),
        })
    }
}
