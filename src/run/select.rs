//! Choosing among tries by keyability: `best_of` seeds, retries below `min_keyability`, and
//! the key colour of `--color auto` from a cheap preview of each candidate.

use super::plan::ImageJob;
use super::record::KeyResult;
use crate::pipeline::{Generated, Request};
use serde::Serialize;

/// The steps a colour preview denoises (fewer when the image itself takes fewer).
pub const PREVIEW_STEPS: usize = 8;

/// One made and keyed try of an image.
pub struct Candidate {
    /// 0 for the image's own seed.
    pub try_index: usize,
    /// The image as this try made it: its seed (and colour).
    pub job: ImageJob,
    pub req: Request,
    pub generated: Generated,
    pub key: KeyResult,
}

impl Candidate {
    pub fn score(&self) -> f32 {
        self.key.report.score
    }

    /// What the manifest records of this try.
    pub fn record(&self, paths: Vec<String>) -> TryRecord {
        TryRecord {
            try_index: self.try_index,
            seed: self.job.seed,
            score: self.score(),
            paths,
        }
    }
}

/// A try as the manifest records it.
#[derive(Debug, Clone, Serialize)]
pub struct TryRecord {
    #[serde(rename = "try")]
    pub try_index: usize,
    pub seed: u64,
    pub score: f32,
    /// Its files under `--keep all`.
    pub paths: Vec<String>,
}

/// A candidate key colour's preview score.
#[derive(Debug, Clone, Serialize)]
pub struct ColorPreview {
    pub color: String,
    pub score: f32,
}

/// Whether `img` takes another try after `made` tries whose best scored `best`: it makes
/// every one of its `best_of`, then retries while `min_keyability` is not reached.
pub fn wants_another(img: &ImageJob, made: usize, best: f32) -> bool {
    let s = &img.settings;
    if made >= img.max_tries() {
        return false;
    }
    made < s.best_of || s.min_keyability.is_some_and(|m| (best as f64) < m)
}

/// Whether `img` chooses among tries or colours at all.
pub fn selects(img: &ImageJob) -> bool {
    img.max_tries() > 1 || !img.settings.auto_colors.is_empty()
}

/// `req` as a colour preview: at most [`PREVIEW_STEPS`] steps of the same sampler, decoded
/// through the latent-to-RGB factors instead of the VAE.
pub fn preview_request(req: &Request) -> Request {
    let mut r = req.clone();
    r.sampling.steps = r.sampling.steps.min(PREVIEW_STEPS);
    r.preview = true;
    r
}

/// The index of the highest score; the earliest on a tie.
pub fn best_index(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn job(best_of: usize, retries: usize, min: Option<f64>) -> ImageJob {
        ImageJob {
            index: 0,
            line: 0,
            image: 0,
            seed: 10,
            settings: Settings {
                best_of,
                retries,
                min_keyability: min,
                num_images: 3,
                ..Settings::default()
            },
            out: "x.png".into(),
            save_latents: None,
        }
    }

    #[test]
    fn best_of_makes_every_try_and_retries_stop_at_the_bar() {
        let j = job(3, 0, None);
        assert!(wants_another(&j, 1, 100.0) && wants_another(&j, 2, 100.0));
        assert!(!wants_another(&j, 3, 0.0));
        let r = job(1, 2, Some(50.0));
        assert!(!wants_another(&r, 1, 50.0), "the bar is met");
        assert!(wants_another(&r, 1, 49.9) && wants_another(&r, 2, 10.0));
        assert!(!wants_another(&r, 3, 10.0), "retries are spent");
    }

    #[test]
    fn tries_step_over_the_jobs_other_images() {
        let j = job(4, 0, None);
        let seeds: Vec<u64> = (0..4).map(|t| j.try_seed(t).unwrap()).collect();
        assert_eq!(seeds, [10, 13, 16, 19]);
        let mut far = job(2, 0, None);
        far.seed = u64::MAX;
        assert_eq!(far.try_seed(1), None);
    }

    #[test]
    fn the_best_is_the_highest_and_the_first_on_a_tie() {
        assert_eq!(best_index(&[3.0, 7.0, 7.0, 1.0]), 1);
        assert_eq!(best_index(&[5.0]), 0);
    }
}
