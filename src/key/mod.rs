//! Chroma keyer: screen estimation, soft alpha, foreground unmixing/despill, clean-up.
//!
//! Contract used by `tkg generate` and `tkg key` (keep these signatures):
//! - [`KeyOptions::new`] builds default options for a requested key colour.
//! - [`key_rgb8`] keys an 8-bit RGB image; [`key_image`] any decoded image (grey, 16-bit,
//!   with alpha).
//! - [`write_outputs`] / [`output_paths`] write and name the matte, cut-out and extras.
//!
//! The pipeline, one pass each, all single-threaded and linear in the pixel count:
//! 1. [`screen`]: the screen colour from the border ring (robust median, hue-based outlier
//!    rejection, confidence, fallback to the requested colour), the noise level, and a smooth
//!    clean plate fitted to the confidently-screen pixels.
//! 2. [`alpha`]: a raw alpha from a hue-generalised colour difference against the plate,
//!    bounded below by the gamut bound, mapped through clip-black / clip-white thresholds.
//! 3. [`cleanup`]: islands and pinholes by connected components; an optional guided-filter
//!    refinement.
//! 4. [`despill`]: unmixing `F = (C - (1 - a) B) / a` and spill suppression.

pub mod alpha;
pub mod cleanup;
pub mod despill;
pub mod fuse;
pub mod keyability;
pub mod metrics;
pub mod screen;

use crate::color::KeyColor;
use crate::output::{self, Pixels, PngImage};
use anyhow::{Result, bail, ensure};
use image::DynamicImage;
use std::path::{Path, PathBuf};

pub use screen::Plate;

/// The largest image the keyer takes (pixels); it needs about 16 bytes a pixel.
pub const MAX_PIXELS: u64 = 200_000_000;

/// Keyer settings.
#[derive(Debug, Clone)]
pub struct KeyOptions {
    /// The colour the screen was asked to be; the fallback when estimation is poor.
    pub requested: KeyColor,
    /// Use exactly this screen colour instead of estimating it from the border.
    pub screen: Option<[u8; 3]>,
    /// Fit a smooth clean plate (true) or key against one flat colour (false).
    pub fit_plate: bool,
    /// Clip black: raw alpha at or below this is fully transparent (default: from the noise).
    pub clip_black: Option<f32>,
    /// Clip white: raw alpha at or above this is fully opaque (default: from the noise).
    pub clip_white: Option<f32>,
    /// Spill suppression strength, 0 (off) to 1 (full).
    pub despill: f32,
    /// Remove islands and fill pinholes.
    pub cleanup: bool,
    /// Light edge-aware (guided filter) refinement of the soft band.
    pub refine: bool,
}

impl KeyOptions {
    pub fn new(requested: KeyColor) -> Self {
        Self {
            requested,
            screen: None,
            fit_plate: true,
            clip_black: None,
            clip_white: None,
            despill: 1.0,
            cleanup: true,
            refine: false,
        }
    }
}

/// The screen colour found in the image.
#[derive(Debug, Clone)]
pub struct ScreenEstimate {
    /// 0..255 per channel.
    pub rgb: [f32; 3],
    /// 0 (no idea) .. 1 (certain).
    pub confidence: f32,
    /// True when the estimate was poor and the requested colour was used instead.
    pub fell_back: bool,
    /// A human-readable warning when something about the screen is off.
    pub warning: Option<String>,
}

/// The keying result.
#[derive(Debug, Clone)]
pub struct Keyed {
    pub width: u32,
    pub height: u32,
    /// Alpha in [0, 1], row-major.
    pub alpha: Vec<f32>,
    /// Unmixed, despilled straight foreground colour, RGB8 row-major.
    pub foreground: Vec<u8>,
    pub screen: ScreenEstimate,
    /// Fraction of pixels with alpha < 0.5.
    pub background_fraction: f32,
    /// The clean plate the matte was pulled against.
    pub plate: Plate,
    /// Noise sigma measured on the screen (0..255 units).
    pub noise: f32,
    /// The clip-black / clip-white thresholds used (raw-alpha units).
    pub clip: (f32, f32),
    /// What a subject mask changed, when one was fused in ([`fuse`]).
    pub fused: Option<fuse::FuseStats>,
}

/// Output switches for the keyer's files.
#[derive(Debug, Clone, Default)]
pub struct KeyOutputFlags {
    /// Write the matte as 16-bit greyscale instead of 8-bit.
    pub matte16: bool,
    /// Also write `X.premultiplied.png`.
    pub premultiplied: bool,
    /// Also write the clean plate, `X.plate.png`.
    pub clean_plate: bool,
    /// Also write `X.composite.png`: the cut-out over this background, resized to cover.
    pub composite: Option<PathBuf>,
}

/// Reads an image to key: JPEG, PNG or WebP, EXIF orientation applied, size bounded, with a
/// one-line error naming the file on failure.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    crate::photo::load_image(path, "image")
}

/// Keys any decoded image: greyscale and 16-bit images are keyed through 8-bit RGB; an
/// existing alpha channel is kept (the result's alpha is the product of both).
pub fn key_image(img: &DynamicImage, opts: &KeyOptions) -> Result<Keyed> {
    let rgb = img.to_rgb8();
    let mut keyed = key_rgb8(img.width(), img.height(), rgb.as_raw(), opts)?;
    if img.color().has_alpha() {
        let a = img.to_luma_alpha32f();
        let mut bg = 0usize;
        for (k, p) in keyed.alpha.iter_mut().zip(a.pixels()) {
            *k *= p.0[1].clamp(0.0, 1.0);
            if *k < 0.5 {
                bg += 1;
            }
        }
        keyed.background_fraction = bg as f32 / keyed.alpha.len().max(1) as f32;
    }
    Ok(keyed)
}

/// Keys an 8-bit RGB image (row-major, 3 bytes a pixel).
pub fn key_rgb8(width: u32, height: u32, rgb: &[u8], opts: &KeyOptions) -> Result<Keyed> {
    let (w, h) = (width as usize, height as usize);
    ensure!(
        w > 0 && h > 0,
        "cannot key an empty ({width}x{height}) image"
    );
    let n64 = width as u64 * height as u64;
    ensure!(
        n64 <= MAX_PIXELS,
        "image is too large to key ({width}x{height} = {} megapixels; the limit is {})",
        n64 / 1_000_000,
        MAX_PIXELS / 1_000_000
    );
    let n = w * h;
    ensure!(
        rgb.len() == n * 3,
        "image buffer does not match its size ({} bytes for {width}x{height} RGB)",
        rgb.len()
    );
    for (name, v) in [
        ("clip black", opts.clip_black),
        ("clip white", opts.clip_white),
    ] {
        if let Some(v) = v
            && !(0.0..=1.0).contains(&v)
        {
            bail!("{name} must be between 0 and 1, got {v}");
        }
    }
    if let (Some(lo), Some(hi)) = (opts.clip_black, opts.clip_white) {
        ensure!(
            hi > lo,
            "clip white ({hi}) must be greater than clip black ({lo})"
        );
    }
    ensure!(
        (0.0..=1.0).contains(&opts.despill),
        "despill must be between 0 and 1, got {}",
        opts.despill
    );

    // 1. Screen and plate.
    let requested = opts.requested.rgb.map(|v| v as f32);
    let name = opts.requested.to_string();
    let (mut screen, noise) = screen::estimate(w, h, rgb, requested, &name);
    if let Some(s) = opts.screen {
        screen = ScreenEstimate {
            rgb: s.map(|v| v as f32),
            confidence: 1.0,
            fell_back: false,
            warning: None,
        };
    }
    let plate = if opts.fit_plate {
        screen::fit_plate(w, h, rgb, screen.rgb, noise)
    } else {
        Plate::constant(w, h, screen.rgb)
    };

    // 2. Alpha.
    let mut ramp = alpha::default_ramp(noise, screen.rgb);
    if let Some(lo) = opts.clip_black {
        ramp.lo = lo;
        ramp.hi = ramp.hi.max(lo + 0.01);
    }
    if let Some(hi) = opts.clip_white {
        ramp.hi = hi;
        ramp.lo = ramp.lo.min(hi - 0.01);
    }
    let margin = 2.0 * noise + 1.0;
    let mut raw = vec![0f32; n];
    let mut solid = vec![0u8; n];
    let mut prow = alpha::PlateRow::default();
    for y in 0..h {
        prow.fill(&plate, y);
        let row = &rgb[y * w * 3..(y + 1) * w * 3];
        let rrow = &mut raw[y * w..(y + 1) * w];
        let srow = &mut solid[y * w..(y + 1) * w];
        alpha::raw_alpha_row(row, &prow, margin, ramp.hi, rrow, srow);
    }
    alpha::promote_solid_cores(w, h, rgb, &solid, 4.0 * noise + 4.0, &mut raw);
    drop(solid);
    let mut a: Vec<f32> = raw.iter().map(|&r| ramp.apply(r)).collect();
    alpha::project_edges(w, h, rgb, &plate, &raw, &mut a, ramp, noise);

    // 3. Clean-up.
    if opts.cleanup {
        let params = cleanup::CleanupParams::for_size(n);
        cleanup::remove_islands(w, h, &mut a, &params);
        let tol = (6.0 * noise).max(20.0);
        let plate_ref = &plate;
        let dist = |i: usize| {
            let (x, y) = (i % w, i / w);
            let b = plate_ref.at(x, y);
            let c = screen::px(rgb, i);
            screen::norm([c[0] - b[0], c[1] - b[1], c[2] - b[2]])
        };
        cleanup::fill_pinholes(w, h, &mut a, &dist, tol, &params);
    }
    if opts.refine {
        let guide: Vec<f32> = raw.iter().map(|r| r.clamp(-0.5, 1.5)).collect();
        cleanup::refine(w, h, &mut a, &guide);
    }
    drop(raw);

    // 4. Foreground.
    let mut foreground = vec![0u8; n * 3];
    let mut bg = 0usize;
    for y in 0..h {
        let arow = &a[y * w..(y + 1) * w];
        bg += arow.iter().filter(|&&v| v < 0.5).count();
        if arow.iter().all(|&v| v <= 0.0) {
            // Fully clear: the colour is never seen; leave it black.
            continue;
        }
        prow.fill(&plate, y);
        let crow = &rgb[y * w * 3..(y + 1) * w * 3];
        let frow = &mut foreground[y * w * 3..(y + 1) * w * 3];
        prow.for_each(|x, p| {
            let av = arow[x];
            if av <= 0.0 {
                return;
            }
            let c = [
                crow[3 * x] as f32,
                crow[3 * x + 1] as f32,
                crow[3 * x + 2] as f32,
            ];
            frow[3 * x..3 * x + 3].copy_from_slice(&despill::foreground(
                c,
                av,
                p.b,
                p.u,
                p.inv_m,
                opts.despill,
            ));
        });
    }
    let background_fraction = bg as f32 / n as f32;
    if background_fraction < 0.002 {
        let msg = format!(
            "no {} screen found: nothing was keyed out (is the key colour right?)",
            name
        );
        screen.warning = Some(match screen.warning.take() {
            Some(w) => format!("{w}; {msg}"),
            None => msg,
        });
    }
    Ok(Keyed {
        width,
        height,
        alpha: a,
        foreground,
        screen,
        background_fraction,
        plate,
        noise,
        clip: (ramp.lo, ramp.hi),
        fused: None,
    })
}

/// The files [`write_outputs`] writes for main image `out`.
pub fn output_paths(out: &Path, flags: &KeyOutputFlags) -> Vec<PathBuf> {
    let mut v = vec![
        output::sibling(out, "matte"),
        output::sibling(out, "cutout"),
    ];
    if flags.premultiplied {
        v.push(output::sibling(out, "premultiplied"));
    }
    if flags.clean_plate {
        v.push(output::sibling(out, "plate"));
    }
    if flags.composite.is_some() {
        v.push(output::sibling(out, "composite"));
    }
    v
}

/// Straight RGBA8 from a keying result.
pub fn cutout_rgba8(keyed: &Keyed) -> Vec<u8> {
    keyed
        .foreground
        .chunks_exact(3)
        .zip(&keyed.alpha)
        .flat_map(|(p, &a)| [p[0], p[1], p[2], alpha8(a)])
        .collect()
}

#[inline]
fn alpha8(a: f32) -> u8 {
    (a.clamp(0.0, 1.0) * 255.0 + 0.5) as u8
}

/// Premultiplied RGBA8 (colour times the 8-bit alpha, as a viewer would).
pub fn premultiplied_rgba8(keyed: &Keyed) -> Vec<u8> {
    keyed
        .foreground
        .chunks_exact(3)
        .zip(&keyed.alpha)
        .flat_map(|(p, &a)| {
            let a8 = alpha8(a);
            let m = |v: u8| ((v as u32 * a8 as u32 + 127) / 255) as u8;
            [m(p[0]), m(p[1]), m(p[2]), a8]
        })
        .collect()
}

/// The cut-out composited over `bg` (RGB8 of the same size).
pub fn composite_over(keyed: &Keyed, bg: &[u8]) -> Vec<u8> {
    keyed
        .foreground
        .chunks_exact(3)
        .zip(&keyed.alpha)
        .zip(bg.chunks_exact(3))
        .flat_map(|((f, &a), b)| {
            let a = a.clamp(0.0, 1.0);
            let mix = |k: usize| (f[k] as f32 * a + b[k] as f32 * (1.0 - a) + 0.5) as u8;
            [mix(0), mix(1), mix(2)]
        })
        .collect()
}

/// Loads a background and resizes it to cover `width` x `height` (centre crop, Lanczos3).
pub fn load_background(path: &Path, width: u32, height: u32) -> Result<Vec<u8>> {
    use crate::resize::{FilterType, Fit, PixelType, Resize};
    let img = crate::photo::load_image(path, "composite background")?.to_rgb8();
    let from = img.dimensions();
    let cover = Resize {
        fit: Fit::Cover,
        ..Resize::new(PixelType::U8x3, FilterType::Lanczos3)
    };
    cover.to_vec(img.into_raw(), from, (width, height))
}

/// Checks that the composite background (if any) can be read, before any expensive work.
pub fn check_output_flags(flags: &KeyOutputFlags) -> Result<()> {
    if let Some(bg) = &flags.composite {
        crate::photo::probe(bg, "composite background")?;
    }
    Ok(())
}

/// Writes the matte and the cut-out next to `out`; returns the paths written.
pub fn write_outputs(
    out: &Path,
    keyed: &Keyed,
    flags: &KeyOutputFlags,
    text: &[(String, String)],
    overwrite: bool,
) -> Result<Vec<PathBuf>> {
    let paths = output_paths(out, flags);
    let (width, height) = (keyed.width, keyed.height);
    // Everything that can fail before writing (the background) is done first, so that a
    // failure leaves no partial set of files behind.
    let background = match &flags.composite {
        Some(p) => Some(load_background(p, width, height)?),
        None => None,
    };
    fn png<'a>(k: &Keyed, pixels: Pixels<'a>, text: &'a [(String, String)]) -> PngImage<'a> {
        PngImage {
            width: k.width,
            height: k.height,
            pixels,
            text,
        }
    }
    let mut written = Vec::new();
    let mut it = paths.iter();
    let matte_path = it.next().expect("matte path");
    if flags.matte16 {
        let m: Vec<u16> = keyed
            .alpha
            .iter()
            .map(|a| (a.clamp(0.0, 1.0) * 65535.0 + 0.5) as u16)
            .collect();
        output::write_png(matte_path, &png(keyed, Pixels::Gray16(&m), text), overwrite)?;
    } else {
        let m: Vec<u8> = keyed.alpha.iter().map(|&a| alpha8(a)).collect();
        output::write_png(matte_path, &png(keyed, Pixels::Gray8(&m), text), overwrite)?;
    }
    written.push(matte_path.clone());
    let cut_path = it.next().expect("cutout path");
    output::write_png(
        cut_path,
        &png(keyed, Pixels::Rgba8(&cutout_rgba8(keyed)), text),
        overwrite,
    )?;
    written.push(cut_path.clone());
    if flags.premultiplied {
        let p = it.next().expect("premultiplied path");
        output::write_png(
            p,
            &png(keyed, Pixels::Rgba8(&premultiplied_rgba8(keyed)), text),
            overwrite,
        )?;
        written.push(p.clone());
    }
    if flags.clean_plate {
        let p = it.next().expect("plate path");
        output::write_png(
            p,
            &png(keyed, Pixels::Rgb8(&keyed.plate.to_rgb8()), text),
            overwrite,
        )?;
        written.push(p.clone());
    }
    if let Some(bg) = background {
        let p = it.next().expect("composite path");
        output::write_png(
            p,
            &png(keyed, Pixels::Rgb8(&composite_over(keyed, &bg)), text),
            overwrite,
        )?;
        written.push(p.clone());
    }
    Ok(written)
}

#[cfg(test)]
mod tests;
