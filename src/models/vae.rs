//! The VAE (diffusers `AutoencoderKL`), built from its `config.json` on tkg's own blocks
//! ([`super::blocks`]), so decoding runs on the fused CPU kernels (group norm + SiLU, convs
//! with fused residuals, upsampling fused into the next conv, memory-efficient attention).
//!
//! Every weight of the checkpoint is loaded, the encoder's too, so a checkpoint whose weights
//! do not match the config is refused; [`Vae::encode`] runs the encoder.
//!
//! [`Vae::decode_with`] and [`Vae::encode_distribution_with`] can run in tiles ([`tiling`]).

pub mod tiling;

use super::blocks::{Conv, Downsample, Norm, ResnetBlock, ResnetSettings, Upsample, VaeAttention};
use super::config::VaeConfig;
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;
pub use tiling::VaeTiling;
use tiling::{Grid, run_tiled};

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, attention, resnet.
#[derive(Debug)]
struct MidBlock {
    resnet_in: ResnetBlock,
    attention: VaeAttention,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    fn load(vb: VarBuilder, channels: usize, s: ResnetSettings) -> Result<Self> {
        Ok(Self {
            resnet_in: ResnetBlock::load(vb.pp("resnets.0"), channels, channels, s)?,
            attention: VaeAttention::load(vb.pp("attentions.0"), channels, s.groups)?,
            resnet_out: ResnetBlock::load(vb.pp("resnets.1"), channels, channels, s)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.resnet_in.forward(xs, None)?;
        let xs = self.attention.forward(&xs)?;
        self.resnet_out.forward(&xs, None)
    }
}

#[derive(Debug)]
struct EncoderLevel {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Downsample>,
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv,
    levels: Vec<EncoderLevel>,
    mid: MidBlock,
    norm_out: Norm,
    conv_out: Conv,
}

impl Encoder {
    fn load(vb: VarBuilder, cfg: &VaeConfig, s: ResnetSettings) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let last = *ch.last().expect("validated: non-empty");
        let mut levels = Vec::with_capacity(ch.len());
        for (i, &cout) in ch.iter().enumerate() {
            let vb_i = vb.pp("down_blocks").pp(i);
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::load(
                        vb_i.pp("resnets").pp(j),
                        if j == 0 { cin } else { cout },
                        cout,
                        s,
                    )
                })
                .collect::<Result<_>>()?;
            let downsample = if i + 1 < ch.len() {
                Some(Downsample::load(vb_i.pp("downsamplers.0"), cout, 0)?)
            } else {
                None
            };
            levels.push(EncoderLevel {
                resnets,
                downsample,
            });
        }
        Ok(Self {
            conv_in: Conv::load3(vb.pp("conv_in"), cfg.in_channels, ch[0])?,
            levels,
            mid: MidBlock::load(vb.pp("mid_block"), last, s)?,
            norm_out: Norm::load(vb.pp("conv_norm_out"), s.groups, last, 1e-6)?,
            conv_out: Conv::load3(vb.pp("conv_out"), last, 2 * cfg.latent_channels)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for level in &self.levels {
            for r in &level.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(d) = &level.downsample {
                xs = d.forward(&xs)?;
            }
        }
        let xs = self.mid.forward(&xs)?;
        self.conv_out.forward(&self.norm_out.forward(&xs, true)?)
    }
}

#[derive(Debug)]
struct DecoderLevel {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Upsample>,
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv,
    mid: MidBlock,
    levels: Vec<DecoderLevel>,
    norm_out: Norm,
    conv_out: Conv,
}

impl Decoder {
    fn load(vb: VarBuilder, cfg: &VaeConfig, s: ResnetSettings) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut levels = Vec::with_capacity(rev.len());
        for (i, &cout) in rev.iter().enumerate() {
            let vb_i = vb.pp("up_blocks").pp(i);
            let cin = if i == 0 { rev[0] } else { rev[i - 1] };
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock::load(
                        vb_i.pp("resnets").pp(j),
                        if j == 0 { cin } else { cout },
                        cout,
                        s,
                    )
                })
                .collect::<Result<_>>()?;
            let upsample = if i + 1 < rev.len() {
                Some(Upsample::load(vb_i.pp("upsamplers.0"), cout)?)
            } else {
                None
            };
            levels.push(DecoderLevel { resnets, upsample });
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: Conv::load3(vb.pp("conv_in"), cfg.latent_channels, rev[0])?,
            mid: MidBlock::load(vb.pp("mid_block"), rev[0], s)?,
            levels,
            norm_out: Norm::load(vb.pp("conv_norm_out"), s.groups, first, 1e-6)?,
            conv_out: Conv::load3(vb.pp("conv_out"), first, cfg.out_channels)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid.forward(&xs)?;
        for level in &self.levels {
            for r in &level.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(u) = &level.upsample {
                xs = u.forward(&xs, None)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward(&xs, true)?)
    }
}

#[derive(Debug)]
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv>,
    post_quant_conv: Option<Conv>,
    pub config: VaeConfig,
}

impl Vae {
    pub fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let s = ResnetSettings {
            groups: cfg.norm_num_groups,
            eps: 1e-6,
            temb_channels: None,
            output_scale_factor: 1.0,
        };
        let lat = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::load(vb.pp("encoder"), cfg, s)?,
            decoder: Decoder::load(vb.pp("decoder"), cfg, s)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv::load1(vb.pp("quant_conv"), 2 * lat, 2 * lat)?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv::load1(vb.pp("post_quant_conv"), lat, lat)?)
            } else {
                None
            },
            config: cfg.clone(),
        })
    }

    /// Image-to-latent factor.
    pub fn downscale_factor(&self) -> usize {
        self.config.downscale_factor()
    }

    /// Decodes scaled latents ([B, C, h, w], as the denoiser produces them) into images in
    /// [-1, 1] ([B, 3, H, W]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_unscaled(&(latents / self.config.scaling_factor)?)
    }

    /// [`Self::decode`], in tiles if `tiling` says so for this size. Tiled, the image
    /// differs slightly from the untiled one (each tile sees only its own latents); untiled
    /// it is [`Self::decode`]'s, bit for bit.
    pub fn decode_with(&self, latents: &Tensor, tiling: VaeTiling) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        if !tiling.tiles_decode(&self.config, h, w) {
            return self.decode(latents);
        }
        let z = (latents / self.config.scaling_factor)?;
        let image = run_tiled(&z, Grid::decode(&self.config)?, |t| self.decode_unscaled(t))?;
        Ok(image
            .to_dtype(latents.dtype())?
            .to_device(latents.device())?)
    }

    fn decode_unscaled(&self, z: &Tensor) -> Result<Tensor> {
        match &self.post_quant_conv {
            Some(c) => self.decoder.forward(&c.forward(z)?),
            None => self.decoder.forward(z),
        }
    }

    /// Encodes images in [-1, 1] ([B, 3, H, W]) into the mean of the latent distribution,
    /// scaled as the denoiser expects (diffusers' `latent_dist.mode() * scaling_factor`).
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let (mean, _) = self.encode_distribution(images)?;
        Ok((mean * self.config.scaling_factor)?)
    }

    /// The latent distribution of images in [-1, 1] ([B, 3, H, W]), unscaled: (mean, std),
    /// with diffusers' `DiagonalGaussianDistribution` clamp of the log-variance to [-30, 20].
    pub fn encode_distribution(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        self.distribution(self.moments(images)?)
    }

    /// [`Self::encode_distribution`], in tiles if `tiling` says so for this size (the
    /// moments are blended, as diffusers' `_tiled_encode` does, then clamped).
    pub fn encode_distribution_with(
        &self,
        images: &Tensor,
        tiling: VaeTiling,
    ) -> Result<(Tensor, Tensor)> {
        let (_, _, h, w) = images.dims4()?;
        if !tiling.tiles_encode(&self.config, h, w) {
            return self.encode_distribution(images);
        }
        let moments = run_tiled(images, Grid::encode(&self.config)?, |t| self.moments(t))?;
        self.distribution(
            moments
                .to_dtype(images.dtype())?
                .to_device(images.device())?,
        )
    }

    /// The encoder's output: mean and log-variance stacked on channels.
    fn moments(&self, images: &Tensor) -> Result<Tensor> {
        let moments = self.encoder.forward(images)?;
        Ok(match &self.quant_conv {
            Some(c) => c.forward(&moments)?,
            None => moments,
        })
    }

    fn distribution(&self, moments: Tensor) -> Result<(Tensor, Tensor)> {
        let lat = self.config.latent_channels;
        let mean = moments.narrow(1, 0, lat)?;
        let logvar = moments.narrow(1, lat, lat)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean, std))
    }
}

/// diffusers' post-processing: ((x / 2 + 0.5).clamp(0, 1) * 255).round() as u8, HWC.
pub fn to_rgb8(image: &Tensor) -> Result<Vec<u8>> {
    let (c, _, _) = image.dims3()?;
    anyhow::ensure!(c == 3, "the VAE produced {c} channels, not 3");
    let x = ((image.to_dtype(candle_core::DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let x = (x * 255.0)?.round()?.permute((1, 2, 0))?.flatten_all()?;
    Ok(x.to_vec1::<f32>()?.into_iter().map(|v| v as u8).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::max_abs;
    use crate::models::weights::RandomWeights;
    use candle_core::{DType, Device};
    /// The decode's values are held to diffusers by the pipeline goldens (tests/it/parity.rs);
    /// here the shapes and dtype of both directions at a size the goldens lack.
    #[test]
    fn decode_and_encode_shapes() {
        let cfg: VaeConfig = serde_json::from_value(serde_json::json!({
            "block_out_channels": [32, 32, 64], "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
            "latent_channels": 4, "norm_num_groups": 8
        }))
        .unwrap();
        let dev = Device::Cpu;
        let ours = Vae::load(RandomWeights::new(3).var_builder(&dev), &cfg).unwrap();
        let z = Tensor::randn(0f32, 1.0, (1, 4, 10, 12), &dev).unwrap();
        let got = ours.decode(&z).unwrap();
        assert_eq!(got.dims(), &[1, 3, 40, 48]);
        assert!(max_abs(&got).is_finite());
        let img = Tensor::randn(0f32, 0.5, (1, 3, 40, 48), &dev).unwrap();
        let mean = ours.encode(&img).unwrap();
        assert_eq!(mean.dims(), &[1, 4, 10, 12]);
        assert_eq!(mean.dtype(), DType::F32);
    }

    fn small_tiles() -> Vae {
        // Latent tiles of 8 (32 pixels), so a few dozen latents span several tiles.
        let cfg: VaeConfig = serde_json::from_value(serde_json::json!({
            "block_out_channels": [32, 32, 64], "layers_per_block": 1,
            "latent_channels": 4, "norm_num_groups": 8, "sample_size": 32
        }))
        .unwrap();
        Vae::load(RandomWeights::new(11).var_builder(&Device::Cpu), &cfg).unwrap()
    }

    /// Up to one tile, tiling changes nothing, bit for bit, whatever the setting.
    #[test]
    fn one_tile_is_untiled_bit_for_bit() {
        let vae = small_tiles();
        let z = Tensor::randn(0f32, 1.0, (1, 4, 8, 6), &Device::Cpu).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        let want = bits(&vae.decode(&z).unwrap());
        let img = Tensor::randn(0f32, 0.5, (1, 3, 32, 24), &Device::Cpu).unwrap();
        let want_mean = bits(&vae.encode_distribution(&img).unwrap().0);
        for t in [VaeTiling::On, VaeTiling::Auto, VaeTiling::Off] {
            assert_eq!(bits(&vae.decode_with(&z, t).unwrap()), want, "{t:?}");
            let (mean, _) = vae.encode_distribution_with(&img, t).unwrap();
            assert_eq!(bits(&mean), want_mean, "{t:?}");
        }
    }

    /// ||a - b|| / ||b||.
    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d: f32 = (a - b)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let n: f32 = b.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        (d / n).sqrt()
    }

    /// Over several tiles the tiled image is the untiled one up to seams: not equal (each
    /// tile decodes only its own latents), but much closer to it than the decode of other
    /// latents. Random weights make the seams far stronger than a trained VAE's.
    #[test]
    fn several_tiles_are_close_to_untiled() {
        let vae = small_tiles();
        let dev = Device::Cpu;
        let z = Tensor::randn(0f32, 1.0, (1, 4, 20, 26), &dev).unwrap();
        let untiled = vae.decode(&z).unwrap();
        let tiled = vae.decode_with(&z, VaeTiling::On).unwrap();
        assert_eq!(tiled.dims(), untiled.dims());
        let other = vae
            .decode(&Tensor::randn(0f32, 1.0, (1, 4, 20, 26), &dev).unwrap())
            .unwrap();
        let (r, r_other) = (rel(&tiled, &untiled), rel(&other, &untiled));
        println!(
            "decode, 20x26 latents in 8-latent tiles: rel L2 {r:.4} (other latents: {r_other:.4}), max abs diff {:.4} of values up to {:.4}",
            max_abs(&(&tiled - &untiled).unwrap()),
            max_abs(&untiled)
        );
        assert!(r > 0.0, "the tiles were not used");
        assert!(r < 0.5 * r_other, "{r} vs {r_other}");
        // Auto leaves so small an image untiled.
        let auto = vae.decode_with(&z, VaeTiling::Auto).unwrap();
        assert_eq!(max_abs(&(&auto - &untiled).unwrap()), 0.0);

        let img = Tensor::randn(0f32, 0.5, (1, 3, 80, 104), &dev).unwrap();
        let (m0, s0) = vae.encode_distribution(&img).unwrap();
        let (m1, s1) = vae.encode_distribution_with(&img, VaeTiling::On).unwrap();
        assert_eq!((m1.dims(), s1.dims()), (m0.dims(), s0.dims()));
        let img2 = Tensor::randn(0f32, 0.5, (1, 3, 80, 104), &dev).unwrap();
        let (m2, _) = vae.encode_distribution(&img2).unwrap();
        let (r, r_other) = (rel(&m1, &m0), rel(&m2, &m0));
        println!(
            "encode, 80x104 pixels in 32-pixel tiles: mean rel L2 {r:.4} (other image: {r_other:.4})"
        );
        assert!(r > 0.0 && r < 0.5 * r_other, "{r} vs {r_other}");
    }
}
