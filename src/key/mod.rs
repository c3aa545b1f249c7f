//! Chroma keyer: screen estimation, soft alpha, foreground unmixing/despill, clean-up.
//!
//! Contract used by `tkg generate` and `tkg key` (keep these signatures):
//! - [`KeyOptions::new`] builds default options for a requested key colour.
//! - [`key_rgb8`] keys an 8-bit RGB image.
//! - [`write_outputs`] / [`output_paths`] write and name the matte, cut-out and extras.

use crate::color::KeyColor;
use crate::output::{self, Pixels, PngImage};
use anyhow::Result;
use std::path::{Path, PathBuf};

/// Keyer settings.
#[derive(Debug, Clone)]
pub struct KeyOptions {
    /// The colour the screen was asked to be; the fallback when estimation is poor.
    pub requested: KeyColor,
}

impl KeyOptions {
    pub fn new(requested: KeyColor) -> Self {
        Self { requested }
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
}

/// Output switches for the keyer's files.
#[derive(Debug, Clone, Default)]
pub struct KeyOutputFlags {}

/// Keys an 8-bit RGB image (row-major, 3 bytes a pixel).
pub fn key_rgb8(width: u32, height: u32, rgb: &[u8], opts: &KeyOptions) -> Result<Keyed> {
    let n = width as usize * height as usize;
    anyhow::ensure!(rgb.len() == n * 3, "image buffer does not match its size");
    let key = opts.requested.rgb.map(|v| v as f32);
    let mut alpha = Vec::with_capacity(n);
    for p in rgb.chunks_exact(3) {
        let d = ((p[0] as f32 - key[0]).powi(2)
            + (p[1] as f32 - key[1]).powi(2)
            + (p[2] as f32 - key[2]).powi(2))
        .sqrt();
        alpha.push(((d - 60.0) / 80.0).clamp(0.0, 1.0));
    }
    let background_fraction = alpha.iter().filter(|&&a| a < 0.5).count() as f32 / n.max(1) as f32;
    Ok(Keyed {
        width,
        height,
        alpha,
        foreground: rgb.to_vec(),
        screen: ScreenEstimate {
            rgb: key,
            confidence: 0.0,
            fell_back: true,
            warning: None,
        },
        background_fraction,
    })
}

/// The files [`write_outputs`] writes for main image `out`.
pub fn output_paths(out: &Path, _flags: &KeyOutputFlags) -> Vec<PathBuf> {
    vec![
        output::sibling(out, "matte"),
        output::sibling(out, "cutout"),
    ]
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
    let matte: Vec<u8> = keyed
        .alpha
        .iter()
        .map(|a| (a * 255.0).round() as u8)
        .collect();
    output::write_png(
        &paths[0],
        &PngImage {
            width: keyed.width,
            height: keyed.height,
            pixels: Pixels::Gray8(&matte),
            text,
        },
        overwrite,
    )?;
    let rgba: Vec<u8> = keyed
        .foreground
        .chunks_exact(3)
        .zip(&matte)
        .flat_map(|(p, &a)| [p[0], p[1], p[2], a])
        .collect();
    output::write_png(
        &paths[1],
        &PngImage {
            width: keyed.width,
            height: keyed.height,
            pixels: Pixels::Rgba8(&rgba),
            text,
        },
        overwrite,
    )?;
    Ok(paths)
}
