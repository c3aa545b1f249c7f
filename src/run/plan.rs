//! Planning a run before any work: job lines merged over the base settings, expanded into
//! images with seeds and output paths, every path checked (unique, named, not clobbered),
//! this shard's images selected, then grouped by model and cut into batches.

use super::RunConfig;
use super::shard::Shard;
use super::template::{Fields, Template};
use crate::key;
use crate::limits;
use crate::models::registry::Registry;
use crate::settings::{Settings, SettingsPatch};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A job line: a patch over the base settings, and its 1-based line (0: the command line).
#[derive(Debug, Clone)]
pub struct JobLine {
    pub line: usize,
    pub patch: SettingsPatch,
}

/// The jobs of a run and where they came from.
#[derive(Debug, Clone)]
pub struct JobFile {
    /// Names the source in errors: a file name, or "the command line".
    pub label: String,
    pub lines: Vec<JobLine>,
    /// Lines that did not parse, (line, error), reported with the setting errors.
    pub bad: Vec<(usize, String)>,
}

impl JobFile {
    /// One job from the command line alone.
    pub fn command_line() -> Self {
        Self {
            label: "the command line".into(),
            lines: vec![JobLine {
                line: 0,
                patch: SettingsPatch::default(),
            }],
            bad: Vec::new(),
        }
    }

    /// A JSONL job file: one object a line; blank lines and lines starting with `#` or `//`
    /// are skipped. Bad lines are kept, to be reported with every other bad line.
    pub fn jsonl(label: &str, text: &str) -> Result<Self> {
        let mut lines = Vec::new();
        let mut bad = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            if lines.len() + bad.len() >= limits::MAX_IMAGES {
                bail!(
                    "{label}: more than {} jobs; split it into several files",
                    limits::MAX_IMAGES
                );
            }
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("//") {
                continue;
            }
            match SettingsPatch::from_json(line) {
                Ok(patch) => lines.push(JobLine { line: i + 1, patch }),
                Err(e) => bad.push((i + 1, format!("line {}: {e}", i + 1))),
            }
        }
        if lines.is_empty() && bad.is_empty() {
            bail!("{label} has no jobs");
        }
        Ok(Self {
            label: label.into(),
            lines,
            bad,
        })
    }

    /// A prompt file: one prompt a line; blank lines and `#` comments are skipped.
    pub fn prompts(label: &str, text: &str) -> Result<Self> {
        let lines: Vec<JobLine> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#')
            })
            .map(|(i, l)| JobLine {
                line: i + 1,
                patch: SettingsPatch {
                    prompt: Some(l.trim().to_string()),
                    ..SettingsPatch::default()
                },
            })
            .take(limits::MAX_IMAGES + 1)
            .collect();
        if lines.is_empty() {
            bail!("{label} has no prompts");
        }
        if lines.len() > limits::MAX_IMAGES {
            bail!(
                "{label}: more than {} prompts; split it into several files",
                limits::MAX_IMAGES
            );
        }
        Ok(Self {
            label: label.into(),
            lines,
            bad: Vec::new(),
        })
    }
}

/// One image to make: its settings, seed, and output paths.
#[derive(Debug, Clone)]
pub struct ImageJob {
    /// Position in the whole run (0-based); shards split on it.
    pub index: usize,
    /// The job's line in its file (1-based), 0 for the command line.
    pub line: usize,
    /// The image's number within its job.
    pub image: usize,
    pub seed: u64,
    pub settings: Settings,
    pub out: PathBuf,
    pub save_latents: Option<PathBuf>,
}

impl ImageJob {
    /// How many seeds this image may try: `best_of`, plus `retries` below `min_keyability`.
    pub fn max_tries(&self) -> usize {
        self.settings.best_of + self.settings.retries
    }

    /// The seed of try `t` (0: the image's own seed): seed + t x the job's image count, so
    /// the tries of one job's images never share a seed, and a single image tries seed,
    /// seed + 1, ...
    pub fn try_seed(&self, t: usize) -> Option<u64> {
        let step = (t as u64).checked_mul(self.settings.num_images as u64)?;
        self.seed.checked_add(step)
    }

    /// Where `--keep all` writes try `t`: `X.tryT.png`.
    pub fn try_path(&self, t: usize) -> PathBuf {
        crate::output::sibling(&self.out, &format!("try{t}"))
    }

    /// "jobs.jsonl line 3: " for a job line, "" for the command line.
    pub fn where_prefix(&self, file: &str) -> String {
        if self.line == 0 {
            String::new()
        } else {
            format!("{file} line {}: ", self.line)
        }
    }
}

/// "3: msg; 7: msg" → one error naming the file.
fn line_errors(file: &str, errors: Vec<String>) -> Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    let n = errors.len();
    let shown: Vec<String> = errors.into_iter().take(10).collect();
    let more = if n > 10 {
        format!("; and {} more bad lines", n - 10)
    } else {
        String::new()
    };
    bail!("{file}: {}{more}", shown.join("; "))
}

/// Merges, validates and expands job lines into images. Jobs without a seed get
/// `base_seed + index`. Every bad line is reported, in line order, in one error.
pub fn expand(
    jobs: &JobFile,
    base: &Settings,
    base_seed: u64,
    date: &str,
) -> Result<Vec<ImageJob>> {
    let mut images = Vec::new();
    let mut errors: Vec<(usize, String)> = jobs.bad.clone();
    for jl in &jobs.lines {
        let where_ = |e: String| {
            if jl.line == 0 {
                e
            } else {
                format!("line {}: {e}", jl.line)
            }
        };
        let settings = jl.patch.apply(base);
        if let Err(e) = settings.validate() {
            let text = if jl.line == 0 {
                e.as_flags()
            } else {
                e.as_fields()
            };
            errors.push((jl.line, where_(text)));
            continue;
        }
        let out_t = match Template::parse(&settings.out) {
            Ok(t) => t,
            Err(e) => {
                errors.push((jl.line, where_(format!("out: {e}"))));
                continue;
            }
        };
        let lat_t = match settings.save_latents.as_deref().map(Template::parse) {
            Some(Err(e)) => {
                errors.push((jl.line, where_(format!("save_latents: {e}"))));
                continue;
            }
            Some(Ok(t)) => Some(t),
            None => None,
        };
        if images.len() + settings.num_images > limits::MAX_IMAGES {
            errors.push((
                jl.line,
                where_(format!(
                    "num_images: the run would make more than {} images; split it into several runs or shards",
                    limits::MAX_IMAGES
                )),
            ));
            break;
        }
        for k in 0..settings.num_images {
            let index = images.len();
            let seed = match settings.seed {
                Some(s) => s.checked_add(k as u64),
                None => base_seed.checked_add(index as u64),
            };
            let Some(seed) = seed else {
                errors.push((
                    jl.line,
                    where_(format!(
                        "seed: image {} would need a seed past {} (seeds do not wrap)",
                        k + 1,
                        u64::MAX
                    )),
                ));
                break;
            };
            let fields = Fields {
                index,
                seed,
                prompt: &settings.prompt,
                color: settings.auto_colors.is_empty().then_some(&settings.color),
                model: &settings.model,
                date,
                image: k,
                line: jl.line,
            };
            let out = PathBuf::from(out_t.render(&fields));
            let save_latents = lat_t.as_ref().map(|t| PathBuf::from(t.render(&fields)));
            let bad = check_file_name(&out, Some("png"))
                .map_err(|e| format!("out: {e}"))
                .err()
                .or_else(|| {
                    let l = save_latents.as_deref()?;
                    check_file_name(l, None)
                        .map_err(|e| format!("save_latents: {e}"))
                        .err()
                });
            if let Some(e) = bad {
                errors.push((jl.line, where_(e)));
                break;
            }
            let job = ImageJob {
                index,
                line: jl.line,
                image: k,
                seed,
                out,
                save_latents,
                settings: settings.clone(),
            };
            if job.try_seed(job.max_tries() - 1).is_none() {
                errors.push((
                    jl.line,
                    where_(format!(
                        "seed: image {}'s tries would need a seed past {} (seeds do not wrap)",
                        k + 1,
                        u64::MAX
                    )),
                ));
                break;
            }
            images.push(job);
        }
    }
    errors.sort_by_key(|(l, _)| *l);
    let had_bad_lines = !jobs.bad.is_empty();
    line_errors(&jobs.label, errors.into_iter().map(|(_, e)| e).collect())?;
    if images.is_empty() && !had_bad_lines {
        bail!("{} has no jobs", jobs.label);
    }
    Ok(images)
}

/// A rendered output path must name a file (with extension `ext`, when given).
fn check_file_name(p: &Path, ext: Option<&str>) -> Result<(), String> {
    let text = p.as_os_str().to_string_lossy();
    if text.contains('\0') {
        return Err(format!("{text:?} contains a NUL character"));
    }
    let name = p.file_name().map(|n| n.to_string_lossy());
    if text == "." || text.ends_with('/') || text.ends_with("/.") || name.is_none() || p.is_dir() {
        return Err(format!("{} names a folder; give a file name", p.display()));
    }
    if let Some(ext) = ext
        && !p
            .extension()
            .is_some_and(|e| e.to_string_lossy().eq_ignore_ascii_case(ext))
    {
        return Err(format!(
            "{} must end in .{ext}: tkg writes {} files",
            p.display(),
            ext.to_ascii_uppercase()
        ));
    }
    Ok(())
}

/// Fails if two images would write the same file. `targets` lists each image's files.
pub fn check_unique_paths(file: &str, images: &[ImageJob], targets: &[Vec<PathBuf>]) -> Result<()> {
    let mut seen: HashMap<PathBuf, usize> = HashMap::new();
    let mut errors = Vec::new();
    for (img, paths) in images.iter().zip(targets) {
        for p in paths {
            let key = normalize(p);
            if let Some(&other) = seen.get(&key) {
                if other == img.index {
                    errors.push(format!(
                        "{} is written twice by image {} ({}): its image, keyed outputs and latents need different names",
                        p.display(),
                        img.index,
                        describe_source(img)
                    ));
                } else {
                    let a = &images[other];
                    errors.push(format!(
                        "{} is written by image {} ({}) and image {} ({})",
                        p.display(),
                        a.index,
                        describe_source(a),
                        img.index,
                        describe_source(img)
                    ));
                }
            } else {
                seen.insert(key, img.index);
            }
        }
    }
    if !errors.is_empty() {
        let n = errors.len();
        let shown: Vec<String> = errors.into_iter().take(5).collect();
        bail!(
            "{file}: {n} output path(s) clash: {}; use a template such as \
             --out \"out/{{index:05}}-{{slug}}-{{seed}}.png\"",
            shown.join("; ")
        );
    }
    Ok(())
}

fn describe_source(img: &ImageJob) -> String {
    if img.line == 0 {
        format!("seed {}", img.seed)
    } else {
        format!("line {}, seed {}", img.line, img.seed)
    }
}

/// A path compared lexically: "./a/../b.png" and "b.png" are the same file.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// What to do with one selected image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Todo {
    /// Nothing exists yet (or --overwrite).
    Make,
    /// Some of its files exist (a run killed hard between them): make it, write the rest.
    Complete,
    /// All its files exist.
    Skip,
}

impl Todo {
    pub fn name(self) -> &'static str {
        match self {
            Todo::Skip => "skip",
            Todo::Complete => "complete",
            Todo::Make => "make",
        }
    }
}

/// A checked run: every image, its files, and what this shard does with each.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Names the job source in messages.
    pub label: String,
    pub images: Vec<ImageJob>,
    /// Each image's files: the image, its keyed outputs, its latents.
    pub targets: Vec<Vec<PathBuf>>,
    pub shard: Shard,
    /// This shard's images in index order, with what to do.
    pub selected: Vec<(usize, Todo)>,
}

impl Plan {
    /// Expands `jobs` over `base` and checks everything that can be checked without a
    /// model: settings, templates, output paths, registry names, model folders, existing
    /// files and output folders (which must exist unless `cfg.create_dirs`).
    pub fn new(
        jobs: &JobFile,
        base: &Settings,
        base_seed: u64,
        date: &str,
        cfg: &RunConfig,
    ) -> Result<Self> {
        let file = jobs.label.as_str();
        let images = expand(jobs, base, base_seed, date)?;
        let targets: Vec<Vec<PathBuf>> = images
            .iter()
            .map(|img| {
                let mut t = vec![img.out.clone()];
                if let Some(k) = &cfg.key {
                    t.extend(key::output_paths(&img.out, &k.outputs));
                }
                // --keep all: every best-of try (retries' tries are made only when needed,
                // so they are not part of what an image is).
                if img.settings.keep == crate::settings::Keep::All {
                    for n in 0..img.settings.best_of {
                        let p = img.try_path(n);
                        if let Some(k) = &cfg.key {
                            t.extend(key::output_paths(&p, &k.outputs));
                        }
                        t.push(p);
                    }
                }
                t.extend(img.save_latents.clone());
                t
            })
            .collect();
        check_unique_paths(file, &images, &targets)?;
        if cfg.key.is_none()
            && let Some(img) = images.iter().find(|i| super::select::selects(i))
        {
            bail!(
                "{}image {}: best-of, retries and --color auto choose by how the image keys; \
                 they need keying (drop --no-key)",
                img.where_prefix(file),
                img.index
            );
        }
        for (img, t) in images.iter().zip(&targets) {
            for p in t {
                if p.extension().is_none_or(|e| e.is_empty()) || p.file_name().is_none() {
                    bail!(
                        "{}image {}: output '{}' needs a file name with an extension",
                        img.where_prefix(file),
                        img.index,
                        p.display()
                    );
                }
            }
        }
        // Every model must exist in the registry (no download yet).
        let registry = Registry::load(cfg.registry_file.as_ref())?;
        let mut checked = std::collections::HashSet::new();
        for img in &images {
            let s = &img.settings;
            if s.model_dir.is_none() && checked.insert(s.model.clone()) {
                registry
                    .get(&s.model)
                    .with_context(|| img.where_prefix(file).trim_end_matches(": ").to_string())?;
            }
            if let Some(d) = &s.model_dir
                && checked.insert(d.display().to_string())
                && !d.is_dir()
            {
                bail!(
                    "{}model folder {} does not exist",
                    img.where_prefix(file),
                    d.display()
                );
            }
        }
        let mut selected = Vec::new();
        let mut existing = Vec::new();
        for (img, t) in images.iter().zip(&targets) {
            if !cfg.shard.selects(img.index) {
                continue;
            }
            let present = t.iter().filter(|p| p.exists()).count();
            let todo = if cfg.skip_existing && present == t.len() {
                Todo::Skip
            } else if cfg.skip_existing && present > 0 {
                Todo::Complete
            } else {
                if present > 0 && !cfg.overwrite {
                    existing.extend(t.iter().filter(|p| p.exists()).cloned());
                }
                Todo::Make
            };
            selected.push((img.index, todo));
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
        let plan = Self {
            label: jobs.label.clone(),
            images,
            targets,
            shard: cfg.shard,
            selected,
        };
        for dir in plan.missing_folders() {
            if dir.exists() {
                bail!("{} is not a folder", dir.display());
            }
            if !cfg.create_dirs {
                bail!("output folder {} does not exist", dir.display());
            }
        }
        Ok(plan)
    }

    /// Whether every file of image `index` is there (another worker may have made it since
    /// the plan was made).
    pub fn all_present(&self, index: usize) -> bool {
        self.targets[index]
            .iter()
            .all(|p| crate::output::occupied(p))
    }

    /// The output folders of the images to make that do not exist yet.
    pub fn missing_folders(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for &(i, todo) in &self.selected {
            if todo == Todo::Skip {
                continue;
            }
            for p in &self.targets[i] {
                if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty())
                    && !d.is_dir()
                    && !out.iter().any(|o| o == d)
                {
                    out.push(d.to_path_buf());
                }
            }
        }
        out
    }

    /// The selected images that are already done.
    pub fn skipped(&self) -> usize {
        self.selected
            .iter()
            .filter(|(_, t)| *t == Todo::Skip)
            .count()
    }

    /// What `--dry-run` prints: one tab-separated line per selected image (index, seed, file,
    /// what is to do), and a summary.
    pub fn dry_run_listing(&self) -> (Vec<String>, String) {
        let lines = self
            .selected
            .iter()
            .map(|&(i, t)| {
                let img = &self.images[i];
                let out = img.out.display();
                format!("{}\t{}\t{out}\t{}", img.index, img.seed, t.name())
            })
            .collect();
        let summary = format!(
            "{}: {} image(s) in all; shard {}: {} selected, {} to make, {} already done \
             (dry run: nothing generated)",
            self.label,
            self.images.len(),
            self.shard,
            self.selected.len(),
            self.todo().len(),
            self.skipped()
        );
        (lines, summary)
    }

    /// The selected images to make, in index order.
    pub fn todo(&self) -> Vec<(usize, Todo)> {
        self.selected
            .iter()
            .copied()
            .filter(|(_, t)| *t != Todo::Skip)
            .collect()
    }

    /// The images to make grouped by model, groups in first-appearance order, images in
    /// index order within a group. A model is the weights plus the LoRA set merged into
    /// them: the job's `lora` list and its prompt's `<lora:...>` tags; clip skip is chosen
    /// at load time too.
    pub fn model_groups(&self) -> Vec<Vec<(usize, Todo)>> {
        let key = |i: usize| ModelKey::of(&self.images[i].settings);
        let mut groups: Vec<(_, Vec<(usize, Todo)>)> = Vec::new();
        for (i, t) in self.todo() {
            let k = key(i);
            match groups.iter_mut().find(|(g, _)| *g == k) {
                Some((_, v)) => v.push((i, t)),
                None => groups.push((k, vec![(i, t)])),
            }
        }
        groups.into_iter().map(|(_, v)| v).collect()
    }
}

/// What decides the weights a job loads: the model, the folder, clip skip, and the LoRA set
/// merged into them (the `lora` list and the prompt's `<lora:...>` tags). Jobs with equal
/// keys can share one loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelKey {
    model: String,
    model_dir: Option<PathBuf>,
    clip_skip: Option<usize>,
    lora: Vec<String>,
    prompt_loras: String,
}

impl ModelKey {
    pub fn of(s: &Settings) -> Self {
        Self {
            model: s.model.clone(),
            model_dir: s.model_dir.clone(),
            clip_skip: s.clip_skip,
            lora: s.lora.clone(),
            prompt_loras: crate::models::lora::prompt_tags(&s.prompt)
                .map(|t| format!("{t:?}"))
                .unwrap_or_else(|e| e.to_string()),
        }
    }
}

/// Cuts a group's images into runs of at most `max` that can share a batch: `same(a, b)`
/// says whether two images may be denoised together.
pub fn cut_batches<T>(items: &[T], max: usize, same: impl Fn(&T, &T) -> bool) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut b0 = 0;
    while b0 < items.len() {
        let mut b1 = b0 + 1;
        while b1 < items.len() && b1 - b0 < max && same(&items[b0], &items[b1]) {
            b1 += 1;
        }
        out.push(&items[b0..b1]);
        b0 = b1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::KeyColor;

    fn base() -> Settings {
        Settings {
            model: "tiny-sd15".into(),
            prompt: "a red car".into(),
            steps: Some(2),
            out: "{index:05}-{slug}-{seed}.png".into(),
            ..Settings::default()
        }
    }

    #[test]
    fn jsonl_errors_name_every_bad_line() {
        let text =
            "{\"prompt\": \"a\"}\n\n# comment\n{\"prompt\": 3}\n{\"promt\": \"x\"}\nnot json\n";
        let jobs = JobFile::jsonl("jobs.jsonl", text).unwrap();
        let err = expand(&jobs, &base(), 0, "d").unwrap_err().to_string();
        assert!(
            err.contains("line 4") && err.contains("line 5") && err.contains("line 6"),
            "{err}"
        );
        assert!(!err.contains("line 1:"), "{err}");
        assert!(err.contains("promt"), "{err}");
        assert!(JobFile::jsonl("j", "\n# only a comment\n").is_err());
    }

    #[test]
    fn expansion_seeds_overrides_and_validation() {
        let text = "{\"prompt\": \"a cat\", \"seed\": 100, \"num_images\": 2}\n\
                    {\"prompt\": \"a dog\", \"color\": \"blue\", \"steps\": 3}\n\
                    {\"prompt\": \"x\", \"subject_center\": [[0.5, 0], \"-0.5,0.25\"]}\n";
        let jobs = JobFile::jsonl("j", text).unwrap();
        let imgs = expand(&jobs, &base(), 1000, "2026-01-01").unwrap();
        assert_eq!(imgs.len(), 4);
        assert_eq!(
            imgs.iter().map(|i| i.seed).collect::<Vec<_>>(),
            [100, 101, 1002, 1003]
        );
        assert_eq!(imgs[2].settings.steps, Some(3));
        assert_eq!(imgs[2].settings.color, KeyColor::parse("blue").unwrap());
        assert_eq!(
            imgs[3].settings.subject_center,
            vec![(0.5, 0.0), (-0.5, 0.25)]
        );
        assert_eq!(imgs[1].out, PathBuf::from("00001-a-cat-101.png"));

        let bad = "{\"prompt\": \"a\", \"steps\": 0}\n{\"prompt\": \"b\", \"width\": 100}\n\
                   {\"prompt\": \"c\", \"out\": \"{bogus}.png\"}\n{\"prompt\": \"d\", \"lora\": \"x.safetensors\"}\n\
                   {\"prompt\": \"e\", \"color\": \"nocolour\"}\n";
        let jobs = JobFile::jsonl("j", bad).unwrap();
        let err = expand(&jobs, &base(), 0, "d").unwrap_err().to_string();
        for n in 1..=5 {
            assert!(err.contains(&format!("line {n}:")), "{err}");
        }
        assert!(
            err.contains("line 1: steps must be 1 to 10000, not 0"),
            "{err}"
        );
    }

    #[test]
    fn clashing_paths_are_found() {
        let mut b = base();
        b.out = "same.png".into();
        let jobs = JobFile::prompts("p", "a\nb\n").unwrap();
        let imgs = expand(&jobs, &b, 0, "d").unwrap();
        let targets: Vec<Vec<PathBuf>> = imgs.iter().map(|i| vec![i.out.clone()]).collect();
        let err = check_unique_paths("p", &imgs, &targets)
            .unwrap_err()
            .to_string();
        assert!(err.contains("same.png") && err.contains("line 1") && err.contains("line 2"));
        b.out = "./x/../{seed}.png".into();
        let imgs = expand(&jobs, &b, 0, "d").unwrap();
        let targets: Vec<Vec<PathBuf>> = imgs.iter().map(|i| vec![i.out.clone()]).collect();
        check_unique_paths("p", &imgs, &targets).unwrap();
    }

    #[test]
    fn batches_are_cut_at_the_size_and_at_incompatible_items() {
        let items = [1, 1, 1, 2, 2, 1];
        let cut: Vec<Vec<i32>> = cut_batches(&items, 2, |a, b| a == b)
            .into_iter()
            .map(<[i32]>::to_vec)
            .collect();
        assert_eq!(cut, vec![vec![1, 1], vec![1], vec![2, 2], vec![1]]);
    }
}
