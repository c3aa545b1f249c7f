//! `tkg key`: key an existing image.

use super::Ui;
use super::args::KeyFlags;
use super::stdio::outln;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use tkg::color::KeyColor;
use tkg::segment::SubjectMask;
use tkg::{key, output};

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
    /// A subject mask to help the keyer (a grey PNG, or a cut-out's alpha): from rembg,
    /// BiRefNet, Photoshop or `tkg segment`. Parts of the subject in the key colour stay.
    #[arg(long, value_name = "MASK.png", conflicts_with_all = ["segment", "segment_model"])]
    pub subject_mask: Option<PathBuf>,
    /// The --subject-mask is right: make its whole interior opaque, not only the holes the
    /// subject encloses (for a subject entirely in the key colour).
    #[arg(long, requires = "subject_mask")]
    pub trust_mask: bool,
    /// Also write the keyability report (the score, 0-100, and its parts) as JSON.
    #[arg(long, value_name = "FILE.json")]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub key: KeyFlags,
}

pub fn run(args: &KeyArgs, ui: Ui) -> Result<()> {
    let (opts, flags) = args.key.to_options(args.color.clone())?;
    let out = args.out.clone().unwrap_or_else(|| args.image.clone());
    let mut targets = key::output_paths(&out, &flags);
    targets.extend(args.report.clone());
    output::check_targets(&targets, args.overwrite)?;
    let img = key::load_image(&args.image)?;
    let mask = args
        .subject_mask
        .as_deref()
        .map(SubjectMask::load)
        .transpose()?;
    if let Some(m) = &mask {
        let ((w, h), (mw, mh)) = ((img.width(), img.height()), (m.width, m.height));
        if !tkg::photo::same_aspect((mw, mh), (w, h)) {
            ui.warn(format!(
                "the subject mask is {mw}x{mh}, another aspect than the image's {w}x{h}: \
                 stretched to fit"
            ));
        }
    }
    let segmenter = args.key.segmenter()?;
    let start = std::time::Instant::now();
    let mut keyed = key::key_image(&img, &opts)?;
    if let (Some(path), Some(m)) = (&args.subject_mask, &mask) {
        let rgb = img.to_rgb8();
        let name = path.display().to_string();
        if args.trust_mask {
            key::fuse::fuse_trusted_mask(&mut keyed, rgb.as_raw(), m, &name)?;
        } else {
            key::fuse::fuse_subject_mask(&mut keyed, rgb.as_raw(), m, &name)?;
        }
    } else if let Some(s) = &segmenter {
        key::fuse::segment_and_fuse(&mut keyed, img.to_rgb8().as_raw(), s.0.as_ref(), &[])?;
    }
    if let Some(f) = &keyed.fused {
        match &f.ignored {
            Some(why) => ui.warn(format!("subject mask {} not used: {why}", f.source)),
            None => ui.detail(format!(
                "subject mask {}: {} of {} interior pixels made opaque",
                f.source, f.restored, f.interior
            )),
        }
    }
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
    let report = key::keyability::measure(&keyed, img.to_rgb8().as_raw());
    ui.detail(format!("keyability {:.1}", report.score));
    let text = tkg::metadata::keyability_text(&report);
    let mut written = key::write_outputs(&out, &keyed, &flags, &text, args.overwrite)?;
    if let Some(path) = &args.report {
        let s = keyed.screen.rgb.map(|v| v.round().clamp(0.0, 255.0) as u8);
        let json = serde_json::json!({
            "image": args.image.display().to_string(),
            "keyability": report,
            "screen": format!("#{:02x}{:02x}{:02x}", s[0], s[1], s[2]),
            "noise": keyed.noise,
        });
        let bytes = serde_json::to_vec_pretty(&json)?;
        output::write_atomic(path, args.overwrite, |w| Ok(w.write_all(&bytes)?))?;
        written.push(path.clone());
    }
    for p in written {
        outln!("{}", p.display());
    }
    Ok(())
}
