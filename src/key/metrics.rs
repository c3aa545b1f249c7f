//! The matting literature's matte-quality metrics (alphamatting.com, DIM and later evaluation
//! code): SAD, MSE, Gradient and Connectivity over a trimap's unknown band, plus whole-image
//! errors. Alphas are in [0, 1], row-major.

use image::{GrayImage, ImageBuffer, Luma};
use imageproc::distance_transform::Norm;
use imageproc::filter::separable_filter;
use imageproc::morphology::{dilate, erode};
use imageproc::region_labelling::{Connectivity, connected_components};

/// Trimap values.
pub const TRIMAP_BG: u8 = 0;
pub const TRIMAP_UNKNOWN: u8 = 128;
pub const TRIMAP_FG: u8 = 255;

/// The evaluation trimap of a ground-truth alpha: the a = 1 region eroded by `radius` is
/// foreground, everything outside the a > 0 region dilated by `radius` is background, the band
/// between them unknown.
pub fn trimap(width: usize, height: usize, gt: &[f32], radius: u8) -> Vec<u8> {
    let fg: Vec<u8> = gt
        .iter()
        .map(|&a| if a >= 1.0 - 1e-6 { 255 } else { 0 })
        .collect();
    let any: Vec<u8> = gt.iter().map(|&a| if a > 1e-6 { 255 } else { 0 }).collect();
    let fg = GrayImage::from_raw(width as u32, height as u32, fg).expect("size");
    let any = GrayImage::from_raw(width as u32, height as u32, any).expect("size");
    let fg = erode(&fg, Norm::L2, radius);
    let any = dilate(&any, Norm::L2, radius);
    fg.as_raw()
        .iter()
        .zip(any.as_raw())
        .map(|(&f, &a)| {
            if f > 0 {
                TRIMAP_FG
            } else if a == 0 {
                TRIMAP_BG
            } else {
                TRIMAP_UNKNOWN
            }
        })
        .collect()
}

/// Matte errors of a prediction against ground truth.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MatteErrors {
    /// Sum of absolute differences over the unknown band, / 1000.
    pub sad: f64,
    /// Mean squared error over the unknown band.
    pub mse: f64,
    /// Gradient error over the unknown band, / 1000.
    pub gradient: f64,
    /// Connectivity error over the unknown band, / 1000.
    pub connectivity: f64,
    /// Mean squared error over the whole image.
    pub mse_whole: f64,
    /// Sum of absolute differences over the whole image, / 1000.
    pub sad_whole: f64,
    /// Pixels in the unknown band.
    pub unknown: usize,
}

/// All matte metrics at once.
pub fn matte_errors(
    width: usize,
    height: usize,
    pred: &[f32],
    gt: &[f32],
    trimap: &[u8],
) -> MatteErrors {
    let mut e = MatteErrors::default();
    let mut sq_u = 0f64;
    let mut sq_all = 0f64;
    let mut abs_all = 0f64;
    for i in 0..gt.len() {
        let d = (pred[i] - gt[i]) as f64;
        sq_all += d * d;
        abs_all += d.abs();
        if trimap[i] == TRIMAP_UNKNOWN {
            e.unknown += 1;
            e.sad += d.abs();
            sq_u += d * d;
        }
    }
    e.sad /= 1000.0;
    e.mse = if e.unknown > 0 {
        sq_u / e.unknown as f64
    } else {
        0.0
    };
    e.mse_whole = sq_all / gt.len().max(1) as f64;
    e.sad_whole = abs_all / 1000.0;
    e.gradient = gradient_error(width, height, pred, gt, trimap);
    e.connectivity = connectivity_error(width, height, pred, gt, trimap, 0.1);
    e
}

/// 1-D Gaussian and its derivative for sigma, each scaled to unit L2 norm, with the usual
/// half-size `ceil(sigma * sqrt(-2 ln(sqrt(2 pi) sigma 0.01)))`.
fn gaussian_kernels(sigma: f64) -> (Vec<f32>, Vec<f32>) {
    let eps = 1e-2f64;
    let half = (sigma * (-2.0 * ((2.0 * std::f64::consts::PI).sqrt() * sigma * eps).ln()).sqrt())
        .ceil() as i64;
    let g = |x: f64| (-x * x / (2.0 * sigma * sigma)).exp();
    let xs: Vec<f64> = (-half..=half).map(|x| x as f64).collect();
    let mut g0: Vec<f64> = xs.iter().map(|&x| g(x)).collect();
    let mut g1: Vec<f64> = xs.iter().map(|&x| -x / (sigma * sigma) * g(x)).collect();
    for v in [&mut g0, &mut g1] {
        let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        v.iter_mut().for_each(|a| *a /= n);
    }
    (
        g0.into_iter().map(|v| v as f32).collect(),
        g1.into_iter().map(|v| v as f32).collect(),
    )
}

fn grad_mag(width: usize, height: usize, a: &[f32]) -> Vec<f32> {
    let (g0, g1) = gaussian_kernels(1.4);
    let img: ImageBuffer<Luma<f32>, Vec<f32>> =
        ImageBuffer::from_raw(width as u32, height as u32, a.to_vec()).expect("size");
    let gx = separable_filter(&img, &g1, &g0);
    let gy = separable_filter(&img, &g0, &g1);
    gx.as_raw()
        .iter()
        .zip(gy.as_raw())
        .map(|(x, y)| (x * x + y * y).sqrt())
        .collect()
}

/// Gradient error: sum over the unknown band of (|grad pred| - |grad gt|)^2, / 1000, with
/// Gaussian first-derivative filters of sigma 1.4.
pub fn gradient_error(width: usize, height: usize, pred: &[f32], gt: &[f32], trimap: &[u8]) -> f64 {
    if width == 0 || height == 0 {
        return 0.0;
    }
    let gp = grad_mag(width, height, pred);
    let gg = grad_mag(width, height, gt);
    let mut s = 0f64;
    for i in 0..gt.len() {
        if trimap[i] == TRIMAP_UNKNOWN {
            let d = (gp[i] - gg[i]) as f64;
            s += d * d;
        }
    }
    s / 1000.0
}

/// Connectivity error with threshold step `step`.
pub fn connectivity_error(
    width: usize,
    height: usize,
    pred: &[f32],
    gt: &[f32],
    trimap: &[u8],
    step: f32,
) -> f64 {
    let n = gt.len();
    // (imageproc's labeller cannot take a one-pixel image.)
    if n < 4 {
        return 0.0;
    }
    let steps: Vec<f32> = (0..)
        .map(|i| i as f32 * step)
        .take_while(|&t| t <= 1.0 + 1e-6)
        .collect();
    let mut l_map = vec![-1f32; n];
    for i in 1..steps.len() {
        let t = steps[i];
        let mask: Vec<u8> = pred
            .iter()
            .zip(gt)
            .map(|(&p, &g)| if p >= t && g >= t { 255 } else { 0 })
            .collect();
        let mask = GrayImage::from_raw(width as u32, height as u32, mask).expect("size");
        let labels = connected_components(&mask, Connectivity::Four, Luma([0u8])).into_raw();
        let count = labels.iter().copied().max().unwrap_or(0) as usize;
        let mut area = vec![0usize; count + 1];
        for &l in &labels {
            area[l as usize] += 1;
        }
        let largest = (1..=count).max_by_key(|&l| area[l]).unwrap_or(0);
        for (j, &l) in labels.iter().enumerate() {
            let in_omega = largest != 0 && l as usize == largest;
            if l_map[j] == -1.0 && !in_omega {
                l_map[j] = steps[i - 1];
            }
        }
    }
    let phi = |a: f32, l: f32| {
        let d = a - l;
        1.0 - if d >= 0.15 { d } else { 0.0 }
    };
    let mut s = 0f64;
    for j in 0..n {
        if trimap[j] == TRIMAP_UNKNOWN {
            let l = if l_map[j] == -1.0 { 1.0 } else { l_map[j] };
            s += (phi(pred[j], l) - phi(gt[j], l)).abs() as f64;
        }
    }
    s / 1000.0
}

/// Foreground colour error where the ground-truth alpha exceeds 0.5: mean Euclidean RGB
/// distance (0..255 units) between predicted and true straight colours.
pub fn foreground_error(pred_rgb: &[u8], gt_rgb: &[u8], gt_alpha: &[f32]) -> f64 {
    let mut s = 0f64;
    let mut n = 0usize;
    for (i, &a) in gt_alpha.iter().enumerate() {
        if a > 0.5 {
            let d: f64 = (0..3)
                .map(|k| {
                    let v = pred_rgb[3 * i + k] as f64 - gt_rgb[3 * i + k] as f64;
                    v * v
                })
                .sum();
            s += d.sqrt();
            n += 1;
        }
    }
    if n == 0 { 0.0 } else { s / n as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disc(w: usize, h: usize, r: f32) -> Vec<f32> {
        (0..w * h)
            .map(|i| {
                let (x, y) = (
                    (i % w) as f32 - w as f32 / 2.0,
                    (i / w) as f32 - h as f32 / 2.0,
                );
                (r - (x * x + y * y).sqrt() + 0.5).clamp(0.0, 1.0)
            })
            .collect()
    }

    #[test]
    fn perfect_prediction_has_zero_error() {
        let gt = disc(40, 30, 9.3);
        let tri = trimap(40, 30, &gt, 3);
        assert!(tri.contains(&TRIMAP_UNKNOWN));
        assert!(tri.contains(&TRIMAP_FG));
        assert!(tri.contains(&TRIMAP_BG));
        let e = matte_errors(40, 30, &gt, &gt, &tri);
        assert_eq!(e.sad, 0.0);
        assert_eq!(e.mse, 0.0);
        assert!(e.gradient.abs() < 1e-12);
        assert_eq!(e.connectivity, 0.0);
    }

    #[test]
    fn errors_grow_with_damage() {
        let gt = disc(40, 30, 9.3);
        let tri = trimap(40, 30, &gt, 3);
        let small: Vec<f32> = gt.iter().map(|a| (a * 0.95).clamp(0.0, 1.0)).collect();
        let big: Vec<f32> = gt.iter().map(|a| (a * 0.5).clamp(0.0, 1.0)).collect();
        let es = matte_errors(40, 30, &small, &gt, &tri);
        let eb = matte_errors(40, 30, &big, &gt, &tri);
        assert!(es.sad > 0.0 && eb.sad > es.sad);
        assert!(eb.mse > es.mse);
        assert!(eb.gradient > es.gradient);
        // Connectivity: a hole cut into the disc disconnects nothing in the unknown band, but
        // halving the alpha changes where pixels leave the connected region.
        assert!(eb.connectivity > 0.0);
        // SAD by hand.
        let by_hand: f64 = (0..gt.len())
            .filter(|&i| tri[i] == TRIMAP_UNKNOWN)
            .map(|i| (big[i] - gt[i]).abs() as f64)
            .sum::<f64>()
            / 1000.0;
        assert!((eb.sad - by_hand).abs() < 1e-9);
    }

    #[test]
    fn gaussian_kernels_are_unit_norm() {
        let (g0, g1) = gaussian_kernels(1.4);
        assert_eq!(g0.len(), g1.len());
        assert_eq!(g0.len() % 2, 1);
        let n0: f32 = g0.iter().map(|v| v * v).sum();
        let n1: f32 = g1.iter().map(|v| v * v).sum();
        assert!((n0 - 1.0).abs() < 1e-5 && (n1 - 1.0).abs() < 1e-5);
    }
}
