//! The run engine: plan a run of jobs ([`Plan`]), then make its images ([`Runner::run`]):
//! model by model, in batches, keyed and written side by side, reported through
//! [`Events`] and stopped by a cancel flag. `tkg generate` and `tkg batch` are both runs.

pub mod device;
pub mod events;
pub mod manifest;
pub mod model;
pub mod place;
pub mod plan;
pub mod record;
pub mod request;
pub mod shard;
pub mod source;
pub mod template;

pub use events::{Event, EventLog, Events, FinishedImage, NoEvents};
pub use plan::{ImageJob, JobFile, JobLine, Plan, Todo};
pub use shard::Shard;

use crate::key::{KeyOptions, KeyOutputFlags};
use crate::models::hub::Notices;
use crate::models::registry::UserFile;
use crate::pipeline::{LoadOptions, Request};
use anyhow::{Result, bail};
use candle_core::DType;
use manifest::Manifest;
use rayon::prelude::*;
use request::LoadedModel;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Keyer settings for every image of a run (each image's own colour is the requested one).
#[derive(Debug, Clone)]
pub struct KeySettings {
    pub options: KeyOptions,
    pub outputs: KeyOutputFlags,
    /// A segmenter whose subject mask is fused into each key (`--segment`).
    pub segment: Option<crate::segment::SharedSegmenter>,
}

/// Options that hold for a whole run (per-image settings are [`crate::settings::Settings`]).
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// auto, cpu, cuda, cuda:N or metal.
    pub device: String,
    /// `None`: f32 on the CPU, f16 on a GPU.
    pub dtype: Option<DType>,
    /// The user's models.toml, merged over the built-in registry.
    pub registry_file: Option<UserFile>,
    /// A single-file checkpoint used for every job instead of its model.
    pub model_file: Option<PathBuf>,
    /// Another VAE: a folder or one safetensors file.
    pub vae: Option<PathBuf>,
    /// LoRAs for every job, `FILE[:WEIGHT]`.
    pub loras: Vec<String>,
    /// Where `<lora:NAME:WEIGHT>` tags find NAME.safetensors.
    pub lora_dir: Option<PathBuf>,
    pub lora_strict: bool,
    /// `None`: write only the image.
    pub key: Option<KeySettings>,
    pub overwrite: bool,
    pub skip_existing: bool,
    pub shard: Shard,
    /// Images denoised together.
    pub batch_size: usize,
    /// Create missing output folders (templates may name new ones).
    pub create_dirs: bool,
    pub manifest: Option<PathBuf>,
    /// Show Hub download progress.
    pub download_progress: bool,
    /// Free host memory in bytes: on the CPU, images whose decode would need more are
    /// refused before any work (`None`: not checked).
    pub memory_available: Option<u64>,
    /// Hears of each Hub download as it starts (none: not told).
    pub download_notices: Option<Notices>,
    /// On the CPU too, denoise a batch in one UNet call (faster on big cores, not
    /// bit-identical to one image at a time).
    pub fuse_cpu_batch: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            device: "auto".into(),
            dtype: None,
            registry_file: None,
            model_file: None,
            vae: None,
            loras: Vec::new(),
            lora_dir: None,
            lora_strict: false,
            key: Some(KeySettings {
                options: KeyOptions::new(crate::color::KeyColor::green()),
                outputs: KeyOutputFlags::default(),
                segment: None,
            }),
            overwrite: false,
            skip_existing: false,
            shard: Shard::ALL,
            batch_size: 1,
            create_dirs: false,
            manifest: None,
            download_progress: false,
            download_notices: None,
            memory_available: None,
            fuse_cpu_batch: false,
        }
    }
}

/// The error a cancelled run ends with.
#[derive(Debug, thiserror::Error)]
#[error(
    "interrupted: {done} image(s) finished, the one(s) in progress abandoned; rerun with --skip-existing to finish"
)]
pub struct Interrupted {
    pub done: usize,
}

/// What a finished run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub written: usize,
    pub skipped: usize,
}

/// Makes the images of a plan.
pub struct Runner<'a> {
    pub config: &'a RunConfig,
    pub events: &'a dyn Events,
    /// Set it (from a signal handler, another thread) to stop after the current step.
    pub cancel: &'a AtomicBool,
}

impl Runner<'_> {
    /// The plan's event.
    pub fn plan_event(&self, plan: &Plan, dry_run: bool) {
        self.events.event(&Event::Plan {
            images: plan.images.len(),
            shard: plan.shard,
            selected: plan.selected.len(),
            skipped: plan.skipped(),
            todo: plan.todo().len(),
            batch_size: self.config.batch_size,
            dry_run,
        });
    }

    /// Makes every image the plan selects and does not skip. A cancel stops the run after
    /// the current step with [`Interrupted`]; the images in progress are abandoned and
    /// nothing of them is written.
    pub fn run(&self, plan: &Plan) -> Result<Summary> {
        let cfg = self.config;
        let started = Instant::now();
        self.plan_event(plan, false);
        for &(i, t) in &plan.selected {
            if t == Todo::Skip {
                self.skip_event(plan, i);
            }
        }
        let mut manifest = cfg.manifest.as_deref().map(Manifest::open).transpose()?;
        if let Some(m) = manifest.as_mut() {
            self.recover_manifest_lines(plan, m)?;
        }
        let mut skipped = plan.skipped();
        let todo = plan.todo();
        if todo.is_empty() {
            self.done(0, skipped, started);
            return Ok(Summary {
                written: 0,
                skipped,
            });
        }
        if cfg.create_dirs {
            for dir in plan.missing_folders() {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
            }
        }
        let (device, warning) = device::pick(&cfg.device)?;
        if let Some(w) = warning {
            self.events.event(&Event::Warning(w));
        }
        let dtype = cfg.dtype.unwrap_or_else(|| device::default_dtype(&device));
        let mut done = 0usize;
        for group in plan.model_groups() {
            let first = &plan.images[group[0].0].settings;
            let notice = |m: String| self.events.event(&Event::Notice(m));
            let model = model::resolve(first, cfg, &notice)?;
            let prompts: Vec<&str> = group
                .iter()
                .map(|(i, _)| plan.images[*i].settings.prompt.as_str())
                .collect();
            let opts = LoadOptions {
                device: device.clone(),
                dtype,
                clip_skip: first.clip_skip,
                fp16_files: true,
            };
            let pipe = model.load(cfg, &first.lora, &prompts, &opts)?;
            for r in &pipe.lora_reports {
                self.events.event(&Event::Notice(r.summary()));
                if !r.unmatched.is_empty() {
                    self.events.event(&Event::Warning(format!(
                        "LoRA {}: unmatched: {}",
                        r.name,
                        r.unmatched.join(", ")
                    )));
                }
            }
            let loaded = LoadedModel {
                hash: crate::models::hash::file_sha256_short(&pipe.unet_weights).ok(),
                name: model.name.clone(),
                defaults: model.defaults,
                pipe,
            };
            self.events.event(&Event::Loaded {
                model: &loaded.name,
                source: model.folder.describe(),
                seconds: loaded.pipe.load_time.as_secs_f64(),
            });
            // Resolve every image's request, then cut runs of compatible ones into batches.
            let mut sources = source::SourceCache::default();
            let reqs: Vec<(usize, Todo, Request)> = group
                .iter()
                .map(|&(i, t)| Ok((i, t, loaded.request(&plan.images[i], &mut sources)?)))
                .collect::<Result<_>>()?;
            if let Some(free) = cfg.memory_available.filter(|_| device.is_cpu()) {
                // CPU batches decode their images side by side.
                let side_by_side = cfg.batch_size.min(reqs.len()).max(1);
                for (_, _, r) in &reqs {
                    loaded.pipe.check_memory(r.size, side_by_side, free)?;
                }
            }
            let batches = plan::cut_batches(&reqs, cfg.batch_size, |(i0, _, r0), (i1, _, r1)| {
                r0.shape_key() == r1.shape_key()
                    && plan.images[*i0].settings.rng == plan.images[*i1].settings.rng
            });
            for batch in batches {
                // With --skip-existing, images another worker finished meanwhile are done.
                let batch: Vec<(usize, Todo, Request)> = batch
                    .iter()
                    .filter(|(i, _, _)| {
                        let elsewhere = cfg.skip_existing && plan.all_present(*i);
                        if elsewhere {
                            self.skip_event(plan, *i);
                            skipped += 1;
                        }
                        !elsewhere
                    })
                    .cloned()
                    .collect();
                if batch.is_empty() {
                    continue;
                }
                let (written, late) =
                    self.run_batch(plan, &loaded, &batch, done, todo.len(), &mut manifest)?;
                done += written;
                skipped += late;
                if self.cancel.load(Ordering::SeqCst) {
                    self.events.event(&Event::Interrupted {
                        written: done,
                        abandoned: &[],
                    });
                    return Err(Interrupted { done }.into());
                }
            }
        }
        self.done(done, skipped, started);
        Ok(Summary {
            written: done,
            skipped,
        })
    }

    /// Records the skipped images the manifest lacks, from their PNGs.
    fn recover_manifest_lines(&self, plan: &Plan, m: &mut Manifest) -> Result<()> {
        let skipped: Vec<usize> = plan
            .selected
            .iter()
            .filter(|(_, t)| *t == Todo::Skip)
            .map(|(i, _)| *i)
            .collect();
        if skipped.is_empty() {
            return Ok(());
        }
        let recorded = m.recorded_paths()?;
        for i in skipped {
            let img = &plan.images[i];
            if recorded.contains(&img.out.display().to_string()) {
                continue;
            }
            match record::recovered_record(self.config, img, &plan.targets[i]) {
                Ok(r) => m.append(&r)?,
                Err(e) => self.events.event(&Event::Warning(format!(
                    "image {i}: not in the manifest, and its record cannot be rebuilt: {e:#}"
                ))),
            }
        }
        Ok(())
    }

    fn skip_event(&self, plan: &Plan, i: usize) {
        self.events.event(&Event::Skip {
            index: i,
            seed: plan.images[i].seed,
            path: &plan.images[i].out,
        });
    }

    fn done(&self, written: usize, skipped: usize, started: Instant) {
        self.events.event(&Event::Done {
            written,
            skipped,
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    /// Denoises one batch, then keys and writes its images side by side; reports them in
    /// job order, every finished image before the first failure. Returns how many were
    /// written, and how many another worker wrote first (with --skip-existing).
    fn run_batch(
        &self,
        plan: &Plan,
        loaded: &LoadedModel,
        batch: &[(usize, Todo, Request)],
        done: usize,
        todo: usize,
        manifest: &mut Option<Manifest>,
    ) -> Result<(usize, usize)> {
        let cfg = self.config;
        let indices: Vec<usize> = batch.iter().map(|(i, _, _)| *i).collect();
        let first = &batch[0].2;
        self.events.event(&Event::BatchStart {
            indices: &indices,
            steps: loaded
                .pipe
                .denoise_calls(&first.sampling, first.source.as_ref().map(|s| s.strength))?,
            done,
            todo,
        });
        let reqs: Vec<Request> = batch.iter().map(|(_, _, r)| r.clone()).collect();
        let rng = plan.images[indices[0]].settings.rng;
        let t0 = Instant::now();
        let result =
            loaded
                .pipe
                .generate_batch(&reqs, rng, cfg.fuse_cpu_batch, &mut |step, steps| {
                    self.events.event(&Event::Step {
                        indices: &indices,
                        step,
                        steps,
                    });
                    if self.cancel.load(Ordering::SeqCst) {
                        bail!(Interrupted { done });
                    }
                    Ok(())
                });
        self.events.event(&Event::BatchEnd);
        let generated = match result {
            Ok(g) => g,
            Err(e) => {
                if e.is::<Interrupted>() {
                    self.events.event(&Event::Interrupted {
                        written: done,
                        abandoned: &indices,
                    });
                }
                return Err(e);
            }
        };
        let per_image = t0.elapsed() / indices.len() as u32;
        let written: Vec<Result<record::Written>> = batch
            .par_iter()
            .zip(&generated)
            .map(|((i, t, req), g)| {
                let img = &plan.images[*i];
                let keyed = cfg
                    .key
                    .as_ref()
                    .map(|k| record::key_generated(k, img, g))
                    .transpose()?;
                record::write_image(cfg, loaded, img, req, *t, g, keyed, per_image)
            })
            .collect();
        let mut failed = None;
        let (mut n, mut late) = (0, 0);
        for (w, &i) in written.into_iter().zip(&indices) {
            let mut w = match w {
                Ok(w) => w,
                Err(e) if cfg.skip_existing && e.is::<crate::output::AlreadyExists>() => {
                    self.skip_event(plan, i);
                    late += 1;
                    continue;
                }
                Err(e) => {
                    failed.get_or_insert(e);
                    continue;
                }
            };
            n += 1;
            if let Some(m) = manifest.as_mut() {
                m.append(&w.record)?;
            }
            w.finished.done = done + n;
            w.finished.todo = todo;
            self.events.event(&Event::Image(&w.finished));
        }
        match failed {
            Some(e) => Err(e),
            None => Ok((n, late)),
        }
    }
}
