//! `tkg segment`: a subject mask from a segmentation model (U²-Net, or SAM with points and a
//! box).

use super::Ui;
use super::stdio::outln;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use tkg::output::{self, Pixels, PngImage};
use tkg::segment::sam::SamModel;
use tkg::segment::{Prompt, SegmentSource, Segmenter, SubjectMask};

#[derive(Debug, Args)]
pub struct SegmentArgs {
    /// The image to segment (JPEG, PNG or WebP).
    pub image: PathBuf,
    /// u2netp, u2net, silueta (rembg's files, found in $U2NET_HOME, then ~/.u2net),
    /// tiny-u2net (built in, random weights), a [segmenters.NAME] entry of models.toml, an
    /// .onnx path, or a SAM / SlimSAM folder (transformers' config.json, model.safetensors,
    /// preprocessor_config.json), which needs --point or --box.
    #[arg(long, default_value = "u2netp")]
    pub model: String,
    /// SAM: a point on the subject, in image pixels (repeatable).
    #[arg(long = "point", value_name = "X,Y", value_parser = parse_point)]
    pub points: Vec<[f32; 2]>,
    /// SAM: a point on the background, in image pixels (repeatable).
    #[arg(long = "neg-point", value_name = "X,Y", value_parser = parse_point)]
    pub negative_points: Vec<[f32; 2]>,
    /// SAM: a box around the subject, in image pixels.
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1", value_parser = parse_box)]
    pub bbox: Option<[f32; 4]>,
    /// SAM: also write each of its masks as X.N.png (N = 0, 1, 2), next to --out.
    #[arg(long)]
    pub all_masks: bool,
    /// The 8-bit mask to write (default: X.mask.png next to the image).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing mask.
    #[arg(long)]
    pub overwrite: bool,
}

fn numbers<const N: usize>(s: &str, what: &str) -> Result<[f32; N], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != N {
        return Err(format!(
            "`{s}`: a {what} is {N} numbers separated by commas"
        ));
    }
    let mut out = [0f32; N];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("`{s}`: `{p}` is not a number"))?;
    }
    Ok(out)
}

fn parse_point(s: &str) -> Result<[f32; 2], String> {
    numbers::<2>(s, "point (X,Y)")
}

fn parse_box(s: &str) -> Result<[f32; 4], String> {
    numbers::<4>(s, "box (X0,Y0,X1,Y1)")
}

/// `out` with `.N` before its extension: mask.png -> mask.0.png.
fn numbered(out: &Path, i: usize) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!("{stem}.{i}.png"))
}

fn write_mask(
    path: &Path,
    mask: &SubjectMask,
    text: &[(String, String)],
    overwrite: bool,
) -> Result<()> {
    output::write_png(
        path,
        &PngImage {
            width: mask.width,
            height: mask.height,
            pixels: Pixels::Gray8(&mask.to_u8()),
            text,
        },
        overwrite,
    )?;
    outln!("{}", path.display());
    Ok(())
}

pub fn run(args: &SegmentArgs, ui: Ui) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| output::sibling(&args.image, "mask"));
    let prompt = Prompt {
        points: args.points.clone(),
        negative_points: args.negative_points.clone(),
        bbox: args.bbox,
    };
    let name = super::args::segmenter_name(&args.model)?;
    let source = tkg::segment::locate(&name, &super::args::rembg_dirs())?;
    if let SegmentSource::SamDir(dir) = &source {
        return run_sam(args, dir, &out, &prompt, ui);
    }
    if args.all_masks {
        bail!(
            "--all-masks is for SAM folders; {} gives one mask",
            args.model
        );
    }
    output::check_targets(std::slice::from_ref(&out), args.overwrite)?;
    let img = tkg::photo::load_image(&args.image, "image")?.to_rgb8();
    let start = std::time::Instant::now();
    let segmenter = tkg::segment::load(&source, &name, &candle_core::Device::Cpu)?;
    let loaded = start.elapsed();
    let mask = segmenter.segment(&img, &prompt)?;
    ui.detail(format!(
        "{}: loaded in {:.0} ms, segmented in {:.0} ms",
        args.model,
        loaded.as_secs_f64() * 1000.0,
        (start.elapsed() - loaded).as_secs_f64() * 1000.0
    ));
    let text = vec![("TKG segment model".to_string(), args.model.clone())];
    write_mask(&out, &mask, &text, args.overwrite)
}

/// SAM: the mask it rates best at `out` (its predicted IoU on stderr and in the PNG), and with
/// --all-masks every mask it made.
fn run_sam(args: &SegmentArgs, dir: &Path, out: &Path, prompt: &Prompt, ui: Ui) -> Result<()> {
    if prompt.is_empty() {
        bail!("SAM needs a prompt: give --point X,Y (and --neg-point X,Y) or --box X0,Y0,X1,Y1");
    }
    let img = tkg::photo::load_image(&args.image, "image")?.to_rgb8();
    let start = std::time::Instant::now();
    let model = SamModel::load_dir(dir, &candle_core::Device::Cpu)?;
    let loaded = start.elapsed();
    let count = model.config.decoder.num_multimask_outputs;
    let mut targets = vec![out.to_path_buf()];
    if args.all_masks {
        targets.extend((0..count).map(|i| numbered(out, i)));
    }
    output::check_targets(&targets, args.overwrite)?;
    let pred = model
        .predict(&img, prompt, true)
        .with_context(|| format!("segmenting {}", args.image.display()))?;
    ui.detail(format!(
        "{}: loaded in {:.0} ms, segmented in {:.0} ms",
        args.model,
        loaded.as_secs_f64() * 1000.0,
        (start.elapsed() - loaded).as_secs_f64() * 1000.0
    ));
    let best = pred.best();
    let text = |i: usize| {
        vec![
            ("TKG segment model".to_string(), args.model.clone()),
            ("TKG segment iou".to_string(), format!("{:.4}", pred.iou[i])),
        ]
    };
    ui.info(format!(
        "mask {best} of {}: predicted IoU {:.4}",
        pred.iou.len(),
        pred.iou[best]
    ));
    write_mask(out, &pred.mask(best), &text(best), args.overwrite)?;
    if args.all_masks {
        for i in 0..pred.iou.len() {
            ui.info(format!("mask {i}: predicted IoU {:.4}", pred.iou[i]));
            write_mask(&numbered(out, i), &pred.mask(i), &text(i), args.overwrite)?;
        }
    }
    Ok(())
}
