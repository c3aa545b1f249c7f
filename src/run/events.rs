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
    /// One try of an image that chooses among seeds was keyed.
    Tried {
        index: usize,
        try_index: usize,
        seed: u64,
        score: f32,
    },
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

impl Event<'_> {
    /// The event as one NDJSON object (`tkg --progress json`), keyed by `"event"`. A step
    /// carries no time: the listener adds `elapsed_s`. Notices and warnings are `None`: they
    /// are text for people.
    pub fn to_json(&self) -> Option<serde_json::Value> {
        use serde_json::json;
        Some(match self {
            Event::Plan {
                images,
                shard,
                selected,
                skipped,
                todo,
                batch_size,
                dry_run,
            } => json!({"event": "plan", "images": images, "shard": shard.to_string(),
                "selected": selected, "skipped": skipped, "todo": todo,
                "batch_size": batch_size, "dry_run": dry_run}),
            Event::Skip { index, seed, path } => json!({"event": "skip", "index": index,
                "seed": seed, "path": path.display().to_string()}),
            Event::Notice(_) | Event::Warning(_) | Event::BatchEnd => return None,
            Event::Loaded { model, seconds, .. } => {
                json!({"event": "load", "model": model, "seconds": seconds})
            }
            Event::BatchStart {
                indices,
                steps,
                done,
                todo,
            } => json!({"event": "batch", "indices": indices, "steps": steps,
                "done": done, "todo": todo}),
            Event::Step {
                indices,
                step,
                steps,
            } => json!({"event": "step", "indices": indices, "step": step, "steps": steps}),
            Event::Tried {
                index,
                try_index,
                seed,
                score,
            } => json!({"event": "try", "index": index, "try": try_index, "seed": seed,
                "keyability": score}),
            Event::Image(f) => json!({"event": "image", "index": f.index, "seed": f.seed,
                "paths": f.paths, "seconds": f.seconds, "done": f.done, "todo": f.todo}),
            Event::Interrupted { written, abandoned } => json!({"event": "interrupted",
                "written": written, "abandoned": abandoned}),
            Event::Done {
                written,
                skipped,
                seconds,
            } => json!({"event": "done", "written": written, "skipped": skipped,
                "seconds": seconds}),
        })
    }
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
