//! How cleanly a keyed image keys: the measurable causes of a bad matte, read from the image
//! and its key, and one score from 0 to 100 (higher keys better).
//!
//! Each part is a fact about this image; [`Keyability::penalties`] maps them to penalties
//! (0 = no problem) and the score is `100 exp(-sum w_i p_i)`. The matte-error weights
//! ([`WEIGHTS`]) are fitted on the key benchmark's ground-truth set (a non-negative least
//! squares fit of ln(whole-image SAD) on the penalties, on its main and key-coloured sets;
//! `bash benches/key_bench.sh --keyability`, docs/keying.md). Three parts carry the score:
//! ambiguous alpha, parts of the subject keyed out ([`Keyability::keyed_out`]) and the plate
//! residual; the others have weight 0 (see [`WEIGHTS`]) and are reported, not scored. Two parts are about use, not matte error, so no matte
//! error can weigh them: a subject cut by the frame and a subject too small to use. They
//! multiply the score by stated factors ([`usability`]).

// Pixel loops index the plate row, the alpha and the image at once.
#![allow(clippy::needless_range_loop)]

use super::Keyed;
use serde::{Deserialize, Serialize};

/// The parts of the report, each a measurement of this image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Keyability {
    /// 0..100, higher keys better.
    pub score: f32,
    /// Share of the border ring keyed as clear screen (alpha < 0.05).
    pub border_screen: f32,
    /// The screen estimate's confidence, 0..1.
    pub screen_confidence: f32,
    /// RMS distance (0..255 levels) of the clear screen from the clean plate: how far the
    /// screen is from flat once its smooth shading is fitted.
    pub plate_residual: f32,
    /// Share of the border ring that is subject (alpha >= 0.5).
    pub border_subject: f32,
    /// The subject touches the frame: more than 0.5% of the border ring is subject.
    pub touches_border: bool,
    /// Share of the subject's interior whose colour has the screen's hue without being the
    /// screen: key-coloured parts, which a colour keyer makes partly clear.
    pub entanglement: f32,
    /// Enclosed clear screen (holes in the subject) as a share of the filled subject: letter
    /// counters, or key-coloured parts keyed out.
    pub enclosed_screen: f32,
    /// Share of the image with ambiguous alpha (0.02 < alpha < 0.98).
    pub ambiguous: f32,
    /// Mean colour change (0..255 levels) spill suppression made on the opaque subject.
    pub spill: f32,
    /// Share of the image that is subject (alpha >= 0.5).
    pub subject_size: f32,
    /// Parts of the subject keyed out: the share of the image, each pixel weighted by how
    /// clear it was keyed (1 - alpha), that lies between two opaque pixels (alpha >= 0.98, at
    /// most [`keyed_out_gap`] apart along a row, column or diagonal) and whose colour is not
    /// the clean plate's. A key-coloured stripe, disc or band keyed partly or fully clear is
    /// ringed by opaque subject and is not the screen; a gap showing the screen is the plate.
    #[serde(default)]
    pub keyed_out: f32,
}

/// Number of [`Keyability::penalties`].
pub const N_PENALTIES: usize = 9;

/// Names of [`Keyability::penalties`], in order.
pub const PENALTY_NAMES: [&str; N_PENALTIES] = [
    "border_not_screen",
    "screen_doubt",
    "plate_residual",
    "border_subject",
    "entanglement",
    "enclosed_screen",
    "ambiguous",
    "spill",
    "keyed_out",
];

/// Matte-error weights of the penalties, fitted on the key benchmark (docs/keying.md).
/// Fitted on the main and key-coloured sets (the frame-cut and small sets are what
/// [`usability`] weighs). screen_doubt, border_subject and spill are held at 0, not fitted:
/// screen_doubt is about constant, border_subject is 0 on those sets, and spill is
/// anti-correlated with the matte error. entanglement and enclosed_screen are fitted and get
/// 0: keyed_out says what they did, better. The zero-weight parts stay in the report as
/// facts about the image; they do not move the score.
pub const WEIGHTS: [f32; N_PENALTIES] = [
    0.0000, 0.0000, 0.1528, 0.0000, 0.0000, 0.0000, 0.4620, 0.0000, 2.5715,
];

/// The longest run of non-opaque pixels between two opaque ones that
/// [`Keyability::keyed_out`] counts: a ninth of the shorter side (64 px at 576).
pub fn keyed_out_gap(width: usize, height: usize) -> usize {
    (width.min(height) / 9).max(8)
}

/// Below this share of the image the subject is too small to use.
pub const MIN_SUBJECT: f32 = 0.01;

/// Measures how cleanly `keyed` keys; `rgb` is the image it was keyed from (RGB8).
pub fn measure(keyed: &Keyed, rgb: &[u8]) -> Keyability {
    let (w, h) = (keyed.width as usize, keyed.height as usize);
    let n = w * h;
    debug_assert_eq!(rgb.len(), n * 3);
    let a = &keyed.alpha;

    // The border ring, as wide as the screen estimate's.
    let ring = (w.min(h) / 64).clamp(1, 16);
    let (mut ring_n, mut ring_clear, mut ring_subject) = (0usize, 0usize, 0usize);
    for y in 0..h {
        let edge_row = y < ring || y + ring >= h;
        for x in 0..w {
            if edge_row || x < ring || x + ring >= w {
                let v = a[y * w + x];
                ring_n += 1;
                ring_clear += (v < 0.05) as usize;
                ring_subject += (v >= 0.5) as usize;
            }
        }
    }
    let ring_n = ring_n.max(1) as f32;

    // Clear screen against the plate; ambiguity; subject size; spill.
    let (mut res_sq, mut res_n) = (0f64, 0usize);
    let (mut ambiguous, mut subject) = (0usize, 0usize);
    let (mut spill, mut opaque) = (0f64, 0usize);
    let tol = (6.0 * keyed.noise).max(20.0);
    // Not opaque and not the plate's colour (what keyed_out weighs).
    let mut off_plate = vec![false; n];
    let mut plate_row = vec![[0f32; 3]; w];
    for y in 0..h {
        keyed.plate.row(y, &mut plate_row);
        for x in 0..w {
            let i = y * w + x;
            let v = a[i];
            let c = &rgb[3 * i..3 * i + 3];
            if v < 0.98 {
                let p = plate_row[x];
                let d: f32 = (0..3).map(|k| (c[k] as f32 - p[k]).powi(2)).sum();
                if v <= 0.0 {
                    res_sq += d as f64 / 3.0;
                    res_n += 1;
                }
                off_plate[i] = d.sqrt() > tol;
            }
            if v > 0.02 && v < 0.98 {
                ambiguous += 1;
            }
            if v >= 0.5 {
                subject += 1;
            }
            if v >= 0.98 {
                let f = &keyed.foreground[3 * i..3 * i + 3];
                let d: i32 = (0..3).map(|k| (c[k] as i32 - f[k] as i32).abs()).sum();
                spill += d as f64 / 3.0;
                opaque += 1;
            }
        }
    }

    // The filled subject: alpha >= 0.5, plus the clear regions that do not reach the border.
    let clear = super::cleanup::label_runs(w, h, |i| a[i] < 0.5);
    let mut reaches_border = vec![false; clear.count];
    for (r, &c) in clear.runs.iter().zip(&clear.comp) {
        if r.y == 0 || r.y as usize == h - 1 || r.x0 == 0 || r.x1 as usize == w {
            reaches_border[c as usize] = true;
        }
    }
    let mut filled: Vec<u8> = a.iter().map(|&v| if v >= 0.5 { 255 } else { 0 }).collect();
    let mut enclosed = 0usize;
    for (r, &c) in clear.runs.iter().zip(&clear.comp) {
        if !reaches_border[c as usize] {
            let row = r.y as usize * w;
            filled[row + r.x0 as usize..row + r.x1 as usize].fill(255);
            enclosed += (r.x1 - r.x0) as usize;
        }
    }
    let filled_n = subject + enclosed;

    // Its interior (2 px in from the outline), where edge pixels no longer mix in the screen.
    let interior = image::GrayImage::from_raw(w as u32, h as u32, filled)
        .map(|m| imageproc::morphology::erode(&m, imageproc::distance_transform::Norm::LInf, 2))
        .expect("mask size");
    let screen_hue = hue_sat(keyed.screen.rgb);
    let (mut inner, mut key_hued) = (0usize, 0usize);
    for y in 0..h {
        keyed.plate.row(y, &mut plate_row);
        for x in 0..w {
            let i = y * w + x;
            if interior.as_raw()[i] == 0 {
                continue;
            }
            inner += 1;
            let c = super::screen::px(rgb, i);
            let p = plate_row[x];
            let is_screen = super::screen::norm([c[0] - p[0], c[1] - p[1], c[2] - p[2]]) < tol;
            if !is_screen && same_hue(hue_sat(c), screen_hue) {
                key_hued += 1;
            }
        }
    }

    let mut k = Keyability {
        score: 0.0,
        border_screen: ring_clear as f32 / ring_n,
        screen_confidence: keyed.screen.confidence.clamp(0.0, 1.0),
        plate_residual: if res_n == 0 {
            0.0
        } else {
            (res_sq / res_n as f64).sqrt() as f32
        },
        border_subject: ring_subject as f32 / ring_n,
        touches_border: ring_subject as f32 / ring_n > 0.005,
        entanglement: ratio(key_hued, inner),
        enclosed_screen: ratio(enclosed, filled_n),
        ambiguous: ratio(ambiguous, n),
        spill: if opaque == 0 {
            0.0
        } else {
            (spill / opaque as f64) as f32
        },
        subject_size: ratio(subject, n),
        keyed_out: keyed_out(a, &off_plate, w, h),
    };
    k.score = k.score_with(&WEIGHTS);
    k
}

/// [`Keyability::keyed_out`]: four linear passes (rows, columns, both diagonals) mark the
/// pixels of each run of non-opaque pixels, at most [`keyed_out_gap`] long, that has an opaque
/// pixel at both ends; the marked off-plate pixels are summed by 1 - alpha.
fn keyed_out(a: &[f32], off_plate: &[bool], w: usize, h: usize) -> f32 {
    let n = w * h;
    if n == 0 {
        return 0.0;
    }
    let gap = keyed_out_gap(w, h);
    let mut between = vec![false; n];
    // One line: `len` pixels from `start`, `step` apart.
    let mut line = |start: usize, step: usize, len: usize| {
        let mut last: Option<usize> = None;
        for t in 0..len {
            if a[start + t * step] >= 0.98 {
                if let Some(l) = last
                    && t - l - 1 <= gap
                {
                    for u in l + 1..t {
                        between[start + u * step] = true;
                    }
                }
                last = Some(t);
            }
        }
    };
    for y in 0..h {
        line(y * w, 1, w);
    }
    for x in 0..w {
        line(x, w, h);
    }
    // Down-right diagonals start on the top row and the left column; down-left ones on the
    // top row and the right column.
    for x in 0..w {
        line(x, w + 1, (w - x).min(h));
        line(x, w - 1, (x + 1).min(h));
    }
    for y in 1..h {
        line(y * w, w + 1, (h - y).min(w));
        line(y * w + w - 1, w - 1, (h - y).min(w));
    }
    let sum: f64 = (0..n)
        .filter(|&i| between[i] && off_plate[i])
        .map(|i| (1.0 - a[i].clamp(0.0, 1.0)) as f64)
        .sum();
    (sum / n as f64) as f32
}

fn ratio(a: usize, b: usize) -> f32 {
    if b == 0 { 0.0 } else { a as f32 / b as f32 }
}

/// Hue (degrees) and saturation of an RGB colour in 0..255.
fn hue_sat(c: [f32; 3]) -> (f32, f32) {
    let max = c[0].max(c[1]).max(c[2]);
    let min = c[0].min(c[1]).min(c[2]);
    let d = max - min;
    if max <= 0.0 || d <= 0.0 {
        return (0.0, 0.0);
    }
    let h = if max == c[0] {
        60.0 * ((c[1] - c[2]) / d)
    } else if max == c[1] {
        60.0 * ((c[2] - c[0]) / d + 2.0)
    } else {
        60.0 * ((c[0] - c[1]) / d + 4.0)
    };
    (h.rem_euclid(360.0), d / max)
}

/// Within 25 degrees of the screen's hue and at least a third of its saturation.
fn same_hue(c: (f32, f32), screen: (f32, f32)) -> bool {
    let dh = (c.0 - screen.0).abs();
    let dh = dh.min(360.0 - dh);
    screen.1 > 0.2 && c.1 >= screen.1 / 3.0 && dh <= 25.0
}

impl Keyability {
    /// The numeric parts by name (all but the score and `touches_border`): the one list the
    /// metadata writer and reader share.
    pub fn parts_mut(&mut self) -> [(&'static str, &mut f32); 10] {
        [
            ("border_screen", &mut self.border_screen),
            ("screen_confidence", &mut self.screen_confidence),
            ("plate_residual", &mut self.plate_residual),
            ("border_subject", &mut self.border_subject),
            ("entanglement", &mut self.entanglement),
            ("enclosed_screen", &mut self.enclosed_screen),
            ("ambiguous", &mut self.ambiguous),
            ("spill", &mut self.spill),
            ("subject_size", &mut self.subject_size),
            ("keyed_out", &mut self.keyed_out),
        ]
    }

    /// The penalties (0 = no problem), in [`PENALTY_NAMES`] order; each is about 1 where
    /// that problem is severe.
    pub fn penalties(&self) -> [f32; N_PENALTIES] {
        [
            1.0 - self.border_screen,
            1.0 - self.screen_confidence,
            self.plate_residual / 10.0,
            self.border_subject,
            self.entanglement,
            self.enclosed_screen,
            self.ambiguous * 10.0,
            self.spill / 32.0,
            self.keyed_out * 10.0,
        ]
    }

    /// The score these parts give with matte-error weights `weights`.
    pub fn score_with(&self, weights: &[f32; N_PENALTIES]) -> f32 {
        let e: f32 = self
            .penalties()
            .iter()
            .zip(weights)
            .map(|(p, w)| p.max(0.0) * w)
            .sum();
        (100.0 * (-e).exp() * usability(self)).clamp(0.0, 100.0)
    }
}

/// The factor for use rather than matte error: a subject cut by the frame is worth half at
/// most (less the more of the border it covers); a subject under [`MIN_SUBJECT`] of the image
/// falls off in proportion. Stated, not fitted: the benchmark's matte error cannot see them.
pub fn usability(k: &Keyability) -> f32 {
    let frame = if k.touches_border {
        0.5 * (1.0 - k.border_subject).max(0.0)
    } else {
        1.0
    };
    let size = (k.subject_size / MIN_SUBJECT).min(1.0);
    frame * size
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::KeyColor;
    use crate::key::{KeyOptions, key_rgb8};

    const GREEN: [u8; 3] = [0, 177, 64];

    /// A green screen with a disc of `fill` (radius r at (cx, cy)) and an optional inner disc
    /// of `inner` colour.
    fn scene(s: usize, cx: f32, cy: f32, r: f32, fill: [u8; 3], inner: Option<[u8; 3]>) -> Vec<u8> {
        let mut v = Vec::with_capacity(s * s * 3);
        for y in 0..s {
            for x in 0..s {
                let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
                let c = match inner {
                    Some(c) if d < r * 0.4 => c,
                    _ if d < r => fill,
                    _ => GREEN,
                };
                v.extend_from_slice(&c);
            }
        }
        v
    }

    fn report(s: usize, rgb: &[u8]) -> Keyability {
        let keyed = key_rgb8(s as u32, s as u32, rgb, &KeyOptions::new(KeyColor::green())).unwrap();
        measure(&keyed, rgb)
    }

    #[test]
    fn a_centred_subject_on_a_flat_screen_is_clean() {
        let rgb = scene(128, 64.0, 64.0, 30.0, [200, 40, 40], None);
        let k = report(128, &rgb);
        assert!(k.border_screen > 0.99, "{k:?}");
        assert!(!k.touches_border && k.border_subject == 0.0, "{k:?}");
        assert!(k.plate_residual < 1.0, "{k:?}");
        assert!(k.entanglement < 0.01 && k.enclosed_screen < 0.01, "{k:?}");
        let area = std::f32::consts::PI * 30.0 * 30.0 / (128.0 * 128.0);
        assert!((k.subject_size - area).abs() < 0.01, "{k:?}");
        assert!(k.score > 90.0, "{k:?}");
    }

    #[test]
    fn a_subject_cut_by_the_frame_is_reported_and_scores_lower() {
        let inside = report(128, &scene(128, 64.0, 64.0, 30.0, [200, 40, 40], None));
        let cut = report(128, &scene(128, 10.0, 64.0, 30.0, [200, 40, 40], None));
        assert!(cut.touches_border && cut.border_subject > 0.05, "{cut:?}");
        assert!(
            cut.score < inside.score * 0.6,
            "{} vs {}",
            cut.score,
            inside.score
        );
    }

    #[test]
    fn screen_holes_and_key_hued_parts_are_measured() {
        // A hole showing the screen: enclosed, not entangled (it is the screen itself).
        let hole = report(
            128,
            &scene(128, 64.0, 64.0, 40.0, [200, 40, 40], Some(GREEN)),
        );
        let hole_area = 0.16;
        assert!((hole.enclosed_screen - hole_area).abs() < 0.03, "{hole:?}");
        assert!(hole.entanglement < 0.02, "{hole:?}");
        // A dark green part: the screen's hue but not the screen.
        let dark = report(
            128,
            &scene(128, 64.0, 64.0, 40.0, [200, 40, 40], Some([0, 110, 40])),
        );
        assert!(dark.entanglement > 0.08, "{dark:?}");
    }

    /// A disc of `fill` (radius r, centred) crossed by a horizontal band of `band`, `bw` px
    /// wide, that reaches the disc's outline.
    fn banded(s: usize, r: f32, fill: [u8; 3], band: [u8; 3], bw: f32) -> Vec<u8> {
        let c = s as f32 / 2.0;
        let mut v = Vec::with_capacity(s * s * 3);
        for y in 0..s {
            for x in 0..s {
                let (dx, dy) = (x as f32 + 0.5 - c, y as f32 + 0.5 - c);
                let px = if (dx * dx + dy * dy).sqrt() >= r {
                    GREEN
                } else if dy.abs() < bw / 2.0 {
                    band
                } else {
                    fill
                };
                v.extend_from_slice(&px);
            }
        }
        v
    }

    #[test]
    fn a_key_coloured_band_keyed_out_is_measured_and_a_screen_gap_is_not() {
        // A bright key shade (not the plate, but keyed out): between opaque subject above and
        // below, reaching the outline, so no enclosed hole sees it.
        let band = report(128, &banded(128, 40.0, [200, 40, 40], [0, 210, 80], 8.0));
        let area = 8.0 * 80.0 / (128.0 * 128.0);
        assert!(band.keyed_out > 0.5 * area, "{band:?}");
        assert!(band.enclosed_screen < 0.01, "{band:?}");
        // The same band in the screen's own colour is a gap showing the plate.
        let gap = report(128, &banded(128, 40.0, [200, 40, 40], GREEN, 8.0));
        assert!(gap.keyed_out < 0.1 * area, "{gap:?}");
        // A band wider than keyed_out_gap is not between opaque pixels.
        let wide = report(128, &banded(128, 40.0, [200, 40, 40], [0, 210, 80], 30.0));
        assert!(
            wide.keyed_out < band.keyed_out * 0.5,
            "{wide:?} vs {band:?}"
        );
        assert!(band.score < gap.score, "{} vs {}", band.score, gap.score);
        let clean = report(128, &scene(128, 64.0, 64.0, 40.0, [200, 40, 40], None));
        assert!(clean.keyed_out < 0.001, "{clean:?}");
    }

    #[test]
    fn a_tiny_subject_falls_off_and_an_empty_key_is_zero() {
        let tiny = report(128, &scene(128, 64.0, 64.0, 4.0, [200, 40, 40], None));
        assert!(tiny.subject_size < MIN_SUBJECT, "{tiny:?}");
        let full = report(128, &scene(128, 64.0, 64.0, 30.0, [200, 40, 40], None));
        assert!(
            tiny.score < full.score * 0.5,
            "{} vs {}",
            tiny.score,
            full.score
        );
        let empty = report(128, &scene(128, 64.0, 64.0, 0.0, [200, 40, 40], None));
        assert_eq!(empty.score, 0.0, "{empty:?}");
    }

    #[test]
    fn the_score_falls_with_every_penalty() {
        let k = report(128, &scene(128, 64.0, 64.0, 30.0, [200, 40, 40], None));
        let base = k.score_with(&[1.0; N_PENALTIES]);
        for i in 0..N_PENALTIES {
            let mut w = [1.0; N_PENALTIES];
            w[i] = 5.0;
            let mut worse = k;
            match i {
                0 => worse.border_screen -= 0.5,
                1 => worse.screen_confidence -= 0.5,
                2 => worse.plate_residual += 5.0,
                3 => worse.border_subject += 0.002,
                4 => worse.entanglement += 0.3,
                5 => worse.enclosed_screen += 0.3,
                6 => worse.ambiguous += 0.03,
                7 => worse.spill += 10.0,
                _ => worse.keyed_out += 0.02,
            }
            assert!(worse.score_with(&w) < base, "penalty {}", PENALTY_NAMES[i]);
        }
    }
}
