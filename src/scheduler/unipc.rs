//! UniPC: diffusers `UniPCMultistepScheduler` (predictor UniP + corrector UniC, B(h) variants).

use super::dpm::{alpha_sigma, lambda, multistep_schedule};
use super::ops::{self, mul};
use super::sigmas::{self, expm1_32};
use super::{Prediction, Sampler, SamplerKind, SamplerSettings, StepNoise};
use crate::models::config::SchedulerConfig;
use anyhow::{Result, bail, ensure};
use candle_core::Tensor;

/// UniPC = diffusers `UniPCMultistepScheduler` on the config as it is (no solver_p).
///
/// Reads `solver_order` (1-3, default 2), `predict_x0` (default true), `solver_type` ("bh1" or
/// "bh2"; "midpoint", "heun", "logrho" mean bh2, as in diffusers), `lower_order_final`,
/// `disable_corrector`, `timestep_spacing` (default "linspace"), `steps_offset`,
/// `prediction_type` (epsilon, v_prediction, sample), `use_karras_sigmas` /
/// `use_exponential_sigmas` (or `--schedule`), `sigma_min` / `sigma_max` and
/// `final_sigmas_type`. Deterministic. Refused: thresholding, flow sigmas, beta sigmas, dynamic
/// shifting, and the combinations for which diffusers itself returns NaN with a final sigma of
/// zero (bh1, predict_x0 false, or lower_order_final false with order > 1).
///
/// Known deviation: the order-3 (and the corrector's order-2) coefficients come from a small
/// linear solve that tkg does by Gaussian elimination in float32, where torch calls LAPACK;
/// they can differ in the last bits.
#[derive(Debug, Clone)]
pub struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    order: usize,
    predict_x0: bool,
    bh2: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// The last `order` converted model outputs, oldest first.
    outputs: Vec<Tensor>,
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
}

impl UniPc {
    pub fn new(cfg: &SchedulerConfig, settings: &SamplerSettings, steps: usize) -> Result<Self> {
        let kind = SamplerKind::UniPc;
        let prediction = sigmas::prediction(cfg, kind)?;
        let order = cfg.solver_order.unwrap_or(2);
        ensure!(
            (1..=3).contains(&order),
            "scheduler config: solver_order {order} is not supported by unipc (1 to 3)"
        );
        let bh2 = match cfg.solver_type.as_deref() {
            None | Some("bh2") | Some("midpoint") | Some("heun") | Some("logrho") => true,
            Some("bh1") => false,
            Some(other) => bail!("scheduler config: unknown solver_type {other}"),
        };
        let predict_x0 = cfg.predict_x0.unwrap_or(true);
        let lower_order_final = cfg.lower_order_final.unwrap_or(true);
        let m = multistep_schedule(cfg, settings, steps, kind, true)?;
        if m.sigmas[steps] == 0.0 {
            if !bh2 {
                bail!(
                    "unipc: solver_type bh1 with final_sigmas_type zero gives NaN in diffusers; use final_sigmas_type sigma_min"
                );
            }
            if !predict_x0 {
                bail!(
                    "unipc: predict_x0 false with final_sigmas_type zero gives NaN in diffusers; use final_sigmas_type sigma_min"
                );
            }
            if !lower_order_final && order > 1 && steps > 1 {
                bail!(
                    "unipc: lower_order_final false with final_sigmas_type zero gives NaN in diffusers"
                );
            }
        }
        Ok(Self {
            timesteps: m.timesteps.iter().map(|&t| t as f64).collect(),
            sigmas: m.sigmas,
            prediction,
            order,
            predict_x0,
            bh2,
            lower_order_final,
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
            outputs: Vec::new(),
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        })
    }

    fn convert(&self, mo: &Tensor, sample: &Tensor, index: usize) -> Result<Tensor> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        Ok(match (self.predict_x0, self.prediction) {
            (true, Prediction::Epsilon) => ops::div(&(sample - mul(mo, sigma)?)?, alpha)?,
            (true, Prediction::Sample) => mo.clone(),
            (true, Prediction::VPrediction) => (mul(sample, alpha)? - mul(mo, sigma)?)?,
            (false, Prediction::Epsilon) => mo.clone(),
            (false, Prediction::Sample) => ops::div(&(sample - mul(mo, alpha)?)?, sigma)?,
            (false, Prediction::VPrediction) => (mul(mo, alpha)? + mul(sample, sigma)?)?,
        })
    }

    /// The B(h) coefficients: (h_phi_1, B_h, R rows, b) for `order` and the ratios `rks`
    /// (the last one is 1).
    fn coefficients(
        &self,
        h: f32,
        rks: &[f32],
        order: usize,
    ) -> (f32, f32, Vec<Vec<f32>>, Vec<f32>) {
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = expm1_32(hh);
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1u64;
        let b_h = if self.bh2 { expm1_32(hh) } else { hh };
        let mut r = Vec::new();
        let mut b = Vec::new();
        for i in 1..=order {
            r.push(rks.iter().map(|&x| powi(x, i - 1)).collect());
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        (h_phi_1, b_h, r, b)
    }

    /// `sum_k rhos[k] * d1s[k]`.
    fn weighted(rhos: &[f32], d1s: &[Tensor]) -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (r, d) in rhos.iter().zip(d1s) {
            let term = mul(d, *r)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc)
    }

    /// `x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0` (or its noise-space form).
    fn base(&self, x: &Tensor, m0: &Tensor, s_t: f32, s_s0: f32, h_phi_1: f32) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(s_t);
        let (alpha_s0, sigma_s0) = alpha_sigma(s_s0);
        Ok(if self.predict_x0 {
            (mul(x, sigma_t / sigma_s0)? - mul(m0, alpha_t * h_phi_1)?)?
        } else {
            (mul(x, alpha_t / alpha_s0)? - mul(m0, sigma_t * h_phi_1)?)?
        })
    }

    /// alpha_t (x0 form) or sigma_t times B_h.
    fn scale_bh(&self, s_t: f32, b_h: f32) -> f32 {
        let (alpha_t, sigma_t) = alpha_sigma(s_t);
        if self.predict_x0 {
            alpha_t * b_h
        } else {
            sigma_t * b_h
        }
    }

    /// UniP: the predictor from the sample at `i` to `i + 1`.
    fn predictor(&self, x: &Tensor, order: usize, i: usize) -> Result<Tensor> {
        let n = self.outputs.len();
        let m0 = &self.outputs[n - 1];
        let (s_t, s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let l0 = lambda(s0);
        let h = lambda(s_t) - l0;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let rk = (lambda(self.sigmas[i - k]) - l0) / h;
            rks.push(rk);
            d1s.push(ops::div(&(&self.outputs[n - 1 - k] - m0)?, rk)?);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, r, b) = self.coefficients(h, &rks, order);
        let x_t_ = self.base(x, m0, s_t, s0, h_phi_1)?;
        if d1s.is_empty() {
            return Ok(x_t_);
        }
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            let k = order - 1;
            let sub: Vec<Vec<f32>> = r[..k].iter().map(|row| row[..k].to_vec()).collect();
            solve(sub, b[..k].to_vec())?
        };
        let pred_res = Self::weighted(&rhos, &d1s)?.expect("order >= 2");
        Ok((x_t_ - mul(&pred_res, self.scale_bh(s_t, b_h))?)?)
    }

    /// UniC: corrects the sample at `i` (predicted from `last` at `i - 1`) with the model
    /// output there.
    fn corrector(&self, model_t: &Tensor, last: &Tensor, order: usize, i: usize) -> Result<Tensor> {
        let n = self.outputs.len();
        let m0 = &self.outputs[n - 1];
        let (s_t, s0) = (self.sigmas[i], self.sigmas[i - 1]);
        let l0 = lambda(s0);
        let h = lambda(s_t) - l0;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let rk = (lambda(self.sigmas[i - (k + 1)]) - l0) / h;
            rks.push(rk);
            d1s.push(ops::div(&(&self.outputs[n - 1 - k] - m0)?, rk)?);
        }
        rks.push(1.0);
        let (h_phi_1, b_h, r, b) = self.coefficients(h, &rks, order);
        let rhos = if order == 1 { vec![0.5] } else { solve(r, b)? };
        let x_t_ = self.base(last, m0, s_t, s0, h_phi_1)?;
        let d1_t = (model_t - m0)?;
        let last_term = mul(&d1_t, rhos[rhos.len() - 1])?;
        let corr = match Self::weighted(&rhos[..rhos.len() - 1], &d1s)? {
            Some(c) => (c + last_term)?,
            None => last_term,
        };
        Ok((x_t_ - mul(&corr, self.scale_bh(s_t, b_h))?)?)
    }
}

/// `torch.pow(x, k)` for the small integer k UniPC uses.
fn powi(x: f32, k: usize) -> f32 {
    match k {
        0 => 1.0,
        1 => x,
        2 => x * x,
        _ => (x as f64).powi(k as i32) as f32,
    }
}

/// `torch.linalg.solve(a, b)` for UniPC's 1x1 to 3x3 systems: LU with partial pivoting in
/// float32 (LAPACK's getrf/getrs order of operations).
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Result<Vec<f32>> {
    let n = b.len();
    for k in 0..n {
        let p = (k..n)
            .max_by(|&i, &j| a[i][k].abs().total_cmp(&a[j][k].abs()))
            .expect("non-empty");
        ensure!(a[p][k] != 0.0, "unipc: singular coefficient system");
        a.swap(k, p);
        b.swap(k, p);
        let inv = 1.0 / a[k][k];
        let pivot = a[k].clone();
        for i in k + 1..n {
            a[i][k] *= inv;
            let l = a[i][k];
            for (x, &p) in a[i][k + 1..].iter_mut().zip(&pivot[k + 1..]) {
                *x -= l * p;
            }
            b[i] -= l * b[k];
        }
    }
    for k in (0..n).rev() {
        b[k] /= a[k][k];
        for i in 0..k {
            b[i] -= b[k] * a[i][k];
        }
    }
    ensure!(
        b.iter().all(|v| v.is_finite()),
        "unipc: non-finite coefficients"
    );
    Ok(b)
}

impl Sampler for UniPc {
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
        _noise: &mut StepNoise,
    ) -> Result<Tensor> {
        ops::in_f32(model_output, sample, |mo, sample| {
            let mut sample = sample.clone();
            let use_corrector = index > 0
                && !self.disable_corrector.contains(&(index - 1))
                && self.last_sample.is_some();
            let converted = self.convert(mo, &sample, index)?;
            if use_corrector {
                let last = self.last_sample.clone().expect("checked");
                sample = self.corrector(&converted, &last, self.this_order, index)?;
            }
            if self.outputs.len() == self.order {
                self.outputs.remove(0);
            }
            self.outputs.push(converted);
            let n = self.timesteps.len();
            let this_order = if self.lower_order_final {
                self.order.min(n - index)
            } else {
                self.order
            };
            self.this_order = this_order.min(self.lower_order_nums + 1);
            self.last_sample = Some(sample.clone());
            let prev = self.predictor(&sample, self.this_order, index)?;
            if self.lower_order_nums < self.order {
                self.lower_order_nums += 1;
            }
            Ok(prev)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::solve;

    #[test]
    fn solves_small_systems() {
        let x = solve(vec![vec![2.0, 1.0], vec![1.0, 3.0]], vec![3.0, 5.0]).unwrap();
        assert!(
            (x[0] - 0.8).abs() < 1e-6 && (x[1] - 1.4).abs() < 1e-6,
            "{x:?}"
        );
        let x = solve(
            vec![
                vec![1.0, 1.0, 1.0],
                vec![-1.0, -0.5, 1.0],
                vec![1.0, 0.25, 1.0],
            ],
            vec![1.0, 0.0, 0.5],
        )
        .unwrap();
        let r = [
            x[0] + x[1] + x[2] - 1.0,
            -x[0] - 0.5 * x[1] + x[2],
            x[0] + 0.25 * x[1] + x[2] - 0.5,
        ];
        assert!(r.iter().all(|v| v.abs() < 1e-6), "{x:?}");
        assert!(solve(vec![vec![0.0]], vec![1.0]).is_err());
    }
}
