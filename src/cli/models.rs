//! `tkg models`: list the registry, materialise built-in models.

use super::Ui;
use super::stdio::outln;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tkg::models::builtin;
use tkg::models::hub::ModelFolder;
use tkg::models::registry::{ModelEntry, ModelKind, Registry, SegmenterSource, Source};
use tkg::pipeline::detect_family;

#[derive(Debug, Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub command: ModelsCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Show the known models and whether each is already on this machine.
    List {
        /// An extra models.toml merged over the built-in registry.
        #[arg(long, value_name = "FILE")]
        models_file: Option<PathBuf>,
    },
    /// Write a built-in random-weight model as a diffusers folder.
    Materialize {
        /// tiny-sd15 or random-sd15.
        name: String,
        /// The folder to create.
        dir: PathBuf,
    },
}

pub fn run(args: &ModelsArgs, ui: Ui) -> Result<()> {
    match &args.command {
        ModelsCommand::List { models_file } => {
            let reg = Registry::load(super::args::registry_file(models_file.as_deref()).as_ref())?;
            outln!("{:<20} {:<6} {:<8} SOURCE", "NAME", "FAMILY", "CACHED");
            let mut mismatches = Vec::new();
            for e in reg.entries() {
                let cached = e.is_cached();
                // `as_str`: Family's Display ignores the column width.
                outln!(
                    "{:<20} {:<6} {:<8} {}",
                    e.name,
                    e.family.as_str(),
                    if cached { "yes" } else { "no" },
                    e.source
                );
                mismatches.extend(family_mismatch(e));
            }
            for err in mismatches {
                ui.warn(format!("{err:#}"));
            }
            outln!("\n{:<20} {:<8} SOURCE", "SEGMENTER", "CACHED");
            for s in reg.segmenters() {
                let (cached, source) = match &s.source {
                    SegmenterSource::File(f) => (f.exists(), f.display().to_string()),
                    SegmenterSource::Hub { repo, revision } => (
                        ModelFolder::hub(repo, revision).is_ok_and(|f| f.is_cached()),
                        format!("hub {repo}@{revision}"),
                    ),
                };
                outln!(
                    "{:<20} {:<8} {source}",
                    s.name,
                    if cached { "yes" } else { "no" }
                );
            }
            outln!(
                "(and rembg's u2netp, u2net, silueta from $U2NET_HOME or ~/.u2net, a .onnx file, \
                 or a SAM folder)"
            );
            Ok(())
        }
        ModelsCommand::Materialize { name, dir } => {
            ui.info(format!("writing {name} into {}", dir.display()));
            // The library's errors name the path; nothing is added here.
            builtin::materialize(name, dir)?;
            outln!("{}", dir.display());
            Ok(())
        }
    }
}

/// The error when a pipeline's own configs, where they are on this machine, say another
/// family than its registry entry. Read from the cache alone (a local view of the snapshot:
/// listing never downloads); configs that cannot be read say nothing here, CACHED shows it.
fn family_mismatch(e: &ModelEntry) -> Option<anyhow::Error> {
    if e.kind != ModelKind::Pipeline || matches!(e.source, Source::File(_)) {
        return None;
    }
    let root = e.folder().ok()?.root()?;
    let found = detect_family(&ModelFolder::local(&root).ok()?).ok()?;
    e.check_family(found).err()
}
