//! What the process owns: threads, malloc tuning and signals.

use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Set by the first SIGINT/SIGTERM: the run stops after the current step.
pub static CANCEL: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// Sizes the thread pools (`threads`: `--threads`, else `RAYON_NUM_THREADS`, else the
/// physical cores) and configures the kernels. Call first, before any other thread exists.
pub fn start(threads: Option<usize>) -> Result<()> {
    tkg::kernels::set_threads(threads)?;
    Ok(())
}

/// Installs the SIGINT/SIGTERM handler (once): the first signal sets [`CANCEL`], abandoning
/// the images in progress (nothing of them is written); the second exits at once with 130.
pub fn install_interrupt_handler() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            let n = SIGNALS.fetch_add(1, Ordering::SeqCst) + 1;
            CANCEL.store(true, Ordering::SeqCst);
            if n >= 2 {
                eprintln!("error: interrupted again; exiting now");
                std::process::exit(130);
            }
            eprintln!(
                "interrupt: stopping after the current step (press Ctrl-C again to exit now)"
            );
        });
    });
}
