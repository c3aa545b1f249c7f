//! SAM's mask decoder (transformers `SamMaskDecoder`): a two-way transformer between the
//! prompt tokens and the image embedding, a 4x transposed-convolution upscaling, one
//! hypernetwork MLP per mask token and an IoU head.

use super::config::MaskDecoderConfig;
use super::image_encoder::{Mlp, layer_norm_nchw};
use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::{ConvTranspose2d, ConvTranspose2dConfig, LayerNorm, Linear, VarBuilder};

/// transformers' `SamAttention`: projections down to hidden / downsample_rate, then heads.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &MaskDecoderConfig, downsample: usize) -> Result<Self> {
        let (h, inner) = (cfg.hidden_size, cfg.hidden_size / downsample);
        Ok(Self {
            q_proj: candle_nn::linear(h, inner, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, inner, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, inner, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(inner, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    /// [B, Nq, D], [B, Nk, D], [B, Nk, D] to [B, Nq, D].
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let split = |x: Tensor| -> Result<Tensor> {
            let (b, n, c) = x.dims3()?;
            Ok(x.reshape((b, n, self.heads, c / self.heads))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q_proj.forward(q)?)?;
        let k = split(self.k_proj.forward(k)?)?;
        let v = split(self.v_proj.forward(v)?)?;
        let (b, heads, n, hd) = q.dims4()?;
        let logits = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        let p = candle_nn::ops::softmax_last_dim(&logits)?;
        let out = p.matmul(&v)?.transpose(1, 2)?.reshape((b, n, heads * hd))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

struct TwoWayBlock {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    cross_attn_token_to_image: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
    layer_norm3: LayerNorm,
    layer_norm4: LayerNorm,
    cross_attn_image_to_token: Attention,
    skip_first_layer_pe: bool,
}

impl TwoWayBlock {
    fn load(vb: VarBuilder, cfg: &MaskDecoderConfig, first: bool) -> Result<Self> {
        let ln =
            |name: &str| candle_nn::layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp(name));
        let rate = cfg.attention_downsample_rate;
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg, 1)?,
            layer_norm1: ln("layer_norm1")?,
            cross_attn_token_to_image: Attention::load(
                vb.pp("cross_attn_token_to_image"),
                cfg,
                rate,
            )?,
            layer_norm2: ln("layer_norm2")?,
            mlp: Mlp::load(vb.pp("mlp"), cfg.hidden_size, cfg.mlp_dim, cfg.act)?,
            layer_norm3: ln("layer_norm3")?,
            layer_norm4: ln("layer_norm4")?,
            cross_attn_image_to_token: Attention::load(
                vb.pp("cross_attn_image_to_token"),
                cfg,
                rate,
            )?,
            skip_first_layer_pe: first,
        })
    }

    /// Queries (the tokens) and keys (the image), each with its positional embedding.
    fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)?
        } else {
            let q = (queries + query_pe)?;
            (queries + self.self_attn.forward(&q, &q, queries)?)?
        };
        let queries = self.layer_norm1.forward(&queries)?;

        let q = (&queries + query_pe)?;
        let k = (keys + key_pe)?;
        let queries = (&queries + self.cross_attn_token_to_image.forward(&q, &k, keys)?)?;
        let queries = self.layer_norm2.forward(&queries)?;

        let queries = (&queries + self.mlp.forward(&queries)?)?;
        let queries = self.layer_norm3.forward(&queries)?;

        let q = (&queries + query_pe)?;
        let k = (keys + key_pe)?;
        let keys = (keys + self.cross_attn_image_to_token.forward(&k, &q, &queries)?)?;
        let keys = self.layer_norm4.forward(&keys)?;
        Ok((queries, keys))
    }
}

/// transformers' `SamFeedForward`: proj_in, `layers`, proj_out, ReLU between them.
struct FeedForward {
    proj_in: Linear,
    layers: Vec<Linear>,
    proj_out: Linear,
}

impl FeedForward {
    fn load(
        vb: VarBuilder,
        input: usize,
        hidden: usize,
        output: usize,
        depth: usize,
    ) -> Result<Self> {
        Ok(Self {
            proj_in: candle_nn::linear(input, hidden, vb.pp("proj_in"))?,
            layers: (0..depth.saturating_sub(2))
                .map(|i| candle_nn::linear(hidden, hidden, vb.pp(format!("layers.{i}"))))
                .collect::<candle_core::Result<Vec<_>>>()?,
            proj_out: candle_nn::linear(hidden, output, vb.pp("proj_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.proj_in.forward(x)?.relu()?;
        for l in &self.layers {
            x = l.forward(&x)?.relu()?;
        }
        Ok(self.proj_out.forward(&x)?)
    }
}

/// The decoder's outputs for one prompt.
#[derive(Debug)]
pub struct Decoded {
    /// Low-resolution mask logits [1, M, 4g, 4g].
    pub masks: Tensor,
    /// Predicted IoU per mask [1, M].
    pub iou: Tensor,
}

pub struct MaskDecoder {
    /// [1 + T, D]: the IoU token, then the T mask tokens.
    output_tokens: Tensor,
    layers: Vec<TwoWayBlock>,
    final_attn_token_to_image: Attention,
    layer_norm_final_attn: LayerNorm,
    upscale_conv1: ConvTranspose2d,
    upscale_layer_norm: LayerNorm,
    upscale_conv2: ConvTranspose2d,
    hypernetworks: Vec<FeedForward>,
    iou_head: FeedForward,
}

impl MaskDecoder {
    pub fn load(vb: VarBuilder, cfg: &MaskDecoderConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let t = cfg.num_multimask_outputs + 1;
        let iou_token = vb.get((1, d), "iou_token.weight")?;
        let mask_tokens = vb.get((t, d), "mask_tokens.weight")?;
        let tf = vb.pp("transformer");
        let up = ConvTranspose2dConfig {
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            output_tokens: Tensor::cat(&[iou_token, mask_tokens], 0)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| TwoWayBlock::load(tf.pp(format!("layers.{i}")), cfg, i == 0))
                .collect::<Result<Vec<_>>>()?,
            final_attn_token_to_image: Attention::load(
                tf.pp("final_attn_token_to_image"),
                cfg,
                cfg.attention_downsample_rate,
            )?,
            // nn.LayerNorm's default eps (1e-5) in transformers, not the config's.
            layer_norm_final_attn: candle_nn::layer_norm(d, 1e-5, tf.pp("layer_norm_final_attn"))?,
            upscale_conv1: candle_nn::conv_transpose2d(d, d / 4, 2, up, vb.pp("upscale_conv1"))?,
            upscale_layer_norm: candle_nn::layer_norm(d / 4, 1e-6, vb.pp("upscale_layer_norm"))?,
            upscale_conv2: candle_nn::conv_transpose2d(
                d / 4,
                d / 8,
                2,
                up,
                vb.pp("upscale_conv2"),
            )?,
            hypernetworks: (0..t)
                .map(|i| {
                    FeedForward::load(
                        vb.pp(format!("output_hypernetworks_mlps.{i}")),
                        d,
                        d,
                        d / 8,
                        3,
                    )
                })
                .collect::<Result<Vec<_>>>()?,
            iou_head: FeedForward::load(
                vb.pp("iou_prediction_head"),
                d,
                cfg.iou_head_hidden_dim,
                t,
                cfg.iou_head_depth,
            )?,
        })
    }

    /// `image` [1, D, g, g] and its positional embedding, the prompt's sparse [1, N, D] and
    /// dense [1, D, g, g] embeddings. `multimask`: the three masks of masks tokens 1..,
    /// else the one of token 0.
    pub fn forward(
        &self,
        image: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        multimask: bool,
    ) -> Result<Decoded> {
        let (b, d, h, w) = image.dims4()?;
        let t = self.output_tokens.dim(0)? - 1;
        let tokens = Tensor::cat(&[self.output_tokens.unsqueeze(0)?, sparse.clone()], 1)?;
        let keys = (image + dense)?
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?;
        let key_pe = image_pe.flatten_from(2)?.transpose(1, 2)?.contiguous()?;

        let (mut queries, mut keys) = (tokens.clone(), keys);
        for layer in &self.layers {
            (queries, keys) = layer.forward(&queries, &keys, &tokens, &key_pe)?;
        }
        let q = (&queries + &tokens)?;
        let k = (&keys + &key_pe)?;
        let queries = (&queries + self.final_attn_token_to_image.forward(&q, &k, &keys)?)?;
        let queries = self.layer_norm_final_attn.forward(&queries)?;

        let iou_token = queries.narrow(1, 0, 1)?.squeeze(1)?;
        let keys = keys.transpose(1, 2)?.reshape((b, d, h, w))?;
        let up = self.upscale_conv1.forward(&keys)?;
        let up = layer_norm_nchw(&up, &self.upscale_layer_norm)?.gelu_erf()?;
        let up = self.upscale_conv2.forward(&up)?.gelu_erf()?;
        let (_, c, uh, uw) = up.dims4()?;

        let hyper = (0..t)
            .map(|i| self.hypernetworks[i].forward(&queries.narrow(1, 1 + i, 1)?.squeeze(1)?))
            .collect::<Result<Vec<_>>>()?;
        let hyper = Tensor::stack(&hyper, 1)?;
        let masks = hyper
            .matmul(&up.reshape((b, c, uh * uw))?)?
            .reshape((b, t, uh, uw))?;
        let iou = self.iou_head.forward(&iou_token)?;
        let (start, len) = if multimask { (1, t - 1) } else { (0, 1) };
        Ok(Decoded {
            masks: masks.narrow(1, start, len)?.contiguous()?,
            iou: iou.narrow(1, start, len)?.contiguous()?,
        })
    }
}
