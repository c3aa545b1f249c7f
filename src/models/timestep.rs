//! The timestep embedding of diffusers' `UNet2DConditionModel`: `Timesteps` (sinusoidal
//! projection) and `TimestepEmbedding` (linear, SiLU, linear).

use super::blocks::Dense;
use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// diffusers' `get_timestep_embedding`: `dim` sinusoids of `t`, frequencies
/// `exp(-ln(10000) i / (dim/2 - shift))`, sines first unless `flip_sin_to_cos`.
#[derive(Debug)]
pub struct Timesteps {
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl Timesteps {
    pub fn new(dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Self {
        Self {
            dim,
            flip_sin_to_cos,
            freq_shift,
        }
    }
}

impl Module for Timesteps {
    fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let half = self.dim / 2;
        let exponent =
            (Tensor::arange(0, half as u32, t.device())?.to_dtype(DType::F32)? * -f64::ln(10000.))?;
        let freqs = (exponent / (half as f64 - self.freq_shift))?
            .exp()?
            .to_dtype(t.dtype())?;
        let args = t
            .unsqueeze(D::Minus1)?
            .broadcast_mul(&freqs.unsqueeze(0)?)?;
        let (cos, sin) = (args.cos()?, args.sin()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[&cos, &sin], D::Minus1)?
        } else {
            Tensor::cat(&[&sin, &cos], D::Minus1)?
        };
        if self.dim % 2 == 1 {
            emb.pad_with_zeros(D::Minus1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}

/// Two linear layers with SiLU between (`act_fn = "silu"`, the only one SD models use).
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Dense,
    linear_2: Dense,
}

impl TimestepEmbedding {
    pub fn load(vb: VarBuilder, in_dim: usize, dim: usize) -> anyhow::Result<Self> {
        Ok(Self {
            linear_1: Dense::load(vb.pp("linear_1"), in_dim, dim)?,
            linear_2: Dense::load(vb.pp("linear_2"), dim, dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> anyhow::Result<Tensor> {
        let x = candle_nn::ops::silu(&self.linear_1.forward(x)?)?;
        self.linear_2.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// diffusers' values, from `get_timestep_embedding(torch.tensor([0., 1., 999.]), 6,
    /// flip_sin_to_cos=True, downscale_freq_shift=0)` worked by hand: frequencies 1,
    /// 10000^(-1/3), 10000^(-2/3); cosines first.
    #[test]
    fn matches_the_diffusers_formula() {
        let t = Tensor::new(&[0f32, 1.0, 999.0], &Device::Cpu).unwrap();
        let got = Timesteps::new(6, true, 0.0)
            .forward(&t)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (row, &tv) in got.iter().zip(&[0f64, 1.0, 999.0]) {
            let f = [1.0, 10000f64.powf(-1.0 / 3.0), 10000f64.powf(-2.0 / 3.0)];
            let want: Vec<f64> = f
                .iter()
                .map(|f| (tv * f).cos())
                .chain(f.iter().map(|f| (tv * f).sin()))
                .collect();
            for (g, w) in row.iter().zip(&want) {
                assert!((*g as f64 - w).abs() < 1e-4, "{row:?} vs {want:?}");
            }
        }
        // Sines first without the flip; shift 1 divides by dim/2 - 1.
        let got = Timesteps::new(4, false, 1.0).forward(&t).unwrap();
        let row = got.get(1).unwrap().to_vec1::<f32>().unwrap();
        let want = [1f64.sin(), 1e-4f64.sin(), 1f64.cos(), 1e-4f64.cos()];
        for (g, w) in row.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{row:?} vs {want:?}");
        }
    }
}
