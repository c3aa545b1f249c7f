//! Text-to-image with classifier-free guidance and DDIM, as diffusers' StableDiffusionPipeline
//! computes it. One loop serves every model family; families differ only in conditioning.

use crate::models::clip::{ClipTextModel, HiddenLayer};
use crate::models::config::{
    ClipTextConfig, ModelIndex, SchedulerConfig, UNetConfig, VaeConfig, read_json,
};
use crate::models::hub::ModelFolder;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{AddedCond, UNet};
use crate::models::vae::{self, Vae};
use crate::models::weights::WeightFile;
use crate::rng::RngKind;
use crate::scheduler::Ddim;
use crate::tkg::{self, ShiftReport, TkgSettings};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use std::time::{Duration, Instant};

pub use crate::models::registry::Family;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    /// A1111's "clip skip": use hidden_states[-n] (then the final norm) for SD1.x.
    pub clip_skip: Option<usize>,
}

/// A text encoder with its tokenizer.
struct TextTower {
    tokenizer: ClipTokenizer,
    encoder: ClipTextModel,
}

/// Family-specific conditioning.
enum Conditioner {
    /// SD1.x: one CLIP-L, last hidden state.
    Sd15 {
        tower: TextTower,
        layer: HiddenLayer,
    },
    /// SDXL: CLIP-L and OpenCLIP-bigG penultimate states, concatenated; pooled text
    /// embedding from the second encoder's projection.
    Sdxl {
        towers: [TextTower; 2],
        layer: HiddenLayer,
        /// An empty negative prompt is all zeros (embeddings and pooled), not the encoding of "".
        force_zeros_for_empty_prompt: bool,
    },
}

/// SDXL's micro-conditioning, in pixels: (height, width) and (top, left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroCond {
    pub original_size: (usize, usize),
    pub crop_top_left: (usize, usize),
    pub target_size: (usize, usize),
}

impl MicroCond {
    /// diffusers' defaults: original = target = the image size, no crop.
    pub fn for_size(height: usize, width: usize) -> Self {
        Self {
            original_size: (height, width),
            crop_top_left: (0, 0),
            target_size: (height, width),
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
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub init: InitNoise,
    /// SDXL size conditioning (ignored by SD1.x); `None` for diffusers' defaults.
    pub micro: Option<MicroCond>,
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
    pub width: usize,
    pub height: usize,
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
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
    /// The UNet weights file (for the model hash).
    pub unet_weights: std::path::PathBuf,
    pub load_time: Duration,
}

impl TextTower {
    /// Encodes each text ([rows, 77] ids) and returns the encoder's outputs.
    fn encode(
        &self,
        texts: &[&str],
        layer: HiddenLayer,
        device: &Device,
        warnings: &mut Vec<String>,
    ) -> Result<crate::models::clip::TextEncoding> {
        let mut ids = Vec::with_capacity(texts.len());
        for t in texts {
            let enc = self.tokenizer.encode(t)?;
            if enc.truncated
                && let Some(removed) = self.tokenizer.removed_text(t)?
            {
                warnings.push(format!(
                    "the prompt is longer than {} tokens; this part was dropped: \"{removed}\"",
                    self.tokenizer.max_length()
                ));
            }
            ids.push(Tensor::new(enc.ids.as_slice(), device)?);
        }
        self.encoder.forward(&Tensor::stack(&ids, 0)?, layer)
    }
}

/// Loads `tokenizer{suffix}` and `text_encoder{suffix}`; returns the tower and its width.
fn load_tower(folder: &ModelFolder, suffix: &str, opts: &LoadOptions) -> Result<(TextTower, usize)> {
    let te = format!("text_encoder{suffix}");
    let tok = format!("tokenizer{suffix}");
    let cfg: ClipTextConfig = read_json(&folder.file(&format!("{te}/config.json"))?)?;
    let tok_file = folder
        .file(&format!("{tok}/vocab.json"))
        .or_else(|_| folder.file(&format!("{tok}/tokenizer.json")))?;
    // Fetch the side files a Hub folder needs before reading it.
    for extra in ["merges.txt", "special_tokens_map.json", "tokenizer_config.json"] {
        let _ = folder.optional_file(&format!("{tok}/{extra}"))?;
    }
    let tokenizer = ClipTokenizer::from_dir(tok_file.parent().expect("file has a folder"))
        .with_context(|| format!("loading {tok}"))?;
    ensure!(
        tokenizer.vocab_size() <= cfg.vocab_size,
        "{tok} has {} tokens but {te} only {}",
        tokenizer.vocab_size(),
        cfg.vocab_size
    );
    let (encoder, _) = load_component(folder, &te, &["model"], opts, |vb| ClipTextModel::load(vb, &cfg))?;
    Ok((TextTower { tokenizer, encoder }, cfg.hidden_size))
}

/// Tensors a checkpoint may carry that no network reads.
fn ignorable(name: &str) -> bool {
    name.ends_with("position_ids")
}

fn load_component<T>(
    folder: &ModelFolder,
    component: &str,
    weight_names: &[&str],
    opts: &LoadOptions,
    build: impl FnOnce(candle_nn::VarBuilder) -> Result<T>,
) -> Result<(T, std::path::PathBuf)> {
    let prefer_fp16 = opts.dtype == DType::F16;
    let path = folder.weights(component, weight_names, prefer_fp16)?;
    let file = WeightFile::open(&path)?;
    let model = build(file.var_builder(opts.dtype, &opts.device))
        .with_context(|| format!("loading {component} from {}", path.display()))?;
    file.ensure_all_used(ignorable)?;
    Ok((model, path))
}

/// Detects the model family from a diffusers folder's configs.
pub fn detect_family(folder: &ModelFolder) -> Result<Family> {
    if folder
        .optional_file("text_encoder_2/config.json")?
        .is_some()
    {
        return Ok(Family::Sdxl);
    }
    let unet: UNetConfig = read_json(&folder.file("unet/config.json")?)?;
    if unet.addition_embed_type.as_deref() == Some("text_time") {
        return Ok(Family::Sdxl);
    }
    Ok(Family::Sd15)
}

impl Pipeline {
    /// Loads a diffusers-layout folder. Every shape comes from its configs.
    pub fn load(folder: &ModelFolder, opts: &LoadOptions) -> Result<Self> {
        let start = Instant::now();
        let family = detect_family(folder)?;
        let index: Option<ModelIndex> = match folder.optional_file("model_index.json")? {
            Some(p) => Some(read_json(&p)?),
            None => None,
        };
        let unet_cfg: UNetConfig = read_json(&folder.file("unet/config.json")?)?;
        let (conditioner, text_width) = match family {
            Family::Sd15 => {
                let tower = load_tower(folder, "", opts)?;
                let layer = match opts.clip_skip {
                    None | Some(1) => HiddenLayer::LastNormed,
                    Some(n) => HiddenLayer::SkipNormed(n),
                };
                let width = tower.1;
                (Conditioner::Sd15 { tower: tower.0, layer }, width)
            }
            Family::Sdxl => {
                let (t1, w1) = load_tower(folder, "", opts)?;
                let (t2, w2) = load_tower(folder, "_2", opts)?;
                ensure!(
                    t2.encoder.has_projection(),
                    "text_encoder_2 of an SDXL model must be a CLIPTextModelWithProjection"
                );
                let pooled = t2.encoder.projection_dim();
                if let (Some(t), Some(p)) = (
                    unet_cfg.addition_time_embed_dim,
                    unet_cfg.projection_class_embeddings_input_dim,
                ) {
                    ensure!(
                        p == 6 * t + pooled,
                        "the UNet's addition embedding takes {p} values, but 6 time ids x {t} + {pooled} pooled make {}",
                        6 * t + pooled
                    );
                }
                let force_zeros = index
                    .as_ref()
                    .and_then(|i| i.force_zeros_for_empty_prompt)
                    .unwrap_or(true);
                (
                    Conditioner::Sdxl {
                        towers: [t1, t2],
                        // diffusers: hidden_states[-(clip_skip + 2)], no final norm.
                        layer: HiddenLayer::Unnormed(opts.clip_skip.unwrap_or(0) + 2),
                        force_zeros_for_empty_prompt: force_zeros,
                    },
                    w1 + w2,
                )
            }
        };
        ensure!(
            unet_cfg.cross_dim() == text_width,
            "the UNet expects {}-wide text embeddings but the text encoder(s) make {}",
            unet_cfg.cross_dim(),
            text_width
        );
        let (unet, unet_weights) =
            load_component(folder, "unet", &["diffusion_pytorch_model"], opts, |vb| {
                UNet::load(vb, &unet_cfg)
            })?;
        ensure!(
            (family == Family::Sdxl) == unet.needs_added_cond(),
            "the UNet's addition_embed_type does not fit a {family} model"
        );
        let vae_cfg: VaeConfig = read_json(&folder.file("vae/config.json")?)?;
        ensure!(
            vae_cfg.latent_channels == unet_cfg.in_channels,
            "the VAE has {} latent channels but the UNet takes {}",
            vae_cfg.latent_channels,
            unet_cfg.in_channels
        );
        let vae_dtype = if vae_cfg.force_upcast { DType::F32 } else { opts.dtype };
        let vae_opts = LoadOptions {
            dtype: vae_dtype,
            ..opts.clone()
        };
        let (vae, _) = load_component(folder, "vae", &["diffusion_pytorch_model"], &vae_opts, |vb| {
            Vae::load(vb, &vae_cfg)
        })?;
        let scheduler: SchedulerConfig =
            read_json(&folder.file("scheduler/scheduler_config.json")?)?;
        Ok(Self {
            family,
            conditioner,
            unet,
            vae,
            vae_dtype,
            scheduler,
            device: opts.device.clone(),
            dtype: opts.dtype,
            unet_weights,
            load_time: start.elapsed(),
        })
    }

    /// Image-to-latent factor of the VAE.
    pub fn vae_factor(&self) -> usize {
        self.vae.downscale_factor()
    }

    /// Checks a size before any work: it must be a positive multiple of what the UNet needs.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let f = self.vae_factor();
        ensure!(
            width > 0 && height > 0 && width % f == 0 && height % f == 0,
            "--width and --height must be positive multiples of {f} (the VAE's factor); got {width}x{height}"
        );
        Ok(())
    }

    /// Encodes prompts into the denoiser's conditioning ([negative, positive] with CFG).
    pub fn encode_prompt(&self, prompt: &str, negative: &str, cfg: bool) -> Result<Conditioning> {
        let mut warnings = Vec::new();
        let texts: Vec<&str> = if cfg { vec![negative, prompt] } else { vec![prompt] };
        match &self.conditioner {
            Conditioner::Sd15 { tower, layer } => {
                let out = tower.encode(&texts, *layer, &self.device, &mut warnings)?;
                check_finite(&out.hidden, "text encoder output")?;
                Ok(Conditioning {
                    context: out.hidden,
                    pooled: None,
                    micro: None,
                    warnings,
                })
            }
            Conditioner::Sdxl {
                towers,
                layer,
                force_zeros_for_empty_prompt,
            } => {
                let a = towers[0].encode(&texts, *layer, &self.device, &mut warnings)?;
                let b = towers[1].encode(&texts, *layer, &self.device, &mut warnings)?;
                warnings.dedup();
                let mut context = Tensor::cat(&[&a.hidden, &b.hidden], 2)?;
                let mut pooled = b.pooled.expect("text_encoder_2 has a projection");
                if cfg && *force_zeros_for_empty_prompt && negative.is_empty() {
                    let zero_first = |t: &Tensor| -> Result<Tensor> {
                        let pos = t.narrow(0, 1, 1)?;
                        Ok(Tensor::cat(&[&pos.zeros_like()?, &pos], 0)?)
                    };
                    context = zero_first(&context)?;
                    pooled = zero_first(&pooled)?;
                }
                check_finite(&context, "text encoder output")?;
                check_finite(&pooled, "pooled text embedding")?;
                Ok(Conditioning {
                    context,
                    pooled: Some(pooled),
                    micro: None,
                    warnings,
                })
            }
        }
    }

    /// SDXL's added conditioning for `rows` rows of the batch.
    fn added_cond(
        &self,
        cond: &Conditioning,
        latent_hw: (usize, usize),
    ) -> Result<Option<AddedCond>> {
        if !self.unet.needs_added_cond() {
            return Ok(None);
        }
        let pooled = cond
            .pooled
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("SDXL needs a pooled text embedding"))?;
        let f = self.vae_factor();
        let micro = cond
            .micro
            .unwrap_or_else(|| MicroCond::for_size(latent_hw.0 * f, latent_hw.1 * f));
        let ids = [
            micro.original_size.0,
            micro.original_size.1,
            micro.crop_top_left.0,
            micro.crop_top_left.1,
            micro.target_size.0,
            micro.target_size.1,
        ]
        .map(|v| v as f32);
        let rows = pooled.dim(0)?;
        let time_ids = Tensor::new(&ids, &self.device)?
            .unsqueeze(0)?
            .repeat((rows, 1))?
            .to_dtype(self.dtype)?;
        Ok(Some(AddedCond {
            text_embeds: pooled.to_dtype(self.dtype)?,
            time_ids,
        }))
    }

    /// Draws the noise for `seed` and shapes the initial latents.
    pub fn initial_latents(&self, req: &Request) -> Result<(Tensor, Tensor, Option<ShiftReport>)> {
        self.initial_latents_with(req, RngKind::TorchCpu)
    }

    /// [`Self::initial_latents`] with a chosen noise generator.
    pub fn initial_latents_with(
        &self,
        req: &Request,
        rng: RngKind,
    ) -> Result<(Tensor, Tensor, Option<ShiftReport>)> {
        let f = self.vae_factor();
        let (h, w) = (req.height / f, req.width / f);
        let c = self.unet.config.in_channels;
        let noise = crate::rng::randn(rng, req.seed, c * h * w);
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

    /// Runs the DDIM loop from `init` (f32) and returns the final latents (f32).
    pub fn denoise(
        &self,
        init: &Tensor,
        cond: &Conditioning,
        steps: usize,
        guidance: f64,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        self.denoise_checked(init, cond, steps, guidance, &mut |i, n| {
            progress(i, n);
            Ok(())
        })
    }

    /// [`Self::denoise`] for a batch: `init` is [B, C, h, w] and `cond` has rows
    /// [negative 1..B, positive 1..B] with CFG (else [positive 1..B]), as
    /// [`stack_conditioning`] makes them. `control` runs after every step; an error from it
    /// (e.g. an interrupt) stops the loop.
    pub fn denoise_checked(
        &self,
        init: &Tensor,
        cond: &Conditioning,
        steps: usize,
        guidance: f64,
        control: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let batch = init.dim(0)?;
        // On the CPU the UNet runs image by image even in a batch: the CPU gains nothing from
        // batching, and its matmul blocking depends on the row count, so one fused call would
        // change the last bits of an image with the batch size. TKG_FUSED_CPU_BATCH=1 fuses
        // anyway (to measure that).
        let split_batches = self.device.is_cpu()
            && std::env::var_os("TKG_FUSED_CPU_BATCH").is_none_or(|v| v != "1");
        let scheduler = Ddim::new(&self.scheduler, steps)?;
        let cfg = guidance > 1.0;
        let mut latents =
            (init.to_device(&self.device)?.to_dtype(self.dtype)? * scheduler.init_noise_sigma())?;
        let context = cond.context.to_dtype(self.dtype)?;
        let (_, _, lh, lw) = init.dims4()?;
        let added = self.added_cond(cond, (lh, lw))?;
        let total = scheduler.timesteps().len();
        for (i, &t) in scheduler.timesteps().iter().enumerate() {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let pred = if batch > 1 && split_batches {
                self.unet_per_image(&input, t, &context, added.as_ref(), batch, cfg)?
            } else {
                self.unet
                    .forward(&input, t as f64, &context, added.as_ref())?
            };
            let pred = if cfg {
                let uncond = pred.narrow(0, 0, batch)?;
                let text = pred.narrow(0, batch, batch)?;
                (&uncond + ((text - &uncond)? * guidance)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, t, &latents)?;
            check_finite(&latents, &format!("latents after denoising step {}", i + 1))?;
            control(i + 1, total)?;
        }
        Ok(latents.to_dtype(DType::F32)?)
    }

    /// Decodes final latents into RGB8 pixels.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<u8>> {
        let image = self
            .vae
            .decode(&latents.to_device(&self.device)?.to_dtype(self.vae_dtype)?)?;
        check_finite(&image, "decoded image (VAE output)")?;
        vae::to_rgb8(&image.squeeze(0)?)
    }

    /// Makes one image.
    pub fn generate(
        &self,
        req: &Request,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        self.check_size(req.width, req.height)?;
        ensure!(req.steps > 0, "--steps must be at least 1");
        ensure!(
            req.guidance.is_finite() && req.guidance >= 0.0,
            "--guidance must be a non-negative number"
        );
        let t0 = Instant::now();
        let mut cond = self.encode_prompt(&req.prompt, &req.negative_prompt, req.guidance > 1.0)?;
        cond.micro = req.micro;
        let t1 = Instant::now();
        let (noise, init, shift) = self.initial_latents(req)?;
        let final_latents = self.denoise(&init, &cond, req.steps, req.guidance, progress)?;
        let t2 = Instant::now();
        let rgb = self.decode(&final_latents)?;
        let t3 = Instant::now();
        Ok(Generated {
            rgb,
            width: req.width,
            height: req.height,
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

impl Pipeline {
    /// Makes several images in one denoising loop (B images per UNet call). Every request
    /// must share size, steps, guidance and SDXL micro-conditioning. Each image's prompt
    /// encoding, noise, TKG init and VAE decode are computed on their own, so an image is the
    /// same alone or in a batch.
    pub fn generate_batch(
        &self,
        reqs: &[Request],
        rng: RngKind,
        control: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Vec<Generated>> {
        let first = reqs.first().context("an empty batch")?;
        for r in reqs {
            ensure!(
                r.width == first.width
                    && r.height == first.height
                    && r.steps == first.steps
                    && r.guidance == first.guidance
                    && r.micro == first.micro,
                "internal error: a batch mixes sizes, steps, guidance or micro-conditioning"
            );
        }
        self.check_size(first.width, first.height)?;
        ensure!(first.steps > 0, "--steps must be at least 1");
        ensure!(
            first.guidance.is_finite() && first.guidance >= 0.0,
            "--guidance must be a non-negative number"
        );
        let cfg = first.guidance > 1.0;
        let mut conds = Vec::with_capacity(reqs.len());
        let mut text_times = Vec::with_capacity(reqs.len());
        let mut inits = Vec::with_capacity(reqs.len());
        for r in reqs {
            let t0 = Instant::now();
            let mut cond = self.encode_prompt(&r.prompt, &r.negative_prompt, cfg)?;
            cond.micro = r.micro;
            text_times.push(t0.elapsed());
            conds.push(cond);
            inits.push(self.initial_latents_with(r, rng)?);
        }
        let t1 = Instant::now();
        let cond = stack_conditioning(&conds, cfg)?;
        let init_refs: Vec<&Tensor> = inits.iter().map(|(_, i, _)| i).collect();
        let init = Tensor::cat(&init_refs, 0)?;
        let final_latents = self.denoise_checked(&init, &cond, first.steps, first.guidance, control)?;
        let denoise = t1.elapsed() / reqs.len() as u32;
        let mut out = Vec::with_capacity(reqs.len());
        for (i, ((r, c), (noise, init, shift))) in reqs.iter().zip(conds).zip(inits).enumerate() {
            let t2 = Instant::now();
            let latents = final_latents.narrow(0, i, 1)?;
            let rgb = self.decode(&latents)?;
            out.push(Generated {
                rgb,
                width: r.width,
                height: r.height,
                noise,
                init,
                final_latents: latents,
                shift,
                warnings: c.warnings,
                timings: Timings {
                    text: text_times[i],
                    denoise,
                    decode: t2.elapsed(),
                },
            });
        }
        Ok(out)
    }
}

impl Pipeline {
    /// One UNet call per image of a batch laid out as [`Self::denoise_checked`] takes it;
    /// returns the predictions in the same layout.
    fn unet_per_image(
        &self,
        input: &Tensor,
        t: usize,
        context: &Tensor,
        added: Option<&AddedCond>,
        batch: usize,
        cfg: bool,
    ) -> Result<Tensor> {
        let halves = if cfg { 2 } else { 1 };
        let rows = |x: &Tensor, i: usize| -> Result<Tensor> {
            let parts: Vec<Tensor> = (0..halves)
                .map(|h| x.narrow(0, h * batch + i, 1))
                .collect::<candle_core::Result<_>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        };
        let mut preds = Vec::with_capacity(batch);
        for i in 0..batch {
            let added_i = match added {
                Some(a) => Some(AddedCond {
                    text_embeds: rows(&a.text_embeds, i)?,
                    time_ids: rows(&a.time_ids, i)?,
                }),
                None => None,
            };
            preds.push(self.unet.forward(
                &rows(input, i)?,
                t as f64,
                &rows(context, i)?,
                added_i.as_ref(),
            )?);
        }
        // Back to [half 0: images 1..B, half 1: images 1..B].
        let mut parts = Vec::with_capacity(batch * halves);
        for h in 0..halves {
            for p in &preds {
                parts.push(p.narrow(0, h, 1)?);
            }
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Stacks per-image conditionings (each [negative, positive] with CFG, else [positive]) into
/// one batch: [negative 1..B, positive 1..B] with CFG, else [positive 1..B].
pub fn stack_conditioning(conds: &[Conditioning], cfg: bool) -> Result<Conditioning> {
    let first = conds.first().context("an empty batch")?;
    let stack = |get: &dyn Fn(&Conditioning) -> Option<&Tensor>| -> Result<Option<Tensor>> {
        if get(first).is_none() {
            return Ok(None);
        }
        let mut parts = Vec::new();
        let halves: &[usize] = if cfg { &[0, 1] } else { &[0] };
        for &h in halves {
            for c in conds {
                let t = get(c).context("internal error: a batch mixes model families")?;
                parts.push(t.narrow(0, h, 1)?);
            }
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    };
    Ok(Conditioning {
        context: stack(&|c| Some(&c.context))?.expect("context is always there"),
        pooled: stack(&|c| c.pooled.as_ref())?,
        micro: first.micro,
        warnings: conds.iter().flat_map(|c| c.warnings.clone()).collect(),
    })
}

/// A NaN or Inf is an error that names the stage, never a black image.
pub fn check_finite(t: &Tensor, stage: &str) -> Result<()> {
    let s: f32 = t.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar()?;
    if !s.is_finite() {
        // The sum can overflow on huge but finite values; look closer before failing.
        let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
            bail!("{bad} in the {stage}: the computation diverged (try --dtype f32)");
        }
    }
    Ok(())
}
