//! `tkg batch`: many images from a JSONL job file or a prompt file, and the runner that
//! `tkg generate` shares: validation before work, model reuse, batching, shards, resume,
//! interrupts, manifest and progress events.

use super::Ui;
use super::generate::{
    JobOptions, ModelArgs, ProgressMode, default_size, fmt_num, pick_device, pick_dtype,
    save_latents,
};
use crate::color::{SD15_LATENT_RGB, SDXL_LATENT_RGB};
use crate::jobs::{self, ImageJob, Interrupted, Manifest, Method, Settings, Shard, SourcedLine};
use crate::key;
use crate::metadata::Parameters;
use crate::models::hub;
use crate::models::registry::{Family, Registry};
use crate::output::{self, Pixels, PngImage};
use crate::pipeline::{Generated, InitNoise, LoadOptions, MicroCond, Pipeline, Request};
use crate::tkg::TkgSettings;
use anyhow::{Context, Result, bail};
use clap::Args;
use rayon::prelude::*;
use serde_json::json;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct BatchArgs {
    /// A JSONL job file: one object a line with per-job overrides (prompt, negative_prompt,
    /// color, seed, num_images, steps, guidance, width, height, method, shift, mask_sigma,
    /// subject_center, clip_skip, model, model_dir, lora, out, rng, ...).
    #[arg(value_name = "JOBS.jsonl", required_unless_present = "prompt_file")]
    pub jobs: Option<PathBuf>,
    /// A text file with one prompt a line instead of a JSONL file.
    #[arg(long, value_name = "FILE.txt", conflicts_with = "jobs")]
    pub prompt_file: Option<PathBuf>,
    /// The prompt of job lines that give none.
    #[arg(long, short)]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub opts: JobOptions,
}

pub fn run(args: &BatchArgs, ui: Ui) -> Result<()> {
    let (file, lines, bad) = match (&args.jobs, &args.prompt_file) {
        (Some(p), _) => {
            let label = p.display().to_string();
            let text = read_text(p)?;
            let (lines, bad) = jobs::parse_jsonl_lenient(&text);
            if lines.is_empty() && bad.is_empty() {
                bail!("{label} has no jobs");
            }
            (label, lines, bad)
        }
        (None, Some(p)) => {
            let label = p.display().to_string();
            let text = read_text(p)?;
            let lines = jobs::parse_prompt_file(&label, &text)?;
            (label, lines, Vec::new())
        }
        (None, None) => bail!("give a JOBS.jsonl file or --prompt-file"),
    };
    let prompt = args.prompt.clone().unwrap_or_default();
    let base = base_settings(&prompt, &args.opts, "tkg-{index:05}-{seed}.png")?;
    let base_seed = args.opts.seed.unwrap_or(0);
    execute(&file, &lines, bad, base, base_seed, &args.opts, true, ui)
}

fn read_text(p: &Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
}

/// The command line's per-image settings.
pub fn base_settings(prompt: &str, o: &JobOptions, default_out: &str) -> Result<Settings> {
    let (model, model_dir) = match &o.model.model_dir {
        Some(d) => (jobs::dir_model_name(d), Some(d.clone())),
        None => (o.model.model.clone(), None),
    };
    Ok(Settings {
        model,
        model_dir,
        lora: Vec::new(),
        prompt: prompt.to_string(),
        negative_prompt: o.negative_prompt.clone(),
        color: o.color.clone(),
        seed: None,
        num_images: o.run.num_images as usize,
        steps: o.steps,
        guidance: o.guidance,
        width: o.width,
        height: o.height,
        method: o.method,
        shift: o.shift,
        mask_sigma: o.mask_sigma,
        subject_center: o.subject_center.clone(),
        clip_skip: o.clip_skip,
        rng: o.rng,
        original_size: o.original_size,
        crop_top_left: o.crop_top_left,
        target_size: o.target_size,
        out: o.out.clone().unwrap_or_else(|| default_out.to_string()),
        save_latents: o.save_latents.clone(),
    })
}

/// What to do with one selected image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Todo {
    /// Nothing exists yet (or --overwrite).
    Make,
    /// Some of its files exist (a run killed hard between them): make it, write the rest.
    Complete,
    /// All its files exist.
    Skip,
}

/// Plans and runs the images of `lines` merged over `base`. `batch_mode` creates missing
/// output folders (templates may name new ones); `tkg generate` wants them to exist.
#[allow(clippy::too_many_arguments)]
pub fn execute(
    file: &str,
    lines: &[SourcedLine],
    bad_lines: Vec<(usize, String)>,
    base: Settings,
    base_seed: u64,
    opts: &JobOptions,
    batch_mode: bool,
    ui: Ui,
) -> Result<()> {
    let run = &opts.run;
    let started = Instant::now();
    let date = jobs::today_utc();
    let images = jobs::expand_with(file, lines, bad_lines, &base, base_seed, &date)?;

    // Keying flags are the same for every image; check them (and a composite background).
    let key_flags = if opts.no_key {
        None
    } else {
        let (_, flags) = opts.key.to_options(base.color.clone())?;
        Some(flags)
    };
    let targets: Vec<Vec<PathBuf>> = images
        .iter()
        .map(|img| {
            let mut t = vec![img.out.clone()];
            if let Some(f) = &key_flags {
                t.extend(key::output_paths(&img.out, f));
            }
            t.extend(img.save_latents.clone());
            t
        })
        .collect();
    jobs::check_unique_paths(file, &images, &targets)?;
    for (img, t) in images.iter().zip(&targets) {
        for p in t {
            if p.extension().is_none_or(|e| e.is_empty()) || p.file_name().is_none() {
                bail!(
                    "{}image {}: output '{}' needs a file name with an extension",
                    where_prefix(file, img),
                    img.index,
                    p.display()
                );
            }
        }
    }

    // Every model must exist in the registry (no download yet).
    let registry = Registry::load(opts.model.models_file.as_deref())?;
    let mut checked = std::collections::HashSet::new();
    for img in &images {
        let s = &img.settings;
        if s.model_dir.is_none() && checked.insert(s.model.clone()) {
            registry
                .get(&s.model)
                .with_context(|| where_prefix(file, img).trim_end_matches(": ").to_string())?;
        }
        if let Some(d) = &s.model_dir
            && checked.insert(d.display().to_string())
            && !d.is_dir()
        {
            bail!(
                "{}model folder {} does not exist",
                where_prefix(file, img),
                d.display()
            );
        }
    }

    let shard = match run.shard.as_deref() {
        None => Shard::ALL,
        Some("auto") => Shard::auto(&|k| std::env::var(k).ok(), run.shard_count)?,
        Some(s) => {
            if run.shard_count.is_some() {
                bail!("--shard-count goes with --shard auto");
            }
            Shard::parse(s)?
        }
    };
    let mut plan: Vec<(usize, Todo)> = Vec::new();
    let mut existing = Vec::new();
    for (img, t) in images.iter().zip(&targets) {
        if !shard.selects(img.index) {
            continue;
        }
        let present = t.iter().filter(|p| p.exists()).count();
        let todo = if run.skip_existing && present == t.len() {
            Todo::Skip
        } else if run.skip_existing && present > 0 {
            Todo::Complete
        } else {
            if present > 0 && !opts.overwrite {
                existing.extend(t.iter().filter(|p| p.exists()).cloned());
            }
            Todo::Make
        };
        plan.push((img.index, todo));
    }
    if let Some(first) = existing.first() {
        bail!(
            "{} already exists{}; pass --overwrite to replace, or --skip-existing to resume",
            first.display(),
            if existing.len() > 1 {
                format!(" (and {} more output files)", existing.len() - 1)
            } else {
                String::new()
            }
        );
    }
    // Output folders.
    for &(i, todo) in &plan {
        if todo == Todo::Skip {
            continue;
        }
        for p in &targets[i] {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => continue,
            };
            if !dir.is_dir() {
                if batch_mode && !run.dry_run {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("cannot create {}", dir.display()))?;
                } else if !batch_mode {
                    bail!("output folder {} does not exist", dir.display());
                }
            }
        }
    }

    let skipped = plan.iter().filter(|(_, t)| *t == Todo::Skip).count();
    let todo: Vec<(usize, Todo)> = plan
        .iter()
        .copied()
        .filter(|(_, t)| *t != Todo::Skip)
        .collect();
    let mut rep = Reporter::new(ui, run.progress);
    rep.event(json!({
        "event": "plan", "images": images.len(), "shard": shard.to_string(),
        "selected": plan.len(), "skipped": skipped, "todo": todo.len(),
        "batch_size": run.batch_size, "dry_run": run.dry_run,
    }));
    if run.dry_run {
        for &(i, t) in &plan {
            let img = &images[i];
            println!(
                "{}\t{}\t{}\t{}",
                img.index,
                img.seed,
                img.out.display(),
                match t {
                    Todo::Skip => "skip",
                    Todo::Complete => "complete",
                    Todo::Make => "make",
                }
            );
        }
        ui.info(format!(
            "{file}: {} image(s) in all; shard {shard}: {} selected, {} to make, {} already done \
             (dry run: nothing generated)",
            images.len(),
            plan.len(),
            todo.len(),
            skipped
        ));
        return Ok(());
    }
    if images.len() > 1 || skipped > 0 {
        rep.line(format!(
            "{} image(s); shard {shard}: {} to make, {} already done",
            images.len(),
            todo.len(),
            skipped
        ));
    }
    for &(i, t) in &plan {
        if t == Todo::Skip {
            rep.event(json!({"event": "skip", "index": i, "seed": images[i].seed,
                "path": images[i].out.display().to_string()}));
        }
    }
    if todo.is_empty() {
        rep.event(json!({"event": "done", "written": 0, "skipped": skipped,
            "seconds": started.elapsed().as_secs_f64()}));
        return Ok(());
    }
    let mut manifest = run.manifest.as_deref().map(Manifest::open).transpose()?;
    jobs::install_interrupt_handler();

    // Run model by model (first-appearance order), images in index order within a model. A
    // model is the weights plus the LoRA set merged into them: the job's `lora` list and its
    // prompt's <lora:...> tags.
    let model_key = |img: &ImageJob| {
        let tags = crate::models::lora::prompt_tags(&img.settings.prompt)
            .map(|t| format!("{t:?}"))
            .unwrap_or_else(|e| e.to_string());
        (
            img.settings.model.clone(),
            img.settings.model_dir.clone(),
            img.settings.clip_skip,
            img.settings.lora.clone(),
            tags,
        )
    };
    let mut order: Vec<(usize, Todo)> = Vec::with_capacity(todo.len());
    let mut seen_models = Vec::new();
    for &(i, _) in &todo {
        let k = model_key(&images[i]);
        if !seen_models.contains(&k) {
            seen_models.push(k);
        }
    }
    for k in &seen_models {
        order.extend(todo.iter().filter(|(i, _)| model_key(&images[*i]) == *k));
    }

    let device = pick_device(&opts.model.device, ui)?;
    let dtype = pick_dtype(opts.model.dtype, &device);
    let ctx = RunCtx {
        opts,
        shard,
        batch_size: run.batch_size as usize,
        key_flags: key_flags.as_ref(),
    };
    let mut done = 0usize;
    let mut pos = 0;
    while pos < order.len() {
        let key = model_key(&images[order[pos].0]);
        let end = pos
            + order[pos..]
                .iter()
                .take_while(|(i, _)| model_key(&images[*i]) == key)
                .count();
        let first = &images[order[pos].0].settings;
        let margs = ModelArgs {
            model: first.model.clone(),
            model_dir: first.model_dir.clone(),
            models_file: opts.model.models_file.clone(),
            device: opts.model.device.clone(),
            dtype: opts.model.dtype,
        };
        // [issue 5] --model-file, --vae, --lora and <lora:...> tags of this run's prompts.
        let model = super::generate::resolve_model_with(&margs, &opts.extra, ui)?;
        let prompts: Vec<&str> = order[pos..end]
            .iter()
            .map(|(i, _)| images[*i].settings.prompt.as_str())
            .collect();
        let pipe = super::generate::load_pipeline(
            &model,
            &opts.extra,
            &first.lora,
            &prompts,
            &LoadOptions {
                device: device.clone(),
                dtype,
                clip_skip: first.clip_skip,
            },
            ui,
        )?;
        let model_hash = hub::file_sha256_short(&pipe.unet_weights).ok();
        rep.event(json!({"event": "load", "model": model.name,
            "seconds": pipe.load_time.as_secs_f64()}));
        ui.detail(format!(
            "loaded {} ({}) in {:.2}s",
            model.name,
            model.folder.describe(),
            pipe.load_time.as_secs_f64()
        ));
        let loaded = Loaded {
            pipe: &pipe,
            name: model.name.clone(),
            hash: model_hash,
            width: model.width,
            height: model.height,
            shift: model.tkg_shift,
        };
        // Resolve every image's request, then cut runs of compatible ones into batches.
        let mut reqs: Vec<(usize, Todo, Request)> = Vec::new();
        for &(i, t) in &order[pos..end] {
            let req = loaded.request(&images[i])?;
            reqs.push((i, t, req));
        }
        let mut b0 = 0;
        while b0 < reqs.len() {
            let r0 = &reqs[b0].2;
            let rng0 = images[reqs[b0].0].settings.rng;
            let mut b1 = b0 + 1;
            while b1 < reqs.len() && b1 - b0 < ctx.batch_size {
                let r = &reqs[b1].2;
                if (r.width, r.height, r.steps, r.guidance, r.micro)
                    != (r0.width, r0.height, r0.steps, r0.guidance, r0.micro)
                    || images[reqs[b1].0].settings.rng != rng0
                {
                    break;
                }
                b1 += 1;
            }
            let batch = &reqs[b0..b1];
            let indices: Vec<usize> = batch.iter().map(|(i, _, _)| *i).collect();
            rep.start_batch(&indices, r0.steps, done, todo.len());
            let req_list: Vec<Request> = batch.iter().map(|(_, _, r)| r.clone()).collect();
            let t0 = Instant::now();
            let result = pipe.generate_batch(&req_list, rng0, &mut |s, n| {
                rep.step(&indices, s, n);
                if jobs::interrupted() {
                    bail!(Interrupted { done });
                }
                Ok(())
            });
            rep.end_batch();
            let generated = match result {
                Ok(g) => g,
                Err(e) if e.is::<Interrupted>() => {
                    rep.event(json!({"event": "interrupted", "written": done,
                        "abandoned": indices}));
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let per_image = t0.elapsed() / indices.len() as u32;
            // Keyed and written side by side; reported in job order, every finished image
            // before the first failure.
            let finished: Vec<Result<Finished>> = batch
                .par_iter()
                .zip(&generated)
                .map(|((i, t, req), g)| {
                    let img = &images[*i];
                    let keyed = ctx.key_flags.map(|_| key_image(&ctx, img, g)).transpose()?;
                    finish_image(&ctx, &loaded, img, req, *t, g, keyed, per_image)
                })
                .collect();
            let mut failed = None;
            for ((i, _, _), f) in batch.iter().zip(finished) {
                let f = match f {
                    Ok(f) => f,
                    Err(e) => {
                        failed.get_or_insert(e);
                        continue;
                    }
                };
                let img = &images[*i];
                for w in &f.warnings {
                    ui.warn(w);
                }
                for p in &f.written {
                    println!("{}", p.display());
                }
                ui.detail(&f.detail);
                done += 1;
                if let Some(m) = manifest.as_mut() {
                    m.append(&f.record)?;
                }
                rep.event(json!({"event": "image", "index": i, "seed": img.seed,
                    "paths": f.record["paths"], "seconds": f.record["timings"]["total_s"],
                    "done": done, "todo": todo.len()}));
                if todo.len() > 1 {
                    rep.line(format!(
                        "[{done}/{}] {} (seed {})",
                        todo.len(),
                        img.out.display(),
                        img.seed
                    ));
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            if jobs::interrupted() {
                rep.event(json!({"event": "interrupted", "written": done, "abandoned": []}));
                return Err(Interrupted { done }.into());
            }
            b0 = b1;
        }
        pos = end;
    }
    rep.event(json!({"event": "done", "written": done, "skipped": skipped,
        "seconds": started.elapsed().as_secs_f64()}));
    Ok(())
}

fn where_prefix(file: &str, img: &ImageJob) -> String {
    if img.line == 0 {
        String::new()
    } else {
        format!("{file} line {}: ", img.line)
    }
}

struct RunCtx<'a> {
    opts: &'a JobOptions,
    shard: Shard,
    batch_size: usize,
    key_flags: Option<&'a key::KeyOutputFlags>,
}

/// A loaded model and what the registry says about it.
struct Loaded<'a> {
    pipe: &'a Pipeline,
    name: String,
    hash: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    shift: Option<f64>,
}

impl Loaded<'_> {
    /// The flag, else the registry's size, else the UNet's `sample_size` x the VAE factor
    /// (as diffusers does), else the family's.
    fn size(&self, s: &Settings) -> (usize, usize) {
        let d = self
            .pipe
            .unet
            .config
            .sample_size
            .map(|n| n * self.pipe.vae_factor())
            .unwrap_or_else(|| default_size(self.pipe.family));
        (
            s.width.or(self.width).unwrap_or(d),
            s.height.or(self.height).unwrap_or(d),
        )
    }

    fn shift(&self, s: &Settings) -> f64 {
        s.shift.or(self.shift).unwrap_or(match self.pipe.family {
            Family::Sd15 => 0.07,
            Family::Sdxl => 0.11,
        })
    }

    fn centers(s: &Settings) -> Vec<(f64, f64)> {
        if s.subject_center.is_empty() {
            vec![(0.0, 0.0)]
        } else {
            s.subject_center.clone()
        }
    }

    fn request(&self, img: &ImageJob) -> Result<Request> {
        let s = &img.settings;
        let (width, height) = self.size(s);
        self.pipe.check_size(width, height)?;
        let factors = match self.pipe.family {
            Family::Sd15 => &SD15_LATENT_RGB,
            Family::Sdxl => &SDXL_LATENT_RGB,
        };
        let (prompt, init) = match s.method {
            Method::Tkg => (
                s.prompt.clone(),
                InitNoise::Tkg(TkgSettings {
                    signs: s.color.channel_signs(factors),
                    target_shift: self.shift(s),
                    sigma: s.mask_sigma,
                    centers: Self::centers(s),
                }),
            ),
            Method::Prompt => (prompt_method_text(&s.prompt, &s.color), InitNoise::Plain),
            Method::Plain => (s.prompt.clone(), InitNoise::Plain),
        };
        Ok(Request {
            prompt,
            negative_prompt: s.negative_prompt.clone(),
            width,
            height,
            steps: s.steps,
            guidance: s.guidance,
            seed: img.seed,
            init,
            micro: Some(MicroCond {
                original_size: s.original_size.unwrap_or((height, width)),
                crop_top_left: s.crop_top_left.unwrap_or((0, 0)),
                target_size: s.target_size.unwrap_or((height, width)),
            }),
        })
    }

    /// The A1111 `parameters` of an image.
    fn parameters(&self, img: &ImageJob, req: &Request) -> Parameters {
        let s = &img.settings;
        let mut p = Parameters::new(&req.prompt, &s.negative_prompt);
        p.push("Steps", s.steps.to_string());
        p.push("Sampler", "DDIM".into());
        p.push("CFG scale", fmt_num(s.guidance));
        p.push("Seed", img.seed.to_string());
        p.push("Size", format!("{}x{}", req.width, req.height));
        if let Some(h) = &self.hash {
            p.push("Model hash", h.clone());
        }
        // [issue 5] A1111's "Lora hashes" (name: 12 hex, ...).
        if !self.pipe.lora_hashes.is_empty() {
            p.push("Lora hashes", self.pipe.lora_hashes_text());
        }
        p.push("Model", self.name.clone());
        if let Some(n) = s.clip_skip {
            p.push("Clip skip", n.to_string());
        }
        // A1111's names: "CPU" is torch's CPU generator, "NV" its reimplementation of the
        // CUDA generator (A1111 leaves the key out for its default, the GPU itself).
        p.push(
            "RNG",
            match s.rng {
                crate::rng::RngKind::TorchCpu => "CPU".into(),
                crate::rng::RngKind::TorchCuda => "NV".into(),
            },
        );
        if self.pipe.family == Family::Sdxl
            && let Some(m) = req.micro
        {
            let (w, h) = (req.width, req.height);
            if m.original_size != (h, w) {
                p.push(
                    "TKG original size",
                    format!("{}x{}", m.original_size.1, m.original_size.0),
                );
            }
            if m.crop_top_left != (0, 0) {
                p.push(
                    "TKG crop top left",
                    format!("{},{}", m.crop_top_left.0, m.crop_top_left.1),
                );
            }
            if m.target_size != (h, w) {
                p.push(
                    "TKG target size",
                    format!("{}x{}", m.target_size.1, m.target_size.0),
                );
            }
        }
        if let Some(d) = &s.model_dir {
            p.push("TKG model dir", d.display().to_string());
        }
        p.push("TKG method", s.method.name().into());
        p.push("TKG color", s.color.to_string());
        if s.method == Method::Tkg {
            p.push("TKG shift", fmt_num(self.shift(s)));
            p.push("TKG sigma", fmt_num(s.mask_sigma));
            let c: Vec<String> = Self::centers(s)
                .iter()
                .map(|(x, y)| format!("{},{}", fmt_num(*x), fmt_num(*y)))
                .collect();
            p.push("TKG center", c.join(";"));
        }
        p.push("Version", format!("tkg {}", env!("CARGO_PKG_VERSION")));
        p
    }
}

/// The prompt `--method prompt` uses.
pub fn prompt_method_text(prompt: &str, color: &crate::color::KeyColor) -> String {
    format!(
        "{prompt} isolated on a solid {} background",
        color.prompt_words()
    )
}

/// Writes one image's files (missing ones only for [`Todo::Complete`]) and returns its
/// manifest record.
#[allow(clippy::too_many_arguments)]
fn key_image(ctx: &RunCtx, img: &ImageJob, g: &Generated) -> Result<(key::Keyed, Duration)> {
    let tk = Instant::now();
    let (key_opts, _) = ctx.opts.key.to_options(img.settings.color.clone())?;
    let keyed = key::key_rgb8(g.width as u32, g.height as u32, &g.rgb, &key_opts)?;
    Ok((keyed, tk.elapsed()))
}

/// One image written: what to report, in job order, on the main thread.
struct Finished {
    /// The manifest record.
    record: serde_json::Value,
    /// Files written by this run (stdout lists them).
    written: Vec<PathBuf>,
    warnings: Vec<String>,
    /// The timings line for -v.
    detail: String,
}

/// Writes one image and its keyed outputs (`keyed` is there when keying is on).
#[allow(clippy::too_many_arguments)]
fn finish_image(
    ctx: &RunCtx,
    m: &Loaded,
    img: &ImageJob,
    req: &Request,
    todo: Todo,
    g: &Generated,
    keyed: Option<(key::Keyed, Duration)>,
    gen_time: Duration,
) -> Result<Finished> {
    let opts = ctx.opts;
    let t0 = Instant::now();
    let mut warnings: Vec<String> = g
        .warnings
        .iter()
        .map(|w| format!("image {}: {w}", img.index))
        .collect();
    let mut written = Vec::new();
    let params = m.parameters(img, req);
    let text = vec![("parameters".to_string(), params.to_string())];
    let overwrite = opts.overwrite;
    let mut paths = Vec::new();
    if !(todo == Todo::Complete && img.out.exists()) {
        output::write_png(
            &img.out,
            &PngImage {
                width: g.width as u32,
                height: g.height as u32,
                pixels: Pixels::Rgb8(&g.rgb),
                text: &text,
            },
            overwrite,
        )?;
        written.push(img.out.clone());
    }
    paths.push(img.out.display().to_string());
    let mut key_time = Duration::ZERO;
    let mut key_rec = serde_json::Value::Null;
    if let (Some(flags), Some((keyed, time))) = (ctx.key_flags, keyed) {
        key_time = time;
        warnings.extend(keyed.screen.warning.clone());
        let want = key::output_paths(&img.out, flags);
        let all_there = want.iter().all(|p| p.exists());
        if !(todo == Todo::Complete && all_there) {
            // Completing a half-written image: the files that exist are rewritten with the
            // same bytes (generation is deterministic), atomically.
            let ow = overwrite || todo == Todo::Complete;
            written.extend(key::write_outputs(&img.out, &keyed, flags, &text, ow)?);
        }
        paths.extend(want.iter().map(|p| p.display().to_string()));
        let s = keyed.screen.rgb.map(|v| v.round().clamp(0.0, 255.0) as u8);
        key_rec = json!({
            "screen": format!("#{:02x}{:02x}{:02x}", s[0], s[1], s[2]),
            "screen_rgb": keyed.screen.rgb,
            "confidence": keyed.screen.confidence,
            "fell_back": keyed.screen.fell_back,
            "background_fraction": keyed.background_fraction,
            "noise": keyed.noise,
            "warning": keyed.screen.warning,
        });
    }
    if let Some(p) = &img.save_latents {
        if !(todo == Todo::Complete && p.exists()) {
            save_latents(p, g, overwrite)?;
            written.push(p.clone());
        }
        paths.push(p.display().to_string());
    }
    let s = &img.settings;
    let t = &g.timings;
    let detail = format!(
        "text {:.2}s, denoise {:.2}s, decode {:.2}s, key {:.2}s",
        t.text.as_secs_f64(),
        t.denoise.as_secs_f64(),
        t.decode.as_secs_f64(),
        key_time.as_secs_f64()
    );
    let command = super::info::command_for(&params, &img.out).unwrap_or_default();
    let record = json!({
        "index": img.index,
        "line": img.line,
        "image": img.image,
        "shard": ctx.shard.to_string(),
        "path": img.out.display().to_string(),
        "paths": paths,
        "seed": img.seed,
        "prompt": s.prompt,
        "negative_prompt": s.negative_prompt,
        "model": m.name,
        "model_hash": m.hash,
        "model_dir": s.model_dir.as_ref().map(|d| d.display().to_string()),
        "color": s.color.to_string(),
        "method": s.method.name(),
        "steps": s.steps,
        "guidance": s.guidance,
        "width": req.width,
        "height": req.height,
        "shift": (s.method == Method::Tkg).then(|| m.shift(s)),
        "mask_sigma": s.mask_sigma,
        "subject_center": Loaded::centers(s),
        "clip_skip": s.clip_skip,
        "rng": s.rng.name(),
        "batch_size": ctx.batch_size,
        "tkg_deltas": g.shift.as_ref().map(|r| r.deltas),
        "parameters": params.to_string(),
        "command": command,
        "timings": {
            "text_s": t.text.as_secs_f64(),
            "denoise_s": t.denoise.as_secs_f64(),
            "decode_s": t.decode.as_secs_f64(),
            "key_s": key_time.as_secs_f64(),
            "write_s": t0.elapsed().as_secs_f64(),
            "total_s": (gen_time + key_time + t0.elapsed()).as_secs_f64(),
        },
        "key": key_rec,
        "finished_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    });
    Ok(Finished {
        record,
        written,
        warnings,
        detail,
    })
}

/// Progress on stderr: an indicatif bar, plain lines, NDJSON events, or nothing.
struct Reporter {
    mode: ProgressMode,
    bar: Option<indicatif::ProgressBar>,
    start: Instant,
    /// The batch's last reported step (the pipeline repeats a step while images catch up).
    last_step: std::sync::atomic::AtomicUsize,
}

impl Reporter {
    fn new(ui: Ui, mode: ProgressMode) -> Self {
        let mode = match mode {
            _ if ui.quiet && mode != ProgressMode::Json => ProgressMode::None,
            ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Plain,
            m => m,
        };
        Self {
            mode,
            bar: None,
            start: Instant::now(),
            last_step: 0.into(),
        }
    }

    fn event(&self, v: serde_json::Value) {
        if self.mode == ProgressMode::Json {
            eprintln!("{v}");
        }
    }

    /// A human status line (plain and bar modes).
    fn line(&self, msg: String) {
        match self.mode {
            ProgressMode::Plain => eprintln!("{msg}"),
            ProgressMode::Bar => match &self.bar {
                Some(b) => b.println(msg),
                None => eprintln!("{msg}"),
            },
            _ => {}
        }
    }

    fn start_batch(&mut self, indices: &[usize], steps: usize, done: usize, total: usize) {
        self.start = Instant::now();
        self.last_step = 0.into();
        self.event(json!({"event": "batch", "indices": indices, "steps": steps,
            "done": done, "todo": total}));
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
            self.bar = Some(b);
        }
    }

    fn step(&self, indices: &[usize], i: usize, n: usize) {
        use std::sync::atomic::Ordering;
        if self.last_step.fetch_max(i, Ordering::Relaxed) >= i {
            return;
        }
        match self.mode {
            ProgressMode::Json => eprintln!(
                "{}",
                json!({"event": "step", "indices": indices, "step": i, "steps": n,
                    "elapsed_s": self.start.elapsed().as_secs_f64()})
            ),
            ProgressMode::Bar => {
                if let Some(b) = &self.bar {
                    b.set_position(i as u64);
                }
            }
            ProgressMode::Plain if i == n || i.is_multiple_of((n / 10).max(1)) => {
                let per = crate::bench::duration(self.start.elapsed().as_secs_f64() / i as f64);
                eprintln!("step {i}/{n} ({per}/it)");
            }
            _ => {}
        }
    }

    fn end_batch(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
