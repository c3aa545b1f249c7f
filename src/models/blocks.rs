//! The building blocks of the UNet and the VAE, as diffusers defines them.
//!
//! candle-transformers' stable-diffusion blocks are close but not exact: their resnets in
//! down/up blocks ignore `norm_num_groups` (always 32) and their GEGLU uses the tanh GELU
//! approximation. Both break parity on other configurations, so the blocks live here.

use anyhow::Result;
use candle_core::{D, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, LayerNorm, Linear, VarBuilder};

fn conv3(vb: VarBuilder, cin: usize, cout: usize) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(candle_nn::conv2d(cin, cout, 3, cfg, vb)?)
}

fn conv1(vb: VarBuilder, cin: usize, cout: usize) -> Result<Conv2d> {
    Ok(candle_nn::conv2d(cin, cout, 1, Default::default(), vb)?)
}

/// A 2D resnet block with optional timestep-embedding input (`ResnetBlock2D`).
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

/// Settings shared by the resnets of one network.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock {
    pub fn load(vb: VarBuilder, cin: usize, cout: usize, s: ResnetSettings) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::group_norm(s.groups, cin, s.eps, vb.pp("norm1"))?,
            conv1: conv3(vb.pp("conv1"), cin, cout)?,
            time_emb_proj: match s.temb_channels {
                Some(t) => Some(candle_nn::linear(t, cout, vb.pp("time_emb_proj"))?),
                None => None,
            },
            norm2: candle_nn::group_norm(s.groups, cout, s.eps, vb.pp("norm2"))?,
            conv2: conv3(vb.pp("conv2"), cout, cout)?,
            conv_shortcut: if cin != cout {
                Some(conv1(vb.pp("conv_shortcut"), cin, cout)?)
            } else {
                None
            },
            output_scale_factor: s.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = candle_nn::ops::silu(&self.norm1.forward(xs)?)?;
        let mut h = self.conv1.forward(&h)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&candle_nn::ops::silu(temb)?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = candle_nn::ops::silu(&self.norm2.forward(&h)?)?;
        let h = self.conv2.forward(&h)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = (x + h)?;
        Ok(if self.output_scale_factor == 1.0 {
            out
        } else {
            (out / self.output_scale_factor)?
        })
    }
}

/// Scaled dot-product attention over [batch, heads, tokens, head_dim] tensors.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let scale = (q.dim(D::Minus1)? as f64).powf(-0.5);
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs.matmul(v)?)
}

/// Multi-head attention with separate q/k/v projections (diffusers `Attention`).
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    /// Transformer attention: q/k/v without bias, output with bias.
    pub fn load(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: candle_nn::linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: candle_nn::linear_no_bias(context_dim, dim, vb.pp("to_k"))?,
            to_v: candle_nn::linear_no_bias(context_dim, dim, vb.pp("to_v"))?,
            to_out: candle_nn::linear(dim, dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    /// `xs`: [batch, tokens, dim]; `context`: [batch, ctx_tokens, ctx_dim] or self.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(xs);
        let (b, n, dim) = xs.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            let m = t.dim(1)?;
            Ok(t.reshape((b, m, self.heads, dim / self.heads))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.to_q.forward(xs)?)?;
        let k = split(self.to_k.forward(ctx)?)?;
        let v = split(self.to_v.forward(ctx)?)?;
        let o = attention(&q, &k, &v)?
            .transpose(1, 2)?
            .reshape((b, n, dim))?;
        Ok(self.to_out.forward(&o)?)
    }
}

/// GEGLU feed-forward with the exact (erf) GELU.
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: candle_nn::linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: candle_nn::linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(xs)?;
        let parts = h.chunk(2, D::Minus1)?;
        let h = (&parts[0] * parts[1].gelu_erf()?)?;
        Ok(self.out.forward(&h)?)
    }
}

#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn load(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let ln = |name: &str| candle_nn::layer_norm(dim, 1e-5, vb.pp(name));
        Ok(Self {
            norm1: ln("norm1")?,
            attn1: Attention::load(vb.pp("attn1"), dim, dim, heads)?,
            norm2: ln("norm2")?,
            attn2: Attention::load(vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: ln("norm3")?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        Ok((self.ff.forward(&self.norm3.forward(&xs)?)? + xs)?)
    }
}

#[derive(Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// A spatial transformer over a feature map (diffusers `Transformer2DModel`).
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

/// Settings for the spatial transformers of one UNet level.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSettings {
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl Transformer2D {
    pub fn load(vb: VarBuilder, channels: usize, s: TransformerSettings) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(if s.linear_projection {
                Proj::Linear(candle_nn::linear(channels, channels, vb.pp(name))?)
            } else {
                Proj::Conv(conv1(vb.pp(name), channels, channels)?)
            })
        };
        Ok(Self {
            norm: candle_nn::group_norm(s.groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: proj("proj_in")?,
            blocks: (0..s.depth)
                .map(|i| {
                    TransformerBlock::load(
                        vb.pp("transformer_blocks").pp(i),
                        channels,
                        s.context_dim,
                        s.heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let x = self.norm.forward(xs)?;
        let to_tokens =
            |x: Tensor| -> Result<Tensor> { Ok(x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?) };
        let to_map = |x: Tensor| -> Result<Tensor> {
            Ok(x.reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        let mut x = match &self.proj_in {
            Proj::Conv(p) => to_tokens(p.forward(&x)?)?,
            Proj::Linear(p) => p.forward(&to_tokens(x)?)?,
        };
        for blk in &self.blocks {
            x = blk.forward(&x, context)?;
        }
        let x = match &self.proj_out {
            Proj::Conv(p) => p.forward(&to_map(x)?)?,
            Proj::Linear(p) => to_map(p.forward(&x)?)?,
        };
        Ok((x + xs)?)
    }
}

/// 3x3 stride-2 convolution (`Downsample2D` with a conv).
#[derive(Debug)]
pub struct Downsample {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample {
    pub fn load(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            padding,
            ..Default::default()
        };
        Ok(Self {
            conv: candle_nn::conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            // diffusers pads (0, 1, 0, 1) when the conv itself has no padding (the VAE encoder).
            let x = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            Ok(self.conv.forward(&x)?)
        } else {
            Ok(self.conv.forward(xs)?)
        }
    }
}

/// Nearest-neighbour 2x upsampling followed by a 3x3 conv (`Upsample2D`).
#[derive(Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3(vb.pp("conv"), channels, channels)?,
        })
    }

    /// `size`: the output size when it is not exactly twice the input.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        Ok(self.conv.forward(&xs.upsample_nearest2d(oh, ow)?)?)
    }
}

/// The VAE's single-head self-attention over a feature map, with a residual.
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    pub fn load(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        // Old checkpoints name the projections query/key/value/proj_attn.
        let (q, k, v, o) =
            if vb.contains_tensor("query.weight") && !vb.contains_tensor("to_q.weight") {
                ("query", "key", "value", "proj_attn")
            } else {
                ("to_q", "to_k", "to_v", "to_out.0")
            };
        let lin = |name: &str| candle_nn::linear(channels, channels, vb.pp(name));
        Ok(Self {
            group_norm: candle_nn::group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: lin(q)?,
            to_k: lin(k)?,
            to_v: lin(v)?,
            to_out: lin(o)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let x = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let one_head = |t: Tensor| -> Result<Tensor> { Ok(t.unsqueeze(1)?) };
        let q = one_head(self.to_q.forward(&x)?)?;
        let k = one_head(self.to_k.forward(&x)?)?;
        let v = one_head(self.to_v.forward(&x)?)?;
        let o = attention(&q, &k, &v)?.squeeze(1)?;
        let o = self.to_out.forward(&o)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((o + xs)?)
    }
}
