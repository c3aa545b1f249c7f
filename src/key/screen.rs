//! The screen: its colour estimated from the border ring, the image's noise level, and a
//! smooth clean plate fitted to the pixels that are confidently screen.
//!
//! Colours are handled in a "key space": the chroma of a colour is its RGB minus its mean
//! (the projection onto the plane orthogonal to grey), and the screen's hue gives an axis in
//! that plane. On that plane hues form a true circle (red, yellow, green ... 60 degrees apart),
//! so everything here works for any key colour, not only green.

// Channel and neighbour loops index several arrays at once; ranges read best there.
#![allow(clippy::needless_range_loop)]

use super::ScreenEstimate;

/// Chroma magnitude below which a screen is treated as achromatic (white, black, grey keys).
pub(crate) const ACHROMATIC_CHROMA: f32 = 24.0;

#[inline]
pub(crate) fn chroma(c: [f32; 3]) -> [f32; 3] {
    let m = (c[0] + c[1] + c[2]) * (1.0 / 3.0);
    [c[0] - m, c[1] - m, c[2] - m]
}

#[inline]
pub(crate) fn dot(a: [f32; 3], b: [f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

#[inline]
pub(crate) fn norm(a: [f32; 3]) -> f32 {
    dot(a, a).sqrt()
}

#[inline]
pub(crate) fn px(rgb: &[u8], i: usize) -> [f32; 3] {
    [
        rgb[3 * i] as f32,
        rgb[3 * i + 1] as f32,
        rgb[3 * i + 2] as f32,
    ]
}

fn median(v: &mut [f32]) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b));
    *m
}

fn median3(samples: &[[f32; 3]]) -> [f32; 3] {
    let mut out = [0.0; 3];
    let mut buf: Vec<f32> = Vec::with_capacity(samples.len());
    for (k, o) in out.iter_mut().enumerate() {
        buf.clear();
        buf.extend(samples.iter().map(|s| s[k]));
        *o = median(&mut buf);
    }
    out
}

/// Whether colour `c` looks like the screen `s` up to brightness: same hue (within about 17
/// degrees) and a chroma between 35% and 170% of the screen's. Shading, gradients and
/// vignettes change brightness, not hue. For achromatic screens, plain RGB distance.
#[inline]
pub(crate) fn screen_like(c: [f32; 3], s: [f32; 3], s_axis: [f32; 3], s_chroma: f32) -> bool {
    if s_chroma < ACHROMATIC_CHROMA {
        let d = [c[0] - s[0], c[1] - s[1], c[2] - s[2]];
        return dot(d, d) < 40.0 * 40.0;
    }
    let ch = chroma(c);
    let par = dot(ch, s_axis);
    if par < 0.35 * s_chroma || par > 1.7 * s_chroma {
        return false;
    }
    let perp2 = (dot(ch, ch) - par * par).max(0.0);
    perp2 < 0.09 * par * par
}

fn hex(c: [f32; 3]) -> String {
    let b = c.map(|v| v.round().clamp(0.0, 255.0) as u8);
    format!("#{:02x}{:02x}{:02x}", b[0], b[1], b[2])
}

/// The screen colour from the border ring, with a confidence; falls back to `requested`.
/// Also returns the per-channel noise sigma measured on the screen part of the ring.
pub(crate) fn estimate(
    width: usize,
    height: usize,
    rgb: &[u8],
    requested: [f32; 3],
    requested_name: &str,
) -> (ScreenEstimate, f32) {
    let ring = (width.min(height) / 48).clamp(1, 16);
    // Walk the ring as rows of pixels so neighbour differences measure noise, not content.
    let mut samples: Vec<[f32; 3]> = Vec::new();
    let mut pairs: Vec<(usize, usize)> = Vec::new();
    let perimeter = 2 * (width + height);
    let step = (perimeter * ring / 20_000).max(1);
    let mut push_run = |coords: &mut dyn Iterator<Item = usize>| {
        let mut prev: Option<usize> = None;
        for (k, i) in coords.enumerate() {
            if k % step != 0 && step > 1 {
                // Keep adjacent pairs for the noise estimate: take this pixel and the next.
                if k % step != 1 {
                    prev = None;
                    continue;
                }
            }
            let idx = samples.len();
            samples.push(px(rgb, i));
            if let Some(p) = prev {
                pairs.push((p, idx));
            }
            prev = Some(idx);
        }
    };
    for r in 0..ring.min(height) {
        push_run(&mut (0..width).map(|x| r * width + x));
        let yb = height - 1 - r;
        if yb != r && yb >= ring {
            push_run(&mut (0..width).map(|x| yb * width + x));
        }
    }
    for r in 0..ring.min(width) {
        let xr = width - 1 - r;
        let inner = ring.min(height)..height.saturating_sub(ring);
        push_run(&mut inner.clone().map(|y| y * width + r));
        if xr != r && xr >= ring {
            push_run(&mut inner.map(|y| y * width + xr));
        }
    }

    let req_axis_chroma = chroma(requested);
    let req_chroma = norm(req_axis_chroma);
    let mut confidence = 0.0f32;
    let mut estimate = requested;
    let mut inlier_frac = 0.0f32;
    let mut noise = 2.0f32;
    let mut reason: Option<String> = None;

    if !samples.is_empty() {
        let m0 = median3(&samples);
        let ch0 = chroma(m0);
        let c0 = norm(ch0);
        let axis0 = if c0 > 1e-3 {
            ch0.map(|v| v / c0)
        } else {
            [0.0; 3]
        };
        let inlier: Vec<bool> = samples
            .iter()
            .map(|&s| screen_like(s, m0, axis0, c0))
            .collect();
        let n_in = inlier.iter().filter(|&&b| b).count();
        inlier_frac = n_in as f32 / samples.len() as f32;
        let ins: Vec<[f32; 3]> = samples
            .iter()
            .zip(&inlier)
            .filter(|(_, b)| **b)
            .map(|(s, _)| *s)
            .collect();
        if !ins.is_empty() {
            estimate = median3(&ins);
        }
        // Noise: robust spread of differences between neighbouring screen pixels.
        let mut diffs: Vec<f32> = Vec::with_capacity(pairs.len() * 3);
        for &(a, b) in &pairs {
            if inlier[a] && inlier[b] {
                for k in 0..3 {
                    diffs.push((samples[a][k] - samples[b][k]).abs());
                }
            }
        }
        if diffs.len() >= 24 {
            // MAD of a difference of two iid normals: sigma * sqrt(2) * 0.6745.
            noise = (median(&mut diffs) / (0.6745 * std::f32::consts::SQRT_2)).max(0.5);
            // Quantisation: 8-bit values are never cleaner than this.
            noise = noise.max(0.6);
        }

        // How well does the estimate agree with what was asked for?
        let est_ch = chroma(estimate);
        let est_c = norm(est_ch);
        let agreement = if req_chroma >= ACHROMATIC_CHROMA {
            if est_c < ACHROMATIC_CHROMA {
                0.0
            } else {
                let cos = dot(est_ch, req_axis_chroma) / (est_c * req_chroma);
                // Full trust within 35 degrees of the requested hue, none past 65.
                ((cos - 0.423) / (0.819 - 0.423)).clamp(0.0, 1.0)
            }
        } else {
            let d = norm([
                estimate[0] - requested[0],
                estimate[1] - requested[1],
                estimate[2] - requested[2],
            ]);
            (1.0 - (d - 60.0) / 60.0).clamp(0.0, 1.0)
        };
        let coverage = ((inlier_frac - 0.2) / 0.4).clamp(0.0, 1.0);
        confidence = agreement * coverage;
        if agreement < 0.5 {
            reason = Some(format!(
                "the image border is mostly {} ({:.0}% of it), which is not close to the requested \
                 {requested_name}",
                hex(estimate),
                inlier_frac * 100.0
            ));
        } else if coverage < 0.5 {
            reason = Some(format!(
                "only {:.0}% of the image border looks like one screen colour (the subject may \
                 touch the edge, or there is no screen)",
                inlier_frac * 100.0
            ));
        }
    }

    let fell_back = confidence < 0.5;
    let warning = if fell_back {
        Some(format!(
            "{}; keying against the requested {requested_name} ({})",
            reason.unwrap_or_else(|| "the screen colour could not be estimated".into()),
            hex(requested)
        ))
    } else if inlier_frac < 0.75 {
        Some(format!(
            "the subject covers about {:.0}% of the image border; the screen estimate ({}) may be \
             less reliable",
            (1.0 - inlier_frac) * 100.0,
            hex(estimate)
        ))
    } else {
        None
    };
    (
        ScreenEstimate {
            rgb: if fell_back { requested } else { estimate },
            confidence,
            fell_back,
            warning,
        },
        noise,
    )
}

/// A smooth clean plate: the screen colour at every pixel, stored on a coarse grid of nodes
/// and interpolated bilinearly.
#[derive(Debug, Clone)]
pub struct Plate {
    width: usize,
    height: usize,
    gw: usize,
    gh: usize,
    cell: f32,
    nodes: Vec<[f32; 3]>,
}

impl Plate {
    /// A flat plate.
    pub fn constant(width: usize, height: usize, rgb: [f32; 3]) -> Self {
        Self {
            width,
            height,
            gw: 2,
            gh: 2,
            cell: (width.max(height).max(1)) as f32,
            nodes: vec![rgb; 4],
        }
    }

    /// The plate colours of row `y`, written into `out` (length `width`).
    pub fn row(&self, y: usize, out: &mut [[f32; 3]]) {
        let fy = (y as f32 + 0.5) / self.cell;
        let gy = (fy.floor() as usize).min(self.gh - 2);
        let ty = (fy - gy as f32).clamp(0.0, 1.0);
        let r0 = &self.nodes[gy * self.gw..(gy + 1) * self.gw];
        let r1 = &self.nodes[(gy + 1) * self.gw..(gy + 2) * self.gw];
        let col: Vec<[f32; 3]> = r0
            .iter()
            .zip(r1)
            .map(|(a, b)| {
                [
                    a[0] + (b[0] - a[0]) * ty,
                    a[1] + (b[1] - a[1]) * ty,
                    a[2] + (b[2] - a[2]) * ty,
                ]
            })
            .collect();
        let inv = 1.0 / self.cell;
        for (x, o) in out.iter_mut().enumerate().take(self.width) {
            let fx = (x as f32 + 0.5) * inv;
            let gx = (fx as usize).min(self.gw - 2);
            let tx = (fx - gx as f32).clamp(0.0, 1.0);
            let a = col[gx];
            let b = col[gx + 1];
            *o = [
                a[0] + (b[0] - a[0]) * tx,
                a[1] + (b[1] - a[1]) * tx,
                a[2] + (b[2] - a[2]) * tx,
            ];
        }
    }

    /// The plate's node colours interpolated to row `y` (one per node column), and for each
    /// pixel x its node column and the weight of the next one.
    pub(crate) fn row_nodes(&self, y: usize, nodes: &mut Vec<[f32; 3]>) {
        let fy = (y as f32 + 0.5) / self.cell;
        let gy = (fy.floor() as usize).min(self.gh - 2);
        let ty = (fy - gy as f32).clamp(0.0, 1.0);
        let r0 = &self.nodes[gy * self.gw..(gy + 1) * self.gw];
        let r1 = &self.nodes[(gy + 1) * self.gw..(gy + 2) * self.gw];
        nodes.clear();
        nodes.extend(r0.iter().zip(r1).map(|(a, b)| {
            [
                a[0] + (b[0] - a[0]) * ty,
                a[1] + (b[1] - a[1]) * ty,
                a[2] + (b[2] - a[2]) * ty,
            ]
        }));
    }

    /// Node column and interpolation weight of pixel column `x`.
    #[inline]
    pub(crate) fn x_pos(&self, x: usize) -> (usize, f32) {
        let fx = (x as f32 + 0.5) / self.cell;
        let gx = (fx as usize).min(self.gw - 2);
        (gx, (fx - gx as f32).clamp(0.0, 1.0))
    }

    /// The change of the interpolation weight from one pixel column to the next.
    pub(crate) fn x_step(&self) -> f32 {
        1.0 / self.cell
    }

    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// The plate colour at one pixel.
    pub fn at(&self, x: usize, y: usize) -> [f32; 3] {
        let fy = (y as f32 + 0.5) / self.cell;
        let gy = (fy.floor() as usize).min(self.gh - 2);
        let ty = (fy - gy as f32).clamp(0.0, 1.0);
        let fx = (x as f32 + 0.5) / self.cell;
        let gx = (fx.floor() as usize).min(self.gw - 2);
        let tx = (fx - gx as f32).clamp(0.0, 1.0);
        let n = |i: usize, j: usize| self.nodes[j * self.gw + i];
        let (a, b, c, d) = (n(gx, gy), n(gx + 1, gy), n(gx, gy + 1), n(gx + 1, gy + 1));
        std::array::from_fn(|k| {
            let top = a[k] + (b[k] - a[k]) * tx;
            let bot = c[k] + (d[k] - c[k]) * tx;
            top + (bot - top) * ty
        })
    }

    /// The screen colour at the centre of the plate (for reports).
    pub fn centre(&self) -> [f32; 3] {
        self.at(self.width / 2, self.height / 2)
    }

    /// The whole plate as RGB8 (for `X.plate.png`).
    pub fn to_rgb8(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.width * self.height * 3);
        let mut row = vec![[0.0f32; 3]; self.width];
        for y in 0..self.height {
            self.row(y, &mut row);
            for p in &row {
                out.extend(p.map(|v| v.round().clamp(0.0, 255.0) as u8));
            }
        }
        out
    }
}

/// Number of polynomial terms for a given degree in (x, y).
fn n_terms(degree: usize) -> usize {
    (degree + 1) * (degree + 2) / 2
}

fn terms(x: f32, y: f32, degree: usize, out: &mut [f64]) {
    let mut k = 0;
    for d in 0..=degree {
        for i in 0..=d {
            let j = d - i;
            out[k] = (x as f64).powi(i as i32) * (y as f64).powi(j as i32);
            k += 1;
        }
    }
}

/// Solves the symmetric positive (semi)definite system `a x = b` in place (Gaussian
/// elimination with partial pivoting and a small ridge). Returns None if singular.
fn solve(mut a: Vec<f64>, mut b: Vec<[f64; 3]>, n: usize) -> Option<Vec<[f64; 3]>> {
    let trace: f64 = (0..n).map(|i| a[i * n + i]).sum::<f64>() / n as f64;
    for i in 0..n {
        a[i * n + i] += 1e-9 * trace.max(1e-12);
    }
    for col in 0..n {
        let piv =
            (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))?;
        if a[piv * n + col].abs() < 1e-12 {
            return None;
        }
        if piv != col {
            for k in 0..n {
                a.swap(piv * n + k, col * n + k);
            }
            b.swap(piv, col);
        }
        let d = a[col * n + col];
        for row in col + 1..n {
            let f = a[row * n + col] / d;
            if f == 0.0 {
                continue;
            }
            for k in col..n {
                a[row * n + k] -= f * a[col * n + k];
            }
            let bc = b[col];
            for (c, v) in b[row].iter_mut().enumerate() {
                *v -= f * bc[c];
            }
        }
    }
    let mut x = vec![[0.0f64; 3]; n];
    for row in (0..n).rev() {
        let mut s = b[row];
        for k in row + 1..n {
            for (c, v) in s.iter_mut().enumerate() {
                *v -= a[row * n + k] * x[k][c];
            }
        }
        for c in 0..3 {
            x[row][c] = s[c] / a[row * n + row];
        }
    }
    x.iter()
        .all(|v| v.iter().all(|c| c.is_finite()))
        .then_some(x)
}

/// Fits a smooth clean plate to the pixels that look like `screen`.
///
/// The image is cut into cells; each cell with enough screen-like pixels gives its median
/// colour. A low-order polynomial in (x, y) is fitted to those cell colours by reweighted least
/// squares. Cells darker or less saturated than the fit (a soft shadow, a semi-transparent
/// object, an edge) are down-weighted much more than brighter ones, so shadows and glass stay
/// in the matte instead of being absorbed into the plate. Too little screen: a flat plate.
pub(crate) fn fit_plate(
    width: usize,
    height: usize,
    rgb: &[u8],
    screen: [f32; 3],
    noise: f32,
) -> Plate {
    let flat = Plate::constant(width, height, screen);
    let s_ch = chroma(screen);
    let s_c = norm(s_ch);
    let s_axis = if s_c > 1e-3 {
        s_ch.map(|v| v / s_c)
    } else {
        [0.0; 3]
    };
    if width < 8 || height < 8 {
        return flat;
    }
    let cell = (width.max(height) as f32 / 24.0).ceil().max(6.0) as usize;
    let gw = width.div_ceil(cell);
    let gh = height.div_ceil(cell);
    let stride = (cell / 8).max(1);
    struct CellSample {
        x: f32,
        y: f32,
        rgb: [f32; 3],
        weight: f32,
    }
    let mut cells: Vec<CellSample> = Vec::new();
    let mut buf: Vec<[f32; 3]> = Vec::new();
    let scale = 2.0 / width.max(height) as f32;
    for cy in 0..gh {
        for cx in 0..gw {
            buf.clear();
            let mut seen = 0usize;
            let y1 = ((cy + 1) * cell).min(height);
            let x1 = ((cx + 1) * cell).min(width);
            for y in (cy * cell..y1).step_by(stride) {
                for x in (cx * cell..x1).step_by(stride) {
                    seen += 1;
                    let c = px(rgb, y * width + x);
                    if screen_like(c, screen, s_axis, s_c) {
                        buf.push(c);
                    }
                }
            }
            if seen > 0 && buf.len() * 3 >= seen && buf.len() >= 3 {
                let m = median3(&buf);
                let xc = ((cx * cell + x1) as f32 * 0.5 - width as f32 * 0.5) * scale;
                let yc = ((cy * cell + y1) as f32 * 0.5 - height as f32 * 0.5) * scale;
                cells.push(CellSample {
                    x: xc,
                    y: yc,
                    rgb: m,
                    weight: buf.len() as f32 / seen as f32,
                });
            }
        }
    }
    let total = gw * gh;
    let max_degree = if cells.len() * 4 >= total && cells.len() >= 20 {
        2
    } else if cells.len() * 10 >= total && cells.len() >= 6 {
        1
    } else if !cells.is_empty() {
        0
    } else {
        return flat;
    };
    // Residuals of a cell against a fit: (strength difference, colour distance). Strength is
    // the chroma along the screen axis (chromatic screens), brightness for white or grey
    // screens, darkness for black ones.
    let residual = |c: &CellSample, fit: [f32; 3]| -> (f32, f32) {
        if s_c >= ACHROMATIC_CHROMA {
            let d = dot(chroma(c.rgb), s_axis) - dot(chroma(fit), s_axis);
            let e = [c.rgb[0] - fit[0], c.rgb[1] - fit[1], c.rgb[2] - fit[2]];
            (d, norm(e))
        } else {
            let d = (c.rgb[0] + c.rgb[1] + c.rgb[2] - fit[0] - fit[1] - fit[2]) / 3.0;
            let bright = screen[0] + screen[1] + screen[2] >= 3.0 * 96.0;
            (if bright { d } else { -d }, d.abs())
        }
    };
    // Cell medians are nearly noise-free; what is left is the model's own error.
    let tol = 1.0 + 0.5 * noise + 0.012 * s_c.max(40.0);
    let eval = |coef: &[[f64; 3]], x: f32, y: f32, degree: usize, t: &mut [f64]| -> [f32; 3] {
        terms(x, y, degree, t);
        std::array::from_fn(|k| (0..n_terms(degree)).map(|i| coef[i][k] * t[i]).sum::<f64>() as f32)
    };
    // Fit each degree up to the data's limit by reweighted least squares that seeks the upper
    // envelope (the screen is the strongest consistent surface; shadows, smoke, glass and
    // edges only take strength away), then keep the lowest degree that explains about as
    // many cells as any higher one: a flat screen stays flat even when smoke covers half of
    // it, and a vignette gets its curvature.
    let mut best: Option<(usize, Vec<[f64; 3]>, f64)> = None;
    let total_weight: f64 = cells.iter().map(|c| c.weight as f64).sum();
    for degree in 0..=max_degree {
        let nt = n_terms(degree);
        let mut t = vec![0.0f64; nt];
        let mut weights: Vec<f64> = cells.iter().map(|c| c.weight as f64).collect();
        let mut coef: Option<Vec<[f64; 3]>> = None;
        for _iter in 0..10 {
            let mut a = vec![0.0f64; nt * nt];
            let mut b = vec![[0.0f64; 3]; nt];
            for (c, &w) in cells.iter().zip(&weights) {
                if w <= 0.0 {
                    continue;
                }
                terms(c.x, c.y, degree, &mut t);
                for i in 0..nt {
                    for j in 0..nt {
                        a[i * nt + j] += w * t[i] * t[j];
                    }
                    for k in 0..3 {
                        b[i][k] += w * t[i] * c.rgb[k] as f64;
                    }
                }
            }
            let Some(x) = solve(a, b, nt) else {
                break;
            };
            for (c, w) in cells.iter().zip(weights.iter_mut()) {
                let fit = eval(&x, c.x, c.y, degree, &mut t);
                let (r_strength, r_total) = residual(c, fit);
                let base = c.weight as f64;
                *w = if r_strength >= -tol {
                    base / (1.0 + (r_total as f64 / (4.0 * tol as f64)).powi(2))
                } else {
                    let r = (-r_strength - tol) / tol;
                    base / (1.0 + 4.0 * (r as f64).powi(2))
                };
            }
            coef = Some(x);
        }
        let Some(coef) = coef else {
            continue;
        };
        let inliers: f64 = cells
            .iter()
            .filter(|c| {
                let fit = eval(&coef, c.x, c.y, degree, &mut t);
                residual(c, fit).1 <= 2.0 * tol
            })
            .map(|c| c.weight as f64)
            .sum();
        let better = match &best {
            None => true,
            Some((_, _, prev)) => inliers > prev + 0.04 * total_weight,
        };
        if better {
            best = Some((degree, coef, inliers));
        }
    }
    let Some((degree, coef, _)) = best else {
        return flat;
    };
    let nt = n_terms(degree);
    let mut t = vec![0.0f64; nt];
    let ngw = gw + 1;
    let ngh = gh + 1;
    let mut nodes = Vec::with_capacity(ngw * ngh);
    for ny in 0..ngh {
        for nx in 0..ngw {
            let xc = ((nx * cell) as f32 - width as f32 * 0.5) * scale;
            let yc = ((ny * cell) as f32 - height as f32 * 0.5) * scale;
            terms(xc, yc, degree, &mut t);
            let v: [f32; 3] = std::array::from_fn(|k| {
                ((0..nt).map(|i| coef[i][k] * t[i]).sum::<f64>() as f32).clamp(0.0, 255.0)
            });
            nodes.push(v);
        }
    }
    // Nodes are at multiples of `cell`; `row` samples pixel centres at (x + 0.5) / cell.
    Plate {
        width,
        height,
        gw: ngw,
        gh: ngh,
        cell: cell as f32,
        nodes,
    }
}
