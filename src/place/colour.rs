//! sRGB transfer curves (exact IEC 61966-2-1 formulas, tabulated) and CIE Lab.
//!
//! Decoding 8-bit sRGB is a 256-entry table. Encoding goes through a 65536-entry table indexed
//! by linear light quantised to 16 bits: one code of 8-bit sRGB is at least 20 table steps wide
//! (the narrowest is near black), so `encode(decode(v)) == v` for every byte, which is what
//! keeps untouched and fully opaque pixels byte-identical through the linear-light composites.

use std::sync::OnceLock;

struct Tables {
    to_linear: [f32; 256],
    to_linear16: [u16; 256],
    to_srgb: Vec<u8>,
}

fn tables() -> &'static Tables {
    static TABLES: OnceLock<Tables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut to_linear = [0f32; 256];
        let mut to_linear16 = [0u16; 256];
        for (v, (l, l16)) in to_linear.iter_mut().zip(&mut to_linear16).enumerate() {
            let x = decode_exact(v as f64 / 255.0);
            *l = x as f32;
            *l16 = (x * 65535.0).round() as u16;
        }
        let to_srgb = (0..=u16::MAX)
            .map(|i| (encode_exact(i as f64 / 65535.0) * 255.0).round() as u8)
            .collect();
        Tables {
            to_linear,
            to_linear16,
            to_srgb,
        }
    })
}

/// The sRGB decoding curve on [0, 1].
fn decode_exact(c: f64) -> f64 {
    if c <= 0.04045 {
        c / 12.92
    } else {
        ((c + 0.055) / 1.055).powf(2.4)
    }
}

/// The sRGB encoding curve on [0, 1].
fn encode_exact(l: f64) -> f64 {
    if l <= 0.003_130_8 {
        l * 12.92
    } else {
        1.055 * l.powf(1.0 / 2.4) - 0.055
    }
}

/// An 8-bit sRGB value as linear light in [0, 1].
#[inline]
pub fn to_linear(v: u8) -> f32 {
    tables().to_linear[v as usize]
}

/// An 8-bit sRGB value as linear light in 0..=65535.
#[inline]
pub fn to_linear16(v: u8) -> u16 {
    tables().to_linear16[v as usize]
}

/// Linear light (clamped to [0, 1]) as 8-bit sRGB, rounded to the nearest code.
#[inline]
pub fn to_srgb(l: f32) -> u8 {
    let i = (l.clamp(0.0, 1.0) * 65535.0 + 0.5) as usize;
    tables().to_srgb[i]
}

/// Linear light in 0..=65535 as 8-bit sRGB.
#[inline]
pub fn to_srgb16(l: u16) -> u8 {
    tables().to_srgb[l as usize]
}

/// The linear-light table, for loops that want it hoisted.
pub fn linear_table() -> &'static [f32; 256] {
    &tables().to_linear
}

// sRGB primaries, D65 white (IEC 61966-2-1).
const RGB_TO_XYZ: [[f32; 3]; 3] = [
    [0.412_456_4, 0.357_576_1, 0.180_437_5],
    [0.212_672_9, 0.715_152_2, 0.072_175],
    [0.019_333_9, 0.119_192, 0.950_304_1],
];
const XYZ_TO_RGB: [[f32; 3]; 3] = [
    [3.240_454_2, -1.537_138_5, -0.498_531_4],
    [-0.969_266, 1.876_010_8, 0.041_556],
    [0.055_643_4, -0.204_025_9, 1.057_225_2],
];
const WHITE: [f32; 3] = [0.950_47, 1.0, 1.088_83];
const DELTA: f32 = 6.0 / 29.0;

fn mat(m: &[[f32; 3]; 3], v: [f32; 3]) -> [f32; 3] {
    [0, 1, 2].map(|r| m[r][0] * v[0] + m[r][1] * v[1] + m[r][2] * v[2])
}

fn lab_f(t: f32) -> f32 {
    if t > DELTA * DELTA * DELTA {
        t.cbrt()
    } else {
        t / (3.0 * DELTA * DELTA) + 4.0 / 29.0
    }
}

fn lab_f_inv(f: f32) -> f32 {
    if f > DELTA {
        f * f * f
    } else {
        3.0 * DELTA * DELTA * (f - 4.0 / 29.0)
    }
}

/// Linear sRGB to CIE L*a*b* (D65): L in [0, 100].
pub fn linear_to_lab(rgb: [f32; 3]) -> [f32; 3] {
    let xyz = mat(&RGB_TO_XYZ, rgb);
    let [fx, fy, fz] = [0, 1, 2].map(|i| lab_f(xyz[i] / WHITE[i]));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// CIE L*a*b* (D65) to linear sRGB, not clamped (out-of-gamut colours leave [0, 1]).
pub fn lab_to_linear(lab: [f32; 3]) -> [f32; 3] {
    let fy = (lab[0] + 16.0) / 116.0;
    let f = [fy + lab[1] / 500.0, fy, fy - lab[2] / 200.0];
    let xyz = [0, 1, 2].map(|i| lab_f_inv(f[i]) * WHITE[i]);
    mat(&XYZ_TO_RGB, xyz)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_survives_the_round_trip() {
        for v in 0..=255u8 {
            assert_eq!(to_srgb(to_linear(v)), v, "byte {v}");
            assert_eq!(to_srgb16(to_linear16(v)), v, "byte {v} through 16 bits");
        }
    }

    #[test]
    fn curves_match_hand_computed_values() {
        // Linear 0.5 is 1.055 * 0.5^(1/2.4) - 0.055 = 0.7354 of full scale: code 187.5 -> 188.
        assert_eq!(to_srgb(0.5), 188);
        assert!((to_linear(188) - 0.5029).abs() < 1e-3);
        // 10/255 is on the linear toe: 10 / 255 / 12.92.
        assert!((to_linear(10) - 10.0 / 255.0 / 12.92).abs() < 1e-7);
        assert_eq!((to_srgb(-1.0), to_srgb(2.0)), (0, 255));
        // Encoding is monotone.
        let codes: Vec<u8> = (0..=1000).map(|i| to_srgb(i as f32 / 1000.0)).collect();
        assert!(codes.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn lab_of_known_colours_and_round_trip() {
        let white = linear_to_lab([1.0, 1.0, 1.0]);
        assert!((white[0] - 100.0).abs() < 0.01 && white[1].abs() < 0.01 && white[2].abs() < 0.01);
        // sRGB red is L 53.24, a 80.09, b 67.20 (Lindbloom's calculator).
        let red = linear_to_lab([1.0, 0.0, 0.0]);
        for (got, want) in red.iter().zip([53.24, 80.09, 67.20]) {
            assert!((got - want).abs() < 0.05, "{red:?}");
        }
        for rgb in [[0.2, 0.5, 0.9], [0.001, 0.0, 0.003], [0.7, 0.7, 0.1]] {
            let back = lab_to_linear(linear_to_lab(rgb));
            for (a, b) in back.iter().zip(rgb) {
                assert!((a - b).abs() < 1e-4, "{rgb:?} -> {back:?}");
            }
        }
    }
}
