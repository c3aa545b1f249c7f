//! What the process owns: threads, malloc tuning and signals.

use super::stdio::errln;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Set by the first SIGINT/SIGTERM: the run stops after the current step.
pub static CANCEL: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// Process set-up before any tensor work (what `kernels::set_threads` and the kernels' first
/// call used to do): sets how many threads candle and rayon use (`None`: `RAYON_NUM_THREADS`,
/// else candle's choice, the physical cores), tunes glibc's malloc when the kernels run, builds
/// rayon's global pool and installs the kernels' config from `TKG_KERNELS`, `TKG_WINOGRAD`,
/// `TKG_WINOGRAD_F4` and `TKG_PROFILE`. Rayon sizes its pool once, candle's element-wise pool reads
/// `CANDLE_NUM_THREADS` once, and candle's matmul reads `RAYON_NUM_THREADS` on every call
/// (when unset it works out the core count from /proc/cpuinfo each time, which on small
/// models costs more than the matmul).
pub fn start(threads: Option<usize>) -> Result<()> {
    anyhow::ensure!(threads != Some(0), "--threads must be at least 1");
    let n = threads.unwrap_or_else(candle_core::utils::get_num_threads);
    // SAFETY: called once from `cli::run`, on the main thread, before any other thread exists that
    // could read or write the environment (the pool is built below).
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        }
    }
    let cfg = tkg::kernels::KernelConfig::from_lookup(&|k| std::env::var(k).ok());
    if cfg.enabled {
        keep_freed_memory();
    }
    tkg::kernels::build_thread_pool(n)?;
    tkg::kernels::configure(cfg)
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

/// Installs the SIGINT/SIGTERM handler (once): the first signal sets [`CANCEL`], abandoning
/// the images in progress (nothing of them is written); the second exits at once with 130.
pub fn install_interrupt_handler() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            let n = SIGNALS.fetch_add(1, Ordering::SeqCst) + 1;
            CANCEL.store(true, Ordering::SeqCst);
            if n >= 2 {
                errln!("error: interrupted again; exiting now");
                std::process::exit(130);
            }
            errln!("interrupt: stopping after the current step (press Ctrl-C again to exit now)");
        });
    });
}
