//! Where the denoise loop starts. Text-to-image starts from noise (TKG-DM's, or plain);
//! img2img and inpainting start from a photo, encoded by the VAE and noised to the first step
//! the strength leaves, as diffusers' StableDiffusion(XL)Img2Img and Inpaint pipelines
//! prepare their latents.

use super::Pipeline;
use crate::rng::Generator;
use anyhow::{Result, ensure};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// A photo to start from (img2img) and, for inpainting, what to repaint in it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceImage {
    /// RGB8, row-major, at the request's size.
    pub rgb: Arc<Vec<u8>>,
    /// The fraction of the schedule that runs, in (0, 1]: diffusers' `strength`.
    pub strength: f64,
    /// Greyscale (L8) at the request's size; 128 and above is repainted (diffusers binarises
    /// at 0.5).
    pub mask: Option<Arc<Vec<u8>>>,
}

/// What the loop starts from, for a batch of B images.
#[derive(Debug, Clone)]
pub struct Start {
    /// [B, C, h, w] f32: text-to-image's initial latents (before `init_noise_sigma`), or the
    /// noise that img2img adds to the photo's latents.
    pub noise: Tensor,
    pub image: Option<ImageStart>,
}

/// The photo's part of a [`Start`].
#[derive(Debug, Clone)]
pub struct ImageStart {
    pub strength: f64,
    /// [B, C, h, w] f32: the photo's latents, sampled from the VAE's distribution and scaled.
    /// `None` only for a 9-channel inpainting model at strength 1, which diffusers starts from
    /// pure noise without encoding the photo.
    pub latents: Option<Tensor>,
    pub mask: Option<LatentMask>,
}

/// An inpainting mask at latent resolution.
#[derive(Debug, Clone)]
pub struct LatentMask {
    /// [B, 1, h, w] f32, 1 = repaint.
    pub mask: Tensor,
    /// [B, C, h, w] f32: the latents of the photo with the repainted region set to 0 (grey);
    /// a 9-channel model takes them with the mask as extra input channels.
    pub masked_latents: Option<Tensor>,
}

impl Start {
    /// Text-to-image from `noise`.
    pub fn from_noise(noise: Tensor) -> Self {
        Self { noise, image: None }
    }

    /// The starts of several images as one batch (they must agree in kind and strength).
    pub fn stack(starts: &[Start]) -> Result<Start> {
        let cat = |get: &dyn Fn(&Start) -> Option<Tensor>| -> Result<Option<Tensor>> {
            let parts: Option<Vec<Tensor>> = starts.iter().map(get).collect();
            parts.map(|p| Ok(Tensor::cat(&p, 0)?)).transpose()
        };
        let first = starts
            .first()
            .ok_or_else(|| anyhow::anyhow!("an empty batch"))?;
        let image = match &first.image {
            None => None,
            Some(im) => {
                let image = |s: &Start| s.image.clone();
                ensure!(
                    starts
                        .iter()
                        .all(|s| image(s).map(|i| i.strength) == Some(im.strength)),
                    "internal error: a batch mixes strengths"
                );
                let mask = match &im.mask {
                    None => None,
                    Some(_) => Some(LatentMask {
                        mask: cat(&|s| Some(image(s)?.mask?.mask))?.ok_or_else(|| {
                            anyhow::anyhow!("internal error: a batch mixes masks")
                        })?,
                        masked_latents: cat(&|s| image(s)?.mask?.masked_latents)?,
                    }),
                };
                Some(ImageStart {
                    strength: im.strength,
                    latents: cat(&|s| image(s)?.latents)?,
                    mask,
                })
            }
        };
        Ok(Start {
            noise: cat(&|s| Some(s.noise.clone()))?.expect("every start has noise"),
            image,
        })
    }
}

/// RGB8 (HWC) as diffusers' image processor hands it to the VAE: [1, 3, H, W] f32 in
/// [-1, 1], `2 * (v / 255) - 1`.
pub fn rgb8_to_tensor(rgb: &[u8], width: usize, height: usize) -> Result<Tensor> {
    ensure!(
        rgb.len() == width * height * 3,
        "internal error: {} bytes for a {width}x{height} RGB image",
        rgb.len()
    );
    let v: Vec<f32> = rgb
        .iter()
        .map(|&b| 2.0 * (b as f32 / 255.0) - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, (height, width, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

/// An L8 mask binarised as diffusers' mask processor does (`v / 255 >= 0.5` repaints):
/// [1, 1, H, W] f32 of 0 and 1.
pub fn binary_mask(mask: &[u8], width: usize, height: usize) -> Result<Tensor> {
    ensure!(
        mask.len() == width * height,
        "internal error: {} bytes for a {width}x{height} mask",
        mask.len()
    );
    let v: Vec<f32> = mask
        .iter()
        .map(|&b| if b as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(v, (1, 1, height, width), &Device::Cpu)?)
}

/// The mask at latent resolution: torch's nearest `interpolate` by an integer factor keeps
/// pixel (f·i, f·j).
fn latent_mask(mask: &Tensor, factor: usize) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let (lh, lw) = (h / factor, w / factor);
    let full: Vec<f32> = mask.flatten_all()?.to_vec1()?;
    let v: Vec<f32> = (0..lh)
        .flat_map(|i| (0..lw).map(move |j| (i, j)))
        .map(|(i, j)| full[i * factor * w + j * factor])
        .collect();
    Ok(Tensor::from_vec(v, (1, 1, lh, lw), &Device::Cpu)?)
}

impl Pipeline {
    /// True for a 9-channel inpainting UNet (latents + mask + masked-image latents).
    pub fn is_inpainting_model(&self) -> bool {
        self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1
    }

    /// Latents of images in [-1, 1] ([B, 3, H, W]) sampled from the VAE's distribution with
    /// `generator` and scaled (diffusers' `latent_dist.sample(generator) * scaling_factor`);
    /// f32 on the CPU.
    pub fn encode_sample(&self, images: &Tensor, generator: &mut Generator) -> Result<Tensor> {
        let x = images.to_device(&self.device)?.to_dtype(self.vae_dtype)?;
        let (mean, std) = crate::kernels::matmul::with_precision(self.products, || {
            self.vae.encode_distribution_with(&x, self.vae_tiling)
        })?;
        let mean = mean.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let std = std.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let eps = Tensor::from_vec(
            generator.randn(mean.elem_count()),
            mean.dims(),
            &Device::Cpu,
        )?;
        let sample = (mean + (std * eps)?)?;
        let latents = (sample * self.vae.config.scaling_factor)?;
        super::check_finite(&latents, "encoded image (VAE encoder output)")?;
        Ok(latents)
    }

    /// The start of an image from `source`, drawing from `generator` in diffusers' order:
    /// the photo's latent sample (unless a 9-channel model runs at strength 1), the noise,
    /// then for inpainting the masked photo's latent sample (4-channel models do not use it,
    /// but diffusers draws it, so the generator moves on as far).
    pub fn start_from_image(
        &self,
        source: &SourceImage,
        size: crate::settings::Size,
        generator: &mut Generator,
    ) -> Result<Start> {
        let (w, h) = (size.width, size.height);
        let f = self.vae_factor();
        let c = self.vae.config.latent_channels;
        let pixels = rgb8_to_tensor(&source.rgb, w, h)?;
        let concat = self.is_inpainting_model();
        let strength_max = source.strength == 1.0;
        let latents = if concat && strength_max && source.mask.is_some() {
            None
        } else {
            Some(self.encode_sample(&pixels, generator)?)
        };
        let noise = Tensor::from_vec(
            generator.randn(c * (h / f) * (w / f)),
            (1, c, h / f, w / f),
            &Device::Cpu,
        )?;
        let mask = match &source.mask {
            None => None,
            Some(m) => {
                let full = binary_mask(m, w, h)?;
                let keep = full.ones_like()?.sub(&full)?;
                let masked_latents = if concat {
                    let masked = pixels.broadcast_mul(&keep)?;
                    Some(self.encode_sample(&masked, generator)?)
                } else {
                    generator.randn(c * (h / f) * (w / f));
                    None
                };
                Some(LatentMask {
                    mask: latent_mask(&full, f)?,
                    masked_latents,
                })
            }
        };
        Ok(Start {
            noise,
            image: Some(ImageStart {
                strength: source.strength,
                latents,
                mask,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_masks_become_tensors_as_diffusers_makes_them() {
        let t = rgb8_to_tensor(&[0, 255, 51, 128, 1, 2], 2, 1).unwrap();
        assert_eq!(t.dims(), [1, 3, 1, 2]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        // channel-major: R of both pixels, then G, then B
        assert_eq!(v[0], -1.0);
        assert_eq!(v[1], 2.0 * (128.0f32 / 255.0) - 1.0);
        assert_eq!(v[2], 1.0);
        let m = binary_mask(&[0, 127, 128, 255], 2, 2).unwrap();
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [0.0, 0.0, 1.0, 1.0]);
        assert!(binary_mask(&[0; 3], 2, 2).is_err());
    }

    #[test]
    fn the_latent_mask_keeps_every_factorth_pixel() {
        // 4x4 mask, factor 2: pixels (0,0), (0,2), (2,0), (2,2).
        let px: Vec<u8> = (0..16)
            .map(|i| if [0, 2, 10].contains(&i) { 255 } else { 0 })
            .collect();
        let m = latent_mask(&binary_mask(&px, 4, 4).unwrap(), 2).unwrap();
        assert_eq!(m.dims(), [1, 1, 2, 2]);
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [1.0, 1.0, 0.0, 1.0]);
    }
}
