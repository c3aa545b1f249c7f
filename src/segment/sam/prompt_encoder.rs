//! SAM's prompt encoder (transformers `SamPromptEncoder` and `SamPositionalEmbedding`):
//! points and box corners become random-Fourier position features plus a learned embedding
//! per kind; a mask prompt (low-resolution logits, typically a previous prediction's) is
//! convolved down to the embedding grid, and without one the dense embedding is the learned
//! "no mask" vector.

use super::config::{Act, PromptEncoderConfig};
use super::image_encoder::layer_norm_nchw;
use anyhow::{Result, ensure};
use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, VarBuilder};

/// A point's role, as SAM's labels say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointLabel {
    /// 1: on the subject.
    Positive,
    /// 0: on the background.
    Negative,
    /// -1: a padding point (SAM appends one when no box is given).
    NotAPoint,
}

/// Prompts in the model's input pixels (after the processor's coordinate transform).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelPrompt {
    /// (x, y, label), in f64 as transformers' processor keeps them.
    pub points: Vec<(f64, f64, PointLabel)>,
    /// x0, y0, x1, y1.
    pub bbox: Option<[f64; 4]>,
}

/// The random Fourier features of positions in [0, 1]² (transformers'
/// `SamPositionalEmbedding`, shared by the prompt encoder and the image-wide embedding).
pub struct PositionalEmbedding {
    /// [2, F]
    gaussian: Tensor,
}

impl PositionalEmbedding {
    pub fn new(gaussian: Tensor) -> Self {
        Self { gaussian }
    }

    /// `coords` [..., 2] already mapped to [-1, 1] to [..., 2F]: sin and cos of
    /// 2π · coords @ G.
    fn encode_signed(&self, coords: &Tensor) -> Result<Tensor> {
        let dims = coords.dims().to_vec();
        let n: usize = dims[..dims.len() - 1].iter().product();
        let proj = coords
            .reshape((n, 2))?
            .matmul(&self.gaussian)?
            .affine(2.0 * std::f64::consts::PI, 0.0)?;
        let out = Tensor::cat(&[proj.sin()?, proj.cos()?], 1)?;
        let mut shape = dims;
        let last = shape.len() - 1;
        shape[last] = out.dim(1)?;
        Ok(out.reshape(shape)?)
    }

    /// The dense positional embedding of a side x side grid of cell centres:
    /// [1, 2F, side, side] (transformers' `get_image_wide_positional_embeddings`).
    pub fn image_wide(&self, side: usize) -> Result<Tensor> {
        let s = side as f32;
        let mut xy = Vec::with_capacity(side * side * 2);
        for y in 0..side {
            for x in 0..side {
                // torch: (cumsum(ones) - 0.5) / size, then 2c - 1, all in f32.
                let cx = (x as f32 + 1.0 - 0.5) / s;
                let cy = (y as f32 + 1.0 - 0.5) / s;
                xy.push(2.0 * cx - 1.0);
                xy.push(2.0 * cy - 1.0);
            }
        }
        let coords = Tensor::from_vec(xy, (side, side, 2), self.gaussian.device())?;
        Ok(self
            .encode_signed(&coords)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }

    /// Points in input pixels (`(x, y)`, f64) to [N, 2F]: shifted to pixel centres, divided by
    /// the input size and mapped to [-1, 1] in f64, then cast, as transformers does.
    fn encode_pixels(&self, points: &[(f64, f64)], input_size: usize) -> Result<Tensor> {
        let s = input_size as f64;
        let xy: Vec<f32> = points
            .iter()
            .flat_map(|&(x, y)| {
                [
                    (2.0 * ((x + 0.5) / s) - 1.0) as f32,
                    (2.0 * ((y + 0.5) / s) - 1.0) as f32,
                ]
            })
            .collect();
        let coords = Tensor::from_vec(xy, (points.len(), 2), self.gaussian.device())?;
        self.encode_signed(&coords)
    }
}

/// transformers' `SamMaskEmbedding`: two stride-2 2x2 convolutions with channel layer norms
/// and the activation, then a 1x1 convolution to the decoder's width.
struct MaskEmbedding {
    conv1: Conv2d,
    layer_norm1: LayerNorm,
    conv2: Conv2d,
    layer_norm2: LayerNorm,
    conv3: Conv2d,
    act: Act,
}

impl MaskEmbedding {
    fn load(vb: VarBuilder, cfg: &PromptEncoderConfig) -> Result<Self> {
        let (c, quarter) = (cfg.mask_input_channels, cfg.mask_input_channels / 4);
        let down = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            conv1: candle_nn::conv2d(1, quarter, 2, down, vb.pp("conv1"))?,
            layer_norm1: candle_nn::layer_norm(quarter, eps, vb.pp("layer_norm1"))?,
            conv2: candle_nn::conv2d(quarter, c, 2, down, vb.pp("conv2"))?,
            layer_norm2: candle_nn::layer_norm(c, eps, vb.pp("layer_norm2"))?,
            conv3: candle_nn::conv2d(c, cfg.hidden_size, 1, Default::default(), vb.pp("conv3"))?,
            act: cfg.act,
        })
    }

    /// [1, 1, 4g, 4g] to [1, D, g, g].
    fn forward(&self, mask: &Tensor) -> Result<Tensor> {
        let x = layer_norm_nchw(&self.conv1.forward(mask)?, &self.layer_norm1)?;
        let x = self.act.apply(&x)?;
        let x = layer_norm_nchw(&self.conv2.forward(&x)?, &self.layer_norm2)?;
        let x = self.act.apply(&x)?;
        Ok(self.conv3.forward(&x)?)
    }
}

pub struct PromptEncoder {
    mask_embed: MaskEmbedding,
    /// point_embed.0 (negative), .1 (positive), .2 and .3 (box corners): [1, D] each.
    point_embed: Vec<Tensor>,
    not_a_point_embed: Tensor,
    no_mask_embed: Tensor,
    input_size: usize,
    grid: usize,
    hidden: usize,
}

impl PromptEncoder {
    pub fn load(vb: VarBuilder, cfg: &PromptEncoderConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let point_embed = (0..cfg.num_point_embeddings)
            .map(|i| vb.get((1, d), &format!("point_embed.{i}.weight")))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            mask_embed: MaskEmbedding::load(vb.pp("mask_embed"), cfg)?,
            point_embed,
            not_a_point_embed: vb.get((1, d), "not_a_point_embed.weight")?,
            no_mask_embed: vb.get((1, d), "no_mask_embed.weight")?,
            input_size: cfg.image_size,
            grid: cfg.image_size / cfg.patch_size,
            hidden: d,
        })
    }

    /// The sparse embeddings [1, N, D] of the points (then the box corners) and the dense
    /// embedding [1, D, g, g] of `mask` (low-resolution logits [1, 1, 4g, 4g]) or of no mask.
    pub fn forward(
        &self,
        pe: &PositionalEmbedding,
        prompt: &ModelPrompt,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        ensure!(
            !prompt.points.is_empty() || prompt.bbox.is_some(),
            "SAM needs a point or a box"
        );
        let mut parts = Vec::new();
        if !prompt.points.is_empty() {
            let mut points = prompt.points.clone();
            // Without a box SAM appends one padding point (transformers' `pad=True`).
            if prompt.bbox.is_none() {
                points.push((0.0, 0.0, PointLabel::NotAPoint));
            }
            let xy: Vec<(f64, f64)> = points.iter().map(|&(x, y, _)| (x, y)).collect();
            let enc = pe.encode_pixels(&xy, self.input_size)?;
            let mut rows = Vec::with_capacity(points.len());
            for (i, &(_, _, label)) in points.iter().enumerate() {
                let row = enc.narrow(0, i, 1)?;
                rows.push(match label {
                    PointLabel::NotAPoint => self.not_a_point_embed.clone(),
                    PointLabel::Negative => (row + &self.point_embed[0])?,
                    PointLabel::Positive => (row + &self.point_embed[1])?,
                });
            }
            parts.push(Tensor::cat(&rows, 0)?);
        }
        if let Some([x0, y0, x1, y1]) = prompt.bbox {
            let enc = pe.encode_pixels(&[(x0, y0), (x1, y1)], self.input_size)?;
            let corners = Tensor::cat(
                &[
                    (enc.narrow(0, 0, 1)? + &self.point_embed[2])?,
                    (enc.narrow(0, 1, 1)? + &self.point_embed[3])?,
                ],
                0,
            )?;
            parts.push(corners);
        }
        let sparse = Tensor::cat(&parts, 0)?.unsqueeze(0)?;
        let dense = match mask {
            Some(m) => {
                let side = 4 * self.grid;
                ensure!(
                    m.dims() == [1, 1, side, side],
                    "a mask prompt is [1, 1, {side}, {side}] logits (a low-resolution mask), not {:?}",
                    m.dims()
                );
                self.mask_embed.forward(m)?
            }
            None => self
                .no_mask_embed
                .reshape((1, self.hidden, 1, 1))?
                .broadcast_as((1, self.hidden, self.grid, self.grid))?
                .contiguous()?,
        };
        Ok((sparse, dense))
    }
}
