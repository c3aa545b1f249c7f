//! Group norm in two passes over each group (mean, then variance, both read from cache),
//! with the per-channel affine and an optional SiLU fused into the write.

use super::simd;
use super::{F32View, tensor};
use anyhow::{Result, ensure};
use candle_core::Tensor;

/// `silu?(group_norm(x) * gamma + beta)` over x: [B, C, ...] (diffusers/torch `GroupNorm`,
/// biased variance).
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let dims = x.dims().to_vec();
    ensure!(dims.len() >= 3, "group_norm: rank {} < 3", dims.len());
    let (b, c) = (dims[0], dims[1]);
    ensure!(
        groups > 0 && c.is_multiple_of(groups),
        "group_norm: {c} channels, {groups} groups"
    );
    let spatial: usize = dims[2..].iter().product();
    let _p = super::profile::scope(|| format!("group_norm c{c} n{spatial}"));
    let cpg = c / groups;
    let gamma = gamma.contiguous()?;
    let beta = beta.contiguous()?;
    let xv = F32View::new(&x)?;
    let gv = F32View::new(&gamma)?;
    let bv = F32View::new(&beta)?;
    let (xs, gs, bs) = (xv.slice(), gv.slice(), bv.slice());
    ensure!(gs.len() == c && bs.len() == c, "group_norm: affine size");
    let group_len = cpg * spatial;
    let mut out = vec![0.0; xs.len()];
    super::for_each_chunk(&mut out, group_len, |i, dst| {
        let src = &xs[i * group_len..][..group_len];
        let g = i % groups;
        let n = src.len() as f64;
        let total = simd::row_sum(src);
        let mean = total / n;
        let var = simd::sq_dev(src, mean as f32) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        for j in 0..cpg {
            let ch = g * cpg + j;
            let scale = rstd * gs[ch] as f64;
            let shift = bs[ch] as f64 - mean * scale;
            let r = j * spatial..(j + 1) * spatial;
            simd::affine_to(
                &src[r.clone()],
                &mut dst[r],
                scale as f32,
                shift as f32,
                silu,
            );
        }
    });
    let _ = b;
    drop(xv);
    tensor(out, dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::max_diff;
    use candle_core::{Device, Module};

    #[test]
    fn matches_candle() {
        let dev = Device::Cpu;
        for &(b, c, h, w, g) in &[(2, 8, 5, 7, 4), (1, 6, 3, 3, 3), (2, 32, 17, 9, 8)] {
            let n = b * c * h * w;
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32) * 0.1 + 3.0)
                .collect();
            let x = Tensor::from_vec(v, (b, c, h, w), &dev).unwrap();
            let gamma = Tensor::arange(0f32, c as f32, &dev)
                .unwrap()
                .affine(0.1, 0.5)
                .unwrap();
            let beta = Tensor::arange(0f32, c as f32, &dev)
                .unwrap()
                .affine(-0.05, 0.2)
                .unwrap();
            let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, g, 1e-6).unwrap();
            let want = gn.forward(&x).unwrap();
            let got = group_norm(&x, g, &gamma, &beta, 1e-6, false).unwrap();
            let d: f32 = max_diff(&got, &want);
            assert!(d < 2e-5, "max diff {d}");
            let want = candle_nn::ops::silu(&want).unwrap();
            let got = group_norm(&x, g, &gamma, &beta, 1e-6, true).unwrap();
            let d: f32 = max_diff(&got, &want);
            assert!(d < 2e-5, "silu max diff {d}");
        }
    }
}
