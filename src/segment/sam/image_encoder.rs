//! SAM's image encoder (transformers `SamVisionEncoder`): a ViT over 16x16 patches with an
//! absolute position embedding, windowed attention in most layers and global attention in a
//! few, both with decomposed relative positions (MViTv2), then a convolutional neck down to
//! the prompt decoder's width.

use super::config::{Act, VisionConfig};
use anyhow::{Result, ensure};
use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};

/// Layer norm over the channels of an NCHW tensor (transformers' `SamLayerNorm`,
/// `channels_first`).
pub fn layer_norm_nchw(x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
    Ok(ln
        .forward(&x.permute((0, 2, 3, 1))?)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// Attention logits computed at once (f32, 4 MiB): a 64x64 grid's global attention is
/// 4096² per head, so it goes a block of query rows at a time, which also keeps the block in
/// cache between the product, the softmax and the product with the values.
const ATTN_BLOCK: usize = 1 << 20;

struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    head_dim: usize,
    /// [2 * side - 1, head_dim] each, for a side x side window (or the whole grid).
    rel_pos: Option<(Tensor, Tensor)>,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &VisionConfig, side: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.num_attention_heads;
        let qkv = if cfg.qkv_bias {
            candle_nn::linear(h, 3 * h, vb.pp("qkv"))?
        } else {
            candle_nn::linear_no_bias(h, 3 * h, vb.pp("qkv"))?
        };
        let rel_pos = if cfg.use_rel_pos {
            // transformers interpolates a table of another length; the Hub's checkpoints all
            // have 2 * side - 1 rows, and a file that does not is refused by its shape.
            let n = 2 * side - 1;
            Some((
                vb.get((n, head_dim), "rel_pos_h")?,
                vb.get((n, head_dim), "rel_pos_w")?,
            ))
        } else {
            None
        };
        Ok(Self {
            qkv,
            proj: candle_nn::linear(h, h, vb.pp("proj"))?,
            heads: cfg.num_attention_heads,
            head_dim,
            rel_pos,
        })
    }

    /// `x`: [B, H, W, C] (one window per batch row) to the same shape.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, _) = x.dims4()?;
        let n = h * w;
        let (heads, hd) = (self.heads, self.head_dim);
        let qkv = tokens_linear(&self.qkv, x)?
            .reshape((b, n, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))?
            .reshape((3, b * heads, n, hd))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let rel = match &self.rel_pos {
            Some((rh, rw)) => Some(decomposed_rel_pos(
                &q,
                &gather_rel(rh, h)?,
                &gather_rel(rw, w)?,
                h,
                w,
            )?),
            None => None,
        };
        let q = (q * (hd as f64).powf(-0.5))?;
        let kt = k.t()?.contiguous()?;
        let rows = b * heads;
        // Whole (window, head) rows while they are small, else blocks of query rows.
        let (row_step, query_step) = if n * n <= ATTN_BLOCK {
            ((ATTN_BLOCK / (n * n).max(1)).clamp(1, rows), n)
        } else {
            (1, (ATTN_BLOCK / n).clamp(1, n))
        };
        let mut outs = Vec::with_capacity(rows.div_ceil(row_step));
        for r0 in (0..rows).step_by(row_step) {
            let rl = row_step.min(rows - r0);
            let (kt, v) = (kt.narrow(0, r0, rl)?, v.narrow(0, r0, rl)?);
            let mut blocks = Vec::with_capacity(n.div_ceil(query_step));
            for q0 in (0..n).step_by(query_step) {
                let ql = query_step.min(n - q0);
                let logits = q.narrow(0, r0, rl)?.narrow(1, q0, ql)?.matmul(&kt)?;
                let p = match &rel {
                    // Rows (r, i) for r in r0.., i in q0..: contiguous, as rl = 1 or ql = n.
                    Some((rel_h, rel_w)) => {
                        let first = r0 * n + q0;
                        let count = rl * ql;
                        softmax_with_rel_pos(
                            &logits,
                            &rel_h[first * h..(first + count) * h],
                            &rel_w[first * w..(first + count) * w],
                            h,
                            w,
                        )?
                    }
                    None => candle_nn::ops::softmax_last_dim(&logits)?,
                };
                blocks.push(p.matmul(&v)?);
            }
            outs.push(Tensor::cat(&blocks, 1)?);
        }
        let out = Tensor::cat(&outs, 0)?
            .reshape((b, heads, h, w, hd))?
            .permute((0, 2, 3, 1, 4))?
            .reshape((b, h, w, heads * hd))?;
        tokens_linear(&self.proj, &out)
    }
}

/// `lin` over the last axis of `x` [.., C] through the models' fused linear kernel: one
/// product over all tokens, where candle's `Linear` on a rank-4 input broadcasts the weight
/// and runs one small product per leading row (64 of 64 tokens each on a 64x64 grid),
/// packing the whole weight again for each.
fn tokens_linear(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    crate::models::blocks::linear_fused(x, lin.weight(), None, lin.bias(), None)
}

/// The table's rows for every (query, key) pair along one axis: [q, k, C], row
/// `q - k + side - 1` (transformers' `get_rel_pos` with equal query and key sizes).
fn gather_rel(table: &Tensor, side: usize) -> Result<Tensor> {
    let (rows, c) = table.dims2()?;
    ensure!(
        rows == 2 * side - 1,
        "relative position table has {rows} rows for a side of {side}"
    );
    let idx: Vec<u32> = (0..side)
        .flat_map(|q| (0..side).map(move |k| (q + side - 1 - k) as u32))
        .collect();
    let idx = Tensor::from_vec(idx, side * side, table.device())?;
    Ok(table.index_select(&idx, 0)?.reshape((side, side, c))?)
}

/// The two factors of the decomposed relative position bias, from the unscaled queries `q`
/// [B, h*w, C] and the gathered tables [h, h, C], [w, w, C]: `rel_h` [B, h, w, kh] and
/// `rel_w` [B, h, w, kw] (transformers' two einsums), each as a flat row-major vector.
fn decomposed_rel_pos(
    q: &Tensor,
    rh: &Tensor,
    rw: &Tensor,
    h: usize,
    w: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (b, _, c) = q.dims3()?;
    let q = q.reshape((b, h, w, c))?;
    // einsum bhwc,hkc->bhwk: one matmul per query row.
    let rel_h = q
        .transpose(0, 1)?
        .contiguous()?
        .reshape((h, b * w, c))?
        .matmul(&rh.transpose(1, 2)?.contiguous()?)?
        .reshape((h, b, w, h))?
        .transpose(0, 1)?;
    // einsum bhwc,wkc->bhwk: one matmul per query column.
    let rel_w = q
        .permute((2, 0, 1, 3))?
        .contiguous()?
        .reshape((w, b * h, c))?
        .matmul(&rw.transpose(1, 2)?.contiguous()?)?
        .reshape((w, b, h, w))?
        .permute((1, 2, 0, 3))?;
    Ok((
        rel_h.flatten_all()?.to_vec1::<f32>()?,
        rel_w.flatten_all()?.to_vec1::<f32>()?,
    ))
}

/// softmax(logits + (rel_h[row, kh] + rel_w[row, kw])) over each row of `logits` [.., n]
/// (n = h*w keys, key kh*w + kw), in one pass per row instead of a broadcast bias tensor the
/// size of the logits and two more passes over it; rows in parallel. Written for the CPU,
/// where tkg runs SAM: on another device the block goes through host memory.
fn softmax_with_rel_pos(
    logits: &Tensor,
    rel_h: &[f32],
    rel_w: &[f32],
    h: usize,
    w: usize,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let n = logits.dims().last().copied().unwrap_or(0);
    let rows = logits.elem_count() / n.max(1);
    ensure!(
        n == h * w && rel_h.len() == rows * h && rel_w.len() == rows * w,
        "relative position bias does not fit the attention logits"
    );
    let mut data = logits.flatten_all()?.to_vec1::<f32>()?;
    data.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
        let (bh, bw) = (&rel_h[r * h..(r + 1) * h], &rel_w[r * w..(r + 1) * w]);
        for (kh, keys) in row.chunks_exact_mut(w).enumerate() {
            for (x, &rw) in keys.iter_mut().zip(bw) {
                *x += bh[kh] + rw;
            }
        }
        let max = crate::kernels::simd::max(row);
        let sum = crate::kernels::simd::exp_shifted_sum(row, max) as f32;
        for x in row.iter_mut() {
            *x /= sum;
        }
    });
    Ok(Tensor::from_vec(data, logits.shape(), logits.device())?)
}

/// transformers' `SamMLPBlock`: lin1, activation, lin2.
pub(super) struct Mlp {
    lin1: Linear,
    lin2: Linear,
    act: Act,
}

impl Mlp {
    pub(super) fn load(vb: VarBuilder, width: usize, inner: usize, act: Act) -> Result<Self> {
        Ok(Self {
            lin1: candle_nn::linear(width, inner, vb.pp("lin1"))?,
            lin2: candle_nn::linear(inner, width, vb.pp("lin2"))?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.act.apply(&tokens_linear(&self.lin1, x)?)?;
        tokens_linear(&self.lin2, &x)
    }
}

struct Layer {
    layer_norm1: LayerNorm,
    attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
    window: usize,
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &VisionConfig, window: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        let ln = |name: &str| candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp(name));
        let side = if window == 0 { cfg.grid() } else { window };
        Ok(Self {
            layer_norm1: ln("layer_norm1")?,
            attn: Attention::load(vb.pp("attn"), cfg, side)?,
            layer_norm2: ln("layer_norm2")?,
            mlp: Mlp::load(vb.pp("mlp"), h, cfg.mlp_dim, cfg.act)?,
            window,
        })
    }

    /// [B, H, W, C] to the same shape.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = self.layer_norm1.forward(x)?;
        let attended = if self.window > 0 {
            let (_, h, w, _) = normed.dims4()?;
            let (windows, padded) = window_partition(&normed, self.window)?;
            let out = self.attn.forward(&windows)?;
            window_unpartition(&out, self.window, padded, (h, w))?
        } else {
            self.attn.forward(&normed)?
        };
        let x = (x + attended)?;
        let m = self.mlp.forward(&self.layer_norm2.forward(&x)?)?;
        Ok((x + m)?)
    }
}

/// [B, H, W, C], zero-padded to multiples of `ws`, as [B * windows, ws, ws, C], and the padded
/// (H, W).
fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    let (ph, pw) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let x = x
        .pad_with_zeros(1, 0, ph - h)?
        .pad_with_zeros(2, 0, pw - w)?;
    let windows = x
        .reshape((b, ph / ws, ws, pw / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * (ph / ws) * (pw / ws), ws, ws, c))?;
    Ok((windows, (ph, pw)))
}

/// The inverse of [`window_partition`], the padding cut off.
fn window_unpartition(
    windows: &Tensor,
    ws: usize,
    (ph, pw): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let per_image = (ph / ws) * (pw / ws);
    let (n, _, _, c) = windows.dims4()?;
    let b = n / per_image;
    Ok(windows
        .reshape((b, ph / ws, pw / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, ph, pw, c))?
        .narrow(1, 0, h)?
        .narrow(2, 0, w)?
        .contiguous()?)
}

struct Neck {
    conv1: Conv2d,
    layer_norm1: LayerNorm,
    conv2: Conv2d,
    layer_norm2: LayerNorm,
}

impl Neck {
    fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let out = cfg.output_channels;
        // SamLayerNorm's own default eps (1e-6), not the config's.
        let ln = |name: &str| candle_nn::layer_norm(out, 1e-6, vb.pp(name));
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv1: candle_nn::conv2d_no_bias(
                cfg.hidden_size,
                out,
                1,
                Default::default(),
                vb.pp("conv1"),
            )?,
            layer_norm1: ln("layer_norm1")?,
            conv2: candle_nn::conv2d_no_bias(out, out, 3, pad1, vb.pp("conv2"))?,
            layer_norm2: ln("layer_norm2")?,
        })
    }

    /// [B, H, W, C] to [B, output_channels, H, W].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.permute((0, 3, 1, 2))?.contiguous()?;
        let x = layer_norm_nchw(&self.conv1.forward(&x)?, &self.layer_norm1)?;
        layer_norm_nchw(&self.conv2.forward(&x)?, &self.layer_norm2)
    }
}

/// The whole image encoder.
pub struct ImageEncoder {
    patch_embed: Conv2d,
    pos_embed: Option<Tensor>,
    layers: Vec<Layer>,
    neck: Neck,
    image_size: usize,
    channels: usize,
}

impl ImageEncoder {
    pub fn load(vb: VarBuilder, cfg: &VisionConfig) -> Result<Self> {
        let g = cfg.grid();
        let patch_embed = candle_nn::conv2d(
            cfg.num_channels,
            cfg.hidden_size,
            cfg.patch_size,
            Conv2dConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
            vb.pp("patch_embed.projection"),
        )?;
        let pos_embed = if cfg.use_abs_pos {
            Some(vb.get((1, g, g, cfg.hidden_size), "pos_embed")?)
        } else {
            None
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(vb.pp(format!("layers.{i}")), cfg, cfg.window(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed,
            pos_embed,
            layers,
            neck: Neck::load(vb.pp("neck"), cfg)?,
            image_size: cfg.image_size,
            channels: cfg.num_channels,
        })
    }

    /// `pixels` [B, 3, S, S] (the processor's output) to the image embeddings
    /// [B, output_channels, S / patch, S / patch].
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        ensure!(
            c == self.channels && h == self.image_size && w == self.image_size,
            "the image encoder takes {}x{s}x{s} pixels, not {c}x{h}x{w}",
            self.channels,
            s = self.image_size
        );
        let mut x = self
            .patch_embed
            .forward(pixels)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        if let Some(p) = &self.pos_embed {
            x = x.broadcast_add(p)?;
        }
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.neck.forward(&x)
    }
}
