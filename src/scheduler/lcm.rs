//! LCM: diffusers `LCMScheduler` (latent consistency models, LCM-LoRA).

use super::ops::{self, mul};
use super::sigmas::{self, ClassDefaults};
use super::{Prediction, Sampler, SamplerKind, SamplerSettings, Schedule, StepNoise};
use crate::models::config::SchedulerConfig;
use anyhow::{Result, bail, ensure};
use candle_core::Tensor;

/// LCM = diffusers `LCMScheduler` (strength 1, no custom timesteps).
///
/// The timesteps are its own: `original_inference_steps` (default 50) evenly spaced training
/// timesteps `k - 1, 2k - 1, ..., 999` (k = num_train_timesteps / original_inference_steps),
/// from which `steps` are picked from the top (4 steps: 999, 759, 499, 259; 1 step: 999;
/// 2 steps: 999, 499). `timestep_spacing` and `steps_offset` play no part (diffusers ignores
/// them too), so tkg's `--timestep-spacing` is ignored for LCM and `--schedule` is refused.
/// Reads `timestep_scaling` (default 10), `prediction_type` (epsilon, v_prediction, sample),
/// `clip_sample` / `clip_sample_range` (default off) and the class's beta defaults (scaled_linear 0.00085 - 0.012). Every step but the last draws
/// `randn_like(model_output)` (after the model's denoised estimate); one UNet call per step,
/// and `steps` must not exceed `original_inference_steps`. The pipeline should run LCM with
/// guidance 1 (or LCM's guidance embedding); the sampler does not care.
#[derive(Debug, Clone)]
pub struct Lcm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    timesteps_f64: Vec<f64>,
    prediction: Prediction,
    clip_sample: Option<f32>,
    timestep_scaling: f32,
}

impl Lcm {
    pub fn new(cfg: &SchedulerConfig, settings: &SamplerSettings, steps: usize) -> Result<Self> {
        let kind = SamplerKind::Lcm;
        let d = ClassDefaults::of(kind);
        if settings.schedule != Schedule::Default {
            bail!(
                "--schedule {} is not available for lcm (LCMScheduler has its own timesteps)",
                settings.schedule
            );
        }
        sigmas::check_common(cfg, &d)?;
        let prediction = sigmas::prediction(cfg, kind)?;
        let n = cfg.num_train_timesteps;
        let alphas_cumprod = sigmas::alphas_cumprod(cfg, &d)?;
        let original = cfg.original_inference_steps.unwrap_or(50);
        ensure!(
            (1..=n).contains(&original),
            "scheduler config: original_inference_steps {original} must be 1 to num_train_timesteps {n}"
        );
        ensure!(
            steps <= original,
            "--steps {steps} is more than lcm allows: at most original_inference_steps = {original}"
        );
        let k = n / original;
        // The origin schedule, highest first.
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let timesteps: Vec<usize> = sigmas::np_linspace_ep(0.0, origin.len() as f64, steps, false)
            .into_iter()
            .map(|v| origin[v.floor() as usize])
            .collect();
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(d.set_alpha_to_one) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let scaling = cfg.timestep_scaling.unwrap_or(10.0);
        ensure!(
            scaling.is_finite(),
            "scheduler config: timestep_scaling must be finite"
        );
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            prediction,
            clip_sample: d.clip_sample(cfg),
            timestep_scaling: scaling as f32,
        })
    }

    /// `get_scalings_for_boundary_condition_discrete`: (c_skip, c_out), in float32.
    fn scalings(&self, t: usize) -> (f32, f32) {
        let scaled = t as f32 * self.timestep_scaling;
        let denom = scaled * scaled + 0.25;
        // 0.25 / x is torch's reciprocal(x) * 0.25.
        let c_skip = (1.0 / denom) * 0.25;
        let c_out = scaled / denom.sqrt();
        (c_skip, c_out)
    }
}

impl Sampler for Lcm {
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
        ops::in_f32(model_output, sample, |mo, sample| {
            let t = self.timesteps[index];
            let prev_t = self.timesteps.get(index + 1).copied().unwrap_or(t);
            let alpha_t = self.alphas_cumprod[t];
            // prev_t is never negative here; final_alpha_cumprod is diffusers' fallback for it.
            let alpha_prev = self
                .alphas_cumprod
                .get(prev_t)
                .copied()
                .unwrap_or(self.final_alpha_cumprod);
            let (beta_t, beta_prev) = (1.0 - alpha_t, 1.0 - alpha_prev);
            let (c_skip, c_out) = self.scalings(t);
            let x0 = match self.prediction {
                Prediction::Epsilon => {
                    ops::div(&(sample - mul(mo, beta_t.sqrt())?)?, alpha_t.sqrt())?
                }
                Prediction::Sample => mo.clone(),
                Prediction::VPrediction => {
                    (mul(sample, alpha_t.sqrt())? - mul(mo, beta_t.sqrt())?)?
                }
            };
            let x0 = match self.clip_sample {
                Some(r) => x0.clamp(-r, r)?,
                None => x0,
            };
            let denoised = (mul(&x0, c_out)? + mul(sample, c_skip)?)?;
            let prev = if index + 1 != self.timesteps.len() {
                let z = ops::f32(&noise.randn_like(model_output)?)?;
                (mul(&denoised, alpha_prev.sqrt())? + mul(&z, beta_prev.sqrt())?)?
            } else {
                denoised
            };
            Ok(prev)
        })
    }
}
