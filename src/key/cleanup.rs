//! Matte clean-up: islands, pinholes, and an optional edge-aware refinement.
//!
//! The rules are chosen so that nothing thin or uniformly semi-transparent is lost:
//! - An island is a small connected region of non-zero alpha that is also faint (mean alpha
//!   well below one) or tiny (a few pixels). Strands of hair are long, so their area is not
//!   small; a faint speck of screen noise is.
//! - A pinhole is a small region of alpha < 0.5 enclosed by the subject (it does not touch the
//!   image border) whose colour is *not* the screen's: the subject had a screen-like colour
//!   there. A real gap, the counter of a letter, shows the plate colour and is kept.
//! - Refinement is a guided filter (He et al.) of the matte with the image's key measure as
//!   guide, applied only in the soft band; the opaque and clear parts are untouched.

use image::{GrayImage, Luma};
use imageproc::region_labelling::{Connectivity, connected_components};

/// Settings of the clean-up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CleanupParams {
    /// Islands up to this many pixels are removed when faint (mean alpha < 0.5).
    pub max_island: usize,
    /// Islands up to this many pixels are removed whatever their alpha.
    pub max_speck: usize,
    /// Holes up to this many pixels are filled when they are not screen-coloured.
    pub max_hole: usize,
}

impl CleanupParams {
    pub fn for_size(n: usize) -> Self {
        Self {
            max_island: (n / 20_000).clamp(4, 400),
            max_speck: 2,
            max_hole: (n / 10_000).clamp(4, 2000),
        }
    }
}

struct Components {
    labels: Vec<u32>,
    count: usize,
}

fn label(mask: GrayImage) -> Components {
    // imageproc's labeller indexes its forest by label and overflows when every pixel is its
    // own component, which a 1-pixel image is; callers skip images that small.
    debug_assert!(mask.len() >= 4);
    let labels = connected_components(&mask, Connectivity::Eight, Luma([0u8])).into_raw();
    let count = labels.iter().copied().max().unwrap_or(0) as usize;
    Components { labels, count }
}

/// Removes faint islands. Returns the number of pixels cleared.
pub(crate) fn remove_islands(
    width: usize,
    height: usize,
    alpha: &mut [f32],
    p: &CleanupParams,
) -> usize {
    if width * height < 4 {
        return 0;
    }
    let mask: Vec<u8> = alpha
        .iter()
        .map(|&a| if a > 0.0 { 255 } else { 0 })
        .collect();
    let Some(mask) = GrayImage::from_raw(width as u32, height as u32, mask) else {
        return 0;
    };
    let cc = label(mask);
    if cc.count == 0 {
        return 0;
    }
    let mut area = vec![0u32; cc.count + 1];
    let mut sum = vec![0f32; cc.count + 1];
    for (&l, &a) in cc.labels.iter().zip(alpha.iter()) {
        if l != 0 {
            area[l as usize] += 1;
            sum[l as usize] += a;
        }
    }
    let remove: Vec<bool> = area
        .iter()
        .zip(&sum)
        .map(|(&n, &s)| {
            let n = n as usize;
            n > 0 && (n <= p.max_speck || (n <= p.max_island && s < 0.5 * n as f32))
        })
        .collect();
    let mut cleared = 0;
    for (&l, a) in cc.labels.iter().zip(alpha.iter_mut()) {
        if l != 0 && remove[l as usize] {
            *a = 0.0;
            cleared += 1;
        }
    }
    cleared
}

/// Fills pinholes whose colour is not the screen's. `screen_dist` gives, per pixel, how far the
/// image colour is from the plate colour (RGB distance), and `screen_tol` what counts as the
/// screen. Returns the number of pixels filled.
pub(crate) fn fill_pinholes(
    width: usize,
    height: usize,
    alpha: &mut [f32],
    screen_dist: &dyn Fn(usize) -> f32,
    screen_tol: f32,
    p: &CleanupParams,
) -> usize {
    if width * height < 4 {
        return 0;
    }
    let mask: Vec<u8> = alpha
        .iter()
        .map(|&a| if a < 0.5 { 255 } else { 0 })
        .collect();
    let Some(mask) = GrayImage::from_raw(width as u32, height as u32, mask) else {
        return 0;
    };
    let cc = label(mask);
    if cc.count == 0 {
        return 0;
    }
    let mut area = vec![0u32; cc.count + 1];
    let mut border = vec![false; cc.count + 1];
    for (i, &l) in cc.labels.iter().enumerate() {
        if l != 0 {
            area[l as usize] += 1;
            let (x, y) = (i % width, i / width);
            if x == 0 || y == 0 || x + 1 == width || y + 1 == height {
                border[l as usize] = true;
            }
        }
    }
    // Candidates: small, enclosed.
    let candidate: Vec<bool> = area
        .iter()
        .zip(&border)
        .map(|(&n, &b)| n > 0 && !b && (n as usize) <= p.max_hole)
        .collect();
    if !candidate.iter().any(|&c| c) {
        return 0;
    }
    // Mean distance from the screen colour, and the mean alpha around each candidate.
    let mut dist = vec![0f32; cc.count + 1];
    let mut ring_sum = vec![0f32; cc.count + 1];
    let mut ring_n = vec![0u32; cc.count + 1];
    for (i, &l) in cc.labels.iter().enumerate() {
        let l = l as usize;
        if l == 0 || !candidate[l] {
            continue;
        }
        dist[l] += screen_dist(i);
        let (x, y) = (i % width, i / width);
        let mut visit = |j: usize| {
            if cc.labels[j] == 0 {
                ring_sum[l] += alpha[j];
                ring_n[l] += 1;
            }
        };
        if x > 0 {
            visit(i - 1);
        }
        if x + 1 < width {
            visit(i + 1);
        }
        if y > 0 {
            visit(i - width);
        }
        if y + 1 < height {
            visit(i + width);
        }
    }
    let fill: Vec<Option<f32>> = (0..=cc.count)
        .map(|l| {
            if !candidate[l] || ring_n[l] == 0 {
                return None;
            }
            let mean_dist = dist[l] / area[l] as f32;
            (mean_dist > screen_tol).then(|| ring_sum[l] / ring_n[l] as f32)
        })
        .collect();
    let mut filled = 0;
    for (&l, a) in cc.labels.iter().zip(alpha.iter_mut()) {
        if let Some(v) = fill[l as usize] {
            *a = a.max(v);
            filled += 1;
        }
    }
    filled
}

/// Box sums with radius `r` (clamped window) over a row-major float image, separable.
fn box_mean(width: usize, height: usize, src: &[f32], r: usize) -> Vec<f32> {
    let mut tmp = vec![0f32; src.len()];
    let mut out = vec![0f32; src.len()];
    for y in 0..height {
        let row = &src[y * width..(y + 1) * width];
        let mut prefix = Vec::with_capacity(width + 1);
        prefix.push(0f32);
        let mut s = 0f32;
        for &v in row {
            s += v;
            prefix.push(s);
        }
        for x in 0..width {
            let a = x.saturating_sub(r);
            let b = (x + r + 1).min(width);
            tmp[y * width + x] = (prefix[b] - prefix[a]) / (b - a) as f32;
        }
    }
    let mut col = vec![0f32; height + 1];
    for x in 0..width {
        let mut s = 0f32;
        col[0] = 0.0;
        for y in 0..height {
            s += tmp[y * width + x];
            col[y + 1] = s;
        }
        for y in 0..height {
            let a = y.saturating_sub(r);
            let b = (y + r + 1).min(height);
            out[y * width + x] = (col[b] - col[a]) / (b - a) as f32;
        }
    }
    out
}

/// Guided-filter refinement of the matte in its soft band. `guide` is a per-pixel scalar that
/// varies with alpha (the raw key measure).
pub(crate) fn refine(width: usize, height: usize, alpha: &mut [f32], guide: &[f32]) {
    let r = 2usize;
    let eps = 1e-3f32;
    let n = alpha.len();
    let mean_i = box_mean(width, height, guide, r);
    let mean_p = box_mean(width, height, alpha, r);
    let ip: Vec<f32> = guide.iter().zip(alpha.iter()).map(|(g, a)| g * a).collect();
    let ii: Vec<f32> = guide.iter().map(|g| g * g).collect();
    let corr_ip = box_mean(width, height, &ip, r);
    let corr_ii = box_mean(width, height, &ii, r);
    let mut a_coef = vec![0f32; n];
    let mut b_coef = vec![0f32; n];
    for i in 0..n {
        let var = corr_ii[i] - mean_i[i] * mean_i[i];
        let cov = corr_ip[i] - mean_i[i] * mean_p[i];
        a_coef[i] = cov / (var + eps);
        b_coef[i] = mean_p[i] - a_coef[i] * mean_i[i];
    }
    let ma = box_mean(width, height, &a_coef, r);
    let mb = box_mean(width, height, &b_coef, r);
    // Only the soft band (pixels near a non-binary alpha) changes.
    let soft: Vec<f32> = alpha
        .iter()
        .map(|&a| if a > 0.0 && a < 1.0 { 1.0 } else { 0.0 })
        .collect();
    let near = box_mean(width, height, &soft, 1);
    for i in 0..n {
        if near[i] > 0.0 {
            let v = (ma[i] * guide[i] + mb[i]).clamp(0.0, 1.0);
            alpha[i] = v;
        }
    }
}
