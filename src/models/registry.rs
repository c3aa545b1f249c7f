//! The registry of named models (`tkg --model NAME`).
//!
//! The built-in entries live in `models.toml` at the repository root (compiled in with
//! `include_str!`); its header comment documents the format. Users merge their own file over it
//! (see [`Registry::load`]): an entry with the same name replaces the built-in one entirely.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use super::hub::{ModelFolder, builtin_cache_dir};
use crate::sampling::{SamplerKind, SamplingDefaults, Schedule, Spacing};

/// The built-in registry text (models.toml at the repository root).
pub const BUILTIN_MODELS_TOML: &str = include_str!("../../models.toml");

/// Names of the models tkg materialises itself (`builtin = true`).
pub const BUILTIN_NAMES: &[&str] = &[
    "tiny-sd15",
    "tiny-sdxl",
    "tiny-sd15-inpaint",
    "tiny-sdxl-inpaint",
    "random-sd15",
    "random-sdxl",
];

pub use crate::family::Family;

/// What an entry holds: a whole pipeline, or only a VAE (usable as another entry's `vae`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A diffusers pipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/ ...
    #[default]
    Pipeline,
    /// A VAE-only folder/repo: config.json + diffusion_pytorch_model.safetensors at its root.
    Vae,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Pipeline => "pipeline",
            ModelKind::Vae => "vae",
        })
    }
}

/// Where an entry's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A Hugging Face Hub repo, read through the HF cache.
    Hub { repo: String, revision: String },
    /// A local diffusers-layout folder.
    Dir(PathBuf),
    /// A single-file (A1111/ComfyUI) `.safetensors` checkpoint.
    File(PathBuf),
    /// A model tkg materialises itself into [`builtin_cache_dir`].
    Builtin,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Hub { repo, revision } => write!(f, "hub {repo}@{revision}"),
            Source::Dir(p) => write!(f, "folder {}", p.display()),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Builtin => f.write_str("built-in"),
        }
    }
}

/// One named model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    pub name: String,
    pub family: Family,
    pub kind: ModelKind,
    pub source: Source,
    pub description: String,
    /// The repo has `*.fp16.safetensors` files to use when the dtype is f16.
    pub fp16_variant: bool,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub tkg_shift: Option<f64>,
    /// The sampler, steps and guidance the model is made for (Turbo, Lightning, LCM).
    pub sampling: SamplingDefaults,
    /// Another registry entry, or a Hub repo `ORG/NAME`, used as the VAE for f16/bf16.
    pub vae: Option<String>,
    /// The user file this entry came from; `None` for built-in entries.
    pub origin: Option<PathBuf>,
}

impl ModelEntry {
    /// A view of the entry's diffusers-layout folder (Hub snapshot, local folder, or the
    /// materialised built-in folder). A built-in model must have been materialised first;
    /// a single-file entry has no folder and is an error.
    pub fn folder(&self) -> Result<ModelFolder> {
        match &self.source {
            Source::Hub { repo, revision } => ModelFolder::hub(repo, revision),
            Source::Dir(dir) => ModelFolder::local(dir)
                .with_context(|| format!("model `{}` ({})", self.name, self.source)),
            Source::File(p) => bail!(
                "model `{}` is a single-file checkpoint ({}), not a diffusers folder",
                self.name,
                p.display()
            ),
            Source::Builtin => {
                ModelFolder::local(&builtin_cache_dir(&self.name)).with_context(|| {
                    format!(
                        "built-in model `{}` has not been materialised yet",
                        self.name
                    )
                })
            }
        }
    }

    /// Whether the model can be used without downloading anything: the files it needs
    /// (see [`has_needed_files`]) are in the Hub snapshot (which has model_index.json, or
    /// config.json for a VAE repo), the local folder or the materialised built-in folder
    /// (whose model_index.json, written last, marks it complete); a single file exists.
    pub fn is_cached(&self) -> bool {
        match &self.source {
            Source::Hub { repo, revision } => ModelFolder::hub(repo, revision)
                .ok()
                .filter(ModelFolder::is_cached)
                .and_then(|f| f.root())
                .is_some_and(|root| has_needed_files(&root, self.kind, self.family)),
            Source::Dir(dir) => has_needed_files(dir, self.kind, self.family),
            Source::File(p) => is_file_through_links(p),
            Source::Builtin => {
                let dir = builtin_cache_dir(&self.name);
                is_file_through_links(&dir.join("model_index.json"))
                    && has_needed_files(&dir, self.kind, self.family)
            }
        }
    }

    /// An error when `found`, the family the model's own configs say (e.g.
    /// [`crate::pipeline::detect_family`]), is not the entry's `family`: the registry's
    /// family is otherwise taken on trust (default size, shift, which VAE fits).
    pub fn check_family(&self, found: Family) -> Result<()> {
        if found == self.family {
            return Ok(());
        }
        let file = match &self.origin {
            Some(p) => p.display().to_string(),
            None => "<built-in models.toml>".to_string(),
        };
        bail!(
            "model `{}` is listed as {} in {file}, but its configs are those of an {found} \
             model; set `family = \"{found}\"` in its [models.{}] entry",
            self.name,
            self.family,
            self.name
        )
    }
}

/// Whether `p` is a file, following symlinks: a Hub snapshot holds links into `blobs/`, and
/// a link whose blob was deleted must not count (`symlink_metadata` would say it exists).
fn is_file_through_links(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file())
}

/// Whether the model folder `root` has, through their links, every file the loader cannot
/// do without: each component's config and safetensors weights (plain or `.fp16`), the
/// scheduler config and each text tower's tokenizer (`tokenizer.json`, or `vocab.json` with
/// `merges.txt`). Optional files (model_index.json, tokenizer side files) are not required.
pub fn has_needed_files(root: &Path, kind: ModelKind, family: Family) -> bool {
    let file = |rel: &str| is_file_through_links(&root.join(rel));
    let weights = |dir: &str, name: &str| {
        file(&format!("{dir}{name}.safetensors")) || file(&format!("{dir}{name}.fp16.safetensors"))
    };
    let component =
        |dir: &str, name: &str| file(&format!("{dir}config.json")) && weights(dir, name);
    match kind {
        // As the loader reads a VAE folder: vae/ when it has vae/config.json, else the root.
        ModelKind::Vae if file("vae/config.json") => component("vae/", "diffusion_pytorch_model"),
        ModelKind::Vae => component("", "diffusion_pytorch_model"),
        ModelKind::Pipeline => {
            // A tower model_index.json marks absent is not needed (the SDXL refiner's CLIP-L).
            let index: Option<super::config::ModelIndex> =
                super::config::read_json(&root.join("model_index.json")).ok();
            let lacks = |s: &str| {
                index
                    .as_ref()
                    .is_some_and(|i| i.lacks(&format!("text_encoder{s}")))
            };
            component("unet/", "diffusion_pytorch_model")
                && component("vae/", "diffusion_pytorch_model")
                && file("scheduler/scheduler_config.json")
                && family
                    .spec()
                    .tower_suffixes
                    .iter()
                    .filter(|s| !lacks(s))
                    .all(|s| {
                        component(&format!("text_encoder{s}/"), "model")
                            && (file(&format!("tokenizer{s}/tokenizer.json"))
                                || (file(&format!("tokenizer{s}/vocab.json"))
                                    && file(&format!("tokenizer{s}/merges.txt"))))
                    })
        }
    }
}

/// The set of named models: built-in entries with the user's file merged over them.
#[derive(Debug, Clone)]
pub struct Registry {
    entries: Vec<ModelEntry>,
    segmenters: Vec<SegmenterEntry>,
}

/// A named segmentation model (`[segmenters.NAME]`): an ONNX file in rembg's U²-Net layout,
/// a SAM / SlimSAM folder, or a SAM repository on the Hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmenterEntry {
    pub name: String,
    pub source: SegmenterSource,
    pub description: String,
}

/// Where a [`SegmenterEntry`]'s model is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmenterSource {
    /// A file or folder (`file = ...`).
    File(PathBuf),
    /// A transformers `SamModel` repository, read through the Hugging Face cache like the SD
    /// models (`hub = "ORG/NAME"`, `revision`, default `main`).
    Hub { repo: String, revision: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    models: toml::Table,
    #[serde(default)]
    segmenters: std::collections::BTreeMap<String, RawSegmenter>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegmenter {
    file: Option<String>,
    hub: Option<String>,
    revision: Option<String>,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    family: Family,
    #[serde(default)]
    kind: ModelKind,
    hub: Option<String>,
    revision: Option<String>,
    dir: Option<String>,
    file: Option<String>,
    builtin: Option<bool>,
    #[serde(default)]
    fp16_variant: bool,
    width: Option<u32>,
    height: Option<u32>,
    tkg_shift: Option<f64>,
    sampler: Option<SamplerKind>,
    schedule: Option<Schedule>,
    steps: Option<usize>,
    guidance: Option<f64>,
    timestep_spacing: Option<Spacing>,
    vae: Option<String>,
    #[serde(default)]
    description: String,
}

impl Registry {
    /// The segmentation model entry `name`, if the registry has one.
    pub fn segmenter(&self, name: &str) -> Option<&SegmenterEntry> {
        self.segmenters.iter().find(|e| e.name == name)
    }

    /// The built-in registry (models.toml compiled into the binary).
    pub fn builtin() -> Result<Self> {
        let mut r = Registry {
            entries: Vec::new(),
            segmenters: Vec::new(),
        };
        r.merge_str(
            BUILTIN_MODELS_TOML,
            Path::new("<built-in models.toml>"),
            None,
        )?;
        r.validate()?;
        Ok(r)
    }

    /// The built-in registry with `user` merged over it (see [`default_user_file`] for the
    /// usual choice).
    pub fn load(user: Option<&UserFile>) -> Result<Self> {
        let mut r = Self::builtin()?;
        if let Some(u) = user {
            r.merge_file(&u.path, u.home.as_deref())?;
        }
        Ok(r)
    }

    /// Merge a user file over the registry: entries with the same name replace existing ones.
    /// Relative `dir`/`file` paths resolve against the file's folder.
    /// `home` is what a leading `~/` in a path means.
    pub fn merge_file(&mut self, path: &Path, home: Option<&Path>) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model registry file {}", path.display()))?;
        let base = path
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                }
            })
            .unwrap_or(Path::new("."));
        let base = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
        self.merge_str(&text, path, Some((&base, home)))?;
        self.validate()
            .with_context(|| format!("in model registry file {}", path.display()))
    }

    /// Merge registry text; `origin` names it in errors, `base` resolves relative paths and
    /// `~/` (`None`: the built-in file, whose entries get no origin).
    fn merge_str(
        &mut self,
        text: &str,
        origin: &Path,
        base: Option<(&Path, Option<&Path>)>,
    ) -> Result<()> {
        let raw: RawFile = toml::from_str(text)
            .with_context(|| format!("cannot parse model registry file {}", origin.display()))?;
        for (name, seg) in raw.segmenters {
            let source = match (seg.file, seg.hub) {
                (Some(f), None) if seg.revision.is_none() => {
                    SegmenterSource::File(resolve_path(&f, base))
                }
                (None, Some(repo)) => SegmenterSource::Hub {
                    repo,
                    revision: seg.revision.unwrap_or_else(|| "main".into()),
                },
                _ => bail!(
                    "{}: [segmenters.{name}] needs either `file` or `hub` (with an optional \
                     `revision`)",
                    origin.display()
                ),
            };
            let entry = SegmenterEntry {
                source,
                description: seg.description,
                name,
            };
            self.segmenters.retain(|e| e.name != entry.name);
            self.segmenters.push(entry);
        }
        // Keep the file's order whatever map type toml uses (it may sort keys).
        let mut items: Vec<(String, toml::Value)> = raw.models.into_iter().collect();
        items.sort_by_key(|(name, _)| {
            text.find(&format!("[models.{name}]"))
                .or_else(|| text.find(&format!("[models.\"{name}\"]")))
                .unwrap_or(usize::MAX)
        });
        for (name, value) in items {
            let entry = parse_entry(&name, value, base)
                .with_context(|| format!("{}: entry [models.{name}]", origin.display()))?;
            let entry = ModelEntry {
                origin: base.map(|_| origin.to_path_buf()),
                ..entry
            };
            match self.entries.iter_mut().find(|e| e.name == name) {
                Some(old) => *old = entry,
                None => self.entries.push(entry),
            }
        }
        Ok(())
    }

    /// Cross-entry checks: every `vae` names a VAE entry of the same family, or a Hub repo.
    fn validate(&self) -> Result<()> {
        for e in &self.entries {
            self.vae_for(e).with_context(|| {
                let from = match &e.origin {
                    Some(p) => p.display().to_string(),
                    None => "<built-in models.toml>".to_string(),
                };
                format!("{from}: entry [models.{}]", e.name)
            })?;
        }
        Ok(())
    }

    /// The entry called `name`; an unknown name is an error listing the known ones.
    pub fn get(&self, name: &str) -> Result<&ModelEntry> {
        self.entries.iter().find(|e| e.name == name).ok_or_else(|| {
            anyhow!(
                "unknown model `{name}`; known models: {}. Add your own to ~/.config/tkg/models.toml \
                 (or the file in $TKG_MODELS), or pass --model-dir DIR",
                self.names().join(", ")
            )
        })
    }

    /// All entries: built-in ones in file order, then the user's new ones.
    pub fn segmenters(&self) -> impl Iterator<Item = &SegmenterEntry> {
        self.segmenters.iter()
    }

    pub fn entries(&self) -> impl Iterator<Item = &ModelEntry> {
        self.entries.iter()
    }

    /// All entry names, in [`Registry::entries`] order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|e| e.name.as_str()).collect()
    }

    /// The VAE to use instead of `entry`'s own for f16/bf16, if it names one: a registry entry
    /// (which must be a `kind = "vae"` entry of the same family), or a Hub repo `ORG/NAME`
    /// (an entry is synthesised for it, revision "main").
    pub fn vae_for(&self, entry: &ModelEntry) -> Result<Option<ModelEntry>> {
        let Some(vae) = &entry.vae else {
            return Ok(None);
        };
        if let Some(v) = self.entries.iter().find(|e| &e.name == vae) {
            if v.kind != ModelKind::Vae {
                bail!(
                    "vae `{vae}` is a {} entry, not a `kind = \"vae\"` one",
                    v.kind
                );
            }
            if v.family != entry.family {
                bail!(
                    "vae `{vae}` is for {}, but model `{}` is {}",
                    v.family,
                    entry.name,
                    entry.family
                );
            }
            return Ok(Some(v.clone()));
        }
        if looks_like_repo_id(vae) {
            return Ok(Some(ModelEntry {
                name: vae.clone(),
                family: entry.family,
                kind: ModelKind::Vae,
                source: Source::Hub {
                    repo: vae.clone(),
                    revision: "main".to_string(),
                },
                description: format!("VAE for {}", entry.name),
                fp16_variant: false,
                width: None,
                height: None,
                tkg_shift: None,
                sampling: SamplingDefaults::default(),
                vae: None,
                origin: entry.origin.clone(),
            }));
        }
        bail!(
            "vae `{vae}` is neither a registry entry nor a Hub repo id (ORG/NAME); known models: {}",
            self.names().join(", ")
        )
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    };
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

fn parse_entry(
    name: &str,
    value: toml::Value,
    base: Option<(&Path, Option<&Path>)>,
) -> Result<ModelEntry> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == '/') {
        bail!("model names must be non-empty, without spaces or '/'");
    }
    if !value.is_table() {
        bail!("expected a table, as in [models.{name}]");
    }
    let raw: RawEntry = value.try_into().map_err(|e| anyhow!("{e}"))?;
    let resolve = |p: &str| -> PathBuf { resolve_path(p, base) };
    let builtin = raw.builtin == Some(true);
    let n_sources = [
        raw.hub.is_some(),
        raw.dir.is_some(),
        raw.file.is_some(),
        builtin,
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if n_sources != 1 {
        bail!(
            "needs exactly one of `hub = \"ORG/NAME\"`, `dir = \"PATH\"`, `file = \"PATH\"` or \
             `builtin = true` (found {n_sources})"
        );
    }
    if raw.revision.is_some() && raw.hub.is_none() {
        bail!("`revision` only applies to `hub` entries");
    }
    let source = if let Some(repo) = raw.hub {
        if !looks_like_repo_id(&repo) {
            bail!("`hub = \"{repo}\"` is not a Hub repo id of the form ORG/NAME");
        }
        let revision = raw.revision.unwrap_or_else(|| "main".to_string());
        if revision.is_empty() {
            bail!("`revision` is empty");
        }
        Source::Hub { repo, revision }
    } else if let Some(d) = raw.dir {
        Source::Dir(resolve(&d))
    } else if let Some(f) = raw.file {
        if raw.kind == ModelKind::Pipeline {
            let lower = f.to_ascii_lowercase();
            if lower.ends_with(".ckpt") || lower.ends_with(".pt") || lower.ends_with(".bin") {
                bail!(
                    "`file = \"{f}\"` is a pickle checkpoint; tkg refuses pickle files because \
                     loading them can run arbitrary code. Convert it to .safetensors first"
                );
            }
        }
        Source::File(resolve(&f))
    } else {
        if !BUILTIN_NAMES.contains(&name) {
            bail!(
                "`builtin = true` is only for tkg's own models: {}",
                BUILTIN_NAMES.join(", ")
            );
        }
        if raw.kind != ModelKind::Pipeline {
            bail!(
                "`{name}` is a built-in pipeline; `kind = \"{}\"` does not fit it",
                raw.kind
            );
        }
        // A built-in model's family is fixed by its architecture: count its text towers.
        let towers = super::builtin::architecture(name)?.text_encoders.len();
        if let Some(actual) = [Family::Sd15, Family::Sdxl]
            .into_iter()
            .find(|f| f.spec().tower_suffixes.len() == towers)
            .filter(|f| *f != raw.family)
        {
            bail!(
                "`{name}` is a built-in {actual} model; `family = \"{}\"` does not fit it",
                raw.family
            );
        }
        Source::Builtin
    };
    if raw.width == Some(0) || raw.height == Some(0) {
        bail!("`width` and `height` must be positive");
    }
    if raw.tkg_shift.is_some_and(|s| !s.is_finite()) {
        bail!("`tkg_shift` must be a finite number");
    }
    if raw
        .steps
        .is_some_and(|n| n == 0 || n > crate::limits::MAX_STEPS)
    {
        bail!("`steps` must be 1 to {}", crate::limits::MAX_STEPS);
    }
    if raw.guidance.is_some_and(|g| !(g.is_finite() && g >= 0.0)) {
        bail!("`guidance` must be a non-negative number");
    }
    if raw.kind == ModelKind::Vae && raw.vae.is_some() {
        bail!("a `kind = \"vae\"` entry cannot name another `vae`");
    }
    Ok(ModelEntry {
        name: name.to_string(),
        family: raw.family,
        kind: raw.kind,
        source,
        description: raw.description,
        fp16_variant: raw.fp16_variant,
        width: raw.width,
        height: raw.height,
        tkg_shift: raw.tkg_shift,
        sampling: SamplingDefaults {
            sampler: raw.sampler,
            schedule: raw.schedule,
            steps: raw.steps,
            guidance: raw.guidance,
            spacing: raw.timestep_spacing,
        },
        vae: raw.vae,
        origin: None,
    })
}

fn resolve_path(p: &str, base: Option<(&Path, Option<&Path>)>) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/")
        && let Some((_, Some(home))) = base
    {
        return home.join(rest);
    }
    let path = PathBuf::from(p);
    match base {
        Some((b, _)) if path.is_relative() => b.join(path),
        _ => path,
    }
}

/// A user's registry file, and the home folder its `~/` paths mean.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFile {
    pub path: PathBuf,
    pub home: Option<PathBuf>,
}

/// The user's registry file: `explicit` if given, else `$TKG_MODELS` if set (it need not
/// exist; reading it then fails loudly), else `$XDG_CONFIG_HOME/tkg/models.toml` or
/// `~/.config/tkg/models.toml` if it exists. `env` looks variables up (the CLI passes
/// `std::env::var`; the library reads no environment itself).
pub fn default_user_file(
    explicit: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<UserFile> {
    let home = env("HOME").map(PathBuf::from);
    let path = match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => user_file_from(
            env("TKG_MODELS").map(PathBuf::from),
            env("XDG_CONFIG_HOME").map(PathBuf::from),
            home.clone(),
        ),
    }?;
    Some(UserFile { path, home })
}

fn user_file_from(
    tkg_models: Option<PathBuf>,
    xdg_config_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> Option<PathBuf> {
    if let Some(p) = tkg_models.filter(|p| !p.as_os_str().is_empty()) {
        return Some(p);
    }
    let config = xdg_config_home
        .filter(|p| p.is_absolute())
        .or_else(|| home.map(|h| h.join(".config")))?;
    let p = config.join("tkg").join("models.toml");
    p.is_file().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Names that appear more than once would be a bug in the registry.
    fn duplicate_names(r: &Registry) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        r.entries
            .iter()
            .filter(|e| !seen.insert(e.name.clone()))
            .map(|e| e.name.clone())
            .collect()
    }

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "tkg-registry-test-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn builtin_has_all_entries() {
        let r = Registry::builtin().unwrap();
        assert_eq!(
            r.names(),
            [
                "sd15",
                "sdxl",
                "sdxl-refiner",
                "sd-turbo",
                "sdxl-turbo",
                "sd15-inpaint",
                "sdxl-inpaint",
                "sdxl-vae-fp16-fix",
                "tiny-sd15",
                "tiny-sdxl",
                "tiny-sd15-inpaint",
                "tiny-sdxl-inpaint",
                "random-sd15",
                "random-sdxl"
            ]
        );
        for n in [
            "sd15",
            "sdxl",
            "sdxl-vae-fp16-fix",
            "tiny-sd15",
            "tiny-sdxl",
            "random-sd15",
            "random-sdxl",
        ] {
            r.get(n).unwrap();
        }
        assert_eq!(r.entries().count(), 14);
        assert!(duplicate_names(&r).is_empty());

        let sd15 = r.get("sd15").unwrap();
        assert_eq!(sd15.family, Family::Sd15);
        assert_eq!(sd15.kind, ModelKind::Pipeline);
        assert_eq!(
            sd15.source,
            Source::Hub {
                repo: "stable-diffusion-v1-5/stable-diffusion-v1-5".into(),
                revision: "main".into()
            }
        );
        assert!(sd15.fp16_variant);
        assert_eq!((sd15.width, sd15.height), (Some(512), Some(512)));
        assert_eq!(sd15.tkg_shift, Some(0.07));
        assert!(sd15.origin.is_none());
        assert!(!sd15.description.is_empty());

        let sdxl = r.get("sdxl").unwrap();
        assert_eq!(sdxl.family, Family::Sdxl);
        assert_eq!(
            sdxl.source,
            Source::Hub {
                repo: "stabilityai/stable-diffusion-xl-base-1.0".into(),
                revision: "main".into()
            }
        );
        assert_eq!((sdxl.width, sdxl.height), (Some(1024), Some(1024)));
        assert_eq!(sdxl.tkg_shift, Some(0.11));
        let vae = r.vae_for(sdxl).unwrap().unwrap();
        assert_eq!(vae.name, "sdxl-vae-fp16-fix");
        assert_eq!(vae.kind, ModelKind::Vae);
        assert_eq!(
            vae.source,
            Source::Hub {
                repo: "madebyollin/sdxl-vae-fp16-fix".into(),
                revision: "main".into()
            }
        );
        assert!(r.vae_for(sd15).unwrap().is_none());
        assert_eq!(sd15.sampling, SamplingDefaults::default());

        // Turbo models carry their sampling, so `--model sdxl-turbo` needs no flags.
        let turbo = r.get("sdxl-turbo").unwrap();
        assert_eq!(
            turbo.sampling,
            SamplingDefaults {
                sampler: Some(SamplerKind::EulerAncestral),
                schedule: None,
                steps: Some(1),
                guidance: Some(0.0),
                spacing: Some(Spacing::Trailing),
            }
        );
        assert_eq!(r.get("sd-turbo").unwrap().sampling, turbo.sampling);

        let tiny = r.get("tiny-sd15").unwrap();
        assert_eq!(tiny.source, Source::Builtin);
        assert_eq!((tiny.width, tiny.height), (Some(64), Some(64)));
        assert_eq!(tiny.tkg_shift, Some(0.07));
        assert_eq!(r.get("tiny-sdxl").unwrap().family, Family::Sdxl);
        assert_eq!(r.get("random-sd15").unwrap().width, Some(512));
        assert_eq!(r.get("random-sdxl").unwrap().width, Some(1024));
        for n in BUILTIN_NAMES {
            assert_eq!(r.get(n).unwrap().source, Source::Builtin);
        }
    }

    #[test]
    fn family_display_and_parse() {
        assert_eq!(Family::Sd15.to_string(), "sd15");
        assert_eq!(Family::Sdxl.to_string(), "sdxl");
        assert_eq!("SDXL".parse::<Family>().unwrap(), Family::Sdxl);
        assert!("sd2".parse::<Family>().is_err());
    }

    #[test]
    fn unknown_name_lists_known_names() {
        let r = Registry::builtin().unwrap();
        let err = format!("{:#}", r.get("sd16").unwrap_err());
        assert!(err.contains("unknown model `sd16`"), "{err}");
        for n in ["sd15", "sdxl", "tiny-sd15", "random-sdxl"] {
            assert!(err.contains(n), "{err}");
        }
    }

    #[test]
    fn user_file_overrides_and_adds_with_relative_paths() {
        let t = TempDir::new("override");
        let cfg = t.0.join("conf");
        let file = write(
            &cfg,
            "models.toml",
            r#"
            [models.sd15]
            family = "sd15"
            dir = "weights/sd15"
            description = "my local copy"

            [models.mine]
            family = "sdxl"
            file = "ckpt/mine.safetensors"
            width = 832
            height = 1216
            sampler = "euler"
            schedule = "karras"
            steps = 4
            guidance = 1.5
            timestep_spacing = "trailing"

            [models.abs]
            family = "sd15"
            dir = "/opt/models/x"

            [models.pinned]
            family = "sd15"
            hub = "someone/some-model"
            revision = "0123456789abcdef0123456789abcdef01234567"
            vae = "someone/some-vae"
            "#,
        );
        let mut r = Registry::builtin().unwrap();
        r.merge_file(&file, None).unwrap();
        let base = std::fs::canonicalize(&cfg).unwrap();

        let sd15 = r.get("sd15").unwrap();
        assert_eq!(sd15.source, Source::Dir(base.join("weights/sd15")));
        assert_eq!(sd15.description, "my local copy");
        // Replaced entirely: the built-in fields are gone.
        assert!(!sd15.fp16_variant);
        assert_eq!(sd15.width, None);
        assert_eq!(sd15.origin.as_deref(), Some(file.as_path()));

        let mine = r.get("mine").unwrap();
        assert_eq!(mine.family, Family::Sdxl);
        assert_eq!(
            mine.source,
            Source::File(base.join("ckpt/mine.safetensors"))
        );
        assert_eq!((mine.width, mine.height), (Some(832), Some(1216)));
        assert_eq!(
            mine.sampling,
            SamplingDefaults {
                sampler: Some(SamplerKind::Euler),
                schedule: Some(Schedule::Karras),
                steps: Some(4),
                guidance: Some(1.5),
                spacing: Some(Spacing::Trailing),
            }
        );

        assert_eq!(
            r.get("abs").unwrap().source,
            Source::Dir(PathBuf::from("/opt/models/x"))
        );
        let pinned = r.get("pinned").unwrap();
        assert_eq!(
            pinned.source,
            Source::Hub {
                repo: "someone/some-model".into(),
                revision: "0123456789abcdef0123456789abcdef01234567".into()
            }
        );
        let vae = r.vae_for(pinned).unwrap().unwrap();
        assert_eq!(vae.kind, ModelKind::Vae);
        assert_eq!(
            vae.source,
            Source::Hub {
                repo: "someone/some-vae".into(),
                revision: "main".into()
            }
        );

        // Untouched built-ins survive; new entries come after them.
        assert!(r.get("sdxl").unwrap().origin.is_none());
        let names = r.names();
        assert_eq!(names.len(), 17);
        assert_eq!(names[0], "sd15");
        assert!(
            names.iter().position(|n| *n == "mine").unwrap()
                > names.iter().position(|n| *n == "random-sdxl").unwrap()
        );

        // Registry::load with an explicit file does the same merge.
        let r2 = Registry::load(Some(&UserFile {
            path: file.clone(),
            home: None,
        }))
        .unwrap();
        assert_eq!(r2.get("sd15").unwrap(), sd15);
    }

    #[test]
    fn segmenter_entries_name_files_relative_to_their_registry() {
        let t = TempDir::new("segmenters");
        let file = write(
            &t.0,
            "models.toml",
            "[segmenters.mine]\nfile = \"nets/u2netp.onnx\"\n\n[segmenters.home]\nfile = \"~/m.onnx\"\ndescription = \"d\"\n",
        );
        let home = t.0.join("h");
        let r = Registry::load(Some(&UserFile {
            path: file.clone(),
            home: Some(home.clone()),
        }))
        .unwrap();
        let base = std::fs::canonicalize(&t.0).unwrap();
        assert_eq!(
            r.segmenter("mine").unwrap().source,
            SegmenterSource::File(base.join("nets/u2netp.onnx"))
        );
        assert_eq!(
            r.segmenter("home").unwrap().source,
            SegmenterSource::File(home.join("m.onnx"))
        );
        assert!(r.segmenter("u2netp").is_none());
        assert_eq!(
            r.segmenter("slimsam-77").unwrap().source,
            SegmenterSource::Hub {
                repo: "Zigeng/SlimSAM-uniform-77".into(),
                revision: "main".into()
            }
        );
        let both = write(
            &t.0,
            "both.toml",
            "[segmenters.x]\nfile = \"a.onnx\"\nhub = \"o/n\"\n",
        );
        let err = format!(
            "{:#}",
            Registry::load(Some(&UserFile {
                path: both,
                home: None
            }))
            .unwrap_err()
        );
        assert!(err.contains("either `file` or `hub`"), "{err}");
        let bad = write(
            &t.0,
            "bad.toml",
            "[segmenters.x]\nfile = \"a.onnx\"\narch = \"sam\"\n",
        );
        let err = format!(
            "{:#}",
            Registry::load(Some(&UserFile {
                path: bad,
                home: None
            }))
            .unwrap_err()
        );
        assert!(err.contains("arch"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_naming_file_and_entry() {
        let t = TempDir::new("unknown-key");
        let file = write(
            &t.0,
            "models.toml",
            "[models.good]\nfamily = \"sd15\"\ndir = \"x\"\n\n[models.bad]\nfamily = \"sd15\"\nhub = \"a/b\"\nwidht = 512\n",
        );
        let err = format!(
            "{:#}",
            Registry::load(Some(&UserFile {
                path: file.clone(),
                home: None
            }))
            .unwrap_err()
        );
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(err.contains("[models.bad]"), "{err}");
        assert!(err.contains("widht"), "{err}");

        let file2 = write(&t.0, "top.toml", "[model.x]\nfamily = \"sd15\"\n");
        let err = format!(
            "{:#}",
            Registry::load(Some(&UserFile {
                path: file2.clone(),
                home: None
            }))
            .unwrap_err()
        );
        assert!(err.contains("top.toml") && err.contains("model"), "{err}");
    }

    #[test]
    fn bad_sampling_defaults_are_errors_naming_the_entry() {
        let t = TempDir::new("bad-sampling");
        for (body, want) in [
            ("sampler = \"dpm++3m\"", "dpm++3m"),
            ("steps = 0", "`steps` must be 1 to"),
            ("guidance = -1.0", "`guidance` must be"),
            ("timestep_spacing = \"sideways\"", "sideways"),
        ] {
            let file = write(
                &t.0,
                "models.toml",
                &format!("[models.fast]\nfamily = \"sd15\"\ndir = \"x\"\n{body}\n"),
            );
            let user = UserFile {
                path: file,
                home: None,
            };
            let err = format!("{:#}", Registry::load(Some(&user)).unwrap_err());
            assert!(err.contains("fast") && err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn source_must_be_exactly_one() {
        let t = TempDir::new("sources");
        for (text, needle) in [
            ("family = \"sd15\"\n", "exactly one"),
            (
                "family = \"sd15\"\nhub = \"a/b\"\ndir = \"x\"\n",
                "exactly one",
            ),
            (
                "family = \"sd15\"\ndir = \"x\"\nrevision = \"v1\"\n",
                "revision",
            ),
            ("family = \"sd15\"\nbuiltin = true\n", "builtin"),
            ("family = \"sd3\"\ndir = \"x\"\n", "sd3"),
            ("hub = \"a/b\"\n", "family"),
            ("family = \"sd15\"\nhub = \"not a repo\"\n", "ORG/NAME"),
            ("family = \"sd15\"\nfile = \"m.ckpt\"\n", "pickle"),
            ("family = \"sd15\"\nhub = \"a/b\"\nvae = \"nope\"\n", "nope"),
            (
                "family = \"sd15\"\nhub = \"a/b\"\nvae = \"sdxl-vae-fp16-fix\"\n",
                "sdxl",
            ),
            (
                "family = \"sd15\"\nhub = \"a/b\"\nvae = \"sd15\"\n",
                "not a `kind",
            ),
        ] {
            let file = write(&t.0, "m.toml", &format!("[models.x]\n{text}"));
            let err = format!(
                "{:#}",
                Registry::load(Some(&UserFile {
                    path: file.clone(),
                    home: None
                }))
                .unwrap_err()
            );
            assert!(err.contains("[models.x]"), "{text}: {err}");
            assert!(err.contains(needle), "{text}: {err}");
        }
        // builtin = true is accepted for a built-in name (e.g. to change its description).
        let file = write(
            &t.0,
            "ok.toml",
            "[models.tiny-sd15]\nfamily = \"sd15\"\nbuiltin = true\ndescription = \"mine\"\n",
        );
        let r = Registry::load(Some(&UserFile {
            path: file.clone(),
            home: None,
        }))
        .unwrap();
        assert_eq!(r.get("tiny-sd15").unwrap().description, "mine");
    }

    #[test]
    fn missing_user_file_is_an_error() {
        let t = TempDir::new("missing");
        let p = t.0.join("nope.toml");
        let err = format!(
            "{:#}",
            Registry::load(Some(&UserFile {
                path: p.clone(),
                home: None
            }))
            .unwrap_err()
        );
        assert!(err.contains("nope.toml"), "{err}");
    }

    #[test]
    fn default_user_file_precedence() {
        let t = TempDir::new("default");
        let xdg = t.0.join("xdg");
        let home = t.0.join("home");
        // Nothing exists: no user file.
        assert_eq!(
            user_file_from(None, Some(xdg.clone()), Some(home.clone())),
            None
        );
        let home_file = write(&home, ".config/tkg/models.toml", "");
        assert_eq!(
            user_file_from(None, None, Some(home.clone())),
            Some(home_file.clone())
        );
        // XDG_CONFIG_HOME wins over ~/.config, but only where the file exists.
        assert_eq!(
            user_file_from(None, Some(xdg.clone()), Some(home.clone())),
            None
        );
        let xdg_file = write(&xdg, "tkg/models.toml", "");
        assert_eq!(
            user_file_from(None, Some(xdg.clone()), Some(home.clone())),
            Some(xdg_file)
        );
        // TKG_MODELS wins over everything, even when missing (so the error is loud).
        let explicit = t.0.join("explicit.toml");
        assert_eq!(
            user_file_from(Some(explicit.clone()), Some(xdg), Some(home)),
            Some(explicit)
        );
    }

    /// The files of an SD1.5 pipeline.
    const SD15_FILES: &[&str] = &[
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    ];

    #[test]
    fn entry_cache_state_for_local_sources() {
        let t = TempDir::new("cached");
        let dir = t.0.join("model");
        for f in SD15_FILES {
            write(&dir, f, "{}");
        }
        std::fs::create_dir_all(t.0.join("bare")).unwrap();
        let file = write(
            &t.0,
            "m.toml",
            "[models.here]\nfamily = \"sd15\"\ndir = \"model\"\n[models.bare]\nfamily = \"sd15\"\ndir = \"bare\"\n[models.gone]\nfamily = \"sd15\"\ndir = \"missing\"\n[models.f]\nfamily = \"sd15\"\nfile = \"missing.safetensors\"\n",
        );
        let r = Registry::load(Some(&UserFile {
            path: file.clone(),
            home: None,
        }))
        .unwrap();
        assert!(r.get("here").unwrap().is_cached());
        assert!(r.get("here").unwrap().folder().is_ok());
        // An empty folder exists but holds no model.
        assert!(!r.get("bare").unwrap().is_cached());
        assert!(r.get("bare").unwrap().folder().is_ok());
        assert!(!r.get("gone").unwrap().is_cached());
        assert!(r.get("gone").unwrap().folder().is_err());
        assert!(!r.get("f").unwrap().is_cached());
        assert!(r.get("f").unwrap().folder().is_err());
        std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
        assert!(!r.get("here").unwrap().is_cached());
    }

    #[cfg(unix)]
    #[test]
    fn needed_files_are_followed_through_links() {
        use std::os::unix::fs::symlink;
        let t = TempDir::new("links");
        // A Hub snapshot: every file a relative link into blobs/.
        let snap = t.0.join("snapshots/abc");
        for (i, f) in SD15_FILES.iter().enumerate() {
            write(&t.0, &format!("blobs/{i}"), "{}");
            let link = snap.join(f);
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            let depth = f.matches('/').count() + 2;
            symlink(format!("{}blobs/{i}", "../".repeat(depth)), &link).unwrap();
        }
        assert!(has_needed_files(&snap, ModelKind::Pipeline, Family::Sd15));
        // SDXL needs a second tower this folder lacks.
        assert!(!has_needed_files(&snap, ModelKind::Pipeline, Family::Sdxl));
        // Each needed file's blob, deleted in turn, makes the model not cached; the link
        // itself stays.
        for (i, f) in SD15_FILES.iter().enumerate().skip(1) {
            let blob = t.0.join(format!("blobs/{i}"));
            std::fs::remove_file(&blob).unwrap();
            assert!(std::fs::symlink_metadata(snap.join(f)).is_ok());
            assert!(
                !has_needed_files(&snap, ModelKind::Pipeline, Family::Sd15),
                "{f} dangles"
            );
            std::fs::write(&blob, "{}").unwrap();
        }
        // model_index.json is optional to the loader.
        std::fs::remove_file(t.0.join("blobs/0")).unwrap();
        assert!(has_needed_files(&snap, ModelKind::Pipeline, Family::Sd15));
    }

    #[test]
    fn a_refiner_needs_no_tower_its_model_index_marks_absent() {
        let t = TempDir::new("refiner-files");
        let root = t.0.join("root");
        for f in SD15_FILES {
            let f = f
                .replace("text_encoder/", "text_encoder_2/")
                .replace("tokenizer/", "tokenizer_2/");
            write(&root, &f, "{}");
        }
        // Without the index saying so, SDXL's first tower is missing.
        assert!(!has_needed_files(&root, ModelKind::Pipeline, Family::Sdxl));
        write(
            &root,
            "model_index.json",
            r#"{"text_encoder": [null, null]}"#,
        );
        assert!(has_needed_files(&root, ModelKind::Pipeline, Family::Sdxl));
        // The tower it does need is still checked.
        std::fs::remove_file(root.join("text_encoder_2/model.safetensors")).unwrap();
        assert!(!has_needed_files(&root, ModelKind::Pipeline, Family::Sdxl));
    }

    #[test]
    fn needed_files_of_a_vae_and_fp16_weights() {
        let t = TempDir::new("vae-files");
        let root = t.0.join("root");
        write(&root, "config.json", "{}");
        assert!(!has_needed_files(&root, ModelKind::Vae, Family::Sdxl));
        write(&root, "diffusion_pytorch_model.fp16.safetensors", "w");
        assert!(has_needed_files(&root, ModelKind::Vae, Family::Sdxl));
        // A vae/ subfolder is what the loader reads when it has a config.
        write(&root, "vae/config.json", "{}");
        assert!(!has_needed_files(&root, ModelKind::Vae, Family::Sdxl));
        write(&root, "vae/diffusion_pytorch_model.safetensors", "w");
        assert!(has_needed_files(&root, ModelKind::Vae, Family::Sdxl));
    }

    #[test]
    fn builtin_entries_keep_their_family_and_kind() {
        let t = TempDir::new("builtin-family");
        for (text, needle) in [
            (
                "[models.tiny-sd15]\nfamily = \"sdxl\"\nbuiltin = true\n",
                "built-in sd15 model",
            ),
            (
                "[models.random-sdxl]\nfamily = \"sd15\"\nbuiltin = true\n",
                "built-in sdxl model",
            ),
            (
                "[models.tiny-sdxl]\nfamily = \"sdxl\"\nkind = \"vae\"\nbuiltin = true\n",
                "kind = \"vae\"",
            ),
        ] {
            let file = write(&t.0, "m.toml", text);
            let err = format!(
                "{:#}",
                Registry::load(Some(&UserFile {
                    path: file.clone(),
                    home: None
                }))
                .unwrap_err()
            );
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.contains(&file.display().to_string()), "{text}: {err}");
        }
    }

    #[test]
    fn check_family_names_the_entry_and_its_file() {
        let t = TempDir::new("check-family");
        let file = write(
            &t.0,
            "m.toml",
            "[models.mine]\nfamily = \"sdxl\"\ndir = \"m\"\n",
        );
        let r = Registry::load(Some(&UserFile {
            path: file.clone(),
            home: None,
        }))
        .unwrap();
        let e = r.get("mine").unwrap();
        e.check_family(Family::Sdxl).unwrap();
        let err = format!("{:#}", e.check_family(Family::Sd15).unwrap_err());
        for needle in ["`mine`", "sdxl", "sd15", &file.display().to_string()] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let err = format!(
            "{:#}",
            Registry::builtin()
                .unwrap()
                .get("sd15")
                .unwrap()
                .check_family(Family::Sdxl)
                .unwrap_err()
        );
        assert!(err.contains("<built-in models.toml>"), "{err}");
    }
}
