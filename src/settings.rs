//! Per-image settings: one [`Settings`] type, and one way to change it, a [`SettingsPatch`].
//! Command-line flags and JSONL job lines are both patches, applied with
//! [`SettingsPatch::apply`]; [`Settings::validate`] returns field errors that each caller
//! words with its own names (`--steps` on the command line, `steps` in a job file).

use crate::color::KeyColor;
use crate::limits;
use crate::rng::RngKind;
use crate::sampling::{SamplerKind, Schedule, Spacing};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// An image size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Size {
    pub width: usize,
    pub height: usize,
}

impl Size {
    pub fn new(width: usize, height: usize) -> Self {
        Self { width, height }
    }

    /// "WIDTHxHEIGHT".
    pub fn parse(s: &str) -> Result<Self, String> {
        let (w, h) = s
            .split_once(['x', 'X'])
            .ok_or_else(|| format!("'{s}' is not WIDTHxHEIGHT"))?;
        let n = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{v}' is not a size"))
        };
        Ok(Self::new(n(w)?, n(h)?))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// A crop offset in pixels (SDXL's `crops_coords_top_left`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Offset {
    pub top: usize,
    pub left: usize,
}

impl Offset {
    /// "TOP,LEFT".
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once(',')
            .ok_or_else(|| format!("'{s}' is not TOP,LEFT"))?;
        let n = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{v}' is not a number"))
        };
        Ok(Self {
            top: n(a)?,
            left: n(b)?,
        })
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.top, self.left)
    }
}

/// How to get a flat background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// TKG-DM: shifted initial noise (the default).
    #[default]
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

    /// The prompt this method sends to the text encoder.
    pub fn prompt_text(self, prompt: &str, color: &KeyColor) -> String {
        match self {
            Method::Prompt => format!("{prompt}{}", prompt_suffix(color)),
            Method::Tkg | Method::Plain => prompt.to_string(),
        }
    }
}

/// What `--method prompt` appends to the prompt.
pub fn prompt_suffix(color: &KeyColor) -> String {
    format!(" isolated on a solid {} background", color.prompt_words())
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

/// Every per-image setting. Run-wide options (device, shards, keying, ...) are
/// [`crate::run::RunConfig`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    /// A registry model name, or the folder's name with `model_dir`.
    pub model: String,
    pub model_dir: Option<PathBuf>,
    /// LoRAs for this job, `FILE[:WEIGHT]`, on top of the run's.
    pub lora: Vec<String>,
    pub prompt: String,
    pub negative_prompt: String,
    #[serde(serialize_with = "as_text")]
    pub color: KeyColor,
    /// The first image's seed; `None` = the run's base seed plus the image index.
    pub seed: Option<u64>,
    pub num_images: usize,
    /// `None`: the model's, else [`DEFAULT_STEPS`].
    pub steps: Option<usize>,
    /// `None`: the model's, else [`DEFAULT_GUIDANCE`].
    pub guidance: Option<f64>,
    /// `None`: the model's, else DDIM.
    pub sampler: Option<SamplerKind>,
    /// `None`: the model's, else the sampler's own spacing of noise levels.
    pub schedule: Option<Schedule>,
    /// DDIM's eta: 0 is deterministic.
    pub eta: f64,
    /// `None`: the model's, else the scheduler config's `timestep_spacing`.
    pub spacing: Option<Spacing>,
    /// `None`: the model's.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub method: Method,
    /// `None`: the model's, else the family's.
    pub shift: Option<f64>,
    pub mask_sigma: f64,
    pub subject_center: Vec<(f64, f64)>,
    pub clip_skip: Option<usize>,
    #[serde(serialize_with = "as_text")]
    pub rng: RngKind,
    /// SDXL micro-conditioning; `None`: the image size, no crop.
    pub original_size: Option<Size>,
    pub crop_top_left: Option<Offset>,
    pub target_size: Option<Size>,
    /// The SDXL refiner's aesthetic scores (prompt, negative prompt); `None`: 6 and 2.5.
    pub aesthetic_score: Option<f64>,
    pub negative_aesthetic_score: Option<f64>,
    /// The output template.
    pub out: String,
    /// A template for the latents file, if wanted.
    pub save_latents: Option<String>,
    /// img2img / inpainting: the photo to start from.
    pub init_image: Option<PathBuf>,
    /// The fraction of the schedule img2img runs; `None`: the family's default
    /// ([`crate::family::FamilySpec::default_strength`]).
    pub strength: Option<f64>,
    /// Inpainting: what to repaint in the init image (white = repaint).
    pub mask: Option<PathBuf>,
    /// Seeds tried per image (seed, seed + n, ... with n the job's image count); the one
    /// whose key scores best is kept.
    pub best_of: usize,
    /// What to write of the tries.
    pub keep: Keep,
    /// Retry with the next seeds while the best keyability score is below this.
    pub min_keyability: Option<f64>,
    /// How many more seeds to try for `min_keyability`.
    pub retries: usize,
    /// Not empty: pick the key colour among these by a preview of each (`--color auto`).
    #[serde(serialize_with = "colors_as_text")]
    pub auto_colors: Vec<KeyColor>,
}

/// What `--keep` keeps of an image's tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// Only the best, as the image.
    #[default]
    Best,
    /// The best as the image, and every try as `X.tryN.png` with its keyed outputs.
    All,
}

impl Keep {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "best" => Ok(Self::Best),
            "all" => Ok(Self::All),
            _ => Err(format!("'{s}' is not best or all")),
        }
    }
}

/// The candidates `--color auto` picks from unless `--colors` says.
pub const AUTO_COLORS: [&str; 3] = ["green", "blue", "magenta"];

/// A `--color` value: a key colour, or `auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColorChoice {
    Fixed(KeyColor),
    Auto,
}

impl ColorChoice {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        KeyColor::parse(s)
            .map(Self::Fixed)
            .map_err(|e| e.to_string())
    }
}

/// `--colors green,blue`: the auto candidates, each a colour (not `auto`), none twice.
pub fn parse_colors(s: &str) -> Result<Vec<KeyColor>, String> {
    let mut out: Vec<KeyColor> = Vec::new();
    for part in s.split(',') {
        let c = KeyColor::parse(part.trim()).map_err(|e| format!("--colors: {e}"))?;
        if out.contains(&c) {
            return Err(format!("--colors: {} is given twice", part.trim()));
        }
        out.push(c);
    }
    Ok(out)
}

/// The default auto candidates.
pub fn default_auto_colors() -> Vec<KeyColor> {
    AUTO_COLORS
        .iter()
        .map(|c| KeyColor::parse(c).expect("named colours parse"))
        .collect()
}

fn colors_as_text<S: serde::Serializer>(v: &[KeyColor], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|c| c.to_string()))
}

fn as_text<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Steps when neither the user nor the model says.
pub const DEFAULT_STEPS: usize = 50;
/// Guidance when neither the user nor the model says.
pub const DEFAULT_GUIDANCE: f64 = 7.5;

impl Default for Settings {
    /// The defaults of `tkg generate`: the model's sampler, steps and guidance (DDIM, 50, 7.5
    /// unless the registry says otherwise), TKG-DM on green.
    fn default() -> Self {
        Self {
            model: "sd15".into(),
            model_dir: None,
            lora: Vec::new(),
            prompt: String::new(),
            negative_prompt: String::new(),
            color: KeyColor::green(),
            seed: None,
            num_images: 1,
            steps: None,
            guidance: None,
            sampler: None,
            schedule: None,
            eta: 0.0,
            spacing: None,
            width: None,
            height: None,
            method: Method::Tkg,
            shift: None,
            mask_sigma: 0.5,
            subject_center: Vec::new(),
            clip_skip: None,
            rng: RngKind::TorchCpu,
            original_size: None,
            crop_top_left: None,
            aesthetic_score: None,
            negative_aesthetic_score: None,
            target_size: None,
            out: "tkg-{seed}.png".into(),
            save_latents: None,
            init_image: None,
            strength: None,
            mask: None,
            best_of: 1,
            keep: Keep::Best,
            min_keyability: None,
            retries: 0,
            auto_colors: Vec::new(),
        }
    }
}

/// Where a model comes from, as a patch names it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelChoice {
    /// A registry name.
    Named(String),
    /// A diffusers folder.
    Dir(PathBuf),
}

/// Changes to [`Settings`]: every field that is `Some` replaces the setting.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SettingsPatch {
    pub model: Option<ModelChoice>,
    pub lora: Option<Vec<String>>,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub color: Option<KeyColor>,
    pub seed: Option<u64>,
    pub num_images: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub sampler: Option<SamplerKind>,
    pub schedule: Option<Schedule>,
    pub eta: Option<f64>,
    pub spacing: Option<Spacing>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub method: Option<Method>,
    pub shift: Option<f64>,
    pub mask_sigma: Option<f64>,
    pub subject_center: Option<Vec<(f64, f64)>>,
    pub clip_skip: Option<usize>,
    pub rng: Option<RngKind>,
    pub original_size: Option<Size>,
    pub crop_top_left: Option<Offset>,
    pub target_size: Option<Size>,
    pub aesthetic_score: Option<f64>,
    pub negative_aesthetic_score: Option<f64>,
    pub out: Option<String>,
    pub save_latents: Option<String>,
    pub init_image: Option<PathBuf>,
    pub strength: Option<f64>,
    pub mask: Option<PathBuf>,
    pub best_of: Option<usize>,
    pub keep: Option<Keep>,
    pub min_keyability: Option<f64>,
    pub retries: Option<usize>,
    /// `Some(empty)`: a fixed colour (`color`); else the auto candidates.
    pub auto_colors: Option<Vec<KeyColor>>,
}

/// The name a `--model-dir` model goes by: the folder's name.
pub fn dir_model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

impl SettingsPatch {
    /// `base` with this patch's fields replaced.
    pub fn apply(&self, base: &Settings) -> Settings {
        let mut s = base.clone();
        fn set<T: Clone>(to: &mut T, from: &Option<T>) {
            if let Some(v) = from {
                *to = v.clone();
            }
        }
        fn set_opt<T: Clone>(to: &mut Option<T>, from: &Option<T>) {
            if from.is_some() {
                *to = from.clone();
            }
        }
        match &self.model {
            Some(ModelChoice::Named(m)) => {
                s.model = m.clone();
                s.model_dir = None;
            }
            Some(ModelChoice::Dir(d)) => {
                s.model = dir_model_name(d);
                s.model_dir = Some(d.clone());
            }
            None => {}
        }
        set(&mut s.lora, &self.lora);
        set(&mut s.prompt, &self.prompt);
        set(&mut s.negative_prompt, &self.negative_prompt);
        set(&mut s.color, &self.color);
        set_opt(&mut s.seed, &self.seed);
        set(&mut s.num_images, &self.num_images);
        set_opt(&mut s.steps, &self.steps);
        set_opt(&mut s.guidance, &self.guidance);
        set_opt(&mut s.sampler, &self.sampler);
        set_opt(&mut s.schedule, &self.schedule);
        set(&mut s.eta, &self.eta);
        set_opt(&mut s.spacing, &self.spacing);
        set_opt(&mut s.width, &self.width);
        set_opt(&mut s.height, &self.height);
        set(&mut s.method, &self.method);
        set_opt(&mut s.shift, &self.shift);
        set(&mut s.mask_sigma, &self.mask_sigma);
        set(&mut s.subject_center, &self.subject_center);
        set_opt(&mut s.clip_skip, &self.clip_skip);
        set(&mut s.rng, &self.rng);
        set_opt(&mut s.original_size, &self.original_size);
        set_opt(&mut s.crop_top_left, &self.crop_top_left);
        set_opt(&mut s.target_size, &self.target_size);
        set_opt(&mut s.aesthetic_score, &self.aesthetic_score);
        set_opt(
            &mut s.negative_aesthetic_score,
            &self.negative_aesthetic_score,
        );
        set(&mut s.out, &self.out);
        set_opt(&mut s.save_latents, &self.save_latents);
        set_opt(&mut s.init_image, &self.init_image);
        set_opt(&mut s.strength, &self.strength);
        set_opt(&mut s.mask, &self.mask);
        set(&mut s.best_of, &self.best_of);
        set(&mut s.keep, &self.keep);
        set_opt(&mut s.min_keyability, &self.min_keyability);
        set(&mut s.retries, &self.retries);
        set(&mut s.auto_colors, &self.auto_colors);
        s
    }

    /// Parses one JSONL job line. Values are checked here, so an error names its field
    /// (`color: cannot parse colour ...`).
    pub fn from_json(line: &str) -> Result<Self, String> {
        let raw: RawPatch = serde_json::from_str(line).map_err(|e| {
            // serde counts lines and columns within the one line.
            let msg = e.to_string();
            match msg.rsplit_once(" at line 1 column ") {
                Some((m, col)) => format!("{m} (column {col})"),
                None => msg,
            }
        })?;
        raw.into_patch()
    }
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

/// A job line as JSON has it, before its values are parsed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPatch {
    prompt: Option<String>,
    negative_prompt: Option<String>,
    color: Option<String>,
    seed: Option<u64>,
    num_images: Option<usize>,
    steps: Option<usize>,
    #[serde(alias = "cfg_scale")]
    guidance: Option<f64>,
    sampler: Option<String>,
    schedule: Option<String>,
    eta: Option<f64>,
    timestep_spacing: Option<String>,
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
    aesthetic_score: Option<f64>,
    negative_aesthetic_score: Option<f64>,
    save_latents: Option<String>,
    init_image: Option<PathBuf>,
    strength: Option<f64>,
    mask: Option<PathBuf>,
    best_of: Option<usize>,
    keep: Option<String>,
    min_keyability: Option<f64>,
    retries: Option<usize>,
    colors: Option<OneOrMany<String>>,
}

/// Parses an optional field, prefixing its error with the field's name.
fn field<T, E: fmt::Display>(
    name: &str,
    v: Option<String>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Option<T>, String> {
    v.map(|v| parse(&v).map_err(|e| format!("{name}: {e}")))
        .transpose()
}

impl RawPatch {
    fn into_patch(self) -> Result<SettingsPatch, String> {
        let model = match (self.model, self.model_dir) {
            (Some(_), Some(_)) => return Err("give model or model_dir, not both".into()),
            (Some(m), None) => Some(ModelChoice::Named(m)),
            (None, Some(d)) => Some(ModelChoice::Dir(d)),
            (None, None) => None,
        };
        let subject_center = self
            .subject_center
            .map(|c| {
                c.into_vec()
                    .into_iter()
                    .map(|v| match v {
                        CenterValue::Text(t) => parse_center(&t),
                        CenterValue::Pair([x, y]) => Ok((check_center(x)?, check_center(y)?)),
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| format!("subject_center: {e}"))
            })
            .transpose()?;
        let color = field("color", self.color, ColorChoice::parse)?;
        let colors = self
            .colors
            .map(|c| {
                parse_colors(&c.into_vec().join(","))
                    .map_err(|e| e.replacen("--colors", "colors", 1))
            })
            .transpose()?;
        let (color, auto_colors) = match (color, colors) {
            (Some(ColorChoice::Auto), colors) => {
                (None, Some(colors.unwrap_or_else(default_auto_colors)))
            }
            (_, Some(_)) => return Err("colors: give \"color\": \"auto\" with it".into()),
            (Some(ColorChoice::Fixed(c)), None) => (Some(c), Some(Vec::new())),
            (None, None) => (None, None),
        };
        Ok(SettingsPatch {
            model,
            lora: self.lora.map(OneOrMany::into_vec),
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            color,
            auto_colors,
            seed: self.seed,
            num_images: self.num_images,
            steps: self.steps,
            guidance: self.guidance,
            sampler: field("sampler", self.sampler, SamplerKind::parse)?,
            schedule: field("schedule", self.schedule, Schedule::parse)?,
            eta: self.eta,
            spacing: field("timestep_spacing", self.timestep_spacing, Spacing::parse)?,
            width: self.width,
            height: self.height,
            method: field("method", self.method, Method::parse)?,
            shift: self.shift,
            mask_sigma: self.mask_sigma,
            subject_center,
            clip_skip: self.clip_skip,
            rng: field("rng", self.rng, RngKind::parse)?,
            original_size: field("original_size", self.original_size, Size::parse)?,
            crop_top_left: field("crop_top_left", self.crop_top_left, Offset::parse)?,
            target_size: field("target_size", self.target_size, Size::parse)?,
            aesthetic_score: self.aesthetic_score,
            negative_aesthetic_score: self.negative_aesthetic_score,
            out: self.out,
            save_latents: self.save_latents,
            init_image: self.init_image,
            strength: self.strength,
            mask: self.mask,
            best_of: self.best_of,
            keep: field("keep", self.keep, Keep::parse)?,
            min_keyability: self.min_keyability,
            retries: self.retries,
        })
    }
}

/// A setting that is wrong. `text` names its fields as `{0}`, `{1}`: [`Self::worded`] puts in
/// each caller's names.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub fields: &'static [&'static str],
    pub text: String,
}

impl FieldError {
    fn new(fields: &'static [&'static str], text: String) -> Self {
        Self { fields, text }
    }

    /// The message with each field called `name(field)`.
    pub fn worded(&self, name: impl Fn(&str) -> String) -> String {
        let mut out = self.text.clone();
        for (i, f) in self.fields.iter().enumerate() {
            out = out.replace(&format!("{{{i}}}"), &name(f));
        }
        out
    }

    /// As a command line names them: `--num-images`.
    pub fn as_flags(&self) -> String {
        self.worded(|f| format!("--{}", f.replace('_', "-")))
    }

    /// As a job file names them: `num_images`.
    pub fn as_fields(&self) -> String {
        self.worded(str::to_string)
    }
}

impl Settings {
    /// Checks what can be wrong without a model. Sizes must be multiples of
    /// [`crate::family::SIZE_MULTIPLE`]; the loaded model checks them against its VAE again.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.prompt.trim().is_empty() {
            return Err(FieldError::new(&["prompt"], "the prompt is empty".into()));
        }
        if self.prompt.chars().count() > limits::MAX_PROMPT_CHARS
            || self.negative_prompt.chars().count() > limits::MAX_PROMPT_CHARS
        {
            return Err(FieldError::new(
                &[],
                format!(
                    "the prompt is longer than {} characters",
                    limits::MAX_PROMPT_CHARS
                ),
            ));
        }
        if self.prompt.contains('\0') || self.negative_prompt.contains('\0') {
            return Err(FieldError::new(
                &[],
                "the prompt contains a NUL character".into(),
            ));
        }
        if let Some(steps) = self.steps
            && (steps == 0 || steps > limits::MAX_STEPS)
        {
            return Err(FieldError::new(
                &["steps"],
                format!("{{0}} must be 1 to {}, not {steps}", limits::MAX_STEPS),
            ));
        }
        if let Some(g) = self.guidance
            && !(g.is_finite() && g >= 0.0)
        {
            return Err(FieldError::new(
                &["guidance"],
                format!("{{0}} must be a non-negative number, not {g}"),
            ));
        }
        if !(0.0..=1.0).contains(&self.eta) {
            return Err(FieldError::new(
                &["eta"],
                format!("{{0}} must be between 0 and 1, not {}", self.eta),
            ));
        }
        if self.num_images == 0 || self.num_images > limits::MAX_IMAGES {
            return Err(FieldError::new(
                &["num_images"],
                format!(
                    "{{0}} must be 1 to {}, not {}",
                    limits::MAX_IMAGES,
                    self.num_images
                ),
            ));
        }
        let m = crate::family::SIZE_MULTIPLE;
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v
                && (v == 0 || v % m != 0)
            {
                return Err(FieldError::new(
                    &["width", "height"],
                    format!("{{0}} and {{1}} must be positive multiples of {m}; got {name} {v}"),
                ));
            }
        }
        let (w, h) = (self.width.unwrap_or(8), self.height.unwrap_or(8));
        if let Err(e) = limits::check_image_size(w, h) {
            return Err(FieldError::new(
                &["width", "height"],
                format!("{{0}}/{{1}}: {e}"),
            ));
        }
        if let Some(sh) = self.shift
            && !(0.0..1.0).contains(&sh)
        {
            return Err(FieldError::new(
                &["shift"],
                format!("{{0}} must be in [0, 1), not {sh}"),
            ));
        }
        if !(self.mask_sigma > 0.0 && self.mask_sigma.is_finite()) {
            return Err(FieldError::new(
                &["mask_sigma"],
                format!("{{0}} must be positive, not {}", self.mask_sigma),
            ));
        }
        for (names, v) in [
            (&["aesthetic_score"], self.aesthetic_score),
            (&["negative_aesthetic_score"], self.negative_aesthetic_score),
        ] {
            if let Some(v) = v
                && !(0.0..=10.0).contains(&v)
            {
                return Err(FieldError::new(
                    names,
                    format!("{{0}} must be in [0, 10] (the aesthetic predictor's scale), not {v}"),
                ));
            }
        }
        if let Some(st) = self.strength
            && !(st > 0.0 && st <= 1.0)
        {
            return Err(FieldError::new(
                &["strength"],
                format!("{{0}} must be in (0, 1], not {st}"),
            ));
        }
        if self.init_image.is_none() && (self.strength.is_some() || self.mask.is_some()) {
            return Err(FieldError::new(
                &["strength", "mask", "init_image"],
                "{0} and {1} need {2}".into(),
            ));
        }
        for (name, path) in [("init_image", &self.init_image), ("mask", &self.mask)] {
            if let Some(p) = path
                && !p.is_file()
            {
                let names: &'static [&'static str] = if name == "mask" {
                    &["mask"]
                } else {
                    &["init_image"]
                };
                return Err(FieldError::new(
                    names,
                    format!("{{0}}: {} is not a file", p.display()),
                ));
            }
        }
        if self.best_of == 0 || self.best_of + self.retries > limits::MAX_TRIES {
            return Err(FieldError::new(
                &["best_of", "retries"],
                format!(
                    "{{0}} must be at least 1, and {{0}} plus {{1}} at most {}; got {} and {}",
                    limits::MAX_TRIES,
                    self.best_of,
                    self.retries
                ),
            ));
        }
        if let Some(m) = self.min_keyability
            && !(0.0..=100.0).contains(&m)
        {
            return Err(FieldError::new(
                &["min_keyability"],
                format!("{{0}} must be a score from 0 to 100, not {m}"),
            ));
        }
        if self.retries > 0 && self.min_keyability.is_none() {
            return Err(FieldError::new(
                &["retries", "min_keyability"],
                "{0} retries images below {1}; give {1}".into(),
            ));
        }
        if self.auto_colors.len() > limits::MAX_AUTO_COLORS {
            return Err(FieldError::new(
                &["colors"],
                format!(
                    "{{0}}: at most {} candidates, not {}",
                    limits::MAX_AUTO_COLORS,
                    self.auto_colors.len()
                ),
            ));
        }
        for l in &self.lora {
            let spec = crate::models::lora::LoraSpec::parse(l)
                .map_err(|e| FieldError::new(&[], format!("{e:#}")))?;
            if !spec.path.is_file() {
                return Err(FieldError::new(
                    &["lora"],
                    format!("{{0}}: {} is not a file", spec.path.display()),
                ));
            }
        }
        Ok(())
    }

    /// img2img's strength: the given one, else the family's default for img2img or, with a
    /// mask, inpainting (`None` without an init image).
    pub fn effective_strength(&self, family: crate::family::Family) -> Option<f64> {
        self.init_image.as_ref()?;
        let d = family.spec().default_strength;
        Some(self.strength.unwrap_or(if self.mask.is_some() {
            d.inpaint
        } else {
            d.img2img
        }))
    }

    /// The subject centres TKG-DM uses: the given ones, else the image centre.
    pub fn centers(&self) -> Vec<(f64, f64)> {
        if self.subject_center.is_empty() {
            vec![(0.0, 0.0)]
        } else {
            self.subject_center.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_lines_choose_auto_or_fixed_colours_and_tries() {
        let base = Settings {
            prompt: "a car".into(),
            ..Settings::default()
        };
        let auto = SettingsPatch::from_json(
            r#"{"color": "auto", "colors": ["green", "blue"], "best_of": 3, "keep": "all"}"#,
        )
        .unwrap()
        .apply(&base);
        let names: Vec<String> = auto.auto_colors.iter().map(|c| c.to_string()).collect();
        assert_eq!(names, ["green", "blue"]);
        assert_eq!((auto.best_of, auto.keep), (3, Keep::All));
        let default_auto = SettingsPatch::from_json(r#"{"color": "auto"}"#)
            .unwrap()
            .apply(&base);
        assert_eq!(default_auto.auto_colors.len(), AUTO_COLORS.len());
        // A fixed colour on a job line undoes the command line's auto.
        let fixed = SettingsPatch::from_json(r#"{"color": "blue"}"#)
            .unwrap()
            .apply(&auto);
        assert!(fixed.auto_colors.is_empty());
        assert_eq!(fixed.color.to_string(), "blue");
        let e = SettingsPatch::from_json(r#"{"colors": "green"}"#).unwrap_err();
        assert!(e.contains("auto"), "{e}");
        let e = SettingsPatch::from_json(r#"{"keep": "most"}"#).unwrap_err();
        assert!(e.contains("keep"), "{e}");
        let retry = SettingsPatch::from_json(r#"{"retries": 2}"#)
            .unwrap()
            .apply(&base);
        assert!(
            retry
                .validate()
                .unwrap_err()
                .as_fields()
                .contains("min_keyability")
        );
    }

    #[test]
    fn a_patch_replaces_only_its_fields() {
        let base = Settings {
            prompt: "a car".into(),
            width: Some(64),
            ..Settings::default()
        };
        let p = SettingsPatch::from_json(
            r#"{"steps": 3, "color": "blue", "model_dir": "m/dir", "subject_center": [[0.5, 0], "-0.5,0.25"]}"#,
        )
        .unwrap();
        let s = p.apply(&base);
        assert_eq!(
            (s.steps, s.prompt.as_str(), s.width),
            (Some(3), "a car", Some(64))
        );
        assert_eq!(s.color.name, Some("blue"));
        assert_eq!(
            (s.model.as_str(), s.model_dir),
            ("dir", Some("m/dir".into()))
        );
        assert_eq!(s.subject_center, vec![(0.5, 0.0), (-0.5, 0.25)]);
        assert_eq!(SettingsPatch::default().apply(&base), base);
    }

    #[test]
    fn json_values_are_parsed_with_their_field_named() {
        let e = SettingsPatch::from_json(r#"{"color": "nocolour"}"#).unwrap_err();
        assert!(e.starts_with("color: "), "{e}");
        let e = SettingsPatch::from_json(r#"{"target_size": "64by64"}"#).unwrap_err();
        assert!(e.starts_with("target_size: "), "{e}");
        let e = SettingsPatch::from_json(r#"{"promt": "x"}"#).unwrap_err();
        assert!(e.contains("promt") && e.contains("(column"), "{e}");
        let e = SettingsPatch::from_json(r#"{"model": "a", "model_dir": "b"}"#).unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let e = SettingsPatch::from_json(r#"{"sampler": "dpm++3m"}"#).unwrap_err();
        assert!(e.starts_with("sampler: ") && e.contains("unipc"), "{e}");
        let p = SettingsPatch::from_json(
            r#"{"sampler": "DPM++2M", "schedule": "Karras", "eta": 0.25, "timestep_spacing": "trailing"}"#,
        )
        .unwrap();
        assert_eq!(
            (p.sampler, p.schedule, p.eta, p.spacing),
            (
                Some(SamplerKind::DpmPp2m),
                Some(Schedule::Karras),
                Some(0.25),
                Some(Spacing::Trailing)
            )
        );
        let p = SettingsPatch::from_json(r#"{"cfg_scale": 5, "lora": "x.safetensors"}"#).unwrap();
        assert_eq!(p.guidance, Some(5.0));
        assert_eq!(p.lora, Some(vec!["x.safetensors".to_string()]));
    }

    #[test]
    fn field_errors_are_worded_per_caller() {
        let s = Settings {
            prompt: "x".into(),
            num_images: 0,
            ..Settings::default()
        };
        let e = s.validate().unwrap_err();
        assert_eq!(e.as_flags(), "--num-images must be 1 to 1000000, not 0");
        assert_eq!(e.as_fields(), "num_images must be 1 to 1000000, not 0");
        let s = Settings {
            prompt: "x".into(),
            width: Some(100),
            ..Settings::default()
        };
        assert_eq!(
            s.validate().unwrap_err().as_flags(),
            "--width and --height must be positive multiples of 8; got width 100"
        );
        let empty = Settings::default().validate().unwrap_err();
        assert_eq!(empty.as_fields(), "the prompt is empty");
    }

    #[test]
    fn sizes_and_offsets_read_as_people_write_them() {
        assert_eq!(Size::parse("640x480").unwrap(), Size::new(640, 480));
        assert_eq!(Size::parse("640X480").unwrap().to_string(), "640x480");
        assert!(Size::parse("640").is_err());
        assert_eq!(Offset::parse("3, 4").unwrap(), Offset { top: 3, left: 4 });
        assert!(parse_center("2,0").is_err());
        assert_eq!(
            Method::Prompt.prompt_text("a cat", &KeyColor::green()),
            "a cat isolated on a solid green background"
        );
    }

    #[test]
    fn default_strengths_are_diffusers_per_family_and_pipeline() {
        use crate::family::Family;
        let mut s = Settings::default();
        assert_eq!(s.effective_strength(Family::Sd15), None);
        s.init_image = Some("photo.png".into());
        assert_eq!(s.effective_strength(Family::Sd15), Some(0.8));
        assert_eq!(s.effective_strength(Family::Sdxl), Some(0.3));
        s.mask = Some("mask.png".into());
        assert_eq!(s.effective_strength(Family::Sd15), Some(1.0));
        assert_eq!(s.effective_strength(Family::Sdxl), Some(0.9999));
        s.strength = Some(0.5);
        assert_eq!(s.effective_strength(Family::Sdxl), Some(0.5));
    }
}
