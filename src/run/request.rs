//! From settings plus a loaded model's defaults to what the pipeline is asked for
//! ([`Request`]) and what the image records ([`Recipe`]).

use super::model::ModelDefaults;
use super::plan::ImageJob;
use super::source::SourceCache;
use crate::family::Family;
use crate::metadata::{Recipe, SourceRecipe};
use crate::pipeline::{
    AestheticScores, InitNoise, MicroCond, Pipeline, Request, Sampling, SourceImage,
};
use crate::sampling::SamplerSettings;
use crate::settings::{DEFAULT_GUIDANCE, DEFAULT_STEPS, Method, Offset, Settings, Size};
use crate::tkg::TkgSettings;
use anyhow::Result;

/// A loaded model and what is known about it.
pub struct LoadedModel {
    pub pipe: Pipeline,
    pub name: String,
    /// A1111's `Model hash`, when the weights could be read for it.
    pub hash: Option<String>,
    pub defaults: ModelDefaults,
}

impl LoadedModel {
    /// The setting, else the registry's size, else the UNet's `sample_size` x the VAE
    /// factor (as diffusers does), else the family's.
    pub fn size(&self, s: &Settings) -> Size {
        let d = self
            .pipe
            .unet
            .config
            .sample_size
            .map(|n| n * self.pipe.vae_factor())
            .unwrap_or_else(|| self.pipe.family.spec().default_size);
        Size::new(
            s.width.or(self.defaults.width).unwrap_or(d),
            s.height.or(self.defaults.height).unwrap_or(d),
        )
    }

    /// The setting, else the registry's, else the family's.
    pub fn shift(&self, s: &Settings) -> f64 {
        s.shift
            .or(self.defaults.tkg_shift)
            .unwrap_or(self.pipe.family.spec().tkg_shift)
    }

    /// Each field: the setting, else the registry's, else tkg's default (DDIM, 50 steps,
    /// guidance 7.5, the sampler's own schedule, the config's timestep spacing).
    pub fn sampling(&self, s: &Settings) -> Sampling {
        let d = &self.defaults.sampling;
        Sampling {
            sampler: SamplerSettings {
                kind: s.sampler.or(d.sampler).unwrap_or_default(),
                schedule: s.schedule.or(d.schedule).unwrap_or_default(),
                eta: s.eta,
                spacing: s.spacing.or(d.spacing),
            },
            steps: s.steps.or(d.steps).unwrap_or(DEFAULT_STEPS),
            guidance: s.guidance.or(d.guidance).unwrap_or(DEFAULT_GUIDANCE),
        }
    }

    /// What the pipeline is asked for `img`; photos and masks come through `sources`.
    pub fn request(&self, img: &ImageJob, sources: &mut SourceCache) -> Result<Request> {
        let s = &img.settings;
        let photo = s
            .init_image
            .as_deref()
            .map(|p| sources.photo(p).map(|img| (p, img)))
            .transpose()?;
        let size = match &photo {
            // diffusers' default: the photo's own size, rounded down to the VAE's factor.
            Some((_, p)) => {
                let f = self.pipe.vae_factor();
                Size::new(
                    s.width.unwrap_or(p.width() as usize / f * f),
                    s.height.unwrap_or(p.height() as usize / f * f),
                )
            }
            None => self.size(s),
        };
        self.pipe.check_size(size)?;
        let source = match (photo, s.effective_strength(self.pipe.family)) {
            (Some((path, p)), Some(strength)) => Some(SourceImage {
                rgb: sources.resized(path, &p, size)?,
                strength,
                mask: s
                    .mask
                    .as_deref()
                    .map(|m| sources.mask(m, path, &p, size))
                    .transpose()?,
            }),
            _ => None,
        };
        let init = match s.method {
            // img2img starts from the photo: TKG-DM's noise shaping does not apply.
            _ if source.is_some() => InitNoise::Plain,
            Method::Tkg => InitNoise::Tkg(TkgSettings {
                signs: s.color.channel_signs(self.pipe.family.spec().latent_rgb),
                target_shift: self.shift(s),
                sigma: s.mask_sigma,
                centers: s.centers(),
            }),
            Method::Prompt | Method::Plain => InitNoise::Plain,
        };
        if self.pipe.family != Family::Sdxl
            && (s.original_size.is_some() || s.crop_top_left.is_some() || s.target_size.is_some())
        {
            anyhow::bail!(
                "--original-size, --crop-top-left and --target-size are SDXL micro-conditioning; {} is {}",
                self.name,
                self.pipe.family
            );
        }
        let refiner = self.pipe.takes_aesthetic_score();
        if !refiner && (s.aesthetic_score.is_some() || s.negative_aesthetic_score.is_some()) {
            anyhow::bail!(
                "--aesthetic-score and --negative-aesthetic-score condition an SDXL refiner; {} takes no aesthetic score",
                self.name
            );
        }
        if refiner && source.is_none() {
            // diffusers runs a refiner only in its img2img and inpainting pipelines.
            anyhow::bail!(
                "{} is an SDXL refiner: it refines a photo; give --init-image",
                self.name
            );
        }
        if refiner && s.target_size.is_some() {
            anyhow::bail!(
                "{} is an SDXL refiner: it takes an aesthetic score, not --target-size",
                self.name
            );
        }
        let defaults = AestheticScores::default();
        let aesthetic = AestheticScores {
            score: s.aesthetic_score.unwrap_or(defaults.score),
            negative: s.negative_aesthetic_score.unwrap_or(defaults.negative),
        };
        Ok(Request {
            prompt: s.method.prompt_text(&s.prompt, &s.color),
            negative_prompt: s.negative_prompt.clone(),
            size,
            sampling: self.sampling(s),
            seed: img.seed,
            init,
            micro: Some(MicroCond {
                original_size: s.original_size.unwrap_or(size),
                crop_top_left: s.crop_top_left.unwrap_or_default(),
                target_size: s.target_size.unwrap_or(size),
                aesthetic,
            }),
            source,
            preview: false,
        })
    }

    /// What the image records about how it was made.
    pub fn recipe(&self, img: &ImageJob, req: &Request) -> Recipe {
        let s = &img.settings;
        let method = effective_method(s);
        let tkg = method == Method::Tkg;
        // SDXL's micro-conditioning, where it is not the default; SD1.x has none.
        let micro = req.micro.filter(|_| self.pipe.family == Family::Sdxl);
        let size = req.size;
        let lora_hashes = self.pipe.lora_hashes_text();
        Recipe {
            prompt: s.prompt.clone(),
            negative_prompt: s.negative_prompt.clone(),
            model: self.name.clone(),
            model_dir: s.model_dir.as_ref().map(|d| d.display().to_string()),
            model_hash: self.hash.clone(),
            lora_hashes: (!lora_hashes.is_empty()).then_some(lora_hashes),
            seed: img.seed,
            steps: req.sampling.steps,
            guidance: req.sampling.guidance,
            sampler: req.sampling.sampler,
            size,
            clip_skip: s.clip_skip,
            rng: s.rng,
            original_size: micro.map(|m| m.original_size).filter(|v| *v != size),
            crop_top_left: micro
                .map(|m| m.crop_top_left)
                .filter(|v| *v != Offset::default()),
            target_size: micro.map(|m| m.target_size).filter(|v| *v != size),
            aesthetic: micro
                .filter(|_| self.pipe.takes_aesthetic_score())
                .map(|m| (m.aesthetic.score, m.aesthetic.negative)),
            method,
            color: Some(s.color.clone()),
            shift: tkg.then(|| self.shift(s)),
            mask_sigma: tkg.then_some(s.mask_sigma),
            centers: if tkg { s.centers() } else { Vec::new() },
            source: req.source.as_ref().map(|src| SourceRecipe {
                init_image: s
                    .init_image
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                strength: src.strength,
                mask: s.mask.as_ref().map(|p| p.display().to_string()),
            }),
        }
    }
}

/// The method that shaped the noise: img2img starts from a photo, so TKG-DM's noise is
/// plain noise there (`--method prompt` still adds its words).
fn effective_method(s: &Settings) -> Method {
    match s.method {
        Method::Tkg if s.init_image.is_some() => Method::Plain,
        m => m,
    }
}
