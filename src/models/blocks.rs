//! The building blocks of the UNet and the VAE, as diffusers defines them.
//!
//! candle-transformers' stable-diffusion blocks are close but not exact: their resnets in
//! down/up blocks ignore `norm_num_groups` (always 32) and their GEGLU uses the tanh GELU
//! approximation. Both break parity on other configurations, so the blocks live here.
//!
//! On the CPU in f32 every block runs on [`crate::kernels`] (fused group norm + SiLU, convs with
//! the bias, timestep embedding and residual fused in, attention without the score tensor,
//! fused q/k/v projections); elsewhere it runs on candle's ops. Both paths compute the same
//! function, up to float rounding.
//!
//! Weight matrices and kernels may be kept in f16 or bf16 while activations are f32
//! ([`crate::models::weights::WeightStorage`]): the kernels widen them per call, and the candle
//! paths convert them with [`like`].

use crate::kernels;
use anyhow::Result;
use candle_core::{D, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use std::borrow::Cow;

/// A group norm, optionally followed by SiLU (`GroupNorm` [+ `SiLU`]).
#[derive(Debug)]
pub struct Norm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl Norm {
    pub fn load(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        anyhow::ensure!(
            groups > 0 && channels.is_multiple_of(groups),
            "{channels} channels do not split into {groups} groups"
        );
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if kernels::applies(xs) {
            return kernels::norm::group_norm(
                xs,
                self.groups,
                &self.weight,
                &self.bias,
                self.eps,
                silu,
            );
        }
        let gn = candle_nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            self.weight.dim(0)?,
            self.groups,
            self.eps,
        )?;
        let y = gn.forward(xs)?;
        Ok(if silu { candle_nn::ops::silu(&y)? } else { y })
    }
}

/// A 2D convolution with bias (`nn.Conv2d`), square kernel, groups = 1.
#[derive(Debug)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    /// The weight's packed forms for bf16 products, made on first use.
    prepared: kernels::PreparedConv,
}

impl Conv {
    pub fn load(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, kernel, kernel), "weight")?,
            bias: Some(vb.get(cout, "bias")?),
            stride,
            padding,
            prepared: Default::default(),
        })
    }

    /// 3x3, padding 1.
    pub fn load3(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Self::load(vb, cin, cout, 3, 1, 1)
    }

    /// 1x1.
    pub fn load1(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Self::load(vb, cin, cout, 1, 1, 0)
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_fused(xs, None, None)
    }

    /// `conv(xs) + extra_bias + residual`, where `extra_bias` is [B, Cout] (added per batch
    /// item and channel, e.g. a timestep embedding) and `residual` has the output's shape.
    pub fn forward_fused(
        &self,
        xs: &Tensor,
        extra_bias: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if kernels::applies(xs) {
            let bias = match (&self.bias, extra_bias) {
                (Some(b), Some(e)) => Some(e.broadcast_add(&b.unsqueeze(0)?)?),
                (Some(b), None) => Some(b.clone()),
                (None, Some(e)) => Some(e.clone()),
                (None, None) => None,
            };
            return kernels::conv::conv2d_prepared(
                xs,
                &self.weight,
                &self.prepared,
                bias.as_ref(),
                residual,
                self.stride,
                self.padding,
                1,
            );
        }
        let mut h = xs.conv2d(&*like(&self.weight, xs)?, self.padding, self.stride, 1, 1)?;
        if let Some(b) = &self.bias {
            h = h.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
        }
        if let Some(e) = extra_bias {
            h = h.broadcast_add(&e.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        Ok(match residual {
            Some(r) => (r + h)?,
            None => h,
        })
    }

    /// `conv(upsample_nearest(xs, size))`, fused when the size is exactly 2x.
    pub fn forward_upsampled(&self, xs: &Tensor, (oh, ow): (usize, usize)) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        if kernels::applies(xs) && self.stride == 1 && oh == 2 * h && ow == 2 * w {
            return kernels::conv::conv2d_prepared(
                xs,
                &self.weight,
                &self.prepared,
                self.bias.as_ref(),
                None,
                1,
                self.padding,
                2,
            );
        }
        self.forward(&xs.upsample_nearest2d(oh, ow)?)
    }
}

/// `x · wᵀ + b (+ residual)`, on the fused kernel where it applies.
/// `prepared` keeps the weight's packed form for the kernels (bf16 products), where the
/// caller has one for this weight.
pub(crate) fn linear_fused(
    x: &Tensor,
    w: &Tensor,
    prepared: Option<&kernels::PreparedLinear>,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if kernels::applies(x) {
        return kernels::linear::linear(x, w, prepared, b, residual);
    }
    let y = Linear::new(like(w, x)?.into_owned(), b.cloned()).forward(x)?;
    Ok(match residual {
        Some(r) => (y + r)?,
        None => y,
    })
}

/// `w` in `x`'s dtype: a weight kept narrower than the activations, converted for candle's
/// ops (the kernels widen weights themselves).
pub(crate) fn like<'a>(w: &'a Tensor, x: &Tensor) -> Result<Cow<'a, Tensor>> {
    Ok(if w.dtype() == x.dtype() {
        Cow::Borrowed(w)
    } else {
        Cow::Owned(w.to_dtype(x.dtype())?)
    })
}

/// Weight matrices stacked by rows. They are kept in one dtype unless a LoRA widened some of
/// them to f32 (see [`WeightStorage::Auto`](crate::models::weights::WeightStorage)); then all
/// are widened.
fn cat_rows(ws: &[&Tensor]) -> Result<Tensor> {
    let dtype = ws[0].dtype();
    if ws.iter().all(|w| w.dtype() == dtype) {
        return Ok(Tensor::cat(ws, 0)?);
    }
    let wide = ws
        .iter()
        .map(|w| w.to_dtype(candle_core::DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&wide, 0)?)
}

/// A linear layer (`nn.Linear`) on [`linear_fused`], so its weight may be kept narrower than
/// the activations.
#[derive(Debug, Clone)]
pub struct Dense {
    /// [out, in]
    weight: Tensor,
    /// [out]
    bias: Option<Tensor>,
    /// The weight's packed forms for bf16 products, made on first use.
    prepared: kernels::PreparedLinear,
}

impl Dense {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            prepared: Default::default(),
        }
    }

    pub fn load(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self::new(
            vb.get((cout, cin), "weight")?,
            Some(vb.get(cout, "bias")?),
        ))
    }

    pub fn load_no_bias(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Ok(Self::new(vb.get((cout, cin), "weight")?, None))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kept = Some(&self.prepared);
        linear_fused(x, &self.weight, kept, self.bias.as_ref(), None)
    }

    /// `forward(x) + residual`.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let kept = Some(&self.prepared);
        linear_fused(x, &self.weight, kept, self.bias.as_ref(), Some(residual))
    }
}

/// A 2D resnet block with optional timestep-embedding input (`ResnetBlock2D`).
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: Norm,
    conv1: Conv,
    time_emb_proj: Option<Dense>,
    norm2: Norm,
    conv2: Conv,
    conv_shortcut: Option<Conv>,
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
            norm1: Norm::load(vb.pp("norm1"), s.groups, cin, s.eps)?,
            conv1: Conv::load3(vb.pp("conv1"), cin, cout)?,
            time_emb_proj: match s.temb_channels {
                Some(t) => Some(Dense::load(vb.pp("time_emb_proj"), t, cout)?),
                None => None,
            },
            norm2: Norm::load(vb.pp("norm2"), s.groups, cout, s.eps)?,
            conv2: Conv::load3(vb.pp("conv2"), cout, cout)?,
            conv_shortcut: if cin != cout {
                Some(Conv::load1(vb.pp("conv_shortcut"), cin, cout)?)
            } else {
                None
            },
            output_scale_factor: s.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(xs, true)?;
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => Some(proj.forward(&candle_nn::ops::silu(temb)?)?),
            _ => None,
        };
        let h = self.conv1.forward_fused(&h, t.as_ref(), None)?;
        let h = self.norm2.forward(&h, true)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = self.conv2.forward_fused(&h, None, Some(&x))?;
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

/// Attention on [B, N, heads·d] tensors (heads as column blocks), returning [B, Nq, heads·d].
fn attention_tokens(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if kernels::applies(q) {
        return kernels::attention::attention(q, k, v, heads);
    }
    let (b, n, dim) = q.dims3()?;
    let split = |t: &Tensor| -> Result<Tensor> {
        let m = t.dim(1)?;
        Ok(t.reshape((b, m, heads, dim / heads))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let o = attention(&split(q)?, &split(k)?, &split(v)?)?;
    Ok(o.transpose(1, 2)?.reshape((b, n, dim))?)
}

/// Multi-head attention with separate q/k/v projections (diffusers `Attention`).
///
/// The projections are stored fused: k and v as one [2·dim, ctx_dim] matrix, and q, k, v as
/// one [3·dim, dim] matrix when the context has the model's width (self-attention).
#[derive(Debug)]
pub struct Attention {
    /// [dim, dim]
    w_q: Tensor,
    /// [2·dim, ctx_dim]
    w_kv: Tensor,
    /// [3·dim, dim] when ctx_dim == dim.
    w_qkv: Option<Tensor>,
    /// The packed forms of w_q, w_kv and w_qkv for bf16 products.
    kept: [kernels::PreparedLinear; 3],
    to_out: Dense,
    heads: usize,
}

impl Attention {
    /// Transformer attention: q/k/v without bias, output with bias.
    pub fn load(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        let wq = vb.get((dim, dim), "to_q.weight")?;
        let wk = vb.get((dim, context_dim), "to_k.weight")?;
        let wv = vb.get((dim, context_dim), "to_v.weight")?;
        let (w_q, w_kv, w_qkv) = if context_dim == dim {
            let qkv = cat_rows(&[&wq, &wk, &wv])?;
            (
                qkv.narrow(0, 0, dim)?,
                qkv.narrow(0, dim, 2 * dim)?,
                Some(qkv),
            )
        } else {
            (wq, cat_rows(&[&wk, &wv])?, None)
        };
        Ok(Self {
            w_q,
            w_kv,
            w_qkv,
            kept: Default::default(),
            to_out: Dense::load(vb.pp("to_out.0"), dim, dim)?,
            heads,
        })
    }

    /// `xs`: [batch, tokens, dim]; `context`: [batch, ctx_tokens, ctx_dim] or self.
    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_residual(xs, context, None)
    }

    /// [`Self::forward`] + `residual`.
    pub fn forward_residual(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dim = self.w_q.dim(0)?;
        let (q, k, v) = match (context, &self.w_qkv) {
            (None, Some(qkv)) => {
                let p = linear_fused(xs, qkv, Some(&self.kept[2]), None, None)?;
                (
                    p.narrow(D::Minus1, 0, dim)?,
                    p.narrow(D::Minus1, dim, dim)?,
                    p.narrow(D::Minus1, 2 * dim, dim)?,
                )
            }
            _ => {
                let ctx = context.unwrap_or(xs);
                let q = linear_fused(xs, &self.w_q, Some(&self.kept[0]), None, None)?;
                let kv = linear_fused(ctx, &self.w_kv, Some(&self.kept[1]), None, None)?;
                (
                    q,
                    kv.narrow(D::Minus1, 0, dim)?,
                    kv.narrow(D::Minus1, dim, dim)?,
                )
            }
        };
        let o = attention_tokens(&q, &k, &v, self.heads)?;
        match residual {
            Some(r) => self.to_out.forward_residual(&o, r),
            None => self.to_out.forward(&o),
        }
    }
}

/// GEGLU feed-forward with the exact (erf) GELU.
#[derive(Debug)]
struct FeedForward {
    proj: Dense,
    out: Dense,
}

impl FeedForward {
    fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Dense::load(vb.pp("net.0.proj"), dim, inner * 2)?,
            out: Dense::load(vb.pp("net.2"), inner, dim)?,
        })
    }

    /// `ff(xs) + residual`.
    fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(xs)?;
        let h = if kernels::applies(&h) {
            kernels::linear::geglu(&h)?
        } else {
            let parts = h.chunk(2, D::Minus1)?;
            (&parts[0] * parts[1].gelu_erf()?)?
        };
        self.out.forward_residual(&h, residual)
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
        let xs = self
            .attn1
            .forward_residual(&self.norm1.forward(xs)?, None, Some(xs))?;
        let xs =
            self.attn2
                .forward_residual(&self.norm2.forward(&xs)?, Some(context), Some(&xs))?;
        self.ff.forward_residual(&self.norm3.forward(&xs)?, &xs)
    }
}

/// proj_in / proj_out of a spatial transformer: a 1x1 conv or a linear layer (same math).
#[derive(Debug)]
struct Proj {
    /// [out, in] (linear) or [out, in, 1, 1] (conv).
    weight: Tensor,
    bias: Tensor,
    /// The weight's packed forms for bf16 products, made on first use.
    prepared: kernels::PreparedLinear,
}

impl Proj {
    fn load(vb: VarBuilder, channels: usize, linear: bool) -> Result<Self> {
        let weight = if linear {
            vb.get((channels, channels), "weight")?
        } else {
            vb.get((channels, channels, 1, 1), "weight")?
        };
        Ok(Self {
            weight,
            bias: vb.get(channels, "bias")?,
            prepared: Default::default(),
        })
    }

    /// The weight as an [out, in] matrix in `x`'s dtype, for candle's ops.
    fn matrix(&self, x: &Tensor) -> Result<Tensor> {
        let w = like(&self.weight, x)?;
        Ok(w.reshape((w.dim(0)?, ()))?)
    }

    /// Map [B, C, H, W] → tokens [B, H·W, C'].
    fn map_to_tokens(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::applies(x) {
            let kept = Some(&self.prepared);
            return kernels::linear::linear_from_map(x, &self.weight, kept, Some(&self.bias));
        }
        let (b, c, h, w) = x.dims4()?;
        let t = x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
        Ok(Linear::new(self.matrix(&t)?, Some(self.bias.clone())).forward(&t)?)
    }

    /// Tokens [B, H·W, C] → map [B, C', H, W] + residual.
    fn tokens_to_map(&self, t: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = residual.dims4()?;
        if kernels::applies(t) {
            return kernels::linear::linear_to_map(
                t,
                &self.weight,
                Some(&self.prepared),
                Some(&self.bias),
                Some(residual),
                (h, w),
            );
        }
        let y = Linear::new(self.matrix(t)?, Some(self.bias.clone())).forward(t)?;
        let c = y.dim(2)?;
        let y = y.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        Ok((y + residual)?)
    }
}

/// A spatial transformer over a feature map (diffusers `Transformer2DModel`).
#[derive(Debug)]
pub struct Transformer2D {
    norm: Norm,
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
        Ok(Self {
            norm: Norm::load(vb.pp("norm"), s.groups, channels, 1e-6)?,
            proj_in: Proj::load(vb.pp("proj_in"), channels, s.linear_projection)?,
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
            proj_out: Proj::load(vb.pp("proj_out"), channels, s.linear_projection)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(xs, false)?;
        let mut x = self.proj_in.map_to_tokens(&x)?;
        for blk in &self.blocks {
            x = blk.forward(&x, context)?;
        }
        self.proj_out.tokens_to_map(&x, xs)
    }
}

/// 3x3 stride-2 convolution (`Downsample2D` with a conv).
#[derive(Debug)]
pub struct Downsample {
    conv: Conv,
    pad_right_bottom: bool,
}

impl Downsample {
    pub fn load(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv::load(vb.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_right_bottom {
            // diffusers pads (0, 1, 0, 1) when the conv itself has no padding (the VAE encoder).
            let x = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour 2x upsampling followed by a 3x3 conv (`Upsample2D`).
#[derive(Debug)]
pub struct Upsample {
    conv: Conv,
}

impl Upsample {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv::load3(vb.pp("conv"), channels, channels)?,
        })
    }

    /// `size`: the output size when it is not exactly twice the input.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        self.conv
            .forward_upsampled(xs, size.unwrap_or((2 * h, 2 * w)))
    }
}

/// The VAE's single-head self-attention over a feature map, with a residual.
#[derive(Debug)]
pub struct VaeAttention {
    group_norm: Norm,
    /// q, k, v weights stacked: [3·C, C]; biases [3·C].
    w_qkv: Tensor,
    b_qkv: Tensor,
    /// w_qkv's packed forms for bf16 products.
    kept_qkv: kernels::PreparedLinear,
    to_out: Dense,
}

/// A VAE attention projection: [C, C] or, in older checkpoints, [C, C, 1, 1].
fn vae_proj(vb: VarBuilder, channels: usize) -> Result<(Tensor, Tensor)> {
    let w = match vb.get((channels, channels), "weight") {
        Ok(w) => w,
        Err(_) => vb
            .get((channels, channels, 1, 1), "weight")?
            .reshape((channels, channels))?,
    };
    Ok((w, vb.get(channels, "bias")?))
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
        let (wq, bq) = vae_proj(vb.pp(q), channels)?;
        let (wk, bk) = vae_proj(vb.pp(k), channels)?;
        let (wv, bv) = vae_proj(vb.pp(v), channels)?;
        let (wo, bo) = vae_proj(vb.pp(o), channels)?;
        Ok(Self {
            group_norm: Norm::load(vb.pp("group_norm"), groups, channels, 1e-6)?,
            w_qkv: cat_rows(&[&wq, &wk, &wv])?,
            b_qkv: Tensor::cat(&[&bq, &bk, &bv], 0)?,
            kept_qkv: Default::default(),
            to_out: Dense::new(wo, Some(bo)),
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let x = self.group_norm.forward(xs, false)?;
        if kernels::applies(&x) {
            let kept = Some(&self.kept_qkv);
            let qkv = kernels::linear::linear_from_map(&x, &self.w_qkv, kept, Some(&self.b_qkv))?;
            let o = kernels::attention::attention(
                &qkv.narrow(2, 0, c)?,
                &qkv.narrow(2, c, c)?,
                &qkv.narrow(2, 2 * c, c)?,
                1,
            )?;
            return kernels::linear::linear_to_map(
                &o,
                self.to_out.weight(),
                Some(&self.to_out.prepared),
                self.to_out.bias.as_ref(),
                Some(xs),
                (h, w),
            );
        }
        let x = x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let qkv = linear_fused(&x, &self.w_qkv, None, Some(&self.b_qkv), None)?;
        let one_head = |t: Tensor| -> Result<Tensor> { Ok(t.contiguous()?.unsqueeze(1)?) };
        let q = one_head(qkv.narrow(2, 0, c)?)?;
        let k = one_head(qkv.narrow(2, c, c)?)?;
        let v = one_head(qkv.narrow(2, 2 * c, c)?)?;
        let o = attention(&q, &k, &v)?.squeeze(1)?;
        let o = self.to_out.forward(&o)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((o + xs)?)
    }
}
