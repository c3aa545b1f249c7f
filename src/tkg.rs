//! TKG-DM initial noise: a channel-mean shift of the background noise, blended with the
//! original noise by a 2D Gaussian mask (see shared/design/tkg-dm.md).
//!
//! Every floating-point step follows the authors' reference code (ryugo417/TKG-DM, utils.py)
//! operation by operation, including its float16 mask, so that the result matches it to 1e-6.

use crate::color::ChannelSigns;
use anyhow::{Result, bail, ensure};
use candle_core::{Device, Tensor};
use half::f16;

/// TKG-DM settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TkgSettings {
    /// Mean-shift sign per latent channel.
    pub signs: ChannelSigns,
    /// Wanted increase of the fraction of positive (sign-adjusted) elements, e.g. 0.07.
    pub target_shift: f64,
    /// Gaussian sigma in the [-1, 1] coordinate frame.
    pub sigma: f64,
    /// Subject centres in [-1, 1]; several are combined by their maximum.
    pub centers: Vec<(f64, f64)>,
}

/// What the shift did to one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ShiftReport {
    /// The delta added (times the sign) to each channel; 0 for unshifted channels.
    pub deltas: [f32; 4],
}

/// torch.linspace(start, end, n) in float32, as torch's CPU kernel computes it: from `start`
/// for the first half and from `end` for the second, each with a fused multiply-add.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            // torch's CPU kernel computes these with a fused multiply-add.
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

fn positive_ratio(values: &[f32], sign: f32, delta: f32) -> f32 {
    let n = values
        .iter()
        .filter(|&&v| sign * (v + sign * delta) > 0.0)
        .count();
    n as f32 / values.len() as f32
}

/// Shifts one channel (`values`) until the fraction of elements with `sign * v > 0` has grown
/// by `target_shift`, in steps of 0.01 as the reference does. Returns the delta.
pub fn shift_channel(values: &mut [f32], sign: i8, target_shift: f64) -> Result<f32> {
    let s = sign as f32;
    let target = positive_ratio(values, s, 0.0) + target_shift as f32;
    if target > 1.0 {
        bail!(
            "TKG shift {target_shift} cannot be reached: {:.3} of the noise is already on that side; use a smaller --shift",
            target - target_shift as f32
        );
    }
    let mut delta = 0.0f64;
    loop {
        if positive_ratio(values, s, delta as f32) >= target {
            break;
        }
        delta += 0.01;
        ensure!(delta < 100.0, "TKG shift did not converge");
    }
    let d = delta as f32;
    for v in values.iter_mut() {
        *v += s * d;
    }
    Ok(d)
}

/// The blending mask A (h x w, row-major): Gaussians on a coarse grid, resized bilinearly
/// (half-pixel centres, edge clamp) to the latent size.
pub fn gaussian_mask(h: usize, w: usize, sigma: f64, centers: &[(f64, f64)]) -> Vec<f32> {
    // The reference divides the latent size by 8 again; keep that, with at least 2 cells.
    let (gh, gw) = ((h / 8).max(2), (w / 8).max(2));
    let ys = linspace_f32(-1.0, 1.0, gh);
    let xs = linspace_f32(-1.0, 1.0, gw);
    let denom = (2.0 * sigma * sigma) as f32;
    let mut grid = vec![0f32; gh * gw];
    for (i, &y) in ys.iter().enumerate() {
        for (j, &x) in xs.iter().enumerate() {
            let mut best = f32::NEG_INFINITY;
            for &(cx, cy) in centers {
                let dx = x - cx as f32;
                let dy = y - cy as f32;
                best = best.max((-((dx * dx + dy * dy) / denom)).exp());
            }
            grid[i * gw + j] = best;
        }
    }
    resize_bilinear(&grid, gh, gw, h, w)
}

/// PyTorch's F.interpolate(mode="bilinear", align_corners=False) for one channel ([1, 1, ih, iw]
/// float32 on the CPU), bit for bit. torch picks one of two kernels for a 1-channel input, and
/// the two round differently (both are compiled with fused multiply-adds):
/// - output h + w <= 128: `cpu_upsample_linear_channels_last`, which sums the four corners with
///   the weights h_i * w_j: `fma(w11, d, fma(w10, c, fma(w00, a, w01 * b)))`;
/// - otherwise the generic separable kernel: each row `fma(a, w0, b * w1)`, then
///   `fma(row0, h0, row1 * h1)`.
///
/// Checked against torch 2.15: fed the golden Gaussian grids, it reproduces all 9 golden masks
/// (tests/golden/tkg) with 0 differing elements. The masks that remain are 1 ulp off only where
/// libm's exp differs from torch's (see tests/it/tkg_reference.rs).
fn resize_bilinear(src: &[f32], ih: usize, iw: usize, oh: usize, ow: usize) -> Vec<f32> {
    // torch's compute_source_index_and_lambda: (index0, index1, lambda0, lambda1).
    let axis = |insz: usize, outsz: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = insz as f32 / outsz as f32;
        (0..outsz)
            .map(|o| {
                if insz == outsz {
                    return (o, o, 1.0, 0.0);
                }
                let real = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (real.floor() as usize).min(insz - 1);
                let i1 = if i0 < insz - 1 { i0 + 1 } else { i0 };
                let l1 = (real - i0 as f32).clamp(0.0, 1.0);
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let (ry, rx) = (axis(ih, oh), axis(iw, ow));
    let corner_weights = oh + ow <= 128;
    let mut out = Vec::with_capacity(oh * ow);
    for &(y0, y1, h0, h1) in &ry {
        for &(x0, x1, w0, w1) in &rx {
            let (a, b) = (src[y0 * iw + x0], src[y0 * iw + x1]);
            let (c, d) = (src[y1 * iw + x0], src[y1 * iw + x1]);
            let v = if corner_weights {
                let (w00, w01, w10, w11) = (h0 * w0, h0 * w1, h1 * w0, h1 * w1);
                w11.mul_add(d, w10.mul_add(c, w00.mul_add(a, w01 * b)))
            } else {
                let t0 = a.mul_add(w0, b * w1);
                let t1 = c.mul_add(w0, d * w1);
                t0.mul_add(h0, t1 * h1)
            };
            out.push(v);
        }
    }
    out
}

/// Applies TKG-DM to noise `z` ([B, C, h, w], f32), image by image, so an image is the same
/// alone or in a batch. Returns the initial latents and one report per image.
pub fn apply(z: &Tensor, settings: &TkgSettings) -> Result<(Tensor, Vec<ShiftReport>)> {
    let (b, c, h, w) = z.dims4()?;
    ensure!(
        c >= 4 || settings.signs[c..].iter().all(|&s| s == 0),
        "latents have {c} channels"
    );
    ensure!(
        !settings.centers.is_empty(),
        "TKG needs at least one subject centre"
    );
    ensure!(
        settings.sigma > 0.0 && settings.sigma.is_finite(),
        "--mask-sigma must be positive"
    );
    ensure!(
        (0.0..1.0).contains(&settings.target_shift),
        "--shift must be in [0, 1)"
    );
    let mask = gaussian_mask(h, w, settings.sigma, &settings.centers);
    // The reference stores the mask in float16 and computes 1 - mask in float16.
    let (m, one_minus_m): (Vec<f32>, Vec<f32>) = mask
        .iter()
        .map(|&a| {
            let a16 = f16::from_f32(a);
            (a16.to_f32(), f16::from_f32(1.0 - a16.to_f32()).to_f32())
        })
        .unzip();
    let data: Vec<f32> = z
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let plane = h * w;
    let mut out = Vec::with_capacity(data.len());
    let mut reports = Vec::with_capacity(b);
    for img in data.chunks_exact(c * plane) {
        let mut deltas = [0f32; 4];
        for ch in 0..c {
            let orig = &img[ch * plane..(ch + 1) * plane];
            let sign = settings.signs.get(ch).copied().unwrap_or(0);
            let mut shifted = orig.to_vec();
            if sign != 0 {
                deltas[ch] = shift_channel(&mut shifted, sign, settings.target_shift)?;
            }
            out.extend((0..plane).map(|i| m[i] * orig[i] + one_minus_m[i] * shifted[i]));
        }
        reports.push(ShiftReport { deltas });
    }
    let t = Tensor::from_vec(out, (b, c, h, w), &Device::Cpu)?.to_device(z.device())?;
    Ok((t, reports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_torch_endpoints() {
        let v = linspace_f32(-1.0, 1.0, 8);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[7], 1.0);
        assert!((v[3] + v[4]).abs() < 1e-7);
    }

    #[test]
    fn mask_peaks_at_the_centre_and_is_symmetric() {
        let m = gaussian_mask(64, 64, 0.5, &[(0.0, 0.0)]);
        let at = |y: usize, x: usize| m[y * 64 + x];
        assert!(at(32, 32) > 0.9);
        assert!(at(0, 0) < 0.05);
        assert!((at(10, 20) - at(20, 10)).abs() < 1e-6);
        assert!((at(10, 20) - at(53, 43)).abs() < 1e-6);
        let moved = gaussian_mask(64, 64, 0.5, &[(0.5, 0.0)]);
        assert!(moved[32 * 64 + 48] > moved[32 * 64 + 16]);
    }

    #[test]
    fn tiny_latents_still_get_a_mask() {
        let m = gaussian_mask(4, 6, 0.5, &[(0.0, 0.0)]);
        assert_eq!(m.len(), 24);
        assert!(m.iter().all(|v| v.is_finite() && *v > 0.0));
    }

    #[test]
    fn shift_reaches_its_target_with_the_smallest_delta() {
        let mut rng = crate::models::weights::SplitMix64::new(5);
        let orig: Vec<f32> = (0..4096).map(|_| rng.normal()).collect();
        for sign in [1i8, -1] {
            let mut v = orig.clone();
            let d = shift_channel(&mut v, sign, 0.07).unwrap();
            let s = sign as f32;
            let p0 = positive_ratio(&orig, s, 0.0);
            assert!(positive_ratio(&orig, s, d) >= p0 + 0.07);
            assert!(positive_ratio(&orig, s, d - 0.01) < p0 + 0.07);
            assert!((0.1..0.3).contains(&d), "delta {d}");
        }
    }

    #[test]
    fn unreachable_shift_is_an_error() {
        let mut v = vec![1.0f32; 10];
        assert!(shift_channel(&mut v, 1, 0.5).is_err());
    }
}
