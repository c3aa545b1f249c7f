//! `tkg key`: key an existing image. [`KeyFlags`] are shared with `tkg generate`.

use super::Ui;
use crate::color::KeyColor;
use crate::key::{self, KeyOptions, KeyOutputFlags};
use crate::output;
use anyhow::{Result, bail};
use clap::Args;
use std::path::PathBuf;

/// Keyer flags shared by `tkg key` and `tkg generate`.
#[derive(Debug, Clone, Args)]
pub struct KeyFlags {
    /// Clip black (0..1): raw alpha at or below this becomes fully transparent [default: from
    /// the measured noise, about 0.02-0.08].
    #[arg(long, value_name = "A", value_parser = unit_interval)]
    pub clip_black: Option<f32>,
    /// Clip white (0..1): raw alpha at or above this becomes fully opaque [default: from the
    /// measured noise, about 0.82-0.9].
    #[arg(long, value_name = "A", value_parser = unit_interval)]
    pub clip_white: Option<f32>,
    /// Spill suppression strength, 0 (off) to 1 (full).
    #[arg(long, value_name = "S", default_value_t = 1.0, value_parser = unit_interval)]
    pub despill: f32,
    /// Key against exactly this screen colour (#RRGGBB) instead of estimating it from the
    /// image border.
    #[arg(long, value_name = "COLOR", value_parser = KeyColor::parse)]
    pub screen: Option<KeyColor>,
    /// Key against one flat screen colour instead of a fitted clean plate.
    #[arg(long)]
    pub flat_screen: bool,
    /// Keep islands and pinholes (no connected-component clean-up).
    #[arg(long)]
    pub no_cleanup: bool,
    /// Light edge-aware (guided filter) refinement of the matte's soft edges.
    #[arg(long)]
    pub refine: bool,
    /// Bit depth of X.matte.png: 8 or 16.
    #[arg(long, value_name = "BITS", default_value_t = 8, value_parser = matte_depth)]
    pub matte_depth: u8,
    /// Also write X.premultiplied.png (premultiplied RGBA).
    #[arg(long)]
    pub premultiplied: bool,
    /// Also write the clean plate the matte was pulled against, X.plate.png.
    #[arg(long)]
    pub clean_plate: bool,
    /// Also write X.composite.png: the cut-out over this image, resized to cover.
    #[arg(long, value_name = "BG.png")]
    pub composite: Option<PathBuf>,
}

impl Default for KeyFlags {
    fn default() -> Self {
        Self {
            clip_black: None,
            clip_white: None,
            despill: 1.0,
            screen: None,
            flat_screen: false,
            no_cleanup: false,
            refine: false,
            matte_depth: 8,
            premultiplied: false,
            clean_plate: false,
            composite: None,
        }
    }
}

fn unit_interval(s: &str) -> Result<f32, String> {
    let v: f32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

fn matte_depth(s: &str) -> Result<u8, String> {
    match s.trim() {
        "8" => Ok(8),
        "16" => Ok(16),
        _ => Err(format!("matte depth must be 8 or 16, not '{s}'")),
    }
}

impl KeyFlags {
    /// Keyer options and output switches for a requested key colour. Fails (before any
    /// expensive work) on inconsistent thresholds or an unreadable composite background.
    pub fn to_options(&self, requested: KeyColor) -> Result<(KeyOptions, KeyOutputFlags)> {
        if let (Some(lo), Some(hi)) = (self.clip_black, self.clip_white)
            && hi <= lo
        {
            bail!("--clip-white ({hi}) must be greater than --clip-black ({lo})");
        }
        let mut opts = KeyOptions::new(requested);
        opts.screen = self.screen.as_ref().map(|c| c.rgb);
        opts.fit_plate = !self.flat_screen;
        opts.clip_black = self.clip_black;
        opts.clip_white = self.clip_white;
        opts.despill = self.despill;
        opts.cleanup = !self.no_cleanup;
        opts.refine = self.refine;
        let flags = KeyOutputFlags {
            matte16: self.matte_depth == 16,
            premultiplied: self.premultiplied,
            clean_plate: self.clean_plate,
            composite: self.composite.clone(),
        };
        key::check_output_flags(&flags)?;
        Ok((opts, flags))
    }
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The image to key (PNG; greyscale, 16-bit and alpha inputs are accepted).
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
    #[command(flatten)]
    pub key: KeyFlags,
}

pub fn run(args: &KeyArgs, ui: Ui) -> Result<()> {
    let (opts, flags) = args.key.to_options(args.color.clone())?;
    let out = args.out.clone().unwrap_or_else(|| args.image.clone());
    output::check_targets(&key::output_paths(&out, &flags), args.overwrite)?;
    let img = key::load_image(&args.image)?;
    let start = std::time::Instant::now();
    let keyed = key::key_image(&img, &opts)?;
    if let Some(w) = &keyed.screen.warning {
        ui.warn(w);
    }
    let s = keyed.screen.rgb.map(|v| v.round().clamp(0.0, 255.0) as u8);
    ui.detail(format!(
        "screen #{:02x}{:02x}{:02x} (confidence {:.2}{}), noise {:.1}, clip {:.3}..{:.3}, \
         {:.0}% background, keyed in {:.0} ms",
        s[0],
        s[1],
        s[2],
        keyed.screen.confidence,
        if keyed.screen.fell_back {
            ", fell back"
        } else {
            ""
        },
        keyed.noise,
        keyed.clip.0,
        keyed.clip.1,
        keyed.background_fraction * 100.0,
        start.elapsed().as_secs_f64() * 1000.0
    ));
    for p in key::write_outputs(&out, &keyed, &flags, &[], args.overwrite)? {
        println!("{}", p.display());
    }
    Ok(())
}
