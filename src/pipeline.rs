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
}

/// What the denoiser is conditioned on, for [negative, positive] (CFG) or [positive].
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// [rows, tokens, dim]
    pub context: Tensor,
    pub added: Option<AddedCond>,
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
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
    /// The UNet weights file (for the model hash).
    pub unet_weights: std::path::PathBuf,
    pub load_time: Duration,
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
        if let Some(p) = folder.optional_file("model_index.json")? {
            let _: ModelIndex = read_json(&p)?;
        }
        let family = detect_family(folder)?;
        if family == Family::Sdxl {
            bail!(
                "{} is an SDXL model; SDXL is not supported yet",
                folder.describe()
            );
        }
        let text_cfg: ClipTextConfig = read_json(&folder.file("text_encoder/config.json")?)?;
        let tokenizer_dir = folder
            .file("tokenizer/vocab.json")
            .or_else(|_| folder.file("tokenizer/tokenizer.json"))?;
        let tokenizer = ClipTokenizer::from_dir(tokenizer_dir.parent().expect("file has a folder"))
            .context("loading the tokenizer")?;
        ensure!(
            tokenizer.vocab_size() <= text_cfg.vocab_size,
            "the tokenizer has {} tokens but the text encoder only {}",
            tokenizer.vocab_size(),
            text_cfg.vocab_size
        );
        let (encoder, _) = load_component(folder, "text_encoder", &["model"], opts, |vb| {
            ClipTextModel::load(vb, &text_cfg)
        })?;
        let layer = match opts.clip_skip {
            None | Some(1) => HiddenLayer::LastNormed,
            Some(n) => HiddenLayer::SkipNormed(n),
        };
        let unet_cfg: UNetConfig = read_json(&folder.file("unet/config.json")?)?;
        ensure!(
            unet_cfg.cross_dim() == text_cfg.hidden_size,
            "the UNet expects {}-wide text embeddings but the text encoder makes {}",
            unet_cfg.cross_dim(),
            text_cfg.hidden_size
        );
        let (unet, unet_weights) =
            load_component(folder, "unet", &["diffusion_pytorch_model"], opts, |vb| {
                UNet::load(vb, &unet_cfg)
            })?;
        let vae_cfg: VaeConfig = read_json(&folder.file("vae/config.json")?)?;
        ensure!(
            vae_cfg.latent_channels == unet_cfg.in_channels,
            "the VAE has {} latent channels but the UNet takes {}",
            vae_cfg.latent_channels,
            unet_cfg.in_channels
        );
        let (vae, _) = load_component(folder, "vae", &["diffusion_pytorch_model"], opts, |vb| {
            Vae::load(vb, &vae_cfg)
        })?;
        let scheduler: SchedulerConfig =
            read_json(&folder.file("scheduler/scheduler_config.json")?)?;
        Ok(Self {
            family,
            conditioner: Conditioner::Sd15 {
                tower: TextTower { tokenizer, encoder },
                layer,
            },
            unet,
            vae,
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
        match &self.conditioner {
            Conditioner::Sd15 { tower, layer } => {
                let texts: Vec<&str> = if cfg {
                    vec![negative, prompt]
                } else {
                    vec![prompt]
                };
                let mut ids = Vec::new();
                for t in &texts {
                    let enc = tower.tokenizer.encode(t)?;
                    if enc.truncated
                        && let Some(removed) = tower.tokenizer.removed_text(t)?
                    {
                        warnings.push(format!(
                            "the prompt is longer than {} tokens; this part was dropped: \"{removed}\"",
                            tower.tokenizer.max_length()
                        ));
                    }
                    ids.push(Tensor::new(enc.ids.as_slice(), &self.device)?);
                }
                let ids = Tensor::stack(&ids, 0)?;
                let out = tower.encoder.forward(&ids, *layer)?;
                check_finite(&out.hidden, "text encoder output")?;
                Ok(Conditioning {
                    context: out.hidden,
                    added: None,
                    warnings,
                })
            }
        }
    }

    /// Draws the noise for `seed` and shapes the initial latents.
    pub fn initial_latents(&self, req: &Request) -> Result<(Tensor, Tensor, Option<ShiftReport>)> {
        let f = self.vae_factor();
        let (h, w) = (req.height / f, req.width / f);
        let c = self.unet.config.in_channels;
        let noise = crate::rng::torch_cpu_randn(req.seed, c * h * w);
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
        let scheduler = Ddim::new(&self.scheduler, steps)?;
        let cfg = guidance > 1.0;
        let mut latents =
            (init.to_device(&self.device)?.to_dtype(self.dtype)? * scheduler.init_noise_sigma())?;
        let context = cond.context.to_dtype(self.dtype)?;
        let total = scheduler.timesteps().len();
        for (i, &t) in scheduler.timesteps().iter().enumerate() {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let pred = self
                .unet
                .forward(&input, t as f64, &context, cond.added.as_ref())?;
            let pred = if cfg {
                let uncond = pred.narrow(0, 0, 1)?;
                let text = pred.narrow(0, 1, 1)?;
                (&uncond + ((text - &uncond)? * guidance)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, t, &latents)?;
            check_finite(&latents, &format!("latents after denoising step {}", i + 1))?;
            progress(i + 1, total);
        }
        Ok(latents.to_dtype(DType::F32)?)
    }

    /// Decodes final latents into RGB8 pixels.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<u8>> {
        let image = self
            .vae
            .decode(&latents.to_device(&self.device)?.to_dtype(self.dtype)?)?;
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
        let cond = self.encode_prompt(&req.prompt, &req.negative_prompt, req.guidance > 1.0)?;
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
