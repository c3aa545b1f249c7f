//! Running the real binary in tests: scratch folders, a private HF cache with the built-in
//! tiny model, and the shape of a proper failure.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// A fresh scratch folder per call (names may repeat across the binary's modules).
pub fn scratch(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("tkg-cli-{name}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

/// One HF cache per test binary, holding the materialised tiny SD1.5 model.
pub fn hf_home() -> &'static Path {
    static HOME: OnceLock<PathBuf> = OnceLock::new();
    HOME.get_or_init(|| {
        let d = scratch("hfhome");
        let out = Command::new(env!("CARGO_BIN_EXE_tkg"))
            .args(["models", "materialize", "tiny-sd15"])
            .arg(d.join("hub/tkg--builtin--tiny-sd15"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        d
    })
}

/// `tkg ARGS` against [`hf_home`], offline.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tkg"));
    c.args(args)
        .env("HF_HOME", hf_home())
        .env("HF_HUB_OFFLINE", "1");
    c
}

pub fn tkg(args: &[&str]) -> Output {
    command(args).output().unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A success: exit 0, or the test fails showing stderr.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "tkg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A proper failure: non-zero exit, exactly one line on stderr, starting `error:` and
/// mentioning `needle`, no panic.
pub fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].starts_with("error:"), "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "'{needle}' not in: {}",
        lines[0]
    );
}
