//! The photo and mask of an img2img or inpainting job, read and brought to the image's size
//! as diffusers' image processors do (a Lanczos resize to exactly the size; the mask as
//! luma, binarised later by the pipeline).

use crate::resize::{FilterType, PixelType, Resize};
use crate::settings::Size;
use anyhow::{Context, Result, ensure};
use image::RgbImage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Photos and masks already read for a run's jobs, so that many seeds of one photo decode it
/// once and share one buffer at the image's size. Only the last full-size photo is kept.
#[derive(Default)]
pub struct SourceCache {
    last: Option<(PathBuf, Arc<RgbImage>)>,
    resized: HashMap<(PathBuf, Size), Arc<Vec<u8>>>,
    masks: HashMap<(PathBuf, PathBuf, Size), Arc<Vec<u8>>>,
}

impl SourceCache {
    /// The photo at `path`, upright, full size.
    pub fn photo(&mut self, path: &Path) -> Result<Arc<RgbImage>> {
        if let Some((p, img)) = &self.last
            && p == path
        {
            return Ok(img.clone());
        }
        let img = Arc::new(load_rgb(path)?);
        self.last = Some((path.to_path_buf(), img.clone()));
        Ok(img)
    }

    /// The photo at `path` (already read as `photo`) at `size`.
    pub fn resized(&mut self, path: &Path, photo: &RgbImage, size: Size) -> Result<Arc<Vec<u8>>> {
        let key = (path.to_path_buf(), size);
        if let Some(v) = self.resized.get(&key) {
            return Ok(v.clone());
        }
        let v = Arc::new(resized_rgb8(photo, size)?);
        self.resized.insert(key, v.clone());
        Ok(v)
    }

    /// The mask at `mask` for the photo at `path` (read as `photo`), at `size`.
    pub fn mask(
        &mut self,
        mask: &Path,
        path: &Path,
        photo: &RgbImage,
        size: Size,
    ) -> Result<Arc<Vec<u8>>> {
        let key = (mask.to_path_buf(), path.to_path_buf(), size);
        if let Some(v) = self.masks.get(&key) {
            return Ok(v.clone());
        }
        let v = Arc::new(load_mask(mask, photo, size)?);
        self.masks.insert(key, v.clone());
        Ok(v)
    }
}

/// The photo as RGB8 (EXIF orientation applied, alpha dropped).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(crate::photo::load_photo(path)
        .with_context(|| format!("cannot use {} as --init-image", path.display()))?
        .rgb)
}

/// The photo resized to `size` (Lanczos3, the aspect not kept: diffusers stretches too),
/// RGB8 row-major.
pub fn resized_rgb8(photo: &RgbImage, size: Size) -> Result<Vec<u8>> {
    resize(
        photo.width(),
        photo.height(),
        photo.as_raw().clone(),
        PixelType::U8x3,
        size,
    )
}

/// The mask at `size` as luma (PIL's "L": ITU-R 601 weights, rounded, as diffusers reads
/// it), or as its alpha when it has transparency (strokes painted on a transparent layer),
/// after checks that need no model: its aspect must be the photo's, and it must be neither
/// empty nor full once binarised.
pub fn load_mask(path: &Path, photo: &RgbImage, size: Size) -> Result<Vec<u8>> {
    let img = crate::photo::load_photo(path)
        .with_context(|| format!("cannot use {} as --mask", path.display()))?;
    let (mw, mh) = (img.width(), img.height());
    let (pw, ph) = (photo.width(), photo.height());
    ensure!(
        crate::photo::same_aspect((mw, mh), (pw, ph)),
        "mask {} is {mw}x{mh}, a different aspect from the init image's {pw}x{ph}",
        path.display()
    );
    let luma = match &img.alpha {
        Some(a) if a.as_raw().iter().any(|&v| v != 255) => a.as_raw().clone(),
        _ => luma8(&img.rgb),
    };
    let mask = resize(mw, mh, luma, PixelType::U8, size)?;
    let repaint = mask.iter().filter(|&&v| v >= 128).count();
    ensure!(
        repaint > 0,
        "mask {} is empty: nothing is white, so nothing would be repainted",
        path.display()
    );
    ensure!(
        repaint < mask.len(),
        "mask {} is white everywhere: nothing of the photo would be kept; drop --mask for img2img",
        path.display()
    );
    Ok(mask)
}

/// PIL's RGB to L: `(R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16`.
fn luma8(rgb: &RgbImage) -> Vec<u8> {
    rgb.pixels()
        .map(|p| {
            let [r, g, b] = p.0.map(u32::from);
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

/// `pixels` (`width` x `height`) at `size`, with Lanczos3 as diffusers (PIL) resizes.
fn resize(
    width: u32,
    height: u32,
    pixels: Vec<u8>,
    kind: PixelType,
    size: Size,
) -> Result<Vec<u8>> {
    Resize::new(kind, FilterType::Lanczos3).to_vec(
        pixels,
        (width, height),
        (size.width as u32, size.height as u32),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_is_pils() {
        let img = RgbImage::from_raw(3, 1, vec![255, 255, 255, 255, 0, 0, 10, 200, 30]).unwrap();
        // PIL: Image.new("RGB", ...).convert("L") gives 255, 76, 124 for these.
        assert_eq!(luma8(&img), [255, 76, 124]);
    }
}
