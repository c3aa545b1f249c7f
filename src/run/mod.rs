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
pub mod select;
pub mod shard;
pub mod source;
pub mod template;

pub use events::{Event, EventLog, Events, FinishedImage, NoEvents};
pub use plan::{ImageJob, JobFile, JobLine, Plan, Todo};
pub use shard::Shard;

use crate::key::{KeyOptions, KeyOutputFlags};
use crate::models::hub::Notices;
use crate::models::registry::UserFile;
use crate::pipeline::{LoadOptions, Request, VaeTiling, WeightStorage};
use anyhow::{Context, Result, bail};
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
    /// How weights are kept when computing in f32.
    pub weights: WeightStorage,
    /// Whether the VAE decodes and encodes in tiles.
    pub vae_tiling: VaeTiling,
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
            weights: WeightStorage::Auto,
            vae_tiling: VaeTiling::Auto,
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

/// A try's files (`--keep all`), and those of them written now.
type TryFiles = (Vec<String>, Vec<PathBuf>);

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
                weights: cfg.weights,
                vae_tiling: cfg.vae_tiling,
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
    /// job order, every finished image before the first failure. Images that choose (a
    /// colour by preview, the best of several seeds) make their previews and tries first.
    /// Returns how many were written, and how many another worker wrote first (with
    /// --skip-existing).
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
        let mut jobs: Vec<ImageJob> = indices.iter().map(|&i| plan.images[i].clone()).collect();
        let mut reqs: Vec<Request> = batch.iter().map(|(_, _, r)| r.clone()).collect();
        let rng = plan.images[indices[0]].settings.rng;
        let t0 = Instant::now();
        let previews = self.pick_colors(loaded, &indices, &mut jobs, &mut reqs, done, todo)?;
        let generated = self.generate(loaded, &indices, &reqs, rng, done, todo)?;
        let selecting = jobs.iter().any(select::selects);
        let mut written: Vec<Result<record::Written>> = if !selecting {
            let per_image = t0.elapsed() / indices.len() as u32;
            batch
                .par_iter()
                .zip(&generated)
                .map(|((i, t, req), g)| {
                    let img = &plan.images[*i];
                    let keyed = cfg
                        .key
                        .as_ref()
                        .map(|k| record::key_generated(k, img, g))
                        .transpose()?;
                    record::write_image(cfg, loaded, img, req, *t, g, keyed.as_ref(), per_image)
                })
                .collect()
        } else {
            let todos: Vec<Todo> = batch.iter().map(|(_, t, _)| *t).collect();
            self.select_tries(
                loaded, &indices, &todos, jobs, reqs, generated, rng, t0, done, todo,
            )?
        };
        for (w, p) in written.iter_mut().zip(previews) {
            if let (Ok(w), Some(p)) = (w, p) {
                w.record["color_previews"] = serde_json::json!(p);
            }
        }
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

    /// Denoises `reqs` as one batch, with its events and the cancel flag.
    fn generate(
        &self,
        loaded: &LoadedModel,
        indices: &[usize],
        reqs: &[Request],
        rng: crate::rng::RngKind,
        done: usize,
        todo: usize,
    ) -> Result<Vec<crate::pipeline::Generated>> {
        let first = &reqs[0];
        self.events.event(&Event::BatchStart {
            indices,
            steps: loaded
                .pipe
                .denoise_calls(&first.sampling, first.source.as_ref().map(|s| s.strength))?,
            done,
            todo,
        });
        let result = loaded.pipe.generate_batch(
            reqs,
            rng,
            self.config.fuse_cpu_batch,
            &mut |step, steps| {
                self.events.event(&Event::Step {
                    indices,
                    step,
                    steps,
                });
                if self.cancel.load(Ordering::SeqCst) {
                    bail!(Interrupted { done });
                }
                Ok(())
            },
        );
        self.events.event(&Event::BatchEnd);
        result.inspect_err(|e| {
            if e.is::<Interrupted>() {
                self.events.event(&Event::Interrupted {
                    written: done,
                    abandoned: indices,
                });
            }
        })
    }

    /// `--color auto`: previews every candidate colour of the images that ask (one batch),
    /// keys each preview, and gives each image the colour that scored best. Returns each
    /// image's preview scores.
    fn pick_colors(
        &self,
        loaded: &LoadedModel,
        indices: &[usize],
        jobs: &mut [ImageJob],
        reqs: &mut [Request],
        done: usize,
        todo: usize,
    ) -> Result<Vec<Option<Vec<select::ColorPreview>>>> {
        let mut out = vec![None; jobs.len()];
        let Some(key) = &self.config.key else {
            return Ok(out);
        };
        // A preview is too coarse for a segmenter: the keyer alone compares colours.
        let key = KeySettings {
            segment: None,
            ..key.clone()
        };
        let mut who = Vec::new();
        let mut preview_jobs = Vec::new();
        let mut preview_reqs = Vec::new();
        let mut sources = source::SourceCache::default();
        for (k, job) in jobs.iter().enumerate() {
            for c in &job.settings.auto_colors {
                let mut j = job.clone();
                j.settings.color = c.clone();
                preview_reqs.push(select::preview_request(&loaded.request(&j, &mut sources)?));
                preview_jobs.push(j);
                who.push(k);
            }
        }
        if who.is_empty() {
            return Ok(out);
        }
        let shown: Vec<usize> = who.iter().map(|&k| indices[k]).collect();
        let rng = jobs[0].settings.rng;
        let made = self.generate(loaded, &shown, &preview_reqs, rng, done, todo)?;
        let scores: Vec<f32> = preview_jobs
            .par_iter()
            .zip(&made)
            .map(|(j, g)| Ok(record::key_generated(&key, j, g)?.report.score))
            .collect::<Result<_>>()?;
        for k in 0..jobs.len() {
            let mine: Vec<usize> = (0..who.len()).filter(|&p| who[p] == k).collect();
            if mine.is_empty() {
                continue;
            }
            let s: Vec<f32> = mine.iter().map(|&p| scores[p]).collect();
            let pick = &preview_jobs[mine[select::best_index(&s)]];
            let list: Vec<select::ColorPreview> = mine
                .iter()
                .map(|&p| select::ColorPreview {
                    color: preview_jobs[p].settings.color.to_string(),
                    score: scores[p],
                })
                .collect();
            let text: Vec<String> = list
                .iter()
                .map(|c| format!("{} {:.1}", c.color, c.score))
                .collect();
            self.events.event(&Event::Notice(format!(
                "image {}: colour preview {}: {}",
                indices[k],
                text.join(", "),
                pick.settings.color
            )));
            jobs[k].settings.color = pick.settings.color.clone();
            reqs[k] = loaded.request(&jobs[k], &mut sources)?;
            out[k] = Some(list);
        }
        Ok(out)
    }

    /// Keys the first tries, makes the further tries the images ask for (as batches of the
    /// images still trying), keeps each image's best, and writes it (with every try under
    /// `--keep all`). Holds at most the best and the newest try of each image.
    #[allow(clippy::too_many_arguments)]
    fn select_tries(
        &self,
        loaded: &LoadedModel,
        indices: &[usize],
        todos: &[Todo],
        jobs: Vec<ImageJob>,
        reqs: Vec<Request>,
        generated: Vec<crate::pipeline::Generated>,
        rng: crate::rng::RngKind,
        t0: Instant,
        done: usize,
        todo: usize,
    ) -> Result<Vec<Result<record::Written>>> {
        let cfg = self.config;
        let key = cfg
            .key
            .as_ref()
            .context("internal error: choosing among tries without keying")?;
        let n = jobs.len();
        let mut tries: Vec<Vec<select::TryRecord>> = vec![Vec::new(); n];
        let mut best: Vec<Option<select::Candidate>> = (0..n).map(|_| None).collect();
        let mut round: Vec<(usize, ImageJob, Request, crate::pipeline::Generated)> = jobs
            .iter()
            .cloned()
            .zip(reqs.iter().cloned())
            .zip(generated)
            .enumerate()
            .map(|(k, ((j, r), g))| (k, j, r, g))
            .collect();
        let mut made = vec![0usize; n];
        let mut written: Vec<Vec<std::path::PathBuf>> = vec![Vec::new(); n];
        // An image whose try cannot be keyed or written stops trying and fails alone, as on
        // the plain path: the other images of the batch are still chosen and written.
        let mut failed: Vec<Option<anyhow::Error>> = (0..n).map(|_| None).collect();
        loop {
            // Key this round's tries and write them under --keep all.
            let keyed: Vec<(usize, Result<(select::Candidate, TryFiles)>)> = round
                .into_par_iter()
                .map(|(k, job, req, generated)| {
                    let tried = || {
                        let key_result = record::key_generated(key, &job, &generated)?;
                        let c = select::Candidate {
                            try_index: made[k],
                            job,
                            req,
                            generated,
                            key: key_result,
                        };
                        let files = if c.job.settings.keep == crate::settings::Keep::All {
                            self.write_try(loaded, &c, todos[k])?
                        } else {
                            (Vec::new(), Vec::new())
                        };
                        Ok((c, files))
                    };
                    (k, tried())
                })
                .collect();
            for (k, r) in keyed {
                let (c, (paths, files)) = match r {
                    Ok(r) => r,
                    Err(e) => {
                        failed[k] = Some(e);
                        continue;
                    }
                };
                made[k] += 1;
                written[k].extend(files);
                self.events.event(&Event::Tried {
                    index: c.job.index,
                    try_index: c.try_index,
                    seed: c.job.seed,
                    score: c.score(),
                });
                tries[k].push(c.record(paths));
                if best[k].as_ref().is_none_or(|b| c.score() > b.score()) {
                    best[k] = Some(c);
                }
            }
            // The next round: the images that want another seed.
            let mut next = Vec::new();
            for k in 0..n {
                let b = best[k].as_ref().map_or(0.0, |b| b.score());
                if failed[k].is_some() || !select::wants_another(&jobs[k], made[k], b) {
                    continue;
                }
                let mut job = jobs[k].clone();
                job.seed = job
                    .try_seed(made[k])
                    .context("internal error: a try past the checked seeds")?;
                let mut req = reqs[k].clone();
                req.seed = job.seed;
                next.push((k, job, req));
            }
            if next.is_empty() {
                break;
            }
            let shown: Vec<usize> = next.iter().map(|(k, ..)| indices[*k]).collect();
            let rs: Vec<Request> = next.iter().map(|(_, _, r)| r.clone()).collect();
            let gs = self.generate(loaded, &shown, &rs, rng, done, todo)?;
            round = next
                .into_iter()
                .zip(gs)
                .map(|((k, j, r), g)| (k, j, r, g))
                .collect();
        }
        let per_image = t0.elapsed() / n as u32;
        Ok(best
            .into_par_iter()
            .zip(tries)
            .zip(written)
            .zip(todos)
            .zip(failed)
            .map(|((((b, tries), tries_written), &t), failed)| {
                if let Some(e) = failed {
                    return Err(e);
                }
                let b = b.context("internal error: an image without a try")?;
                let chosen = b.try_index;
                let score = b.score();
                let img = &b.job;
                let mut w = record::write_image(
                    cfg,
                    loaded,
                    img,
                    &b.req,
                    t,
                    &b.generated,
                    Some(&b.key),
                    per_image,
                )?;
                let s = &img.settings;
                let passed = s.min_keyability.map(|m| score as f64 >= m);
                if passed == Some(false) {
                    w.finished.warnings.push(format!(
                        "image {}: the best keyability after {} tries is {score:.1}, below \
                         --min-keyability {}; kept the best",
                        img.index,
                        tries.len(),
                        s.min_keyability.unwrap_or_default()
                    ));
                }
                for tr in &tries {
                    w.finished.paths.extend(tr.paths.iter().cloned());
                }
                w.finished.written.extend(tries_written);
                w.record["tries"] = serde_json::json!(tries);
                w.record["chosen_try"] = serde_json::json!(chosen);
                w.record["min_keyability_passed"] = serde_json::json!(passed);
                Ok(w)
            })
            .collect())
    }

    /// Writes one try as `X.tryN.png` with its keyed outputs (`--keep all`); returns its
    /// files, and those written now.
    fn write_try(
        &self,
        loaded: &LoadedModel,
        c: &select::Candidate,
        todo: Todo,
    ) -> Result<TryFiles> {
        let mut job = c.job.clone();
        job.out = job.try_path(c.try_index);
        job.save_latents = None;
        let w = record::write_image(
            self.config,
            loaded,
            &job,
            &c.req,
            todo,
            &c.generated,
            Some(&c.key),
            std::time::Duration::ZERO,
        )?;
        Ok((w.finished.paths, w.finished.written))
    }
}
