//! `tkg key`: key an existing image.

use super::Ui;
use crate::color::KeyColor;
use crate::key::{self, KeyOptions, KeyOutputFlags};
use crate::output;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The image to key (PNG).
    pub image: PathBuf,
    /// The screen colour: a name (green, blue, magenta, ...) or #RRGGBB.
    #[arg(long, default_value = "green", value_parser = KeyColor::parse)]
    pub color: KeyColor,
    /// Base name of the outputs (default: next to the input): X.matte.png, X.cutout.png.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: &KeyArgs, ui: Ui) -> Result<()> {
    let img = image::open(&args.image)
        .with_context(|| format!("cannot read image {}", args.image.display()))?
        .to_rgb8();
    let out = args.out.clone().unwrap_or_else(|| args.image.clone());
    let flags = KeyOutputFlags::default();
    output::check_targets(&key::output_paths(&out, &flags), args.overwrite)?;
    let keyed = key::key_rgb8(
        img.width(),
        img.height(),
        img.as_raw(),
        &KeyOptions::new(args.color.clone()),
    )?;
    if let Some(w) = &keyed.screen.warning {
        ui.warn(w);
    }
    for p in key::write_outputs(&out, &keyed, &flags, &[], args.overwrite)? {
        println!("{}", p.display());
    }
    Ok(())
}
