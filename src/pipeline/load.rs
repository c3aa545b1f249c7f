//! Loading a pipeline: configs from a diffusers folder (or a family's built-in architecture),
//! then each component's weights from a [`ComponentSource`] — a folder, a single-file
//! checkpoint, or a VAE file — with LoRAs merged in as the weights are read.

use super::conditioning::{Conditioner, TextTower};
use super::{Family, LoadOptions, Pipeline};
use crate::kernels::matmul::{Precision, bf16_native};
use crate::models::builtin;
use crate::models::clip::{ClipTextModel, HiddenLayer};
use crate::models::config::{
    ClipTextConfig, ModelIndex, SchedulerConfig, UNetConfig, VaeConfig, read_json,
};
use crate::models::hub::ModelFolder;
use crate::models::lora::{LoraSet, LoraSpec, Target};
use crate::models::single_file::{self, SingleFile, full_clip_tokenizer};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::UNet;
use crate::models::vae::Vae;
use crate::models::weights::{
    TensorSource, WeightFile, WeightPatch, WeightStorage, source_var_builder,
};
use anyhow::{Context, Result, bail, ensure};
use candle_core::DType;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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
    /// One per text encoder present, with its tokenizer and its index among the family's
    /// (0: `text_encoder`, 1: `text_encoder_2`).
    towers: Vec<(usize, ClipTokenizer, ClipTextConfig)>,
    scheduler: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
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
        // A tower the pipeline marks absent is skipped (the SDXL refiner has no CLIP-L).
        let towers = family
            .spec()
            .tower_suffixes
            .iter()
            .enumerate()
            .filter(|(i, _)| !index.as_ref().is_some_and(|x| x.lacks(&tower_name(*i))))
            .map(|(i, s)| -> Result<_> {
                let cfg: ClipTextConfig =
                    read_json(&folder.file(&format!("text_encoder{s}/config.json"))?)?;
                Ok((i, tokenizer_from_folder(folder, s)?, cfg))
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
        let spec = family.spec();
        let arch = builtin::architecture(spec.builtin_architecture)?;
        let towers = arch
            .text_encoders
            .into_iter()
            .zip(spec.tower_pads)
            .enumerate()
            .map(|(i, (v, pad))| -> Result<_> {
                Ok((i, full_clip_tokenizer(pad)?, serde_json::from_value(v)?))
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

/// One component's tensors.
struct Component {
    tensors: Arc<dyn TensorSource>,
    /// The file they are read from, for errors and the model hash.
    path: PathBuf,
    /// Fails when the file holds tensors the network did not read (run once it is built);
    /// `None` when the source checks its whole file in [`ComponentSource::finish`].
    unused_check: Option<Box<dyn FnOnce() -> Result<()>>>,
}

impl Component {
    /// Builds the network of component `what` from these tensors, with `patch` applied as
    /// they are read, then checks that every tensor was used.
    fn build<T>(
        self,
        what: &str,
        patch: Option<Arc<dyn WeightPatch>>,
        opts: &LoadOptions,
        build: impl FnOnce(candle_nn::VarBuilder) -> Result<T>,
    ) -> Result<T> {
        let vb = source_var_builder(self.tensors, patch, opts.dtype, opts.weights, &opts.device);
        let model =
            build(vb).with_context(|| format!("loading {what} from {}", self.path.display()))?;
        if let Some(check) = self.unused_check {
            check()?;
        }
        Ok(model)
    }
}

/// The weights of a model's components.
trait ComponentSource {
    /// Text encoder `index` (0: `text_encoder`, 1: `text_encoder_2`).
    fn text_encoder(&self, index: usize, opts: &LoadOptions) -> Result<Component>;
    fn unet(&self, cfg: &UNetConfig, opts: &LoadOptions) -> Result<Component>;
    fn vae(&self, cfg: &VaeConfig, opts: &LoadOptions) -> Result<Component>;
    /// Checks over the whole source once every component is built; `vae_replaced` when
    /// another source gave the VAE.
    fn finish(&self, vae_replaced: bool) -> Result<()>;
}

/// Tensors a checkpoint may carry that no network reads.
fn ignorable(name: &str) -> bool {
    name.ends_with("position_ids")
}

/// A diffusers folder: `{component}/{name}.safetensors`, each file used up.
struct FolderComponents<'a> {
    folder: &'a ModelFolder,
    /// Where the VAE lives: `vae`, or the root of a VAE-only folder.
    vae_dir: &'static str,
}

impl FolderComponents<'_> {
    fn component(&self, dir: &str, name: &str, opts: &LoadOptions) -> Result<Component> {
        // 16-bit files are what f16 compute or f16 weights want (bf16 weights round from either).
        let prefer_fp16 = opts.fp16_files
            && (opts.dtype == DType::F16
                || (opts.dtype == DType::F32 && opts.weights == WeightStorage::F16));
        let path = self.folder.weights(dir, &[name], prefer_fp16)?;
        let file = WeightFile::open(&path)?;
        Ok(Component {
            tensors: file.clone(),
            path,
            unused_check: Some(Box::new(move || file.ensure_all_used(ignorable))),
        })
    }
}

impl ComponentSource for FolderComponents<'_> {
    fn text_encoder(&self, index: usize, opts: &LoadOptions) -> Result<Component> {
        self.component(&tower_name(index), "model", opts)
    }
    fn unet(&self, _: &UNetConfig, opts: &LoadOptions) -> Result<Component> {
        self.component("unet", "diffusion_pytorch_model", opts)
    }
    fn vae(&self, _: &VaeConfig, opts: &LoadOptions) -> Result<Component> {
        self.component(self.vae_dir, "diffusion_pytorch_model", opts)
    }
    fn finish(&self, _: bool) -> Result<()> {
        Ok(())
    }
}

/// A single-file checkpoint: every component from one file, which must be used up.
impl ComponentSource for SingleFile {
    fn text_encoder(&self, index: usize, _: &LoadOptions) -> Result<Component> {
        Ok(self.whole_file(self.text_encoder(index)))
    }
    fn unet(&self, cfg: &UNetConfig, _: &LoadOptions) -> Result<Component> {
        Ok(self.whole_file(SingleFile::unet(self, cfg)))
    }
    fn vae(&self, cfg: &VaeConfig, _: &LoadOptions) -> Result<Component> {
        ensure!(
            self.has_vae(),
            "{} has no VAE (first_stage_model.*): name one with --vae",
            self.file.path().display()
        );
        Ok(self.whole_file(SingleFile::vae(self, cfg.block_out_channels.len())))
    }
    fn finish(&self, vae_replaced: bool) -> Result<()> {
        self.ensure_all_used(vae_replaced)
    }
}

impl SingleFile {
    fn whole_file(&self, tensors: Arc<dyn TensorSource>) -> Component {
        Component {
            tensors,
            path: self.file.path().to_path_buf(),
            unused_check: None,
        }
    }
}

/// One VAE file (diffusers or LDM names), with the model's VAE config.
struct VaeFile<'a>(&'a Path);

impl ComponentSource for VaeFile<'_> {
    fn text_encoder(&self, _: usize, _: &LoadOptions) -> Result<Component> {
        bail!("internal error: a VAE file has no text encoder")
    }
    fn unet(&self, _: &UNetConfig, _: &LoadOptions) -> Result<Component> {
        bail!("internal error: a VAE file has no UNet")
    }
    fn vae(&self, cfg: &VaeConfig, _: &LoadOptions) -> Result<Component> {
        let (file, tensors, prefix) = single_file::vae_file(self.0, cfg.block_out_channels.len())?;
        Ok(Component {
            tensors,
            path: self.0.to_path_buf(),
            unused_check: Some(Box::new(move || {
                file.ensure_all_used(|n| {
                    single_file::ignorable(n) || !n.starts_with(prefix.as_str())
                })
            })),
        })
    }
    fn finish(&self, _: bool) -> Result<()> {
        Ok(())
    }
}

/// How `opts` runs on its device. `--dtype bf16` on the CPU becomes f32 tensors with bf16
/// products (candle has no CPU bf16 matmul, and f32 activations lose nothing); weights are
/// kept as `--weights-dtype` says. CPUs without AVX-512 BF16 are refused: the emulation there
/// is slower than f32.
fn cpu_products(opts: &LoadOptions) -> Result<(LoadOptions, Precision)> {
    if !(opts.device.is_cpu() && opts.dtype == DType::BF16) {
        return Ok((opts.clone(), Precision::F32));
    }
    ensure!(
        bf16_native(),
        "--dtype bf16 on the CPU needs AVX-512 BF16 (e.g. AMD Zen 4, Intel Sapphire Rapids), \
         which this CPU lacks; use f32 (the default on the CPU)"
    );
    let opts = LoadOptions {
        dtype: DType::F32,
        ..opts.clone()
    };
    Ok((opts, Precision::Bf16))
}

fn tower_name(index: usize) -> String {
    if index == 0 {
        "text_encoder".to_string()
    } else {
        format!("text_encoder_{}", index + 1)
    }
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
        let (cpu_opts, products) = cpu_products(opts)?;
        let opts = &cpu_opts;
        // Configs, and where the weights are read.
        let single;
        let folder_components;
        let (cfg, weights): (Configs, &dyn ComponentSource) = match source {
            ModelSource::Folder(f) => {
                folder_components = FolderComponents {
                    folder: f,
                    vae_dir: "vae",
                };
                (Configs::from_folder(f)?, &folder_components)
            }
            ModelSource::File { path, config } => {
                single = SingleFile::open(path)?;
                let cfg = match config {
                    Some(f) => Configs::from_folder(f)?,
                    None => Configs::builtin(single.family)?,
                };
                ensure!(
                    cfg.family == single.family,
                    "{} is an {} checkpoint but its config folder is {}",
                    path.display(),
                    single.family,
                    cfg.family
                );
                (cfg, &single)
            }
        };
        let family = cfg.family;
        let loras = LoraSet::open(&adapters.loras)?;
        loras.check_family(family, cfg.unet.cross_dim())?;

        // The big components' files, opened (headers only) to size them: how weights are kept
        // under `WeightStorage::Auto` depends on the model's size.
        let unet_cfg = cfg.unet;
        let te_srcs = cfg
            .towers
            .iter()
            .map(|(i, _, _)| weights.text_encoder(*i, opts))
            .collect::<Result<Vec<_>>>()?;
        let unet_src = weights.unet(&unet_cfg, opts)?;
        let mut paths: Vec<&Path> = te_srcs.iter().map(|c| c.path.as_path()).collect();
        paths.push(&unet_src.path);
        paths.sort();
        paths.dedup();
        let file_bytes = paths
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum();
        let opts = &LoadOptions {
            weights: opts.weights.resolve(file_bytes),
            ..opts.clone()
        };

        // Text encoders.
        let targets = [Target::TextEncoder, Target::TextEncoder2];
        let mut towers = Vec::new();
        let mut text_width = 0;
        for ((i, tokenizer, te_cfg), src) in cfg.towers.into_iter().zip(te_srcs) {
            let what = tower_name(i);
            ensure!(
                tokenizer.vocab_size() <= te_cfg.vocab_size,
                "the tokenizer of {what} has {} tokens but {what} only {}",
                tokenizer.vocab_size(),
                te_cfg.vocab_size
            );
            let patch = loras.patch(targets[i.min(1)], None);
            let encoder = src.build(&what, patch, opts, |vb| ClipTextModel::load(vb, &te_cfg))?;
            text_width += te_cfg.hidden_size;
            towers.push(TextTower { tokenizer, encoder });
        }
        let conditioner = conditioner(
            family,
            towers,
            &unet_cfg,
            opts,
            cfg.force_zeros_for_empty_prompt,
        )?;
        ensure!(
            unet_cfg.cross_dim() == text_width,
            "the UNet expects {}-wide text embeddings but the text encoder(s) make {}",
            unet_cfg.cross_dim(),
            text_width
        );

        // UNet.
        let unet_patch = loras.patch(Target::Unet, Some(&unet_cfg));
        let unet_weights = unet_src.path.clone();
        let unet = unet_src.build("unet", unet_patch, opts, |vb| UNet::load(vb, &unet_cfg))?;
        ensure!(
            (family == Family::Sdxl) == unet.needs_added_cond(),
            "the UNet's addition_embed_type does not fit a {family} model"
        );

        // VAE: --vae, else the model's own.
        let vae_folder;
        let vae_file;
        let (vae_cfg, vae_weights): (VaeConfig, &dyn ComponentSource) = match &adapters.vae {
            Some(VaeSource::Folder(f)) => {
                let (vae_dir, cfg_path) = match f.optional_file("vae/config.json")? {
                    Some(p) => ("vae", p),
                    None => ("", f.file("config.json")?),
                };
                vae_folder = FolderComponents { folder: f, vae_dir };
                (read_json(&cfg_path)?, &vae_folder)
            }
            Some(VaeSource::File(p)) => {
                vae_file = VaeFile(p);
                (cfg.vae, &vae_file)
            }
            None => (cfg.vae, weights),
        };
        // Inpainting UNets also take the mask and the masked image's latents.
        let lat = vae_cfg.latent_channels;
        ensure!(
            unet_cfg.in_channels == lat || unet_cfg.in_channels == 2 * lat + 1,
            "the VAE has {lat} latent channels but the UNet takes {} (expected {lat}, or {} for inpainting)",
            unet_cfg.in_channels,
            2 * lat + 1
        );
        // The VAE runs in f32 when its config asks to be upcast (SDXL's overflows in f16).
        let vae_opts = LoadOptions {
            dtype: if vae_cfg.force_upcast {
                DType::F32
            } else {
                opts.dtype
            },
            ..opts.clone()
        };
        let vae = vae_weights
            .vae(&vae_cfg, &vae_opts)?
            .build("vae", None, &vae_opts, |vb| Vae::load(vb, &vae_cfg))?;
        weights.finish(adapters.vae.is_some())?;
        let lora_reports = loras.finish(adapters.lora_strict)?;
        let lora_hashes = loras.hashes()?;
        Ok(Self {
            family,
            conditioner,
            unet,
            vae,
            vae_dtype: vae_opts.dtype,
            vae_tiling: opts.vae_tiling,
            scheduler: cfg.scheduler,
            device: opts.device.clone(),
            dtype: opts.dtype,
            products,
            unet_weights,
            lora_reports,
            lora_hashes,
            load_time: start.elapsed(),
        })
    }
}

/// The family's conditioning from its text towers.
fn conditioner(
    family: Family,
    mut towers: Vec<TextTower>,
    unet_cfg: &UNetConfig,
    opts: &LoadOptions,
    force_zeros_for_empty_prompt: bool,
) -> Result<Conditioner> {
    Ok(match family {
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
            ensure!(
                !towers.is_empty() && towers.len() <= 2,
                "an SDXL model has one or two text encoders, not {}",
                towers.len()
            );
            let last = towers.last().context("checked above")?;
            ensure!(
                last.encoder.has_projection(),
                "text_encoder_2 of an SDXL model must be a CLIPTextModelWithProjection"
            );
            let pooled = last.encoder.projection_dim();
            // The base takes 6 time ids (sizes, crop, target size), the refiner 5 (sizes, crop,
            // aesthetic score): diffusers' requires_aesthetics_score, read off the UNet's shape.
            let aesthetic = match (
                unet_cfg.addition_time_embed_dim,
                unet_cfg.projection_class_embeddings_input_dim,
            ) {
                (Some(t), Some(p)) if p == 6 * t + pooled => false,
                (Some(t), Some(p)) if p == 5 * t + pooled => true,
                (Some(t), Some(p)) => bail!(
                    "the UNet's addition embedding takes {p} values, but {pooled} pooled plus 6 time ids x {t} make {} (5 for a refiner: {})",
                    6 * t + pooled,
                    5 * t + pooled
                ),
                _ => false,
            };
            Conditioner::Sdxl {
                towers,
                // diffusers: hidden_states[-(clip_skip + 2)], no final norm.
                layer: HiddenLayer::Unnormed(opts.clip_skip.unwrap_or(0) + 2),
                force_zeros_for_empty_prompt,
                aesthetic,
            }
        }
    })
}
