//! What an image records about how it was made, in one place: the AUTOMATIC1111
//! `parameters` text (prompt, negative prompt, then `Key: value` pairs), the [`Recipe`] it
//! is written from and read back into, the `tkg generate` command that makes the image
//! again, and the manifest record.

mod place;

pub use place::{HarmonizeRecipe, PLACE_TOOL, PlaceRecipe};

use crate::color::KeyColor;
use crate::key::keyability::Keyability;
use crate::rng::RngKind;
use crate::sampling::{SamplerKind, SamplerSettings, Schedule, Spacing};
use crate::settings::{Method, Offset, Size, prompt_suffix};
use anyhow::{Context, Result, bail, ensure};
use std::fmt;
use std::path::{Path, PathBuf};

/// Generation settings in A1111's format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub entries: Vec<(String, String)>,
}

impl Parameters {
    pub fn new(prompt: &str, negative_prompt: &str) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: negative_prompt.to_string(),
            entries: Vec::new(),
        }
    }

    pub fn push(&mut self, key: &str, value: String) {
        self.entries.push((key.to_string(), value));
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A value with ',', ':' or a newline is written as a JSON string, as A1111 does.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).expect("strings serialise")
    } else {
        v.to_string()
    }
}

impl fmt::Display for Parameters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.prompt)?;
        if !self.negative_prompt.is_empty() {
            writeln!(f, "Negative prompt: {}", self.negative_prompt)?;
        }
        let pairs: Vec<String> = self
            .entries
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect();
        write!(f, "{}", pairs.join(", "))
    }
}

impl Parameters {
    /// Parses A1111 `parameters` text back: prompt lines, an optional `Negative prompt:` part,
    /// then the last line of `Key: value` pairs (values with ',', ':' or a newline are JSON
    /// strings). Text whose last line is not a list of at least three pairs is all prompt, as
    /// A1111 reads it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim_end_matches(['\n', '\r']);
        let (body, last) = match text.rsplit_once('\n') {
            Some((b, l)) => (b, l),
            None => ("", text),
        };
        let (body, entries) = match parse_pairs(last) {
            // As A1111: fewer than three pairs is prompt text.
            Some(e) if e.len() >= 3 => (body, e),
            _ => (text, Vec::new()),
        };
        let (prompt, negative) = match body.find("Negative prompt:") {
            Some(0) => ("", &body["Negative prompt:".len()..]),
            Some(i) if body[..i].ends_with('\n') => {
                (&body[..i - 1], &body[i + "Negative prompt:".len()..])
            }
            _ => (body, ""),
        };
        let negative = negative.strip_prefix(' ').unwrap_or(negative);
        Ok(Self {
            prompt: prompt.to_string(),
            negative_prompt: negative.to_string(),
            entries,
        })
    }
}

/// Parses `Key: value, Key: "quoted, value", ...`; `None` unless the whole line is pairs.
fn parse_pairs(line: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let colon = rest.find(':')?;
        let key = rest[..colon].trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '/' | '(' | ')'))
        {
            return None;
        }
        rest = rest[colon + 1..].trim_start();
        let value;
        if rest.starts_with('"') {
            // A JSON string: find its closing quote, honouring escapes.
            let bytes = rest.as_bytes();
            let mut i = 1;
            let mut end = None;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => i += 2,
                    b'"' => {
                        end = Some(i);
                        break;
                    }
                    _ => i += 1,
                }
            }
            let end = end?;
            value = serde_json::from_str::<String>(&rest[..=end]).ok()?;
            rest = rest[end + 1..].trim_start();
            match rest.strip_prefix(',') {
                Some(r) => rest = r.trim_start(),
                None if rest.is_empty() => {}
                None => return None,
            }
        } else {
            match rest.find(',') {
                Some(i) => {
                    value = rest[..i].trim().to_string();
                    rest = rest[i + 1..].trim_start();
                }
                None => {
                    value = rest.trim().to_string();
                    rest = "";
                }
            }
        }
        out.push((key.to_string(), value));
    }
    Some(out)
}

/// Numbers as people write them: 7.5, 0.07, 50.
pub fn fmt_num(v: f64) -> String {
    let s = format!("{v}");
    if s.contains('e') {
        format!("{v:.6}")
    } else {
        s
    }
}

/// How an image was made, as its `parameters` record it: what [`Recipe::to_parameters`]
/// writes, [`Recipe::from_parameters`] reads back (also from A1111's own images), and
/// [`Recipe::command`] turns into the `tkg generate` command that makes the image again.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    /// The user's prompt; `--method prompt` records it with the words the method adds.
    pub prompt: String,
    pub negative_prompt: String,
    /// The registry name, or the folder's name with `model_dir`.
    pub model: String,
    pub model_dir: Option<String>,
    pub model_hash: Option<String>,
    /// A1111's `Lora hashes`: `name: hash, ...`.
    pub lora_hashes: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: SamplerSettings,
    pub size: Size,
    pub clip_skip: Option<usize>,
    pub rng: RngKind,
    /// SDXL micro-conditioning, recorded only where it is not the default.
    pub original_size: Option<Size>,
    pub crop_top_left: Option<Offset>,
    pub target_size: Option<Size>,
    /// The SDXL refiner's aesthetic scores (prompt, negative prompt), recorded where the
    /// model takes them.
    pub aesthetic: Option<(f64, f64)>,
    pub method: Method,
    pub color: Option<KeyColor>,
    /// TKG-DM's settings (only with `Method::Tkg`).
    pub shift: Option<f64>,
    pub mask_sigma: Option<f64>,
    pub centers: Vec<(f64, f64)>,
    /// img2img / inpainting: what the image started from.
    pub source: Option<SourceRecipe>,
}

/// The photo an img2img or inpainting image started from, as the command named it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceRecipe {
    pub init_image: String,
    /// A1111's `Denoising strength`.
    pub strength: f64,
    pub mask: Option<String>,
}

/// `car.png` → `car-repro.png`: a name that does not clobber the original.
pub fn repro_name(image: &Path) -> PathBuf {
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    PathBuf::from(format!("{stem}-repro.png"))
}

/// Quotes a word for POSIX shells.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./,:=+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

impl Recipe {
    /// The A1111 `parameters` of the image.
    pub fn to_parameters(&self) -> Parameters {
        let green = KeyColor::green();
        let color = self.color.as_ref().unwrap_or(&green);
        let mut p = Parameters::new(
            &self.method.prompt_text(&self.prompt, color),
            &self.negative_prompt,
        );
        p.push("Steps", self.steps.to_string());
        p.push("Sampler", self.sampler.kind.a1111_name().into());
        if self.sampler.schedule != Schedule::Default {
            p.push("Schedule type", self.sampler.schedule.a1111_name().into());
        }
        p.push("CFG scale", fmt_num(self.guidance));
        p.push("Seed", self.seed.to_string());
        p.push("Size", self.size.to_string());
        if let Some(h) = &self.model_hash {
            p.push("Model hash", h.clone());
        }
        if let Some(h) = &self.lora_hashes {
            p.push("Lora hashes", h.clone());
        }
        p.push("Model", self.model.clone());
        if let Some(n) = self.clip_skip {
            p.push("Clip skip", n.to_string());
        }
        // A1111's names: "CPU" is torch's CPU generator, "NV" its reimplementation of the
        // CUDA generator (A1111 leaves the key out for its default, the GPU itself).
        p.push(
            "RNG",
            match self.rng {
                RngKind::TorchCpu => "CPU".into(),
                RngKind::TorchCuda => "NV".into(),
            },
        );
        if let Some(s) = self.original_size {
            p.push("TKG original size", s.to_string());
        }
        if let Some(o) = self.crop_top_left {
            p.push("TKG crop top left", o.to_string());
        }
        if let Some(s) = self.target_size {
            p.push("TKG target size", s.to_string());
        }
        if let Some((score, negative)) = self.aesthetic {
            p.push("TKG aesthetic score", fmt_num(score));
            p.push("TKG negative aesthetic score", fmt_num(negative));
        }
        if let Some(d) = &self.model_dir {
            p.push("TKG model dir", d.clone());
        }
        if let Some(sp) = self.sampler.spacing {
            p.push("TKG timestep spacing", sp.name().into());
        }
        if self.sampler.eta != 0.0 {
            p.push("Eta DDIM", fmt_num(self.sampler.eta));
        }
        if let Some(src) = &self.source {
            p.push("Denoising strength", fmt_num(src.strength));
            p.push("TKG init image", src.init_image.clone());
            if let Some(m) = &src.mask {
                p.push("TKG mask", m.clone());
            }
        }
        p.push("TKG method", self.method.name().into());
        if let Some(c) = &self.color {
            p.push("TKG color", c.to_string());
        }
        if self.method == Method::Tkg {
            if let Some(v) = self.shift {
                p.push("TKG shift", fmt_num(v));
            }
            if let Some(v) = self.mask_sigma {
                p.push("TKG sigma", fmt_num(v));
            }
            if !self.centers.is_empty() {
                let c: Vec<String> = self
                    .centers
                    .iter()
                    .map(|(x, y)| format!("{},{}", fmt_num(*x), fmt_num(*y)))
                    .collect();
                p.push("TKG center", c.join(";"));
            }
        }
        p.push("Version", format!("tkg {}", env!("CARGO_PKG_VERSION")));
        p
    }

    /// Reads `parameters` back (tkg's own, or A1111's for the settings tkg has).
    pub fn from_parameters(p: &Parameters) -> Result<Self> {
        let get = |k: &str| p.get(k);
        let num = |k: &str, v: &str| -> Result<f64> {
            v.trim()
                .parse::<f64>()
                .with_context(|| format!("{k} '{v}' is not a number"))
        };
        let count = |k: &str, v: &str| -> Result<usize> {
            v.trim()
                .parse::<usize>()
                .with_context(|| format!("{k} '{v}' is not a number"))
        };
        fn text<T>(k: &str, r: Result<T, String>) -> Result<T> {
            r.map_err(|e| anyhow::anyhow!("{k}: {e}"))
        }
        let method = get("TKG method").unwrap_or("plain");
        let method =
            Method::parse(method).map_err(|_| anyhow::anyhow!("unknown TKG method '{method}'"))?;
        let color = get("TKG color")
            .map(|c| KeyColor::parse(c).map_err(|e| anyhow::anyhow!("TKG color: {e}")))
            .transpose()?;
        // `--method prompt` stores the prompt it used; give back the user's.
        let prompt = if method == Method::Prompt {
            let suffix = prompt_suffix(color.as_ref().unwrap_or(&KeyColor::green()));
            p.prompt
                .strip_suffix(&suffix)
                .with_context(|| format!("the prompt does not end in '{suffix}'"))?
                .to_string()
        } else {
            p.prompt.clone()
        };
        let model_dir = get("TKG model dir").map(str::to_string);
        let model = match (&model_dir, get("Model")) {
            (_, Some(m)) => m.to_string(),
            (Some(d), None) => crate::settings::dir_model_name(Path::new(d)),
            (None, None) => bail!("no Model"),
        };
        // Before A1111 1.9 the schedule was part of the sampler's name ("DPM++ 2M Karras").
        let (kind, named_schedule) = match get("Sampler") {
            None => (SamplerKind::Ddim, None),
            Some(s) => SamplerKind::from_a1111(s).with_context(|| {
                let names: Vec<&str> = SamplerKind::ALL.iter().map(|k| k.a1111_name()).collect();
                format!("sampler '{s}' is not one tkg has ({})", names.join(", "))
            })?,
        };
        let schedule = match get("Schedule type") {
            Some(t) => text("Schedule type", Schedule::parse(t))?,
            None => named_schedule.unwrap_or_default(),
        };
        let sampler = SamplerSettings {
            kind,
            schedule,
            eta: get("Eta DDIM")
                .map(|v| num("Eta DDIM", v))
                .transpose()?
                .unwrap_or(0.0),
            spacing: get("TKG timestep spacing")
                .map(|v| text("TKG timestep spacing", Spacing::parse(v)))
                .transpose()?,
        };
        let seed = get("Seed").context("no Seed")?;
        let seed = seed
            .parse::<u64>()
            .with_context(|| format!("Seed '{seed}' is not a number"))?;
        let size = get("Size").context("no Size")?;
        let size = Size::parse(size).map_err(|_| anyhow::anyhow!("Size '{size}' is not WxH"))?;
        let rng = match get("RNG") {
            Some("CPU") => RngKind::TorchCpu,
            Some("NV") | Some("GPU") | None => RngKind::TorchCuda,
            Some(o) => bail!("RNG '{o}' is not one tkg has"),
        };
        let tkg = method == Method::Tkg;
        Ok(Self {
            prompt,
            negative_prompt: p.negative_prompt.clone(),
            model,
            model_dir,
            model_hash: get("Model hash").map(str::to_string),
            lora_hashes: get("Lora hashes").map(str::to_string),
            seed,
            steps: count("Steps", get("Steps").context("no Steps")?)?,
            guidance: num("CFG scale", get("CFG scale").context("no CFG scale")?)?,
            sampler,
            size,
            clip_skip: get("Clip skip")
                .map(|v| count("Clip skip", v))
                .transpose()?,
            rng,
            original_size: get("TKG original size")
                .map(|v| text("TKG original size", Size::parse(v)))
                .transpose()?,
            crop_top_left: get("TKG crop top left")
                .map(|v| text("TKG crop top left", Offset::parse(v)))
                .transpose()?,
            target_size: get("TKG target size")
                .map(|v| text("TKG target size", Size::parse(v)))
                .transpose()?,
            aesthetic: match (
                get("TKG aesthetic score"),
                get("TKG negative aesthetic score"),
            ) {
                (Some(a), Some(n)) => Some((
                    num("TKG aesthetic score", a)?,
                    num("TKG negative aesthetic score", n)?,
                )),
                (None, None) => None,
                _ => bail!("TKG aesthetic score and TKG negative aesthetic score come together"),
            },
            method,
            color,
            shift: get("TKG shift")
                .filter(|_| tkg)
                .map(|v| num("TKG shift", v))
                .transpose()?,
            mask_sigma: get("TKG sigma")
                .filter(|_| tkg)
                .map(|v| num("TKG sigma", v))
                .transpose()?,
            centers: match get("TKG center").filter(|_| tkg) {
                Some(v) => v
                    .split(';')
                    .filter(|c| !c.is_empty())
                    .map(|c| text("TKG center", crate::settings::parse_center(c)))
                    .collect::<Result<_>>()?,
                None => Vec::new(),
            },
            source: match (get("TKG init image"), get("Denoising strength")) {
                (Some(image), Some(st)) => Some(SourceRecipe {
                    init_image: image.to_string(),
                    strength: num("Denoising strength", st)?,
                    mask: get("TKG mask").map(str::to_string),
                }),
                (Some(_), None) => bail!("TKG init image without a Denoising strength"),
                // A1111 writes a strength for hires fix too, and names no photo for img2img.
                (None, _) => None,
            },
        })
    }

    /// The `tkg generate` command that makes this image again, writing `out`.
    pub fn command(&self, out: &Path) -> String {
        let mut args: Vec<String> = vec!["tkg".into(), "generate".into()];
        let mut push = |flag: &str, v: &str| {
            if v.starts_with('-') {
                // "--subject-center -0.5,0" would read as a flag.
                args.push(shell_quote(&format!("{flag}={v}")));
            } else {
                args.push(flag.to_string());
                args.push(shell_quote(v));
            }
        };
        push("--prompt", &self.prompt);
        if !self.negative_prompt.is_empty() {
            push("--negative-prompt", &self.negative_prompt);
        }
        match &self.model_dir {
            Some(d) => push("--model-dir", d),
            None => push("--model", &self.model),
        }
        push("--seed", &self.seed.to_string());
        push("--steps", &self.steps.to_string());
        push("--guidance", &fmt_num(self.guidance));
        // Always named: the model's registry entry may default to another sampler.
        push("--sampler", self.sampler.kind.name());
        if self.sampler.kind.takes_schedule() {
            push("--schedule", self.sampler.schedule.name());
        }
        if self.sampler.eta != 0.0 {
            push("--eta", &fmt_num(self.sampler.eta));
        }
        if let Some(sp) = self.sampler.spacing {
            push("--timestep-spacing", sp.name());
        }
        push("--width", &self.size.width.to_string());
        push("--height", &self.size.height.to_string());
        if let Some(c) = self.clip_skip {
            push("--clip-skip", &c.to_string());
        }
        push("--rng", self.rng.name());
        if let Some(v) = self.original_size {
            push("--original-size", &v.to_string());
        }
        if let Some(v) = self.crop_top_left {
            push("--crop-top-left", &v.to_string());
        }
        if let Some(v) = self.target_size {
            push("--target-size", &v.to_string());
        }
        if let Some((score, negative)) = self.aesthetic {
            push("--aesthetic-score", &fmt_num(score));
            push("--negative-aesthetic-score", &fmt_num(negative));
        }
        if let Some(src) = &self.source {
            push("--init-image", &src.init_image);
            push("--strength", &fmt_num(src.strength));
            if let Some(m) = &src.mask {
                push("--mask", m);
            }
        }
        push("--method", self.method.name());
        if let Some(c) = &self.color {
            push("--color", &c.to_string());
        }
        if self.method == Method::Tkg {
            if let Some(v) = self.shift {
                push("--shift", &fmt_num(v));
            }
            if let Some(v) = self.mask_sigma {
                push("--mask-sigma", &fmt_num(v));
            }
            for (x, y) in &self.centers {
                push(
                    "--subject-center",
                    &format!("{},{}", fmt_num(*x), fmt_num(*y)),
                );
            }
        }
        push("--out", &out.display().to_string());
        args.join(" ")
    }
}
/// What a manifest line says about one finished image.
#[derive(Debug, Clone)]
pub struct ManifestRecord<'a> {
    pub index: usize,
    pub line: usize,
    pub image: usize,
    pub shard: String,
    pub path: &'a Path,
    /// Every file of the image (written now or before).
    pub paths: &'a [String],
    pub settings: &'a crate::settings::Settings,
    pub recipe: &'a Recipe,
    pub parameters: &'a Parameters,
    pub batch_size: usize,
    pub tkg_deltas: Option<[f32; 4]>,
    /// Seconds per stage.
    pub timings: serde_json::Value,
    /// The keyer's findings (null without keying).
    pub key: serde_json::Value,
}

impl ManifestRecord<'_> {
    /// The JSON line (keys sorted, as serde_json writes maps).
    pub fn to_json(&self) -> serde_json::Value {
        let s = self.settings;
        let r = self.recipe;
        serde_json::json!({
            "index": self.index,
            "line": self.line,
            "image": self.image,
            "shard": self.shard,
            "path": self.path.display().to_string(),
            "paths": self.paths,
            "seed": r.seed,
            "prompt": s.prompt,
            "negative_prompt": s.negative_prompt,
            "model": r.model,
            "model_hash": r.model_hash,
            "model_dir": r.model_dir,
            "color": s.color.to_string(),
            "method": s.method.name(),
            "steps": r.steps,
            "guidance": r.guidance,
            "sampler": r.sampler.kind.name(),
            "schedule": r.sampler.schedule.name(),
            "width": r.size.width,
            "height": r.size.height,
            "shift": r.shift,
            "mask_sigma": s.mask_sigma,
            "subject_center": s.centers(),
            "clip_skip": s.clip_skip,
            "rng": s.rng.name(),
            "batch_size": self.batch_size,
            "tkg_deltas": self.tkg_deltas,
            "parameters": self.parameters.to_string(),
            "command": r.command(self.path),
            "timings": self.timings,
            "key": self.key,
            "finished_unix": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        })
    }
}

/// The `parameters` entry holding the keyability score.
pub const KEYABILITY_KEY: &str = "TKG keyability";
/// The `parameters` entry holding the keyability parts, `name=value` separated by spaces.
pub const KEYABILITY_PARTS_KEY: &str = "TKG keyability parts";

/// Adds the keyability report to `parameters` (no ',' or ':' in the values, so A1111 shows
/// them unquoted).
pub fn push_keyability(p: &mut Parameters, k: &Keyability) {
    for (key, value) in keyability_text(k) {
        p.push(&key, value);
    }
}

/// The keyability report as `(key, value)` pairs: `parameters` entries, or PNG text chunks
/// of their own where an image has no `parameters` (`tkg key`'s outputs).
pub fn keyability_text(k: &Keyability) -> Vec<(String, String)> {
    let score = format!("{:.1}", k.score);
    let mut copy = *k;
    let mut text: Vec<String> = copy
        .parts_mut()
        .iter()
        .map(|(n, v)| format!("{n}={:.4}", **v))
        .collect();
    text.push(format!("touches_border={}", k.touches_border));
    vec![
        (KEYABILITY_KEY.into(), score),
        (KEYABILITY_PARTS_KEY.into(), text.join(" ")),
    ]
}

/// The keyability report in `parameters`: `None` when the image has none.
pub fn keyability_from_parameters(p: &Parameters) -> Option<Result<Keyability>> {
    keyability_from(|k| p.get(k))
}

/// The keyability report in a PNG's text: its `parameters` entries, else chunks of their
/// own; `None` when it has none.
pub fn keyability_from_png_text(chunks: &[(String, String)]) -> Option<Result<Keyability>> {
    let parameters = chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .and_then(|(_, v)| Parameters::parse(v).ok());
    if let Some(found) = parameters.as_ref().and_then(keyability_from_parameters) {
        return Some(found);
    }
    keyability_from(|key| {
        chunks
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    })
}

fn keyability_from<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<Result<Keyability>> {
    let score = get(KEYABILITY_KEY)?;
    let parts = get(KEYABILITY_PARTS_KEY);
    Some((|| {
        let num = |name: &str, v: &str| -> Result<f32> {
            let x: f32 = v
                .trim()
                .parse()
                .with_context(|| format!("keyability {name} '{v}' is not a number"))?;
            ensure!(x.is_finite(), "keyability {name} '{v}' is not finite");
            Ok(x)
        };
        let mut k = Keyability {
            score: num("score", score)?,
            ..Keyability::default()
        };
        for item in parts.unwrap_or("").split_whitespace() {
            let Some((name, v)) = item.split_once('=') else {
                bail!("keyability part '{item}' is not name=value");
            };
            if name == "touches_border" {
                k.touches_border = match v {
                    "true" => true,
                    "false" => false,
                    _ => bail!("keyability touches_border '{v}' is not true or false"),
                };
                continue;
            }
            // A name not among the parts is a later version's: shown by `tkg info` as
            // text, not an error here.
            if let Some((_, slot)) = k.parts_mut().into_iter().find(|(n, _)| *n == name) {
                *slot = num(name, v)?;
            }
        }
        Ok(k)
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyability_round_trips_through_parameters_and_text_chunks() {
        let k = Keyability {
            score: 73.4,
            border_screen: 0.99,
            screen_confidence: 0.95,
            plate_residual: 2.5,
            border_subject: 0.0,
            touches_border: false,
            entanglement: 0.0125,
            enclosed_screen: 0.25,
            ambiguous: 0.0312,
            spill: 4.0,
            subject_size: 0.3,
            keyed_out: 0.0042,
        };
        let mut p = Parameters::new("a car", "");
        p.push("Steps", "20".into());
        p.push("Seed", "1".into());
        push_keyability(&mut p, &k);
        let back = Parameters::parse(&p.to_string()).unwrap();
        assert_eq!(keyability_from_parameters(&back).unwrap().unwrap(), k);
        let chunks = vec![("parameters".to_string(), p.to_string())];
        assert_eq!(keyability_from_png_text(&chunks).unwrap().unwrap(), k);
        assert_eq!(
            keyability_from_png_text(&keyability_text(&k))
                .unwrap()
                .unwrap(),
            k
        );
        assert!(keyability_from_png_text(&[]).is_none());
        let bad = vec![
            (KEYABILITY_KEY.to_string(), "NaN".to_string()),
            (KEYABILITY_PARTS_KEY.to_string(), String::new()),
        ];
        let e = keyability_from_png_text(&bad).unwrap().unwrap_err();
        assert!(e.to_string().contains("not finite"), "{e}");
    }

    #[test]
    fn a1111_layout() {
        let mut p = Parameters::new("a car, red", "");
        p.push("Steps", "50".into());
        p.push("TKG center", "0,0".into());
        assert_eq!(p.to_string(), "a car, red\nSteps: 50, TKG center: \"0,0\"");
        let p = Parameters::new("x", "blurry");
        assert_eq!(p.to_string(), "x\nNegative prompt: blurry\n");
    }

    #[test]
    fn parses_what_it_writes() {
        let mut p = Parameters::new("a car, red\nsecond line: yes", "blurry,\nugly");
        p.push("Steps", "50".into());
        p.push("Seed", "42".into());
        p.push("TKG center", "0,0;0.5,-0.25".into());
        p.push("Note", "say \"hi\": a\\b\nc".into());
        p.push("Size", "512x512".into());
        let back = Parameters::parse(&p.to_string()).unwrap();
        assert_eq!(back, p);
        let q = Parameters::new("only prompt", "");
        let mut q2 = q.clone();
        q2.push("Steps", "2".into());
        q2.push("Seed", "3".into());
        q2.push("Model", "m".into());
        assert_eq!(Parameters::parse(&q2.to_string()).unwrap(), q2);
    }

    #[test]
    fn parses_a1111_text() {
        let text = "masterpiece, a cat\nNegative prompt: lowres\nSteps: 20, Sampler: Euler a, \
                    CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abcdef1234, \
                    Lora hashes: \"x: 1234, y: 5678\", Version: v1.9.0";
        let p = Parameters::parse(text).unwrap();
        assert_eq!(p.prompt, "masterpiece, a cat");
        assert_eq!(p.negative_prompt, "lowres");
        assert_eq!(p.get("Sampler"), Some("Euler a"));
        assert_eq!(p.get("Lora hashes"), Some("x: 1234, y: 5678"));
        assert_eq!(p.get("Version"), Some("v1.9.0"));
        // A bare prompt is all prompt.
        let p = Parameters::parse("just a prompt, with a comma").unwrap();
        assert_eq!(p.prompt, "just a prompt, with a comma");
        assert!(p.entries.is_empty());
    }

    fn recipe() -> Recipe {
        Recipe {
            prompt: "a car, red".into(),
            negative_prompt: "blurry".into(),
            model: "tiny-sdxl".into(),
            model_dir: None,
            model_hash: Some("0123456789".into()),
            lora_hashes: None,
            seed: 42,
            steps: 20,
            guidance: 7.5,
            sampler: SamplerSettings {
                kind: SamplerKind::DpmPp2m,
                schedule: Schedule::Karras,
                eta: 0.0,
                spacing: Some(Spacing::Trailing),
            },
            size: Size::new(64, 48),
            clip_skip: Some(2),
            rng: RngKind::TorchCpu,
            original_size: Some(Size::new(128, 96)),
            crop_top_left: Some(Offset { top: 4, left: 8 }),
            target_size: None,
            method: Method::Tkg,
            color: Some(KeyColor::parse("#3050ff").unwrap()),
            shift: Some(0.11),
            mask_sigma: Some(0.5),
            centers: vec![(-0.5, 0.0), (0.25, 0.5)],
            aesthetic: None,
            source: None,
        }
    }

    #[test]
    fn recipes_round_trip_through_parameters() {
        let r = recipe();
        let text = r.to_parameters().to_string();
        let back = Recipe::from_parameters(&Parameters::parse(&text).unwrap()).unwrap();
        assert_eq!(back, r);
        let p = Recipe {
            method: Method::Prompt,
            shift: None,
            mask_sigma: None,
            centers: vec![],
            ..r.clone()
        };
        let params = p.to_parameters();
        assert!(
            params.prompt.ends_with("solid #3050ff background"),
            "{}",
            params.prompt
        );
        assert_eq!(Recipe::from_parameters(&params).unwrap(), p);
        let inpaint = Recipe {
            method: Method::Plain,
            source: Some(SourceRecipe {
                init_image: "photos/a b.jpg".into(),
                strength: 0.75,
                mask: Some("m.png".into()),
            }),
            ..p.clone()
        };
        let params = inpaint.to_parameters();
        assert_eq!(params.get("Denoising strength"), Some("0.75"));
        assert_eq!(Recipe::from_parameters(&params).unwrap(), inpaint);
        let cmd = inpaint.command(Path::new("o.png"));
        assert!(
            cmd.contains("--init-image 'photos/a b.jpg' --strength 0.75 --mask m.png"),
            "{cmd}"
        );
        // A refiner's scores go both ways; one without the other is an error.
        let refined = Recipe {
            aesthetic: Some((7.5, 1.25)),
            ..inpaint
        };
        let mut params = refined.to_parameters();
        assert_eq!(params.get("TKG aesthetic score"), Some("7.5"));
        assert_eq!(Recipe::from_parameters(&params).unwrap(), refined);
        let cmd = refined.command(Path::new("o.png"));
        assert!(
            cmd.contains("--aesthetic-score 7.5 --negative-aesthetic-score 1.25"),
            "{cmd}"
        );
        params
            .entries
            .retain(|(k, _)| k != "TKG negative aesthetic score");
        assert!(Recipe::from_parameters(&params).is_err());
    }

    #[test]
    fn the_command_names_every_setting() {
        let c = recipe().command(Path::new("o.png"));
        assert_eq!(
            c,
            "tkg generate --prompt 'a car, red' --negative-prompt blurry --model tiny-sdxl \
             --seed 42 --steps 20 --guidance 7.5 --sampler dpm++2m --schedule karras \
             --timestep-spacing trailing --width 64 --height 48 --clip-skip 2 \
             --rng torch-cpu --original-size 128x96 --crop-top-left 4,8 --method tkg \
             --color '#3050ff' --shift 0.11 --mask-sigma 0.5 --subject-center=-0.5,0 \
             --subject-center 0.25,0.5 --out o.png"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a"), "a");
        assert_eq!(shell_quote("a car"), "'a car'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        // '#' starts a comment in a shell.
        assert_eq!(shell_quote("#3050ff"), "'#3050ff'");
    }

    #[test]
    fn a1111_gpu_seed_maps_to_torch_cuda() {
        let p = Parameters::parse(
            "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 5, Size: 512x512, Model: sd15",
        )
        .unwrap();
        let c = Recipe::from_parameters(&p)
            .unwrap()
            .command(Path::new("o.png"));
        assert!(
            c.contains("--rng torch-cuda") && c.contains("--seed 5") && c.contains("--guidance 7 "),
            "{c}"
        );
        let p = Parameters::parse(
            "a cat\nSteps: 20, Sampler: DPM++ SDE, CFG scale: 7, Seed: 5, Size: 512x512, Model: x",
        )
        .unwrap();
        let e = Recipe::from_parameters(&p).unwrap_err().to_string();
        assert!(e.contains("'DPM++ SDE'") && e.contains("Euler a"), "{e}");
    }

    #[test]
    fn a1111_sampler_names_old_and_new() {
        let read = |extra: &str| {
            let p = Parameters::parse(&format!(
                "a cat\nSteps: 20, {extra}, CFG scale: 7, Seed: 5, Size: 512x512, Model: x"
            ))
            .unwrap();
            let r = Recipe::from_parameters(&p).unwrap();
            (r.sampler.kind, r.sampler.schedule)
        };
        use SamplerKind::*;
        assert_eq!(
            read("Sampler: DPM++ 2M, Schedule type: Karras"),
            (DpmPp2m, Schedule::Karras)
        );
        assert_eq!(
            read("Sampler: DPM++ 2M Karras"),
            (DpmPp2m, Schedule::Karras)
        );
        assert_eq!(
            read("Sampler: Euler a"),
            (EulerAncestral, Schedule::Default)
        );
        assert_eq!(read("Sampler: UniPC"), (UniPc, Schedule::Default));
        assert_eq!(
            read("Sampler: DPM++ 2M SDE, Schedule type: Exponential"),
            (DpmPp2mSde, Schedule::Exponential)
        );
        assert_eq!(
            read("Sampler: Euler, Schedule type: Automatic"),
            (Euler, Schedule::Default)
        );
        let r = recipe();
        let text = r.to_parameters().to_string();
        assert!(
            text.contains("Sampler: DPM++ 2M, Schedule type: Karras, "),
            "{text}"
        );
    }
}
