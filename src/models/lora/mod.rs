//! LoRA adapters, merged into the weights as they are loaded.
//!
//! Formats read:
//! - kohya-ss (sd-scripts, most civitai files): `lora_unet_<path with _>`, `lora_te_` (SD1),
//!   `lora_te1_` / `lora_te2_` (SDXL) with `.lora_down.weight`, `.lora_up.weight`, `.alpha`;
//!   SD1 files use diffusers module paths, SDXL files LDM paths (`input_blocks_4_1_...`);
//!   LoCon 3x3 convs (down [r, in, 3, 3], up [out, r, 1, 1]).
//! - diffusers / PEFT: `unet.` / `text_encoder.` / `text_encoder_2.` + module path +
//!   `.lora_A.weight` / `.lora_B.weight`; alpha from the `lora_adapter_metadata` JSON
//!   (`unet.lora_alpha`, `unet.alpha_pattern`, ...) when present, else scale 1.
//! - older diffusers: `.lora.down/up.weight`, `.lora_linear_layer.down/up.weight`, and the
//!   attention-processor names (`attn1.processor.to_q_lora.down.weight`, text encoder
//!   `self_attn.to_q_lora...`).
//!
//! Matching goes model-first, as ComfyUI does: for each weight the network reads, every LoRA
//! module name that could refer to it is looked up (dotted diffusers path, the same with `_`,
//! and for the UNet its LDM path with `_`). The change `w · scale · up @ down` is added in f32
//! to the weight as it is read ([`WeightPatch`]), so no second copy of the model exists.

mod tags;

use super::config::UNetConfig;
use super::single_file::unet_to_ldm;
use super::weights::{WeightFile, WeightPatch};
use crate::family::Family;
use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Tensor};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub use tags::{LoraSpec, LoraTag, prompt_tags, resolve_tag, strip_tags};

/// Which network a LoRA module changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Unet => "unet",
            Target::TextEncoder => "text_encoder",
            Target::TextEncoder2 => "text_encoder_2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// The tensors of one LoRA module.
#[derive(Debug, Default, Clone)]
struct Module {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
    /// kohya naming (alpha / rank, alpha missing = rank).
    kohya: bool,
}

impl Module {
    fn tensors(&self) -> impl Iterator<Item = &String> {
        [&self.down, &self.up, &self.alpha].into_iter().flatten()
    }
}

/// What a LoRA tensor name means: (target, module key, part); the key is the dotted module
/// path (with `text_model.` for text encoders) or, for kohya, the path with `_`.
fn parse_key(key: &str) -> Option<(Target, String, Part, bool)> {
    for (prefix, target) in [
        ("lora_unet_", Target::Unet),
        ("lora_te1_", Target::TextEncoder),
        ("lora_te2_", Target::TextEncoder2),
        ("lora_te_", Target::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (module, suffix) = rest.split_once('.')?;
            let part = match suffix {
                "lora_down.weight" => Part::Down,
                "lora_up.weight" => Part::Up,
                "alpha" => Part::Alpha,
                _ => return None,
            };
            return Some((target, module.to_string(), part, true));
        }
    }
    let (target, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (Target::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        (Target::TextEncoder2, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (Target::TextEncoder, r)
    } else if key.contains("_blocks.") || key.starts_with("mid_block.") {
        // The oldest diffusers files: attention processors without a prefix.
        (Target::Unet, key)
    } else {
        return None;
    };
    const SUFFIXES: &[(&str, Part)] = &[
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        ("_lora.down.weight", Part::Down),
        ("_lora.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    let (module, part) = SUFFIXES
        .iter()
        .find_map(|(s, p)| rest.strip_suffix(s).map(|m| (m, *p)))?;
    Some((target, normalize_dotted(target, module), part, false))
}

/// Old attention-processor names → module paths; text encoder paths get `text_model.`.
fn normalize_dotted(target: Target, module: &str) -> String {
    let mut segs: Vec<String> = module
        .split('.')
        .filter(|s| *s != "processor")
        .map(String::from)
        .collect();
    let te = target != Target::Unet;
    if let Some(last) = segs.last_mut() {
        let renamed = match (last.as_str(), te) {
            ("to_q", true) => Some("q_proj"),
            ("to_k", true) => Some("k_proj"),
            ("to_v", true) => Some("v_proj"),
            ("to_out", true) => Some("out_proj"),
            ("to_out", false) => Some("to_out.0"),
            _ => None,
        };
        if let Some(r) = renamed {
            *last = r.to_string();
        }
    }
    let path = segs.join(".");
    if te && !path.starts_with("text_model.") && !path.starts_with("text_projection") {
        format!("text_model.{path}")
    } else {
        path
    }
}

/// PEFT's adapter settings for one target, from `lora_adapter_metadata`.
#[derive(Debug, Default, Clone)]
struct PeftMeta {
    alpha: Option<f64>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

fn peft_meta(file: &WeightFile) -> Result<BTreeMap<Target, PeftMeta>> {
    let mut out = BTreeMap::new();
    let Some(raw) = file.metadata().get("lora_adapter_metadata") else {
        return Ok(out);
    };
    let v: Value = serde_json::from_str(raw).with_context(|| {
        format!(
            "{}: lora_adapter_metadata is not valid JSON",
            file.path().display()
        )
    })?;
    let Some(obj) = v.as_object() else {
        return Ok(out);
    };
    for target in [Target::Unet, Target::TextEncoder, Target::TextEncoder2] {
        let get = |k: &str| obj.get(&format!("{}.{k}", target.as_str()));
        let alpha = get("lora_alpha").and_then(Value::as_f64);
        if alpha.is_none() && get("r").is_none() {
            continue;
        }
        let alpha_pattern = get("alpha_pattern")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        let rslora = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
        out.insert(
            target,
            PeftMeta {
                alpha,
                alpha_pattern,
                rslora,
            },
        );
    }
    Ok(out)
}

/// One opened LoRA file.
pub struct LoraFile {
    pub spec: LoraSpec,
    file: Arc<WeightFile>,
    modules: BTreeMap<(Target, String), Module>,
    /// Tensors of kinds tkg does not apply (LyCORIS LoHa/LoKr, DoRA, Tucker mids, ...).
    unsupported: Vec<String>,
    meta: BTreeMap<Target, PeftMeta>,
    used: Mutex<BTreeSet<(Target, String)>>,
    /// Time spent reading this LoRA's tensors and computing its changes.
    spent: Mutex<std::time::Duration>,
}

impl LoraFile {
    pub fn open(spec: &LoraSpec) -> Result<Self> {
        super::single_file::check_extension(&spec.path)?;
        ensure!(
            spec.weight.is_finite(),
            "LoRA {} ({}): the weight {} is not a finite number",
            spec.name,
            spec.path.display(),
            spec.weight
        );
        let file = WeightFile::open(&spec.path).with_context(|| format!("LoRA {}", spec.name))?;
        let mut modules: BTreeMap<(Target, String), Module> = BTreeMap::new();
        let mut unsupported = Vec::new();
        for name in file.names() {
            match parse_key(&name) {
                Some((target, key, part, kohya)) => {
                    let m = modules.entry((target, key)).or_default();
                    m.kohya = kohya;
                    let slot = match part {
                        Part::Down => &mut m.down,
                        Part::Up => &mut m.up,
                        Part::Alpha => &mut m.alpha,
                    };
                    *slot = Some(name);
                }
                None => unsupported.push(name),
            }
        }
        // A module needs both halves.
        modules.retain(|_, m| {
            let ok = m.down.is_some() && m.up.is_some();
            if !ok {
                unsupported.extend(m.tensors().cloned());
            }
            ok
        });
        if modules.is_empty() {
            let shown: Vec<&str> = unsupported.iter().take(3).map(String::as_str).collect();
            let lycoris = unsupported
                .iter()
                .any(|n| n.contains("hada_") || n.contains("lokr_"));
            if lycoris {
                bail!(
                    "LoRA {}: {} is a LyCORIS LoHa/LoKr file, which tkg does not support (only LoRA / LoCon)",
                    spec.name,
                    spec.path.display()
                );
            }
            if unsupported
                .iter()
                .any(|n| n.starts_with("model.diffusion_model."))
            {
                bail!(
                    "LoRA {}: {} is a full checkpoint, not a LoRA (use --model-file)",
                    spec.name,
                    spec.path.display()
                );
            }
            bail!(
                "LoRA {}: {} has no LoRA tensors in a known format ({}{})",
                spec.name,
                spec.path.display(),
                shown.join(", "),
                if unsupported.len() > 3 { ", ..." } else { "" }
            );
        }
        let meta = peft_meta(&file)?;
        Ok(Self {
            spec: spec.clone(),
            file,
            modules,
            unsupported,
            meta,
            used: Mutex::new(BTreeSet::new()),
            spent: Mutex::new(std::time::Duration::ZERO),
        })
    }

    /// Number of LoRA modules (down/up pairs) in the file.
    pub fn module_count(&self) -> usize {
        self.modules.len()
    }

    fn targets(&self) -> BTreeSet<Target> {
        self.modules.keys().map(|(t, _)| *t).collect()
    }

    /// The in-features of the UNet's cross-attention key/value projections, if the LoRA
    /// changes them: the width of the text embeddings it was trained with.
    fn cross_width(&self) -> Option<usize> {
        self.modules.iter().find_map(|((t, k), m)| {
            let is_kv = ["attn2.to_k", "attn2.to_v", "attn2_to_k", "attn2_to_v"]
                .iter()
                .any(|s| k.ends_with(s));
            if *t != Target::Unet || !is_kv {
                return None;
            }
            let shape = self.file.shape(m.down.as_ref()?)?;
            (shape.len() == 2).then(|| shape[1])
        })
    }

    /// "LoRA NAME (PATH)", the start of every error about this file.
    fn what(&self) -> String {
        format!("LoRA {} ({})", self.spec.name, self.spec.path.display())
    }

    /// Reads one tensor as f32, checking that its values are finite: a NaN or inf would
    /// spread through the whole weight it is added to.
    fn read_f32(&self, tensor: &str) -> Result<Tensor> {
        let t = self
            .file
            .read(tensor)
            .and_then(|t| Ok(t.to_dtype(DType::F32)?))
            .with_context(|| format!("{}: tensor {tensor}", self.what()))?;
        ensure!(
            finite(&t)?,
            "{}: tensor {tensor} holds NaN or infinite values",
            self.what()
        );
        Ok(t)
    }

    /// `rank` is at least 1 (checked by `delta`).
    fn scale(&self, target: Target, key: &str, m: &Module, rank: usize) -> Result<f64> {
        let r = rank as f64;
        if let Some(a) = &m.alpha {
            let t = self.read_f32(a)?;
            // kohya writes a scalar; [1] is seen too. More values would be a guess.
            ensure!(
                t.elem_count() == 1,
                "{}: tensor {a}: alpha has shape {:?}, not a single number",
                self.what(),
                t.dims()
            );
            let alpha = t.flatten_all()?.get(0)?.to_scalar::<f32>()? as f64;
            return Ok(if alpha == 0.0 { 1.0 } else { alpha / r });
        }
        if m.kohya {
            return Ok(1.0);
        }
        let Some(meta) = self.meta.get(&target) else {
            return Ok(1.0);
        };
        let pattern = meta
            .alpha_pattern
            .iter()
            .find(|(p, _)| key == p || key.ends_with(&format!(".{p}")));
        let alpha = match (pattern, meta.alpha) {
            (Some((_, a)), _) => *a,
            (None, Some(a)) => a,
            (None, None) => return Ok(1.0),
        };
        ensure!(
            alpha.is_finite(),
            "{}: lora_adapter_metadata gives {key} the alpha {alpha}",
            self.what()
        );
        Ok(if meta.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        })
    }

    /// `scale · up @ down` for one module, shaped like the model weight.
    fn delta(&self, target: Target, key: &str, m: &Module, shape: &[usize]) -> Result<Tensor> {
        let what = self.what();
        let (Some(down_name), Some(up_name)) = (&m.down, &m.up) else {
            bail!("{what}: {key} lacks its down or up tensor");
        };
        let down = self.read_f32(down_name)?;
        let up = self.read_f32(up_name)?;
        // down is [rank, in] or a conv's [rank, in, kh, kw]; up is [out, rank] or
        // [out, rank, 1, 1]. A zero anywhere (rank 0 most of all) leaves nothing to add and
        // would divide by zero below.
        ensure!(
            down.rank() >= 2 && !down.dims().contains(&0),
            "{what}: tensor {down_name} has shape {:?}; a LoRA down projection is [rank >= 1, in >= 1, ...]",
            down.dims()
        );
        let rank = down.dim(0)?;
        let up_dims = up.dims();
        ensure!(
            up_dims.len() >= 2 && !up_dims.contains(&0) && up_dims[2..].iter().all(|&d| d == 1),
            "{what}: tensor {up_name} has shape {up_dims:?}; a LoRA up projection is [out >= 1, rank, 1, 1] (only 1x1 up projections are supported)"
        );
        ensure!(
            up_dims[1] == rank,
            "{what}: tensor {up_name} has rank {} but {down_name} has rank {rank}",
            up_dims[1]
        );
        let out = up_dims[0];
        let scale = self.scale(target, key, m, rank)? * self.spec.weight as f64;
        ensure!(
            scale.is_finite(),
            "{what}: {key}: the scale (alpha / rank x weight) is {scale}"
        );
        // The scale goes into `up` ([out, r], small) rather than over the full product.
        let up = (up.reshape((out, rank))? * scale)?;
        let down = down.reshape((rank, down.elem_count() / rank))?;
        let d = up.matmul(&down)?;
        let numel: usize = shape.iter().product();
        ensure!(
            d.elem_count() == numel && shape.first() == Some(&out),
            "{what}: {key} changes a [{out}, {}] weight but the model's is {shape:?}: the LoRA was made for another model",
            d.dim(1)?
        );
        // Finite factors can still overflow f32 in their product; the full check runs only
        // when a bound on |d| says it might, as it costs a pass over the whole weight.
        let bound = max_abs(&up)? * max_abs(&down)? * rank as f64;
        ensure!(
            bound < f32::MAX as f64 || finite(&d)?,
            "{what}: {key}: {up_name} @ {down_name} overflows to infinite values"
        );
        Ok(d.reshape(shape)?)
    }
}

/// Whether every value of an f32 tensor is finite: their sum is not when one is NaN or
/// infinite.
fn finite(t: &Tensor) -> Result<bool> {
    Ok(t.sum_all()?.to_scalar::<f32>()?.is_finite())
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.max_all()?.to_scalar::<f32>()? as f64)
}

/// The LoRAs of one load, with what they matched.
pub struct LoraSet {
    files: Vec<Arc<LoraFile>>,
}

/// What one LoRA did.
#[derive(Debug, Clone)]
pub struct LoraReport {
    pub name: String,
    pub path: PathBuf,
    pub weight: f32,
    /// Modules applied, per component (`unet`, `text_encoder`, `text_encoder_2`).
    pub applied: BTreeMap<String, usize>,
    /// Modules in the file.
    pub modules: usize,
    /// Tensors that matched no weight (or are of an unsupported kind).
    pub unmatched: Vec<String>,
    /// Time spent reading the LoRA and computing its changes (the merge itself).
    pub merge_time: std::time::Duration,
}

impl LoraReport {
    /// A one-line summary: `LoRA NAME (w 0.8): applied 192/192 modules (unet 128, text_encoder 64)`.
    pub fn summary(&self) -> String {
        let total: usize = self.applied.values().sum();
        let per: Vec<String> = self
            .applied
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        format!(
            "LoRA {} (weight {}): applied {total}/{} modules ({}) in {:.2} s{}",
            self.name,
            self.weight,
            self.modules,
            per.join(", "),
            self.merge_time.as_secs_f64(),
            if self.unmatched.is_empty() {
                String::new()
            } else {
                format!("; {} tensor(s) matched nothing", self.unmatched.len())
            }
        )
    }
}

fn family_of_width(width: usize) -> String {
    match width {
        768 => "SD1.x".into(),
        1024 => "SD2.x".into(),
        2048 => "SDXL".into(),
        w => format!("a model with {w}-wide text embeddings"),
    }
}

impl LoraSet {
    pub fn open(specs: &[LoraSpec]) -> Result<Self> {
        let files = specs
            .iter()
            .map(|s| LoraFile::open(s).map(Arc::new))
            .collect::<Result<_>>()?;
        Ok(Self { files })
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Fails when a LoRA was made for another model family than `family`, whose UNet
    /// cross-attention takes `cross_width`-wide text embeddings.
    pub fn check_family(&self, family: Family, cross_width: usize) -> Result<()> {
        for f in &self.files {
            let name = &f.spec.name;
            if family == Family::Sd15 && f.targets().contains(&Target::TextEncoder2) {
                bail!(
                    "LoRA {name} targets SDXL (it changes a second text encoder), but the model is {family}"
                );
            }
            if let Some(w) = f.cross_width()
                && w != cross_width
            {
                bail!(
                    "LoRA {name} targets {} (its cross-attention takes {w}-wide text embeddings), but the model is {family} ({cross_width}-wide)",
                    family_of_width(w)
                );
            }
        }
        Ok(())
    }

    /// The patch for one component, or `None` when no LoRA has modules for it.
    pub fn patch(&self, target: Target, unet: Option<&UNetConfig>) -> Option<Arc<dyn WeightPatch>> {
        let files: Vec<Arc<LoraFile>> = self
            .files
            .iter()
            .filter(|f| f.targets().contains(&target))
            .cloned()
            .collect();
        if files.is_empty() {
            return None;
        }
        Some(Arc::new(ComponentPatch {
            files,
            target,
            unet: unet.cloned(),
        }))
    }

    /// Reports what each LoRA matched. Fails when one matched nothing, or, with `strict`,
    /// when any tensor matched nothing.
    pub fn finish(&self, strict: bool) -> Result<Vec<LoraReport>> {
        let mut reports = Vec::new();
        for f in &self.files {
            let used = f.used.lock().unwrap();
            let mut applied = BTreeMap::new();
            for (t, _) in used.iter() {
                *applied.entry(t.as_str().to_string()).or_insert(0) += 1;
            }
            let mut unmatched: Vec<String> = f
                .modules
                .iter()
                .filter(|(k, _)| !used.contains(*k))
                .flat_map(|(_, m)| m.tensors().cloned())
                .collect();
            unmatched.extend(f.unsupported.iter().cloned());
            unmatched.sort();
            let name = &f.spec.name;
            if used.is_empty() {
                let shown: Vec<&str> = unmatched.iter().take(3).map(String::as_str).collect();
                bail!(
                    "LoRA {name} ({}): none of its {} modules matches a weight of this model ({}, ...)",
                    f.spec.path.display(),
                    f.modules.len(),
                    shown.join(", ")
                );
            }
            if strict && !unmatched.is_empty() {
                let shown: Vec<&str> = unmatched.iter().take(5).map(String::as_str).collect();
                bail!(
                    "LoRA {name}: {} tensor(s) match no weight of this model (--lora-strict): {}{}",
                    unmatched.len(),
                    shown.join(", "),
                    if unmatched.len() > 5 { ", ..." } else { "" }
                );
            }
            reports.push(LoraReport {
                name: name.clone(),
                path: f.spec.path.clone(),
                weight: f.spec.weight,
                applied,
                modules: f.modules.len(),
                unmatched,
                merge_time: *f.spent.lock().unwrap(),
            });
        }
        Ok(reports)
    }

    /// `(name, hash)` pairs for A1111's `Lora hashes`: the first 12 hex digits of the sha256
    /// of the file's tensor data (the "addnet" hash A1111 uses for safetensors), or the
    /// file's `sshs_model_hash` metadata when it has one.
    pub fn hashes(&self) -> Result<Vec<(String, String)>> {
        self.files
            .iter()
            .map(|f| {
                // get(): metadata is free text, and byte 12 may fall inside a character.
                let h = match f
                    .file
                    .metadata()
                    .get("sshs_model_hash")
                    .and_then(|h| h.get(..12))
                {
                    Some(h) => h.to_string(),
                    None => addnet_hash(&f.file)?[..12].to_string(),
                };
                let alias = f.spec.name.replace([':', ','], "");
                Ok((alias, h))
            })
            .collect()
    }
}

/// sha256 of a safetensors file's bytes after the header.
pub fn addnet_hash(file: &WeightFile) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file.path())?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)?;
    f.seek(SeekFrom::Start(8 + u64::from_le_bytes(n)))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

struct ComponentPatch {
    files: Vec<Arc<LoraFile>>,
    target: Target,
    unet: Option<UNetConfig>,
}

impl ComponentPatch {
    /// Every LoRA module key that could name the weight `module` (a dotted path).
    fn candidates(&self, module: &str) -> Vec<String> {
        let mut out = Vec::with_capacity(4);
        let dotted = if self.target == Target::Unet
            || module.starts_with("text_model.")
            || module.starts_with("text_projection")
        {
            module.to_string()
        } else {
            format!("text_model.{module}")
        };
        out.push(dotted.replace('.', "_"));
        if let Some(cfg) = &self.unet
            && let Some(ldm) = unet_to_ldm(module, cfg)
        {
            out.push(ldm.replace('.', "_"));
        }
        out.push(dotted);
        out
    }
}

impl WeightPatch for ComponentPatch {
    fn delta(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(module) = name.strip_suffix(".weight") else {
            return Ok(None);
        };
        if shape.len() < 2 {
            return Ok(None);
        }
        let candidates = self.candidates(module);
        let mut total: Option<Tensor> = None;
        for f in &self.files {
            for c in &candidates {
                let key = (self.target, c.clone());
                let Some(m) = f.modules.get(&key) else {
                    continue;
                };
                let t0 = std::time::Instant::now();
                let d = f.delta(self.target, c, m, shape)?;
                *f.spent.lock().unwrap() += t0.elapsed();
                f.used.lock().unwrap().insert(key);
                total = Some(match total {
                    None => d,
                    Some(t) => (t + d)?,
                });
                break;
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn keys_of_every_format() {
        let k = |s: &str| parse_key(s).map(|(t, k, p, _)| (t, k, p));
        assert_eq!(
            k("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"),
            Some((
                Target::Unet,
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q".into(),
                Part::Down
            ))
        );
        assert_eq!(
            k("lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha")
                .unwrap()
                .0,
            Target::TextEncoder2
        );
        assert_eq!(
            k("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"),
            Some((
                Target::Unet,
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into(),
                Part::Up
            ))
        );
        assert_eq!(
            k(
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight"
            ),
            Some((
                Target::Unet,
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0".into(),
                Part::Down
            ))
        );
        assert_eq!(
            k("text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.up.weight"),
            Some((
                Target::TextEncoder,
                "text_model.encoder.layers.1.self_attn.k_proj".into(),
                Part::Up
            ))
        );
        assert_eq!(
            k("text_encoder_2.encoder.layers.1.self_attn.q_proj.lora_linear_layer.down.weight"),
            Some((
                Target::TextEncoder2,
                "text_model.encoder.layers.1.self_attn.q_proj".into(),
                Part::Down
            ))
        );
        assert!(k("lora_unet_x.hada_w1_a").is_none());
    }

    #[test]
    fn tags_are_found_and_removed() {
        let p = "a car <lora:my_car:0.8>, studio <lora:light>";
        let tags = prompt_tags(p).unwrap();
        assert_eq!(
            tags,
            vec![
                LoraTag {
                    name: "my_car".into(),
                    weight: 0.8
                },
                LoraTag {
                    name: "light".into(),
                    weight: 1.0
                }
            ]
        );
        assert_eq!(strip_tags(p), "a car , studio ");
        assert!(prompt_tags("<lora:x:abc>").is_err());
        let s = LoraSpec::parse("/a/b/style.safetensors:0.5").unwrap();
        assert_eq!((s.weight, s.name.as_str()), (0.5, "style"));
        assert_eq!(LoraSpec::parse("c:/x.safetensors").unwrap().weight, 1.0);
    }

    /// A scratch folder of its own for one test.
    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tkg-lora-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes a safetensors file by hand, so that any shape (zero-sized ones too) and any
    /// metadata can be written.
    fn write_st(path: &Path, tensors: &[(&str, &[usize], &[f32])], meta: &[(&str, &str)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let start = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let meta: serde_json::Map<String, Value> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        header.insert("__metadata__".into(), Value::Object(meta));
        let header = serde_json::to_vec(&header).unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.extend(data);
        std::fs::write(path, bytes).unwrap();
    }

    fn ramp(n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 - 1.5) * scale).collect()
    }

    /// Opens a kohya LoRA of one UNet module `foo` and asks it for the change to a
    /// `shape` weight `foo.weight`.
    fn delta_of(
        d: &Path,
        file: &str,
        tensors: &[(&str, &[usize], &[f32])],
        weight: f32,
        shape: &[usize],
    ) -> Result<Option<Tensor>> {
        let path = d.join(file);
        write_st(&path, tensors, &[]);
        let spec = LoraSpec {
            path,
            weight,
            name: file.into(),
        };
        let set = LoraSet::open(&[spec])?;
        let patch = set.patch(Target::Unet, None).expect("a UNet module");
        patch.delta("foo.weight", shape)
    }

    /// A tensor to write: name, shape, values.
    type Stored<'a> = (&'a str, &'a [usize], &'a [f32]);

    const DOWN: &str = "lora_unet_foo.lora_down.weight";
    const UP: &str = "lora_unet_foo.lora_up.weight";
    const ALPHA: &str = "lora_unet_foo.alpha";

    #[test]
    fn a_good_module_gives_scale_up_at_down() {
        let d = scratch("good");
        let (down, up) = (ramp(2 * 4, 0.5), ramp(3 * 2, 0.25));
        let t = [
            (DOWN, &[2, 4][..], &down[..]),
            (UP, &[3, 2][..], &up[..]),
            (ALPHA, &[][..], &[1.0][..]),
        ];
        let got = delta_of(&d, "good.safetensors", &t, 0.8, &[3, 4])
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        // alpha / rank · weight = 1 / 2 · 0.8.
        let scale = 0.5 * 0.8;
        for (o, row) in got.iter().enumerate() {
            for (i, v) in row.iter().enumerate() {
                let want: f32 = (0..2).map(|r| up[o * 2 + r] * down[r * 4 + i]).sum();
                assert!((v - want * scale).abs() < 1e-6, "[{o}, {i}]: {v}");
            }
        }
    }

    #[test]
    fn hostile_lora_tensors_are_one_line_errors() {
        let d = scratch("hostile");
        let ok_down = ramp(2 * 4, 0.5);
        let ok_up = ramp(3 * 2, 0.5);
        let mut nan_down = ok_down.clone();
        nan_down[3] = f32::NAN;
        let mut inf_up = ok_up.clone();
        inf_up[1] = f32::INFINITY;
        let huge = vec![1e30f32; 8];
        let cases: Vec<(&str, Vec<Stored>, f32, &str)> = vec![
            (
                "rank0",
                vec![
                    (DOWN, &[0, 4], &[]),
                    (UP, &[3, 0], &[]),
                    (ALPHA, &[], &[4.0]),
                ],
                1.0,
                DOWN,
            ),
            (
                "zero_in",
                vec![(DOWN, &[2, 0], &[]), (UP, &[3, 2], &ok_up)],
                1.0,
                DOWN,
            ),
            (
                "zero_out",
                vec![(DOWN, &[2, 4], &ok_down), (UP, &[0, 2], &[])],
                1.0,
                UP,
            ),
            (
                "flat_down",
                vec![(DOWN, &[8], &ok_down), (UP, &[3, 2], &ok_up)],
                1.0,
                DOWN,
            ),
            (
                "scalar_up",
                vec![(DOWN, &[1, 4], &ok_down[..4]), (UP, &[], &[1.0])],
                1.0,
                UP,
            ),
            (
                "ranks_differ",
                vec![(DOWN, &[2, 4], &ok_down), (UP, &[2, 3], &ok_up)],
                1.0,
                UP,
            ),
            (
                "up_3x3",
                vec![(DOWN, &[1, 4], &ok_down[..4]), (UP, &[1, 1, 2, 3], &ok_up)],
                1.0,
                UP,
            ),
            (
                "alpha_nan",
                vec![
                    (DOWN, &[2, 4], &ok_down),
                    (UP, &[3, 2], &ok_up),
                    (ALPHA, &[], &[f32::NAN]),
                ],
                1.0,
                ALPHA,
            ),
            (
                "alpha_inf",
                vec![
                    (DOWN, &[2, 4], &ok_down),
                    (UP, &[3, 2], &ok_up),
                    (ALPHA, &[1], &[f32::INFINITY]),
                ],
                1.0,
                ALPHA,
            ),
            (
                "alpha_shape",
                vec![
                    (DOWN, &[2, 4], &ok_down),
                    (UP, &[3, 2], &ok_up),
                    (ALPHA, &[2], &[1.0, 2.0]),
                ],
                1.0,
                ALPHA,
            ),
            (
                "alpha_empty",
                vec![
                    (DOWN, &[2, 4], &ok_down),
                    (UP, &[3, 2], &ok_up),
                    (ALPHA, &[0], &[]),
                ],
                1.0,
                ALPHA,
            ),
            (
                "nan_down",
                vec![(DOWN, &[2, 4], &nan_down), (UP, &[3, 2], &ok_up)],
                1.0,
                DOWN,
            ),
            (
                "inf_up",
                vec![(DOWN, &[2, 4], &ok_down), (UP, &[3, 2], &inf_up)],
                1.0,
                UP,
            ),
            (
                "overflow",
                vec![(DOWN, &[2, 4], &huge), (UP, &[3, 2], &huge[..6])],
                1.0,
                DOWN,
            ),
            (
                "weight_nan",
                vec![(DOWN, &[2, 4], &ok_down), (UP, &[3, 2], &ok_up)],
                f32::NAN,
                "weight",
            ),
            (
                "weight_inf",
                vec![(DOWN, &[2, 4], &ok_down), (UP, &[3, 2], &ok_up)],
                f32::NEG_INFINITY,
                "weight",
            ),
        ];
        for (case, tensors, weight, names) in cases {
            let file = format!("{case}.safetensors");
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                delta_of(&d, &file, &tensors, weight, &[3, 4])
            }));
            let r = r.unwrap_or_else(|_| panic!("{case}: panicked"));
            let msg = match r {
                Ok(t) => panic!("{case}: no error, gave {t:?}"),
                Err(e) => format!("{e:#}"),
            };
            assert!(!msg.contains('\n'), "{case}: {msg}");
            assert!(msg.contains(&file), "{case}: names the file: {msg}");
            assert!(msg.contains(names), "{case}: names {names}: {msg}");
        }
    }

    #[test]
    fn a_short_hash_in_metadata_does_not_split_a_character() {
        let d = scratch("hash");
        let path = d.join("h.safetensors");
        let (down, up) = (ramp(4, 1.0), ramp(3, 1.0));
        let t = [(DOWN, &[1, 4][..], &down[..]), (UP, &[3, 1][..], &up[..])];
        // Byte 12 falls inside the last 'é'.
        write_st(&path, &t, &[("sshs_model_hash", "aéééééé")]);
        let spec = LoraSpec::parse(path.to_str().unwrap()).unwrap();
        let set = LoraSet::open(std::slice::from_ref(&spec)).unwrap();
        let want = addnet_hash(&WeightFile::open(&path).unwrap()).unwrap();
        assert_eq!(
            set.hashes().unwrap(),
            [("h".to_string(), want[..12].to_string())]
        );
        write_st(&path, &t, &[("sshs_model_hash", "0123456789abcdef")]);
        let set = LoraSet::open(&[spec]).unwrap();
        assert_eq!(set.hashes().unwrap()[0].1, "0123456789ab");
    }

    #[test]
    fn tags_stay_inside_the_lora_dir() {
        let root = scratch("escape");
        let dir = root.join("loras");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("outside")).unwrap();
        for f in [
            "loras/a.safetensors",
            "loras/sub/b.safetensors",
            "outside/x.safetensors",
        ] {
            std::fs::write(root.join(f), b"").unwrap();
        }
        let tag = |name: &str| LoraTag {
            name: name.into(),
            weight: 0.5,
        };
        let resolve = |name: &str| resolve_tag(&tag(name), Some(&dir));
        let found = |name: &str| resolve(name).unwrap().path;
        assert_eq!(found("a"), dir.join("a.safetensors"));
        assert_eq!(found("a.safetensors"), dir.join("a.safetensors"));
        assert_eq!(found("sub/b"), dir.join("sub/b.safetensors"));
        assert_eq!(found("b"), dir.join("sub/b.safetensors"));
        assert_eq!(resolve("b").unwrap().weight, 0.5);
        let escapes = |name: &str| {
            let msg = format!("{:#}", resolve(name).expect_err(name));
            assert!(
                msg.contains(&format!("<lora:{name}>"))
                    && msg.contains("must stay inside --lora-dir"),
                "{name}: {msg}"
            );
            assert!(!msg.contains('\n'), "{msg}");
        };
        let abs = root.join("outside/x");
        for name in [
            "../outside/x",
            "sub/../../outside/x",
            "sub/../a",
            "..",
            abs.to_str().unwrap(),
            "/etc/passwd",
            "a\0",
            "",
            ".",
        ] {
            escapes(name);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            symlink(
                root.join("outside/x.safetensors"),
                dir.join("link.safetensors"),
            )
            .unwrap();
            symlink(root.join("outside"), dir.join("out")).unwrap();
            symlink(&dir, dir.join("sub/loop")).unwrap();
            symlink(dir.join("a.safetensors"), dir.join("sub/alias.safetensors")).unwrap();
            escapes("link");
            escapes("out/x");
            // The search does not follow a link out of the folder, and ends on a link cycle.
            let msg = format!("{:#}", resolve("x").unwrap_err());
            assert!(msg.contains("no x.safetensors in --lora-dir"), "{msg}");
            assert!(resolve("missing").is_err());
            // A link that stays inside is fine.
            assert_eq!(found("alias"), dir.join("sub/alias.safetensors"));
        }
    }
}
