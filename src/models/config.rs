//! The diffusers / transformers `config.json` files, read into typed structs.
//!
//! Defaults follow the Python classes' constructor defaults, so a config that omits a field
//! means what it means to diffusers. Values that change the computation and that tkg does not
//! implement are refused with a clear error instead of being silently ignored.

use crate::limits::check_dim;
use anyhow::{Context, Result, bail, ensure};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Reads and parses a JSON config file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

/// A config value that may be one number or one per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The value for each of `n` blocks.
    pub fn expand(&self, n: usize, what: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) => {
                ensure!(
                    v.len() == n,
                    "{what} has {} entries for {n} blocks",
                    v.len()
                );
                Ok(v.clone())
            }
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_one<T: From<u8>>() -> T {
    T::from(1)
}

/// `unet/config.json` (diffusers `UNet2DConditionModel`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_in_channels")]
    pub in_channels: usize,
    #[serde(default = "d_in_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "default_one")]
    pub downsample_padding: usize,
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_one_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "d_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_time_embedding_type")]
    pub time_embedding_type: String,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_attention_type")]
    pub attention_type: String,
}

fn d_in_channels() -> usize {
    4
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> usize {
    32
}
fn d_norm_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_one_per_block() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_shift() -> String {
    "default".into()
}
fn d_time_embedding_type() -> String {
    "positional".into()
}
fn d_kernel() -> usize {
    3
}
fn d_attention_type() -> String {
    "default".into()
}

/// One down/up level of the UNet, resolved from the config.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetLevel {
    pub out_channels: usize,
    /// `Some(transformer depth)` for cross-attention blocks, `None` for plain resnet blocks.
    pub cross_attn_depth: Option<usize>,
    /// Attention heads (diffusers' `attention_head_dim` is really the head count here).
    pub heads: usize,
}

impl UNetConfig {
    /// Checks that the config describes a network tkg computes exactly, and resolves the
    /// per-level settings.
    pub fn levels(&self) -> Result<Vec<UNetLevel>> {
        let n = self.block_out_channels.len();
        ensure!(n > 0, "unet config has no block_out_channels");
        check_dim("unet config: levels", n, 8)?;
        for &c in &self.block_out_channels {
            check_dim("unet config: block_out_channels", c, 16384)?;
        }
        for c in [self.in_channels, self.out_channels] {
            check_dim("unet config: in/out channels", c, 64)?;
        }
        check_dim(
            "unet config: sample_size",
            self.sample_size.unwrap_or(0),
            1024,
        )?;
        for (what, v) in [
            ("addition_time_embed_dim", self.addition_time_embed_dim),
            (
                "projection_class_embeddings_input_dim",
                self.projection_class_embeddings_input_dim,
            ),
            ("time_embedding_dim", self.time_embedding_dim),
        ] {
            check_dim(&format!("unet config: {what}"), v.unwrap_or(0), 65536)?;
        }
        ensure!(
            self.down_block_types.len() == n && self.up_block_types.len() == n,
            "unet config: {} block_out_channels but {} down and {} up blocks",
            n,
            self.down_block_types.len(),
            self.up_block_types.len()
        );
        let unsupported = |what: &str, value: &dyn std::fmt::Debug| -> anyhow::Error {
            anyhow::anyhow!("unet config: unsupported {what} {value:?}")
        };
        if self.act_fn != "silu" {
            return Err(unsupported("act_fn", &self.act_fn));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                &self.time_embedding_type,
            ));
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return Err(unsupported("class embedding", &self.class_embed_type));
        }
        if let Some(t) = &self.addition_embed_type
            && t != "text_time"
        {
            return Err(unsupported("addition_embed_type", t));
        }
        if self.upcast_attention {
            // Upcasting only changes fp16 numerics; f32 attention is what tkg computes on CPU.
        }
        if self.dual_cross_attention
            || !matches!(
                self.only_cross_attention,
                serde_json::Value::Null | serde_json::Value::Bool(false)
            )
        {
            return Err(unsupported(
                "cross-attention variant",
                &self.only_cross_attention,
            ));
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            return Err(unsupported(
                "conv kernel",
                &(self.conv_in_kernel, self.conv_out_kernel),
            ));
        }
        if self.encoder_hid_dim.is_some() || self.time_cond_proj_dim.is_some() {
            return Err(unsupported(
                "encoder_hid_dim/time_cond_proj_dim",
                &self.encoder_hid_dim,
            ));
        }
        if self.timestep_post_act.is_some() || self.time_embedding_dim.is_some() {
            return Err(unsupported(
                "time embedding option",
                &self.timestep_post_act,
            ));
        }
        if self.attention_type != "default" {
            return Err(unsupported("attention_type", &self.attention_type));
        }
        if !matches!(
            self.reverse_transformer_layers_per_block,
            None | Some(serde_json::Value::Null)
        ) {
            return Err(unsupported(
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            ));
        }
        if let Some(m) = &self.mid_block_type
            && m != "UNetMidBlock2DCrossAttn"
        {
            return Err(unsupported("mid_block_type", m));
        }
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        for &v in &layers {
            check_dim("unet config: layers_per_block", v, 64)?;
        }
        ensure!(
            layers.iter().all(|&l| l == layers[0]),
            "unet config: per-block layers_per_block {layers:?} is not supported"
        );
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        ensure!(
            cross.iter().all(|&c| c == cross[0]),
            "unet config: per-block cross_attention_dim {cross:?} is not supported"
        );
        let depth = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        for &v in depth.iter().chain(&cross) {
            check_dim(
                "unet config: transformer depth or cross_attention_dim",
                v,
                16384,
            )?;
        }
        // diffusers names the head count `attention_head_dim` unless num_attention_heads is set.
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n, "attention_head_dim")?;
        let mut levels = Vec::with_capacity(n);
        for i in 0..n {
            let down = self.down_block_types[i].as_str();
            let up = self.up_block_types[n - 1 - i].as_str();
            let cross_attn = match (down, up) {
                ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") => true,
                ("DownBlock2D", "UpBlock2D") => false,
                _ => bail!("unet config: block pair {down} / {up} at level {i} is not supported"),
            };
            let ch = self.block_out_channels[i];
            ensure!(
                heads[i] > 0 && ch.is_multiple_of(heads[i]),
                "unet config: {ch} channels do not split into {} heads",
                heads[i]
            );
            ensure!(
                ch.is_multiple_of(self.norm_num_groups),
                "unet config: {ch} channels do not split into {} groups",
                self.norm_num_groups
            );
            levels.push(UNetLevel {
                out_channels: ch,
                cross_attn_depth: cross_attn.then_some(depth[i]),
                heads: heads[i],
            });
        }
        Ok(levels)
    }

    pub fn layers(&self) -> usize {
        match &self.layers_per_block {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[0],
        }
    }

    pub fn cross_dim(&self) -> usize {
        match &self.cross_attention_dim {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[0],
        }
    }
}

/// `vae/config.json` (diffusers `AutoencoderKL`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_rgb")]
    pub in_channels: usize,
    #[serde(default = "d_rgb")]
    pub out_channels: usize,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_in_channels")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    /// The image size the VAE was trained at: the tile size of a tiled decode or encode
    /// (a pair takes its first value, as diffusers does).
    #[serde(default)]
    pub sample_size: Option<PerBlock<usize>>,
}

fn d_rgb() -> usize {
    3
}
fn d_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// The spatial factor between image and latent: 2^(levels - 1).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// The tile size in pixels of a tiled decode or encode: `sample_size`, else 512. Saved
    /// diffusers configs always have it; without one diffusers would take its class default
    /// of 32, tiles too small to be of use, so tkg takes SD's 512.
    pub fn tile_sample_size(&self) -> usize {
        match &self.sample_size {
            Some(PerBlock::One(v)) => *v,
            Some(PerBlock::Each(v)) if !v.is_empty() => v[0],
            _ => 512,
        }
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.block_out_channels.is_empty(),
            "vae config has no block_out_channels"
        );
        check_dim("vae config: levels", self.block_out_channels.len(), 8)?;
        check_dim("vae config: layers_per_block", self.layers_per_block, 64)?;
        for c in self.block_out_channels.iter().chain([
            &self.in_channels,
            &self.out_channels,
            &self.latent_channels,
        ]) {
            check_dim("vae config: channels", *c, 16384)?;
        }
        ensure!(self.norm_num_groups > 0, "vae config: norm_num_groups is 0");
        ensure!(
            self.act_fn == "silu",
            "vae config: unsupported act_fn {}",
            self.act_fn
        );
        ensure!(
            self.mid_block_add_attention,
            "vae config: mid_block_add_attention = false is not supported"
        );
        ensure!(
            self.shift_factor.unwrap_or(0.0) == 0.0,
            "vae config: shift_factor is not supported"
        );
        for t in &self.down_block_types {
            ensure!(
                t == "DownEncoderBlock2D",
                "vae config: unsupported block {t}"
            );
        }
        for t in &self.up_block_types {
            ensure!(t == "UpDecoderBlock2D", "vae config: unsupported block {t}");
        }
        for &c in &self.block_out_channels {
            ensure!(
                c.is_multiple_of(self.norm_num_groups),
                "vae config: {c} channels do not split into {} groups",
                self.norm_num_groups
            );
        }
        Ok(())
    }
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: usize,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "d_clip_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_clip_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_clip_act")]
    pub hidden_act: String,
    #[serde(default = "d_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_intermediate() -> usize {
    2048
}
fn d_clip_layers() -> usize {
    12
}
fn d_clip_heads() -> usize {
    8
}
fn d_positions() -> usize {
    77
}
fn d_clip_act() -> String {
    "quick_gelu".into()
}
fn d_eos() -> u32 {
    2
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<()> {
        for (what, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 20),
            ("hidden_size", self.hidden_size, 16384),
            ("intermediate_size", self.intermediate_size, 65536),
            ("num_hidden_layers", self.num_hidden_layers, 256),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                4096,
            ),
        ] {
            check_dim(&format!("text encoder config: {what}"), v, max)?;
        }
        ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "text encoder config: hidden_size {} does not split into {} heads",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu"),
            "text encoder config: unsupported hidden_act {}",
            self.hidden_act
        );
        Ok(())
    }

    /// True for `CLIPTextModelWithProjection` (SDXL's second encoder).
    pub fn with_projection(&self) -> bool {
        self.architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|s| s == "CLIPTextModelWithProjection"))
    }
}

/// `scheduler/scheduler_config.json`: the keys diffusers' schedulers read.
///
/// A diffusers user switching scheduler does `NewClass.from_config(pipe.scheduler.config)`: the
/// keys the file has are kept, the missing ones take the *new* class's defaults, and those
/// differ between classes (`timestep_spacing` is "leading" for DDIM and LCM but "linspace" for
/// Euler, Heun, DPM-Solver and UniPC; Heun and LCM default to SD's betas). So every key whose
/// default depends on the class is an `Option` here (`None`: the file does not set it), and
/// each sampler resolves it with its class's default (see `crate::scheduler`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_start: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_end: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_schedule: Option<String>,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub clip_sample: Option<bool>,
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "d_prediction")]
    pub prediction_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    // Sigma-based samplers (Euler, Heun, DPM-Solver, UniPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpolation_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_beta_sigmas: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_lu_lambdas: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_flow_sigmas: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_dynamic_shifting: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma_max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_sigmas_type: Option<String>,
    // Multistep solvers (DPM-Solver, UniPC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_order_final: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub euler_at_final: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lambda_min_clipped: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variance_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predict_x0: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disable_corrector: Option<Vec<usize>>,
    // LCM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_inference_steps: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestep_scaling: Option<f64>,
}

fn d_train_steps() -> usize {
    1000
}
fn d_prediction() -> String {
    "epsilon".into()
}

/// `model_index.json`: which pipeline a folder holds.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
    #[serde(flatten)]
    pub components: serde_json::Map<String, serde_json::Value>,
}

impl ModelIndex {
    /// Whether the pipeline marks `component` as absent (`[null, null]`), as the SDXL refiner
    /// does its first text encoder.
    pub fn lacks(&self, component: &str) -> bool {
        self.components
            .get(component)
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.first().is_some_and(|v| v.is_null()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15_UNET: &str = r#"{
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    }"#;

    #[test]
    fn sd15_unet_levels() {
        let c: UNetConfig = serde_json::from_str(SD15_UNET).unwrap();
        let l = c.levels().unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(l[0].heads, 8);
        assert_eq!(l[0].cross_attn_depth, Some(1));
        assert_eq!(l[3].cross_attn_depth, None);
        assert_eq!(c.cross_dim(), 768);
    }

    #[test]
    fn refuses_what_it_cannot_compute() {
        let mut v: serde_json::Value = serde_json::from_str(SD15_UNET).unwrap();
        v["resnet_time_scale_shift"] = "scale_shift".into();
        let c: UNetConfig = serde_json::from_value(v).unwrap();
        assert!(
            c.levels()
                .unwrap_err()
                .to_string()
                .contains("resnet_time_scale_shift")
        );
        let mut v: serde_json::Value = serde_json::from_str(SD15_UNET).unwrap();
        v["attention_head_dim"] = serde_json::json!([8, 8]);
        let c: UNetConfig = serde_json::from_value(v).unwrap();
        assert!(c.levels().is_err());
    }

    #[test]
    fn vae_factor_comes_from_blocks() {
        let c: VaeConfig =
            serde_json::from_str(r#"{"block_out_channels": [32, 64, 64], "norm_num_groups": 8}"#)
                .unwrap();
        assert_eq!(c.downscale_factor(), 4);
        c.validate().unwrap();
        assert_eq!(c.scaling_factor, 0.18215);
    }
}
