//! The conditional UNet (diffusers `UNet2DConditionModel`), assembled from a diffusers
//! `config.json` out of our blocks ([`super::blocks`]), which run on the fused CPU kernels.
//!
//! candle's own top level does not read configs and has no "text_time" addition embedding, so
//! the top level lives here.

use super::blocks::{
    Conv, Downsample, Norm, ResnetBlock, ResnetSettings, Transformer2D, TransformerSettings,
    Upsample,
};
use super::config::UNetConfig;
use super::timestep::{TimestepEmbedding, Timesteps};
use anyhow::Result;
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

/// One level on the way down: resnets, optional spatial transformers, optional downsampler.
#[derive(Debug)]
struct DownLevel {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample>,
}

/// One level on the way up; each resnet takes a skip connection from the way down.
#[derive(Debug)]
struct UpLevel {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Upsample>,
}

#[derive(Debug)]
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: Transformer2D,
    resnet_out: ResnetBlock,
}

/// SDXL's micro-conditioning: pooled text embedding + size/crop ids, embedded and added to the
/// timestep embedding.
#[derive(Debug)]
struct TextTimeEmbedding {
    add_time_proj: Timesteps,
    add_embedding: TimestepEmbedding,
}

/// Extra conditioning a model family adds to the timestep embedding.
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// [batch, pooled_dim]
    pub text_embeds: Tensor,
    /// [batch, 6]: original size, crop top-left, target size; [batch, 5] for the refiner:
    /// original size, crop top-left, aesthetic score.
    pub time_ids: Tensor,
}

#[derive(Debug)]
pub struct UNet {
    conv_in: Conv,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    text_time: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownLevel>,
    mid_block: MidBlock,
    up_blocks: Vec<UpLevel>,
    conv_norm_out: Norm,
    conv_out: Conv,
    center_input_sample: bool,
    pub config: UNetConfig,
}

impl UNet {
    pub fn load(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let levels = cfg.levels()?;
        let n = levels.len();
        let ch0 = levels[0].out_channels;
        let time_dim = ch0 * 4;
        let layers = cfg.layers();
        let cross_dim = cfg.cross_dim();
        let conv_in = Conv::load(vb.pp("conv_in"), cfg.in_channels, ch0, 3, 1, 1)?;
        let time_proj = Timesteps::new(ch0, cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::load(vb.pp("time_embedding"), ch0, time_dim)?;

        let text_time = match cfg.addition_embed_type.as_deref() {
            Some("text_time") => {
                let add_dim = cfg.addition_time_embed_dim.ok_or_else(|| {
                    anyhow::anyhow!("unet config: text_time needs addition_time_embed_dim")
                })?;
                let in_dim = cfg.projection_class_embeddings_input_dim.ok_or_else(|| {
                    anyhow::anyhow!(
                        "unet config: text_time needs projection_class_embeddings_input_dim"
                    )
                })?;
                Some(TextTimeEmbedding {
                    add_time_proj: Timesteps::new(add_dim, cfg.flip_sin_to_cos, cfg.freq_shift),
                    add_embedding: TimestepEmbedding::load(
                        vb.pp("add_embedding"),
                        in_dim,
                        time_dim,
                    )?,
                })
            }
            _ => None,
        };

        let resnet = ResnetSettings {
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            temb_channels: Some(time_dim),
            output_scale_factor: 1.0,
        };
        let transformer = |heads: usize, depth: usize| TransformerSettings {
            heads,
            depth,
            context_dim: cross_dim,
            groups: cfg.norm_num_groups,
            linear_projection: cfg.use_linear_projection,
        };
        let mut down_blocks = Vec::with_capacity(n);
        for (i, level) in levels.iter().enumerate() {
            let vb_i = vb.pp("down_blocks").pp(i);
            let cin = if i == 0 {
                ch0
            } else {
                levels[i - 1].out_channels
            };
            let cout = level.out_channels;
            let mut resnets = Vec::with_capacity(layers);
            let mut attentions = Vec::new();
            for j in 0..layers {
                let c = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::load(
                    vb_i.pp("resnets").pp(j),
                    c,
                    cout,
                    resnet,
                )?);
                if let Some(depth) = level.cross_attn_depth {
                    attentions.push(Transformer2D::load(
                        vb_i.pp("attentions").pp(j),
                        cout,
                        transformer(level.heads, depth),
                    )?);
                }
            }
            let downsample = if i + 1 < n {
                Some(Downsample::load(
                    vb_i.pp("downsamplers.0"),
                    cout,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownLevel {
                resnets,
                attentions,
                downsample,
            });
        }

        let last = &levels[n - 1];
        let mid_resnet = ResnetSettings {
            output_scale_factor: cfg.mid_block_scale_factor,
            ..resnet
        };
        let vb_mid = vb.pp("mid_block");
        let mid_block = MidBlock {
            resnet_in: ResnetBlock::load(
                vb_mid.pp("resnets.0"),
                last.out_channels,
                last.out_channels,
                mid_resnet,
            )?,
            attention: Transformer2D::load(
                vb_mid.pp("attentions.0"),
                last.out_channels,
                transformer(last.heads, last.cross_attn_depth.unwrap_or(1)),
            )?,
            resnet_out: ResnetBlock::load(
                vb_mid.pp("resnets.1"),
                last.out_channels,
                last.out_channels,
                mid_resnet,
            )?,
        };

        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let level = &levels[n - 1 - i];
            let vb_i = vb.pp("up_blocks").pp(i);
            let cout = level.out_channels;
            let prev_out = if i == 0 {
                last.out_channels
            } else {
                levels[n - i].out_channels
            };
            // Channels of the skip connection feeding the level's last resnet.
            let skip_in = levels[if i == n - 1 { 0 } else { n - i - 2 }].out_channels;
            let mut resnets = Vec::with_capacity(layers + 1);
            let mut attentions = Vec::new();
            for j in 0..=layers {
                let skip = if j == layers { skip_in } else { cout };
                let c = if j == 0 { prev_out } else { cout };
                resnets.push(ResnetBlock::load(
                    vb_i.pp("resnets").pp(j),
                    c + skip,
                    cout,
                    resnet,
                )?);
                if let Some(depth) = level.cross_attn_depth {
                    attentions.push(Transformer2D::load(
                        vb_i.pp("attentions").pp(j),
                        cout,
                        transformer(level.heads, depth),
                    )?);
                }
            }
            let upsample = if i + 1 < n {
                Some(Upsample::load(vb_i.pp("upsamplers.0"), cout)?)
            } else {
                None
            };
            up_blocks.push(UpLevel {
                resnets,
                attentions,
                upsample,
            });
        }

        let conv_norm_out = Norm::load(
            vb.pp("conv_norm_out"),
            cfg.norm_num_groups,
            ch0,
            cfg.norm_eps,
        )?;
        let conv_out = Conv::load(vb.pp("conv_out"), ch0, cfg.out_channels, 3, 1, 1)?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            text_time,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            center_input_sample: cfg.center_input_sample,
            config: cfg.clone(),
        })
    }

    /// True when the model needs [`AddedCond`] (SDXL's "text_time").
    /// The dtype the convolution kernels are kept in (see
    /// [`WeightStorage`](super::weights::WeightStorage)).
    pub fn weight_dtype(&self) -> candle_core::DType {
        self.conv_in.weight().dtype()
    }

    pub fn needs_added_cond(&self) -> bool {
        self.text_time.is_some()
    }

    /// Predicts noise (or v) for `xs` ([batch, C, h, w]) at `timestep`.
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        self.forward_traced(xs, timestep, context, added, &mut |_, _| {})
    }

    /// [`Self::forward`], reporting each stage's output (for debugging parity).
    pub fn forward_traced(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedCond>,
        trace: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let (batch, _, height, width) = xs.dims4()?;
        let device = xs.device();
        let dtype = xs.dtype();
        let n = self.down_blocks.len();
        let up_factor = 1usize << (n - 1);
        let odd_size = height % up_factor != 0 || width % up_factor != 0;
        let xs = if self.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };

        // The sinusoidal projection is computed in f32, as diffusers does, then cast.
        let t = Tensor::full(timestep as f32, batch, device)?;
        let t_emb = self.time_proj.forward(&t)?.to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(tt) = &self.text_time {
            let added = added.ok_or_else(|| {
                anyhow::anyhow!("this UNet needs pooled text embeddings and time ids (SDXL)")
            })?;
            let ids = added.time_ids.to_dtype(DType::F32)?.flatten_all()?;
            let ids = tt.add_time_proj.forward(&ids)?.reshape((batch, ()))?;
            let add = Tensor::cat(
                &[&added.text_embeds.to_dtype(dtype)?, &ids.to_dtype(dtype)?],
                1,
            )?;
            emb = (emb + tt.add_embedding.forward(&add)?)?;
        }

        trace("time_embedding", &emb);
        let xs = self.conv_in.forward(&xs)?;
        trace("conv_in", &xs);
        let mut residuals = vec![xs.clone()];
        let mut xs = xs;
        for (i, level) in self.down_blocks.iter().enumerate() {
            for (j, resnet) in level.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = level.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
                residuals.push(xs.clone());
            }
            if let Some(ds) = &level.downsample {
                xs = ds.forward(&xs)?;
                residuals.push(xs.clone());
            }
            trace(&format!("down{i}"), &xs);
        }
        let m = &self.mid_block;
        xs = m.resnet_in.forward(&xs, Some(&emb))?;
        xs = m.attention.forward(&xs, context)?;
        xs = m.resnet_out.forward(&xs, Some(&emb))?;
        trace("mid", &xs);
        for (i, level) in self.up_blocks.iter().enumerate() {
            for (j, resnet) in level.resnets.iter().enumerate() {
                let skip = residuals.pop().expect("one skip connection per resnet");
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = level.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
            }
            if let Some(us) = &level.upsample {
                // With sizes that don't halve evenly, upsample to the skip's size.
                let size = match residuals.last() {
                    Some(r) if odd_size => {
                        let (_, _, h, w) = r.dims4()?;
                        Some((h, w))
                    }
                    _ => None,
                };
                xs = us.forward(&xs, size)?;
            }
            trace(&format!("up{i}"), &xs);
        }
        let xs = self.conv_norm_out.forward(&xs, true)?;
        self.conv_out.forward(&xs)
    }
}
