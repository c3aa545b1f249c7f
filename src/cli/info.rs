//! `tkg info IMAGE.png`: the settings in an image's `parameters` chunk, and the `tkg
//! generate` command that makes it again.
//!
//! Everything printed from the image goes through [`terminal_safe`] (text) or
//! [`json_terminal_safe`] (JSON): a PNG is untrusted input, and its text chunks could
//! otherwise carry escape sequences that clear, retitle or reprogram the terminal.

use super::Ui;
use anyhow::{Context, Result, bail};
use clap::Args;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::PathBuf;
use tkg::metadata::{Parameters, Recipe, repro_name};
use tkg::output;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// A PNG written by tkg (or A1111, Forge, ...).
    pub image: PathBuf,
    /// Print one JSON object (prompt, negative_prompt, settings, command) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Controls a terminal may act on: C0 (but `\n` and `\t`, which lay text out), DEL and C1
/// (`char::is_control` is exactly those three ranges).
fn is_unsafe(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// `s` with every unsafe control written as a visible escape: `\x1b` for C0 and DEL,
/// `\u{9b}` for C1 (so the escape says which code point it was). Printable text, line
/// breaks and tabs are kept as they are.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c as u32 {
            _ if !is_unsafe(c) => out.push(c),
            n @ (0..=0x1f | 0x7f) => write!(out, "\\x{n:02x}").expect("String writes"),
            n => write!(out, "\\u{{{n:x}}}").expect("String writes"),
        }
    }
    Cow::Owned(out)
}

/// serde_json escapes C0 controls but writes DEL and C1 as they are; those can only occur
/// inside JSON strings, so escaping them as `\u00XX` keeps the same JSON value.
fn json_terminal_safe(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if is_unsafe(c) {
            write!(out, "\\u{:04x}", c as u32).expect("String writes");
        } else {
            out.push(c);
        }
    }
    out
}

pub fn run(args: &InfoArgs, ui: Ui) -> Result<()> {
    let chunks = output::read_png_text(&args.image)?;
    let text = chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone())
        .with_context(|| {
            format!(
                "{} has no 'parameters' text chunk",
                terminal_safe(&args.image.display().to_string())
            )
        })?;
    let params =
        Parameters::parse(&text).map_err(|e| anyhow::Error::msg(terminal_safe(&e).into_owned()))?;
    let command = Recipe::from_parameters(&params).map(|r| r.command(&repro_name(&args.image)));
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
        println!("{}", json_terminal_safe(&serde_json::to_string_pretty(&v)?));
        return Ok(());
    }
    println!("Prompt: {}", terminal_safe(&params.prompt));
    if !params.negative_prompt.is_empty() {
        println!(
            "Negative prompt: {}",
            terminal_safe(&params.negative_prompt)
        );
    }
    for (k, v) in &params.entries {
        println!("{}: {}", terminal_safe(k), terminal_safe(v));
    }
    match command {
        Ok(c) => {
            let shown = terminal_safe(&c);
            println!();
            println!("{shown}");
            if let Cow::Owned(_) = shown {
                // The escapes are text now: pasted into a shell they are not the controls.
                ui.warn(
                    "the settings hold control characters, shown above as escapes; the \
                     command does not reproduce them",
                );
            }
            Ok(())
        }
        Err(e) => bail!(
            "cannot rebuild a tkg generate command: {}",
            terminal_safe(&format!("{e:#}"))
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_visible_escapes() {
        assert!(matches!(
            terminal_safe("a cat\n\tsitting"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            terminal_safe("x\u{1b}[2Jy\u{1b}]0;owned\u{7}z"),
            "x\\x1b[2Jy\\x1b]0;owned\\x07z"
        );
        assert_eq!(terminal_safe("\r\0\u{7f}"), "\\x0d\\x00\\x7f");
        assert_eq!(terminal_safe("a\u{9b}31mb\u{85}"), "a\\u{9b}31mb\\u{85}");
        // Printable non-ASCII text stays.
        assert_eq!(terminal_safe("café 猫 \u{a0}"), "café 猫 \u{a0}");
    }

    #[test]
    fn json_keeps_its_value_and_loses_raw_controls() {
        let s = "a\u{1b}[2J\u{7f}\u{9b}b\n";
        let json =
            json_terminal_safe(&serde_json::to_string(&serde_json::json!({ "p": s })).unwrap());
        assert!(!json.chars().any(is_unsafe), "{json:?}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["p"], s);
    }
}
