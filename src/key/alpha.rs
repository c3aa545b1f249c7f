//! Soft alpha against the clean plate.
//!
//! Two estimates, both exact under the compositing model C = aF + (1 - a)B for the subjects
//! they assume, are combined:
//!
//! - Colour difference, generalised to any key hue. With `u` the screen's chroma axis and
//!   `perp` the chroma across it, `D(C) = <chroma(C), u> - tan(30 deg) * |perp|`. For a green
//!   screen this is exactly `2/sqrt(6) * (G - max(R, B))`, the classic keyer's measure; for
//!   other hues it is the same measure rotated. `D` is linear in the mix, so
//!   `a = 1 - D(C) / D(B)` whenever the subject has no screen hue in it (`D(F) <= 0`).
//! - The gamut bound: the smallest `a` that keeps `F = (C - (1 - a)B) / a` inside [0, 255]
//!   (GEGL's colour-to-alpha). It is a lower bound on the true alpha, and rescues subjects
//!   whose own colour leans toward the screen's hue. For achromatic screens (white, black,
//!   grey) it is the only estimate.
//!
//! The raw estimate is then mapped through two thresholds (clip black, clip white) with a
//! linear ramp between them; the thresholds default to values derived from the measured noise.

use super::screen::{ACHROMATIC_CHROMA, chroma, dot};

/// tan(30 degrees): the colour-difference measure is zero 60 degrees of hue away from the key.
const K_PERP: f32 = 0.577_350_26;

/// Per-pixel raw alpha (not yet thresholded). `noise` is the per-channel noise sigma.
#[inline]
pub(crate) fn raw_alpha(c: [f32; 3], b: [f32; 3], noise_margin: f32) -> f32 {
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
    let d = par - K_PERP * perp;
    let cd = 1.0 - d * inv_m;
    cd.max(gamut)
}

/// Raw alpha of a whole row (same as [`raw_alpha`] per pixel), written as branch-free loops
/// over plain arrays so the compiler can vectorise them: the keyer's hottest loop.
pub(crate) fn raw_alpha_row(
    rgb: &[u8],
    plate: &[[f32; 3]],
    margin: f32,
    scratch: &mut RowScratch,
    out: &mut [f32],
) {
    let w = out.len();
    scratch.resize(w);
    let RowScratch { u, inv_m, inv_hi, inv_lo } = scratch;
    // Plate-derived quantities.
    for x in 0..w {
        let b = plate[x];
        let mean = (b[0] + b[1] + b[2]) * (1.0 / 3.0);
        let ch = [b[0] - mean, b[1] - mean, b[2] - mean];
        let m2 = ch[0] * ch[0] + ch[1] * ch[1] + ch[2] * ch[2];
        let m = m2.sqrt().max(1e-3);
        let im = 1.0 / m;
        u[x] = [ch[0] * im, ch[1] * im, ch[2] * im];
        // Achromatic screens: no colour-difference term.
        inv_m[x] = if m2 < ACHROMATIC_CHROMA * ACHROMATIC_CHROMA {
            f32::NAN
        } else {
            im
        };
        inv_hi[x] = [
            1.0 / (255.0 - b[0]).max(64.0),
            1.0 / (255.0 - b[1]).max(64.0),
            1.0 / (255.0 - b[2]).max(64.0),
        ];
        inv_lo[x] = [
            1.0 / b[0].max(64.0),
            1.0 / b[1].max(64.0),
            1.0 / b[2].max(64.0),
        ];
    }
    for x in 0..w {
        let c = [
            rgb[3 * x] as f32,
            rgb[3 * x + 1] as f32,
            rgb[3 * x + 2] as f32,
        ];
        let b = plate[x];
        let mut gamut = 0.0f32;
        for k in 0..3 {
            let d = c[k] - b[k];
            let v = ((d - margin) * inv_hi[x][k]).max((-d - margin) * inv_lo[x][k]);
            gamut = gamut.max(v);
        }
        let mean = (c[0] + c[1] + c[2]) * (1.0 / 3.0);
        let ch = [c[0] - mean, c[1] - mean, c[2] - mean];
        let uu = u[x];
        let par = ch[0] * uu[0] + ch[1] * uu[1] + ch[2] * uu[2];
        let perp = (ch[0] * ch[0] + ch[1] * ch[1] + ch[2] * ch[2] - par * par)
            .max(0.0)
            .sqrt();
        let cd = 1.0 - (par - K_PERP * perp) * inv_m[x];
        // NaN (achromatic) loses to the gamut bound in f32::max.
        out[x] = gamut.max(cd);
    }
}

/// Per-row buffers for [`raw_alpha_row`].
#[derive(Default)]
pub(crate) struct RowScratch {
    u: Vec<[f32; 3]>,
    inv_m: Vec<f32>,
    inv_hi: Vec<[f32; 3]>,
    inv_lo: Vec<[f32; 3]>,
}

impl RowScratch {
    fn resize(&mut self, w: usize) {
        self.u.resize(w, [0.0; 3]);
        self.inv_m.resize(w, 0.0);
        self.inv_hi.resize(w, [0.0; 3]);
        self.inv_lo.resize(w, [0.0; 3]);
    }
}

/// The smallest alpha that keeps the unmixed foreground in range, less a noise margin.
#[inline]
pub(crate) fn gamut_bound(c: [f32; 3], b: [f32; 3], margin: f32) -> f32 {
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
    let floor = 2.5 * 1.15 * noise / scale;
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
    let n = width * height;
    // Opaque interior: raw above clip white, with all 4-neighbours too.
    let opaque: Vec<bool> = raw.iter().map(|&r| r >= ramp.hi).collect();
    // (Outside the image counts as opaque: the image edge is not the subject's edge.)
    let mut interior = vec![false; n];
    for y in 0..height {
        for x in 0..width {
            let i = y * width + x;
            interior[i] = opaque[i]
                && (x == 0 || opaque[i - 1])
                && (x + 1 == width || opaque[i + 1])
                && (y == 0 || opaque[i - width])
                && (y + 1 == height || opaque[i + width]);
        }
    }
    let mut prow = vec![[0f32; 3]; width];
    let lo_proj = ramp.lo.min(0.05);
    for y in 0..height {
        let mut row_ready = false;
        let y0 = y.saturating_sub(R);
        let y1 = (y + R).min(height - 1);
        for x in 0..width {
            let i = y * width + x;
            if interior[i] || raw[i] <= ramp.lo {
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
                    if interior[j] {
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
                plate.row(y, &mut prow);
                row_ready = true;
            }
            let inv = 1.0 / cnt as f32;
            let f = [s[0] as f32 * inv, s[1] as f32 * inv, s[2] as f32 * inv];
            let b = prow[x];
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
