//! DPM-Solver++ (2M) and its SDE variant: diffusers `DPMSolverMultistepScheduler` with
//! `solver_order=2` and `algorithm_type` "dpmsolver++" or "sde-dpmsolver++".

use super::ops::{self, mul};
use super::sigmas::{self, ClassDefaults, SigmaSpacing, exp32, ln32};
use super::{Prediction, Sampler, SamplerKind, SamplerSettings, StepNoise};
use crate::models::config::SchedulerConfig;
use anyhow::{Result, bail, ensure};
use candle_core::Tensor;

/// The integer timesteps and float32 sigmas (plus the final one) of a multistep solver: shared
/// by DPM-Solver and UniPC, whose `set_timesteps` agree except where `unipc` says.
pub(crate) struct Multistep {
    pub timesteps: Vec<i64>,
    pub sigmas: Vec<f32>,
}

pub(crate) fn multistep_schedule(
    cfg: &SchedulerConfig,
    settings: &SamplerSettings,
    steps: usize,
    kind: SamplerKind,
    unipc: bool,
) -> Result<Multistep> {
    let d = ClassDefaults::of(kind);
    sigmas::check_common(cfg, &d)?;
    sigmas::refuse_flag(cfg.use_flow_sigmas, "use_flow_sigmas", d.class)?;
    sigmas::refuse_flag(cfg.use_dynamic_shifting, "use_dynamic_shifting", d.class)?;
    if !unipc {
        sigmas::refuse_flag(cfg.use_lu_lambdas, "use_lu_lambdas", d.class)?;
    }
    let n = cfg.num_train_timesteps;
    ensure!(
        steps <= n,
        "--steps {steps} is more than the scheduler's {n} training timesteps"
    );
    let spacing = d.spacing(cfg, settings);
    sigmas::check_spacing(spacing)?;
    let spaced = sigmas::sigma_spacing(cfg, settings, d.class)?;
    let ac = sigmas::alphas_cumprod(cfg, &d)?;
    let table = sigmas::sigma_table(&ac);
    // lambda_min_clipped (DPM-Solver only): cut the timesteps whose log-SNR is below it.
    let last = match (unipc, cfg.lambda_min_clipped) {
        (false, Some(min)) if min.is_finite() => {
            let clipped = ac
                .iter()
                .rev()
                .filter(|&&a| {
                    let lambda = ln32(a.sqrt()) - ln32((1.0 - a).sqrt());
                    lambda < min as f32
                })
                .count();
            ensure!(
                clipped < n,
                "scheduler config: lambda_min_clipped {min} removes every timestep"
            );
            n - clipped
        }
        _ => n,
    };
    let mut timesteps = sigmas::multistep_timesteps(spacing, n, last, steps, cfg.steps_offset)?;
    let final_sigma = sigmas::final_sigma(cfg, &table, d.class, true)?;
    let mut sig: Vec<f32> = match spaced {
        SigmaSpacing::Plain => {
            ensure!(
                timesteps.iter().all(|&t| t >= 0),
                "--steps {steps}: negative timesteps"
            );
            timesteps
                .iter()
                .map(|&t| sigmas::np_interp(t as f64, &table) as f32)
                .collect()
        }
        s => {
            let logs = sigmas::log_table(&table);
            let v = sigmas::spaced_sigmas(s, cfg, table[0] as f64, table[n - 1] as f64, steps);
            // Karras timesteps are rounded (DPM: unless squaredcos_cap_v2); exponential ones
            // are truncated by the cast to int64, as diffusers does.
            let round = s == SigmaSpacing::Karras
                && (unipc || cfg.beta_schedule.as_deref() != Some("squaredcos_cap_v2"));
            timesteps = v
                .iter()
                .map(|&x| {
                    let t = sigmas::sigma_to_t(x, &logs);
                    (if round { sigmas::round_half_even(t) } else { t }) as i64
                })
                .collect();
            v.iter().map(|&x| x as f32).collect()
        }
    };
    // UniPC's Karras/exponential "sigma_min" final sigma is the last spaced sigma.
    let last_sigma = match final_sigma {
        None => 0.0,
        Some(_) if unipc && spaced != SigmaSpacing::Plain => sig[sig.len() - 1],
        Some(s) => s,
    };
    sig.push(last_sigma);
    ensure!(
        sig.iter().all(|s| s.is_finite() && *s >= 0.0),
        "scheduler config: the sigmas are not finite"
    );
    Ok(Multistep {
        timesteps,
        sigmas: sig,
    })
}

/// `_sigma_to_alpha_sigma_t`: (alpha_t, sigma_t) = (1 / sqrt(sigma^2 + 1), sigma * alpha_t).
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// log(alpha_t) - log(sigma_t) of a sigma (infinite for sigma 0).
pub(crate) fn lambda(sigma: f32) -> f32 {
    let (a, s) = alpha_sigma(sigma);
    ln32(a) - ln32(s)
}

/// DPM++ 2M = diffusers `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
/// solver_order=2)`; DPM++ 2M SDE = the same with `algorithm_type="sde-dpmsolver++"`, whose
/// noise is `randn_like(model_output)` drawn at every step (before the update, the first and
/// last step too), as diffusers' default (no BrownianTree).
///
/// tkg's kind sets `algorithm_type` and `solver_order` 2 whatever the config says. Reads
/// `timestep_spacing` (default "linspace"), `steps_offset`, `prediction_type` (epsilon,
/// v_prediction, sample), `use_karras_sigmas` / `use_exponential_sigmas` (or `--schedule`),
/// `sigma_min` / `sigma_max`, `final_sigmas_type` ("zero" or "sigma_min"), `solver_type`
/// ("midpoint" or "heun"; "logrho", "bh1", "bh2" mean midpoint, as in diffusers),
/// `lower_order_final`, `euler_at_final` and `lambda_min_clipped`. Refused: thresholding,
/// learned variance, Lu lambdas, flow sigmas, beta sigmas, rescale_betas_zero_snr.
/// The UNet gets integer timesteps (Karras ones rounded, exponential ones truncated, as
/// diffusers casts them); the sigmas keep their exact spacing.
#[derive(Debug, Clone)]
pub struct DpmSolver {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    sde: bool,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    /// The last two converted model outputs (x0 predictions), oldest first.
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DpmSolver {
    pub fn new(
        cfg: &SchedulerConfig,
        settings: &SamplerSettings,
        steps: usize,
        sde: bool,
    ) -> Result<Self> {
        let kind = if sde {
            SamplerKind::DpmPp2mSde
        } else {
            SamplerKind::DpmPp2m
        };
        let prediction = sigmas::prediction(cfg, kind)?;
        if let Some(v) = cfg.variance_type.as_deref() {
            bail!(
                "scheduler config: variance_type {v} is not supported (DPMSolverMultistepScheduler)"
            );
        }
        let heun = match cfg.solver_type.as_deref() {
            None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => false,
            Some("heun") => true,
            Some(other) => bail!("scheduler config: unknown solver_type {other}"),
        };
        let m = multistep_schedule(cfg, settings, steps, kind, false)?;
        Ok(Self {
            timesteps: m.timesteps.iter().map(|&t| t as f64).collect(),
            final_zero: m.sigmas[steps] == 0.0,
            sigmas: m.sigmas,
            prediction,
            sde,
            heun,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            outputs: Vec::new(),
            lower_order_nums: 0,
        })
    }

    /// dpmsolver++'s `convert_model_output`: the x0 prediction.
    fn convert(&self, mo: &Tensor, sample: &Tensor, index: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        Ok(match self.prediction {
            Prediction::Epsilon => ops::div(&(sample - mul(mo, sigma)?)?, alpha)?,
            Prediction::Sample => mo.clone(),
            Prediction::VPrediction => (mul(sample, alpha)? - mul(mo, sigma)?)?,
        })
    }

    fn first_order(
        &self,
        x0: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
        i: usize,
    ) -> Result<Tensor> {
        let (s_t, s_s) = (self.sigmas[i + 1], self.sigmas[i]);
        let (alpha_t, sigma_t) = alpha_sigma(s_t);
        let (_, sigma_s) = alpha_sigma(s_s);
        let h = lambda(s_t) - lambda(s_s);
        match noise {
            None => Ok((mul(sample, sigma_t / sigma_s)? - mul(x0, alpha_t * (exp32(-h) - 1.0))?)?),
            Some(z) => {
                let e2 = exp32(-2.0 * h);
                let a =
                    (mul(sample, sigma_t / sigma_s * exp32(-h))? + mul(x0, alpha_t * (1.0 - e2))?)?;
                Ok((a + mul(z, sigma_t * (1.0 - e2).sqrt())?)?)
            }
        }
    }

    fn second_order(&self, sample: &Tensor, noise: Option<&Tensor>, i: usize) -> Result<Tensor> {
        let (s_t, s0, s1) = (self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1]);
        let (alpha_t, sigma_t) = alpha_sigma(s_t);
        let (_, sigma_s0) = alpha_sigma(s0);
        let (l_t, l0, l1) = (lambda(s_t), lambda(s0), lambda(s1));
        let (m0, m1) = (&self.outputs[1], &self.outputs[0]);
        let (h, h0) = (l_t - l0, l0 - l1);
        let r0 = h0 / h;
        let d0 = m0;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        match noise {
            None => {
                let c = alpha_t * (exp32(-h) - 1.0);
                let a = (mul(sample, sigma_t / sigma_s0)? - mul(d0, c)?)?;
                if self.heun {
                    Ok((a + mul(&d1, alpha_t * ((exp32(-h) - 1.0) / h + 1.0))?)?)
                } else {
                    Ok((a - mul(&d1, 0.5 * c)?)?)
                }
            }
            Some(z) => {
                let e2 = exp32(-2.0 * h);
                let c = alpha_t * (1.0 - e2);
                let a = (mul(sample, sigma_t / sigma_s0 * exp32(-h))? + mul(d0, c)?)?;
                let b = if self.heun {
                    mul(&d1, alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0))?
                } else {
                    mul(&d1, 0.5 * c)?
                };
                Ok(((a + b)? + mul(z, sigma_t * (1.0 - e2).sqrt())?)?)
            }
        }
    }
}

impl Sampler for DpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        Ok((mul(original, alpha)? + mul(noise, sigma)?)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut StepNoise,
    ) -> Result<Tensor> {
        ops::in_f32(model_output, sample, |mo, sample| {
            let n = self.timesteps.len();
            let lower_order_final = index == n - 1
                && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);
            let x0 = self.convert(mo, sample, index)?;
            if self.outputs.len() == 2 {
                self.outputs.remove(0);
            }
            self.outputs.push(x0.clone());
            let z = if self.sde {
                Some(ops::f32(&noise.randn_like(model_output)?)?)
            } else {
                None
            };
            let prev = if self.lower_order_nums < 1 || lower_order_final {
                self.first_order(&x0, sample, z.as_ref(), index)?
            } else {
                self.second_order(sample, z.as_ref(), index)?
            };
            if self.lower_order_nums < 2 {
                self.lower_order_nums += 1;
            }
            Ok(prev)
        })
    }
}
