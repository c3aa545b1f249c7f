//! `tkg generate`: one image on a flat key colour, plus its matte and cut-out.

use super::Ui;
use super::key::KeyFlags;
use crate::color::KeyColor;
use crate::models::builtin;
use crate::models::hub::{self, ModelFolder};
use crate::models::registry::{Family, Registry, Source};
use crate::output;
use crate::rng::RngKind;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};

pub use crate::jobs::Method;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    fn dtype(self) -> DType {
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
    /// Weights and activations type (default: f32 on CPU, f16 on a GPU).
    #[arg(long, value_enum)]
    pub dtype: Option<DTypeArg>,
}

/// Per-image settings and run options shared by `tkg generate` and `tkg batch` (where a
/// job line overrides the per-image ones).
#[derive(Debug, Args)]
pub struct JobOptions {
    /// What to avoid (the unconditional side of classifier-free guidance).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// The background key colour: a name or #RRGGBB.
    #[arg(long, default_value = "green", value_parser = KeyColor::parse)]
    pub color: KeyColor,
    #[command(flatten)]
    pub model: ModelArgs,
    // [issue 5: LoRA / single-file] --model-file, --vae, --lora, --lora-dir, --lora-strict.
    #[command(flatten)]
    pub extra: ExtraModelArgs,
    /// Denoising steps (DDIM).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
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
    /// How to get a flat background.
    #[arg(long, value_enum, default_value = "tkg")]
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
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub original_size: Option<(usize, usize)>,
    /// SDXL: the crop offset the model is told about, TOP,LEFT (default 0,0).
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair)]
    pub crop_top_left: Option<(usize, usize)>,
    /// SDXL: the target size the model is told about, WIDTHxHEIGHT (default: the size).
    #[arg(long, value_name = "WxH", value_parser = parse_size)]
    pub target_size: Option<(usize, usize)>,
    /// Skip keying: write only the image.
    #[arg(long)]
    pub no_key: bool,
    #[command(flatten)]
    pub key: KeyFlags,
    #[command(flatten)]
    pub run: RunOptions,
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
    /// The shard count for --shard auto in a Kubernetes Indexed Job (its completions).
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

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What to draw.
    #[arg(long, short)]
    pub prompt: String,
    #[command(flatten)]
    pub opts: JobOptions,
}

fn parse_center(s: &str) -> Result<(f64, f64), String> {
    crate::jobs::parse_center(s)
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    crate::jobs::parse_size(s)
}

fn parse_pair(s: &str) -> Result<(usize, usize), String> {
    crate::jobs::parse_pair(s)
}

/// Picks the compute device.
pub fn pick_device(spec: &str, ui: Ui) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    Ok(match spec.as_str() {
        "cpu" => Device::Cpu,
        "auto" => {
            // A GPU build says it has CUDA/Metal whether or not this machine has the device:
            // try it, and fall back to the CPU out loud.
            let gpu = if candle_core::utils::cuda_is_available() {
                Some(Device::new_cuda(0).context("no usable CUDA device"))
            } else if candle_core::utils::metal_is_available() {
                Some(Device::new_metal(0).context("no usable Metal device"))
            } else {
                None
            };
            match gpu {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    let msg = crate::cli::one_line_error(&e);
                    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
                    ui.warn(format!(
                        "{msg}; running on the CPU (--device cpu to say so)"
                    ));
                    Device::Cpu
                }
                None => Device::Cpu,
            }
        }
        "metal" => Device::new_metal(0).context("cannot open the Metal device")?,
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().with_context(|| format!("bad device '{s}'"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this tkg was built without CUDA (build with --features cuda)");
            }
            Device::new_cuda(n).with_context(|| format!("cannot open CUDA device {n}"))?
        }
        other => bail!("unknown --device '{other}': use auto, cpu, cuda, cuda:N or metal"),
    })
}

/// A resolved model: where its folder is and what to call it.
pub struct ResolvedModel {
    pub name: String,
    /// The model's folder (for a single file: the folder the file is in).
    pub folder: ModelFolder,
    /// [issue 5] A single-file checkpoint (--model-file, or a registry entry `file = ...`).
    pub file: Option<PathBuf>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub tkg_shift: Option<f64>,
}

pub fn resolve_model(args: &ModelArgs, ui: Ui) -> Result<ResolvedModel> {
    if let Some(dir) = &args.model_dir {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        return Ok(ResolvedModel {
            name,
            folder: ModelFolder::local(dir)?,
            file: None,
            width: None,
            height: None,
            tkg_shift: None,
        });
    }
    let registry = Registry::load(args.models_file.as_deref())?;
    let entry = registry.get(&args.model)?;
    let folder = match &entry.source {
        Source::Builtin => {
            let dir = hub::builtin_cache_dir(&entry.name);
            if !dir.join("model_index.json").is_file() {
                ui.info(format!(
                    "materialising built-in model {} into {}",
                    entry.name,
                    dir.display()
                ));
            }
            ModelFolder::local(&builtin::ensure(&entry.name)?)?
        }
        // [issue 5] registry entries with `file = ...` are single-file checkpoints.
        Source::File(p) => return resolve_file(p, entry.name.clone()),
        _ => entry
            .folder()?
            .with_progress(!ui.quiet)
            .with_notices(move |m| ui.info(format!("tkg: {m}"))),
    };
    Ok(ResolvedModel {
        name: entry.name.clone(),
        folder,
        file: None,
        width: entry.width.map(|v| v as usize),
        height: entry.height.map(|v| v as usize),
        tkg_shift: entry.tkg_shift,
    })
}

// ---- [issue 5: LoRA / single-file checkpoints] -------------------------------------------

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

fn resolve_file(path: &Path, name: String) -> Result<ResolvedModel> {
    crate::models::single_file::check_extension(path)?;
    if !path.is_file() {
        bail!("{}: no such file", path.display());
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(ResolvedModel {
        name,
        folder: ModelFolder::local(parent)?,
        file: Some(path.to_path_buf()),
        width: None,
        height: None,
        tkg_shift: None,
    })
}

/// [`resolve_model`], or the --model-file when there is one.
pub fn resolve_model_with(
    args: &ModelArgs,
    extra: &ExtraModelArgs,
    ui: Ui,
) -> Result<ResolvedModel> {
    match &extra.model_file {
        Some(p) => {
            let name = p
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string());
            resolve_file(p, name)
        }
        None => resolve_model(args, ui),
    }
}

/// Loads a resolved model with --vae and the LoRAs of --lora plus the `<lora:...>` tags of
/// `prompts` (every prompt of one load must carry the same tags); reports what each LoRA
/// matched on stderr.
/// Loads `model` with the run's `--lora`s, then `job_loras` (a batch job's `lora` list), then
/// the `<lora:...>` tags of `prompts` (which must all carry the same tags).
pub fn load_pipeline(
    model: &ResolvedModel,
    extra: &ExtraModelArgs,
    job_loras: &[String],
    prompts: &[&str],
    opts: &crate::pipeline::LoadOptions,
    ui: Ui,
) -> Result<crate::pipeline::Pipeline> {
    use crate::models::lora::{self, LoraSpec};
    use crate::pipeline::{Adapters, ModelSource, Pipeline, VaeSource};
    let mut loras = extra
        .lora
        .iter()
        .chain(job_loras)
        .map(|a| LoraSpec::parse(a))
        .collect::<Result<Vec<_>>>()?;
    let tags = match prompts.first() {
        Some(p) => lora::prompt_tags(p)?,
        None => Vec::new(),
    };
    for p in prompts.iter().skip(1) {
        if lora::prompt_tags(p)? != tags {
            bail!(
                "prompts with different <lora:...> tags cannot share one model load yet; put them in separate runs"
            );
        }
    }
    for t in &tags {
        loras.push(lora::resolve_tag(t, extra.lora_dir.as_deref())?);
    }
    let vae = match &extra.vae {
        None => None,
        Some(p) if p.is_dir() => Some(VaeSource::Folder(ModelFolder::local(p)?)),
        Some(p) if p.is_file() => Some(VaeSource::File(p.clone())),
        Some(p) => bail!("--vae {}: no such file or folder", p.display()),
    };
    let adapters = Adapters {
        loras,
        lora_strict: extra.lora_strict,
        vae,
    };
    let source = match &model.file {
        Some(path) => ModelSource::File { path, config: None },
        None => ModelSource::Folder(&model.folder),
    };
    let pipe = Pipeline::load_with(source, opts, &adapters)?;
    for r in &pipe.lora_reports {
        ui.info(r.summary());
        if !r.unmatched.is_empty() {
            ui.warn(format!(
                "LoRA {}: unmatched: {}",
                r.name,
                r.unmatched.join(", ")
            ));
        }
    }
    Ok(pipe)
}

// ---- [end issue 5] --------------------------------------------------------------------------

/// Chooses the dtype: the flag, else f32 on CPU and f16 on GPUs.
pub fn pick_dtype(arg: Option<DTypeArg>, device: &Device) -> DType {
    match arg {
        Some(d) => d.dtype(),
        None if device.is_cpu() => DType::F32,
        None => DType::F16,
    }
}

pub fn run(args: &GenerateArgs, ui: Ui) -> Result<()> {
    let opts = &args.opts;
    let seed = match opts.seed {
        Some(s) => s,
        None => {
            if opts.run.shard.is_some() {
                bail!("--shard needs --seed, so that every shard draws the same seeds");
            }
            let s = rand::random::<u32>() as u64;
            ui.info(format!("seed: {s}"));
            s
        }
    };
    let line = crate::jobs::SourcedLine {
        line: 0,
        job: Default::default(),
    };
    let mut base = super::batch::base_settings(&args.prompt, opts, "tkg-{seed}.png")?;
    base.seed = Some(seed);
    super::batch::execute(
        "the command line",
        &[line],
        Vec::new(),
        base,
        seed,
        opts,
        false,
        ui,
    )
}

pub(super) fn default_size(family: Family) -> usize {
    match family {
        Family::Sd15 => 512,
        Family::Sdxl => 1024,
    }
}

/// Numbers as people write them: 7.5, 0.07, 50.
pub(crate) fn fmt_num(v: f64) -> String {
    let s = format!("{v}");
    if s.contains('e') {
        format!("{v:.6}")
    } else {
        s
    }
}

pub(super) fn save_latents(
    path: &Path,
    g: &crate::pipeline::Generated,
    overwrite: bool,
) -> Result<()> {
    let tensors = [
        ("noise", &g.noise),
        ("init", &g.init),
        ("final", &g.final_latents),
    ];
    let views: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| -> Result<_> {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            Ok((
                n.to_string(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                t.dims().to_vec(),
            ))
        })
        .collect::<Result<_>>()?;
    let data: Vec<(String, safetensors::tensor::TensorView)> = views
        .iter()
        .map(|(n, b, s)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(data, None)?;
    output::write_atomic(path, overwrite, |w| Ok(w.write_all(&bytes)?))
}
