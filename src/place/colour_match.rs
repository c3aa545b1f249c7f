//! Optional colour match: the subject's per-channel mean and spread in CIE Lab move a bounded
//! fraction toward those of a ring of the photo around its box (Reinhard-style transfer).
//!
//! Bounded so that a product's brand colours survive: whatever the strength, the mean moves at
//! most [`MAX_LIGHTNESS_SHIFT`] in L* and [`MAX_CHROMA_SHIFT`] in each of a* and b* (so the
//! chromatic shift is at most about 4.2 ΔE, a tint rather than a new colour, while exposure,
//! which differs most between a studio render and a photo, may move more), and the spread is
//! scaled by at most [`MAX_SPREAD_RATIO`] either way.

use super::{Bounds, Sprite, colour};
use image::RgbImage;

/// Largest move of the mean lightness (L*, 0..100).
pub const MAX_LIGHTNESS_SHIFT: f32 = 6.0;
/// Largest move of the mean a* and of the mean b*.
pub const MAX_CHROMA_SHIFT: f32 = 3.0;
/// Largest factor (or its inverse) on the spread of each channel.
pub const MAX_SPREAD_RATIO: f32 = 1.1;
/// The ring's width, as a fraction of the subject box's longer side (at least [`MIN_RING`]).
pub const RING_FRACTION: f64 = 0.2;
pub const MIN_RING: i64 = 16;
/// Statistics read at most about this many pixels (on a regular lattice beyond it).
const MAX_SAMPLES: i64 = 1 << 20;
/// Fewer ring pixels than this (a subject filling the photo): no match.
const MIN_RING_SAMPLES: f64 = 64.0;

/// What the colour match did, in Lab units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ColourShift {
    /// Change of the subject's mean L*, a*, b*.
    pub mean_shift: [f32; 3],
    /// Factor on the subject's spread (standard deviation) of L*, a*, b*.
    pub spread_ratio: [f32; 3],
}

/// Alpha-weighted mean and standard deviation per channel. Sums are f64: a few million f32
/// additions would lose the mean's last digits.
#[derive(Default)]
struct Stats {
    weight: f64,
    sum: [f64; 3],
    sum_sq: [f64; 3],
}

impl Stats {
    fn add(&mut self, lab: [f32; 3], weight: f32) {
        let w = weight as f64;
        self.weight += w;
        for ((sum, sum_sq), &v) in self.sum.iter_mut().zip(&mut self.sum_sq).zip(&lab) {
            let v = v as f64;
            *sum += w * v;
            *sum_sq += w * v * v;
        }
    }

    fn mean(&self) -> [f32; 3] {
        [0, 1, 2].map(|k| (self.sum[k] / self.weight) as f32)
    }

    fn spread(&self) -> [f32; 3] {
        [0, 1, 2].map(|k| {
            let m = self.sum[k] / self.weight;
            ((self.sum_sq[k] / self.weight - m * m).max(0.0)).sqrt() as f32
        })
    }
}

fn lab_of(rgb: [u8; 3]) -> [f32; 3] {
    colour::linear_to_lab(rgb.map(colour::to_linear))
}

/// A lattice step that keeps a `w` x `h` area to about [`MAX_SAMPLES`] reads.
fn stride(w: i64, h: i64) -> usize {
    let ratio = (w * h) as f64 / MAX_SAMPLES as f64;
    ratio.sqrt().ceil().max(1.0) as usize
}

/// Nudges the sprite's colours toward the photo around `visible` (its alpha box in photo
/// pixels). Returns `None`, changing nothing, when the photo has no ring around the subject.
pub(crate) fn match_to_surroundings(
    sprite: &mut Sprite,
    visible: &Bounds,
    photo: &RgbImage,
    strength: f32,
) -> Option<ColourShift> {
    let t = strength.clamp(0.0, 1.0);
    let ring_width =
        ((visible.width().max(visible.height()) as f64 * RING_FRACTION) as i64).max(MIN_RING);
    let (pw, ph) = photo.dimensions();
    let outer = visible
        .pad(ring_width)
        .intersect(&Bounds::of_size(pw, ph))?;
    let mut ring = Stats::default();
    let step = stride(outer.width(), outer.height());
    for y in (outer.y0..outer.y1).step_by(step) {
        for x in (outer.x0..outer.x1).step_by(step) {
            let inside = x >= visible.x0 && x < visible.x1 && y >= visible.y0 && y < visible.y1;
            if !inside {
                ring.add(lab_of(photo.get_pixel(x as u32, y as u32).0), 1.0);
            }
        }
    }
    if ring.weight < MIN_RING_SAMPLES {
        return None;
    }
    let mut subject = Stats::default();
    let (sw, sh) = sprite.rgba.dimensions();
    let step = stride(sw as i64, sh as i64);
    for y in (0..sh).step_by(step) {
        for x in (0..sw).step_by(step) {
            let [r, g, b, a] = sprite.rgba.get_pixel(x, y).0;
            if a > 0 {
                subject.add(lab_of([r, g, b]), a as f32 / 255.0);
            }
        }
    }
    if subject.weight <= 0.0 {
        return None;
    }
    let (ms, ss) = (subject.mean(), subject.spread());
    let (mr, sr) = (ring.mean(), ring.spread());
    let caps = [MAX_LIGHTNESS_SHIFT, MAX_CHROMA_SHIFT, MAX_CHROMA_SHIFT];
    let mean_shift = [0, 1, 2].map(|k| (t * (mr[k] - ms[k])).clamp(-caps[k], caps[k]));
    let spread_ratio = [0, 1, 2].map(|k| {
        if ss[k] < 0.5 || sr[k] < 0.5 {
            // A flat channel has no spread to match (or none to match to).
            1.0
        } else {
            (sr[k] / ss[k])
                .powf(t)
                .clamp(1.0 / MAX_SPREAD_RATIO, MAX_SPREAD_RATIO)
        }
    });
    for p in sprite.rgba.pixels_mut() {
        let [r, g, b, a] = p.0;
        if a == 0 {
            continue;
        }
        let lab = lab_of([r, g, b]);
        let moved = [0, 1, 2].map(|k| ms[k] + mean_shift[k] + (lab[k] - ms[k]) * spread_ratio[k]);
        let [r, g, b] = colour::lab_to_linear(moved).map(colour::to_srgb);
        p.0 = [r, g, b, a];
    }
    Some(ColourShift {
        mean_shift,
        spread_ratio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, Rgba, RgbaImage};

    fn setup(fg: [u8; 3], bg: [u8; 3]) -> (Sprite, Bounds, RgbImage) {
        let rgba = RgbaImage::from_fn(20, 20, |x, y| {
            // A slight gradient so that the subject has a spread.
            Rgba([
                fg[0].saturating_add((x / 2) as u8),
                fg[1],
                fg[2],
                if y < 2 { 0 } else { 255 },
            ])
        });
        let sprite = Sprite { x: 40, y: 40, rgba };
        let visible = Bounds {
            x0: 40,
            y0: 42,
            x1: 60,
            y1: 60,
        };
        let photo = RgbImage::from_pixel(100, 100, Rgb(bg));
        (sprite, visible, photo)
    }

    fn mean_lab(s: &Sprite) -> [f32; 3] {
        let mut st = Stats::default();
        for p in s.rgba.pixels().filter(|p| p.0[3] > 0) {
            st.add(lab_of([p.0[0], p.0[1], p.0[2]]), 1.0);
        }
        st.mean()
    }

    #[test]
    fn moves_toward_the_ring_but_no_further_than_the_caps() {
        let (mut sprite, vis, photo) = setup([200, 30, 30], [20, 60, 200]);
        let before = mean_lab(&sprite);
        let ring = lab_of([20, 60, 200]);
        let shift = match_to_surroundings(&mut sprite, &vis, &photo, 1.0).unwrap();
        let after = mean_lab(&sprite);
        let caps = [MAX_LIGHTNESS_SHIFT, MAX_CHROMA_SHIFT, MAX_CHROMA_SHIFT];
        for k in 0..3 {
            let moved = after[k] - before[k];
            // Toward the ring, by no more than the cap (plus 8-bit rounding).
            assert!(moved * (ring[k] - before[k]) >= 0.0, "channel {k}: {moved}");
            assert!(
                moved.abs() <= caps[k] + 0.6,
                "channel {k}: {moved} > {}",
                caps[k]
            );
            assert!(shift.mean_shift[k].abs() <= caps[k]);
        }
        // The ring is far away in every channel, so every cap is reached.
        assert!(shift.mean_shift.iter().zip(caps).all(|(s, c)| s.abs() == c));
    }

    #[test]
    fn weak_strength_moves_less_and_the_transparent_part_is_untouched() {
        let (s0, vis, photo) = setup([120, 120, 120], [130, 130, 130]);
        let (mut weak, mut strong) = (s0.clone(), s0.clone());
        let a = match_to_surroundings(&mut weak, &vis, &photo, 0.2).unwrap();
        let b = match_to_surroundings(&mut strong, &vis, &photo, 1.0).unwrap();
        assert!(a.mean_shift[0] > 0.0 && a.mean_shift[0] < b.mean_shift[0]);
        // Strength 1 reaches a close target exactly: within the L* cap, so fully matched.
        let (before, after) = (mean_lab(&s0)[0], mean_lab(&strong)[0]);
        let target = lab_of([130, 130, 130])[0];
        assert!(
            (after - target).abs() < 0.6,
            "{before} -> {after}, ring {target}"
        );
        for (p, q) in s0.rgba.pixels().zip(weak.rgba.pixels()) {
            if p.0[3] == 0 {
                assert_eq!(p, q);
            }
        }
    }

    #[test]
    fn no_ring_means_no_match() {
        let (mut sprite, _, _) = setup([10, 20, 30], [0, 0, 0]);
        let photo = RgbImage::from_pixel(20, 18, Rgb([255, 255, 255]));
        let vis = Bounds {
            x0: 0,
            y0: 0,
            x1: 20,
            y1: 18,
        };
        let before = sprite.rgba.clone();
        assert!(match_to_surroundings(&mut sprite, &vis, &photo, 1.0).is_none());
        assert_eq!(before, sprite.rgba);
    }
}
