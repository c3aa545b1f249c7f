//! `tkg models`: list the registry, materialise built-in models.

use super::Ui;
use super::stdio::outln;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tkg::models::builtin;
use tkg::models::registry::Registry;

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
            for e in reg.entries() {
                outln!(
                    "{:<20} {:<6} {:<8} {}",
                    e.name,
                    e.family,
                    if e.is_cached() { "yes" } else { "no" },
                    e.source
                );
            }
            Ok(())
        }
        ModelsCommand::Materialize { name, dir } => {
            ui.info(format!("writing {name} into {}", dir.display()));
            builtin::materialize(name, dir)?;
            outln!("{}", dir.display());
            Ok(())
        }
    }
}
