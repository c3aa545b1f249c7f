//! Fusing a subject mask (from a segmenter, or a file) into the chroma key.
//!
//! A colour keyer cannot tell a green tie from a green screen; a segmenter can, but its edges
//! are coarse (U²-Net works at 320², SAM at 256²). So each gives what it is good at: inside
//! the mask's confident interior (the mask eroded by a margin wider than its edge error),
//! pixels the keyer made transparent or partly so become opaque and keep their true colour,
//! without despill; everywhere else, including the whole soft edge band, the keyer's alpha
//! and colour stay as they are. A mask that is eroded, dilated or blurred by a few pixels
//! therefore changes nothing at the edges.

use super::Keyed;
use crate::resize::{FilterType, PixelType, Resize};
use crate::segment::{Prompt, Segmenter, SubjectMask};
use anyhow::{Context, Result, ensure};
use image::GrayImage;
use imageproc::distance_transform::Norm;

/// Mask values at or above this are subject.
const SUBJECT_LEVEL: u8 = 128;

/// What the fusion changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FuseStats {
    /// Where the mask came from: the segmenter's name, or the mask file.
    pub source: String,
    /// Pixels in the mask's confident interior.
    pub interior: usize,
    /// Interior pixels the keyer had made (partly) transparent, now opaque.
    pub restored: usize,
}

/// The erosion margin in pixels: wider than a segmenter's edge error, which grows with the
/// image (one 320² network pixel is 3.2 pixels of a 1024² image).
pub fn interior_margin(width: u32, height: u32) -> u8 {
    width.max(height).div_ceil(160).clamp(3, 255) as u8
}

/// Runs `segmenter` on the keyed image (RGB8 `rgb`) and fuses its mask in.
pub fn segment_and_fuse(keyed: &mut Keyed, rgb: &[u8], segmenter: &dyn Segmenter) -> Result<()> {
    let image = image::RgbImage::from_raw(keyed.width, keyed.height, rgb.to_vec())
        .context("internal error: image and key differ in size")?;
    let mask = segmenter.segment(&image, &Prompt::default())?;
    fuse_subject_mask(keyed, rgb, &mask, segmenter.name())
}

/// Fuses `mask` (from `source`, for the record) into `keyed`; `rgb` is the keyed image
/// (RGB8). A mask of another size is stretched to the image first.
pub fn fuse_subject_mask(
    keyed: &mut Keyed,
    rgb: &[u8],
    mask: &SubjectMask,
    source: &str,
) -> Result<()> {
    let (w, h) = (keyed.width, keyed.height);
    let n = w as usize * h as usize;
    ensure!(
        rgb.len() == 3 * n,
        "internal error: image and key differ in size"
    );
    ensure!(
        mask.values.len() == mask.width as usize * mask.height as usize && !mask.values.is_empty(),
        "the subject mask is empty"
    );
    let bytes = Resize::new(PixelType::U8, FilterType::Bilinear).to_vec(
        mask.to_u8(),
        (mask.width, mask.height),
        (w, h),
    )?;
    let subject = GrayImage::from_fn(w, h, |x, y| {
        let v = bytes[y as usize * w as usize + x as usize];
        image::Luma([if v >= SUBJECT_LEVEL { 255 } else { 0 }])
    });
    let interior = imageproc::morphology::erode(&subject, Norm::L2, interior_margin(w, h));
    let mut stats = FuseStats {
        source: source.to_string(),
        ..FuseStats::default()
    };
    let mut background = 0usize;
    for (i, p) in interior.as_raw().iter().enumerate() {
        if *p != 0 {
            stats.interior += 1;
            if keyed.alpha[i] < 1.0 {
                keyed.alpha[i] = 1.0;
                keyed.foreground[3 * i..3 * i + 3].copy_from_slice(&rgb[3 * i..3 * i + 3]);
                stats.restored += 1;
            }
        }
        if keyed.alpha[i] < 0.5 {
            background += 1;
        }
    }
    keyed.background_fraction = background as f32 / n.max(1) as f32;
    keyed.fused = Some(stats);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::KeyColor;
    use crate::key::{KeyOptions, key_rgb8};

    const N: u32 = 96;
    const SCREEN: [u8; 3] = [0, 177, 64];

    /// A grey disc of radius 30 on the screen, crossed by a band of the screen's own colour.
    fn scene() -> Vec<u8> {
        let mut rgb = Vec::new();
        for y in 0..N {
            for x in 0..N {
                let d = ((x as f32 - 48.0).powi(2) + (y as f32 - 48.0).powi(2)).sqrt();
                let band = (44..52).contains(&y);
                rgb.extend(if d < 30.0 && !band {
                    [128, 128, 128]
                } else {
                    SCREEN
                });
            }
        }
        rgb
    }

    fn disc(radius: f32, size: u32) -> SubjectMask {
        let s = size as f32 / N as f32;
        let values = (0..size * size)
            .map(|i| {
                let (x, y) = ((i % size) as f32 / s, (i / size) as f32 / s);
                let d = ((x - 48.0).powi(2) + (y - 48.0).powi(2)).sqrt();
                if d < radius { 1.0 } else { 0.0 }
            })
            .collect();
        SubjectMask {
            width: size,
            height: size,
            values,
        }
    }

    fn dist(i: usize) -> f32 {
        let (x, y) = ((i as u32 % N) as f32, (i as u32 / N) as f32);
        ((x - 48.0).powi(2) + (y - 48.0).powi(2)).sqrt()
    }

    #[test]
    fn the_screen_coloured_band_inside_the_subject_comes_back() {
        let rgb = scene();
        let keyed = key_rgb8(N, N, &rgb, &KeyOptions::new(KeyColor::green())).unwrap();
        let band_centre = (48 * N + 48) as usize;
        assert!(
            keyed.alpha[band_centre] < 0.1,
            "the keyer alone loses the band"
        );
        for (radius, size) in [(30.0, N), (33.0, N), (27.5, N), (30.0, 40)] {
            let mut fused = keyed.clone();
            fuse_subject_mask(&mut fused, &rgb, &disc(radius, size), "test").unwrap();
            let stats = fused.fused.as_ref().unwrap();
            assert!(stats.restored > 100, "{radius} {size}: {stats:?}");
            assert_eq!(fused.alpha[band_centre], 1.0);
            assert_eq!(
                fused.foreground[3 * band_centre..3 * band_centre + 3],
                SCREEN
            );
            for i in 0..(N * N) as usize {
                if dist(i) > 31.0 {
                    // The screen around the subject, and the soft edge, are the keyer's.
                    assert_eq!(fused.alpha[i], keyed.alpha[i], "{radius} {size}: pixel {i}");
                    assert_eq!(
                        fused.foreground[3 * i..3 * i + 3],
                        keyed.foreground[3 * i..3 * i + 3]
                    );
                }
            }
            assert!(fused.background_fraction < keyed.background_fraction);
        }
    }

    #[test]
    fn an_empty_mask_changes_nothing() {
        let rgb = scene();
        let keyed = key_rgb8(N, N, &rgb, &KeyOptions::new(KeyColor::green())).unwrap();
        let mut fused = keyed.clone();
        fuse_subject_mask(&mut fused, &rgb, &disc(0.0, N), "none").unwrap();
        assert_eq!(fused.alpha, keyed.alpha);
        assert_eq!(fused.fused.unwrap().restored, 0);
    }

    #[test]
    fn the_margin_grows_with_the_image() {
        assert_eq!(interior_margin(96, 96), 3);
        assert_eq!(interior_margin(1024, 768), 7);
        assert_eq!(interior_margin(100_000, 10), 255);
    }
}
