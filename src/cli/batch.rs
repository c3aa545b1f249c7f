//! `tkg batch`: many images from a JSONL job file or a prompt file.

use super::Ui;
use super::args::JobOptions;
use anyhow::{Result, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use tkg::run::JobFile;

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// A JSONL job file: one object a line with per-job overrides (prompt, negative_prompt,
    /// color, seed, num_images, steps, guidance, width, height, method, shift, mask_sigma,
    /// subject_center, clip_skip, model, model_dir, lora, out, rng, ...).
    #[arg(value_name = "JOBS.jsonl", required_unless_present = "prompt_file")]
    pub jobs: Option<PathBuf>,
    /// A text file with one prompt a line instead of a JSONL file.
    #[arg(long, value_name = "FILE.txt", conflicts_with = "jobs")]
    pub prompt_file: Option<PathBuf>,
    /// The prompt of job lines that give none.
    #[arg(long, short)]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub opts: JobOptions,
}

pub fn run(args: &BatchArgs, ui: Ui) -> Result<()> {
    let jobs = match (&args.jobs, &args.prompt_file) {
        (Some(p), _) => JobFile::jsonl(&p.display().to_string(), &read_text(p)?)?,
        (None, Some(p)) => JobFile::prompts(&p.display().to_string(), &read_text(p)?)?,
        (None, None) => bail!("give a JOBS.jsonl file or --prompt-file"),
    };
    let prompt = args.prompt.clone().unwrap_or_default();
    let base = args
        .opts
        .base_settings(&prompt, "tkg-{index:05}-{seed}.png");
    let base_seed = args.opts.seed.unwrap_or(0);
    // Templates may name new folders.
    let cfg = args.opts.run_config(true, ui)?;
    super::run_jobs(&jobs, &base, base_seed, &cfg, &args.opts.run, ui)
}

fn read_text(p: &Path) -> Result<String> {
    tkg::limits::read_text_bounded(p, tkg::limits::MAX_JOB_FILE)
}
