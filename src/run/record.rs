//! Writing one finished image: the PNG with its `parameters`, the keyed outputs, the
//! latents, and its manifest record. Every file goes through [`output::write_atomic`].

use super::events::FinishedImage;
use super::plan::{ImageJob, Todo};
use super::request::LoadedModel;
use super::{KeySettings, RunConfig};
use crate::key;
use crate::key::keyability::{self, Keyability};
use crate::metadata::ManifestRecord;
use crate::output::{self, Pixels, PngImage};
use crate::pipeline::{Generated, Request};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// A keyed image and how cleanly it keyed.
pub struct KeyResult {
    pub keyed: key::Keyed,
    pub report: Keyability,
    pub time: Duration,
}

/// Where TKG-DM put the subject: its centres ([-1, 1], x right, y down) in pixels. A prompted
/// segmenter takes them as positive points; other methods place nothing.
fn subject_hints(s: &crate::settings::Settings, width: usize, height: usize) -> Vec<[f32; 2]> {
    if s.method != crate::settings::Method::Tkg {
        return Vec::new();
    }
    s.centers()
        .iter()
        .map(|&(cx, cy)| {
            [
                ((cx + 1.0) / 2.0 * width as f64) as f32,
                ((cy + 1.0) / 2.0 * height as f64) as f32,
            ]
        })
        .collect()
}

/// Keys one generated image (in its own colour) and measures its keyability.
pub fn key_generated(k: &KeySettings, img: &ImageJob, g: &Generated) -> Result<KeyResult> {
    let tk = Instant::now();
    let mut opts = k.options.clone();
    opts.requested = img.settings.color.clone();
    let mut keyed = key::key_rgb8(g.size.width as u32, g.size.height as u32, &g.rgb, &opts)?;
    if let Some(s) = &k.segment {
        let hints = subject_hints(&img.settings, g.size.width, g.size.height);
        key::fuse::segment_and_fuse(&mut keyed, &g.rgb, s.0.as_ref(), &hints)?;
    }
    let report = keyability::measure(&keyed, &g.rgb);
    Ok(KeyResult {
        keyed,
        report,
        time: tk.elapsed(),
    })
}

/// Writes the noise, TKG init and final latents as f32 safetensors.
pub fn save_latents(path: &Path, g: &Generated, overwrite: bool) -> Result<()> {
    let tensors = [
        ("noise", &g.noise),
        ("init", &g.init),
        ("final", &g.final_latents),
    ];
    let views: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| -> Result<_> {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            Ok((
                n.to_string(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                t.dims().to_vec(),
            ))
        })
        .collect::<Result<_>>()?;
    let data: Vec<(String, safetensors::tensor::TensorView)> = views
        .iter()
        .map(|(n, b, s)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(data, None)?;
    output::write_atomic(path, overwrite, |w| Ok(w.write_all(&bytes)?))
}

/// The manifest record of an image made by an earlier run, rebuilt from its PNG's
/// `parameters`: a resumed run that skips it still records it (the earlier run may have
/// died between the image and its manifest line). Timings and key findings are unknown.
pub fn recovered_record(
    cfg: &RunConfig,
    img: &ImageJob,
    paths: &[std::path::PathBuf],
) -> Result<serde_json::Value> {
    let text = output::read_png_text(&img.out)?;
    let raw = text
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.as_str())
        .ok_or_else(|| anyhow::anyhow!("{} has no parameters", img.out.display()))?;
    let params = crate::metadata::Parameters::parse(raw)
        .map_err(|e| anyhow::anyhow!("{}: {e}", img.out.display()))?;
    let recipe = crate::metadata::Recipe::from_parameters(&params)
        .with_context(|| img.out.display().to_string())?;
    let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let mut record = ManifestRecord {
        index: img.index,
        line: img.line,
        image: img.image,
        shard: cfg.shard.to_string(),
        path: &img.out,
        paths: &paths,
        settings: &img.settings,
        recipe: &recipe,
        parameters: &params,
        batch_size: cfg.batch_size,
        tkg_deltas: None,
        timings: serde_json::Value::Null,
        key: match crate::metadata::keyability_from_parameters(&params) {
            Some(Ok(k)) => json!({ "keyability": k }),
            _ => serde_json::Value::Null,
        },
    }
    .to_json();
    record["recovered"] = json!(true);
    Ok(record)
}

/// One image written: what to report, and its manifest line.
pub struct Written {
    pub finished: FinishedImage,
    pub record: serde_json::Value,
}

/// Writes one image and its keyed outputs (`keyed` is there when keying is on); for
/// [`Todo::Complete`] only the files that are missing.
#[allow(clippy::too_many_arguments)]
pub fn write_image(
    cfg: &RunConfig,
    m: &LoadedModel,
    img: &ImageJob,
    req: &Request,
    todo: Todo,
    g: &Generated,
    keyed: Option<&KeyResult>,
    gen_time: Duration,
) -> Result<Written> {
    let t0 = Instant::now();
    let mut warnings: Vec<String> = g
        .warnings
        .iter()
        .map(|w| format!("image {}: {w}", img.index))
        .collect();
    let mut written = Vec::new();
    let recipe = m.recipe(img, req);
    let mut params = recipe.to_parameters();
    if let Some(k) = &keyed {
        crate::metadata::push_keyability(&mut params, &k.report);
    }
    let text = vec![("parameters".to_string(), params.to_string())];
    let overwrite = cfg.overwrite;
    let mut paths = Vec::new();
    if !(todo == Todo::Complete && img.out.exists()) {
        output::write_png(
            &img.out,
            &PngImage {
                width: g.size.width as u32,
                height: g.size.height as u32,
                pixels: Pixels::Rgb8(&g.rgb),
                text: &text,
            },
            overwrite,
        )?;
        written.push(img.out.clone());
    }
    paths.push(img.out.display().to_string());
    let mut key_time = Duration::ZERO;
    let mut key_rec = serde_json::Value::Null;
    if let (
        Some(k),
        Some(KeyResult {
            keyed,
            report,
            time,
        }),
    ) = (&cfg.key, keyed)
    {
        key_time = *time;
        warnings.extend(keyed.screen.warning.clone());
        if let Some(why) = keyed.fused.as_ref().and_then(|f| f.ignored.as_ref()) {
            warnings.push(format!("image {}: subject mask not used: {why}", img.index));
        }
        let want = key::output_paths(&img.out, &k.outputs);
        let all_there = want.iter().all(|p| p.exists());
        if !(todo == Todo::Complete && all_there) {
            // Completing a half-written image: the files that exist are rewritten with the
            // same bytes (generation is deterministic), atomically.
            let ow = overwrite || todo == Todo::Complete;
            written.extend(key::write_outputs(&img.out, keyed, &k.outputs, &text, ow)?);
        }
        paths.extend(want.iter().map(|p| p.display().to_string()));
        let s = keyed.screen.rgb.map(|v| v.round().clamp(0.0, 255.0) as u8);
        key_rec = json!({
            "screen": format!("#{:02x}{:02x}{:02x}", s[0], s[1], s[2]),
            "screen_rgb": keyed.screen.rgb,
            "confidence": keyed.screen.confidence,
            "fell_back": keyed.screen.fell_back,
            "background_fraction": keyed.background_fraction,
            "noise": keyed.noise,
            "warning": keyed.screen.warning,
            "keyability": report,
            "segment": keyed.fused.as_ref().map(|f| json!({
                "model": f.source,
                "interior_pixels": f.interior,
                "restored_pixels": f.restored,
                "ignored": f.ignored,
            })),
        });
    }
    if let Some(p) = &img.save_latents {
        if !(todo == Todo::Complete && p.exists()) {
            save_latents(p, g, overwrite)?;
            written.push(p.clone());
        }
        paths.push(p.display().to_string());
    }
    let t = &g.timings;
    let detail = format!(
        "text {:.2}s, denoise {:.2}s, decode {:.2}s, key {:.2}s",
        t.text.as_secs_f64(),
        t.denoise.as_secs_f64(),
        t.decode.as_secs_f64(),
        key_time.as_secs_f64()
    );
    let total = gen_time + key_time + t0.elapsed();
    let record = ManifestRecord {
        index: img.index,
        line: img.line,
        image: img.image,
        shard: cfg.shard.to_string(),
        path: &img.out,
        paths: &paths,
        settings: &img.settings,
        recipe: &recipe,
        parameters: &params,
        batch_size: cfg.batch_size,
        tkg_deltas: g.shift.as_ref().map(|r| r.deltas),
        timings: json!({
            "text_s": t.text.as_secs_f64(),
            "denoise_s": t.denoise.as_secs_f64(),
            "decode_s": t.decode.as_secs_f64(),
            "key_s": key_time.as_secs_f64(),
            "write_s": t0.elapsed().as_secs_f64(),
            "total_s": total.as_secs_f64(),
        }),
        key: key_rec,
    }
    .to_json();
    Ok(Written {
        finished: FinishedImage {
            index: img.index,
            seed: img.seed,
            out: img.out.clone(),
            paths,
            written,
            warnings,
            seconds: total.as_secs_f64(),
            detail,
            done: 0,
            todo: 0,
        },
        record,
    })
}
