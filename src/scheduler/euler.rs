//! The Karras-style discrete samplers: Euler, Euler ancestral and Heun.
//!
//! Each works on the sigma table of the config's betas: the spaced timesteps (float32, can be
//! fractional) are interpolated on it in float64 (np.interp), optionally respaced as Karras or
//! exponential sigmas whose timesteps come back through `_sigma_to_t`, and stored as float32.

use super::ops::{self, mul};
use super::sigmas::{self, ClassDefaults, SigmaSpacing};
use super::{Prediction, Sampler, SamplerKind, SamplerSettings, StepNoise};
use crate::models::config::SchedulerConfig;
use anyhow::{Result, bail, ensure};
use candle_core::Tensor;

/// The spaced schedule of one of these classes: `timesteps[i]` and `sigmas[i]` per UNet call
/// plus the final sigma, `init_noise_sigma`, and what the model predicts. The three samplers
/// share their input scaling and `add_noise` through it.
#[derive(Debug, Clone)]
struct Discrete {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: Prediction,
}

impl Discrete {
    /// `sample / (sigma**2 + 1) ** 0.5` at call `index`.
    fn scale(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        ops::div(
            sample,
            (self.sigmas[index] * self.sigmas[index] + 1.0).sqrt(),
        )
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        ops::noised_at_sigma(original, noise, self.sigmas[index])
    }

    /// The denoised estimate (Karras' `x0`) from the model output at `sigma`, float32.
    fn x0(&self, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
        Ok(match self.prediction {
            Prediction::Epsilon => (sample - mul(model_output, sigma)?)?,
            Prediction::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (mul(model_output, -sigma / s2.sqrt())? + ops::div(sample, s2)?)?
            }
            Prediction::Sample => model_output.clone(),
        })
    }
}

/// What the class reads beyond the shared keys.
struct Options {
    spacing: SigmaSpacing,
    final_sigma: Option<f32>,
    continuous_v: bool,
}

fn discrete(
    cfg: &SchedulerConfig,
    settings: &SamplerSettings,
    steps: usize,
    kind: SamplerKind,
    options: impl FnOnce(&[f32], &ClassDefaults, Prediction) -> Result<Options>,
) -> Result<Discrete> {
    let prediction = sigmas::prediction(cfg, kind)?;
    let d = ClassDefaults::of(kind);
    sigmas::check_common(cfg, &d)?;
    let n = cfg.num_train_timesteps;
    ensure!(
        steps <= n,
        "--steps {steps} is more than the scheduler's {n} training timesteps"
    );
    let spacing = d.spacing(cfg, settings);
    sigmas::check_spacing(spacing)?;
    let ac = sigmas::alphas_cumprod(cfg, &d)?;
    let table = sigmas::sigma_table(&ac);
    let opts = options(&table, &d, prediction)?;
    let t32 = sigmas::float_timesteps(spacing, n, steps, cfg.steps_offset)?;
    let plain: Vec<f64> = t32
        .iter()
        .map(|&t| sigmas::np_interp(t as f64, &table))
        .collect();
    let (sig, ts): (Vec<f64>, Vec<f32>) = match opts.spacing {
        SigmaSpacing::Plain => (plain, t32),
        s => {
            let logs = sigmas::log_table(&table);
            let sig = sigmas::spaced_sigmas(s, cfg, plain[plain.len() - 1], plain[0], steps);
            let ts = sig
                .iter()
                .map(|&v| sigmas::sigma_to_t(v, &logs) as f32)
                .collect();
            (sig, ts)
        }
    };
    let mut sigmas: Vec<f32> = sig.iter().map(|&v| v as f32).collect();
    sigmas.push(opts.final_sigma.unwrap_or(0.0));
    ensure!(
        sigmas.iter().all(|s| s.is_finite() && *s >= 0.0),
        "scheduler config: the sigmas are not finite"
    );
    let timesteps = if opts.continuous_v {
        sigmas[..steps]
            .iter()
            .map(|&s| 0.25f32 * sigmas::ln32(s))
            .collect()
    } else {
        ts
    };
    let max = sigmas.iter().cloned().fold(0.0f32, f32::max);
    let init_noise_sigma = match spacing {
        "linspace" | "trailing" => max,
        _ => (max * max + 1.0).sqrt(),
    };
    Ok(Discrete {
        timesteps: timesteps.iter().map(|&t| t as f64).collect(),
        sigmas,
        init_noise_sigma,
        prediction,
    })
}

/// Euler = diffusers `EulerDiscreteScheduler` (s_churn 0, so deterministic).
///
/// Reads `timestep_spacing` (default "linspace"), `steps_offset`, `prediction_type` (epsilon,
/// v_prediction, sample), `interpolation_type` ("linear" only; "log_linear" is refused),
/// `use_karras_sigmas` / `use_exponential_sigmas` (or `--schedule`), `sigma_min` / `sigma_max`,
/// `final_sigmas_type` ("zero" or "sigma_min") and `timestep_type` ("continuous" with
/// v_prediction gives the UNet `0.25 * ln(sigma)`). One UNet call per step; the timesteps are
/// fractional with linspace spacing and with Karras/exponential sigmas.
#[derive(Debug, Clone)]
pub struct Euler {
    d: Discrete,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, settings: &SamplerSettings, steps: usize) -> Result<Self> {
        let d = discrete(cfg, settings, steps, SamplerKind::Euler, |table, d, p| {
            match cfg.interpolation_type.as_deref() {
                None | Some("linear") => {}
                Some(other) => {
                    bail!("scheduler config: interpolation_type {other} is not supported (euler)")
                }
            }
            let continuous_v = match cfg.timestep_type.as_deref() {
                None | Some("discrete") => false,
                Some("continuous") => p == Prediction::VPrediction,
                Some(other) => bail!("scheduler config: unknown timestep_type {other}"),
            };
            Ok(Options {
                spacing: sigmas::sigma_spacing(cfg, settings, d.class)?,
                final_sigma: sigmas::final_sigma(cfg, table, d.class, true)?,
                continuous_v,
            })
        })?;
        Ok(Self { d })
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.d.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.d.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.d.scale(sample, index)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.d.add_noise(original, noise, index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut StepNoise,
    ) -> Result<Tensor> {
        ops::in_f32(model_output, sample, |mo, sample| {
            let sigma = self.d.sigmas[index];
            let x0 = self.d.x0(mo, sample, sigma)?;
            let derivative = ops::div(&(sample - x0)?, sigma)?;
            let dt = self.d.sigmas[index + 1] - sigma;
            Ok((sample + mul(&derivative, dt)?)?)
        })
    }
}

/// Euler ancestral = diffusers `EulerAncestralDiscreteScheduler`.
///
/// Reads `timestep_spacing` (default "linspace"), `steps_offset` and `prediction_type`
/// (epsilon, v_prediction; diffusers does not implement sample). The class has no Karras or
/// exponential sigmas and no `final_sigmas_type`, so `--schedule karras|exponential` is refused.
/// Every step (the last too) draws `randn_like(model_output)` after the Euler step and adds it
/// times `sigma_up`.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    d: Discrete,
}

impl EulerAncestral {
    pub fn new(cfg: &SchedulerConfig, settings: &SamplerSettings, steps: usize) -> Result<Self> {
        if settings.schedule != super::Schedule::Default {
            bail!(
                "--schedule {} is not available for euler-a (diffusers' EulerAncestralDiscreteScheduler has only its default sigmas)",
                settings.schedule
            );
        }
        let d = discrete(
            cfg,
            settings,
            steps,
            SamplerKind::EulerAncestral,
            |_, _, _| {
                Ok(Options {
                    spacing: SigmaSpacing::Plain,
                    final_sigma: None,
                    continuous_v: false,
                })
            },
        )?;
        Ok(Self { d })
    }
}

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.d.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.d.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.d.scale(sample, index)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.d.add_noise(original, noise, index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut StepNoise,
    ) -> Result<Tensor> {
        ops::in_f32(model_output, sample, |mo, sample| {
            let sigma = self.d.sigmas[index];
            let x0 = self.d.x0(mo, sample, sigma)?;
            let (from, to) = (sigma, self.d.sigmas[index + 1]);
            let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
            let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
            let derivative = ops::div(&(sample - x0)?, sigma)?;
            let prev = (sample + mul(&derivative, sigma_down - sigma)?)?;
            let z = noise.randn_like(model_output)?;
            Ok((prev + mul(&ops::f32(&z)?, sigma_up)?)?)
        })
    }
}

/// Heun = diffusers `HeunDiscreteScheduler` (second order, two UNet calls per step).
///
/// With `steps` inference steps it makes `2 * steps - 1` UNet calls: [`Sampler::timesteps`]
/// holds `t0, t1, t1, t2, t2, ..., t(n-1), t(n-1)`; call 0 is an Euler step, each odd call is
/// the correction of the step before it, and the last call is a plain Euler step to sigma 0.
/// Reads `timestep_spacing` (default "linspace"), `steps_offset`, `prediction_type` (epsilon,
/// v_prediction, sample), `use_karras_sigmas` / `use_exponential_sigmas` (or `--schedule`),
/// `sigma_min` / `sigma_max`, `clip_sample` / `clip_sample_range` (default off) and the class's
/// own beta defaults (0.00085 - 0.012, linear). `final_sigmas_type` does not exist for it.
#[derive(Debug, Clone)]
pub struct Heun {
    /// Per UNet call: t0, t1, t1, ..., t(n-1), t(n-1), and sigmas interleaved like
    /// diffusers': s0, s1, s1, ..., s(n-1), s(n-1), 0.
    d: Discrete,
    clip_sample: Option<f32>,
    /// The first-order derivative, dt and sample while a correction is pending.
    pending: Option<(Tensor, f32, Tensor)>,
}

impl Heun {
    pub fn new(cfg: &SchedulerConfig, settings: &SamplerSettings, steps: usize) -> Result<Self> {
        let kind = SamplerKind::Heun;
        let mut d = discrete(cfg, settings, steps, kind, |_, d, _| {
            Ok(Options {
                spacing: sigmas::sigma_spacing(cfg, settings, d.class)?,
                final_sigma: None,
                continuous_v: false,
            })
        })?;
        let mut sig = vec![d.sigmas[0]];
        for &s in &d.sigmas[1..steps] {
            sig.extend([s, s]);
        }
        sig.push(d.sigmas[steps]);
        let mut ts = vec![d.timesteps[0]];
        for &t in &d.timesteps[1..] {
            ts.extend([t, t]);
        }
        (d.sigmas, d.timesteps) = (sig, ts);
        Ok(Self {
            d,
            clip_sample: ClassDefaults::of(kind).clip_sample(cfg),
            pending: None,
        })
    }
}

impl Sampler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.d.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f64 {
        self.d.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        self.d.scale(sample, index)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.d.add_noise(original, noise, index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut StepNoise,
    ) -> Result<Tensor> {
        ops::in_f32(model_output, sample, |mo, sample| {
            let sigmas = &self.d.sigmas;
            let first = self.pending.is_none();
            let (sigma, next) = if first {
                (sigmas[index], sigmas[index + 1])
            } else {
                (sigmas[index - 1], sigmas[index])
            };
            let sigma_input = if first { sigma } else { next };
            let x0 = self.d.x0(mo, sample, sigma_input)?;
            let x0 = match self.clip_sample {
                Some(r) => x0.clamp(-r, r)?,
                None => x0,
            };
            Ok(match self.pending.take() {
                None => {
                    let derivative = ops::div(&(sample - x0)?, sigma)?;
                    let dt = next - sigma;
                    let prev = (sample + mul(&derivative, dt)?)?;
                    self.pending = Some((derivative, dt, sample.clone()));
                    prev
                }
                Some((d1, dt, s0)) => {
                    let d2 = ops::div(&(sample - x0)?, next)?;
                    let derivative = ops::div(&(d1 + d2)?, 2.0)?;
                    (s0 + mul(&derivative, dt)?)?
                }
            })
        })
    }
}
