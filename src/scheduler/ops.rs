//! Tensor-by-scalar arithmetic that rounds like torch's: the scalar is a 0-d float32 tensor
//! and each operation rounds once (no fused multiply-add), as torch's CPU kernels do.

use anyhow::Result;
use candle_core::{DType, Tensor};

/// A 0-d tensor of `v`, typed and placed like `like`.
pub(crate) fn scalar(v: f32, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::new(v, like.device())?.to_dtype(like.dtype())?)
}

/// `t * v`.
pub(crate) fn mul(t: &Tensor, v: f32) -> Result<Tensor> {
    Ok(t.broadcast_mul(&scalar(v, t)?)?)
}

/// `t / v` (a true division, as torch's for float32).
pub(crate) fn div(t: &Tensor, v: f32) -> Result<Tensor> {
    Ok(t.broadcast_div(&scalar(v, t)?)?)
}

/// `t + v`.
#[cfg(test)]
pub(crate) fn add(t: &Tensor, v: f32) -> Result<Tensor> {
    Ok(t.broadcast_add(&scalar(v, t)?)?)
}

/// The tensor as float32 (diffusers' samplers compute in float32).
pub(crate) fn f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// A step computed in float32 and returned in the model output's dtype, as diffusers'
/// schedulers upcast and cast back.
pub(crate) fn in_f32(
    model_output: &Tensor,
    sample: &Tensor,
    step: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dtype = model_output.dtype();
    Ok(step(&f32(model_output)?, &f32(sample)?)?.to_dtype(dtype)?)
}

/// `alphas_cumprod ** 0.5 * x + (1 - alphas_cumprod) ** 0.5 * noise`: the DDPM-family
/// `add_noise` (DDIM, LCM) at a timestep whose cumulative alpha is `alpha_cumprod`.
pub(crate) fn noised_at_alpha(x: &Tensor, noise: &Tensor, alpha_cumprod: f32) -> Result<Tensor> {
    Ok((mul(x, alpha_cumprod.sqrt())? + mul(noise, (1.0 - alpha_cumprod).sqrt())?)?)
}

/// `x + noise * sigma`: the Karras-style `add_noise` (Euler, Euler ancestral, Heun).
pub(crate) fn noised_at_sigma(x: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok((x + mul(noise, sigma)?)?)
}
