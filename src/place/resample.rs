//! Scaling the cut-out: premultiplied, in linear light, with fast_image_resize.
//!
//! Straight alpha cannot be filtered directly: the colour of transparent pixels (whatever the
//! keyer left there) would bleed into the edges. So each pixel becomes linear light times
//! alpha, 16 bits a channel (8 bytes a pixel; enough that 8-bit sRGB survives), is resampled
//! with Catmull-Rom, and is divided by its alpha again. Full scale is [`FULL`], not 65535: the
//! filter overshoots at edges, and a clipped alpha would brighten the colour divided by it.
//! Catmull-Rom rather than Lanczos3: it rings less at the hard edges a matte has, and ringing
//! in alpha shows as halos. Filtering in linear light keeps thin bright or dark details at
//! their true brightness when shrinking.

use super::{Bounds, Rect, Sprite, colour};
use crate::resize::{AlignedBytes, FilterType, PixelType, Resize};
use anyhow::{Context, Result};
use image::RgbaImage;

/// Full scale of the premultiplied values: 80% of 16 bits, leaving room for Catmull-Rom's
/// overshoot (under 10%) above opaque.
const FULL: u64 = 52_428;

/// Scales the part of `cutout` around `visible` (its alpha box) by `scale`. The result's
/// position is left at (0, 0): the caller anchors it.
pub(crate) fn scale_subject(cutout: &RgbaImage, visible: Rect, scale: f64) -> Result<Sprite> {
    let full = Bounds::of_size(cutout.width(), cutout.height());
    let vis = Bounds {
        x0: visible.x as i64,
        y0: visible.y as i64,
        x1: visible.right() as i64,
        y1: visible.bottom() as i64,
    };
    if scale == 1.0 {
        // 1:1 is a plain copy: no filter, no rounding, not one value changed.
        let rgba =
            image::imageops::crop_imm(cutout, visible.x, visible.y, visible.width, visible.height)
                .to_image();
        return Ok(Sprite { x: 0, y: 0, rgba });
    }
    // Keep the filter's reach of source pixels around the box, so the edge falls off the way
    // the cut-out does rather than being clamped at the box. Catmull-Rom reaches 2 pixels of
    // the larger of the two grids.
    let reach = (2.0 * (1.0 / scale).max(1.0)).ceil() as i64 + 1;
    let src = vis
        .pad(reach)
        .intersect(&full)
        .expect("the box lies inside the cut-out");
    let (sw, sh) = (src.width() as u32, src.height() as u32);
    let dw = ((sw as f64 * scale).round() as u32).max(1);
    let dh = ((sh as f64 * scale).round() as u32).max(1);

    let mut src_buf = AlignedBytes::zeroed(sw as usize * sh as usize * 8);
    let mut at = src_buf.bytes_mut().chunks_exact_mut(8);
    for y in src.y0..src.y1 {
        for x in src.x0..src.x1 {
            let [r, g, b, a] = cutout.get_pixel(x as u32, y as u32).0;
            // Alpha to FULL scale, colour (linear, 0..=65535) times it.
            let premul = |c: u8| {
                let l = colour::to_linear16(c) as u64;
                ((l * a as u64 * FULL + 65535 * 255 / 2) / (65535 * 255)) as u16
            };
            let alpha = ((a as u64 * FULL + 127) / 255) as u16;
            let px = [premul(r), premul(g), premul(b), alpha];
            let out = at.next().context("internal error: cut-out buffer size")?;
            for (o, v) in out.chunks_exact_mut(2).zip(px) {
                o.copy_from_slice(&v.to_ne_bytes());
            }
        }
    }
    let mut dst_buf = AlignedBytes::zeroed(dw as usize * dh as usize * 8);
    Resize::new(PixelType::U16x4, FilterType::CatmullRom)
        .run(src_buf.bytes_mut(), (sw, sh), dst_buf.bytes_mut(), (dw, dh))
        .context("cannot scale the cut-out")?;
    drop(src_buf);

    let mut rgba = RgbaImage::new(dw, dh);
    for (out, p) in rgba.pixels_mut().zip(dst_buf.bytes_mut().chunks_exact(8)) {
        let v = |i: usize| u16::from_ne_bytes([p[2 * i], p[2 * i + 1]]);
        out.0 = unpremultiply([v(0), v(1), v(2), v(3)]);
    }
    Ok(Sprite { x: 0, y: 0, rgba })
}

/// Premultiplied linear back to straight 8-bit sRGB. Colour is divided by the alpha as filtered
/// (overshoot included, so a flat colour stays flat); only then is alpha clamped to opaque.
fn unpremultiply([r, g, b, a]: [u16; 4]) -> [u8; 4] {
    let a = a as u64;
    let a8 = ((a.min(FULL) * 255 + FULL / 2) / FULL) as u8;
    if a8 == 0 {
        return [0, 0, 0, 0];
    }
    let un = |c: u16| {
        let l = (c as u64 * 65535 + a / 2) / a;
        colour::to_srgb16(l.min(65535) as u16)
    };
    [un(r), un(g), un(b), a8]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disc of one colour on a cut-out whose transparent pixels hold a different colour.
    fn disc(size: u32, fg: [u8; 3], hidden: [u8; 3]) -> RgbaImage {
        let c = size as f32 / 2.0;
        RgbaImage::from_fn(size, size, |x, y| {
            let d = ((x as f32 + 0.5 - c).powi(2) + (y as f32 + 0.5 - c).powi(2)).sqrt();
            let a = ((c * 0.7 - d) * 0.5 + 0.5).clamp(0.0, 1.0);
            let a8 = (a * 255.0).round() as u8;
            if a8 == 0 {
                image::Rgba([hidden[0], hidden[1], hidden[2], 0])
            } else {
                image::Rgba([fg[0], fg[1], fg[2], a8])
            }
        })
    }

    #[test]
    fn transparent_colour_never_bleeds_into_edges() {
        let fg = [200, 30, 40];
        let cut = disc(64, fg, [255, 0, 255]);
        let vis = Bounds::of_alpha(&cut, 0).unwrap().to_rect();
        for scale in [0.37, 0.5, 1.0, 1.7, 2.3] {
            let s = scale_subject(&cut, vis, scale).unwrap();
            let mut soft = 0;
            for p in s.rgba.pixels() {
                // Where alpha is meaningful, the colour is the subject's, within rounding.
                if p.0[3] >= 16 {
                    for k in 0..3 {
                        let d = (p.0[k] as i32 - fg[k] as i32).abs();
                        assert!(d <= 2, "scale {scale}: {:?} vs {fg:?}", p.0);
                    }
                    soft += (p.0[3] < 250) as u32;
                }
            }
            assert!(soft > 0, "scale {scale}: the edge stayed soft");
        }
    }

    #[test]
    fn size_and_coverage_follow_the_scale() {
        let cut = disc(80, [10, 200, 10], [0, 0, 0]);
        let coverage =
            |img: &RgbaImage| -> f64 { img.pixels().map(|p| p.0[3] as f64 / 255.0).sum() };
        let vis = Bounds::of_alpha(&cut, 0).unwrap().to_rect();
        let base = coverage(&cut);
        for scale in [0.25, 0.6, 2.0] {
            let s = scale_subject(&cut, vis, scale).unwrap();
            let b = Bounds::of_alpha(&s.rgba, super::super::BOX_MIN_ALPHA).unwrap();
            let want = vis.width as f64 * scale;
            assert!(
                (b.width() as f64 - want).abs() <= 2.0,
                "{scale}: {} vs {want}",
                b.width()
            );
            // The alpha mass scales with the area.
            let ratio = coverage(&s.rgba) / (base * scale * scale);
            assert!((ratio - 1.0).abs() < 0.05, "{scale}: area ratio {ratio}");
        }
    }

    #[test]
    fn native_scale_is_an_exact_copy() {
        let cut = disc(40, [1, 2, 3], [9, 9, 9]);
        let vis = Bounds::of_alpha(&cut, 0).unwrap().to_rect();
        let s = scale_subject(&cut, vis, 1.0).unwrap();
        assert_eq!(s.rgba.dimensions(), (vis.width, vis.height));
        for (x, y, p) in s.rgba.enumerate_pixels() {
            assert_eq!(p, cut.get_pixel(x + vis.x, y + vis.y));
        }
    }

    #[test]
    fn unpremultiply_of_full_and_empty() {
        let full = FULL as u16;
        assert_eq!(unpremultiply([0, 0, 0, 0]), [0, 0, 0, 0]);
        assert_eq!(unpremultiply([full, 0, full, full]), [255, 0, 255, 255]);
        // Overshoot of alpha above opaque: the colour keeps its ratio, alpha clamps.
        assert_eq!(
            unpremultiply([full / 2 + 1000, 0, 0, full + 2000]),
            [188, 0, 0, 255]
        );
        // Colour above its alpha clamps to white.
        assert_eq!(unpremultiply([40000, 0, 0, 30000])[0], 255);
        // Half linear light at half alpha is linear 0.5 straight: code 188.
        assert_eq!(unpremultiply([full / 4, 0, 0, full / 2]), [188, 0, 0, 128]);
    }
}
