//! `tkg place` jobs: a keyed cut-out put into a photo ([`crate::place`]), optionally
//! harmonised by an inpainting pass on a crop around it, and written as a scene with its
//! layers. The product is never redrawn: every pixel under the placed subject's full alpha is
//! the cut-out's own colour, restored last.

use super::plan::ModelKey;
use super::request::LoadedModel;
use super::{Event, Events, RunConfig, device, model};
use crate::metadata::{HarmonizeRecipe, PlaceRecipe};
use crate::output::{self, Pixels, PngImage};
use crate::photo;
use crate::pipeline::{InitNoise, LoadOptions, MicroCond, Request, Sampling, SourceImage};
use crate::place::{self, HarmonizeOptions, PlaceOptions, Placement};
use crate::rng::RngKind;
use crate::settings::{Settings, Size};
use anyhow::{Context, Result, bail};
use image::{RgbImage, RgbaImage};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One placement.
#[derive(Debug, Clone)]
pub struct PlaceJob {
    /// A straight-alpha cut-out (the keyer's `X.cutout.png`), or any image with `key`.
    pub cutout: PathBuf,
    /// The photo.
    pub onto: PathBuf,
    pub options: PlaceOptions,
    /// Key the cut-out first (an image on a flat screen, not yet cut out).
    pub key: bool,
    pub harmonize: Option<Harmonize>,
    /// Also write `X.subject.png`, `X.shadow.png` and `X.background.png`.
    pub layers: bool,
    pub out: PathBuf,
}

/// The inpainting pass over the seam and the shadow.
#[derive(Debug, Clone)]
pub struct Harmonize {
    /// img2img strength of the pass, in (0, 1].
    pub strength: f64,
    /// Model, prompt (the scene, not the product), seed, steps, guidance and sampler.
    pub settings: Settings,
}

/// Every file `job` writes: the scene, then its layers.
pub fn output_paths(job: &PlaceJob) -> Vec<PathBuf> {
    let mut v = vec![job.out.clone()];
    if job.layers {
        for layer in ["subject", "shadow", "background"] {
            v.push(output::sibling(&job.out, layer));
        }
    }
    v
}

/// Reads the cut-out as straight-alpha RGBA8, keying it first with `key`.
fn load_cutout(path: &Path, key: bool) -> Result<RgbaImage> {
    let img = crate::key::load_image(path)
        .with_context(|| format!("cannot use {} as the cut-out", path.display()))?;
    if key {
        let opts = crate::key::KeyOptions::new(crate::color::KeyColor::green());
        let keyed = crate::key::key_image(&img, &opts)?;
        let rgba = crate::key::cutout_rgba8(&keyed);
        return RgbaImage::from_raw(img.width(), img.height(), rgba)
            .context("internal error: the keyed cut-out has the wrong size");
    }
    if place::cutout_needs_keying(&img) {
        bail!(
            "the cut-out {} has no transparency; key it first (tkg key) or pass --key",
            path.display()
        );
    }
    Ok(img.to_rgba8())
}

/// Runs `job`: checks its outputs, places, harmonises, restores the product, writes.
/// Returns the files written.
/// `cache` keeps the harmonising model between jobs (reloaded when a job names another).
pub fn run_place(
    job: &PlaceJob,
    cfg: &RunConfig,
    events: &dyn Events,
    cache: &mut Option<(ModelKey, LoadedModel)>,
) -> Result<Vec<PathBuf>> {
    let paths = output_paths(job);
    output::check_targets(&paths, cfg.overwrite)?;
    if let Some(h) = &job.harmonize {
        if !(h.strength > 0.0 && h.strength <= 1.0) {
            bail!("--harmonize {} is not in (0, 1]", h.strength);
        }
        if h.settings.prompt.trim().is_empty() {
            bail!("--harmonize needs --prompt describing the scene");
        }
    }
    let cutout = load_cutout(&job.cutout, job.key)?;
    let photo = photo::load_photo(&job.onto)
        .with_context(|| format!("cannot use {} as the photo", job.onto.display()))?;
    for w in &photo.warnings {
        events.event(&Event::Warning(w.clone()));
    }
    let placement = place::place(photo.rgb, &cutout, &job.options)?;
    let (scene, sampling) = match &job.harmonize {
        None => (placement.scene.clone(), None),
        Some(h) => {
            let (scene, sampling) = harmonized(&placement, h, cfg, events, cache)?;
            (scene, Some(sampling))
        }
    };
    let scene = place::restore_subject(&scene, &placement.subject)?;
    let recipe = recipe(job, sampling);
    let text = [("parameters".to_string(), recipe.to_parameters().to_string())];
    let (w, h) = scene.dimensions();
    output::write_png(
        &job.out,
        &PngImage {
            width: w,
            height: h,
            pixels: Pixels::Rgb8(scene.as_raw()),
            text: &text,
        },
        cfg.overwrite,
    )?;
    if job.layers {
        let subject = placement.subject.to_layer();
        let shadow = placement.shadow.to_layer();
        let layers: [(&Path, Pixels); 3] = [
            (&paths[1], Pixels::Rgba8(subject.as_raw())),
            (&paths[2], Pixels::Rgba8(shadow.as_raw())),
            (&paths[3], Pixels::Rgb8(placement.background.as_raw())),
        ];
        for (path, pixels) in layers {
            let img = PngImage {
                width: w,
                height: h,
                pixels,
                text: &[],
            };
            output::write_png(path, &img, cfg.overwrite)?;
        }
    }
    Ok(paths)
}

/// The scene after the inpainting pass: the model sees a crop around the subject and its
/// shadow at its own resolution, repaints a band around the subject's edge and the shadow,
/// and the result is blended back through a feathered mask (elsewhere the photo is kept
/// byte for byte).
fn harmonized(
    placement: &Placement,
    h: &Harmonize,
    cfg: &RunConfig,
    events: &dyn Events,
    cache: &mut Option<(ModelKey, LoadedModel)>,
) -> Result<(RgbImage, Sampling)> {
    let s = &h.settings;
    let key = ModelKey::of(s);
    if cache.as_ref().is_none_or(|(k, _)| *k != key) {
        *cache = None;
        let (device, warning) = device::pick(&cfg.device)?;
        if let Some(w) = warning {
            events.event(&Event::Warning(w));
        }
        let notice = |m: String| events.event(&Event::Notice(m));
        let model = model::resolve(s, cfg, &notice)?;
        let opts = LoadOptions {
            dtype: cfg.dtype.unwrap_or_else(|| device::default_dtype(&device)),
            device,
            clip_skip: s.clip_skip,
            fp16_files: true,
            weights: cfg.weights,
            vae_tiling: cfg.vae_tiling,
        };
        let pipe = model.load(cfg, &s.lora, &[s.prompt.as_str()], &opts)?;
        events.event(&Event::Loaded {
            model: &model.name,
            source: model.folder.describe(),
            seconds: pipe.load_time.as_secs_f64(),
        });
        let loaded = LoadedModel {
            hash: None,
            name: s.model.clone(),
            defaults: model.defaults,
            pipe,
        };
        *cache = Some((key, loaded));
    }
    let (_, loaded) = cache.as_ref().expect("loaded above");
    let native = loaded.size(s);
    let mut hopts = HarmonizeOptions::new(native.width.max(native.height) as u32);
    hopts.vae_factor = loaded.pipe.vae_factor() as u32;
    let plan = placement.harmonize_plan(&hopts)?;
    let crop = place::crop_for_model(&placement.scene, &plan)?;
    let mask = place::mask_for_model(&plan)?;
    let size = Size::new(crop.width() as usize, crop.height() as usize);
    let req = Request {
        prompt: s.prompt.clone(),
        negative_prompt: s.negative_prompt.clone(),
        size,
        sampling: loaded.sampling(s),
        seed: s.seed.unwrap_or(0),
        init: InitNoise::Plain,
        micro: Some(MicroCond::for_size(size)),
        source: Some(SourceImage {
            rgb: Arc::new(crop.into_raw()),
            strength: h.strength,
            mask: Some(Arc::new(mask.into_raw())),
        }),
        preview: false,
    };
    let made = loaded
        .pipe
        .generate_with(&req, RngKind::TorchCpu, &mut |_, _| Ok(()))?;
    let out = RgbImage::from_raw(size.width as u32, size.height as u32, made.rgb)
        .context("internal error: the harmonised crop has the wrong size")?;
    Ok((
        place::blend_back(&placement.scene, &out, &plan)?,
        req.sampling,
    ))
}

/// What the scene records, so that `tkg info` can make it again.
fn recipe(job: &PlaceJob, sampling: Option<Sampling>) -> PlaceRecipe {
    PlaceRecipe {
        cutout: job.cutout.display().to_string(),
        onto: job.onto.display().to_string(),
        options: job.options.clone(),
        key: job.key,
        harmonize: job.harmonize.as_ref().zip(sampling).map(|(h, sampling)| {
            let s = &h.settings;
            HarmonizeRecipe {
                strength: h.strength,
                prompt: s.prompt.clone(),
                negative_prompt: s.negative_prompt.clone(),
                model: s.model.clone(),
                model_dir: s.model_dir.as_ref().map(|d| d.display().to_string()),
                seed: s.seed.unwrap_or(0),
                steps: sampling.steps,
                guidance: sampling.guidance,
                sampler: sampling.sampler,
            }
        }),
    }
}

/// A `tkg place --jobs` line: every key optional, over the command line's job.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceLine {
    cutout: Option<PathBuf>,
    onto: Option<PathBuf>,
    out: Option<PathBuf>,
    at: Option<[f64; 2]>,
    scale: Option<f64>,
    height: Option<u32>,
    shadow: Option<String>,
    shadow_angle: Option<f64>,
    shadow_length: Option<f64>,
    shadow_opacity: Option<f32>,
    #[serde(alias = "match_color")]
    match_colour: Option<f32>,
    allow_crop: Option<bool>,
    key: Option<bool>,
    layers: Option<bool>,
    harmonize: Option<f64>,
    prompt: Option<String>,
    negative_prompt: Option<String>,
    seed: Option<u64>,
    steps: Option<usize>,
    guidance: Option<f64>,
    sampler: Option<String>,
    schedule: Option<String>,
    model: Option<String>,
}

/// The drop shadow's direction and length when neither the line nor the flags say.
pub const DEFAULT_DROP: (f64, f64) = (45.0, 0.3);

impl PlaceLine {
    pub fn parse(line: &str) -> Result<Self> {
        serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// `base` with this line's keys replaced; `template` holds the harmonising pass's
    /// settings from the command line (used when the line turns it on).
    pub fn apply(self, base: &PlaceJob, template: &Settings) -> Result<PlaceJob> {
        use crate::place::{ShadowKind, SubjectSize};
        let mut job = base.clone();
        let o = &mut job.options;
        if let Some(v) = self.cutout {
            job.cutout = v;
        }
        if let Some(v) = self.onto {
            job.onto = v;
        }
        if let Some(v) = self.out {
            job.out = v;
        }
        if let Some([x, y]) = self.at {
            o.at = Some((x, y));
        }
        match (self.scale, self.height) {
            (Some(_), Some(_)) => bail!("give scale or height, not both"),
            (Some(s), None) => o.size = SubjectSize::Scale(s),
            (None, Some(h)) => o.size = SubjectSize::Height(h),
            (None, None) => {}
        }
        let (angle, length) = match o.shadow {
            ShadowKind::Drop { angle_deg, length } => (angle_deg, length),
            _ => DEFAULT_DROP,
        };
        let (angle, length) = (
            self.shadow_angle.unwrap_or(angle),
            self.shadow_length.unwrap_or(length),
        );
        o.shadow = match self.shadow.as_deref() {
            None => match o.shadow {
                ShadowKind::Drop { .. } => ShadowKind::Drop {
                    angle_deg: angle,
                    length,
                },
                s => s,
            },
            Some(name) => ShadowKind::from_name(name, (angle, length))
                .map_err(|e| anyhow::anyhow!("shadow: {e}"))?,
        };
        if let Some(v) = self.shadow_opacity {
            o.shadow_opacity = v;
        }
        if self.match_colour.is_some() {
            o.match_colour = self.match_colour;
        }
        if let Some(v) = self.allow_crop {
            o.allow_crop = v;
        }
        if let Some(v) = self.key {
            job.key = v;
        }
        if let Some(v) = self.layers {
            job.layers = v;
        }
        let strength = self
            .harmonize
            .or(job.harmonize.as_ref().map(|h| h.strength));
        job.harmonize = match strength {
            None => None,
            Some(strength) => {
                let mut s = job
                    .harmonize
                    .as_ref()
                    .map(|h| h.settings.clone())
                    .unwrap_or_else(|| template.clone());
                if let Some(v) = self.prompt {
                    s.prompt = v;
                }
                if let Some(v) = self.negative_prompt {
                    s.negative_prompt = v;
                }
                if self.seed.is_some() {
                    s.seed = self.seed;
                }
                if self.steps.is_some() {
                    s.steps = self.steps;
                }
                if self.guidance.is_some() {
                    s.guidance = self.guidance;
                }
                if let Some(v) = self.sampler {
                    s.sampler = Some(
                        crate::sampling::SamplerKind::parse(&v)
                            .map_err(|e| anyhow::anyhow!("sampler: {e}"))?,
                    );
                }
                if let Some(v) = self.schedule {
                    s.schedule = Some(
                        crate::sampling::Schedule::parse(&v)
                            .map_err(|e| anyhow::anyhow!("schedule: {e}"))?,
                    );
                }
                if let Some(v) = self.model {
                    s.model = v;
                    s.model_dir = None;
                }
                Some(Harmonize {
                    strength,
                    settings: s,
                })
            }
        };
        for (name, p) in [
            ("cutout", &job.cutout),
            ("onto", &job.onto),
            ("out", &job.out),
        ] {
            if p.as_os_str().is_empty() {
                bail!("no {name}");
            }
        }
        Ok(job)
    }
}
