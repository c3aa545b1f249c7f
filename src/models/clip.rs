//! CLIP text encoder (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`), built from
//! its `config.json`.

use super::blocks::Dense;
use super::config::ClipTextConfig;
use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

/// Which hidden state the caller wants as the per-token embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLayer {
    /// The last layer's output after the final layer norm (SD1.5's `last_hidden_state`).
    LastNormed,
    /// `hidden_states[-n]` followed by the final layer norm (A1111 "clip skip n").
    SkipNormed(usize),
    /// `hidden_states[-n]` without the final layer norm (SDXL uses n = 2).
    Unnormed(usize),
}

/// The encoder's outputs for one batch of token ids.
#[derive(Debug)]
pub struct TextEncoding {
    /// [batch, tokens, hidden]
    pub hidden: Tensor,
    /// `text_embeds` ([batch, projection_dim]) for encoders with a projection.
    pub pooled: Option<Tensor>,
}

#[derive(Debug)]
struct Attention {
    q_proj: Dense,
    k_proj: Dense,
    v_proj: Dense,
    out_proj: Dense,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: Dense::load(vb.pp("q_proj"), h, h)?,
            k_proj: Dense::load(vb.pp("k_proj"), h, h)?,
            v_proj: Dense::load(vb.pp("v_proj"), h, h)?,
            out_proj: Dense::load(vb.pp("out_proj"), h, h)?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, t, c) = xs.dims3()?;
        let split = |x: Tensor| -> Result<Tensor> {
            Ok(x.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = split((self.q_proj.forward(xs)? * scale)?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal_mask)?;
        let in_dtype = scores.dtype();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(in_dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, c))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct Mlp {
    fc1: Dense,
    fc2: Dense,
    quick_gelu: bool,
}

impl Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.fc1.forward(xs)?;
        let xs = if self.quick_gelu {
            (&xs * candle_nn::ops::sigmoid(&(&xs * 1.702)?)?)?
        } else {
            xs.gelu_erf()?
        };
        self.fc2.forward(&xs)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask)?;
        let xs = (xs + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        Ok((xs + h)?)
    }
}

/// The CLIP text tower.
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Dense>,
    /// The activations' dtype (embedding tables may be kept narrower).
    dtype: DType,
    eos_token_id: u32,
    max_positions: usize,
    final_layer_norm_width: usize,
}

impl ClipTextModel {
    /// Loads from a `VarBuilder` rooted at the file's top level (`text_model.*`,
    /// `text_projection.*`).
    pub fn load(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        // Hub checkpoints nest everything under `text_model.`; transformers 5 saves it bare.
        let tm = if !vb.contains_tensor("text_model.embeddings.token_embedding.weight")
            && vb.contains_tensor("embeddings.token_embedding.weight")
        {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let h = cfg.hidden_size;
        let emb = tm.pp("embeddings");
        let token_embedding = candle_nn::embedding(cfg.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding =
            candle_nn::embedding(cfg.max_position_embeddings, h, emb.pp("position_embedding"))?;
        let ln = |vb: VarBuilder| candle_nn::layer_norm(h, cfg.layer_norm_eps, vb);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let lv = tm.pp("encoder.layers").pp(i);
                Ok(EncoderLayer {
                    layer_norm1: ln(lv.pp("layer_norm1"))?,
                    self_attn: Attention::load(lv.pp("self_attn"), cfg)?,
                    layer_norm2: ln(lv.pp("layer_norm2"))?,
                    mlp: Mlp {
                        fc1: Dense::load(lv.pp("mlp.fc1"), h, cfg.intermediate_size)?,
                        fc2: Dense::load(lv.pp("mlp.fc2"), cfg.intermediate_size, h)?,
                        quick_gelu: cfg.hidden_act == "quick_gelu",
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = ln(tm.pp("final_layer_norm"))?;
        let text_projection = if cfg.with_projection() {
            let p = cfg.projection_dim.unwrap_or(h);
            Some(Dense::load_no_bias(vb.pp("text_projection"), h, p)?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            dtype: vb.dtype(),
            eos_token_id: cfg.eos_token_id,
            max_positions: cfg.max_position_embeddings,
            final_layer_norm_width: h,
        })
    }

    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Width of the pooled `text_embeds` (the hidden size without a projection).
    pub fn projection_dim(&self) -> usize {
        match &self.text_projection {
            Some(p) => p.weight().dim(0).unwrap_or(0),
            None => self.final_layer_norm_width,
        }
    }

    /// Encodes token ids ([batch, tokens], u32).
    pub fn forward(&self, ids: &Tensor, layer: HiddenLayer) -> Result<TextEncoding> {
        let (b, t) = ids.dims2()?;
        anyhow::ensure!(
            t <= self.max_positions,
            "{t} tokens exceed the text encoder's {} positions",
            self.max_positions
        );
        let device = ids.device();
        let positions = Tensor::arange(0u32, t as u32, device)?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .to_dtype(self.dtype)?
            .broadcast_add(
                &self
                    .position_embedding
                    .forward(&positions)?
                    .to_dtype(self.dtype)?,
            )?;
        let mask = causal_mask(t, xs.dtype(), device)?;
        let n = self.layers.len();
        // hidden_states[k] is the input of layer k; hidden_states[n] is the last output.
        let k = skip_of(layer);
        anyhow::ensure!(
            (1..=n + 1).contains(&k),
            "cannot take hidden state -{k}: the text encoder has only {n} layers"
        );
        let wanted = n + 1 - k;
        let mut picked = if wanted == 0 { Some(xs.clone()) } else { None };
        for (i, l) in self.layers.iter().enumerate() {
            xs = l.forward(&xs, &mask)?;
            if i + 1 == wanted {
                picked = Some(xs.clone());
            }
        }
        let picked = picked.expect("wanted layer is within range");
        let hidden = match layer {
            HiddenLayer::Unnormed(_) => picked,
            _ => self.final_layer_norm.forward(&picked)?,
        };
        let pooled = match &self.text_projection {
            None => None,
            Some(proj) => {
                let last = self.final_layer_norm.forward(&xs)?;
                let pos = self.eos_positions(ids)?;
                let rows = (0..b)
                    .map(|i| last.i((i, pos[i])))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(proj.forward(&Tensor::stack(&rows, 0)?)?)
            }
        };
        Ok(TextEncoding { hidden, pooled })
    }

    /// Where each row's EOS token is, as transformers picks it: the first EOS id, or the
    /// largest id for old configs whose eos_token_id is the placeholder 2.
    fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        Ok(rows
            .iter()
            .map(|r| {
                if self.eos_token_id == 2 {
                    // argmax: the first maximum.
                    let mut best = 0;
                    for (i, &v) in r.iter().enumerate() {
                        if v > r[best] {
                            best = i;
                        }
                    }
                    best
                } else {
                    r.iter()
                        .position(|&v| v == self.eos_token_id)
                        .unwrap_or(r.len() - 1)
                }
            })
            .collect())
    }
}

fn skip_of(layer: HiddenLayer) -> usize {
    match layer {
        HiddenLayer::LastNormed => 1,
        HiddenLayer::SkipNormed(k) => k,
        HiddenLayer::Unnormed(k) => k,
    }
}

fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, t), device)?
        .to_dtype(dtype)?
        .unsqueeze(0)?
        .unsqueeze(0)?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::weights::RandomWeights;

    fn cfg(projection: bool) -> ClipTextConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 16, "intermediate_size": 24,
            "num_hidden_layers": 3, "num_attention_heads": 2, "max_position_embeddings": 10,
            "eos_token_id": 49,
            "projection_dim": 8,
            "architectures": [if projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }]
        }))
        .unwrap()
    }

    #[test]
    fn causal_tokens_ignore_the_future() {
        let w = RandomWeights::new(3);
        let m = ClipTextModel::load(w.var_builder(&Device::Cpu), &cfg(true)).unwrap();
        let a = Tensor::new(&[[1u32, 5, 7, 49, 49]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1u32, 5, 9, 3, 49]], &Device::Cpu).unwrap();
        let ea = m.forward(&a, HiddenLayer::LastNormed).unwrap();
        let eb = m.forward(&b, HiddenLayer::LastNormed).unwrap();
        let head_a = ea.hidden.i((0, 0..2)).unwrap();
        let head_b = eb.hidden.i((0, 0..2)).unwrap();
        let d: f32 = (head_a - head_b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(d, 0.0);
        let third: f32 = (ea.hidden.i((0, 2)).unwrap() - eb.hidden.i((0, 2)).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(third > 0.0);
        assert_eq!(ea.pooled.unwrap().dims(), &[1, 8]);
        let pen = m.forward(&a, HiddenLayer::Unnormed(2)).unwrap();
        assert_eq!(pen.hidden.dims(), &[1, 5, 16]);
        assert!(m.forward(&a, HiddenLayer::SkipNormed(9)).is_err());
    }
}
