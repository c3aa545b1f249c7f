//! `--manifest FILE.jsonl`: one JSON record per finished image.

use anyhow::{Context, Result};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
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

    /// The `path` of every record already in the manifest (lines that do not parse, such as
    /// one cut short by a full disk, are passed over).
    pub fn recorded_paths(&self) -> Result<HashSet<String>> {
        let f = File::open(&self.path)
            .with_context(|| format!("cannot read the manifest {}", self.path.display()))?;
        let mut out = HashSet::new();
        for line in BufReader::new(f).lines() {
            let line =
                line.with_context(|| format!("reading the manifest {}", self.path.display()))?;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(p) = v.get("path").and_then(|p| p.as_str())
            {
                out.insert(p.to_string());
            }
        }
        Ok(out)
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
