//! Geometry of the harmonisation pass (the diffusion itself runs elsewhere).
//!
//! A VAE round trip changes every pixel it sees, so the model only gets a crop: the subject's
//! box and the shadow's, padded by a margin (32 px, as A1111's "only masked" padding), resized
//! to the model's native size with the aspect kept and both sides multiples of the VAE
//! factor. Its mask marks what may be repainted: a band around the subject's edge and the
//! shadow, never the subject's opaque interior. The result comes back through a feathered
//! copy of that mask; every pixel outside the crop, or where the feathered mask is 0, is the
//! scene's own byte.
//!
//! Band and feather are set at the model's resolution and converted to photo pixels: the band
//! is [`BAND_MODEL_PX`] model pixels, 1.5 latent cells of an 8x VAE, so that it survives the
//! mask's reduction to latent size; the feather is [`FEATHER_MODEL_PX`], enough to hide the
//! seam between repainted and original pixels without reaching far into either.

use super::{PlacedSubject, Rect, ShadowLayer, blur, colour};
use crate::resize::{FilterType, PixelType, Resize};
use anyhow::{Context, Result, bail, ensure};
use image::{GrayImage, RgbImage};

pub const DEFAULT_MARGIN: u32 = 32;
pub const DEFAULT_VAE_FACTOR: u32 = 8;
/// Width of the repaint band on each side of the subject's edge, in model pixels.
pub const BAND_MODEL_PX: f64 = 12.0;
/// Radius of the feather (three box passes), in model pixels.
pub const FEATHER_MODEL_PX: f64 = 6.0;
/// Shadow darkening from which a pixel is repainted (about 1%).
pub const SHADOW_MASK_MIN: u8 = 3;
/// Alpha from which a subject pixel counts as opaque interior.
const OPAQUE_MIN: u8 = 250;
/// A model-resolution mask pixel is set where at least a quarter of its area is.
const MODEL_MASK_MIN: u8 = 64;
/// The largest native model size accepted.
const MAX_NATIVE: u32 = 4096;

/// Settings of [`plan_harmonize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HarmonizeOptions {
    /// The model's native long side: 512 for SD 1.5, 1024 for SDXL.
    pub native: u32,
    /// Both model-size sides are multiples of this (the VAE's downsampling, 8).
    pub vae_factor: u32,
    /// Padding around the subject's and shadow's boxes, in photo pixels (at least).
    pub margin: u32,
}

impl HarmonizeOptions {
    pub fn new(native: u32) -> Self {
        Self {
            native,
            vae_factor: DEFAULT_VAE_FACTOR,
            margin: DEFAULT_MARGIN,
        }
    }
}

/// Where the model works and how its result comes back.
#[derive(Debug, Clone)]
pub struct HarmonizePlan {
    pub photo_size: (u32, u32),
    /// The crop of the photo the model sees.
    pub crop: Rect,
    /// The crop's size at model resolution.
    pub model_size: (u32, u32),
    /// Band width each side of the subject's edge, in photo pixels.
    pub band_px: u32,
    /// Feather radius, in photo pixels.
    pub feather_px: u32,
    /// Crop-sized inpainting mask: 255 = repaint, 0 = keep.
    pub mask: GrayImage,
    /// Crop-sized blend weights for [`blend_back`]: the mask, feathered.
    pub feathered: GrayImage,
}

/// Plans the harmonisation crop and masks for a placed subject and its shadow.
pub fn plan_harmonize(
    subject: &PlacedSubject,
    shadow: &ShadowLayer,
    opts: &HarmonizeOptions,
) -> Result<HarmonizePlan> {
    let f = opts.vae_factor;
    ensure!(f >= 1, "the VAE factor must be at least 1");
    ensure!(
        opts.native >= f && opts.native.is_multiple_of(f) && opts.native <= MAX_NATIVE,
        "the model size {} is not a multiple of {f} between {f} and {MAX_NATIVE}",
        opts.native
    );
    ensure!(
        shadow.photo_size == subject.photo_size,
        "internal error: subject and shadow belong to different photos"
    );
    let Some(mut objects) = subject.alpha_box() else {
        bail!("the placed subject is fully transparent; nothing to harmonise");
    };
    if !shadow.is_empty() {
        objects = objects.union(&shadow.rect);
    }
    let (pw, ph) = subject.photo_size;
    let first = pad_within(&objects, opts.margin, pw, ph);
    let to_photo = first.width.max(first.height) as f64 / opts.native as f64;
    let band_px = ((BAND_MODEL_PX * to_photo).ceil() as u32).max(2);
    let feather_px = ((FEATHER_MODEL_PX * to_photo).ceil() as u32).max(1);
    // The band and the feather's reach (three passes) must fit inside the crop, or the blend
    // would stop at its edge with a seam.
    let reach = band_px + blur::PASSES as u32 * feather_px + 1;
    let crop = pad_within(&objects, opts.margin.max(reach), pw, ph);
    let model_size = model_size(crop.width, crop.height, opts.native, f);
    let mask = repaint_mask(subject, shadow, &crop, band_px);
    let mut feathered = mask.clone();
    let (cw, ch) = (crop.width as usize, crop.height as usize);
    blur::blur_u8(&mut feathered, cw, ch, feather_px as usize);
    Ok(HarmonizePlan {
        photo_size: (pw, ph),
        crop,
        model_size,
        band_px,
        feather_px,
        mask,
        feathered,
    })
}

/// `r` grown by `by` on every side, clipped to a `pw` x `ph` photo.
fn pad_within(r: &Rect, by: u32, pw: u32, ph: u32) -> Rect {
    let (x, y) = (r.x.saturating_sub(by), r.y.saturating_sub(by));
    let (right, bottom) = ((r.right() + by).min(pw), (r.bottom() + by).min(ph));
    Rect {
        x,
        y,
        width: right - x,
        height: bottom - y,
    }
}

/// Long side `native`, short side scaled alike and rounded to a multiple of `factor`.
pub fn model_size(w: u32, h: u32, native: u32, factor: u32) -> (u32, u32) {
    let short = |s: u32, long: u32| {
        let scaled = s as f64 * native as f64 / long as f64;
        (((scaled / factor as f64).round() as u32) * factor).clamp(factor, native)
    };
    if w >= h {
        (native, short(h, w))
    } else {
        (short(w, h), native)
    }
}

/// The crop-sized repaint mask: (a band around the subject's silhouette, or shadow) and not
/// the subject's opaque interior shrunk by the band.
fn repaint_mask(
    subject: &PlacedSubject,
    shadow: &ShadowLayer,
    crop: &Rect,
    band: u32,
) -> GrayImage {
    let (cw, ch) = (crop.width as usize, crop.height as usize);
    let mut any = vec![0u8; cw * ch];
    let mut not_opaque = vec![1u8; cw * ch];
    let sr = subject.rect;
    for (x, y, p) in subject.rgba.enumerate_pixels() {
        let (px, py) = (sr.x + x, sr.y + y);
        if crop.contains(px, py) {
            let i = (py - crop.y) as usize * cw + (px - crop.x) as usize;
            any[i] = (p.0[3] > 0) as u8;
            not_opaque[i] = (p.0[3] < OPAQUE_MIN) as u8;
        }
    }
    dilate(&mut any, cw, ch, band as usize);
    // Eroding the opaque part = dilating its complement.
    dilate(&mut not_opaque, cw, ch, band as usize);
    let mut mask: Vec<u8> = any
        .iter()
        .zip(&not_opaque)
        .map(|(&a, &n)| if a == 1 && n == 1 { 255 } else { 0 })
        .collect();
    let s = shadow.rect;
    for (x, y, d) in shadow.darkening.enumerate_pixels() {
        let (px, py) = (s.x + x, s.y + y);
        if d.0[0] >= SHADOW_MASK_MIN && crop.contains(px, py) {
            let i = (py - crop.y) as usize * cw + (px - crop.x) as usize;
            // The shadow is repainted, but never the core: restoration puts it back anyway.
            if not_opaque[i] == 1 {
                mask[i] = 255;
            }
        }
    }
    GrayImage::from_raw(crop.width, crop.height, mask).expect("one mask byte per crop pixel")
}

/// Binary dilation of a 0/1 plane by a (2r + 1) square: a pixel is set when any pixel of its
/// window is.
fn dilate(plane: &mut [u8], w: usize, h: usize, r: usize) {
    blur::box_sums_u8(plane, w, h, r, |count| (count > 0) as u8);
}

/// `src` (or its `crop`) resized to `to` with Lanczos3, in sRGB values.
fn resize_rgb(src: &RgbImage, crop: Option<&Rect>, to: (u32, u32)) -> Result<RgbImage> {
    let c = crop.copied().unwrap_or(Rect {
        x: 0,
        y: 0,
        width: src.width(),
        height: src.height(),
    });
    // A copy of the crop: the shared resize takes owned, mutable pixels (crop-sized, 3 bytes a
    // pixel, small beside the photo).
    let row = src.width() as usize * 3;
    let mut pixels = Vec::with_capacity(c.width as usize * c.height as usize * 3);
    for y in c.y..c.bottom() {
        let start = y as usize * row + c.x as usize * 3;
        pixels.extend_from_slice(&src.as_raw()[start..start + c.width as usize * 3]);
    }
    let mut out = vec![0u8; to.0 as usize * to.1 as usize * 3];
    Resize::new(PixelType::U8x3, FilterType::Lanczos3)
        .run(&mut pixels, (c.width, c.height), &mut out, to)
        .context("cannot resize the harmonisation crop")?;
    RgbImage::from_raw(to.0, to.1, out).context("internal error: resized buffer")
}

fn check_scene(scene: &RgbImage, plan: &HarmonizePlan) -> Result<()> {
    ensure!(
        scene.dimensions() == plan.photo_size,
        "the scene is {}x{} but the plan was made for a {}x{} photo",
        scene.width(),
        scene.height(),
        plan.photo_size.0,
        plan.photo_size.1
    );
    Ok(())
}

/// The crop the model sees, at model size. Resized in sRGB values (Lanczos3): the VAE takes
/// sRGB-encoded pixels, as every UI feeds it.
pub fn crop_for_model(scene: &RgbImage, plan: &HarmonizePlan) -> Result<RgbImage> {
    check_scene(scene, plan)?;
    resize_rgb(scene, Some(&plan.crop), plan.model_size)
}

/// The inpainting mask at model size, binary (255 = repaint): a model pixel is set when at
/// least a quarter of the crop pixels it covers are.
pub fn mask_for_model(plan: &HarmonizePlan) -> Result<GrayImage> {
    let (mw, mh) = plan.model_size;
    let mut mask = plan.mask.as_raw().clone();
    let mut out = vec![0u8; mw as usize * mh as usize];
    Resize::new(PixelType::U8, FilterType::Box)
        .run(
            &mut mask,
            (plan.crop.width, plan.crop.height),
            &mut out,
            (mw, mh),
        )
        .context("cannot resize the mask")?;
    for v in out.iter_mut() {
        *v = if *v >= MODEL_MASK_MIN { 255 } else { 0 };
    }
    GrayImage::from_raw(mw, mh, out).context("internal error: mask buffer")
}

/// The harmonised crop (at model size) resized back and blended into `scene` through the
/// feathered mask, in linear light. Outside the crop, and wherever the feathered mask is 0,
/// the result is the scene's bytes; where it is 255, the harmonised pixels'.
pub fn blend_back(
    scene: &RgbImage,
    harmonized: &RgbImage,
    plan: &HarmonizePlan,
) -> Result<RgbImage> {
    check_scene(scene, plan)?;
    ensure!(
        harmonized.dimensions() == plan.model_size,
        "the harmonised crop is {}x{}, not the planned {}x{}",
        harmonized.width(),
        harmonized.height(),
        plan.model_size.0,
        plan.model_size.1
    );
    let c = plan.crop;
    let back = resize_rgb(harmonized, None, (c.width, c.height))?;
    let lin = colour::linear_table();
    let mut out = scene.clone();
    for (x, y, w) in plan.feathered.enumerate_pixels() {
        let w = w.0[0];
        if w == 0 {
            continue;
        }
        let h = back.get_pixel(x, y).0;
        let px = out.get_pixel_mut(c.x + x, c.y + y);
        if w == 255 {
            px.0 = h;
            continue;
        }
        let wf = w as f32 / 255.0;
        for k in 0..3 {
            let mixed = wf * lin[h[k] as usize] + (1.0 - wf) * lin[px.0[k] as usize];
            px.0[k] = colour::to_srgb(mixed);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_sizes_keep_the_aspect_on_the_vae_grid() {
        assert_eq!(model_size(1000, 1000, 512, 8), (512, 512));
        assert_eq!(model_size(1200, 800, 1024, 8), (1024, 680)); // 682.7 -> 85.3 * 8
        assert_eq!(model_size(300, 900, 512, 8), (168, 512)); // 170.7 -> 21.3 * 8
        assert_eq!(model_size(5000, 3, 512, 8), (512, 8));
        assert_eq!(model_size(37, 41, 512, 64), (448, 512)); // 462.0 -> 7.2 * 64
    }

    #[test]
    fn dilation_reaches_exactly_r_in_each_axis() {
        let (w, h) = (11, 9);
        let mut p = vec![0u8; w * h];
        p[4 * w + 5] = 1;
        dilate(&mut p, w, h, 2);
        for y in 0..h {
            for x in 0..w {
                let inside = x.abs_diff(5) <= 2 && y.abs_diff(4) <= 2;
                assert_eq!(p[y * w + x], inside as u8, "at {x},{y}");
            }
        }
    }
}
