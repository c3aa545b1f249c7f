//! The command line: a thin layer of clap over the library.

mod batch;
mod bench;
mod completions;
mod generate;
mod info;
mod key;
mod models;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// List or materialise models.
    Models(models::ModelsArgs),
    /// Time each stage of a generation (load, text, UNet step, VAE decode) and peak memory.
    Bench(Box<bench::BenchArgs>),
    /// Generate many images from a JSONL job file or a prompt file (shardable, resumable).
    Batch(Box<batch::BatchArgs>),
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
    /// A progress or status line (stderr), unless quiet.
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }
    /// A warning (stderr), unless quiet.
    pub fn warn(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("warning: {}", msg.as_ref());
        }
    }
    /// Detail shown with --verbose.
    pub fn detail(&self, msg: impl AsRef<str>) {
        if self.verbose && !self.quiet {
            eprintln!("{}", msg.as_ref());
        }
    }
}

/// Parses the command line and runs it.
pub fn run() -> Result<()> {
    let cli = Cli::try_parse().unwrap_or_else(|e| e.exit());
    let threads = match &cli.command {
        Command::Bench(args) => args.threads,
        _ => None,
    };
    start_up(threads)?;
    // The command runs on a pool thread: the kernels' parallel loops then start there at once,
    // instead of handing every small operation to the pool and sleeping on a futex until it
    // is done (on tiny models that hand-off cost more than the work).
    let mut result = None;
    rayon::scope(|_| result = Some(dispatch(&cli)));
    result.expect("the scope ran the command")
}

/// Process set-up before any tensor work (what `kernels::set_threads` and the kernels' first
/// call used to do): sets how many threads candle and rayon use (`None`: `RAYON_NUM_THREADS`,
/// else candle's choice, the physical cores), tunes glibc's malloc when the kernels run, builds
/// rayon's global pool and installs the kernels' config from `TKG_KERNELS`, `TKG_WINOGRAD` and
/// `TKG_PROFILE`. Rayon sizes its pool once, candle's element-wise pool reads
/// `CANDLE_NUM_THREADS` once, and candle's matmul reads `RAYON_NUM_THREADS` on every call
/// (when unset it works out the core count from /proc/cpuinfo each time, which on small
/// models costs more than the matmul).
fn start_up(threads: Option<usize>) -> Result<()> {
    anyhow::ensure!(threads != Some(0), "--threads must be at least 1");
    let n = threads.unwrap_or_else(candle_core::utils::get_num_threads);
    // SAFETY: called once from `run`, on the main thread, before any other thread exists that
    // could read or write the environment (the pool is built below).
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        }
    }
    let cfg = crate::kernels::KernelConfig::from_lookup(&|k| std::env::var(k).ok());
    if cfg.enabled {
        keep_freed_memory();
    }
    crate::kernels::build_thread_pool(n)?;
    crate::kernels::configure(cfg)
}

/// Makes glibc's malloc keep freed memory for reuse instead of handing every large block back
/// to the kernel: a forward pass allocates and frees tensors of the same few sizes over and
/// over, and fresh pages from the kernel cost a page fault and a zeroing each (about a tenth
/// of a UNet step at 512x512). The peak stays the same: the memory is reused, not added.
/// `TKG_MALLOC_TUNING=0` leaves malloc alone.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var("TKG_MALLOC_TUNING").map_or(true, |v| v != "0") {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            // Serve large blocks from the heap (reusable) rather than fresh mappings...
            libc::mallopt(libc::M_MMAP_MAX, 0);
            // ...and never shrink the heap top back to the kernel.
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

fn dispatch(cli: &Cli) -> Result<()> {
    let ui = Ui {
        quiet: cli.quiet,
        verbose: cli.verbose,
    };
    match &cli.command {
        Command::Generate(args) => generate::run(args, ui),
        Command::Key(args) => key::run(args, ui),
        Command::Models(args) => models::run(args, ui),
        Command::Bench(args) => bench::run(args, ui),
        Command::Batch(args) => batch::run(args, ui),
        Command::Info(args) => info::run(args, ui),
        Command::Completions(args) => completions::completions(args, ui),
        Command::Man(args) => completions::man(args, ui),
    }
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
    format!("error: {}", causes.join(": "))
}

/// Exit status for a failure.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    // 130 = 128 + SIGINT, as shells report an interrupted command.
    if err.is::<crate::jobs::Interrupted>() {
        130
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
        eprintln!(
            "error: internal error (a bug in tkg, please report it): {}{loc}",
            msg.replace('\n', " ")
        );
    }));
}

#[cfg(test)]
mod tests {
    use super::one_line_error;

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
