//! The command line: clap flags turned once into the library's settings, progress on
//! stderr, and the process itself (threads, signals, exit codes).

mod args;
mod batch;
mod bench;
mod completions;
mod generate;
mod info;
mod key;
mod models;
mod place;
mod progress;
mod runtime;
mod segment;
pub mod stdio;

use stdio::{errln, outln};

use anyhow::Result;
use clap::{Parser, Subcommand};
use tkg::run::{JobFile, Plan, RunConfig, Runner};
use tkg::settings::Settings;
use tkg::text::terminal_safe;

/// Chroma-key image generation with Stable Diffusion (TKG-DM), and keying.
#[derive(Debug, Parser)]
#[command(name = "tkg", version, about, long_about = None)]
pub struct Cli {
    /// Print nothing on stderr but errors.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Print more detail on stderr (channel signs, timings, load reports).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an image on a flat key colour, and key it (image, matte, cut-out).
    Generate(Box<generate::GenerateArgs>),
    /// Key an existing image: write its alpha matte and cut-out.
    Key(key::KeyArgs),
    /// Write a subject mask of an image with a segmentation model (rembg's U²-Net, or SAM
    /// / SlimSAM with points and a box).
    Segment(segment::SegmentArgs),
    /// List or materialise models.
    Models(models::ModelsArgs),
    /// Time each stage of a generation (load, text, UNet step, VAE decode) and peak memory.
    Bench(Box<bench::BenchArgs>),
    /// Generate many images from a JSONL job file or a prompt file (shardable, resumable).
    Batch(Box<batch::BatchArgs>),
    /// Put a cut-out into a photo: scaled, anchored, with a shadow, optionally colour-matched
    /// and harmonised by inpainting (the product itself is never redrawn).
    Place(Box<place::PlaceArgs>),
    /// Print an image's generation settings and the command that makes it again.
    Info(info::InfoArgs),
    /// Print shell completions: tkg completions bash|zsh|fish > FILE.
    Completions(completions::CompletionsArgs),
    /// Print the man page (roff), or write all pages into a folder.
    Man(completions::ManArgs),
}

/// How chatty to be on stderr.
#[derive(Debug, Clone, Copy)]
pub struct Ui {
    pub quiet: bool,
    pub verbose: bool,
}

impl Ui {
    /// Where the run's Hub downloads are announced, as `tkg: downloading …`.
    pub fn download_notices(self) -> tkg::models::hub::Notices {
        tkg::models::hub::Notices::new(move |m| self.info(format!("tkg: {m}")))
    }

    /// A progress or status line (stderr), unless quiet. Every stderr line goes through
    /// [`terminal_safe`]: warnings quote prompts and job files.
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            errln!("{}", terminal_safe(msg.as_ref()));
        }
    }
    /// A warning (stderr), unless quiet.
    pub fn warn(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            errln!("warning: {}", terminal_safe(msg.as_ref()));
        }
    }
    /// Detail shown with --verbose.
    pub fn detail(&self, msg: impl AsRef<str>) {
        if self.verbose && !self.quiet {
            errln!("{}", terminal_safe(msg.as_ref()));
        }
    }
}

/// Parses the command line and runs it.
pub fn run() -> Result<()> {
    let cli = Cli::try_parse().map_err(usage_error)?;
    let threads = match &cli.command {
        Command::Bench(args) => args.threads,
        _ => None,
    };
    runtime::start(threads)?;
    // The command runs on a pool thread: the kernels' parallel loops then start there at once,
    // instead of handing every small operation to the pool and sleeping on a futex until it
    // is done (on tiny models that hand-off cost more than the work).
    let mut result = None;
    rayon::scope(|_| result = Some(dispatch(&cli)));
    result.expect("the scope ran the command")
}

fn dispatch(cli: &Cli) -> Result<()> {
    let ui = Ui {
        quiet: cli.quiet,
        verbose: cli.verbose,
    };
    match &cli.command {
        Command::Generate(args) => generate::run(args, ui),
        Command::Key(args) => key::run(args, ui),
        Command::Segment(args) => segment::run(args, ui),
        Command::Models(args) => models::run(args, ui),
        Command::Bench(args) => bench::run(args, ui),
        Command::Batch(args) => batch::run(args, ui),
        Command::Place(args) => place::run(args, ui),
        Command::Info(args) => info::run(args, ui),
        Command::Completions(args) => completions::completions(args, ui),
        Command::Man(args) => completions::man(args, ui),
    }
}

/// Plans `jobs` over `base`, then prints the plan (`--dry-run`) or runs it with progress
/// on stderr and Ctrl-C as the cancel flag.
pub fn run_jobs(
    jobs: &JobFile,
    base: &Settings,
    base_seed: u64,
    cfg: &RunConfig,
    run: &args::RunOptions,
    ui: Ui,
) -> Result<()> {
    let date = tkg::run::template::today_utc();
    let plan = Plan::new(jobs, base, base_seed, &date, cfg)?;
    let reporter = progress::Reporter::new(ui, run.progress);
    let runner = Runner {
        config: cfg,
        events: &reporter,
        cancel: &runtime::CANCEL,
    };
    if run.dry_run {
        runner.plan_event(&plan, true);
        let (lines, summary) = plan.dry_run_listing();
        for line in lines {
            outln!("{line}");
        }
        ui.info(summary);
        return Ok(());
    }
    runtime::install_interrupt_handler();
    runner.run(&plan)?;
    Ok(())
}

/// Every failure is one line on stderr: the error and its causes, joined.
pub fn one_line_error(err: &anyhow::Error) -> String {
    // candle appends a backtrace ("0: frame" lines) to its errors when RUST_BACKTRACE is
    // set: a cause's text stops there.
    let is_frame = |l: &str| {
        let digits = l.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && l[digits..].starts_with(':')
    };
    let causes: Vec<String> = err
        .chain()
        .map(|c| {
            c.to_string()
                .lines()
                .map(str::trim)
                .take_while(|l| !is_frame(l))
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|l| !l.is_empty())
        .collect();
    // A context that already quotes its cause ("cannot read x: denied") says it once.
    let mut said: Vec<&str> = Vec::new();
    for c in &causes {
        if !said.iter().any(|s| s.contains(c.as_str())) {
            said.push(c);
        }
    }
    format!("error: {}", terminal_safe(&said.join(": ")))
}

/// A command line clap refused, worded in one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

/// Help and version go out as clap prints them; a usage error becomes one line.
fn usage_error(e: clap::Error) -> anyhow::Error {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).skip_while(|l| l.is_empty());
    let mut first = lines
        .next()
        .unwrap_or("invalid command line")
        .trim_start_matches("error:")
        .trim()
        .to_string();
    // "the following required arguments were not provided:" lists them on the next lines.
    if first.ends_with(':') {
        let listed: Vec<&str> = lines.take_while(|l| !l.is_empty()).collect();
        first = format!("{first} {}", listed.join(", "));
    }
    let tip = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("tip:"))
        .map(|t| format!(" ({})", t.trim_start_matches("tip:").trim()))
        .unwrap_or_default();
    UsageError(format!("{first}{tip}; see --help")).into()
}

/// Exit status for a failure.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    // 130 = 128 + SIGINT, as shells report an interrupted command.
    if err.is::<tkg::run::Interrupted>() {
        130
    } else if err.is::<UsageError>() {
        2
    } else {
        1
    }
}

/// A panic is a bug, but the user still gets one line, not a backtrace.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let loc = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        errln!(
            "error: internal error (a bug in tkg, please report it): {}{loc}",
            msg.replace('\n', " ")
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::{Cli, one_line_error, usage_error};
    use clap::Parser;

    #[test]
    fn usage_errors_name_what_is_missing_in_one_line() {
        let e = Cli::try_parse_from(["tkg", "models", "materialize"]).unwrap_err();
        let msg = usage_error(e).to_string();
        assert!(
            msg.contains("not provided: <NAME>, <DIR>") && msg.ends_with("; see --help"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    fn one_line_error_drops_backtraces_and_keeps_causes() {
        let inner =
            anyhow::anyhow!("unsupported dtype BF16 for op matmul\n   0: candle::bt\n   1: main");
        let err = inner.context("loading the UNet\nfrom its folder");
        assert_eq!(
            one_line_error(&err),
            "error: loading the UNet from its folder: unsupported dtype BF16 for op matmul"
        );
    }
}
