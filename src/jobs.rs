//! Jobs for `tkg generate --num-images` and `tkg batch`: job files, per-job overrides,
//! output-name templates, shards, manifests and interrupts. Nothing here depends on a model
//! family: a job is a list of images, and each image is one [`crate::pipeline::Request`].
//!
//! The flow: parse the job lines ([`parse_jsonl`], [`parse_prompt_file`]) → merge each over
//! the command line's settings ([`JobLine::apply`]) → expand into images with seeds and output
//! paths ([`expand`]) → check the whole plan ([`check_unique_paths`]) → select this shard's
//! images ([`Shard::selects`]). Everything that can be wrong with a job is found before any
//! work starts.

use crate::color::KeyColor;
use crate::rng::RngKind;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// How to get a flat background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// TKG-DM: shifted initial noise (the default).
    Tkg,
    /// Baseline: plain noise, " isolated on a solid <colour> background" appended to the prompt.
    Prompt,
    /// Neither: plain text-to-image.
    Plain,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Tkg => "tkg",
            Method::Prompt => "prompt",
            Method::Plain => "plain",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tkg" => Ok(Method::Tkg),
            "prompt" => Ok(Method::Prompt),
            "plain" => Ok(Method::Plain),
            o => Err(format!("unknown method '{o}': use tkg, prompt or plain")),
        }
    }
}

/// Every per-image setting, after merging a job line over the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// A registry model name, or the folder's name with `model_dir`.
    pub model: String,
    pub model_dir: Option<PathBuf>,
    pub lora: Vec<String>,
    pub prompt: String,
    pub negative_prompt: String,
    pub color: KeyColor,
    /// The first image's seed; `None` = the run's base seed plus the image index.
    pub seed: Option<u64>,
    pub num_images: usize,
    pub steps: usize,
    pub guidance: f64,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub method: Method,
    pub shift: Option<f64>,
    pub mask_sigma: f64,
    pub subject_center: Vec<(f64, f64)>,
    pub clip_skip: Option<usize>,
    pub rng: RngKind,
    /// SDXL micro-conditioning, (height, width) / (top, left) / (height, width).
    pub original_size: Option<(usize, usize)>,
    pub crop_top_left: Option<(usize, usize)>,
    pub target_size: Option<(usize, usize)>,
    /// The output template.
    pub out: String,
    /// A template for the latents file, if wanted.
    pub save_latents: Option<String>,
}

/// A centre given as "X,Y" or [X, Y].
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum CenterValue {
    Text(String),
    Pair([f64; 2]),
}

/// One value or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        }
    }
}

/// One line of a JSONL job file: overrides for the command line's settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobLine {
    prompt: Option<String>,
    negative_prompt: Option<String>,
    color: Option<String>,
    seed: Option<u64>,
    num_images: Option<usize>,
    steps: Option<usize>,
    #[serde(alias = "cfg_scale")]
    guidance: Option<f64>,
    width: Option<usize>,
    height: Option<usize>,
    method: Option<String>,
    shift: Option<f64>,
    mask_sigma: Option<f64>,
    subject_center: Option<OneOrMany<CenterValue>>,
    clip_skip: Option<usize>,
    model: Option<String>,
    model_dir: Option<PathBuf>,
    lora: Option<OneOrMany<String>>,
    out: Option<String>,
    rng: Option<String>,
    original_size: Option<String>,
    crop_top_left: Option<String>,
    target_size: Option<String>,
    save_latents: Option<String>,
}

/// A job line and where it came from (1-based line number).
#[derive(Debug, Clone)]
pub struct SourcedLine {
    pub line: usize,
    pub job: JobLine,
}

/// "3: msg; 7: msg" → one error naming the file.
fn line_errors(file: &str, errors: Vec<String>) -> Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    let n = errors.len();
    let shown: Vec<String> = errors.into_iter().take(10).collect();
    let more = if n > 10 {
        format!("; and {} more bad lines", n - 10)
    } else {
        String::new()
    };
    bail!("{file}: {}{more}", shown.join("; "))
}

/// Parses a JSONL job file: one object a line; blank lines and lines starting with `#` or
/// `//` are skipped. Every bad line is reported (with its number) in one error.
pub fn parse_jsonl(file: &str, text: &str) -> Result<Vec<SourcedLine>> {
    let (jobs, errors) = parse_jsonl_lenient(text);
    line_errors(file, errors.into_iter().map(|(_, e)| e).collect())?;
    if jobs.is_empty() {
        bail!("{file} has no jobs");
    }
    Ok(jobs)
}

/// [`parse_jsonl`] that returns the good lines and the (line, error) of the bad ones, so that
/// [`expand`] can report syntax and setting errors together.
pub fn parse_jsonl_lenient(text: &str) -> (Vec<SourcedLine>, Vec<(usize, String)>) {
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("//") {
            continue;
        }
        match serde_json::from_str::<JobLine>(line) {
            Ok(job) => jobs.push(SourcedLine { line: i + 1, job }),
            Err(e) => {
                // serde counts lines and columns within the one line.
                let msg = e.to_string();
                let msg = match msg.rsplit_once(" at line 1 column ") {
                    Some((m, col)) => format!("{m} (column {col})"),
                    None => msg,
                };
                errors.push((i + 1, format!("line {}: {msg}", i + 1)))
            }
        }
    }
    (jobs, errors)
}

/// Parses a prompt file: one prompt a line; blank lines and `#` comments are skipped.
pub fn parse_prompt_file(file: &str, text: &str) -> Result<Vec<SourcedLine>> {
    let jobs: Vec<SourcedLine> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        })
        .map(|(i, l)| SourcedLine {
            line: i + 1,
            job: JobLine {
                prompt: Some(l.trim().to_string()),
                ..JobLine::default()
            },
        })
        .collect();
    if jobs.is_empty() {
        bail!("{file} has no prompts");
    }
    Ok(jobs)
}

/// "WIDTHxHEIGHT" → (height, width), as diffusers orders sizes.
pub fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("'{s}' is not WIDTHxHEIGHT"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("'{v}' is not a size"))
    };
    Ok((n(h)?, n(w)?))
}

/// "TOP,LEFT".
pub fn parse_pair(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("'{s}' is not TOP,LEFT"))?;
    let n = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("'{v}' is not a number"))
    };
    Ok((n(a)?, n(b)?))
}

/// "X,Y" in [-1, 1].
pub fn parse_center(s: &str) -> Result<(f64, f64), String> {
    let (x, y) = s
        .split_once(',')
        .ok_or_else(|| format!("'{s}' is not X,Y"))?;
    let p = |v: &str| -> Result<f64, String> {
        let f: f64 = v
            .trim()
            .parse()
            .map_err(|_| format!("'{v}' is not a number"))?;
        check_center(f)
    };
    Ok((p(x)?, p(y)?))
}

fn check_center(f: f64) -> Result<f64, String> {
    if !(-1.0..=1.0).contains(&f) {
        return Err(format!("subject centre {f} is outside [-1, 1]"));
    }
    Ok(f)
}

impl JobLine {
    /// Merges this line over `base`; the error says which field is wrong.
    pub fn apply(&self, base: &Settings) -> Result<Settings, String> {
        let mut s = base.clone();
        if let Some(p) = &self.prompt {
            s.prompt = p.clone();
        }
        if let Some(p) = &self.negative_prompt {
            s.negative_prompt = p.clone();
        }
        if let Some(c) = &self.color {
            s.color = KeyColor::parse(c).map_err(|e| format!("color: {e}"))?;
        }
        if self.seed.is_some() {
            s.seed = self.seed;
        }
        if let Some(n) = self.num_images {
            s.num_images = n;
        }
        if let Some(n) = self.steps {
            s.steps = n;
        }
        if let Some(g) = self.guidance {
            s.guidance = g;
        }
        if self.width.is_some() {
            s.width = self.width;
        }
        if self.height.is_some() {
            s.height = self.height;
        }
        if let Some(m) = &self.method {
            s.method = Method::parse(m).map_err(|e| format!("method: {e}"))?;
        }
        if self.shift.is_some() {
            s.shift = self.shift;
        }
        if let Some(v) = self.mask_sigma {
            s.mask_sigma = v;
        }
        if let Some(c) = &self.subject_center {
            s.subject_center = c
                .clone()
                .into_vec()
                .into_iter()
                .map(|v| match v {
                    CenterValue::Text(t) => parse_center(&t),
                    CenterValue::Pair([x, y]) => Ok((check_center(x)?, check_center(y)?)),
                })
                .collect::<Result<_, String>>()
                .map_err(|e| format!("subject_center: {e}"))?;
        }
        if self.clip_skip.is_some() {
            s.clip_skip = self.clip_skip;
        }
        match (&self.model, &self.model_dir) {
            (Some(_), Some(_)) => return Err("give model or model_dir, not both".into()),
            (Some(m), None) => {
                s.model = m.clone();
                s.model_dir = None;
            }
            (None, Some(d)) => {
                s.model = dir_model_name(d);
                s.model_dir = Some(d.clone());
            }
            (None, None) => {}
        }
        if let Some(l) = &self.lora {
            s.lora = l.clone().into_vec();
        }
        if let Some(o) = &self.out {
            s.out = o.clone();
        }
        if let Some(r) = &self.rng {
            s.rng = RngKind::parse(r).map_err(|e| format!("rng: {e}"))?;
        }
        if let Some(v) = &self.original_size {
            s.original_size = Some(parse_size(v).map_err(|e| format!("original_size: {e}"))?);
        }
        if let Some(v) = &self.crop_top_left {
            s.crop_top_left = Some(parse_pair(v).map_err(|e| format!("crop_top_left: {e}"))?);
        }
        if let Some(v) = &self.target_size {
            s.target_size = Some(parse_size(v).map_err(|e| format!("target_size: {e}"))?);
        }
        if let Some(v) = &self.save_latents {
            s.save_latents = Some(v.clone());
        }
        Ok(s)
    }
}

/// The name a `--model-dir` model goes by: the folder's name.
pub fn dir_model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Checks the settings a job can get wrong without loading a model.
/// `cli` words the errors with flag names (`--steps`) instead of JSONL field names (`steps`).
pub fn validate(s: &Settings, cli: bool) -> Result<(), String> {
    let f = |name: &str| {
        if cli {
            format!("--{}", name.replace('_', "-"))
        } else {
            name.to_string()
        }
    };
    if s.prompt.trim().is_empty() {
        return Err("the prompt is empty".into());
    }
    if s.steps == 0 {
        return Err(format!("{} must be at least 1", f("steps")));
    }
    if !(s.guidance.is_finite() && s.guidance >= 0.0) {
        return Err(format!(
            "{} must be a non-negative number, not {}",
            f("guidance"),
            s.guidance
        ));
    }
    if s.num_images == 0 {
        return Err(format!("{} must be at least 1", f("num_images")));
    }
    for (name, v) in [("width", s.width), ("height", s.height)] {
        if let Some(v) = v
            && (v == 0 || v % 8 != 0)
        {
            return Err(format!(
                "{} and {} must be positive multiples of 8; got {name} {v}",
                f("width"),
                f("height")
            ));
        }
    }
    if let Some(sh) = s.shift
        && !(0.0..1.0).contains(&sh)
    {
        return Err(format!("{} must be in [0, 1), not {sh}", f("shift")));
    }
    if !(s.mask_sigma > 0.0 && s.mask_sigma.is_finite()) {
        return Err(format!(
            "{} must be positive, not {}",
            f("mask_sigma"),
            s.mask_sigma
        ));
    }
    for l in &s.lora {
        let spec = crate::models::lora::LoraSpec::parse(l).map_err(|e| format!("{e:#}"))?;
        if !spec.path.is_file() {
            return Err(format!(
                "{}: {} is not a file",
                f("lora"),
                spec.path.display()
            ));
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Output-name templates
// ------------------------------------------------------------------------------------------

/// The fields a template may use.
pub const TEMPLATE_FIELDS: [&str; 8] = [
    "index", "seed", "slug", "color", "model", "date", "image", "line",
];

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field {
        name: String,
        width: usize,
        zero: bool,
    },
}

/// An output-name template such as `assets/{index:05}-{slug}-{seed}.png`. `{{` and `}}` are
/// literal braces.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// Values for a template.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    pub index: usize,
    pub seed: u64,
    pub prompt: &'a str,
    pub color: &'a KeyColor,
    pub model: &'a str,
    pub date: &'a str,
    /// The image's number within its job (0-based).
    pub image: usize,
    /// The job's line in its file (1-based; 0 for the command line).
    pub line: usize,
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut spec = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => spec.push(c),
                            None => return Err(format!("unclosed '{{' in template '{s}'")),
                        }
                    }
                    let (name, fmt) = match spec.split_once(':') {
                        Some((n, f)) => (n.trim(), Some(f.trim())),
                        None => (spec.trim(), None),
                    };
                    if !TEMPLATE_FIELDS.contains(&name) {
                        return Err(format!(
                            "unknown field '{{{name}}}' in template '{s}' (fields: {})",
                            TEMPLATE_FIELDS.join(", ")
                        ));
                    }
                    let (width, zero) = match fmt {
                        None | Some("") => (0, false),
                        Some(f) => {
                            let zero = f.starts_with('0') && f.len() > 1;
                            let w: usize = f.parse().map_err(|_| {
                                format!("bad format '{f}' for {{{name}}} in '{s}' (use e.g. {{{name}:05}})")
                            })?;
                            if w > 64 {
                                return Err(format!("width {w} for {{{name}}} is too large"));
                            }
                            (w, zero)
                        }
                    };
                    if zero && !matches!(name, "index" | "seed" | "image" | "line") {
                        return Err(format!(
                            "{{{name}}} is not a number and cannot be zero-padded"
                        ));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Field {
                        name: name.to_string(),
                        width,
                        zero,
                    });
                }
                '}' => return Err(format!("unmatched '}}' in template '{s}' (write '}}}}')")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self { pieces })
    }

    /// Whether the template uses a field.
    pub fn uses(&self, field: &str) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Field { name, .. } if name == field))
    }

    pub fn render(&self, f: &Fields) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field { name, width, zero } => {
                    let v = match name.as_str() {
                        "index" => f.index.to_string(),
                        "seed" => f.seed.to_string(),
                        "slug" => slug(f.prompt),
                        "color" => color_slug(f.color),
                        "model" => sanitize(f.model),
                        "date" => f.date.to_string(),
                        "image" => f.image.to_string(),
                        "line" => f.line.to_string(),
                        _ => unreachable!("checked in parse"),
                    };
                    if *zero {
                        out.push_str(&format!("{v:0>width$}"));
                    } else {
                        out.push_str(&format!("{v:>width$}"));
                    }
                }
            }
        }
        out
    }
}

/// A file-name-safe slug of a prompt: lowercase ASCII letters and digits joined by '-', at
/// most 48 characters, cut at a word boundary; "image" when nothing is left.
pub fn slug(prompt: &str) -> String {
    let mut out = String::new();
    for word in prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let w = word.to_ascii_lowercase();
        let extra = if out.is_empty() { w.len() } else { w.len() + 1 };
        if out.len() + extra > 48 {
            if out.is_empty() {
                out = w[..48].to_string();
            }
            break;
        }
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(&w);
    }
    if out.is_empty() { "image".into() } else { out }
}

fn color_slug(c: &KeyColor) -> String {
    match c.name {
        Some(n) => n.to_string(),
        None => c.hex().trim_start_matches('#').to_string(),
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Today's date in UTC, YYYY-MM-DD.
pub fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_date((secs / 86_400) as i64)
}

/// Days since 1970-01-01 → "YYYY-MM-DD" (Howard Hinnant's civil_from_days).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

// ------------------------------------------------------------------------------------------
// Expansion into images
// ------------------------------------------------------------------------------------------

/// One image to make: its settings, seed, and output paths.
#[derive(Debug, Clone)]
pub struct ImageJob {
    /// Position in the whole run (0-based); shards split on it.
    pub index: usize,
    /// The job's line in its file (1-based), 0 for the command line.
    pub line: usize,
    /// The image's number within its job.
    pub image: usize,
    pub seed: u64,
    pub settings: Settings,
    pub out: PathBuf,
    pub save_latents: Option<PathBuf>,
}

/// Merges, validates and expands job lines into images. `base_seed` seeds jobs without a
/// seed: their images get `base_seed + index`. Errors name the file and line.
pub fn expand(
    file: &str,
    lines: &[SourcedLine],
    base: &Settings,
    base_seed: u64,
    date: &str,
) -> Result<Vec<ImageJob>> {
    expand_with(file, lines, Vec::new(), base, base_seed, date)
}

/// [`expand`], reporting `prior` errors (from [`parse_jsonl_lenient`]) with its own, in line
/// order.
pub fn expand_with(
    file: &str,
    lines: &[SourcedLine],
    prior: Vec<(usize, String)>,
    base: &Settings,
    base_seed: u64,
    date: &str,
) -> Result<Vec<ImageJob>> {
    let mut images = Vec::new();
    let mut errors: Vec<(usize, String)> = prior;
    let bad_lines = !errors.is_empty();
    for sl in lines {
        let where_ = |e: String| {
            if sl.line == 0 {
                e
            } else {
                format!("line {}: {e}", sl.line)
            }
        };
        let settings = match sl
            .job
            .apply(base)
            .and_then(|s| validate(&s, sl.line == 0).map(|_| s))
        {
            Ok(s) => s,
            Err(e) => {
                errors.push((sl.line, where_(e)));
                continue;
            }
        };
        let out_t = match Template::parse(&settings.out) {
            Ok(t) => t,
            Err(e) => {
                errors.push((sl.line, where_(format!("out: {e}"))));
                continue;
            }
        };
        let lat_t = match settings.save_latents.as_deref().map(Template::parse) {
            Some(Err(e)) => {
                errors.push((sl.line, where_(format!("save_latents: {e}"))));
                continue;
            }
            Some(Ok(t)) => Some(t),
            None => None,
        };
        for k in 0..settings.num_images {
            let index = images.len();
            let seed = match settings.seed {
                Some(s) => s.wrapping_add(k as u64),
                None => base_seed.wrapping_add(index as u64),
            };
            let fields = Fields {
                index,
                seed,
                prompt: &settings.prompt,
                color: &settings.color,
                model: &settings.model,
                date,
                image: k,
                line: sl.line,
            };
            images.push(ImageJob {
                index,
                line: sl.line,
                image: k,
                seed,
                out: PathBuf::from(out_t.render(&fields)),
                save_latents: lat_t.as_ref().map(|t| PathBuf::from(t.render(&fields))),
                settings: settings.clone(),
            });
        }
    }
    errors.sort_by_key(|(l, _)| *l);
    line_errors(file, errors.into_iter().map(|(_, e)| e).collect())?;
    if images.is_empty() && !bad_lines {
        bail!("{file} has no jobs");
    }
    Ok(images)
}

/// Fails if two images would write the same file. `targets` lists each image's files.
pub fn check_unique_paths(file: &str, images: &[ImageJob], targets: &[Vec<PathBuf>]) -> Result<()> {
    let mut seen: HashMap<PathBuf, usize> = HashMap::new();
    let mut errors = Vec::new();
    for (img, paths) in images.iter().zip(targets) {
        for p in paths {
            let key = normalize(p);
            if let Some(&other) = seen.get(&key) {
                if other != img.index {
                    let a = &images[other];
                    errors.push(format!(
                        "{} is written by image {} ({}) and image {} ({})",
                        p.display(),
                        a.index,
                        describe_source(a),
                        img.index,
                        describe_source(img)
                    ));
                }
            } else {
                seen.insert(key, img.index);
            }
        }
    }
    if !errors.is_empty() {
        let n = errors.len();
        let shown: Vec<String> = errors.into_iter().take(5).collect();
        bail!(
            "{file}: {n} output path(s) clash: {}; use a template such as \
             --out \"out/{{index:05}}-{{slug}}-{{seed}}.png\"",
            shown.join("; ")
        );
    }
    Ok(())
}

fn describe_source(img: &ImageJob) -> String {
    if img.line == 0 {
        format!("seed {}", img.seed)
    } else {
        format!("line {}, seed {}", img.line, img.seed)
    }
}

/// A path compared lexically: "./a/../b.png" and "b.png" are the same file.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            c => out.push(c),
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// Shards
// ------------------------------------------------------------------------------------------

/// Shard `index` of `count`: image i is this shard's when i mod count == index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// "I/N".
    pub fn parse(s: &str) -> Result<Self> {
        let (i, n) = s
            .split_once('/')
            .with_context(|| format!("--shard '{s}' is not I/N (e.g. 0/4) or auto"))?;
        let i: usize = i
            .trim()
            .parse()
            .with_context(|| format!("--shard '{s}': '{i}' is not a number"))?;
        let n: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--shard '{s}': '{n}' is not a number"))?;
        Self::new(i, n)
    }

    pub fn new(index: usize, count: usize) -> Result<Self> {
        if count == 0 {
            bail!("the shard count must be at least 1");
        }
        if index >= count {
            bail!("shard index {index} is not below the shard count {count} (shards count from 0)");
        }
        Ok(Self { index, count })
    }

    /// `--shard auto`: a Slurm array task (SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_COUNT,
    /// or _MIN/_MAX), else a Kubernetes Indexed Job (JOB_COMPLETION_INDEX with `count`,
    /// from `--shard-count`). `env` looks variables up (std::env::var in real use).
    pub fn auto(env: &dyn Fn(&str) -> Option<String>, count: Option<usize>) -> Result<Self> {
        let num = |name: &str| -> Result<Option<usize>> {
            match env(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .with_context(|| format!("{name}='{v}' is not a number")),
            }
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let n = match (
                count,
                num("SLURM_ARRAY_TASK_COUNT")?,
                num("SLURM_ARRAY_TASK_MAX")?,
            ) {
                (Some(c), _, _) => c,
                (None, _, Some(max)) => max
                    .checked_sub(min)
                    .map(|d| d + 1)
                    .context("SLURM_ARRAY_TASK_MAX is below SLURM_ARRAY_TASK_MIN")?,
                (None, Some(c), None) => c,
                (None, None, None) => bail!(
                    "--shard auto: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT \
                     nor SLURM_ARRAY_TASK_MAX is; pass --shard-count"
                ),
            };
            let i = id.checked_sub(min).with_context(|| {
                format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")
            })?;
            return Self::new(i, n).context("--shard auto (Slurm array)");
        }
        if let Some(i) = num("JOB_COMPLETION_INDEX")? {
            let n = count.context(
                "--shard auto: JOB_COMPLETION_INDEX is set (Kubernetes Indexed Job); pass \
                 --shard-count with the Job's completions",
            )?;
            return Self::new(i, n).context("--shard auto (Kubernetes Indexed Job)");
        }
        bail!(
            "--shard auto found no shard in the environment (SLURM_ARRAY_TASK_ID or \
             JOB_COMPLETION_INDEX); use --shard I/N"
        )
    }

    pub fn selects(&self, index: usize) -> bool {
        index % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

// ------------------------------------------------------------------------------------------
// Manifest
// ------------------------------------------------------------------------------------------

/// `--manifest FILE.jsonl`: one JSON object a line, appended and flushed per image. Each line
/// is one `write` on a file opened for appending, so shards may share a manifest on a local
/// file system.
pub struct Manifest {
    file: File,
    path: PathBuf,
}

impl Manifest {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the manifest {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn append(&mut self, record: &serde_json::Value) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("writing the manifest {}", self.path.display()))
    }
}

// ------------------------------------------------------------------------------------------
// Interrupts
// ------------------------------------------------------------------------------------------

static SIGNALS: AtomicUsize = AtomicUsize::new(0);
static INSTALL: std::sync::Once = std::sync::Once::new();

/// Installs the SIGINT/SIGTERM handler (once): the first signal asks the run to stop at the
/// next denoising step, abandoning the images in progress (nothing of them is written); the
/// second exits at once with status 130.
pub fn install_interrupt_handler() {
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            let n = SIGNALS.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= 2 {
                eprintln!("error: interrupted again; exiting now");
                std::process::exit(130);
            }
            eprintln!(
                "interrupt: stopping after the current step (press Ctrl-C again to exit now)"
            );
        });
    });
}

/// Whether a stop was asked for.
pub fn interrupted() -> bool {
    SIGNALS.load(Ordering::SeqCst) > 0
}

/// The error a stopped run ends with (exit status 130).
#[derive(Debug, thiserror::Error)]
#[error(
    "interrupted: {done} image(s) finished, the one(s) in progress abandoned; rerun with --skip-existing to finish"
)]
pub struct Interrupted {
    pub done: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Settings {
        Settings {
            model: "tiny-sd15".into(),
            model_dir: None,
            lora: vec![],
            prompt: "a red car".into(),
            negative_prompt: String::new(),
            color: KeyColor::green(),
            seed: None,
            num_images: 1,
            steps: 2,
            guidance: 7.5,
            width: None,
            height: None,
            method: Method::Tkg,
            shift: None,
            mask_sigma: 0.5,
            subject_center: vec![],
            clip_skip: None,
            rng: RngKind::TorchCpu,
            original_size: None,
            crop_top_left: None,
            target_size: None,
            out: "{index:05}-{slug}-{seed}.png".into(),
            save_latents: None,
        }
    }

    #[test]
    fn templates_render_and_reject_unknown_fields() {
        let t = Template::parse("out/{index:05}-{slug}-{seed}-{color}-{model}{{x}}.png").unwrap();
        let c = KeyColor::parse("#102030").unwrap();
        let f = Fields {
            index: 7,
            seed: 42,
            prompt: "A red car, 4K!",
            color: &c,
            model: "my model",
            date: "2026-01-02",
            image: 0,
            line: 3,
        };
        assert_eq!(
            t.render(&f),
            "out/00007-a-red-car-4k-42-102030-my-model{x}.png"
        );
        assert!(
            Template::parse("{nope}")
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(Template::parse("{index").is_err());
        assert!(Template::parse("a}b").is_err());
        assert!(Template::parse("{slug:05}").is_err());
        assert!(Template::parse("{index:x}").is_err());
        assert!(t.uses("seed") && !t.uses("date"));
    }

    #[test]
    fn slugs_are_safe_and_short() {
        assert_eq!(slug("  "), "image");
        assert_eq!(slug("Élan, a cat"), "lan-a-cat");
        let long = "word ".repeat(40);
        let s = slug(&long);
        assert!(s.len() <= 48 && !s.ends_with('-'), "{s}");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(19_723), "2024-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
    }

    #[test]
    fn jsonl_errors_name_every_bad_line() {
        let text =
            "{\"prompt\": \"a\"}\n\n# comment\n{\"prompt\": 3}\n{\"promt\": \"x\"}\nnot json\n";
        let err = parse_jsonl("jobs.jsonl", text).unwrap_err().to_string();
        assert!(
            err.contains("line 4") && err.contains("line 5") && err.contains("line 6"),
            "{err}"
        );
        assert!(!err.contains("line 1:"), "{err}");
        assert!(err.contains("promt"), "{err}");
    }

    #[test]
    fn expansion_seeds_overrides_and_validation() {
        let text = "{\"prompt\": \"a cat\", \"seed\": 100, \"num_images\": 2}\n\
                    {\"prompt\": \"a dog\", \"color\": \"blue\", \"steps\": 3}\n\
                    {\"prompt\": \"x\", \"subject_center\": [[0.5, 0], \"-0.5,0.25\"]}\n";
        let lines = parse_jsonl("j", text).unwrap();
        let imgs = expand("j", &lines, &base(), 1000, "2026-01-01").unwrap();
        assert_eq!(imgs.len(), 4);
        assert_eq!(
            imgs.iter().map(|i| i.seed).collect::<Vec<_>>(),
            [100, 101, 1002, 1003]
        );
        assert_eq!(imgs[2].settings.steps, 3);
        assert_eq!(imgs[2].settings.color.name, Some("blue"));
        assert_eq!(
            imgs[3].settings.subject_center,
            vec![(0.5, 0.0), (-0.5, 0.25)]
        );
        assert_eq!(imgs[1].out, PathBuf::from("00001-a-cat-101.png"));

        let bad = "{\"prompt\": \"a\", \"steps\": 0}\n{\"prompt\": \"b\", \"width\": 100}\n\
                   {\"prompt\": \"c\", \"out\": \"{bogus}.png\"}\n{\"prompt\": \"d\", \"lora\": \"x.safetensors\"}\n\
                   {\"prompt\": \"e\", \"color\": \"nocolour\"}\n";
        let lines = parse_jsonl("j", bad).unwrap();
        let err = expand("j", &lines, &base(), 0, "d")
            .unwrap_err()
            .to_string();
        for n in 1..=5 {
            assert!(err.contains(&format!("line {n}:")), "{err}");
        }
    }

    #[test]
    fn clashing_paths_are_found() {
        let mut b = base();
        b.out = "same.png".into();
        let lines = parse_prompt_file("p", "a\nb\n").unwrap();
        let imgs = expand("p", &lines, &b, 0, "d").unwrap();
        let targets: Vec<Vec<PathBuf>> = imgs.iter().map(|i| vec![i.out.clone()]).collect();
        let err = check_unique_paths("p", &imgs, &targets)
            .unwrap_err()
            .to_string();
        assert!(err.contains("same.png") && err.contains("line 1") && err.contains("line 2"));
        b.out = "./x/../{seed}.png".into();
        let imgs = expand("p", &lines, &b, 0, "d").unwrap();
        let targets: Vec<Vec<PathBuf>> = imgs.iter().map(|i| vec![i.out.clone()]).collect();
        check_unique_paths("p", &imgs, &targets).unwrap();
    }

    #[test]
    fn shards_partition_and_read_the_environment() {
        let s = Shard::parse("1/3").unwrap();
        let mine: Vec<usize> = (0..10).filter(|&i| s.selects(i)).collect();
        assert_eq!(mine, [1, 4, 7]);
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("0/0").is_err());
        assert!(Shard::parse("x").is_err());
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ]);
        assert_eq!(
            Shard::auto(&slurm, None).unwrap(),
            Shard { index: 2, count: 4 }
        );
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "8"),
        ]);
        assert_eq!(
            Shard::auto(&slurm, None).unwrap(),
            Shard { index: 4, count: 8 }
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert_eq!(
            Shard::auto(&k8s, Some(5)).unwrap(),
            Shard { index: 3, count: 5 }
        );
        assert!(Shard::auto(&k8s, None).is_err());
        assert!(Shard::auto(&env(&[]), Some(2)).is_err());
    }
}
