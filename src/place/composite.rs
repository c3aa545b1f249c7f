//! Compositing in linear light: `C = a F + (1 - a) B`, with the shadow's darkening applied to
//! `B` first (`B (1 - d)`). Pixels with neither subject nor shadow are not touched at all, and
//! fully opaque subject pixels are the subject's bytes exactly, so both stay byte-identical
//! (the sRGB tables round-trip every byte, but the shortcuts make it hold by construction).
//!
//! Cost: only the union of the subject's and the shadow's rectangles is visited; per pixel,
//! six table reads and a few f32 operations.

use super::{PlacedSubject, Rect, ShadowLayer, colour};
use anyhow::{Result, ensure};
use image::RgbImage;

/// The subject composited over `scene` by its alpha, in linear light. Every pixel where the
/// subject's alpha is 255 is exactly the subject's RGB; every pixel where it is 0, or outside
/// it, is the scene's. This is the last step after harmonisation.
pub fn restore_subject(scene: &RgbImage, subject: &PlacedSubject) -> Result<RgbImage> {
    let mut out = scene.clone();
    composite_into(&mut out, subject, None)?;
    Ok(out)
}

fn check_layer(
    scene: &RgbImage,
    size: (u32, u32),
    rect: &Rect,
    layer: (u32, u32),
    what: &str,
) -> Result<()> {
    ensure!(
        scene.dimensions() == size,
        "the {what} was placed in a {}x{} photo, not this {}x{} one",
        size.0,
        size.1,
        scene.width(),
        scene.height()
    );
    ensure!(
        layer == (rect.width, rect.height) && rect.right() <= size.0 && rect.bottom() <= size.1,
        "internal error: the {what} layer does not match its rectangle"
    );
    Ok(())
}

/// Darkens `scene` by `shadow` and composites `subject` over it, in place.
pub(crate) fn composite_into(
    scene: &mut RgbImage,
    subject: &PlacedSubject,
    shadow: Option<&ShadowLayer>,
) -> Result<()> {
    check_layer(
        scene,
        subject.photo_size,
        &subject.rect,
        subject.rgba.dimensions(),
        "subject",
    )?;
    let shadow = shadow.filter(|s| !s.is_empty());
    let mut region = subject.rect;
    if let Some(s) = shadow {
        check_layer(
            scene,
            s.photo_size,
            &s.rect,
            s.darkening.dimensions(),
            "shadow",
        )?;
        region = region.union(&s.rect);
    }
    let lin = colour::linear_table();
    let width = scene.width() as usize;
    let buf: &mut [u8] = scene;
    let (sr, sub) = (subject.rect, subject.rgba.as_raw());
    for y in region.y..region.bottom() {
        let row = &mut buf[y as usize * width * 3..(y as usize + 1) * width * 3];
        for x in region.x..region.right() {
            let a = if sr.contains(x, y) {
                let i = (((y - sr.y) * sr.width + (x - sr.x)) * 4) as usize;
                Some(&sub[i..i + 4])
            } else {
                None
            };
            let d = shadow.filter(|s| s.rect.contains(x, y)).map_or(0, |s| {
                s.darkening.get_pixel(x - s.rect.x, y - s.rect.y).0[0]
            });
            let px = &mut row[x as usize * 3..x as usize * 3 + 3];
            match a {
                Some(f) if f[3] == 255 => px.copy_from_slice(&f[..3]),
                Some(f) if f[3] > 0 || d > 0 => {
                    let alpha = f[3] as f32 / 255.0;
                    let keep = (1.0 - alpha) * (1.0 - d as f32 / 255.0);
                    for k in 0..3 {
                        px[k] = colour::to_srgb(
                            alpha * lin[f[k] as usize] + keep * lin[px[k] as usize],
                        );
                    }
                }
                None if d > 0 => {
                    let keep = 1.0 - d as f32 / 255.0;
                    for v in px.iter_mut() {
                        *v = colour::to_srgb(keep * lin[*v as usize]);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Rgb, Rgba, RgbaImage};

    fn subject(photo: (u32, u32), rect: Rect, px: Rgba<u8>) -> PlacedSubject {
        PlacedSubject {
            photo_size: photo,
            rect,
            rgba: RgbaImage::from_pixel(rect.width, rect.height, px),
        }
    }

    const R: Rect = Rect {
        x: 1,
        y: 1,
        width: 2,
        height: 2,
    };

    #[test]
    fn half_alpha_white_over_black_is_linear_half() {
        let scene = RgbImage::from_pixel(4, 4, Rgb([0, 0, 0]));
        let s = subject((4, 4), R, Rgba([255, 255, 255, 128]));
        let out = restore_subject(&scene, &s).unwrap();
        // 128/255 of linear white: encode(0.50196) = 188.
        assert_eq!(out.get_pixel(1, 1).0, [188, 188, 188]);
        assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0]);
        // Gamma-space mixing would have given 128: the linear result is lighter.
    }

    #[test]
    fn shadow_multiplies_and_the_rest_is_untouched() {
        let scene = RgbImage::from_fn(6, 4, |x, y| Rgb([(x * 40) as u8, (y * 60) as u8, 200]));
        let s = subject(
            (6, 4),
            Rect {
                x: 0,
                y: 0,
                width: 1,
                height: 1,
            },
            Rgba([9, 9, 9, 0]),
        );
        let shadow = ShadowLayer {
            photo_size: (6, 4),
            rect: Rect {
                x: 2,
                y: 1,
                width: 3,
                height: 2,
            },
            darkening: GrayImage::from_pixel(3, 2, image::Luma([128])),
        };
        let mut out = scene.clone();
        composite_into(&mut out, &s, Some(&shadow)).unwrap();
        for (x, y, p) in out.enumerate_pixels() {
            let q = scene.get_pixel(x, y);
            if shadow.rect.contains(x, y) {
                for k in 0..3 {
                    // Linear light times (1 - 128/255), re-encoded.
                    let want = colour::to_srgb(colour::to_linear(q.0[k]) * (127.0 / 255.0));
                    assert_eq!(p.0[k], want);
                    assert!(q.0[k] == 0 || p.0[k] > 0, "never black over light");
                }
            } else {
                assert_eq!(p, q, "at {x},{y}");
            }
        }
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let scene = RgbImage::new(4, 4);
        let s = subject((5, 4), R, Rgba([0, 0, 0, 255]));
        assert!(restore_subject(&scene, &s).is_err());
    }
}
