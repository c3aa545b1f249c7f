//! Soft alpha against the clean plate.
//!
//! Two estimates, both exact under the compositing model C = aF + (1 - a)B for the subjects
//! they assume, are combined:
//!
//! - Colour difference, generalised to any key hue. With `u` the screen's chroma axis and
//!   `perp` the chroma across it, `D(C) = <chroma(C), u> - k * |perp|`. With `k = tan 30 deg`
//!   and a green screen this is exactly `2/sqrt(6) * (G - max(R, B))`, the classic keyer's
//!   measure; `k = 0` is the linear `G - (R + B) / 2`; we use a `k` between (see [`K_PERP`]).
//!   For other hues it is the same measure rotated. `D` is linear in the mix, so
//!   `a = 1 - D(C) / D(B)` whenever the subject has no screen hue in it (`D(F) = 0`).
//! - The gamut bound: the smallest `a` that keeps `F = (C - (1 - a)B) / a` inside [0, 255]
//!   (GEGL's colour-to-alpha). It is a lower bound on the true alpha, and rescues subjects
//!   whose own colour leans toward the screen's hue. For achromatic screens (white, black,
//!   grey) it is the only estimate.
//!
//! The raw estimate is then mapped through two thresholds (clip black, clip white) with a
//! linear ramp between them; the thresholds default to values derived from the measured noise.

// Channel and neighbour loops index several arrays at once; ranges read best there.
#![allow(clippy::needless_range_loop)]

use super::screen::{ACHROMATIC_CHROMA, chroma, dot};

/// tan(30 degrees): the colour-difference measure is zero 60 degrees of hue away from the key.
/// Weight of the chroma across the key axis in the colour difference: `tan(8.5 deg)`, so the
/// measure is zero about 81 degrees of hue away from the key. Classic keyers use the
/// `G - max(R, B)` geometry (`tan 30 deg`, zero at 60 degrees), which reads browns, reds and
/// skin up to twice too opaque at soft edges; the linear `G - (R + B) / 2` (zero at 90
/// degrees) fades yellows. This sits between, and the gamut bound catches bright yellows.
/// Chosen on the benchmark's quick set: SAD 1.61 at k = 0, 1.65 here, 1.77 at k = 0.3.
const K_PERP: f32 = 0.15;

/// The cross-axis weight of the solid-core test ([`promote_solid_cores`]): the classic
/// `tan 30 deg`, zero 60 degrees of hue from the key. [`K_PERP`]'s measure still reads a
/// saturated blue on green (71 degrees away) as 12% screen, across the whole subject.
const K_SOLID: f32 = 0.577_350_26;

/// Per-pixel raw alpha (not yet thresholded), the reference for [`raw_alpha_row`].
#[cfg(test)]
pub(crate) fn raw_alpha(c: [f32; 3], b: [f32; 3], noise_margin: f32) -> f32 {
    raw_alpha_with(c, b, noise_margin, K_PERP)
}

/// The raw alpha of the solid-core test, the reference for [`raw_alpha_row`]'s `solid`.
#[cfg(test)]
pub(crate) fn solid_raw_alpha(c: [f32; 3], b: [f32; 3], noise_margin: f32) -> f32 {
    raw_alpha_with(c, b, noise_margin, K_SOLID)
}

#[cfg(test)]
fn raw_alpha_with(c: [f32; 3], b: [f32; 3], noise_margin: f32, k_perp: f32) -> f32 {
    let gamut = gamut_bound(c, b, noise_margin);
    let ch_b = chroma(b);
    let m2 = dot(ch_b, ch_b);
    if m2 < ACHROMATIC_CHROMA * ACHROMATIC_CHROMA {
        return gamut;
    }
    let m = m2.sqrt();
    let inv_m = 1.0 / m;
    let u = [ch_b[0] * inv_m, ch_b[1] * inv_m, ch_b[2] * inv_m];
    let ch_c = chroma(c);
    let par = dot(ch_c, u);
    let perp = (dot(ch_c, ch_c) - par * par).max(0.0).sqrt();
    let d = par - k_perp * perp;
    let cd = 1.0 - d * inv_m;
    cd.max(gamut)
}

/// The clean plate at one pixel with the quantities the keyer needs: the plate colour `b`,
/// its unit chroma axis `u`, `inv_m = 1 / |chroma(b)|` (NaN for achromatic screens) and the
/// reciprocal gamut headroom above (`inv_hi`) and below (`inv_lo`) `b`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlatePx {
    pub b: [f32; 3],
    pub u: [f32; 3],
    pub inv_m: f32,
    pub inv_hi: [f32; 3],
    pub inv_lo: [f32; 3],
}

/// One row of the clean plate. The derived quantities are computed at the plate's nodes and
/// interpolated like the plate itself (linearly between node columns), so the per-pixel loops
/// have no square roots or divisions for the plate, and nothing is stored per pixel.
#[derive(Default)]
pub(crate) struct PlateRow {
    nodes: Vec<[f32; 13]>,
    /// (first x, end x, node column, t at first x) for each run of pixels between two node
    /// columns.
    segments: Vec<(usize, usize, usize, f32)>,
    dt: f32,
}

fn derive(b: [f32; 3]) -> [f32; 13] {
    let ch = chroma(b);
    let m2 = dot(ch, ch);
    let m = m2.sqrt().max(1e-3);
    let im = 1.0 / m;
    [
        b[0],
        b[1],
        b[2],
        ch[0] * im,
        ch[1] * im,
        ch[2] * im,
        if m2 < ACHROMATIC_CHROMA * ACHROMATIC_CHROMA {
            f32::NAN
        } else {
            im
        },
        1.0 / (255.0 - b[0]).max(64.0),
        1.0 / (255.0 - b[1]).max(64.0),
        1.0 / (255.0 - b[2]).max(64.0),
        1.0 / b[0].max(64.0),
        1.0 / b[1].max(64.0),
        1.0 / b[2].max(64.0),
    ]
}

impl PlateRow {
    pub fn fill(&mut self, plate: &super::Plate, y: usize) {
        let w = plate.width();
        let mut cols = Vec::new();
        plate.row_nodes(y, &mut cols);
        self.nodes.clear();
        self.nodes.extend(cols.iter().map(|&b| derive(b)));
        if self.segments.is_empty() || self.segments.last().map(|s| s.1) != Some(w) {
            self.segments.clear();
            let mut x = 0;
            while x < w {
                let (gx, t0) = plate.x_pos(x);
                let mut end = x + 1;
                while end < w && plate.x_pos(end).0 == gx {
                    end += 1;
                }
                self.segments.push((x, end, gx, t0));
                x = end;
            }
            self.dt = plate.x_step();
        }
    }

    /// Calls `f(x, plate at x)` for every pixel of the row, left to right.
    #[inline]
    pub fn for_each(&self, mut f: impl FnMut(usize, &PlatePx)) {
        for &(x0, x1, gx, t0) in &self.segments {
            let a = self.nodes[gx];
            let b = self.nodes[gx + 1];
            let mut d = [0f32; 13];
            for k in 0..13 {
                d[k] = b[k] - a[k];
            }
            for x in x0..x1 {
                let t = (t0 + (x - x0) as f32 * self.dt).min(1.0);
                let v = |k: usize| a[k] + d[k] * t;
                let p = PlatePx {
                    b: [v(0), v(1), v(2)],
                    u: [v(3), v(4), v(5)],
                    inv_m: v(6),
                    inv_hi: [v(7), v(8), v(9)],
                    inv_lo: [v(10), v(11), v(12)],
                };
                f(x, &p);
            }
        }
    }

    /// The plate colour at `x` (for occasional look-ups).
    pub fn colour(&self, x: usize) -> [f32; 3] {
        let s = self
            .segments
            .iter()
            .find(|s| x >= s.0 && x < s.1)
            .copied()
            .unwrap_or((0, 1, 0, 0.0));
        let t = (s.3 + (x - s.0) as f32 * self.dt).min(1.0);
        let (a, b) = (self.nodes[s.2], self.nodes[s.2 + 1]);
        [
            a[0] + (b[0] - a[0]) * t,
            a[1] + (b[1] - a[1]) * t,
            a[2] + (b[2] - a[2]) * t,
        ]
    }
}

/// Raw alpha of a whole row (as [`raw_alpha`] per pixel, up to the interpolation of the
/// plate-derived quantities): the keyer's hottest loop, branch-free. `solid[x]` is 1 where
/// the solid-core measure ([`K_SOLID`]) reaches `solid_level`.
pub(crate) fn raw_alpha_row(
    rgb: &[u8],
    p: &PlateRow,
    margin: f32,
    solid_level: f32,
    out: &mut [f32],
    solid: &mut [u8],
) {
    p.for_each(|x, p| {
        let c = [
            rgb[3 * x] as f32,
            rgb[3 * x + 1] as f32,
            rgb[3 * x + 2] as f32,
        ];
        let mut gamut = 0.0f32;
        for k in 0..3 {
            let d = c[k] - p.b[k];
            gamut = gamut.max(((d - margin) * p.inv_hi[k]).max((-d - margin) * p.inv_lo[k]));
        }
        let mean = (c[0] + c[1] + c[2]) * (1.0 / 3.0);
        let ch = [c[0] - mean, c[1] - mean, c[2] - mean];
        let u = p.u;
        let par = ch[0] * u[0] + ch[1] * u[1] + ch[2] * u[2];
        let perp = (ch[0] * ch[0] + ch[1] * ch[1] + ch[2] * ch[2] - par * par)
            .max(0.0)
            .sqrt();
        let cd = 1.0 - (par - K_PERP * perp) * p.inv_m;
        let cd_solid = 1.0 - (par - K_SOLID * perp) * p.inv_m;
        // NaN (achromatic) loses to the gamut bound in f32::max.
        out[x] = gamut.max(cd);
        solid[x] = (gamut.max(cd_solid) >= solid_level) as u8;
    });
}

/// The neighbours [`promote_solid_cores`] checks: the 3x3 block, and eight pixels two away,
/// where a ramp has moved twice as far while noise has not.
const CORE_OFFSETS: [(isize, isize); 16] = [
    (-1, -1),
    (0, -1),
    (1, -1),
    (-1, 0),
    (1, 0),
    (-1, 1),
    (0, 1),
    (1, 1),
    (-2, -2),
    (0, -2),
    (2, -2),
    (-2, 0),
    (2, 0),
    (-2, 2),
    (0, 2),
    (2, 2),
];

/// Makes opaque (raw alpha 1) every pixel whose neighbourhood ([`CORE_OFFSETS`]) is solid
/// under the classic measure (`solid` from [`raw_alpha_row`]; outside the image counts as
/// solid, as the image edge is not the subject's) and flat: no neighbour's channel differs
/// from the pixel's by more than `flat_tol` levels. A subject whose hue is 60-80 degrees from the key
/// (blue on green) is then opaque inside, while its one-pixel rim, every thinner structure
/// (strands) and every ramp (motion blur, where the classic measure overstates alpha as it
/// does for browns) keep [`K_PERP`]'s reading; [`project_edges`] then re-reads the rim
/// against the now-opaque interior.
pub(crate) fn promote_solid_cores(
    width: usize,
    height: usize,
    rgb: &[u8],
    solid: &[u8],
    flat_tol: f32,
    raw: &mut [f32],
) {
    debug_assert_eq!(solid.len(), width * height);
    debug_assert_eq!(raw.len(), width * height);
    debug_assert_eq!(rgb.len(), 3 * width * height);
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            if solid[i] == 0 || raw[i] >= 1.0 {
                continue;
            }
            let c = [rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]].map(f32::from);
            let neighbour_fits = |xx: usize, yy: usize| {
                let j = yy * width + xx;
                solid[j] != 0
                    && (0..3).all(|k| (f32::from(rgb[3 * j + k]) - c[k]).abs() <= flat_tol)
            };
            let fits = CORE_OFFSETS.iter().all(|&(dx, dy)| {
                let (xx, yy) = (x as isize + dx, y as isize + dy);
                xx < 0
                    || yy < 0
                    || xx >= width as isize
                    || yy >= height as isize
                    || neighbour_fits(xx as usize, yy as usize)
            });
            if fits {
                raw[i] = 1.0;
            }
        }
    }
}

/// The smallest alpha that keeps the unmixed foreground in range, less a noise margin.
#[cfg(test)]
fn gamut_bound(c: [f32; 3], b: [f32; 3], margin: f32) -> f32 {
    let mut a = 0.0f32;
    for k in 0..3 {
        let d = c[k] - b[k];
        let v = if d > 0.0 {
            (d - margin) / (255.0 - b[k]).max(64.0)
        } else {
            (-d - margin) / b[k].max(64.0)
        };
        a = a.max(v);
    }
    a
}

/// The colour-difference measure's scale for a plate colour: D(B), the chroma of the screen.
#[inline]
pub(crate) fn screen_strength(b: [f32; 3]) -> f32 {
    let ch = chroma(b);
    dot(ch, ch).sqrt()
}

/// Thresholds for the ramp, in raw-alpha units.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ramp {
    pub lo: f32,
    pub hi: f32,
}

impl Ramp {
    /// Maps raw alpha to alpha: 0 at or below clip black, 1 at or above clip white, and the
    /// identity in between except for two short linear knees (slope 2) that join it
    /// continuously, so that mid-range alpha (glass, smoke, strands) is not stretched.
    #[inline]
    pub fn apply(&self, raw: f32) -> f32 {
        let (lo, hi) = (self.lo, self.hi);
        if raw <= lo {
            return 0.0;
        }
        if raw >= hi {
            return 1.0;
        }
        let m0 = 2.0 * lo;
        let m1 = 2.0 * hi - 1.0;
        if m0 >= m1 {
            return ((raw - lo) / (hi - lo)).clamp(0.0, 1.0);
        }
        if raw < m0 {
            (raw - lo) * m0 / (m0 - lo)
        } else if raw > m1 {
            m1 + (raw - m1) * (1.0 - m1) / (hi - m1)
        } else {
            raw
        }
    }
}

/// Default thresholds from the noise level and the screen's strength: clip black above the
/// noise floor of the raw estimate, clip white just under 1 so that light spill and noise on
/// the subject stay opaque.
pub(crate) fn default_ramp(noise: f32, screen: [f32; 3]) -> Ramp {
    let strength = screen_strength(screen).max(ACHROMATIC_CHROMA);
    let scale = if strength > ACHROMATIC_CHROMA {
        strength
    } else {
        64.0
    };
    // D's noise is about 1.15 sigma; 2.5 sigma above it.
    let floor = 2.0 * 1.15 * noise / scale;
    let lo = floor.clamp(0.02, 0.3);
    let hi = (0.9 - floor).clamp(lo + 0.2, 0.95);
    Ramp { lo, hi }
}

/// Re-estimates alpha at the subject's edges from the local foreground colour.
///
/// The colour-difference estimate is exact only for subjects with no chroma along the key
/// axis; a saturated red edge over green reads up to twice too opaque. Where confidently
/// opaque interior pixels lie within a few pixels, their mean colour `F` is a good local
/// foreground, and the edge pixel's alpha is its projection on the line from the plate colour
/// `B` to `F`: `a = <C - B, F - B> / |F - B|^2`, which is exact under the compositing model.
/// The projection is trusted only where `F` is far enough from `B` and `C` lies close to that
/// line; elsewhere (hair over a differently coloured body, glass) the raw estimate stays.
///
/// `raw` is the raw alpha per pixel; `alpha` (the ramped raw alpha) is updated in place.
#[allow(clippy::too_many_arguments)]
pub(crate) fn project_edges(
    width: usize,
    height: usize,
    rgb: &[u8],
    plate: &super::Plate,
    raw: &[f32],
    alpha: &mut [f32],
    ramp: Ramp,
    noise: f32,
) {
    const R: usize = 3;
    let hi = ramp.hi;
    // Opaque interior: raw above clip white, with all 4-neighbours too (outside the image
    // counts as opaque: the image edge is not the subject's edge).
    let interior = |x: usize, y: usize| -> bool {
        let i = y * width + x;
        raw[i] >= hi
            && (x == 0 || raw[i - 1] >= hi)
            && (x + 1 == width || raw[i + 1] >= hi)
            && (y == 0 || raw[i - width] >= hi)
            && (y + 1 == height || raw[i + width] >= hi)
    };
    let mut prow = PlateRow::default();
    let lo_proj = ramp.lo.min(0.05);
    for y in 0..height {
        let mut row_ready = false;
        let y0 = y.saturating_sub(R);
        let y1 = (y + R).min(height - 1);
        for x in 0..width {
            let i = y * width + x;
            if raw[i] <= ramp.lo || interior(x, y) {
                continue;
            }
            // Mean interior colour around the pixel.
            let x0 = x.saturating_sub(R);
            let x1 = (x + R).min(width - 1);
            let mut s = [0u32; 3];
            let mut cnt = 0u32;
            for yy in y0..=y1 {
                let base = yy * width;
                for xx in x0..=x1 {
                    let j = base + xx;
                    if raw[j] >= hi && interior(xx, yy) {
                        s[0] += rgb[3 * j] as u32;
                        s[1] += rgb[3 * j + 1] as u32;
                        s[2] += rgb[3 * j + 2] as u32;
                        cnt += 1;
                    }
                }
            }
            if cnt < 2 {
                continue;
            }
            if !row_ready {
                prow.fill(plate, y);
                row_ready = true;
            }
            let inv = 1.0 / cnt as f32;
            let f = [s[0] as f32 * inv, s[1] as f32 * inv, s[2] as f32 * inv];
            let b = prow.colour(x);
            let c = [
                rgb[3 * i] as f32,
                rgb[3 * i + 1] as f32,
                rgb[3 * i + 2] as f32,
            ];
            let fb = [f[0] - b[0], f[1] - b[1], f[2] - b[2]];
            let len2 = dot(fb, fb);
            if len2 < 48.0 * 48.0 {
                continue;
            }
            let cb = [c[0] - b[0], c[1] - b[1], c[2] - b[2]];
            let a = dot(cb, fb) / len2;
            let ac = a.clamp(0.0, 1.0);
            let res = [cb[0] - ac * fb[0], cb[1] - ac * fb[1], cb[2] - ac * fb[2]];
            let r = dot(res, res).sqrt();
            let len = len2.sqrt();
            let tol = 3.0 * noise + 4.0 + 0.08 * len;
            let trust = (2.0 - r / tol).clamp(0.0, 1.0) * (cnt as f32 / 6.0).min(1.0);
            if trust <= 0.0 {
                continue;
            }
            let proj = ((a - lo_proj) / (1.0 - lo_proj)).clamp(0.0, 1.0);
            let proj = if a >= 0.97 { 1.0 } else { proj };
            alpha[i] = trust * proj + (1.0 - trust) * alpha[i];
        }
    }
}
