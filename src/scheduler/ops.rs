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
