//! Conditioning: what each family feeds the denoiser. SD1.x encodes with one CLIP-L; SDXL
//! concatenates CLIP-L and OpenCLIP-bigG states, adds the pooled embedding and the size ids.

use super::{Conditioning, MicroCond, Pipeline, check_finite};
use crate::models::clip::{ClipTextModel, HiddenLayer};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::AddedCond;
use crate::settings::Size;
use anyhow::Result;
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
    /// embedding from the second encoder's projection.
    Sdxl {
        towers: Box<[TextTower; 2]>,
        layer: HiddenLayer,
        /// An empty negative prompt is all zeros (embeddings and pooled), not the encoding of "".
        force_zeros_for_empty_prompt: bool,
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
            } => {
                let a = towers[0].encode(&texts, *layer, &self.device, &mut warnings)?;
                let b = towers[1].encode(&texts, *layer, &self.device, &mut warnings)?;
                warnings.dedup();
                let mut context = Tensor::cat(&[&a.hidden, &b.hidden], 2)?;
                let mut pooled = b.pooled.expect("text_encoder_2 has a projection");
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

    /// SDXL's added conditioning for `rows` rows of the batch.
    pub(super) fn added_cond(
        &self,
        cond: &Conditioning,
        latent_hw: (usize, usize),
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
        // diffusers' order: (height, width) pairs and (top, left).
        let ids = [
            micro.original_size.height,
            micro.original_size.width,
            micro.crop_top_left.top,
            micro.crop_top_left.left,
            micro.target_size.height,
            micro.target_size.width,
        ]
        .map(|v| v as f32);
        let rows = pooled.dim(0)?;
        let time_ids = Tensor::new(&ids, &self.device)?
            .unsqueeze(0)?
            .repeat((rows, 1))?
            .to_dtype(self.dtype)?;
        Ok(Some(AddedCond {
            text_embeds: pooled.to_dtype(self.dtype)?,
            time_ids,
        }))
    }
}
