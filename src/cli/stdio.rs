//! The one writer of stdout and stderr. A closed pipe (`tkg … | head -1`) or a full disk
//! stops the printing, never the work: the images are still made and the exit status still
//! says how the work went.

use std::fmt::Display;
use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// One line on stdout. After the first failed write nothing more is printed there; a closed
/// pipe is expected and passes quietly, anything else is reported once on stderr.
pub fn out(line: impl Display) {
    if STDOUT_GONE.load(Ordering::Relaxed) {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = writeln!(o, "{line}").and_then(|()| o.flush()) {
        STDOUT_GONE.store(true, Ordering::Relaxed);
        if e.kind() != ErrorKind::BrokenPipe {
            err(format!(
                "warning: cannot write to standard output ({e}); nothing more is printed there"
            ));
        }
    }
}

/// One line on stderr; if stderr itself is gone there is nobody left to tell.
pub fn err(line: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `format!` into [`out`].
macro_rules! outln {
    () => { $crate::cli::stdio::out("") };
    ($($arg:tt)*) => { $crate::cli::stdio::out(format_args!($($arg)*)) };
}

/// `format!` into [`err`].
macro_rules! errln {
    ($($arg:tt)*) => { $crate::cli::stdio::err(format_args!($($arg)*)) };
}

pub(crate) use {errln, outln};
