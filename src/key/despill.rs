//! Foreground colour: unmixing at soft edges and spill suppression.
//!
//! - Unmixing inverts the compositing model against the local clean plate:
//!   `F = (C - (1 - a) B) / a`, clamped to [0, 255]. That removes the screen's share of an
//!   edge pixel, so hair and anti-aliased edges carry no fringe.
//! - Spill is screen light that reached the subject: `F' = F + s B`. It shows as a positive
//!   colour difference `D(F')` (see `alpha`). Removing `D(F') / D(B)` times the plate colour
//!   brings `D` back to zero. For a pure green screen this is the classic limiter
//!   `G <= max(R, B)`; for any other key hue it is the same operation about that hue.

use super::screen::{chroma, dot};

const K_PERP: f32 = 0.577_350_26;

/// The foreground colour of a pixel with colour `c`, alpha `a`, plate colour `b` (with unit
/// chroma axis `u` and `inv_m = 1 / |chroma(b)|`, NaN for an achromatic screen), with spill
/// suppression of strength `despill` (0 = off, 1 = full).
#[inline]
pub(crate) fn foreground(
    c: [f32; 3],
    a: f32,
    b: [f32; 3],
    u: [f32; 3],
    inv_m: f32,
    despill: f32,
) -> [u8; 3] {
    let f = if a >= 0.999 || a <= 0.02 {
        c
    } else {
        let inv = 1.0 / a;
        let k = 1.0 - a;
        [
            ((c[0] - k * b[0]) * inv).clamp(0.0, 255.0),
            ((c[1] - k * b[1]) * inv).clamp(0.0, 255.0),
            ((c[2] - k * b[2]) * inv).clamp(0.0, 255.0),
        ]
    };
    let f = if despill > 0.0 && inv_m.is_finite() {
        suppress_spill(f, b, u, inv_m, despill)
    } else {
        f
    };
    f.map(|v| (v + 0.5).clamp(0.0, 255.0) as u8)
}

/// Removes the screen-hue excess from `f` by subtracting a share of the plate colour `b`.
#[inline]
pub(crate) fn suppress_spill(
    f: [f32; 3],
    b: [f32; 3],
    u: [f32; 3],
    inv_m: f32,
    strength: f32,
) -> [f32; 3] {
    let ch_f = chroma(f);
    let par = dot(ch_f, u);
    if par <= 0.0 {
        return f;
    }
    let perp = (dot(ch_f, ch_f) - par * par).max(0.0).sqrt();
    let d = par - K_PERP * perp;
    if d <= 0.0 {
        return f;
    }
    let t = strength * d * inv_m;
    [
        (f[0] - t * b[0]).max(0.0),
        (f[1] - t * b[1]).max(0.0),
        (f[2] - t * b[2]).max(0.0),
    ]
}
