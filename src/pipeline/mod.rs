//! Text-to-image with classifier-free guidance and any of the [`scheduler`]s, as diffusers'
//! StableDiffusionPipeline computes it. One loop serves every model family; families differ only in conditioning
//! ([`conditioning`]). Loading is [`load`]; several images at once is [`batch`].

mod batch;
mod conditioning;
mod load;
mod start;

pub use batch::stack_conditioning;
pub use load::{Adapters, ModelSource, VaeSource, detect_family};
pub use start::{ImageStart, LatentMask, SourceImage, Start, binary_mask, rgb8_to_tensor};

use crate::kernels::matmul::{Precision, with_precision};
use crate::models::config::SchedulerConfig;
use crate::models::lora::LoraReport;
use crate::models::unet::UNet;
pub use crate::models::vae::VaeTiling;
use crate::models::vae::{self, Vae};
pub use crate::models::weights::WeightStorage;
use crate::rng::{Generator, RngKind};
pub use crate::sampling::Sampling;
use crate::scheduler::{self, StepNoise};
use crate::settings::{Offset, Size};
use crate::tkg::{self, ShiftReport, TkgSettings};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use conditioning::Conditioner;
use std::time::{Duration, Instant};

pub use crate::family::Family;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// A1111's "clip skip": use hidden_states[-n] (then the final norm) for SD1.x.
    pub clip_skip: Option<usize>,
    /// Prefer `*.fp16.safetensors` weight files when the dtype is f16 (a folder's f32 files
    /// are the fallback either way).
    pub fp16_files: bool,
    /// How weights are kept when computing in f32.
    pub weights: WeightStorage,
    /// Whether the VAE decodes and encodes in tiles (see [`Pipeline::vae_tiling`]).
    pub vae_tiling: VaeTiling,
}

impl LoadOptions {
    /// f32 on the CPU, as tests and benchmarks load models.
    pub fn cpu_f32() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            clip_skip: None,
            fp16_files: true,
            weights: WeightStorage::Auto,
            vae_tiling: VaeTiling::Auto,
        }
    }
}

/// SDXL's micro-conditioning, in pixels. A refiner UNet takes the aesthetic scores where the
/// base takes the target size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroCond {
    pub original_size: Size,
    pub crop_top_left: Offset,
    pub target_size: Size,
    pub aesthetic: AestheticScores,
}

/// The aesthetic scores an SDXL refiner is conditioned on: `score` for the prompt, `negative`
/// for the negative prompt (diffusers' defaults 6 and 2.5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AestheticScores {
    pub score: f64,
    pub negative: f64,
}

impl Default for AestheticScores {
    fn default() -> Self {
        Self {
            score: 6.0,
            negative: 2.5,
        }
    }
}

impl MicroCond {
    /// diffusers' defaults: original = target = the image size, no crop, default scores.
    pub fn for_size(size: Size) -> Self {
        Self {
            original_size: size,
            crop_top_left: Offset::default(),
            target_size: size,
            aesthetic: AestheticScores::default(),
        }
    }
}

/// What the denoiser is conditioned on, for [negative, positive] (CFG) or [positive].
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// [rows, tokens, dim]
    pub context: Tensor,
    /// [rows, dim]: the pooled text embedding (SDXL).
    pub pooled: Option<Tensor>,
    /// SDXL size conditioning; `None` means [`MicroCond::for_size`] of the image.
    pub micro: Option<MicroCond>,
    /// Human-readable notes, e.g. a truncated prompt.
    pub warnings: Vec<String>,
}

/// Where the initial latents come from.
#[derive(Debug, Clone)]
pub enum InitNoise {
    /// TKG-DM: mean-shifted background noise blended by a Gaussian mask.
    Tkg(TkgSettings),
    /// Plain N(0, I).
    Plain,
}

/// One image to make.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub size: Size,
    pub sampling: Sampling,
    pub seed: u64,
    pub init: InitNoise,
    /// SDXL size conditioning (ignored by SD1.x); `None` for diffusers' defaults.
    pub micro: Option<MicroCond>,
    /// img2img / inpainting: the photo to start from (`init` is then not used).
    pub source: Option<SourceImage>,
    /// Skip the VAE: the image is the latents through the family's latent-to-RGB factors,
    /// at latent resolution (a cheap preview, e.g. to compare key colours).
    pub preview: bool,
}

impl Request {
    /// What images must share to be denoised in one batch: size, sampling, micro-conditioning,
    /// and for img2img the strength and whether a mask is given.
    pub fn shape_key(&self) -> (Size, Sampling, Option<MicroCond>, Option<(f64, bool)>) {
        let source = self.source.as_ref().map(|s| (s.strength, s.mask.is_some()));
        (self.size, self.sampling, self.micro, source)
    }
}

/// Time spent per stage.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub text: Duration,
    pub denoise: Duration,
    pub decode: Duration,
}

/// One generated image and what led to it.
#[derive(Debug)]
pub struct Generated {
    /// RGB8, row-major.
    pub rgb: Vec<u8>,
    pub size: Size,
    /// The raw N(0, 1) draw, f32.
    pub noise: Tensor,
    /// The initial latents after TKG-DM, f32.
    pub init: Tensor,
    /// The last latents before the VAE, f32.
    pub final_latents: Tensor,
    pub shift: Option<ShiftReport>,
    pub warnings: Vec<String>,
    pub timings: Timings,
}

/// A loaded model: text encoder(s), UNet, VAE and scheduler config.
pub struct Pipeline {
    pub family: Family,
    conditioner: Conditioner,
    pub unet: UNet,
    pub vae: Vae,
    /// The VAE runs in f32 when its config asks to be upcast (SDXL's overflows in f16).
    pub vae_dtype: DType,
    /// Whether the VAE decodes and encodes in tiles; may be changed after loading.
    pub vae_tiling: VaeTiling,
    pub scheduler: SchedulerConfig,
    pub device: Device,
    /// The dtype of the tensors: f32 on the CPU even for `--dtype bf16`, which is
    /// [`Self::products`] there.
    pub dtype: DType,
    /// The precision of the CPU kernels' matrix products in the UNet and the VAE: bf16 for
    /// `--dtype bf16` on the CPU (f32 tensors and sums, bf16 inputs to each product), else
    /// f32. The text encoders, a fraction of a second per prompt, keep f32 products.
    pub products: Precision,
    /// The file the `Model hash` is computed over: the UNet weights of a folder, or the
    /// single-file checkpoint.
    pub unet_weights: std::path::PathBuf,
    /// What each LoRA matched (empty without LoRAs).
    pub lora_reports: Vec<LoraReport>,
    /// `(name, hash)` per LoRA, for A1111's `Lora hashes` (see [`Self::lora_hashes_text`]).
    pub lora_hashes: Vec<(String, String)>,
    pub load_time: Duration,
}

impl Pipeline {
    /// A1111's `Model hash`: the first 10 hex digits of the sha256 of
    /// [`Self::unet_weights`] (the single file, for a single-file checkpoint); cached.
    pub fn model_hash(&self) -> Result<String> {
        crate::models::hash::file_sha256_short(&self.unet_weights)
    }

    /// A1111's `Lora hashes` value: `name: hash, name: hash` (empty without LoRAs).
    pub fn lora_hashes_text(&self) -> String {
        self.lora_hashes
            .iter()
            .map(|(n, h)| format!("{n}: {h}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Image-to-latent factor of the VAE.
    pub fn vae_factor(&self) -> usize {
        self.vae.downscale_factor()
    }

    /// How many UNet calls (each one CFG pair) `sampling` makes: its steps, or nearly twice
    /// as many for Heun; img2img at `strength` skips the first ones.
    pub fn denoise_calls(&self, sampling: &Sampling, strength: Option<f64>) -> Result<usize> {
        let sampler = scheduler::build(&self.scheduler, &sampling.sampler, sampling.steps)?;
        let skipped = match strength {
            Some(s) => scheduler::first_call(sampler.as_ref(), sampling.steps, s)?,
            None => 0,
        };
        Ok(sampler.timesteps().len() - skipped)
    }

    /// Checks a request's size, sampler, steps and guidance before any work.
    pub fn check_request(&self, req: &Request) -> Result<()> {
        self.check_size(req.size)?;
        let s = &req.sampling;
        ensure!(
            s.guidance.is_finite() && s.guidance >= 0.0,
            "--guidance must be a non-negative number"
        );
        let sampler = scheduler::build(&self.scheduler, &s.sampler, s.steps)?;
        self.check_source(req, sampler.as_ref())
    }

    /// Checks what img2img and inpainting need: a strength that runs at least one step, a
    /// photo and mask of the request's size, and a mask exactly when the model is a
    /// 9-channel inpainting model.
    fn check_source(&self, req: &Request, sampler: &dyn scheduler::Sampler) -> Result<()> {
        let lat = self.vae.config.latent_channels;
        let unet_in = self.unet.config.in_channels;
        ensure!(
            unet_in == lat || self.is_inpainting_model(),
            "the UNet takes {unet_in} input channels; tkg knows {lat} (text-to-image, img2img) and {} (inpainting models)",
            2 * lat + 1
        );
        let Some(src) = &req.source else {
            ensure!(
                !self.is_inpainting_model(),
                "this is an inpainting model (9 input channels): give it --init-image and --mask"
            );
            return Ok(());
        };
        scheduler::first_call(sampler, req.sampling.steps, src.strength)?;
        let Size { width, height } = req.size;
        ensure!(
            src.rgb.len() == width * height * 3,
            "internal error: the init image is not {width}x{height} RGB"
        );
        match &src.mask {
            Some(m) => ensure!(
                m.len() == width * height,
                "internal error: the mask is not {width}x{height}"
            ),
            None => ensure!(
                !self.is_inpainting_model(),
                "this is an inpainting model (9 input channels): it needs --mask"
            ),
        }
        Ok(())
    }

    /// Checks a size before any work: it must be a positive multiple of what the UNet needs.
    pub fn check_size(&self, size: Size) -> Result<()> {
        let Size { width, height } = size;
        let f = self.vae_factor();
        ensure!(
            width > 0 && height > 0 && width.is_multiple_of(f) && height.is_multiple_of(f),
            "--width and --height must be positive multiples of {f} (the VAE's factor); got {width}x{height}"
        );
        crate::limits::check_image_size(width, height).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// A rough peak of the memory `images` decodes of `size` need side by side: at full
    /// resolution the decoder holds its last upsampler's output, a normalised copy and the
    /// next convolution's output. The UNet works 64x smaller and needs far less. Tiled, the
    /// decoder holds that for one tile, plus two rows of f32 output tiles and the image.
    pub fn decode_peak_bytes(&self, size: Size, images: usize) -> u64 {
        let cfg = &self.vae.config;
        let ch = &cfg.block_out_channels;
        let (c0, c1) = (ch[0] as u64, *ch.get(1).unwrap_or(&ch[0]) as u64);
        let per_pixel = (2 * c1 + c0) * self.vae_dtype.size_in_bytes() as u64;
        let pixels = size.width as u64 * size.height as u64;
        let f = self.vae_factor();
        let one = if self
            .vae_tiling
            .tiles_decode(cfg, size.height / f, size.width / f)
        {
            let tile = cfg.tile_sample_size() as u64;
            let rows = 2 * tile * size.width as u64;
            (tile * tile).saturating_mul(per_pixel) + (rows + 2 * pixels) * 3 * 4
        } else {
            pixels.saturating_mul(per_pixel)
        };
        one.saturating_mul(images as u64)
    }

    /// Refuses a size whose decode would not fit in `available` bytes.
    pub fn check_memory(&self, size: Size, images: usize, available: u64) -> Result<()> {
        let need = self.decode_peak_bytes(size, images);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        ensure!(
            need <= available,
            "{}x{} needs about {:.1} GiB to decode{}, and {:.1} GiB are free; lower --width/--height{}",
            size.width,
            size.height,
            gib(need),
            if images > 1 {
                format!(" {images} images at once")
            } else {
                String::new()
            },
            gib(available),
            if images > 1 { " or --batch-size" } else { "" }
        );
        Ok(())
    }

    /// Draws the noise for `req.seed` from torch's CPU generator and shapes the initial
    /// latents.
    pub fn initial_latents(&self, req: &Request) -> Result<(Tensor, Tensor, Option<ShiftReport>)> {
        self.initial_latents_from(req, &mut Generator::new(RngKind::TorchCpu, req.seed))
    }

    /// [`Self::initial_latents`] with the next draw of `generator` (seeded with the
    /// request's seed; a stochastic sampler continues it).
    pub fn initial_latents_from(
        &self,
        req: &Request,
        generator: &mut Generator,
    ) -> Result<(Tensor, Tensor, Option<ShiftReport>)> {
        let f = self.vae_factor();
        let (h, w) = (req.size.height / f, req.size.width / f);
        let c = self.vae.config.latent_channels;
        let noise = generator.randn(c * h * w);
        let noise = Tensor::from_vec(noise, (1, c, h, w), &Device::Cpu)?;
        let (init, report) = match &req.init {
            InitNoise::Plain => (noise.clone(), None),
            InitNoise::Tkg(settings) => {
                let (init, mut reports) = tkg::apply(&noise, settings)?;
                (init, reports.pop())
            }
        };
        Ok((noise, init, report))
    }

    /// The start of `req` with draws from `generator` (seeded with the request's seed; a
    /// stochastic sampler continues it): (the noise drawn first, the start, TKG-DM's shift).
    pub fn start_for(
        &self,
        req: &Request,
        generator: &mut Generator,
    ) -> Result<(Tensor, Start, Option<ShiftReport>)> {
        match &req.source {
            Some(source) => {
                let start = self.start_from_image(source, req.size, generator)?;
                Ok((start.noise.clone(), start, None))
            }
            None => {
                let (noise, init, shift) = self.initial_latents_from(req, generator)?;
                Ok((noise, Start::from_noise(init), shift))
            }
        }
    }

    /// Runs the denoise loop from `init` (f32, [B, C, h, w]) and returns the final latents
    /// (f32). `cond` has rows [negative 1..B, positive 1..B] with CFG (else [positive
    /// 1..B]), as [`stack_conditioning`] makes them. `noise` continues the generators that
    /// drew `init`, one per row. `control` runs after every UNet call; an error from it
    /// (e.g. an interrupt) stops the loop.
    pub fn denoise(
        &self,
        init: &Tensor,
        cond: &Conditioning,
        sampling: &Sampling,
        noise: &mut StepNoise,
        control: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let start = Start::from_noise(init.clone());
        self.denoise_from(&start, cond, sampling, noise, control)
    }

    /// [`Self::denoise`] from any [`Start`]. With a photo the schedule is cut by the
    /// strength and the photo's latents are noised to its first call (diffusers' img2img).
    /// With a mask, a 4-channel model's known region is put back after every call, noised to
    /// the next one (diffusers' inpainting); a 9-channel model takes the mask and the masked
    /// photo's latents as extra input channels instead.
    pub fn denoise_from(
        &self,
        start: &Start,
        cond: &Conditioning,
        sampling: &Sampling,
        noise: &mut StepNoise,
        control: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let batch = start.noise.dim(0)?;
        let mut sampler = scheduler::build(&self.scheduler, &sampling.sampler, sampling.steps)?;
        let cfg = sampling.uses_cfg();
        let on_device =
            |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?) };
        let start_noise = on_device(&start.noise)?;
        let image = start.image.as_ref();
        let begin = match image {
            Some(im) => scheduler::first_call(sampler.as_ref(), sampling.steps, im.strength)?,
            None => 0,
        };
        let image_latents = image
            .and_then(|im| im.latents.as_ref())
            .map(on_device)
            .transpose()?;
        let mut latents = match (&image_latents, image.and_then(|im| im.mask.as_ref())) {
            // diffusers' inpainting starts from pure noise at full strength.
            (_, Some(_)) if image.map(|im| im.strength) == Some(1.0) => {
                (&start_noise * sampler.init_noise_sigma())?
            }
            (Some(x), _) => sampler.add_noise(x, &start_noise, begin)?,
            (None, None) if image.is_none() => (&start_noise * sampler.init_noise_sigma())?,
            (None, _) => bail!("internal error: img2img without the photo's latents"),
        };
        let mask = image.and_then(|im| im.mask.as_ref());
        let blend = match mask {
            Some(m) if !self.is_inpainting_model() => {
                let known = image_latents
                    .clone()
                    .context("internal error: inpainting without the photo's latents")?;
                Some((on_device(&m.mask)?, known))
            }
            _ => None,
        };
        let extra = match mask {
            Some(m) if self.is_inpainting_model() => {
                let masked = m
                    .masked_latents
                    .as_ref()
                    .context("internal error: a 9-channel model without masked latents")?;
                let e = Tensor::cat(&[&on_device(&m.mask)?, &on_device(masked)?], 1)?;
                Some(if cfg { Tensor::cat(&[&e, &e], 0)? } else { e })
            }
            _ => None,
        };
        let context = cond.context.to_dtype(self.dtype)?;
        let (_, _, lh, lw) = start.noise.dims4()?;
        let added = self.added_cond(cond, (lh, lw), cfg)?;
        let timesteps = sampler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate().skip(begin) {
            let scaled = sampler.scale_model_input(&latents, i)?;
            let input = if cfg {
                Tensor::cat(&[&scaled, &scaled], 0)?
            } else {
                scaled
            };
            let input = match &extra {
                Some(e) => Tensor::cat(&[&input, e], 1)?,
                None => input,
            };
            let pred = with_precision(self.products, || {
                self.unet.forward(&input, t, &context, added.as_ref())
            })?;
            let pred = if cfg {
                let uncond = pred.narrow(0, 0, batch)?;
                let text = pred.narrow(0, batch, batch)?;
                (&uncond + ((text - &uncond)? * sampling.guidance)?)?
            } else {
                pred
            };
            latents = sampler.step(&pred, i, &latents, noise)?;
            if let Some((m, known)) = &blend {
                let known = if i + 1 < total {
                    sampler.add_noise(known, &start_noise, i + 1)?
                } else {
                    known.clone()
                };
                latents =
                    ((m.ones_like()? - m)?.broadcast_mul(&known)? + m.broadcast_mul(&latents)?)?;
            }
            check_finite(&latents, &format!("latents after denoising step {}", i + 1))?;
            control(i + 1 - begin, total - begin)?;
        }
        Ok(latents.to_dtype(DType::F32)?)
    }

    /// [`Self::denoise`] with DDIM at eta 0 (diffusers' default here), which draws no
    /// noise.
    pub fn denoise_ddim(
        &self,
        init: &Tensor,
        cond: &Conditioning,
        steps: usize,
        guidance: f64,
    ) -> Result<Tensor> {
        let sampling = Sampling::new(steps, guidance);
        let mut noise = StepNoise::new(Vec::new());
        self.denoise(init, cond, &sampling, &mut noise, &mut |_, _| Ok(()))
    }

    /// Decodes final latents into RGB8 pixels.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<u8>> {
        crate::kernels::release_scratch();
        let latents = latents.to_device(&self.device)?.to_dtype(self.vae_dtype)?;
        let image = with_precision(self.products, || {
            self.vae.decode_with(&latents, self.vae_tiling)
        })?;
        check_finite(&image, "decoded image (VAE output)")?;
        vae::to_rgb8(&image.squeeze(0)?)
    }

    /// The image of final latents: the VAE's, or with `req.preview` the latent-to-RGB
    /// factors' at latent resolution.
    fn decode_for(&self, req: &Request, latents: &Tensor) -> Result<(Vec<u8>, Size)> {
        if !req.preview {
            return Ok((self.decode(latents)?, req.size));
        }
        let z = latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let (_, c, h, w) = z.dims4()?;
        anyhow::ensure!(c == 4, "a latent preview needs 4 latent channels, not {c}");
        let v: Vec<f32> = z.flatten_all()?.to_vec1()?;
        let rgb = crate::color::latent_preview_rgb8(&v, h, w, self.family.spec().latent_rgb);
        Ok((rgb, Size::new(w, h)))
    }

    /// Makes one image.
    pub fn generate(
        &self,
        req: &Request,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        self.generate_with(req, RngKind::TorchCpu, &mut |i, n| {
            progress(i, n);
            Ok(())
        })
    }

    /// [`Self::generate`] with a chosen noise generator; `control` runs after every step and
    /// an error from it stops the loop.
    pub fn generate_with(
        &self,
        req: &Request,
        rng: RngKind,
        control: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Generated> {
        self.check_request(req)?;
        let t0 = Instant::now();
        let mut cond =
            self.encode_prompt(&req.prompt, &req.negative_prompt, req.sampling.uses_cfg())?;
        cond.micro = req.micro;
        let t1 = Instant::now();
        let mut generator = Generator::new(rng, req.seed);
        let (noise, start, shift) = self.start_for(req, &mut generator)?;
        let mut step_noise = StepNoise::new(vec![generator]);
        let final_latents =
            self.denoise_from(&start, &cond, &req.sampling, &mut step_noise, control)?;
        let init = start.noise;
        let t2 = Instant::now();
        let (rgb, size) = self.decode_for(req, &final_latents)?;
        let t3 = Instant::now();
        Ok(Generated {
            rgb,
            size,
            noise,
            init,
            final_latents,
            shift,
            warnings: cond.warnings,
            timings: Timings {
                text: t1 - t0,
                denoise: t2 - t1,
                decode: t3 - t2,
            },
        })
    }
}

/// A NaN or Inf is an error that names the stage, never a black image.
pub fn check_finite(t: &Tensor, stage: &str) -> Result<()> {
    let s: f32 = t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar()?;
    if !s.is_finite() {
        // The sum can overflow on huge but finite values; look closer before failing.
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
            if t.dtype() == DType::F32 {
                bail!("{bad} in the {stage}: a weight or an input is not a finite number");
            }
            bail!(
                "{bad} in the {stage}: the computation overflowed in {:?} (try --dtype f32)",
                t.dtype()
            );
        }
    }
    Ok(())
}
