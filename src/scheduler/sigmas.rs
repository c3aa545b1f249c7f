//! What the diffusers schedulers share: the beta schedule and its cumulative alphas, the sigma
//! table, the timestep spacings, Karras / exponential sigma spacing, and the sigma-to-timestep
//! interpolation, each with the arithmetic diffusers uses for it (torch float32 for the tables,
//! numpy float64 for the spacings and interpolation, then a cast to float32).
//!
//! Known deviation: torch computes `sqrt`, `exp` and `log` of float32 tensors with MKL's VML
//! (accurate to about 0.75 ulp, not correctly rounded), and numpy its float32 `log` with its own
//! SIMD code; tkg rounds the exact value instead. Those values can differ by one ulp (about
//! 6e-8 relative), which moves a 20-step trajectory by about 1e-7 relative.

use super::{Prediction, SamplerKind, SamplerSettings, Schedule, Spacing};
use crate::models::config::SchedulerConfig;
use anyhow::{Result, bail, ensure};

/// The `__init__` defaults of one diffusers scheduler class, for the keys whose default
/// differs between classes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClassDefaults {
    pub class: &'static str,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: &'static str,
    pub spacing: &'static str,
    pub clip_sample: bool,
    pub set_alpha_to_one: bool,
}

impl ClassDefaults {
    pub fn of(kind: SamplerKind) -> Self {
        let base = ClassDefaults {
            class: "",
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear",
            spacing: "linspace",
            clip_sample: false,
            set_alpha_to_one: true,
        };
        match kind {
            SamplerKind::Ddim => ClassDefaults {
                class: "DDIMScheduler",
                spacing: "leading",
                clip_sample: true,
                ..base
            },
            SamplerKind::Euler => ClassDefaults {
                class: "EulerDiscreteScheduler",
                ..base
            },
            SamplerKind::EulerAncestral => ClassDefaults {
                class: "EulerAncestralDiscreteScheduler",
                ..base
            },
            SamplerKind::Heun => ClassDefaults {
                class: "HeunDiscreteScheduler",
                beta_start: 0.00085,
                beta_end: 0.012,
                ..base
            },
            SamplerKind::DpmPp2m | SamplerKind::DpmPp2mSde => ClassDefaults {
                class: "DPMSolverMultistepScheduler",
                ..base
            },
            SamplerKind::UniPc => ClassDefaults {
                class: "UniPCMultistepScheduler",
                ..base
            },
            SamplerKind::Lcm => ClassDefaults {
                class: "LCMScheduler",
                beta_start: 0.00085,
                beta_end: 0.012,
                beta_schedule: "scaled_linear",
                spacing: "leading",
                ..base
            },
        }
    }

    /// The spacing in effect: tkg's `--timestep-spacing`, else the config's, else the class's.
    pub fn spacing<'a>(&self, cfg: &'a SchedulerConfig, settings: &SamplerSettings) -> &'a str {
        match settings.spacing {
            Some(s) => s.name(),
            None => cfg.timestep_spacing.as_deref().unwrap_or(self.spacing),
        }
    }

    pub fn clip_sample(&self, cfg: &SchedulerConfig) -> Option<f32> {
        cfg.clip_sample
            .unwrap_or(self.clip_sample)
            .then_some(cfg.clip_sample_range.unwrap_or(1.0) as f32)
    }
}

/// Refusals every sampler shares (options tkg does not implement).
pub(crate) fn check_common(cfg: &SchedulerConfig, d: &ClassDefaults) -> Result<()> {
    if cfg.thresholding {
        bail!(
            "scheduler config: thresholding is not supported ({})",
            d.class
        );
    }
    if cfg.rescale_betas_zero_snr {
        bail!(
            "scheduler config: rescale_betas_zero_snr is not supported ({})",
            d.class
        );
    }
    Ok(())
}

/// The prediction type, refusing the ones the class cannot serve.
pub(crate) fn prediction(cfg: &SchedulerConfig, kind: SamplerKind) -> Result<Prediction> {
    let p = Prediction::from_config(cfg)?;
    if p == Prediction::Sample && kind == SamplerKind::EulerAncestral {
        bail!(
            "sampler euler-a cannot serve prediction_type sample (diffusers does not implement it)"
        );
    }
    Ok(p)
}

/// torch.linspace(start, end, steps, dtype=float32) on the CPU: step in f32, then a fused
/// multiply-add from the nearer end.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if steps == 1 {
        return vec![s];
    }
    let step = (e - s) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((steps - i - 1) as f32, e)
            }
        })
        .collect()
}

/// `alphas_cumprod` as the classes build it: float32 betas, `1 - beta`, and torch's cumprod,
/// which accumulates in float64 and stores float32.
pub(crate) fn alphas_cumprod(cfg: &SchedulerConfig, d: &ClassDefaults) -> Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    ensure!(
        n >= 2,
        "scheduler config: num_train_timesteps {n} is too small"
    );
    crate::limits::check_dim("scheduler config: num_train_timesteps", n, 100_000)?;
    let start = cfg.beta_start.unwrap_or(d.beta_start);
    let end = cfg.beta_end.unwrap_or(d.beta_end);
    let schedule = cfg.beta_schedule.as_deref().unwrap_or(d.beta_schedule);
    let betas: Vec<f32> = match (&cfg.trained_betas, schedule) {
        (Some(b), _) => b.iter().map(|&v| v as f32).collect(),
        (None, "linear") => torch_linspace_f32(start, end, n),
        (None, "scaled_linear") => torch_linspace_f32(start.sqrt(), end.sqrt(), n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        (None, "squaredcos_cap_v2") => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
        (None, other) => bail!(
            "scheduler config: unsupported beta_schedule {other} ({})",
            d.class
        ),
    };
    ensure!(
        betas.len() == n,
        "scheduler config: trained_betas has {} values, not num_train_timesteps {n}",
        betas.len()
    );
    let mut acc = 1.0f64;
    let out: Vec<f32> = betas
        .iter()
        .map(|&b| {
            acc *= (1.0 - b) as f64;
            acc as f32
        })
        .collect();
    ensure!(
        out.iter().all(|a| a.is_finite() && *a > 0.0),
        "scheduler config: the betas give a non-positive alphas_cumprod"
    );
    Ok(out)
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in float32, ascending in t.
pub(crate) fn sigma_table(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// float32 log rounded from the exact value (numpy / torch: within an ulp of it).
pub(crate) fn ln32(x: f32) -> f32 {
    (x as f64).ln() as f32
}
pub(crate) fn exp32(x: f32) -> f32 {
    (x as f64).exp() as f32
}
pub(crate) fn expm1_32(x: f32) -> f32 {
    (x as f64).exp_m1() as f32
}

/// numpy's round (half to even).
pub(crate) fn round_half_even(v: f64) -> f64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - v.signum()
    } else {
        r
    }
}

/// np.linspace(start, stop, num) in float64 (endpoint included and exact).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    np_linspace_ep(start, stop, num, true)
}

pub(crate) fn np_linspace_ep(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = if endpoint { num - 1 } else { num };
    if div == 0 {
        return vec![start];
    }
    let step = (stop - start) / div as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// np.arange(start, stop, step) in float64: `ceil((stop - start) / step)` values
/// `start + i * ((start + step) - start)`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len as usize)
        .map(|i| start + i as f64 * delta)
        .collect()
}

/// np.interp(x, arange(len(table)), table) for a float32 table, in float64.
pub(crate) fn np_interp(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return table[0] as f64;
    }
    if x >= last as f64 {
        return table[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return table[j] as f64;
    }
    let (y0, y1) = (table[j] as f64, table[j + 1] as f64);
    let slope = (y1 - y0) / 1.0;
    slope * (x - j as f64) + y0
}

/// The timesteps of DDIM, Euler, Euler ancestral and Heun for `spacing`, in float64:
/// leading and trailing ones are whole numbers, linspace ones are not (Euler and Heun keep
/// them as float32, DDIM rounds them).
pub(crate) fn spaced_timesteps(
    spacing: &str,
    n: usize,
    steps: usize,
    offset: usize,
) -> Result<Vec<f64>> {
    let t: Vec<f64> = match spacing {
        "linspace" => np_linspace(0.0, (n - 1) as f64, steps)
            .into_iter()
            .rev()
            .collect(),
        "leading" => {
            let ratio = n / steps;
            ensure!(
                ratio >= 1,
                "--steps {steps} is more than leading spacing allows ({n} training timesteps)"
            );
            (0..steps)
                .rev()
                .map(|i| (i * ratio + offset) as f64)
                .collect()
        }
        "trailing" => np_arange(n as f64, 0.0, -(n as f64 / steps as f64))
            .into_iter()
            .map(|v| round_half_even(v) - 1.0)
            .collect(),
        other => bail!("scheduler config: unsupported timestep_spacing {other}"),
    };
    ensure!(
        t.len() == steps,
        "--steps {steps}: {spacing} spacing gives {} timesteps",
        t.len()
    );
    Ok(t)
}

/// [`spaced_timesteps`] as float32, as Euler, Euler ancestral and Heun hold them.
pub(crate) fn float_timesteps(
    spacing: &str,
    n: usize,
    steps: usize,
    offset: usize,
) -> Result<Vec<f32>> {
    Ok(spaced_timesteps(spacing, n, steps, offset)?
        .into_iter()
        .map(|v| v as f32)
        .collect())
}

/// The integer timesteps of DPM-Solver and UniPC (`last` = the last training timestep + 1
/// after `lambda_min_clipped`).
pub(crate) fn multistep_timesteps(
    spacing: &str,
    n: usize,
    last: usize,
    steps: usize,
    offset: usize,
) -> Result<Vec<i64>> {
    let t: Vec<i64> = match spacing {
        "linspace" => {
            let v = np_linspace(0.0, last as f64 - 1.0, steps + 1);
            v[1..]
                .iter()
                .rev()
                .map(|&x| round_half_even(x) as i64)
                .collect()
        }
        "leading" => {
            let ratio = last / (steps + 1);
            ensure!(
                ratio >= 1,
                "--steps {steps} is more than leading spacing allows ({last} training timesteps)"
            );
            (1..=steps)
                .rev()
                .map(|i| (i * ratio + offset) as i64)
                .collect()
        }
        "trailing" => np_arange(last as f64, 0.0, -(n as f64 / steps as f64))
            .into_iter()
            .map(|v| round_half_even(v) as i64 - 1)
            .collect(),
        other => bail!("scheduler config: unsupported timestep_spacing {other}"),
    };
    ensure!(
        t.len() == steps,
        "--steps {steps}: {spacing} spacing gives {} timesteps",
        t.len()
    );
    Ok(t)
}

/// How the sigmas of the chosen steps are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SigmaSpacing {
    /// The table's sigmas at the spaced timesteps.
    Plain,
    Karras,
    Exponential,
}

/// `--schedule` on top of the config: `default` keeps the config's `use_karras_sigmas` /
/// `use_exponential_sigmas`; `karras` and `exponential` set that flag and clear the others.
pub(crate) fn sigma_spacing(
    cfg: &SchedulerConfig,
    settings: &SamplerSettings,
    class: &str,
) -> Result<SigmaSpacing> {
    match settings.schedule {
        Schedule::Karras => return Ok(SigmaSpacing::Karras),
        Schedule::Exponential => return Ok(SigmaSpacing::Exponential),
        Schedule::Default => {}
    }
    let k = cfg.use_karras_sigmas.unwrap_or(false);
    let e = cfg.use_exponential_sigmas.unwrap_or(false);
    let b = cfg.use_beta_sigmas.unwrap_or(false);
    if [k, e, b].iter().filter(|&&x| x).count() > 1 {
        bail!(
            "scheduler config: only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set"
        );
    }
    if b {
        bail!("scheduler config: use_beta_sigmas is not supported ({class})");
    }
    Ok(if k {
        SigmaSpacing::Karras
    } else if e {
        SigmaSpacing::Exponential
    } else {
        SigmaSpacing::Plain
    })
}

/// Karras et al. (2022) sigmas, rho 7, in float64 as numpy computes them.
pub(crate) fn karras(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `exp(linspace(log(sigma_max), log(sigma_min), steps))` in float64.
pub(crate) fn exponential(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), steps)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// The sigmas of `spacing` between `sigma_min` and `sigma_max` (the config's, when it has
/// them: diffusers reads `config.sigma_min` / `sigma_max` of any class when the file sets them).
pub(crate) fn spaced_sigmas(
    spacing: SigmaSpacing,
    cfg: &SchedulerConfig,
    lo: f64,
    hi: f64,
    steps: usize,
) -> Vec<f64> {
    let lo = cfg.sigma_min.unwrap_or(lo);
    let hi = cfg.sigma_max.unwrap_or(hi);
    match spacing {
        SigmaSpacing::Karras => karras(lo, hi, steps),
        SigmaSpacing::Exponential => exponential(lo, hi, steps),
        SigmaSpacing::Plain => unreachable!("plain sigmas are not spaced"),
    }
}

/// diffusers' `_sigma_to_t`: the fractional timestep of `sigma` on the log-sigma table.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log sigma is <= log_sigma (0 if none), at most len - 2.
    let mut low = 0usize;
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(log_sigmas.len() - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `np.log(sigma_table)` in float32.
pub(crate) fn log_table(table: &[f32]) -> Vec<f32> {
    table.iter().map(|&s| ln32(s)).collect()
}

/// The sigma `final_sigmas_type = "sigma_min"` appends: the table's first sigma, computed in
/// float32 like the table.
pub(crate) fn final_sigma(
    cfg: &SchedulerConfig,
    table: &[f32],
    class: &str,
    allowed: bool,
) -> Result<Option<f32>> {
    match cfg.final_sigmas_type.as_deref() {
        None | Some("zero") => Ok(None),
        Some("sigma_min") if allowed => Ok(Some(table[0])),
        Some(other) => {
            bail!("scheduler config: final_sigmas_type {other} is not supported ({class})")
        }
    }
}

/// Refuses a spacing name tkg does not know, before anything else.
pub(crate) fn check_spacing(name: &str) -> Result<()> {
    match name {
        "leading" | "trailing" | "linspace" => Ok(()),
        other => bail!(
            "scheduler config: unsupported timestep_spacing {other} (use {}, {} or {})",
            Spacing::Leading,
            Spacing::Trailing,
            Spacing::Linspace
        ),
    }
}

/// Refuses an option the config switches on that tkg does not implement.
pub(crate) fn refuse_flag(flag: Option<bool>, key: &str, class: &str) -> Result<()> {
    if flag.unwrap_or(false) {
        bail!("scheduler config: {key} is not supported ({class})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 1.0, 7)[6], 1.0);
        assert_eq!(np_linspace(3.0, 9.0, 1), vec![3.0]);
        assert_eq!(np_arange(1000.0, 0.0, -50.0).len(), 20);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(-2.5), -2.0);
        let t = [1.0f32, 3.0, 7.0];
        assert_eq!(np_interp(0.5, &t), 2.0);
        assert_eq!(np_interp(1.0, &t), 3.0);
        assert_eq!(np_interp(5.0, &t), 7.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let table: Vec<f32> = (1..=100).map(|i| i as f32 * 0.1).collect();
        let logs = log_table(&table);
        for i in [0usize, 7, 50, 99] {
            let t = sigma_to_t(table[i] as f64, &logs);
            assert!((t - i as f64).abs() < 1e-5, "{i}: {t}");
        }
        // Outside the table it clamps.
        assert_eq!(sigma_to_t(0.001, &logs), 0.0);
        assert_eq!(sigma_to_t(1e3, &logs), 99.0);
    }
}
