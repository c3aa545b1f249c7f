//! DDIM (diffusers `DDIMScheduler`), configured from `scheduler_config.json`.
//!
//! The noise schedule is computed with the same operations torch uses (a fused-multiply-add
//! linspace, 1 - beta, a cumprod accumulated in f64), so the per-step coefficients match
//! diffusers bit for bit or within an ulp.

use super::ops;
use super::sigmas::{self, ClassDefaults, round_half_even};
use super::{Prediction, SamplerKind, SamplerSettings, StepNoise};
use crate::models::config::SchedulerConfig;
use anyhow::{Result, ensure};
use candle_core::Tensor;

/// DDIM = diffusers `DDIMScheduler` with `eta` from `--eta` (0: deterministic; above 0 each
/// step draws `randn_like(model_output)` after the update, as diffusers' `variance_noise`).
///
/// Reads `timestep_spacing` (default "leading"), `steps_offset`, `prediction_type` (epsilon,
/// v_prediction, sample), `clip_sample` (default **true**) / `clip_sample_range`,
/// `set_alpha_to_one` (default true). No Karras/exponential sigmas (the class has none).
/// Refused: thresholding, rescale_betas_zero_snr. `use_clipped_model_output` is off, as in
/// diffusers' pipelines.
#[derive(Debug, Clone)]
pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    /// The same timesteps as the UNet is called with.
    timesteps_f64: Vec<f64>,
    step_ratio: usize,
    prediction: Prediction,
    clip_sample: Option<f32>,
    eta: f32,
}

impl Ddim {
    pub fn new(
        cfg: &SchedulerConfig,
        settings: &SamplerSettings,
        inference_steps: usize,
    ) -> Result<Self> {
        ensure!(inference_steps > 0, "--steps must be at least 1");
        let n = cfg.num_train_timesteps;
        crate::limits::check_dim("scheduler config: num_train_timesteps", n, 100_000)?;
        ensure!(
            inference_steps <= n,
            "--steps {inference_steps} is more than the scheduler's {n} training timesteps"
        );
        let d = ClassDefaults::of(SamplerKind::Ddim);
        sigmas::check_common(cfg, &d)?;
        let alphas_cumprod = sigmas::alphas_cumprod(cfg, &d)?;
        // diffusers' DDIMScheduler defaults both to true when the config omits them.
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let step_ratio = n / inference_steps;
        let spacing = d.spacing(cfg, settings);
        // np.round of the float schedule (only linspace's is fractional), then int64.
        let timesteps: Vec<usize> =
            sigmas::spaced_timesteps(spacing, n, inference_steps, cfg.steps_offset)?
                .into_iter()
                .map(|v| round_half_even(v).max(0.0) as usize)
                .collect();
        ensure!(
            timesteps.iter().all(|&t| t < n),
            "scheduler config: steps_offset pushes timesteps past {n}"
        );
        let prediction = Prediction::from_config(cfg)?;
        ensure!(
            settings.eta.is_finite() && (0.0..=1.0).contains(&settings.eta),
            "--eta {} is not between 0 and 1",
            settings.eta
        );
        let clip_sample = d.clip_sample(cfg);
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            step_ratio,
            prediction,
            clip_sample,
            eta: settings.eta as f32,
        })
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// One DDIM step: x_t → x_{t-Δ}; with eta > 0 it adds fresh noise (`variance_noise`).
    fn ddim_step(
        &self,
        model_output: &Tensor,
        timestep: usize,
        sample: &Tensor,
        noise: &mut StepNoise,
    ) -> Result<Tensor> {
        let dev = sample.device();
        let prev = timestep as i64 - self.step_ratio as i64;
        let alpha_t = self.alphas_cumprod[timestep];
        let alpha_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        // Scalars as 0-d f32 tensors, so the arithmetic rounds like torch's.
        let s = |v: f32| Tensor::new(v, dev).and_then(|t| t.to_dtype(sample.dtype()));
        let (sqrt_a, sqrt_b) = (s(alpha_t.sqrt())?, s(beta_t.sqrt())?);
        let (pred_x0, pred_eps) = match self.prediction {
            Prediction::Epsilon => {
                let x0 = sample
                    .broadcast_sub(&model_output.broadcast_mul(&sqrt_b)?)?
                    .broadcast_div(&sqrt_a)?;
                (x0, model_output.clone())
            }
            Prediction::VPrediction => {
                let x0 = sample
                    .broadcast_mul(&sqrt_a)?
                    .broadcast_sub(&model_output.broadcast_mul(&sqrt_b)?)?;
                let eps = model_output
                    .broadcast_mul(&sqrt_a)?
                    .broadcast_add(&sample.broadcast_mul(&sqrt_b)?)?;
                (x0, eps)
            }
            Prediction::Sample => {
                let eps = sample
                    .broadcast_sub(&model_output.broadcast_mul(&sqrt_a)?)?
                    .broadcast_div(&sqrt_b)?;
                (model_output.clone(), eps)
            }
        };
        let pred_x0 = match self.clip_sample {
            Some(r) => pred_x0.clamp(-r, r)?,
            None => pred_x0,
        };
        // diffusers' `_get_variance`, times eta squared.
        let variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.eta * variance.sqrt();
        let dir = pred_eps.broadcast_mul(&s((1.0 - alpha_prev - std_dev * std_dev).sqrt())?)?;
        let prev_sample = pred_x0
            .broadcast_mul(&s(alpha_prev.sqrt())?)?
            .broadcast_add(&dir)?;
        if self.eta > 0.0 {
            let z = noise.randn_like(model_output)?;
            return Ok(prev_sample.broadcast_add(&z.broadcast_mul(&s(std_dev)?)?)?);
        }
        Ok(prev_sample)
    }
}

impl super::Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        ops::noised_at_alpha(original, noise, self.alphas_cumprod[self.timesteps[index]])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut StepNoise,
    ) -> Result<Tensor> {
        self.ddim_step(model_output, self.timesteps[index], sample, noise)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Sampler;

    fn ddim(c: &SchedulerConfig, steps: usize) -> Result<Ddim> {
        Ddim::new(c, &SamplerSettings::default(), steps)
    }

    fn sd15() -> SchedulerConfig {
        serde_json::from_value(serde_json::json!({
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1,
            "num_train_timesteps": 1000
        }))
        .unwrap()
    }

    #[test]
    fn sd15_leading_timesteps() {
        let d = ddim(&sd15(), 50).unwrap();
        assert_eq!(d.timesteps.len(), 50);
        assert_eq!(d.timesteps[0], 981);
        assert_eq!(d.timesteps[1], 961);
        assert_eq!(*d.timesteps.last().unwrap(), 1);
    }

    #[test]
    fn trailing_timesteps() {
        let mut c = sd15();
        c.timestep_spacing = Some("trailing".into());
        let d = ddim(&c, 50).unwrap();
        assert_eq!(d.timesteps[0], 999);
        assert_eq!(*d.timesteps.last().unwrap(), 19);
    }

    #[test]
    fn zero_steps_is_an_error() {
        assert!(ddim(&sd15(), 0).is_err());
    }

    #[test]
    fn a_perfect_noise_prediction_lands_on_the_previous_marginal() {
        // With x_t = sqrt(a) x0 + sqrt(1-a) eps and the model predicting eps exactly, DDIM
        // (eta = 0) lands on sqrt(a_prev) x0 + sqrt(1-a_prev) eps.
        let mut d = ddim(&sd15(), 10).unwrap();
        let mut noise = StepNoise::new(Vec::new());
        let dev = candle_core::Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -0.25, 0.1], &dev).unwrap();
        let eps = Tensor::new(&[0.3f32, 1.2, -0.7], &dev).unwrap();
        for (k, t) in d.timesteps.clone().into_iter().enumerate() {
            let a = d.alphas_cumprod[t] as f64;
            let ap = match d.timesteps.get(k + 1) {
                Some(&p) => d.alphas_cumprod[p] as f64,
                None => d.alphas_cumprod[0] as f64,
            };
            let mix =
                |a: f64| ((&x0 * a.sqrt()).unwrap() + (&eps * (1.0 - a).sqrt()).unwrap()).unwrap();
            let out = d.step(&eps, k, &mix(a), &mut noise).unwrap();
            let diff: f32 = (out - mix(ap))
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-5, "step {k}: {diff}");
        }
    }
}
