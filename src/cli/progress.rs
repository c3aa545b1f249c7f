//! Progress on stderr, from the run's events: an indicatif bar, plain lines, NDJSON events or
//! nothing; finished files on stdout.

use super::Ui;
use super::args::ProgressMode;
use super::stdio::{errln, outln};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tkg::run::{Event, Events};
use tkg::text::{json_terminal_safe, terminal_safe};

pub struct Reporter {
    ui: Ui,
    mode: ProgressMode,
    bar: Mutex<Option<indicatif::ProgressBar>>,
    /// When the current batch started.
    start: Mutex<Instant>,
    /// The batch's last reported step (the pipeline repeats a step while images catch up).
    last_step: AtomicUsize,
}

impl Reporter {
    pub fn new(ui: Ui, mode: ProgressMode) -> Self {
        let mode = match mode {
            _ if ui.quiet && mode != ProgressMode::Json => ProgressMode::None,
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Plain,
            m => m,
        };
        Self {
            ui,
            mode,
            bar: Mutex::new(None),
            start: Mutex::new(Instant::now()),
            last_step: 0.into(),
        }
    }

    /// A human status line (plain and bar modes).
    fn line(&self, msg: String) {
        let msg = terminal_safe(&msg);
        match self.mode {
            ProgressMode::Plain => errln!("{msg}"),
            ProgressMode::Bar => match &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
                Some(b) => b.println(msg),
                None => errln!("{msg}"),
            },
            _ => {}
        }
    }

    fn start_batch(&self, indices: &[usize], steps: usize, done: usize, total: usize) {
        *self.start.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.last_step.store(0, Ordering::Relaxed);
        if self.mode == ProgressMode::Bar {
            let b = indicatif::ProgressBar::new(steps as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}]",
                )
                .expect("valid template"),
            );
            if total > 1 {
                b.set_prefix(format!("[{}/{total}]", done + indices.len()));
            }
            *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
        }
    }

    fn step(&self, event: &Event, i: usize, n: usize) {
        if self.last_step.fetch_max(i, Ordering::Relaxed) >= i {
            return;
        }
        let elapsed = self
            .start
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        match self.mode {
            ProgressMode::Json => {
                if let Some(mut v) = event.to_json() {
                    v["elapsed_s"] = elapsed.as_secs_f64().into();
                    errln!("{}", json_terminal_safe(&v.to_string()));
                }
            }
            ProgressMode::Bar => {
                if let Some(b) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
                    b.set_position(i as u64);
                }
            }
            ProgressMode::Plain if i == n || i.is_multiple_of((n / 10).max(1)) => {
                let per = tkg::bench::duration(elapsed.as_secs_f64() / i as f64);
                errln!("step {i}/{n} ({per}/it)");
            }
            _ => {}
        }
    }
}

impl Events for Reporter {
    fn event(&self, event: &Event) {
        if self.mode == ProgressMode::Json
            && !matches!(event, Event::Step { .. })
            && let Some(v) = event.to_json()
        {
            errln!("{}", json_terminal_safe(&v.to_string()));
        }
        match event {
            Event::Plan {
                images,
                shard,
                skipped,
                todo,
                dry_run,
                ..
            } => {
                if !dry_run && (*images > 1 || *skipped > 0) {
                    self.line(format!(
                        "{images} image(s); shard {shard}: {todo} to make, {skipped} already done"
                    ));
                }
            }
            Event::Notice(m) => self.ui.info(m),
            Event::Warning(w) => self.ui.warn(w),
            Event::Loaded {
                model,
                source,
                seconds,
            } => self
                .ui
                .detail(format!("loaded {model} ({source}) in {seconds:.2}s")),
            Event::BatchStart {
                indices,
                steps,
                done,
                todo,
            } => self.start_batch(indices, *steps, *done, *todo),
            Event::Step { step, steps, .. } => self.step(event, *step, *steps),
            Event::BatchEnd => {
                if let Some(b) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    b.finish_and_clear();
                }
            }
            Event::Tried {
                index,
                try_index,
                seed,
                score,
            } => self.ui.info(format!(
                "image {index}: try {try_index} (seed {seed}) keyability {score:.1}"
            )),
            Event::Image(f) => {
                for w in &f.warnings {
                    self.ui.warn(w);
                }
                for p in &f.written {
                    outln!("{}", p.display());
                }
                self.ui.detail(&f.detail);
                if f.todo > 1 {
                    self.line(format!(
                        "[{}/{}] {} (seed {})",
                        f.done,
                        f.todo,
                        f.out.display(),
                        f.seed
                    ));
                }
            }
            Event::Skip { .. } | Event::Interrupted { .. } | Event::Done { .. } => {}
        }
    }
}
