//! Text-to-image with classifier-free guidance and DDIM, as diffusers' StableDiffusionPipeline
//! computes it. One loop serves every model family; families differ only in conditioning.

use crate::models::builtin;
use crate::models::clip::{ClipTextModel, HiddenLayer};
use crate::models::config::{
    ClipTextConfig, ModelIndex, SchedulerConfig, UNetConfig, VaeConfig, read_json,
};
use crate::models::hub::ModelFolder;
use crate::models::lora::{LoraReport, LoraSet, LoraSpec, Target};
use crate::models::single_file::{self, SingleFile, full_clip_tokenizer};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{AddedCond, UNet};
use crate::models::vae::{self, Vae};
use crate::models::weights::{TensorSource, WeightFile, WeightPatch, source_var_builder};
use crate::rng::RngKind;
use crate::scheduler::Ddim;
use crate::tkg::{self, ShiftReport, TkgSettings};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
        tower: Box<TextTower>,
        layer: HiddenLayer,
    },
    /// SDXL: CLIP-L and OpenCLIP-bigG penultimate states, concatenated; pooled text
    /// embedding from the second encoder's projection.
    Sdxl {
        towers: Box<[TextTower; 2]>,
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
    /// The file the `Model hash` is computed over: the UNet weights of a folder, or the
    /// single-file checkpoint.
    pub unet_weights: std::path::PathBuf,
    /// What each LoRA matched (empty without LoRAs).
    pub lora_reports: Vec<LoraReport>,
    /// `(name, hash)` per LoRA, for A1111's `Lora hashes` (see [`Self::lora_hashes_text`]).
    pub lora_hashes: Vec<(String, String)>,
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

/// Where a model's weights, configs and tokenizers come from.
#[derive(Debug, Clone, Copy)]
pub enum ModelSource<'a> {
    /// A diffusers-layout folder (local or a Hub repo).
    Folder(&'a ModelFolder),
    /// A single-file (A1111 / ComfyUI) checkpoint. Configs and tokenizers come from the
    /// built-in architecture of its family (the real SD1.5 / SDXL configs, full CLIP
    /// vocabulary), or from `config`, a diffusers folder, when given.
    File {
        path: &'a Path,
        config: Option<&'a ModelFolder>,
    },
}

/// A VAE to use instead of the model's own.
#[derive(Debug)]
pub enum VaeSource {
    /// A diffusers VAE: a model folder with `vae/`, or a VAE-only folder/repo
    /// (`config.json` + `diffusion_pytorch_model.safetensors`).
    Folder(ModelFolder),
    /// One safetensors file, diffusers or LDM names; the config is the model's.
    File(PathBuf),
}

/// What is loaded on top of a model: LoRAs, another VAE.
#[derive(Debug, Default)]
pub struct Adapters {
    /// Merged into the weights as they load; several add up.
    pub loras: Vec<LoraSpec>,
    /// Any LoRA tensor that matches no weight is an error (else it is reported).
    pub lora_strict: bool,
    pub vae: Option<VaeSource>,
}

/// The configs of a model, wherever they came from.
struct Configs {
    family: Family,
    unet: UNetConfig,
    vae: VaeConfig,
    /// One per text encoder, with its tokenizer.
    towers: Vec<(ClipTokenizer, ClipTextConfig)>,
    scheduler: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
}

/// Where the component weights are read.
enum WeightsFrom<'a> {
    Folder(&'a ModelFolder),
    Single(&'a SingleFile),
}

fn tokenizer_from_folder(folder: &ModelFolder, suffix: &str) -> Result<ClipTokenizer> {
    let tok = format!("tokenizer{suffix}");
    let tok_file = folder
        .file(&format!("{tok}/vocab.json"))
        .or_else(|_| folder.file(&format!("{tok}/tokenizer.json")))?;
    // Fetch the side files a Hub folder needs before reading it.
    for extra in [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        let _ = folder.optional_file(&format!("{tok}/{extra}"))?;
    }
    ClipTokenizer::from_dir(tok_file.parent().expect("file has a folder"))
        .with_context(|| format!("loading {tok}"))
}

impl Configs {
    /// A diffusers folder's configs and tokenizers.
    fn from_folder(folder: &ModelFolder) -> Result<Self> {
        let family = detect_family(folder)?;
        let index: Option<ModelIndex> = match folder.optional_file("model_index.json")? {
            Some(p) => Some(read_json(&p)?),
            None => None,
        };
        let suffixes: &[&str] = match family {
            Family::Sd15 => &[""],
            Family::Sdxl => &["", "_2"],
        };
        let towers = suffixes
            .iter()
            .map(|s| -> Result<_> {
                let cfg: ClipTextConfig =
                    read_json(&folder.file(&format!("text_encoder{s}/config.json"))?)?;
                Ok((tokenizer_from_folder(folder, s)?, cfg))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            family,
            unet: read_json(&folder.file("unet/config.json")?)?,
            vae: read_json(&folder.file("vae/config.json")?)?,
            towers,
            scheduler: read_json(&folder.file("scheduler/scheduler_config.json")?)?,
            force_zeros_for_empty_prompt: index
                .as_ref()
                .and_then(|i| i.force_zeros_for_empty_prompt)
                .unwrap_or(true),
        })
    }

    /// The built-in architecture of a family (the real SD1.5 / SDXL base configs).
    fn builtin(family: Family) -> Result<Self> {
        let arch = builtin::architecture(match family {
            Family::Sd15 => "random-sd15",
            Family::Sdxl => "random-sdxl",
        })?;
        let towers = arch
            .text_encoders
            .into_iter()
            .enumerate()
            .map(|(i, v)| -> Result<_> {
                let pad = if i == 0 { "<|endoftext|>" } else { "!" };
                Ok((full_clip_tokenizer(pad)?, serde_json::from_value(v)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            family,
            unet: serde_json::from_value(arch.unet)?,
            vae: serde_json::from_value(arch.vae)?,
            towers,
            scheduler: serde_json::from_value(arch.scheduler)?,
            force_zeros_for_empty_prompt: true,
        })
    }
}

/// Builds one text tower; returns it and its width.
fn build_tower(
    tokenizer: ClipTokenizer,
    cfg: &ClipTextConfig,
    what: &str,
    source: Arc<dyn TensorSource>,
    patch: Option<Arc<dyn WeightPatch>>,
    opts: &LoadOptions,
) -> Result<(TextTower, usize)> {
    ensure!(
        tokenizer.vocab_size() <= cfg.vocab_size,
        "the tokenizer of {what} has {} tokens but {what} only {}",
        tokenizer.vocab_size(),
        cfg.vocab_size
    );
    let encoder = ClipTextModel::load(
        source_var_builder(source, patch, opts.dtype, &opts.device),
        cfg,
    )
    .with_context(|| format!("loading {what}"))?;
    Ok((TextTower { tokenizer, encoder }, cfg.hidden_size))
}

/// Tensors a checkpoint may carry that no network reads.
fn ignorable(name: &str) -> bool {
    name.ends_with("position_ids")
}

/// Builds a component from `{component}/{names}.safetensors` of a folder, with `patch`
/// applied as the weights are read; every tensor of the file must be used.
fn load_component<T>(
    folder: &ModelFolder,
    component: &str,
    weight_names: &[&str],
    opts: &LoadOptions,
    patch: Option<Arc<dyn WeightPatch>>,
    build: impl FnOnce(candle_nn::VarBuilder) -> Result<T>,
) -> Result<(T, PathBuf)> {
    let prefer_fp16 = opts.dtype == DType::F16;
    let path = folder.weights(component, weight_names, prefer_fp16)?;
    let file = WeightFile::open(&path)?;
    let model = build(source_var_builder(
        file.clone(),
        patch,
        opts.dtype,
        &opts.device,
    ))
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
        Self::load_with(ModelSource::Folder(folder), opts, &Adapters::default())
    }

    /// Loads a model from a folder or a single file, with LoRAs merged into its weights as
    /// they are read and, optionally, another VAE.
    pub fn load_with(source: ModelSource, opts: &LoadOptions, adapters: &Adapters) -> Result<Self> {
        let start = Instant::now();
        ensure!(
            !(opts.device.is_cpu() && opts.dtype == DType::BF16),
            "--dtype bf16 is not available on the CPU (candle has no CPU bf16 matmul); use f32 \
             (the default on the CPU) or f16"
        );
        let single = match source {
            ModelSource::File { path, .. } => Some(SingleFile::open(path)?),
            ModelSource::Folder(_) => None,
        };
        let (cfg, weights) = match (source, &single) {
            (ModelSource::Folder(f), _) => (Configs::from_folder(f)?, WeightsFrom::Folder(f)),
            (ModelSource::File { config, path }, Some(s)) => {
                let cfg = match config {
                    Some(f) => Configs::from_folder(f)?,
                    None => Configs::builtin(s.family)?,
                };
                ensure!(
                    cfg.family == s.family,
                    "{} is an {} checkpoint but its config folder is {}",
                    path.display(),
                    s.family,
                    cfg.family
                );
                (cfg, WeightsFrom::Single(s))
            }
            (ModelSource::File { .. }, None) => unreachable!("opened above"),
        };
        let family = cfg.family;
        let loras = LoraSet::open(&adapters.loras)?;
        loras.check_family(family, cfg.unet.cross_dim())?;

        // Text encoders.
        let targets = [Target::TextEncoder, Target::TextEncoder2];
        let mut towers = Vec::new();
        let mut text_width = 0;
        for (i, (tokenizer, te_cfg)) in cfg.towers.into_iter().enumerate() {
            let what = if i == 0 {
                "text_encoder".to_string()
            } else {
                format!("text_encoder_{}", i + 1)
            };
            let patch = loras.patch(targets[i.min(1)], None);
            let (tower, width) = match &weights {
                WeightsFrom::Folder(f) => {
                    let (tower, _) = load_component(f, &what, &["model"], opts, patch, |vb| {
                        ClipTextModel::load(vb, &te_cfg)
                    })?;
                    ensure!(
                        tokenizer.vocab_size() <= te_cfg.vocab_size,
                        "the tokenizer of {what} has {} tokens but {what} only {}",
                        tokenizer.vocab_size(),
                        te_cfg.vocab_size
                    );
                    (
                        TextTower {
                            tokenizer,
                            encoder: tower,
                        },
                        te_cfg.hidden_size,
                    )
                }
                WeightsFrom::Single(s) => {
                    build_tower(tokenizer, &te_cfg, &what, s.text_encoder(i), patch, opts)?
                }
            };
            text_width += width;
            towers.push(tower);
        }
        let unet_cfg = cfg.unet;
        let conditioner = match family {
            Family::Sd15 => {
                let layer = match opts.clip_skip {
                    None | Some(1) => HiddenLayer::LastNormed,
                    Some(n) => HiddenLayer::SkipNormed(n),
                };
                Conditioner::Sd15 {
                    tower: Box::new(
                        towers
                            .pop()
                            .context("an SD1.x model has one text encoder")?,
                    ),
                    layer,
                }
            }
            Family::Sdxl => {
                let t2 = towers.pop().context("SDXL has two text encoders")?;
                let t1 = towers.pop().context("SDXL has two text encoders")?;
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
                Conditioner::Sdxl {
                    towers: Box::new([t1, t2]),
                    // diffusers: hidden_states[-(clip_skip + 2)], no final norm.
                    layer: HiddenLayer::Unnormed(opts.clip_skip.unwrap_or(0) + 2),
                    force_zeros_for_empty_prompt: cfg.force_zeros_for_empty_prompt,
                }
            }
        };
        ensure!(
            unet_cfg.cross_dim() == text_width,
            "the UNet expects {}-wide text embeddings but the text encoder(s) make {}",
            unet_cfg.cross_dim(),
            text_width
        );

        // UNet.
        let unet_patch = loras.patch(Target::Unet, Some(&unet_cfg));
        let (unet, unet_weights) = match &weights {
            WeightsFrom::Folder(f) => load_component(
                f,
                "unet",
                &["diffusion_pytorch_model"],
                opts,
                unet_patch,
                |vb| UNet::load(vb, &unet_cfg),
            )?,
            WeightsFrom::Single(s) => {
                let vb =
                    source_var_builder(s.unet(&unet_cfg), unet_patch, opts.dtype, &opts.device);
                let unet = UNet::load(vb, &unet_cfg).with_context(|| {
                    format!("loading the UNet from {}", s.file.path().display())
                })?;
                (unet, s.file.path().to_path_buf())
            }
        };
        ensure!(
            (family == Family::Sdxl) == unet.needs_added_cond(),
            "the UNet's addition_embed_type does not fit a {family} model"
        );

        // VAE: --vae, else the model's own.
        let vae_cfg = match &adapters.vae {
            Some(VaeSource::Folder(f)) => match f.optional_file("vae/config.json")? {
                Some(p) => read_json(&p)?,
                None => read_json(&f.file("config.json")?)?,
            },
            _ => cfg.vae,
        };
        ensure!(
            vae_cfg.latent_channels == unet_cfg.in_channels,
            "the VAE has {} latent channels but the UNet takes {}",
            vae_cfg.latent_channels,
            unet_cfg.in_channels
        );
        let vae_dtype = if vae_cfg.force_upcast {
            DType::F32
        } else {
            opts.dtype
        };
        let vae_opts = LoadOptions {
            dtype: vae_dtype,
            ..opts.clone()
        };
        let build_vae = |vb: candle_nn::VarBuilder| Vae::load(vb, &vae_cfg);
        let levels = vae_cfg.block_out_channels.len();
        let vae = match (&adapters.vae, &weights) {
            (Some(VaeSource::Folder(f)), _) => {
                let comp = if f.optional_file("vae/config.json")?.is_some() {
                    "vae"
                } else {
                    ""
                };
                load_component(
                    f,
                    comp,
                    &["diffusion_pytorch_model"],
                    &vae_opts,
                    None,
                    build_vae,
                )?
                .0
            }
            (Some(VaeSource::File(p)), _) => {
                let (file, src, prefix) = single_file::vae_file(p, levels)?;
                let vae = build_vae(source_var_builder(src, None, vae_dtype, &opts.device))
                    .with_context(|| format!("loading the VAE from {}", p.display()))?;
                file.ensure_all_used(|n| {
                    single_file::ignorable(n) || !n.starts_with(prefix.as_str())
                })?;
                vae
            }
            (None, WeightsFrom::Folder(f)) => {
                load_component(
                    f,
                    "vae",
                    &["diffusion_pytorch_model"],
                    &vae_opts,
                    None,
                    build_vae,
                )?
                .0
            }
            (None, WeightsFrom::Single(s)) => {
                ensure!(
                    s.has_vae(),
                    "{} has no VAE (first_stage_model.*): name one with --vae",
                    s.file.path().display()
                );
                build_vae(source_var_builder(
                    s.vae(levels),
                    None,
                    vae_dtype,
                    &opts.device,
                ))
                .with_context(|| format!("loading the VAE from {}", s.file.path().display()))?
            }
        };
        if let Some(s) = &single {
            s.ensure_all_used(adapters.vae.is_some())?;
        }
        let lora_reports = loras.finish(adapters.lora_strict)?;
        let lora_hashes = loras.hashes()?;
        Ok(Self {
            family,
            conditioner,
            unet,
            vae,
            vae_dtype,
            scheduler: cfg.scheduler,
            device: opts.device.clone(),
            dtype: opts.dtype,
            unet_weights,
            lora_reports,
            lora_hashes,
            load_time: start.elapsed(),
        })
    }

    /// A1111's `Model hash`: the first 10 hex digits of the sha256 of
    /// [`Self::unet_weights`] (the single file, for a single-file checkpoint); cached.
    pub fn model_hash(&self) -> Result<String> {
        crate::models::hub::file_sha256_short(&self.unet_weights)
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

    /// Checks a request's size, steps and guidance before any work.
    fn check_request(&self, req: &Request) -> Result<()> {
        self.check_size(req.width, req.height)?;
        ensure!(req.steps > 0, "--steps must be at least 1");
        ensure!(
            req.guidance.is_finite() && req.guidance >= 0.0,
            "--guidance must be a non-negative number"
        );
        Ok(())
    }

    /// Checks a size before any work: it must be a positive multiple of what the UNet needs.
    pub fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let f = self.vae_factor();
        ensure!(
            width > 0 && height > 0 && width.is_multiple_of(f) && height.is_multiple_of(f),
            "--width and --height must be positive multiples of {f} (the VAE's factor); got {width}x{height}"
        );
        Ok(())
    }

    /// Encodes prompts into the denoiser's conditioning ([negative, positive] with CFG).
    pub fn encode_prompt(&self, prompt: &str, negative: &str, cfg: bool) -> Result<Conditioning> {
        // `<lora:NAME:W>` tags choose LoRAs at load time; they are not text to encode.
        let (prompt, negative) = (
            crate::models::lora::strip_tags(prompt),
            crate::models::lora::strip_tags(negative),
        );
        let (prompt, negative) = (prompt.as_str(), negative.as_str());
        let mut warnings = Vec::new();
        let texts: Vec<&str> = if cfg {
            vec![negative, prompt]
        } else {
            vec![prompt]
        };
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
            let pred = self
                .unet
                .forward(&input, t as f64, &context, added.as_ref())?;
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
        let mut cond = self.encode_prompt(&req.prompt, &req.negative_prompt, req.guidance > 1.0)?;
        cond.micro = req.micro;
        let t1 = Instant::now();
        let (noise, init, shift) = self.initial_latents_with(req, rng)?;
        let final_latents = self.denoise_checked(&init, &cond, req.steps, req.guidance, control)?;
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
    /// Makes several images. Every request must share size, steps, guidance and SDXL
    /// micro-conditioning. `control` gets the batch's mean step (rounded down) after each
    /// image's step, so the same value can come more than once; an error from it stops every
    /// image.
    ///
    /// On the CPU each image runs [`Self::generate_with`] on a core of its own, so its bits
    /// are those of the image alone: one fused UNet call would change gemm's blocking and so
    /// the last bits (`TKG_FUSED_CPU_BATCH=1` fuses anyway, to measure that). Elsewhere the B
    /// images share one UNet call per step; each image's prompt encoding, noise, TKG init and
    /// VAE decode are still computed on their own.
    pub fn generate_batch(
        &self,
        reqs: &[Request],
        rng: RngKind,
        control: &mut (dyn FnMut(usize, usize) -> Result<()> + Send),
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
        self.check_request(first)?;
        let fused_cpu = std::env::var_os("TKG_FUSED_CPU_BATCH").is_some_and(|v| v == "1");
        if reqs.len() == 1 || (self.device.is_cpu() && !fused_cpu) {
            let gate = StepGate::new(reqs.len(), control);
            let made = self.per_image(reqs.len(), |i| {
                self.generate_with(&reqs[i], rng, &mut |step, steps| gate.step(i, step, steps))
            });
            return gate.result(made);
        }
        let cfg = first.guidance > 1.0;
        let encoded = self.per_image(reqs.len(), |i| {
            let r = &reqs[i];
            let t0 = Instant::now();
            let mut cond = self.encode_prompt(&r.prompt, &r.negative_prompt, cfg)?;
            cond.micro = r.micro;
            Ok((cond, t0.elapsed(), self.initial_latents_with(r, rng)?))
        })?;
        let mut conds = Vec::with_capacity(reqs.len());
        let mut text_times = Vec::with_capacity(reqs.len());
        let mut inits = Vec::with_capacity(reqs.len());
        for (cond, time, init) in encoded {
            conds.push(cond);
            text_times.push(time);
            inits.push(init);
        }
        let t1 = Instant::now();
        let cond = stack_conditioning(&conds, cfg)?;
        let init_refs: Vec<&Tensor> = inits.iter().map(|(_, i, _)| i).collect();
        let init = Tensor::cat(&init_refs, 0)?;
        let final_latents =
            self.denoise_checked(&init, &cond, first.steps, first.guidance, control)?;
        let denoise = t1.elapsed() / reqs.len() as u32;
        let decoded = self.per_image(reqs.len(), |i| {
            let t2 = Instant::now();
            let latents = final_latents.narrow(0, i, 1)?;
            let rgb = self.decode(&latents)?;
            Ok((latents, rgb, t2.elapsed()))
        })?;
        let mut out = Vec::with_capacity(reqs.len());
        let parts = reqs.iter().zip(conds).zip(inits).zip(decoded);
        for (i, (((r, c), (noise, init, shift)), (latents, rgb, decode))) in parts.enumerate() {
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
                    decode,
                },
            });
        }
        Ok(out)
    }

    /// `f(0..n)`, side by side on the CPU's cores (each image's arithmetic is the same as
    /// alone; small models leave cores idle inside one image), in order on other devices.
    /// With at least one image per core, each image's kernels run in order on its core.
    fn per_image<T: Send>(
        &self,
        n: usize,
        f: impl Fn(usize) -> Result<T> + Sync + Send,
    ) -> Result<Vec<T>> {
        if self.device.is_cpu() {
            let core_each = n >= rayon::current_num_threads();
            (0..n)
                .into_par_iter()
                .map(|i| {
                    if core_each {
                        crate::kernels::in_order(|| f(i))
                    } else {
                        f(i)
                    }
                })
                .collect()
        } else {
            (0..n).map(f).collect()
        }
    }
}

/// Shares one step callback between the images of a batch running side by side: it runs
/// after every image's step (so an interrupt is seen within one step) with the batch's mean
/// step, and its first error stops every image.
struct StepGate<'a> {
    state: std::sync::Mutex<GateState<'a>>,
}

struct GateState<'a> {
    done: Vec<usize>,
    control: &'a mut (dyn FnMut(usize, usize) -> Result<()> + Send),
    stopped: Option<anyhow::Error>,
}

/// What the other images of a stopped batch return; [`StepGate::result`] swaps it for the
/// callback's own error.
#[derive(Debug)]
struct BatchStopped;

impl std::fmt::Display for BatchStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the batch was stopped")
    }
}

impl std::error::Error for BatchStopped {}

impl<'a> StepGate<'a> {
    fn new(images: usize, control: &'a mut (dyn FnMut(usize, usize) -> Result<()> + Send)) -> Self {
        Self {
            state: std::sync::Mutex::new(GateState {
                done: vec![0; images],
                control,
                stopped: None,
            }),
        }
    }

    /// Image `image` finished `step` of `steps`.
    fn step(&self, image: usize, step: usize, steps: usize) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.stopped.is_some() {
            return Err(BatchStopped.into());
        }
        s.done[image] = step;
        let mean = s.done.iter().sum::<usize>() / s.done.len();
        if let Err(e) = (s.control)(mean, steps) {
            s.stopped = Some(e);
            return Err(BatchStopped.into());
        }
        Ok(())
    }

    /// The batch's outcome: the callback's error when it stopped the batch.
    fn result<T>(self, made: Result<T>) -> Result<T> {
        let stopped = self
            .state
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .stopped;
        match (made, stopped) {
            (Err(_), Some(e)) => Err(e),
            (made, _) => made,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_gate_reports_the_mean_step_and_stops_every_image() {
        let mut seen = Vec::new();
        let mut control = |i: usize, n: usize| -> Result<()> {
            seen.push((i, n));
            if i == 2 {
                bail!("interrupted");
            }
            Ok(())
        };
        let gate = StepGate::new(2, &mut control);
        gate.step(0, 1, 4).unwrap();
        gate.step(0, 2, 4).unwrap();
        gate.step(1, 1, 4).unwrap();
        gate.step(1, 2, 4).unwrap_err(); // mean 2: the callback stops the batch
        let other = gate.step(0, 3, 4).unwrap_err();
        assert!(other.is::<BatchStopped>());
        let err = gate.result::<()>(Err(other)).unwrap_err();
        assert_eq!(err.to_string(), "interrupted");
        assert_eq!(seen, [(0, 4), (1, 4), (1, 4), (2, 4)]);
    }
}
