//! `tkg info IMAGE.png`: the settings in an image's `parameters` chunk, and the `tkg
//! generate` command that makes it again.

use super::Ui;
use crate::metadata::Parameters;
use crate::output;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// A PNG written by tkg (or A1111, Forge, ...).
    pub image: PathBuf,
    /// Print one JSON object (prompt, negative_prompt, settings, command) instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InfoArgs, _ui: Ui) -> Result<()> {
    let chunks = output::read_png_text(&args.image)?;
    let text = chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone())
        .with_context(|| format!("{} has no 'parameters' text chunk", args.image.display()))?;
    let params = Parameters::parse(&text).map_err(anyhow::Error::msg)?;
    let command = command_for(&params, &repro_name(&args.image));
    if args.json {
        let settings: serde_json::Map<String, serde_json::Value> = params
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let v = serde_json::json!({
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "settings": settings,
            "command": command.as_ref().ok(),
            "command_error": command.as_ref().err().map(|e| format!("{e:#}")),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("Prompt: {}", params.prompt);
    if !params.negative_prompt.is_empty() {
        println!("Negative prompt: {}", params.negative_prompt);
    }
    for (k, v) in &params.entries {
        println!("{k}: {v}");
    }
    match command {
        Ok(c) => {
            println!();
            println!("{c}");
            Ok(())
        }
        Err(e) => bail!("cannot rebuild a tkg generate command: {e:#}"),
    }
}

/// `car.png` → `car-repro.png`, next to nothing: a name that does not clobber the original.
fn repro_name(image: &Path) -> PathBuf {
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

/// The `tkg generate` command that reproduces the image described by `p`, writing `out`.
pub fn command_for(p: &Parameters, out: &Path) -> Result<String> {
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
    let get = |k: &str| p.get(k);
    let method = get("TKG method").unwrap_or("plain");
    if !matches!(method, "tkg" | "prompt" | "plain") {
        bail!("unknown TKG method '{method}'");
    }
    let color = get("TKG color");
    // `--method prompt` stores the prompt it used; give back the user's.
    let prompt = if method == "prompt" {
        let c = crate::color::KeyColor::parse(color.unwrap_or("green"))
            .map_err(|e| anyhow::anyhow!("TKG color: {e}"))?;
        let suffix = super::batch::prompt_method_text("", &c);
        p.prompt
            .strip_suffix(&suffix)
            .with_context(|| format!("the prompt does not end in '{suffix}'"))?
            .to_string()
    } else {
        p.prompt.clone()
    };
    push("--prompt", &prompt);
    if !p.negative_prompt.is_empty() {
        push("--negative-prompt", &p.negative_prompt);
    }
    match (get("TKG model dir"), get("Model")) {
        (Some(d), _) => push("--model-dir", d),
        (None, Some(m)) => push("--model", m),
        (None, None) => bail!("no Model"),
    }
    if let Some(s) = get("Sampler")
        && s != "DDIM"
    {
        bail!("sampler '{s}' is not one tkg has (DDIM)");
    }
    let seed = get("Seed").context("no Seed")?;
    seed.parse::<u64>()
        .with_context(|| format!("Seed '{seed}' is not a number"))?;
    push("--seed", seed);
    push("--steps", get("Steps").context("no Steps")?);
    push("--guidance", get("CFG scale").context("no CFG scale")?);
    let size = get("Size").context("no Size")?;
    let (w, h) = size
        .split_once('x')
        .with_context(|| format!("Size '{size}' is not WxH"))?;
    push("--width", w);
    push("--height", h);
    if let Some(c) = get("Clip skip") {
        push("--clip-skip", c);
    }
    match get("RNG") {
        Some("CPU") => push("--rng", "torch-cpu"),
        Some("NV") | Some("GPU") | None => push("--rng", "torch-cuda"),
        Some(o) => bail!("RNG '{o}' is not one tkg has"),
    }
    if let Some(v) = get("TKG original size") {
        push("--original-size", v);
    }
    if let Some(v) = get("TKG crop top left") {
        push("--crop-top-left", v);
    }
    if let Some(v) = get("TKG target size") {
        push("--target-size", v);
    }
    push("--method", method);
    if let Some(c) = color {
        push("--color", c);
    }
    if method == "tkg" {
        if let Some(v) = get("TKG shift") {
            push("--shift", v);
        }
        if let Some(v) = get("TKG sigma") {
            push("--mask-sigma", v);
        }
        if let Some(v) = get("TKG center") {
            for c in v.split(';').filter(|c| !c.is_empty()) {
                push("--subject-center", c);
            }
        }
    }
    push("--out", &out.display().to_string());
    Ok(args.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let c = command_for(&p, Path::new("o.png")).unwrap();
        assert!(
            c.contains("--rng torch-cuda") && c.contains("--seed 5"),
            "{c}"
        );
        let p = Parameters::parse(
            "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, Model: x",
        )
        .unwrap();
        assert!(command_for(&p, Path::new("o.png")).is_err());
    }
}
