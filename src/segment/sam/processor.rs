//! transformers' `SamProcessor` / `SamImageProcessor`: the longest side resized to
//! `longest_edge` (PIL bilinear on 8 bits), rescaled by 1/255, ImageNet-normalised, padded with
//! zeros at the bottom and right; prompt coordinates scaled the same way; the low-resolution
//! mask logits upscaled to the padded input, cropped, resized to the image and thresholded.

use super::config::ProcessorConfig;
use super::prompt_encoder::{ModelPrompt, PointLabel};
use crate::segment::Prompt;
use anyhow::{Result, bail, ensure};
use candle_core::{Device, Tensor};
use image::RgbImage;

/// transformers' `_get_preprocess_shape`: (height, width) with the longest side at
/// `longest`, each side rounded half up.
pub fn preprocess_shape((h, w): (usize, usize), longest: usize) -> (usize, usize) {
    let scale = longest as f64 / h.max(w) as f64;
    let round = |v: usize| (v as f64 * scale + 0.5) as usize;
    (round(h), round(w))
}

/// The processor's output for one image.
#[derive(Debug)]
pub struct Processed {
    /// [1, 3, H, W]: the padded network input.
    pub pixels: Tensor,
    /// The image's (height, width).
    pub original: (usize, usize),
    /// The resized image's (height, width), before padding.
    pub reshaped: (usize, usize),
}

impl ProcessorConfig {
    /// The resized image's (height, width) for an image of `original` (height, width).
    pub fn reshaped(&self, original: (usize, usize)) -> (usize, usize) {
        match self.longest_edge {
            Some(n) => preprocess_shape(original, n),
            None => original,
        }
    }

    /// The image, resized with PIL's bilinear filter, as RGB8.
    pub fn resize(&self, image: &RgbImage) -> Result<(Vec<u8>, (usize, usize))> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        ensure!(w > 0 && h > 0, "cannot segment an empty image");
        let (nh, nw) = self.reshaped((h, w));
        ensure!(
            nh > 0 && nw > 0,
            "a {w}x{h} image resizes to nothing at a longest side of {}",
            self.longest_edge.unwrap_or(0)
        );
        Ok((
            pil_bilinear_rgb8(image.as_raw(), (w, h), (nw, nh)),
            (nh, nw),
        ))
    }

    /// Rescale, normalise and pad resized RGB8 pixels into [1, 3, H, W], in f32 as numpy
    /// computes it (the rescale in f64, cast, then `(x - mean) / std` in f32).
    pub fn normalize(
        &self,
        resized: &[u8],
        (h, w): (usize, usize),
        device: &Device,
    ) -> Result<Tensor> {
        ensure!(
            resized.len() == 3 * h * w,
            "the resized image must be {w}x{h} RGB"
        );
        let (ph, pw) = self.pad.unwrap_or((h, w));
        ensure!(
            ph >= h && pw >= w,
            "the resized image {w}x{h} is larger than the pad size {pw}x{ph}"
        );
        let plane = ph * pw;
        let mut data = vec![0f32; 3 * plane];
        for y in 0..h {
            for x in 0..w {
                for c in 0..3 {
                    let v = resized[(y * w + x) * 3 + c];
                    let mut f = match self.rescale {
                        Some(s) => (v as f64 * s) as f32,
                        None => v as f32,
                    };
                    if let Some((mean, std)) = &self.normalize {
                        f = (f - mean[c]) / std[c];
                    }
                    data[c * plane + y * pw + x] = f;
                }
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, ph, pw), device)?)
    }

    /// The whole image path.
    pub fn preprocess(&self, image: &RgbImage, device: &Device) -> Result<Processed> {
        let (resized, reshaped) = self.resize(image)?;
        Ok(Processed {
            pixels: self.normalize(&resized, reshaped, device)?,
            original: (image.height() as usize, image.width() as usize),
            reshaped,
        })
    }

    /// A prompt in image pixels to the model's input pixels (transformers'
    /// `_normalize_coordinates`: x by new_w / old_w, y by new_h / old_h, in f64; boxes are
    /// first rounded to f32, as the processor does). Points and boxes must lie in the image.
    pub fn transform_prompt(
        &self,
        prompt: &Prompt,
        original: (usize, usize),
    ) -> Result<ModelPrompt> {
        let (oh, ow) = original;
        let (nh, nw) = self.reshaped(original);
        let (sx, sy) = (nw as f64 / ow as f64, nh as f64 / oh as f64);
        let inside = |what: &str, x: f32, y: f32| -> Result<()> {
            if !(x.is_finite() && y.is_finite()) {
                bail!("{what} ({x}, {y}) is not a number");
            }
            if x < 0.0 || y < 0.0 || x > ow as f32 || y > oh as f32 {
                bail!("{what} ({x}, {y}) lies outside the {ow}x{oh} image");
            }
            Ok(())
        };
        let mut points = Vec::new();
        for (list, label, what) in [
            (&prompt.points, PointLabel::Positive, "point"),
            (
                &prompt.negative_points,
                PointLabel::Negative,
                "negative point",
            ),
        ] {
            for &[x, y] in list {
                inside(what, x, y)?;
                points.push((x as f64 * sx, y as f64 * sy, label));
            }
        }
        let bbox = match prompt.bbox {
            Some([x0, y0, x1, y1]) => {
                inside("box corner", x0, y0)?;
                inside("box corner", x1, y1)?;
                ensure!(
                    x1 > x0 && y1 > y0,
                    "the box {x0},{y0},{x1},{y1} is empty: give x0,y0,x1,y1 with x1 > x0, y1 > y0"
                );
                Some([
                    x0 as f64 * sx,
                    y0 as f64 * sy,
                    x1 as f64 * sx,
                    y1 as f64 * sy,
                ])
            }
            None => None,
        };
        ensure!(
            !points.is_empty() || bbox.is_some(),
            "SAM needs a prompt: at least one point or a box"
        );
        Ok(ModelPrompt { points, bbox })
    }

    /// transformers' `post_process_masks` for one mask's logits (`side` x `side`, row-major):
    /// bilinear up to the pad size, cropped to the resized image, bilinear to the image size
    /// (torch's `F.interpolate`, align_corners=False). The result is logits at the image's
    /// size; threshold at 0 for the mask.
    pub fn upscale_logits(
        &self,
        logits: &[f32],
        (lh, lw): (usize, usize),
        reshaped: (usize, usize),
        original: (usize, usize),
    ) -> Result<Vec<f32>> {
        ensure!(logits.len() == lh * lw, "mask logits must be {lw}x{lh}");
        let (ph, pw) = self.pad.unwrap_or(reshaped);
        ensure!(
            reshaped.0 <= ph && reshaped.1 <= pw,
            "the resized image is larger than the pad size"
        );
        let padded = bilinear(logits, (lh, lw), (ph, pw));
        let (rh, rw) = reshaped;
        let mut crop = Vec::with_capacity(rh * rw);
        for y in 0..rh {
            crop.extend_from_slice(&padded[y * pw..y * pw + rw]);
        }
        Ok(bilinear(&crop, (rh, rw), original))
    }
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` for its bilinear ("triangle") filter along one axis, then
/// `normalize_coeffs_8bpc`: for each output index the first source index and the
/// fixed-point weights. Pillow widens the filter by the scale when reducing (antialiasing).
fn pil_coeffs(input: usize, output: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = input as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle's support is 1
    (0..output)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let ss = 1.0 / filterscale;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * ss).abs();
                    if t < 1.0 { 1.0 - t } else { 0.0 }
                })
                .collect();
            let sum: f64 = w.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let k = w
                .iter()
                .map(|&v| {
                    let v = if sum != 0.0 { v / sum } else { v };
                    // C's (int) of ±0.5 + v · 2^22: rounded half away from zero.
                    if v < 0.0 {
                        (-0.5 + v * one).trunc() as i32
                    } else {
                        (0.5 + v * one).trunc() as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

/// Pillow's `Image.resize(size, Image.BILINEAR)` of an RGB8 image (`ImagingResample`):
/// a horizontal pass, then a vertical one, each skipped when its size does not change, in
/// Pillow's fixed point, so the result is Pillow's to the bit.
pub fn pil_bilinear_rgb8(src: &[u8], (w, h): (usize, usize), (nw, nh): (usize, usize)) -> Vec<u8> {
    let clip = |ss: i32| (ss >> PRECISION_BITS).clamp(0, 255) as u8;
    let half = 1i32 << (PRECISION_BITS - 1);
    let horizontal = if nw != w {
        let coeffs = pil_coeffs(w, nw);
        let mut out = vec![0u8; h * nw * 3];
        for y in 0..h {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            for (x, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let mut ss = half;
                    for (i, &kv) in k.iter().enumerate() {
                        ss += row[(xmin + i) * 3 + c] as i32 * kv;
                    }
                    out[(y * nw + x) * 3 + c] = clip(ss);
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    if nh == h {
        return horizontal;
    }
    let coeffs = pil_coeffs(h, nh);
    let mut out = vec![0u8; nh * nw * 3];
    for (y, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..nw * 3 {
            let mut ss = half;
            for (i, &kv) in k.iter().enumerate() {
                ss += horizontal[(ymin + i) * nw * 3 + x] as i32 * kv;
            }
            out[y * nw * 3 + x] = clip(ss);
        }
    }
    out
}

/// torch's `F.interpolate(mode="bilinear", align_corners=False)` without antialiasing, on
/// one row-major f32 plane, in f32 as its CPU kernel computes it.
pub fn bilinear(src: &[f32], (ih, iw): (usize, usize), (oh, ow): (usize, usize)) -> Vec<f32> {
    // For each output index along an axis: the two source indices and their weights.
    let axis = |input: usize, output: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = input as f32 / output as f32;
        (0..output)
            .map(|o| {
                let real = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (real as usize).min(input - 1);
                let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
                let l1 = (real - i0 as f32).min(1.0);
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let ys = axis(ih, oh);
    let xs = axis(iw, ow);
    let mut out = Vec::with_capacity(oh * ow);
    for &(y0, y1, h0, h1) in &ys {
        for &(x0, x1, w0, w1) in &xs {
            let top = w0 * src[y0 * iw + x0] + w1 * src[y0 * iw + x1];
            let bottom = w0 * src[y1 * iw + x0] + w1 * src[y1 * iw + x1];
            out.push(h0 * top + h1 * bottom);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_side_is_scaled_and_rounded_half_up() {
        assert_eq!(preprocess_shape((37, 50), 64), (47, 64));
        assert_eq!(preprocess_shape((83, 120), 64), (44, 64));
        assert_eq!(preprocess_shape((1500, 2250), 1024), (683, 1024));
        assert_eq!(preprocess_shape((1024, 1024), 1024), (1024, 1024));
    }

    #[test]
    fn bilinear_matches_torch_on_a_small_case() {
        // torch: F.interpolate(tensor([[[[0., 1.], [2., 3.]]]]), (4, 4), mode="bilinear")
        let up = bilinear(&[0.0, 1.0, 2.0, 3.0], (2, 2), (4, 4));
        let want = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        for (a, b) in up.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{up:?}");
        }
        // Downscaling without antialias: (4 -> 2) samples between the source pixels.
        let down = bilinear(&[0.0, 1.0, 2.0, 3.0], (1, 4), (1, 2));
        assert_eq!(down, vec![0.5, 2.5]);
    }

    #[test]
    fn prompts_outside_the_image_are_refused() {
        let cfg = ProcessorConfig::default();
        let p = Prompt {
            points: vec![[10.0, 120.0]],
            ..Default::default()
        };
        let e = cfg
            .transform_prompt(&p, (100, 200))
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the 200x100 image"), "{e}");
        let p = Prompt {
            bbox: Some([50.0, 10.0, 20.0, 30.0]),
            ..Default::default()
        };
        let e = cfg
            .transform_prompt(&p, (100, 200))
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
        let e = cfg
            .transform_prompt(&Prompt::default(), (100, 200))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one point"), "{e}");
        let p = Prompt {
            negative_points: vec![[f32::NAN, 1.0]],
            ..Default::default()
        };
        assert!(cfg.transform_prompt(&p, (100, 200)).is_err());
        // 200x100 at 1024: x by 1024/200, y by 512/100.
        let p = Prompt {
            points: vec![[100.0, 50.0]],
            ..Default::default()
        };
        let m = cfg.transform_prompt(&p, (100, 200)).unwrap();
        assert_eq!(m.points, vec![(512.0, 256.0, PointLabel::Positive)]);
    }
}
