//! Every image resize in tkg (init images, masks, composite backgrounds, placement) goes
//! through [`Resize::run`], with `fr::images::Image` in and out: fast_image_resize's generic
//! code is compiled anew for each pair of image types, at minutes of CPU each in a dev build,
//! so one pair serves all.

use anyhow::{Context, Result};
use fast_image_resize as fr;

pub use fr::{FilterType, PixelType};

/// How the source maps onto the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The whole source onto the whole target, aspect not kept (as diffusers' processors do).
    Stretch,
    /// Centre-cropped to the target's aspect, then scaled to cover it.
    Cover,
}

/// A resize of one pixel layout with one filter.
#[derive(Debug, Clone, Copy)]
pub struct Resize {
    pub kind: PixelType,
    pub filter: FilterType,
    pub fit: Fit,
}

impl Resize {
    /// Stretches with `filter`.
    pub fn new(kind: PixelType, filter: FilterType) -> Self {
        Self {
            kind,
            filter,
            fit: Fit::Stretch,
        }
    }

    /// Resizes `src` (`from`, row-major in `kind`'s layout) into `dst` (`to`). Alpha, if the
    /// layout has any, is filtered like any channel: premultiplying is the caller's.
    pub fn run(
        &self,
        src: &mut [u8],
        from: (u32, u32),
        dst: &mut [u8],
        to: (u32, u32),
    ) -> Result<()> {
        let src = fr::images::Image::from_slice_u8(from.0, from.1, src, self.kind)
            .context("internal error: resize source buffer")?;
        let mut dst = fr::images::Image::from_slice_u8(to.0, to.1, dst, self.kind)
            .context("internal error: resize target buffer")?;
        let mut options = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(self.filter))
            .use_alpha(false);
        if self.fit == Fit::Cover {
            options = options.fit_into_destination(Some((0.5, 0.5)));
        }
        fr::Resizer::new()
            .resize(&src, &mut dst, &options)
            .context("resizing failed")?;
        Ok(())
    }

    /// `pixels` (`from`) resized to `to`, or returned as they are when the size is already `to`.
    pub fn to_vec(&self, mut pixels: Vec<u8>, from: (u32, u32), to: (u32, u32)) -> Result<Vec<u8>> {
        if from == to {
            return Ok(pixels);
        }
        let mut out = vec![0u8; to.0 as usize * to.1 as usize * self.kind.size()];
        self.run(&mut pixels, from, &mut out, to)?;
        Ok(out)
    }
}

/// A zeroed byte buffer whose usable part starts 8-byte aligned, as fast_image_resize wants
/// for 16-bit pixels (a `Vec<u8>` promises no alignment).
pub struct AlignedBytes {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBytes {
    pub fn zeroed(len: usize) -> Self {
        let buf = vec![0u8; len + 8];
        let start = buf.as_ptr().align_offset(8).min(8);
        Self { buf, start, len }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_same_sized_image_is_kept_and_other_sizes_are_reached() {
        let v: Vec<u8> = (0..4 * 2 * 3).map(|i| i as u8 * 10).collect();
        let r = Resize::new(PixelType::U8x3, FilterType::Lanczos3);
        assert_eq!(r.to_vec(v.clone(), (4, 2), (4, 2)).unwrap(), v);
        let up = r.to_vec(v.clone(), (4, 2), (8, 4)).unwrap();
        assert_eq!(up.len(), 8 * 4 * 3);
        assert_ne!(up[..3], up[up.len() - 3..]);
    }

    #[test]
    fn cover_crops_the_centre_instead_of_stretching() {
        // 4x1: black, white, white, black. Covering 1x1 takes the middle half: white.
        let v = vec![0, 255, 255, 0];
        let cover = Resize {
            fit: Fit::Cover,
            ..Resize::new(PixelType::U8, FilterType::Box)
        };
        let stretch = Resize::new(PixelType::U8, FilterType::Box);
        assert_eq!(cover.to_vec(v.clone(), (4, 1), (2, 2)).unwrap(), [255; 4]);
        assert!(stretch.to_vec(v, (4, 1), (2, 2)).unwrap()[0] < 200);
    }

    #[test]
    fn aligned_bytes_are_aligned_and_sized() {
        for len in [0, 1, 7, 64] {
            let mut b = AlignedBytes::zeroed(len);
            assert_eq!(b.bytes_mut().len(), len);
            assert_eq!(b.bytes_mut().as_ptr() as usize % 8, 0);
        }
    }
}
