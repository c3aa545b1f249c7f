//! Conditioning: what each family feeds the denoiser. SD1.x encodes with one CLIP-L; SDXL
//! concatenates CLIP-L and OpenCLIP-bigG states (the refiner has only the second), adds the
//! pooled embedding and the size ids (the refiner: size, crop and aesthetic score).

use super::{Conditioning, MicroCond, Pipeline, check_finite};
use crate::models::clip::{ClipTextModel, HiddenLayer};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::AddedCond;
use crate::settings::Size;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

/// A text encoder with its tokenizer.
pub(super) struct TextTower {
    pub(super) tokenizer: ClipTokenizer,
    pub(super) encoder: ClipTextModel,
}

/// Family-specific conditioning.
pub(super) enum Conditioner {
    /// SD1.x: one CLIP-L, last hidden state.
    Sd15 {
        tower: Box<TextTower>,
        layer: HiddenLayer,
    },
    /// SDXL: CLIP-L and OpenCLIP-bigG penultimate states, concatenated; pooled text
    /// embedding from the last encoder's projection. The refiner has OpenCLIP-bigG only.
    Sdxl {
        towers: Vec<TextTower>,
        layer: HiddenLayer,
        /// An empty negative prompt is all zeros (embeddings and pooled), not the encoding of "".
        force_zeros_for_empty_prompt: bool,
        /// The UNet takes 5 time ids ending in an aesthetic score (the refiner), not 6 ending
        /// in the target size.
        aesthetic: bool,
    },
}

impl TextTower {
    /// Encodes each text ([rows, 77] ids) and returns the encoder's outputs.
    fn encode(
        &self,
        texts: &[&str],
        layer: HiddenLayer,
        device: &Device,
        warnings: &mut Vec<String>,
    ) -> Result<crate::models::clip::TextEncoding> {
        let mut ids = Vec::with_capacity(texts.len());
        for t in texts {
            let enc = self.tokenizer.encode(t)?;
            if enc.truncated
                && let Some(removed) = self.tokenizer.removed_text(t)?
            {
                // A long prompt is quoted by its start only: the warning stays one line.
                const SHOWN: usize = 60;
                let n = removed.chars().count();
                let shown: String = removed.chars().take(SHOWN).collect();
                let more = if n > SHOWN {
                    format!("… ({} more characters)", n - SHOWN)
                } else {
                    String::new()
                };
                warnings.push(format!(
                    "the prompt is longer than {} tokens; this part was dropped: \"{}\"{more}",
                    self.tokenizer.max_length(),
                    shown.replace(['\n', '\r'], " ")
                ));
            }
            ids.push(Tensor::new(enc.ids.as_slice(), device)?);
        }
        self.encoder.forward(&Tensor::stack(&ids, 0)?, layer)
    }
}

impl Pipeline {
    /// Encodes prompts into the denoiser's conditioning ([negative, positive] with CFG).
    pub fn encode_prompt(&self, prompt: &str, negative: &str, cfg: bool) -> Result<Conditioning> {
        // `<lora:NAME:W>` tags choose LoRAs at load time; they are not text to encode.
        let (prompt, negative) = (
            crate::models::lora::strip_tags(prompt),
            crate::models::lora::strip_tags(negative),
        );
        let (prompt, negative) = (prompt.as_str(), negative.as_str());
        let mut warnings = Vec::new();
        let texts: Vec<&str> = if cfg {
            vec![negative, prompt]
        } else {
            vec![prompt]
        };
        match &self.conditioner {
            Conditioner::Sd15 { tower, layer } => {
                let out = tower.encode(&texts, *layer, &self.device, &mut warnings)?;
                check_finite(&out.hidden, "text encoder output")?;
                Ok(Conditioning {
                    context: out.hidden,
                    pooled: None,
                    micro: None,
                    warnings,
                })
            }
            Conditioner::Sdxl {
                towers,
                layer,
                force_zeros_for_empty_prompt,
                ..
            } => {
                let outs = towers
                    .iter()
                    .map(|t| t.encode(&texts, *layer, &self.device, &mut warnings))
                    .collect::<Result<Vec<_>>>()?;
                warnings.dedup();
                let hidden: Vec<&Tensor> = outs.iter().map(|o| &o.hidden).collect();
                let mut context = Tensor::cat(&hidden, 2)?;
                let mut pooled = outs
                    .last()
                    .and_then(|o| o.pooled.clone())
                    .context("internal error: SDXL's last text encoder has no projection")?;
                if cfg && *force_zeros_for_empty_prompt && negative.is_empty() {
                    let zero_first = |t: &Tensor| -> Result<Tensor> {
                        let pos = t.narrow(0, 1, 1)?;
                        Ok(Tensor::cat(&[&pos.zeros_like()?, &pos], 0)?)
                    };
                    context = zero_first(&context)?;
                    pooled = zero_first(&pooled)?;
                }
                check_finite(&context, "text encoder output")?;
                check_finite(&pooled, "pooled text embedding")?;
                Ok(Conditioning {
                    context,
                    pooled: Some(pooled),
                    micro: None,
                    warnings,
                })
            }
        }
    }

    /// Whether the UNet is conditioned on aesthetic scores (the SDXL refiner).
    pub fn takes_aesthetic_score(&self) -> bool {
        matches!(
            self.conditioner,
            Conditioner::Sdxl {
                aesthetic: true,
                ..
            }
        )
    }

    /// SDXL's added conditioning for the rows of `cond` ([negative, positive] halves with
    /// `cfg`).
    pub(super) fn added_cond(
        &self,
        cond: &Conditioning,
        latent_hw: (usize, usize),
        cfg: bool,
    ) -> Result<Option<AddedCond>> {
        if !self.unet.needs_added_cond() {
            return Ok(None);
        }
        let pooled = cond
            .pooled
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("SDXL needs a pooled text embedding"))?;
        let f = self.vae_factor();
        let micro = cond
            .micro
            .unwrap_or_else(|| MicroCond::for_size(Size::new(latent_hw.1 * f, latent_hw.0 * f)));
        let rows = pooled.dim(0)?;
        // diffusers' order: (height, width) pairs and (top, left).
        let (o, c, t) = (micro.original_size, micro.crop_top_left, micro.target_size);
        let ids: Vec<f32> = if self.takes_aesthetic_score() {
            // The refiner's negative rows get no crop and the negative score (diffusers'
            // negative_crops_coords_top_left defaults to (0, 0)).
            let a = micro.aesthetic;
            let (oh, ow) = (o.height as f64, o.width as f64);
            let negative = [oh, ow, 0.0, 0.0, a.negative];
            let positive = [oh, ow, c.top as f64, c.left as f64, a.score];
            let half = if cfg { rows / 2 } else { 0 };
            (0..rows)
                .flat_map(|r| if r < half { negative } else { positive })
                .map(|v| v as f32)
                .collect()
        } else {
            let row = [o.height, o.width, c.top, c.left, t.height, t.width].map(|v| v as f32);
            (0..rows).flat_map(|_| row).collect()
        };
        let per_row = ids.len() / rows.max(1);
        let time_ids =
            Tensor::from_vec(ids, (rows, per_row), &self.device)?.to_dtype(self.dtype)?;
        Ok(Some(AddedCond {
            text_embeds: pooled.to_dtype(self.dtype)?,
            time_ids,
        }))
    }
}
