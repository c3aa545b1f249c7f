//! `tkg generate`: one image on a flat key colour, plus its matte and cut-out.

use super::Ui;
use super::args::JobOptions;
use anyhow::{Result, bail};
use clap::Args;
use tkg::run::JobFile;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What to draw.
    #[arg(long, short)]
    pub prompt: String,
    #[command(flatten)]
    pub opts: JobOptions,
}

pub fn run(args: &GenerateArgs, ui: Ui) -> Result<()> {
    let opts = &args.opts;
    let seed = match opts.seed {
        Some(s) => s,
        None => {
            if opts.run.shard.is_some() {
                bail!("--shard needs --seed, so that every shard draws the same seeds");
            }
            let s = rand::random::<u32>() as u64;
            ui.info(format!("seed: {s}"));
            s
        }
    };
    let mut base = opts.base_settings(&args.prompt, "tkg-{seed}.png");
    base.seed = Some(seed);
    // A single path names its folder: a typo there is an error, not a new folder.
    let cfg = opts.run_config(false, ui)?;
    super::run_jobs(&JobFile::command_line(), &base, seed, &cfg, &opts.run, ui)
}
