//! `tkg generate`: one image on a flat key colour, plus its matte and cut-out.

use super::Ui;
use super::key::KeyFlags;
use crate::color::{KeyColor, SD15_LATENT_RGB, SDXL_LATENT_RGB};
use crate::key;
use crate::metadata::Parameters;
use crate::models::builtin;
use crate::models::hub::{self, ModelFolder};
use crate::models::registry::{Family, Registry, Source};
use crate::output::{self, Pixels, PngImage};
use crate::pipeline::{InitNoise, LoadOptions, Pipeline, Request};
use crate::tkg::TkgSettings;
use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// TKG-DM: shifted initial noise (the default).
    Tkg,
    /// Baseline: plain noise, " isolated on a solid <colour> background" appended to the prompt.
    Prompt,
    /// Neither: plain text-to-image.
    Plain,
}

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

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What to draw.
    #[arg(long, short)]
    pub prompt: String,
    /// What to avoid (the unconditional side of classifier-free guidance).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// The background key colour: a name or #RRGGBB.
    #[arg(long, default_value = "green", value_parser = KeyColor::parse)]
    pub color: KeyColor,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Denoising steps (DDIM).
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Random seed; chosen at random (and printed) when omitted.
    #[arg(long)]
    pub seed: Option<u64>,
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
    #[arg(long, value_name = "X,Y", value_parser = parse_center)]
    pub subject_center: Vec<(f64, f64)>,
    /// A1111 "clip skip": use the text encoder's n-th hidden state from the end.
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// The image file; the matte and cut-out go next to it (X.matte.png, X.cutout.png).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
    /// Also write the noise, TKG init and final latents (f32 safetensors).
    #[arg(long, value_name = "FILE.safetensors")]
    pub save_latents: Option<PathBuf>,
    /// Skip keying: write only the image.
    #[arg(long)]
    pub no_key: bool,
    #[command(flatten)]
    pub key: KeyFlags,
}

fn parse_center(s: &str) -> Result<(f64, f64), String> {
    let (x, y) = s
        .split_once(',')
        .ok_or_else(|| format!("'{s}' is not X,Y"))?;
    let p = |v: &str| -> Result<f64, String> {
        let f: f64 = v
            .trim()
            .parse()
            .map_err(|_| format!("'{v}' is not a number"))?;
        if !(-1.0..=1.0).contains(&f) {
            return Err(format!("{f} is outside [-1, 1]"));
        }
        Ok(f)
    };
    Ok((p(x)?, p(y)?))
}

/// Picks the compute device.
pub fn pick_device(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    Ok(match spec.as_str() {
        "cpu" => Device::Cpu,
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                Device::new_cuda(0)?
            } else if candle_core::utils::metal_is_available() {
                Device::new_metal(0)?
            } else {
                Device::Cpu
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
    pub folder: ModelFolder,
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
        _ => entry.folder()?.with_progress(!ui.quiet),
    };
    Ok(ResolvedModel {
        name: entry.name.clone(),
        folder,
        width: entry.width.map(|v| v as usize),
        height: entry.height.map(|v| v as usize),
        tkg_shift: entry.tkg_shift,
    })
}

/// Chooses the dtype: the flag, else f32 on CPU and f16 on GPUs.
pub fn pick_dtype(arg: Option<DTypeArg>, device: &Device) -> DType {
    match arg {
        Some(d) => d.dtype(),
        None if device.is_cpu() => DType::F32,
        None => DType::F16,
    }
}

pub fn run(args: &GenerateArgs, ui: Ui) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let seed = match args.seed {
        Some(s) => s,
        None => {
            let s = rand::random::<u32>() as u64;
            ui.info(format!("seed: {s}"));
            s
        }
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("tkg-{seed}.png")));
    let (key_opts, key_flags) = args.key.to_options(args.color.clone())?;
    let mut targets = vec![out.clone()];
    if !args.no_key {
        key::check_output_flags(&key_flags)?;
        targets.extend(key::output_paths(&out, &key_flags));
    }
    if let Some(p) = &args.save_latents {
        targets.push(p.clone());
    }
    // Refuse early, before minutes of work.
    output::check_targets(&targets, args.overwrite)?;

    let device = pick_device(&args.model.device)?;
    let dtype = pick_dtype(args.model.dtype, &device);
    let model = resolve_model(&args.model, ui)?;
    let pipe = Pipeline::load(
        &model.folder,
        &LoadOptions {
            device: device.clone(),
            dtype,
            clip_skip: args.clip_skip,
        },
    )?;
    ui.detail(format!(
        "loaded {} ({}) in {:.2}s",
        model.name,
        model.folder.describe(),
        pipe.load_time.as_secs_f64()
    ));
    let family = pipe.family;
    let width = args.width.or(model.width).unwrap_or(default_size(family));
    let height = args.height.or(model.height).unwrap_or(default_size(family));
    pipe.check_size(width, height)?;

    let factors = match family {
        Family::Sd15 => &SD15_LATENT_RGB,
        Family::Sdxl => &SDXL_LATENT_RGB,
    };
    let shift = args.shift.or(model.tkg_shift).unwrap_or(match family {
        Family::Sd15 => 0.07,
        Family::Sdxl => 0.11,
    });
    let signs = args.color.channel_signs(factors);
    let centers = if args.subject_center.is_empty() {
        vec![(0.0, 0.0)]
    } else {
        args.subject_center.clone()
    };
    let (prompt, init) = match args.method {
        Method::Tkg => {
            ui.detail(format!("TKG channel signs for {}: {signs:?}", args.color));
            (
                args.prompt.clone(),
                InitNoise::Tkg(TkgSettings {
                    signs,
                    target_shift: shift,
                    sigma: args.mask_sigma,
                    centers: centers.clone(),
                }),
            )
        }
        Method::Prompt => (
            format!(
                "{} isolated on a solid {} background",
                args.prompt,
                args.color.prompt_words()
            ),
            InitNoise::Plain,
        ),
        Method::Plain => (args.prompt.clone(), InitNoise::Plain),
    };
    let req = Request {
        prompt: prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width,
        height,
        steps: args.steps,
        guidance: args.guidance,
        seed,
        init,
    };

    let mut progress = Progress::new(ui, args.steps);
    let generated = pipe.generate(&req, &mut |i, n| progress.step(i, n))?;
    progress.finish();
    for w in &generated.warnings {
        ui.warn(w);
    }

    let model_hash = hub::file_sha256_short(&pipe.unet_weights).ok();
    let mut params = Parameters::new(&prompt, &args.negative_prompt);
    params.push("Steps", args.steps.to_string());
    params.push("Sampler", "DDIM".into());
    params.push("CFG scale", fmt_num(args.guidance));
    params.push("Seed", seed.to_string());
    params.push("Size", format!("{width}x{height}"));
    if let Some(h) = &model_hash {
        params.push("Model hash", h.clone());
    }
    params.push("Model", model.name.clone());
    if let Some(n) = args.clip_skip {
        params.push("Clip skip", n.to_string());
    }
    params.push("TKG method", format!("{:?}", args.method).to_lowercase());
    params.push("TKG color", args.color.to_string());
    if args.method == Method::Tkg {
        params.push("TKG shift", fmt_num(shift));
        params.push("TKG sigma", fmt_num(args.mask_sigma));
        let c: Vec<String> = centers
            .iter()
            .map(|(x, y)| format!("{},{}", fmt_num(*x), fmt_num(*y)))
            .collect();
        params.push("TKG center", c.join(";"));
    }
    params.push("Version", format!("tkg {}", env!("CARGO_PKG_VERSION")));
    let text = vec![("parameters".to_string(), params.to_string())];

    output::write_png(
        &out,
        &PngImage {
            width: width as u32,
            height: height as u32,
            pixels: Pixels::Rgb8(&generated.rgb),
            text: &text,
        },
        args.overwrite,
    )?;
    println!("{}", out.display());
    if !args.no_key {
        let keyed = key::key_rgb8(width as u32, height as u32, &generated.rgb, &key_opts)?;
        if let Some(w) = &keyed.screen.warning {
            ui.warn(w);
        }
        for p in key::write_outputs(&out, &keyed, &key_flags, &text, args.overwrite)? {
            println!("{}", p.display());
        }
    }
    if let Some(p) = &args.save_latents {
        save_latents(p, &generated, args.overwrite)?;
        println!("{}", p.display());
    }
    let t = &generated.timings;
    ui.detail(format!(
        "text {:.2}s, denoise {:.2}s, decode {:.2}s",
        t.text.as_secs_f64(),
        t.denoise.as_secs_f64(),
        t.decode.as_secs_f64()
    ));
    Ok(())
}

fn default_size(family: Family) -> usize {
    match family {
        Family::Sd15 => 512,
        Family::Sdxl => 1024,
    }
}

/// Numbers as people write them: 7.5, 0.07, 50.
fn fmt_num(v: f64) -> String {
    let s = format!("{v}");
    if s.contains('e') {
        format!("{v:.6}")
    } else {
        s
    }
}

fn save_latents(path: &Path, g: &crate::pipeline::Generated, overwrite: bool) -> Result<()> {
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

/// Step progress on stderr: a bar on a terminal, plain lines otherwise, nothing with --quiet.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    start: Instant,
}

impl Progress {
    fn new(ui: Ui, steps: usize) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!ui.quiet && terminal).then(|| {
            let b = indicatif::ProgressBar::new(steps as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}]",
                )
                .expect("valid template"),
            );
            b
        });
        Self {
            bar,
            plain: !ui.quiet && !terminal,
            start: Instant::now(),
        }
    }

    fn step(&mut self, i: usize, n: usize) {
        if let Some(b) = &self.bar {
            b.set_position(i as u64);
        } else if self.plain && (i == n || i % (n / 10).max(1) == 0) {
            let secs = self.start.elapsed().as_secs_f64() / i as f64;
            eprintln!("step {i}/{n} ({secs:.2} s/it)");
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
