//! What a run tells its caller as it goes. The library prints nothing: a caller (the CLI's
//! progress reporter, a test, another program) implements [`Events`].

use super::shard::Shard;
use std::path::{Path, PathBuf};

/// One finished image, reported in job order.
#[derive(Debug, Clone)]
pub struct FinishedImage {
    pub index: usize,
    pub seed: u64,
    /// The main image file.
    pub out: PathBuf,
    /// Every file of the image.
    pub paths: Vec<String>,
    /// The files this run wrote (an image being completed keeps the ones it had).
    pub written: Vec<PathBuf>,
    pub warnings: Vec<String>,
    /// Seconds from the start of its batch to its files.
    pub seconds: f64,
    /// Per-stage timings, one line.
    pub detail: String,
    /// Images finished so far in this run, and to make in all.
    pub done: usize,
    pub todo: usize,
}

/// Something that happened in a run.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// The plan, before any work.
    Plan {
        images: usize,
        shard: Shard,
        selected: usize,
        skipped: usize,
        todo: usize,
        batch_size: usize,
        dry_run: bool,
    },
    /// An image whose files all exist.
    Skip {
        index: usize,
        seed: u64,
        path: &'a Path,
    },
    /// A status line: slow one-time work, what a LoRA matched.
    Notice(String),
    Warning(String),
    /// A model was loaded.
    Loaded {
        model: &'a str,
        source: String,
        seconds: f64,
    },
    /// A batch of images starts denoising.
    BatchStart {
        indices: &'a [usize],
        steps: usize,
        done: usize,
        todo: usize,
    },
    /// The batch's mean step (a step may be repeated while images catch up).
    Step {
        indices: &'a [usize],
        step: usize,
        steps: usize,
    },
    BatchEnd,
    Image(&'a FinishedImage),
    /// The run was cancelled; `abandoned` are the images in progress.
    Interrupted {
        written: usize,
        abandoned: &'a [usize],
    },
    Done {
        written: usize,
        skipped: usize,
        seconds: f64,
    },
}

/// Hears a run's events. Steps arrive from the threads that denoise, so it is `Sync`.
pub trait Events: Sync {
    fn event(&self, event: &Event);
}

/// Hears nothing.
pub struct NoEvents;

impl Events for NoEvents {
    fn event(&self, _: &Event) {}
}

/// Collects events as text, for tests.
#[derive(Default)]
pub struct EventLog(pub std::sync::Mutex<Vec<String>>);

impl Events for EventLog {
    fn event(&self, event: &Event) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(format!("{event:?}"));
    }
}
