//! `tkg place CUTOUT --onto PHOTO`: the cut-out in the photo, with a shadow, optional colour
//! match and harmonisation; or many placements from `--jobs FILE.jsonl` (shardable,
//! resumable).

use super::Ui;
use super::args::{DTypeArg, ModelArgs, SamplerArgs, registry_file};
use super::stdio::outln;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::PathBuf;
use tkg::place::{PlaceOptions, ShadowKind, SubjectSize};
use tkg::run::place::{Harmonize, PlaceJob, PlaceLine, output_paths, run_place};
use tkg::run::{RunConfig, Shard};
use tkg::settings::Settings;

#[derive(Debug, Args)]
pub struct PlaceArgs {
    /// The cut-out (straight-alpha RGBA, as `tkg key` and `tkg generate` write X.cutout.png).
    #[arg(required_unless_present = "jobs")]
    pub cutout: Option<PathBuf>,
    /// The photo to place it into (JPEG, PNG or WebP).
    #[arg(long, required_unless_present = "jobs")]
    pub onto: Option<PathBuf>,
    /// Where the bottom centre of the subject's alpha box lands, X,Y in [0, 1] of the photo
    /// [default: 0.5,0.9].
    #[arg(long, value_name = "X,Y", value_parser = parse_at)]
    pub at: Option<(f64, f64)>,
    /// Scale the cut-out by this factor.
    #[arg(long, conflicts_with = "height")]
    pub scale: Option<f64>,
    /// Make the subject's alpha box this many pixels high in the photo.
    #[arg(long, value_name = "PX")]
    pub height: Option<u32>,
    /// contact (a soft footprint under it), drop (its silhouette cast aside) or none.
    #[arg(long, default_value = "contact", value_parser = ShadowKind::NAMES)]
    pub shadow: String,
    /// Drop shadow direction in degrees (0 = right, 90 = down).
    #[arg(long, default_value_t = 45.0)]
    pub shadow_angle: f64,
    /// Drop shadow length in subject heights.
    #[arg(long, default_value_t = 0.3)]
    pub shadow_length: f64,
    /// Darkening at the shadow's core, 0..1.
    #[arg(long, default_value_t = tkg::place::DEFAULT_SHADOW_OPACITY)]
    pub shadow_opacity: f32,
    /// Move the subject's exposure and white balance toward the photo around it, with this
    /// strength (0..1; bounded, brand colours stay).
    #[arg(long, visible_alias = "match-color", value_name = "S", num_args = 0..=1, default_missing_value = "0.5")]
    pub match_colour: Option<f32>,
    /// Let the subject extend past the photo's edges.
    #[arg(long)]
    pub allow_crop: bool,
    /// Key the cut-out first (an image on a flat green screen).
    #[arg(long)]
    pub key: bool,
    /// Harmonise with an inpainting pass of this strength (0..1] over a band around the
    /// subject and its shadow; the product's opaque pixels are kept exactly.
    #[arg(long, value_name = "STRENGTH", requires = "prompt")]
    pub harmonize: Option<f64>,
    /// The scene, for --harmonize (not the product).
    #[arg(long, short)]
    pub prompt: Option<String>,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Seed of the harmonising pass [default: random, printed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps of the harmonising pass [default: the model's, else 50].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance of the harmonising pass [default: the model's, else 7.5].
    #[arg(long)]
    pub guidance: Option<f64>,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Also write X.subject.png (RGBA, scene coordinates), X.shadow.png (black, alpha =
    /// darkening) and X.background.png.
    #[arg(long)]
    pub layers: bool,
    /// The scene file.
    #[arg(long, short, required_unless_present = "jobs")]
    pub out: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
    /// Many placements: one JSON object a line (keys as the flags, e.g. "cutout", "onto",
    /// "out", "at", "scale", "harmonize", "prompt", "seed"); the flags are the defaults.
    #[arg(long, value_name = "FILE.jsonl", conflicts_with_all = ["cutout", "onto", "out"])]
    pub jobs: Option<PathBuf>,
    /// With --jobs: do line i only when i mod N == I ("I/N", or "auto" from Slurm/Kubernetes).
    #[arg(long, value_name = "I/N|auto", requires = "jobs")]
    pub shard: Option<String>,
    /// With --jobs: skip lines whose files all exist.
    #[arg(long, requires = "jobs", conflicts_with = "overwrite")]
    pub skip_existing: bool,
}

fn parse_at(s: &str) -> Result<(f64, f64), String> {
    let (x, y) = s.split_once(',').ok_or("expected X,Y")?;
    let f = |v: &str| {
        v.trim()
            .parse::<f64>()
            .map_err(|_| format!("{v} is not a number"))
    };
    Ok((f(x)?, f(y)?))
}

impl PlaceArgs {
    /// The flags as the job every line starts from.
    fn base(&self, ui: Ui) -> Result<PlaceJob> {
        let shadow = ShadowKind::from_name(&self.shadow, (self.shadow_angle, self.shadow_length))?;
        let size = match (self.scale, self.height) {
            (Some(s), _) => SubjectSize::Scale(s),
            (None, Some(h)) => SubjectSize::Height(h),
            (None, None) => SubjectSize::Native,
        };
        let harmonize = match self.harmonize {
            None => None,
            Some(strength) if !(strength > 0.0 && strength <= 1.0) => {
                bail!("--harmonize {strength} is not in (0, 1]")
            }
            Some(strength) => {
                let seed = match self.seed {
                    Some(s) => s,
                    None if self.jobs.is_some() => 0,
                    None => {
                        let s = rand::random::<u32>() as u64;
                        ui.info(format!("seed: {s}"));
                        s
                    }
                };
                Some(Harmonize {
                    strength,
                    settings: self.harmonize_settings(seed),
                })
            }
        };
        Ok(PlaceJob {
            cutout: self.cutout.clone().unwrap_or_default(),
            onto: self.onto.clone().unwrap_or_default(),
            options: PlaceOptions {
                at: self.at,
                size,
                shadow,
                shadow_opacity: self.shadow_opacity,
                match_colour: self.match_colour,
                allow_crop: self.allow_crop,
            },
            key: self.key,
            harmonize,
            layers: self.layers,
            out: self.out.clone().unwrap_or_default(),
        })
    }

    /// The harmonising pass's settings from the flags (`--seed` over `seed`).
    fn harmonize_settings(&self, seed: u64) -> Settings {
        let mut settings = Settings {
            prompt: self.prompt.clone().unwrap_or_default(),
            negative_prompt: self.negative_prompt.clone(),
            seed: Some(self.seed.unwrap_or(seed)),
            steps: self.steps,
            guidance: self.guidance,
            sampler: self.sampler.sampler,
            schedule: self.sampler.schedule,
            eta: self.sampler.eta.unwrap_or(0.0),
            spacing: self.sampler.timestep_spacing,
            model: self.model.model.clone(),
            ..Settings::default()
        };
        if let Some(d) = &self.model.model_dir {
            settings.model = tkg::settings::dir_model_name(d);
            settings.model_dir = Some(d.clone());
        }
        settings
    }

    fn run_config(&self) -> RunConfig {
        RunConfig {
            device: self.model.device.clone(),
            dtype: self.model.dtype.map(DTypeArg::dtype),
            weights: self.model.weights_dtype,
            vae_tiling: self.model.vae_tiling,
            registry_file: registry_file(self.model.models_file.as_deref()),
            overwrite: self.overwrite,
            ..RunConfig::default()
        }
    }
}

pub fn run(args: &PlaceArgs, ui: Ui) -> Result<()> {
    let base = args.base(ui)?;
    let cfg = args.run_config();
    let events = super::progress::Reporter::new(ui, super::args::ProgressMode::Auto);
    let mut cache = None;
    let Some(jobs) = &args.jobs else {
        for p in run_place(&base, &cfg, &events, &mut cache)? {
            outln!("{}", p.display());
        }
        return Ok(());
    };
    let shard = match args.shard.as_deref() {
        None => Shard::ALL,
        Some("auto") => Shard::auto(&|k| std::env::var(k).ok(), None)?,
        Some(s) => Shard::parse(s)?,
    };
    let text = tkg::limits::read_text_bounded(jobs, tkg::limits::MAX_JOB_FILE)?;
    // Every line is parsed and checked before any work.
    let mut todo = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let job = PlaceLine::parse(line)
            .and_then(|l| l.apply(&base, &args.harmonize_settings(0)))
            .with_context(|| format!("{}:{}", jobs.display(), i + 1))?;
        todo.push((i, job));
    }
    if todo.is_empty() {
        bail!("{} has no jobs", jobs.display());
    }
    let mut skipped = 0;
    for (index, (line, job)) in todo.iter().enumerate() {
        if !shard.selects(index) {
            continue;
        }
        if args.skip_existing && output_paths(job).iter().all(|p| p.exists()) {
            skipped += 1;
            continue;
        }
        let written = run_place(job, &cfg, &events, &mut cache)
            .with_context(|| format!("{}:{}", jobs.display(), line + 1))?;
        for p in written {
            outln!("{}", p.display());
        }
    }
    if skipped > 0 {
        ui.info(format!("skipped {skipped} finished placement(s)"));
    }
    Ok(())
}
