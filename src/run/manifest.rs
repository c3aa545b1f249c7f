//! `--manifest FILE.jsonl`: one JSON record per finished image.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// `--manifest FILE.jsonl`: one JSON object a line, appended and flushed per image. Each line
/// is one `write` on a file opened for appending, so shards may share a manifest on a local
/// file system.
pub struct Manifest {
    file: File,
    path: PathBuf,
}

impl Manifest {
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the manifest {}", path.display()))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn append(&mut self, record: &serde_json::Value) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("writing the manifest {}", self.path.display()))
    }
}
