//! `tkg segment`: a subject mask from a segmentation model.

use super::Ui;
use super::stdio::outln;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use tkg::output::{self, Pixels, PngImage};
use tkg::segment::Prompt;

#[derive(Debug, Args)]
pub struct SegmentArgs {
    /// The image to segment (JPEG, PNG or WebP).
    pub image: PathBuf,
    /// u2netp, u2net, silueta (rembg's files, found in $U2NET_HOME, then ~/.u2net),
    /// tiny-u2net (built in, random weights), a [segmenters.NAME] entry of models.toml, or
    /// an .onnx path.
    #[arg(long, default_value = "u2netp")]
    pub model: String,
    /// The 8-bit mask to write (default: X.mask.png next to the image).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing mask.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &SegmentArgs, ui: Ui) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| output::sibling(&args.image, "mask"));
    output::check_targets(std::slice::from_ref(&out), args.overwrite)?;
    let img = tkg::photo::load_image(&args.image, "image")?.to_rgb8();
    let start = std::time::Instant::now();
    let segmenter = super::args::load_segmenter(&args.model)?;
    let loaded = start.elapsed();
    let mask = segmenter.0.segment(&img, &Prompt::default())?;
    ui.detail(format!(
        "{}: loaded in {:.0} ms, segmented in {:.0} ms",
        args.model,
        loaded.as_secs_f64() * 1000.0,
        (start.elapsed() - loaded).as_secs_f64() * 1000.0
    ));
    let text = vec![("TKG segment model".to_string(), args.model.clone())];
    output::write_png(
        &out,
        &PngImage {
            width: mask.width,
            height: mask.height,
            pixels: Pixels::Gray8(&mask.to_u8()),
            text: &text,
        },
        args.overwrite,
    )?;
    outln!("{}", out.display());
    Ok(())
}
