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

// Channel and neighbour loops index several arrays at once; ranges read best there.
#![allow(clippy::needless_range_loop)]

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

/// A horizontal run of mask pixels `[x0, x1)` on row `y`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub y: u32,
    pub x0: u32,
    pub x1: u32,
}

/// 8-connected components of a mask, as runs. imageproc's `connected_components` labels
/// pixel by pixel (about 15-20 ms a megapixel here); a keyer's masks are long runs, and
/// union-find over runs is several times faster, which the speed bar needs.
pub(crate) struct RunComponents {
    pub runs: Vec<Run>,
    /// Component index (0..count) of each run.
    pub comp: Vec<u32>,
    pub count: usize,
}

fn find(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        let p = parent[i as usize];
        parent[i as usize] = parent[p as usize];
        i = p;
    }
    i
}

pub(crate) fn label_runs(
    width: usize,
    height: usize,
    mask: impl Fn(usize) -> bool,
) -> RunComponents {
    let mut runs: Vec<Run> = Vec::new();
    let mut parent: Vec<u32> = Vec::new();
    let mut prev_start = 0usize;
    for y in 0..height {
        let row_start = runs.len();
        let base = y * width;
        let mut x = 0;
        while x < width {
            if !mask(base + x) {
                x += 1;
                continue;
            }
            let x0 = x;
            while x < width && mask(base + x) {
                x += 1;
            }
            let id = runs.len() as u32;
            runs.push(Run {
                y: y as u32,
                x0: x0 as u32,
                x1: x as u32,
            });
            parent.push(id);
        }
        // Union with runs of the previous row that touch (8-connectivity: overlap widened by
        // one pixel on each side).
        if y > 0 {
            let mut j = prev_start;
            for i in row_start..runs.len() {
                let (a0, a1) = (runs[i].x0 as i64 - 1, runs[i].x1 as i64 + 1);
                while j < row_start && (runs[j].x1 as i64) <= a0 {
                    j += 1;
                }
                let mut k = j;
                while k < row_start && (runs[k].x0 as i64) < a1 {
                    let ri = find(&mut parent, i as u32);
                    let rk = find(&mut parent, k as u32);
                    if ri != rk {
                        let (lo, hi) = if ri < rk { (ri, rk) } else { (rk, ri) };
                        parent[hi as usize] = lo;
                    }
                    k += 1;
                }
            }
        }
        prev_start = row_start;
    }
    let mut comp = vec![0u32; runs.len()];
    let mut index = vec![u32::MAX; runs.len()];
    let mut count = 0usize;
    for i in 0..runs.len() {
        let r = find(&mut parent, i as u32) as usize;
        if index[r] == u32::MAX {
            index[r] = count as u32;
            count += 1;
        }
        comp[i] = index[r];
    }
    RunComponents { runs, comp, count }
}

/// Removes faint islands. Returns the number of pixels cleared.
pub(crate) fn remove_islands(
    width: usize,
    height: usize,
    alpha: &mut [f32],
    p: &CleanupParams,
) -> usize {
    let cc = label_runs(width, height, |i| alpha[i] > 0.0);
    if cc.count == 0 {
        return 0;
    }
    let mut area = vec![0usize; cc.count];
    let mut sum = vec![0f32; cc.count];
    for (r, &c) in cc.runs.iter().zip(&cc.comp) {
        let base = r.y as usize * width;
        area[c as usize] += (r.x1 - r.x0) as usize;
        sum[c as usize] += alpha[base + r.x0 as usize..base + r.x1 as usize]
            .iter()
            .sum::<f32>();
    }
    let mut cleared = 0;
    for (r, &c) in cc.runs.iter().zip(&cc.comp) {
        let (n, s) = (area[c as usize], sum[c as usize]);
        if n <= p.max_speck || (n <= p.max_island && s < 0.5 * n as f32) {
            let base = r.y as usize * width;
            alpha[base + r.x0 as usize..base + r.x1 as usize].fill(0.0);
            cleared += (r.x1 - r.x0) as usize;
        }
    }
    cleared
}

/// Fills pinholes whose colour is not the screen's. `screen_dist` gives, per pixel, how far the
/// image colour is from the plate colour (RGB distance), and `screen_tol` what counts as the
/// screen. A filled hole takes the mean alpha of the pixels beside it. Returns the number of
/// pixels filled.
pub(crate) fn fill_pinholes(
    width: usize,
    height: usize,
    alpha: &mut [f32],
    screen_dist: &dyn Fn(usize) -> f32,
    screen_tol: f32,
    p: &CleanupParams,
) -> usize {
    let cc = label_runs(width, height, |i| alpha[i] < 0.5);
    if cc.count == 0 {
        return 0;
    }
    let mut area = vec![0usize; cc.count];
    let mut border = vec![false; cc.count];
    for (r, &c) in cc.runs.iter().zip(&cc.comp) {
        let c = c as usize;
        area[c] += (r.x1 - r.x0) as usize;
        if r.x0 == 0 || r.x1 as usize == width || r.y == 0 || r.y as usize + 1 == height {
            border[c] = true;
        }
    }
    let candidate: Vec<bool> = (0..cc.count)
        .map(|c| !border[c] && area[c] <= p.max_hole)
        .collect();
    if !candidate.iter().any(|&c| c) {
        return 0;
    }
    let mut dist = vec![0f32; cc.count];
    let mut side_sum = vec![0f32; cc.count];
    let mut side_n = vec![0u32; cc.count];
    for (r, &c) in cc.runs.iter().zip(&cc.comp) {
        let c = c as usize;
        if !candidate[c] {
            continue;
        }
        let base = r.y as usize * width;
        for x in r.x0..r.x1 {
            dist[c] += screen_dist(base + x as usize);
        }
        // Not touching the border, so both sides exist.
        side_sum[c] += alpha[base + r.x0 as usize - 1] + alpha[base + r.x1 as usize];
        side_n[c] += 2;
    }
    let fill: Vec<Option<f32>> = (0..cc.count)
        .map(|c| {
            (candidate[c] && side_n[c] > 0 && dist[c] / area[c] as f32 > screen_tol)
                .then(|| side_sum[c] / side_n[c] as f32)
        })
        .collect();
    let mut filled = 0;
    for (r, &c) in cc.runs.iter().zip(&cc.comp) {
        if let Some(v) = fill[c as usize] {
            let base = r.y as usize * width;
            for a in &mut alpha[base + r.x0 as usize..base + r.x1 as usize] {
                *a = a.max(v);
            }
            filled += (r.x1 - r.x0) as usize;
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

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};
    use imageproc::region_labelling::{Connectivity, connected_components};

    #[test]
    fn run_labelling_agrees_with_imageproc() {
        let mut state = 12345u64;
        for (w, h, density) in [(17, 9, 0.3), (40, 31, 0.5), (64, 64, 0.62), (5, 50, 0.45)] {
            let mask: Vec<bool> = (0..w * h)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) as f64 / (1u64 << 31) as f64) < density
                })
                .collect();
            let ours = label_runs(w, h, |i| mask[i]);
            let img = GrayImage::from_fn(w as u32, h as u32, |x, y| {
                Luma([if mask[y as usize * w + x as usize] {
                    255
                } else {
                    0
                }])
            });
            let theirs = connected_components(&img, Connectivity::Eight, Luma([0u8]));
            let n_theirs = theirs.as_raw().iter().copied().max().unwrap_or(0) as usize;
            assert_eq!(ours.count, n_theirs, "{w}x{h} at {density}");
            // Same partition: pixels share a component in one labelling iff in the other.
            let mut ours_px = vec![u32::MAX; w * h];
            for (r, &c) in ours.runs.iter().zip(&ours.comp) {
                for x in r.x0..r.x1 {
                    ours_px[r.y as usize * w + x as usize] = c;
                }
            }
            let mut map = std::collections::HashMap::new();
            for (i, &t) in theirs.as_raw().iter().enumerate() {
                assert_eq!(t == 0, ours_px[i] == u32::MAX);
                if t != 0 {
                    let o = *map.entry(t).or_insert(ours_px[i]);
                    assert_eq!(o, ours_px[i]);
                }
            }
        }
    }
}
