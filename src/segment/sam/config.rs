//! transformers' `SamConfig` (config.json: `vision_config`, `prompt_encoder_config`,
//! `mask_decoder_config`) and `SamImageProcessor`'s preprocessor_config.json, with
//! transformers' defaults for every field a file leaves out: the Hub's SlimSAM configs give
//! only the vision `hidden_size` and `mlp_dim`.

use crate::limits::check_dim;
use anyhow::{Result, bail, ensure};
use serde::Deserialize;

/// An activation named by a config's `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `gelu`: the exact (erf) form, as torch's `nn.GELU()`.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh,
    Relu,
}

impl Act {
    fn parse(name: &str, what: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Act::GeluTanh,
            "relu" => Act::Relu,
            _ => bail!("{what}: hidden_act `{name}` is not supported (gelu, gelu_new, relu)"),
        })
    }

    pub fn apply(self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Act::Gelu => x.gelu_erf(),
            Act::GeluTanh => x.gelu(),
            Act::Relu => x.relu(),
        }
    }
}

/// `image_size` and `patch_size` may be one number or a square [h, w] pair.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Side {
    One(usize),
    Pair([usize; 2]),
}

impl Side {
    fn square(&self, what: &str) -> Result<usize> {
        match *self {
            Side::One(n) => Ok(n),
            Side::Pair([h, w]) if h == w => Ok(h),
            Side::Pair([h, w]) => bail!("{what} {h}x{w}: only square sizes are supported"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct RawVision {
    hidden_size: usize,
    output_channels: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: usize,
    image_size: Side,
    patch_size: Side,
    hidden_act: String,
    layer_norm_eps: f64,
    qkv_bias: bool,
    mlp_ratio: f64,
    use_abs_pos: bool,
    use_rel_pos: bool,
    window_size: usize,
    global_attn_indexes: Vec<usize>,
    num_pos_feats: usize,
    mlp_dim: Option<usize>,
}

impl Default for RawVision {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            output_channels: 256,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: Side::One(1024),
            patch_size: Side::One(16),
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            qkv_bias: true,
            mlp_ratio: 4.0,
            use_abs_pos: true,
            use_rel_pos: true,
            window_size: 14,
            global_attn_indexes: vec![2, 5, 8, 11],
            num_pos_feats: 128,
            mlp_dim: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct RawPrompt {
    hidden_size: usize,
    image_size: Side,
    patch_size: Side,
    mask_input_channels: usize,
    num_point_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
}

impl Default for RawPrompt {
    fn default() -> Self {
        Self {
            hidden_size: 256,
            image_size: Side::One(1024),
            patch_size: Side::One(16),
            mask_input_channels: 16,
            num_point_embeddings: 4,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct RawDecoder {
    hidden_size: usize,
    hidden_act: String,
    mlp_dim: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    attention_downsample_rate: usize,
    num_multimask_outputs: usize,
    iou_head_depth: usize,
    iou_head_hidden_dim: usize,
    layer_norm_eps: f64,
}

impl Default for RawDecoder {
    fn default() -> Self {
        Self {
            hidden_size: 256,
            hidden_act: "relu".into(),
            mlp_dim: 2048,
            num_hidden_layers: 2,
            num_attention_heads: 8,
            attention_downsample_rate: 2,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
            layer_norm_eps: 1e-6,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct RawSam {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    vision_config: RawVision,
    #[serde(default)]
    prompt_encoder_config: RawPrompt,
    #[serde(default)]
    mask_decoder_config: RawDecoder,
}

/// The ViT image encoder.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub output_channels: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub act: Act,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    pub use_abs_pos: bool,
    pub use_rel_pos: bool,
    pub window_size: usize,
    pub global_attn_indexes: Vec<usize>,
    pub num_pos_feats: usize,
    pub mlp_dim: usize,
}

impl VisionConfig {
    /// The embedding grid's side: image_size / patch_size.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Layer `i`'s attention window (0: global attention over the whole grid).
    pub fn window(&self, i: usize) -> usize {
        if self.global_attn_indexes.contains(&i) {
            0
        } else {
            self.window_size
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptEncoderConfig {
    pub hidden_size: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub mask_input_channels: usize,
    pub num_point_embeddings: usize,
    pub act: Act,
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MaskDecoderConfig {
    pub hidden_size: usize,
    pub act: Act,
    pub mlp_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub attention_downsample_rate: usize,
    pub num_multimask_outputs: usize,
    pub iou_head_depth: usize,
    pub iou_head_hidden_dim: usize,
    pub layer_norm_eps: f64,
}

/// A whole `SamModel`'s config.
#[derive(Debug, Clone, PartialEq)]
pub struct SamConfig {
    pub vision: VisionConfig,
    pub prompt: PromptEncoderConfig,
    pub decoder: MaskDecoderConfig,
}

const MAX_WIDTH: usize = 16_384;
const MAX_LAYERS: usize = 256;

impl SamConfig {
    /// Parses and checks config.json: every width the three parts share must agree.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawSam = serde_json::from_str(text)?;
        if let Some(t) = raw.model_type.as_deref() {
            ensure!(
                t == "sam",
                "model_type is `{t}`, not `sam` (a transformers SamModel)"
            );
        }
        let v = raw.vision_config;
        let p = raw.prompt_encoder_config;
        let d = raw.mask_decoder_config;
        let vision = VisionConfig {
            hidden_size: v.hidden_size,
            output_channels: v.output_channels,
            num_hidden_layers: v.num_hidden_layers,
            num_attention_heads: v.num_attention_heads,
            num_channels: v.num_channels,
            image_size: v.image_size.square("vision_config.image_size")?,
            patch_size: v.patch_size.square("vision_config.patch_size")?,
            act: Act::parse(&v.hidden_act, "vision_config")?,
            layer_norm_eps: v.layer_norm_eps,
            qkv_bias: v.qkv_bias,
            use_abs_pos: v.use_abs_pos,
            use_rel_pos: v.use_rel_pos,
            window_size: v.window_size,
            global_attn_indexes: v.global_attn_indexes,
            num_pos_feats: v.num_pos_feats,
            // transformers: int(hidden_size * mlp_ratio) when mlp_dim is not given.
            mlp_dim: v
                .mlp_dim
                .unwrap_or((v.hidden_size as f64 * v.mlp_ratio) as usize),
        };
        let prompt = PromptEncoderConfig {
            hidden_size: p.hidden_size,
            image_size: p.image_size.square("prompt_encoder_config.image_size")?,
            patch_size: p.patch_size.square("prompt_encoder_config.patch_size")?,
            mask_input_channels: p.mask_input_channels,
            num_point_embeddings: p.num_point_embeddings,
            act: Act::parse(&p.hidden_act, "prompt_encoder_config")?,
            layer_norm_eps: p.layer_norm_eps,
        };
        let decoder = MaskDecoderConfig {
            hidden_size: d.hidden_size,
            act: Act::parse(&d.hidden_act, "mask_decoder_config")?,
            mlp_dim: d.mlp_dim,
            num_hidden_layers: d.num_hidden_layers,
            num_attention_heads: d.num_attention_heads,
            attention_downsample_rate: d.attention_downsample_rate,
            num_multimask_outputs: d.num_multimask_outputs,
            iou_head_depth: d.iou_head_depth,
            iou_head_hidden_dim: d.iou_head_hidden_dim,
            layer_norm_eps: d.layer_norm_eps,
        };
        let cfg = Self {
            vision,
            prompt,
            decoder,
        };
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        let (v, p, d) = (&self.vision, &self.prompt, &self.decoder);
        for (what, value, max) in [
            ("vision_config.hidden_size", v.hidden_size, MAX_WIDTH),
            (
                "vision_config.output_channels",
                v.output_channels,
                MAX_WIDTH,
            ),
            ("vision_config.mlp_dim", v.mlp_dim, 4 * MAX_WIDTH),
            (
                "vision_config.num_hidden_layers",
                v.num_hidden_layers,
                MAX_LAYERS,
            ),
            (
                "vision_config.num_attention_heads",
                v.num_attention_heads,
                1024,
            ),
            ("vision_config.num_channels", v.num_channels, 16),
            ("vision_config.image_size", v.image_size, 4096),
            ("vision_config.window_size", v.window_size, 1024),
            ("vision_config.num_pos_feats", v.num_pos_feats, MAX_WIDTH),
            ("prompt_encoder_config.image_size", p.image_size, 4096),
            (
                "prompt_encoder_config.mask_input_channels",
                p.mask_input_channels,
                MAX_WIDTH,
            ),
            (
                "prompt_encoder_config.num_point_embeddings",
                p.num_point_embeddings,
                64,
            ),
            ("mask_decoder_config.hidden_size", d.hidden_size, MAX_WIDTH),
            ("mask_decoder_config.mlp_dim", d.mlp_dim, 4 * MAX_WIDTH),
            (
                "mask_decoder_config.num_hidden_layers",
                d.num_hidden_layers,
                MAX_LAYERS,
            ),
            (
                "mask_decoder_config.num_attention_heads",
                d.num_attention_heads,
                1024,
            ),
            (
                "mask_decoder_config.num_multimask_outputs",
                d.num_multimask_outputs,
                64,
            ),
            (
                "mask_decoder_config.iou_head_depth",
                d.iou_head_depth,
                MAX_LAYERS,
            ),
            (
                "mask_decoder_config.iou_head_hidden_dim",
                d.iou_head_hidden_dim,
                MAX_WIDTH,
            ),
        ] {
            check_dim(what, value, max)?;
        }
        let positive = [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.output_channels", v.output_channels),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.mlp_dim", v.mlp_dim),
            ("prompt_encoder_config.patch_size", p.patch_size),
            (
                "mask_decoder_config.num_attention_heads",
                d.num_attention_heads,
            ),
            (
                "mask_decoder_config.attention_downsample_rate",
                d.attention_downsample_rate,
            ),
            (
                "mask_decoder_config.num_multimask_outputs",
                d.num_multimask_outputs,
            ),
            (
                "prompt_encoder_config.mask_input_channels",
                p.mask_input_channels,
            ),
        ];
        for (what, value) in positive {
            ensure!(value > 0, "{what} must be positive");
        }
        ensure!(
            v.image_size % v.patch_size == 0 && v.image_size >= v.patch_size,
            "vision_config: image_size {} is not a multiple of patch_size {}",
            v.image_size,
            v.patch_size
        );
        ensure!(
            v.hidden_size % v.num_attention_heads == 0,
            "vision_config: hidden_size {} is not a multiple of num_attention_heads {}",
            v.hidden_size,
            v.num_attention_heads
        );
        if let Some(i) = v
            .global_attn_indexes
            .iter()
            .find(|&&i| i >= v.num_hidden_layers)
        {
            bail!(
                "vision_config: global_attn_indexes names layer {i} of {}",
                v.num_hidden_layers
            );
        }
        ensure!(
            v.window_size > 0 || v.global_attn_indexes.len() == v.num_hidden_layers,
            "vision_config: window_size 0 with windowed layers"
        );
        ensure!(
            p.image_size / p.patch_size == v.grid(),
            "prompt_encoder_config's image {} / patch {} does not match the vision encoder's {} / {}",
            p.image_size,
            p.patch_size,
            v.image_size,
            v.patch_size
        );
        ensure!(
            v.output_channels == p.hidden_size && p.hidden_size == d.hidden_size,
            "vision_config.output_channels {}, prompt_encoder_config.hidden_size {} and \
             mask_decoder_config.hidden_size {} must be equal",
            v.output_channels,
            p.hidden_size,
            d.hidden_size
        );
        ensure!(
            2 * v.num_pos_feats == d.hidden_size,
            "vision_config.num_pos_feats {} must be half the decoder's hidden_size {}",
            v.num_pos_feats,
            d.hidden_size
        );
        ensure!(
            d.hidden_size % 8 == 0,
            "mask_decoder_config.hidden_size {} is not a multiple of 8 (the upscaling's widths)",
            d.hidden_size
        );
        let inner = d.hidden_size / d.attention_downsample_rate;
        ensure!(
            d.hidden_size % d.num_attention_heads == 0
                && inner % d.num_attention_heads == 0
                && inner > 0,
            "mask_decoder_config: num_attention_heads {} does not divide hidden_size {} and \
             hidden_size / attention_downsample_rate {inner}",
            d.num_attention_heads,
            d.hidden_size
        );
        ensure!(
            p.num_point_embeddings >= 4,
            "prompt_encoder_config.num_point_embeddings {} is below 4 (negative, positive, two box corners)",
            p.num_point_embeddings
        );
        ensure!(
            p.mask_input_channels % 4 == 0,
            "prompt_encoder_config.mask_input_channels {} is not a multiple of 4",
            p.mask_input_channels
        );
        ensure!(
            d.iou_head_depth >= 2,
            "mask_decoder_config.iou_head_depth {} is below 2",
            d.iou_head_depth
        );
        Ok(())
    }
}

/// `SamImageProcessor`'s settings (preprocessor_config.json).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    /// The resized image's longest side (`size.longest_edge`); `None`: `do_resize` is false.
    pub longest_edge: Option<usize>,
    /// `rescale_factor` when `do_rescale`.
    pub rescale: Option<f64>,
    /// `image_mean`, `image_std` when `do_normalize`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
    /// `pad_size` (height, width) when `do_pad`.
    pub pad: Option<(usize, usize)>,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            longest_edge: Some(1024),
            rescale: Some(1.0 / 255.0),
            normalize: Some(([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])),
            pad: Some((1024, 1024)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct RawSize {
    longest_edge: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawPad {
    height: usize,
    width: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct RawProcessor {
    do_resize: bool,
    size: Option<RawSize>,
    resample: u32,
    do_rescale: bool,
    rescale_factor: f64,
    do_normalize: bool,
    image_mean: Vec<f32>,
    image_std: Vec<f32>,
    do_pad: bool,
    pad_size: Option<RawPad>,
}

impl Default for RawProcessor {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: None,
            resample: 2,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: vec![0.485, 0.456, 0.406],
            image_std: vec![0.229, 0.224, 0.225],
            do_pad: true,
            pad_size: None,
        }
    }
}

impl ProcessorConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawProcessor = serde_json::from_str(text)?;
        // PIL's resampling codes: 2 is BILINEAR, what every SAM checkpoint uses.
        ensure!(
            raw.resample == 2,
            "resample {} is not supported: only 2 (bilinear), SAM's",
            raw.resample
        );
        let longest_edge = if raw.do_resize {
            let n = raw.size.and_then(|s| s.longest_edge).unwrap_or(1024);
            ensure!(n > 0, "size.longest_edge must be positive");
            check_dim("size.longest_edge", n, 4096)?;
            Some(n)
        } else {
            None
        };
        let three = |v: &[f32], what: &str| -> Result<[f32; 3]> {
            match *v {
                [a, b, c] => Ok([a, b, c]),
                [a] => Ok([a; 3]),
                _ => bail!("{what} has {} values, not 3", v.len()),
            }
        };
        let normalize = if raw.do_normalize {
            let std = three(&raw.image_std, "image_std")?;
            ensure!(
                std.iter().all(|s| *s != 0.0 && s.is_finite()),
                "image_std has a zero"
            );
            Some((three(&raw.image_mean, "image_mean")?, std))
        } else {
            None
        };
        let pad = if raw.do_pad {
            let p = raw.pad_size.unwrap_or(RawPad {
                height: 1024,
                width: 1024,
            });
            check_dim("pad_size.height", p.height, 4096)?;
            check_dim("pad_size.width", p.width, 4096)?;
            Some((p.height, p.width))
        } else {
            None
        };
        Ok(Self {
            longest_edge,
            rescale: raw.do_rescale.then_some(raw.rescale_factor),
            normalize,
            pad,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slimsam_hub_configs_take_transformers_defaults() {
        // Zigeng/SlimSAM-uniform-77's config.json, field for field.
        let text = r#"{"architectures": ["SamModel"], "initializer_range": 0.02,
            "mask_decoder_config": {"model_type": ""}, "model_type": "sam",
            "prompt_encoder_config": {"model_type": ""}, "torch_dtype": "float32",
            "transformers_version": "4.37.0.dev0",
            "vision_config": {"hidden_size": 168, "mlp_dim": 696, "model_type": ""}}"#;
        let c = SamConfig::from_json(text).unwrap();
        assert_eq!(c.vision.hidden_size, 168);
        assert_eq!(c.vision.mlp_dim, 696);
        assert_eq!(c.vision.num_attention_heads, 12);
        assert_eq!(c.vision.grid(), 64);
        assert_eq!(c.vision.window(2), 0);
        assert_eq!(c.vision.window(3), 14);
        assert_eq!(c.decoder.hidden_size, 256);
        assert_eq!(c.prompt.image_size, 1024);
        // SAM ViT-B: mlp_dim from mlp_ratio.
        let c = SamConfig::from_json(r#"{"model_type": "sam"}"#).unwrap();
        assert_eq!(c.vision.mlp_dim, 3072);
    }

    #[test]
    fn inconsistent_configs_are_refused() {
        for (text, says) in [
            (
                r#"{"vision_config": {"hidden_size": 100}}"#,
                "num_attention_heads",
            ),
            (
                r#"{"vision_config": {"output_channels": 128}}"#,
                "must be equal",
            ),
            (
                r#"{"vision_config": {"patch_size": 15}}"#,
                "multiple of patch_size",
            ),
            (
                r#"{"vision_config": {"global_attn_indexes": [12]}}"#,
                "names layer 12",
            ),
            (
                r#"{"vision_config": {"hidden_act": "swish"}}"#,
                "not supported",
            ),
            (r#"{"model_type": "sam2"}"#, "not `sam`"),
            (
                r#"{"mask_decoder_config": {"num_multimask_outputs": 0}}"#,
                "num_multimask_outputs must be positive",
            ),
            (
                r#"{"vision_config": {"hidden_size": 10000000000}}"#,
                "beyond any real model",
            ),
        ] {
            let err = SamConfig::from_json(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn processor_configs_read_their_flags() {
        let p = ProcessorConfig::from_json(
            r#"{"size": {"longest_edge": 64}, "pad_size": {"height": 64, "width": 64},
                "resample": 2, "do_rescale": true, "rescale_factor": 0.00392156862745098}"#,
        )
        .unwrap();
        assert_eq!(p.longest_edge, Some(64));
        assert_eq!(p.pad, Some((64, 64)));
        assert_eq!(
            ProcessorConfig::from_json("{}").unwrap(),
            ProcessorConfig::default()
        );
        let e = ProcessorConfig::from_json(r#"{"resample": 3}"#).unwrap_err();
        assert!(e.to_string().contains("bilinear"), "{e}");
    }
}
