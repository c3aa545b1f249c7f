//! Single-file checkpoints (the A1111 / ComfyUI / civitai `.safetensors` layout): UNet, VAE
//! and text encoder(s) in one file, under the original (LDM / "sgm") names.
//!
//! Nothing is converted up front. Each component is a [`TensorSource`] that maps the
//! diffusers / transformers name a network asks for to the checkpoint's name plus a small
//! per-tensor transform (a slice of OpenCLIP's fused q/k/v, a transposed text projection,
//! a 1x1-conv VAE attention weight seen as a linear one). The networks stay unchanged, and
//! the file's own record of used tensors still catches anything left over.
//!
//! Key layout (see diffusers' `loaders/single_file_utils.py` for the forward mapping):
//! `model.diffusion_model.` UNet, `first_stage_model.` VAE, `cond_stage_model.transformer.`
//! SD1's CLIP, `conditioner.embedders.0.transformer.` SDXL's CLIP-L and
//! `conditioner.embedders.1.model.` SDXL's OpenCLIP bigG.

use super::config::UNetConfig;
use super::weights::{TensorSource, WeightFile};
use crate::family::Family;
use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use std::path::Path;
use std::sync::Arc;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const SD1_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const SDXL_CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const SDXL_CLIP_G_PREFIX: &str = "conditioner.embedders.1.model.";

/// How a stored tensor becomes the one the network asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Copy,
    /// Stored transposed (OpenCLIP's `text_projection`, [in, out]).
    Transpose,
    /// Part `i` of `n` equal parts along dim 0 (OpenCLIP's fused `in_proj` q/k/v).
    Part(usize, usize),
    /// A [C, C, 1, 1] conv weight read as a [C, C] linear weight (VAE attention).
    Linear,
}

/// Refuses pickles and anything that is not a safetensors file, with the reason.
pub fn check_extension(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "ckpt" | "pt" | "pth" | "bin" | "pkl" | "pickle" => bail!(
            "{} is a pickle checkpoint, which can run arbitrary code when loaded; tkg only reads \
             .safetensors (convert it first, e.g. with diffusers' scripts or a web UI's \
             checkpoint merger saving as safetensors)",
            path.display()
        ),
        _ => Ok(()),
    }
}

/// The UNet's diffusers name → its LDM name (without `model.diffusion_model.`), for the
/// SD1.x / SDXL UNet layout described by `cfg`. Works on full tensor names and on module
/// paths alike; `None` for names outside that layout.
pub fn unet_to_ldm(name: &str, cfg: &UNetConfig) -> Option<String> {
    let l = cfg.layers();
    let p: Vec<&str> = name.split('.').collect();
    let rest = |k: usize| -> String { p.get(k..).map(|s| s.join(".")).unwrap_or_default() };
    let join = |head: String, tail: String| -> String {
        if tail.is_empty() {
            head
        } else {
            format!("{head}.{tail}")
        }
    };
    let num = |k: usize| -> Option<usize> { p.get(k)?.parse().ok() };
    let resnet = |tail: String| -> String {
        let (first, after) = match tail.split_once('.') {
            Some((a, b)) => (a.to_string(), b.to_string()),
            None => (tail.clone(), String::new()),
        };
        let mapped = match first.as_str() {
            "norm1" => "in_layers.0",
            "conv1" => "in_layers.2",
            "time_emb_proj" => "emb_layers.1",
            "norm2" => "out_layers.0",
            "conv2" => "out_layers.3",
            "conv_shortcut" => "skip_connection",
            _ => return tail,
        };
        join(mapped.to_string(), after)
    };
    Some(match *p.first()? {
        "conv_in" => join("input_blocks.0.0".into(), rest(1)),
        "conv_norm_out" => join("out.0".into(), rest(1)),
        "conv_out" => join("out.2".into(), rest(1)),
        "time_embedding" | "add_embedding" => {
            let base = if p[0] == "time_embedding" {
                "time_embed"
            } else {
                "label_emb.0"
            };
            let idx = match *p.get(1)? {
                "linear_1" => 0,
                "linear_2" => 2,
                _ => return None,
            };
            join(format!("{base}.{idx}"), rest(2))
        }
        "down_blocks" => {
            let i = num(1)?;
            match *p.get(2)? {
                "resnets" => {
                    let j = num(3)?;
                    join(
                        format!("input_blocks.{}.0", 1 + i * (l + 1) + j),
                        resnet(rest(4)),
                    )
                }
                "attentions" => {
                    let j = num(3)?;
                    join(format!("input_blocks.{}.1", 1 + i * (l + 1) + j), rest(4))
                }
                "downsamplers" if p.get(3) == Some(&"0") && p.get(4) == Some(&"conv") => {
                    join(format!("input_blocks.{}.0.op", (i + 1) * (l + 1)), rest(5))
                }
                _ => return None,
            }
        }
        "mid_block" => match (*p.get(1)?, num(2)?) {
            ("resnets", 0) => join("middle_block.0".into(), resnet(rest(3))),
            ("attentions", 0) => join("middle_block.1".into(), rest(3)),
            ("resnets", 1) => join("middle_block.2".into(), resnet(rest(3))),
            _ => return None,
        },
        "up_blocks" => {
            let i = num(1)?;
            match *p.get(2)? {
                "resnets" => {
                    let j = num(3)?;
                    join(
                        format!("output_blocks.{}.0", i * (l + 1) + j),
                        resnet(rest(4)),
                    )
                }
                "attentions" => {
                    let j = num(3)?;
                    join(format!("output_blocks.{}.1", i * (l + 1) + j), rest(4))
                }
                "upsamplers" if p.get(3) == Some(&"0") && p.get(4) == Some(&"conv") => {
                    let has_attn = cfg.up_block_types.get(i)?.contains("CrossAttn");
                    let slot = if has_attn { 2 } else { 1 };
                    join(
                        format!("output_blocks.{}.{slot}.conv", i * (l + 1) + l),
                        rest(5),
                    )
                }
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// The VAE's diffusers name → its LDM name (without `first_stage_model.`); `levels` is the
/// number of blocks (`block_out_channels.len()`).
pub fn vae_to_ldm(name: &str, levels: usize) -> Option<(String, Op)> {
    let p: Vec<&str> = name.split('.').collect();
    let rest = |k: usize| -> String { p.get(k..).map(|s| s.join(".")).unwrap_or_default() };
    let num = |k: usize| -> Option<usize> { p.get(k)?.parse().ok() };
    let resnet = |tail: String| -> String {
        match tail.strip_prefix("conv_shortcut") {
            Some(t) => format!("nin_shortcut{t}"),
            None => tail,
        }
    };
    let side = *p.first()?;
    if matches!(side, "quant_conv" | "post_quant_conv") {
        return Some((name.to_string(), Op::Copy));
    }
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let mut op = Op::Copy;
    let tail = match *p.get(1)? {
        "conv_in" | "conv_out" => format!("{}.{}", p[1], rest(2)),
        "conv_norm_out" => format!("norm_out.{}", rest(2)),
        "mid_block" => match (*p.get(2)?, num(3)?) {
            ("resnets", 0) => format!("mid.block_1.{}", resnet(rest(4))),
            ("resnets", 1) => format!("mid.block_2.{}", resnet(rest(4))),
            ("attentions", 0) => {
                let (module, k) = match (*p.get(4)?, p.get(5)) {
                    ("group_norm", _) => ("norm", 5),
                    ("to_q" | "query", _) => ("q", 5),
                    ("to_k" | "key", _) => ("k", 5),
                    ("to_v" | "value", _) => ("v", 5),
                    ("to_out", Some(&"0")) => ("proj_out", 6),
                    ("proj_attn", _) => ("proj_out", 5),
                    _ => return None,
                };
                if module != "norm" {
                    op = Op::Linear;
                }
                format!("mid.attn_1.{module}.{}", rest(k))
            }
            _ => return None,
        },
        "down_blocks" if side == "encoder" => {
            let i = num(2)?;
            match *p.get(3)? {
                "resnets" => format!("down.{i}.block.{}.{}", num(4)?, resnet(rest(5))),
                "downsamplers" if p.get(4) == Some(&"0") => {
                    format!("down.{i}.downsample.{}", rest(5))
                }
                _ => return None,
            }
        }
        "up_blocks" if side == "decoder" => {
            let i = num(2)?;
            let k = levels.checked_sub(1 + i)?;
            match *p.get(3)? {
                "resnets" => format!("up.{k}.block.{}.{}", num(4)?, resnet(rest(5))),
                "upsamplers" if p.get(4) == Some(&"0") => {
                    format!("up.{k}.upsample.{}", rest(5))
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some((format!("{side}.{tail}"), op))
}

/// CLIP (transformers names, `text_model.` prefix or not) → OpenCLIP's names (without the
/// `conditioner.embedders.1.model.` prefix).
pub fn open_clip_name(name: &str) -> Option<(String, Op)> {
    if name == "text_projection.weight" {
        return Some(("text_projection".into(), Op::Transpose));
    }
    let n = name.strip_prefix("text_model.").unwrap_or(name);
    let copy = |s: String| Some((s, Op::Copy));
    match n {
        "embeddings.token_embedding.weight" => return copy("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return copy("positional_embedding".into()),
        _ => {}
    }
    if let Some(t) = n.strip_prefix("final_layer_norm.") {
        return copy(format!("ln_final.{t}"));
    }
    let t = n.strip_prefix("encoder.layers.")?;
    let (i, t) = t.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (module, param) = t.rsplit_once('.')?;
    let block = format!("transformer.resblocks.{i}");
    let part = |k| -> Option<(String, Op)> {
        Some((format!("{block}.attn.in_proj_{param}"), Op::Part(k, 3)))
    };
    match module {
        "layer_norm1" => copy(format!("{block}.ln_1.{param}")),
        "layer_norm2" => copy(format!("{block}.ln_2.{param}")),
        "self_attn.q_proj" => part(0),
        "self_attn.k_proj" => part(1),
        "self_attn.v_proj" => part(2),
        "self_attn.out_proj" => copy(format!("{block}.attn.out_proj.{param}")),
        "mlp.fc1" => copy(format!("{block}.mlp.c_fc.{param}")),
        "mlp.fc2" => copy(format!("{block}.mlp.c_proj.{param}")),
        _ => None,
    }
}

/// How one component's names map into a file.
#[derive(Debug, Clone)]
enum Layout {
    /// Same names under a prefix (a CLIP-L tower; a diffusers-named VAE file).
    Prefixed {
        prefix: String,
        /// Add `text_model.` when the file has it and the network asked without.
        text_model: bool,
    },
    Unet(Box<UNetConfig>),
    Vae {
        prefix: String,
        levels: usize,
    },
    OpenClip,
}

/// One component of a single-file checkpoint, seen under diffusers names.
pub struct Mapped {
    file: Arc<WeightFile>,
    layout: Layout,
}

impl Mapped {
    fn resolve(&self, name: &str) -> Option<(String, Op)> {
        match &self.layout {
            Layout::Prefixed { prefix, text_model } => {
                let direct = format!("{prefix}{name}");
                if *text_model && !self.file.contains(&direct) {
                    let alt = match name.strip_prefix("text_model.") {
                        Some(bare) => format!("{prefix}{bare}"),
                        None => format!("{prefix}text_model.{name}"),
                    };
                    if self.file.contains(&alt) {
                        return Some((alt, Op::Copy));
                    }
                }
                Some((direct, Op::Copy))
            }
            Layout::Unet(cfg) => {
                unet_to_ldm(name, cfg).map(|n| (format!("{UNET_PREFIX}{n}"), Op::Copy))
            }
            Layout::Vae { prefix, levels } => {
                vae_to_ldm(name, *levels).map(|(n, op)| (format!("{prefix}{n}"), op))
            }
            Layout::OpenClip => {
                open_clip_name(name).map(|(n, op)| (format!("{SDXL_CLIP_G_PREFIX}{n}"), op))
            }
        }
    }
}

impl TensorSource for Mapped {
    fn has(&self, name: &str) -> bool {
        self.resolve(name)
            .is_some_and(|(n, _)| self.file.contains(&n))
    }

    fn fetch(&self, name: &str) -> Result<Tensor> {
        let (stored, op) = self.resolve(name).with_context(|| {
            format!(
                "{}: no single-file name for {name}",
                self.file.path().display()
            )
        })?;
        let t = self
            .file
            .read_used(&stored)
            .with_context(|| format!("(looked up for {name})"))?;
        Ok(match op {
            Op::Copy => t,
            Op::Transpose => t.t()?.contiguous()?,
            Op::Part(i, n) => {
                let rows = t.dim(0)?;
                anyhow::ensure!(
                    rows % n == 0,
                    "{stored} has {rows} rows, not a multiple of {n}"
                );
                t.narrow(0, i * rows / n, rows / n)?.contiguous()?
            }
            Op::Linear => {
                if t.rank() == 4 {
                    let (o, i, kh, kw) = t.dims4()?;
                    anyhow::ensure!(kh == 1 && kw == 1, "{stored} is not a 1x1 conv");
                    t.reshape((o, i))?
                } else {
                    t
                }
            }
        })
    }
}

/// A single-file checkpoint, opened and recognised.
pub struct SingleFile {
    pub file: Arc<WeightFile>,
    pub family: Family,
}

/// Tensors of a single file that no network reads: EMA copies, the training noise
/// schedule, position ids, OpenCLIP's logit scale.
pub fn ignorable(name: &str) -> bool {
    const SCHEDULE: &[&str] = &[
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "betas",
        "log_one_minus_alphas_cumprod",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_variance",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "logvar",
    ];
    SCHEDULE.contains(&name)
        || name.starts_with("model_ema.")
        || name.starts_with("denoiser.")
        || name.ends_with("position_ids")
        || name.ends_with("logit_scale")
        || name.ends_with(".attn_mask")
}

impl SingleFile {
    /// Opens `path` and detects its family from the key names.
    pub fn open(path: &Path) -> Result<Self> {
        check_extension(path)?;
        let file = WeightFile::open(path)?;
        let names = file.names();
        let any = |p: &str| names.iter().any(|n| n.starts_with(p));
        let family = if any(SDXL_CLIP_G_PREFIX) || any("conditioner.embedders.") {
            Family::Sdxl
        } else if any(SD1_CLIP_PREFIX) {
            Family::Sd15
        } else if any("cond_stage_model.model.") {
            bail!(
                "{} is a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder); tkg supports SD1.x and SDXL",
                path.display()
            )
        } else if names
            .iter()
            .any(|n| n.starts_with("lora_") || n.contains(".lora_"))
        {
            bail!(
                "{} is a LoRA, not a checkpoint: pass it with --lora",
                path.display()
            )
        } else if any("decoder.") && any("encoder.") && !any(UNET_PREFIX) {
            bail!(
                "{} holds only a VAE: pass it with --vae next to a model",
                path.display()
            )
        } else if any("down_blocks.") || any("text_model.") {
            bail!(
                "{} is one component of a diffusers folder; pass the whole folder with --model-dir",
                path.display()
            )
        } else {
            bail!(
                "{} is not a single-file Stable Diffusion checkpoint: it has no {} or {} tensors",
                path.display(),
                SD1_CLIP_PREFIX,
                SDXL_CLIP_G_PREFIX
            )
        };
        if !any(UNET_PREFIX) {
            bail!("{} has no UNet ({UNET_PREFIX}...) tensors", path.display());
        }
        Ok(Self { file, family })
    }

    /// Whether the file carries a VAE.
    pub fn has_vae(&self) -> bool {
        self.file.names().iter().any(|n| n.starts_with(VAE_PREFIX))
    }

    /// The UNet, seen under diffusers names.
    pub fn unet(&self, cfg: &UNetConfig) -> Arc<dyn TensorSource> {
        Arc::new(Mapped {
            file: self.file.clone(),
            layout: Layout::Unet(Box::new(cfg.clone())),
        })
    }

    /// The VAE, seen under diffusers names.
    pub fn vae(&self, levels: usize) -> Arc<dyn TensorSource> {
        Arc::new(Mapped {
            file: self.file.clone(),
            layout: Layout::Vae {
                prefix: VAE_PREFIX.into(),
                levels,
            },
        })
    }

    /// Text encoder `index` (0: CLIP-L, 1: SDXL's OpenCLIP bigG), seen under transformers
    /// names.
    pub fn text_encoder(&self, index: usize) -> Arc<dyn TensorSource> {
        let layout = match (self.family, index) {
            (Family::Sd15, _) => Layout::Prefixed {
                prefix: SD1_CLIP_PREFIX.into(),
                text_model: true,
            },
            (Family::Sdxl, 0) => Layout::Prefixed {
                prefix: SDXL_CLIP_L_PREFIX.into(),
                text_model: true,
            },
            (Family::Sdxl, _) => Layout::OpenClip,
        };
        Arc::new(Mapped {
            file: self.file.clone(),
            layout,
        })
    }

    /// Fails on tensors no network read (`vae_replaced`: the file's own VAE was not used).
    pub fn ensure_all_used(&self, vae_replaced: bool) -> Result<()> {
        self.file
            .ensure_all_used(|n| ignorable(n) || (vae_replaced && n.starts_with(VAE_PREFIX)))
    }
}

/// A VAE in one safetensors file: diffusers names (`decoder.up_blocks...`), LDM names
/// (`decoder.up...`), or a whole single-file checkpoint's `first_stage_model.`. Returns the
/// file, the VAE's view of it, and the prefix of the VAE's tensors (the rest of a whole
/// checkpoint is not the VAE's business).
pub fn vae_file(
    path: &Path,
    levels: usize,
) -> Result<(Arc<WeightFile>, Arc<dyn TensorSource>, String)> {
    check_extension(path)?;
    let file = WeightFile::open(path)?;
    let names = file.names();
    let any = |p: &str| names.iter().any(|n| n.starts_with(p));
    let layout = if any("decoder.up_blocks.") {
        Layout::Prefixed {
            prefix: String::new(),
            text_model: false,
        }
    } else if any("decoder.up.") {
        Layout::Vae {
            prefix: String::new(),
            levels,
        }
    } else if any("first_stage_model.decoder.") {
        Layout::Vae {
            prefix: VAE_PREFIX.into(),
            levels,
        }
    } else if any("vae.decoder.") {
        Layout::Prefixed {
            prefix: "vae.".into(),
            text_model: false,
        }
    } else {
        bail!(
            "{} does not look like a VAE (no decoder tensors)",
            path.display()
        )
    };
    let prefix = match &layout {
        Layout::Prefixed { prefix, .. } | Layout::Vae { prefix, .. } => prefix.clone(),
        _ => String::new(),
    };
    let source: Arc<dyn TensorSource> = Arc::new(Mapped {
        file: file.clone(),
        layout,
    });
    Ok((file, source, prefix))
}

/// CLIP's full BPE merge list (48,894 merges, gzipped), built into the binary: single-file
/// checkpoints carry no tokenizer, and the full vocabulary is rebuilt from the merges
/// (`tokenizer::build_clip_vocab`), so a single file works offline with nothing else.
static CLIP_MERGES_GZ: &[u8] = include_bytes!("../../assets/tokenizer/clip-merges.txt.gz");

/// The real CLIP tokenizer (49,408 tokens) padding with `pad` (`<|endoftext|>` for SD1.x and
/// SDXL's first tokenizer, `!` for SDXL's second).
pub fn full_clip_tokenizer(pad: &str) -> Result<super::tokenizer::ClipTokenizer> {
    use std::io::Read;
    static VOCAB: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let (vocab, merges) = match VOCAB.get() {
        Some(v) => v,
        None => {
            let mut text = String::new();
            flate2::read::GzDecoder::new(CLIP_MERGES_GZ)
                .read_to_string(&mut text)
                .context("unpacking the built-in CLIP merges")?;
            let merges = super::tokenizer::parse_merges(&text)?;
            VOCAB.get_or_init(|| super::tokenizer::build_clip_vocab(&merges))
        }
    };
    super::tokenizer::ClipTokenizer::from_strings(vocab, merges, pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> UNetConfig {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        }))
        .unwrap()
    }

    #[test]
    fn unet_names_follow_the_ldm_layout() {
        let c = sd15();
        let m = |n: &str| unet_to_ldm(n, &c).unwrap();
        assert_eq!(m("conv_in.weight"), "input_blocks.0.0.weight");
        assert_eq!(m("time_embedding.linear_2.bias"), "time_embed.2.bias");
        assert_eq!(
            m("down_blocks.1.resnets.0.conv_shortcut.weight"),
            "input_blocks.4.0.skip_connection.weight"
        );
        assert_eq!(
            m("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight"),
            "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
        );
        assert_eq!(
            m("down_blocks.2.downsamplers.0.conv.bias"),
            "input_blocks.9.0.op.bias"
        );
        assert_eq!(
            m("mid_block.resnets.1.time_emb_proj.weight"),
            "middle_block.2.emb_layers.1.weight"
        );
        assert_eq!(
            m("up_blocks.0.upsamplers.0.conv.weight"),
            "output_blocks.2.1.conv.weight"
        );
        assert_eq!(
            m("up_blocks.1.upsamplers.0.conv.weight"),
            "output_blocks.5.2.conv.weight"
        );
        assert_eq!(
            m("up_blocks.3.attentions.2.proj_out.weight"),
            "output_blocks.11.1.proj_out.weight"
        );
        assert_eq!(m("conv_norm_out.weight"), "out.0.weight");
        assert_eq!(m("add_embedding.linear_1.weight"), "label_emb.0.0.weight");
        assert!(unet_to_ldm("nonsense.weight", &c).is_none());
    }

    #[test]
    fn vae_and_open_clip_names() {
        assert_eq!(
            vae_to_ldm("decoder.up_blocks.0.upsamplers.0.conv.weight", 4).unwrap(),
            ("decoder.up.3.upsample.conv.weight".into(), Op::Copy)
        );
        assert_eq!(
            vae_to_ldm("encoder.mid_block.attentions.0.to_out.0.bias", 4).unwrap(),
            ("encoder.mid.attn_1.proj_out.bias".into(), Op::Linear)
        );
        assert_eq!(
            vae_to_ldm("encoder.down_blocks.1.resnets.0.conv_shortcut.weight", 4)
                .unwrap()
                .0,
            "encoder.down.1.block.0.nin_shortcut.weight"
        );
        assert_eq!(
            open_clip_name("text_model.encoder.layers.3.self_attn.v_proj.bias").unwrap(),
            (
                "transformer.resblocks.3.attn.in_proj_bias".into(),
                Op::Part(2, 3)
            )
        );
        assert_eq!(
            open_clip_name("text_projection.weight").unwrap(),
            ("text_projection".into(), Op::Transpose)
        );
    }

    #[test]
    fn the_built_in_tokenizer_is_full_clip() {
        let t = full_clip_tokenizer("!").unwrap();
        assert_eq!(t.vocab_size(), 49408);
        assert_eq!(t.token_to_id("photo</w>"), Some(1125));
        assert_eq!(t.token_to_id("!"), Some(0));
    }

    #[test]
    fn pickles_are_refused() {
        let e = check_extension(Path::new("/x/model.ckpt")).unwrap_err();
        assert!(format!("{e}").contains("safetensors"));
        assert!(check_extension(Path::new("/x/model.safetensors")).is_ok());
    }
}
