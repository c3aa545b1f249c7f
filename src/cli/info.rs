//! `tkg info IMAGE.png`: the settings in an image's `parameters` chunk, and the `tkg
//! generate` command that makes it again.
//!
//! Everything printed from the image goes through [`terminal_safe`] (text) or
//! [`json_terminal_safe`] (JSON): a PNG is untrusted input. (Errors are made safe where the
//! CLI prints them.)

use super::Ui;
use super::stdio::outln;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::borrow::Cow;
use std::path::PathBuf;
use tkg::key::keyability::Keyability;
use tkg::metadata::{Parameters, PlaceRecipe, Recipe, keyability_from_png_text, repro_name};
use tkg::output;
use tkg::text::{json_terminal_safe, terminal_safe};

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// A PNG written by tkg (or A1111, Forge, ...).
    pub image: PathBuf,
    /// Print one JSON object (prompt, negative_prompt, settings, command) instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &InfoArgs, ui: Ui) -> Result<()> {
    let chunks = output::read_png_text(&args.image)?;
    let keyability = keyability_from_png_text(&chunks)
        .transpose()
        .with_context(|| args.image.display().to_string())?;
    if !chunks.iter().any(|(k, _)| k == "parameters")
        && let Some(k) = &keyability
    {
        // A `tkg key` output: its keyability, and no settings.
        if args.json {
            let v = serde_json::json!({ "keyability": k });
            outln!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            outln!("{}", keyability_line(k));
        }
        return Ok(());
    }
    let text = chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone())
        .with_context(|| format!("{} has no 'parameters' text chunk", args.image.display()))?;
    let params = Parameters::parse(&text).map_err(anyhow::Error::msg)?;
    let out = repro_name(&args.image);
    let command = match PlaceRecipe::from_parameters(&params) {
        Ok(Some(place)) => Ok(place.command(&out)),
        Ok(None) => Recipe::from_parameters(&params).map(|r| r.command(&out)),
        Err(e) => Err(e),
    };
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
            "keyability": keyability,
            "command_error": command.as_ref().err().map(|e| format!("{e:#}")),
        });
        outln!("{}", json_terminal_safe(&serde_json::to_string_pretty(&v)?));
        return Ok(());
    }
    outln!("Prompt: {}", terminal_safe(&params.prompt));
    if !params.negative_prompt.is_empty() {
        outln!(
            "Negative prompt: {}",
            terminal_safe(&params.negative_prompt)
        );
    }
    for (k, v) in &params.entries {
        outln!("{}: {}", terminal_safe(k), terminal_safe(v));
    }
    if let Some(k) = &keyability {
        outln!("{}", keyability_line(k));
    }
    match command {
        Ok(c) => {
            let shown = terminal_safe(&c);
            outln!();
            outln!("{shown}");
            if let Cow::Owned(_) = shown {
                // The escapes are text now: pasted into a shell they are not the controls.
                ui.warn(
                    "the settings hold control characters, shown above as escapes; the \
                     command does not reproduce them",
                );
            }
            Ok(())
        }
        Err(e) => bail!("cannot rebuild the command that made it: {e:#}"),
    }
}

/// The score and the parts a person reads first.
fn keyability_line(k: &Keyability) -> String {
    format!(
        "Keyability {:.1}/100: border {:.0}% screen, residual {:.1}, subject {:.0}% of the \
         image{}, key-hued parts {:.1}%, enclosed screen {:.1}%, ambiguous alpha {:.1}%, \
         spill {:.1}",
        k.score,
        k.border_screen * 100.0,
        k.plate_residual,
        k.subject_size * 100.0,
        if k.touches_border {
            " (touches the border)"
        } else {
            ""
        },
        k.entanglement * 100.0,
        k.enclosed_screen * 100.0,
        k.ambiguous * 100.0,
        k.spill
    )
}
