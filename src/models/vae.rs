//! The VAE (diffusers `AutoencoderKL`), built from its `config.json` on candle's VAE blocks.

use super::config::VaeConfig;
use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};

#[derive(Debug)]
pub struct Vae {
    inner: AutoEncoderKL,
    pub config: VaeConfig,
}

impl Vae {
    pub fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let inner = AutoEncoderKL::new(
            vb,
            cfg.in_channels,
            cfg.out_channels,
            AutoEncoderKLConfig {
                block_out_channels: cfg.block_out_channels.clone(),
                layers_per_block: cfg.layers_per_block,
                latent_channels: cfg.latent_channels,
                norm_num_groups: cfg.norm_num_groups,
                use_quant_conv: cfg.use_quant_conv,
                use_post_quant_conv: cfg.use_post_quant_conv,
            },
        )?;
        Ok(Self {
            inner,
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
        let unscaled = (latents / self.config.scaling_factor)?;
        Ok(self.inner.decode(&unscaled)?)
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
