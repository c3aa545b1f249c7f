//! How LoRAs are named: `FILE[:WEIGHT]` specs and A1111's `<lora:NAME:WEIGHT>` prompt tags,
//! resolved inside `--lora-dir` and nowhere else.

use anyhow::{Context, Result, bail, ensure};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// One LoRA to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    /// The multiplier (A1111's weight); 1.0 by default.
    pub weight: f32,
    /// The name shown in reports and in `Lora hashes` (the prompt tag's name, or the file
    /// stem).
    pub name: String,
}

impl LoraSpec {
    /// Parses `--lora FILE[:WEIGHT]`.
    pub fn parse(arg: &str) -> Result<Self> {
        let (path, weight) = match arg.rsplit_once(':') {
            Some((p, w)) if !p.is_empty() && w.trim().parse::<f32>().is_ok() => {
                (p, w.trim().parse::<f32>().expect("checked"))
            }
            _ => (arg, 1.0),
        };
        ensure!(
            weight.is_finite(),
            "--lora {arg}: the weight must be a finite number"
        );
        let path = PathBuf::from(path);
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(Self { path, weight, name })
    }
}

/// A `<lora:NAME:WEIGHT>` tag found in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTag {
    pub name: String,
    pub weight: f32,
}

fn tag_regex() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| regex::Regex::new(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>").unwrap())
}

/// The `<lora:NAME[:WEIGHT]>` tags of a prompt (A1111's syntax), in order.
pub fn prompt_tags(prompt: &str) -> Result<Vec<LoraTag>> {
    tag_regex()
        .captures_iter(prompt)
        .map(|c| {
            let name = c[1].trim().to_string();
            let weight = match c.get(2).map(|m| m.as_str().trim()) {
                None | Some("") => 1.0,
                Some(w) => w
                    .parse::<f32>()
                    .ok()
                    .filter(|w| w.is_finite())
                    .with_context(|| format!("<lora:{name}:{w}>: the weight must be a number"))?,
            };
            Ok(LoraTag { name, weight })
        })
        .collect()
}

/// The prompt without its `<lora:...>` tags: the text that is encoded.
pub fn strip_tags(prompt: &str) -> String {
    if !prompt.contains("<lora:") {
        return prompt.to_string();
    }
    tag_regex().replace_all(prompt, "").into_owned()
}

/// Finds a tag's file in `--lora-dir`: `NAME.safetensors` (also in sub-folders, as A1111
/// does), or `NAME` itself. NAME may name a sub-folder (`style/ink`) but never leads out of
/// the folder, by `..`, an absolute path or a symlink.
pub fn resolve_tag(tag: &LoraTag, dir: Option<&Path>) -> Result<LoraSpec> {
    let Some(dir) = dir else {
        bail!(
            "the prompt has <lora:{}:...> but no --lora-dir says where LoRA files are",
            tag.name
        );
    };
    let outside = || {
        anyhow::anyhow!(
            "<lora:{}>: LoRA names must stay inside --lora-dir {}",
            tag.name,
            dir.display()
        )
    };
    // A prompt is input, often a job file's: its names must not reach other files.
    let rel = Path::new(&tag.name);
    let plain = rel.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    if !plain || tag.name.contains('\0') || rel.file_name().is_none() {
        return Err(outside());
    }
    let root = dir
        .canonicalize()
        .with_context(|| format!("<lora:{}>: --lora-dir {}", tag.name, dir.display()))?;
    let inside = |p: &Path| p.canonicalize().is_ok_and(|c| c.starts_with(&root));
    let want = format!("{}.safetensors", tag.name);
    let direct = [dir.join(&want), dir.join(&tag.name)];
    let mut found = direct.into_iter().find(|p| p.is_file());
    if found.is_none() {
        let mut seen = BTreeSet::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            // Folders symlinked outside are not searched, nor one folder twice (a link cycle).
            match d.canonicalize() {
                Ok(c) if c.starts_with(&root) && !seen.contains(&c) => seen.insert(c),
                _ => continue,
            };
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
            entries.sort();
            for p in entries {
                if p.is_dir() {
                    stack.push(p);
                } else if p.file_name().is_some_and(|n| n == want.as_str()) {
                    found = Some(p);
                    break;
                }
            }
            if found.is_some() {
                break;
            }
        }
    }
    let path = found.with_context(|| {
        format!(
            "<lora:{}>: no {want} in --lora-dir {}",
            tag.name,
            dir.display()
        )
    })?;
    if !inside(&path) {
        return Err(outside());
    }
    Ok(LoraSpec {
        path,
        weight: tag.weight,
        name: tag.name.clone(),
    })
}
