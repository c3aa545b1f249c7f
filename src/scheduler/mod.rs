//! Samplers: one interface ([`Sampler`]) for diffusers' schedulers, each configured from the
//! model's `scheduler_config.json` plus the user's [`SamplerSettings`].
//!
//! The denoise loop is the same for every sampler (diffusers' pipelines):
//! `latents = init * init_noise_sigma`, then for each index `i` of [`Sampler::timesteps`]:
//! scale the input, call the UNet at `timesteps()[i]`, apply CFG, and [`Sampler::step`].
//! Stochastic samplers draw their per-step noise from [`StepNoise`], the continuation of the
//! generators that drew the initial latents.

mod ddim;
mod dpm;
mod euler;
mod lcm;
mod ops;
mod sigmas;
#[cfg(test)]
mod tests;
mod unipc;

pub use ddim::Ddim;
pub use dpm::DpmSolver;
pub use euler::{Euler, EulerAncestral, Heun};
pub use lcm::Lcm;
pub use unipc::UniPc;

pub use crate::sampling::{SamplerKind, SamplerSettings, Schedule, Spacing};

use crate::models::config::SchedulerConfig;
use crate::rng::Generator;
use anyhow::{Result, bail, ensure};
use candle_core::Tensor;

/// What a model's UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        match cfg.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            "sample" => Ok(Prediction::Sample),
            other => bail!("scheduler config: unsupported prediction_type {other}"),
        }
    }
}

/// One diffusers scheduler, set for a number of inference steps.
pub trait Sampler: Send {
    /// The timestep of each UNet call, in order (Heun calls twice per step but the last).
    fn timesteps(&self) -> &[f64];
    /// UNet calls per step (diffusers' `order`; Heun's is 2): img2img truncates the
    /// schedule by whole steps, so it starts at call `order * skipped steps`.
    fn order(&self) -> usize {
        1
    }
    /// What the initial latents are multiplied by.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The UNet input at call `index` (diffusers' `scale_model_input`).
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// Clean latents noised to the level call `index` starts from (diffusers' `add_noise`
    /// with `begin_index` set: img2img's start, inpainting's known region after a step).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;
    /// The latents after call `index`, from the guided model output.
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut StepNoise,
    ) -> Result<Tensor>;
}

/// Which call an image-to-image run starts at, as diffusers' `get_timesteps`: `strength` of
/// the `steps` inference steps run (rounded down), the first ones skipped. An error when no
/// step would run.
pub fn first_call(sampler: &dyn Sampler, steps: usize, strength: f64) -> Result<usize> {
    ensure!(
        strength.is_finite() && strength > 0.0 && strength <= 1.0,
        "--strength {strength} is not in (0, 1]"
    );
    // Python's int(steps * strength): a float64 product, truncated.
    let run = ((steps as f64 * strength) as usize).min(steps);
    ensure!(
        run > 0,
        "--strength {strength} with --steps {steps} runs no denoising step; raise either"
    );
    Ok((steps - run) * sampler.order())
}

/// The sampler `settings` ask for, on `cfg`, for `steps` inference steps. Every check that
/// can fail (prediction type, step count, config values, schedule) runs here, before any UNet
/// call.
///
/// Each sampler equals one diffusers class built with `Class.from_config(cfg)`: keys the config
/// lacks take that class's defaults (see [`SchedulerConfig`]). `--schedule default` keeps the
/// config's `use_karras_sigmas` / `use_exponential_sigmas`; `karras` / `exponential` set one and
/// clear the other. `--timestep-spacing` replaces the config's `timestep_spacing` (LCM has its
/// own timesteps and ignores it, as diffusers does).
///
/// | sampler | class | schedules | UNet calls | noise per step |
/// |---|---|---|---|---|
/// | ddim | DDIMScheduler | default | steps | with eta > 0 |
/// | euler | EulerDiscreteScheduler | default, karras, exponential | steps | no |
/// | euler-a | EulerAncestralDiscreteScheduler | default | steps | every step |
/// | heun | HeunDiscreteScheduler | default, karras, exponential | 2 steps - 1 | no |
/// | dpm++2m | DPMSolverMultistepScheduler dpmsolver++, order 2 | default, karras, exponential | steps | no |
/// | dpm++2m-sde | DPMSolverMultistepScheduler sde-dpmsolver++, order 2 | default, karras, exponential | steps | every step |
/// | unipc | UniPCMultistepScheduler | default, karras, exponential | steps | no |
/// | lcm | LCMScheduler | default | steps | every step but the last |
///
/// The pipeline must call the UNet once per entry of [`Sampler::timesteps`] (Heun's has
/// `2 * steps - 1`), pass each entry as is (Euler's and Heun's can be fractional), and give
/// `step` the index of that entry.
pub fn build(
    cfg: &SchedulerConfig,
    settings: &SamplerSettings,
    steps: usize,
) -> Result<Box<dyn Sampler>> {
    ensure!(steps > 0, "--steps must be at least 1");
    crate::limits::check_dim(
        "scheduler config: num_train_timesteps",
        cfg.num_train_timesteps,
        100_000,
    )?;
    if settings.kind != SamplerKind::Ddim && settings.eta != 0.0 {
        bail!("--eta is DDIM's; {} has none", settings.kind);
    }
    if !settings.kind.takes_schedule() && settings.schedule != Schedule::Default {
        bail!(
            "--schedule {} does not apply to {}",
            settings.schedule,
            settings.kind
        );
    }
    Ok(match settings.kind {
        SamplerKind::Ddim => Box::new(Ddim::new(cfg, settings, steps)?),
        SamplerKind::Euler => Box::new(Euler::new(cfg, settings, steps)?),
        SamplerKind::EulerAncestral => Box::new(EulerAncestral::new(cfg, settings, steps)?),
        SamplerKind::Heun => Box::new(Heun::new(cfg, settings, steps)?),
        SamplerKind::DpmPp2m => Box::new(DpmSolver::new(cfg, settings, steps, false)?),
        SamplerKind::DpmPp2mSde => Box::new(DpmSolver::new(cfg, settings, steps, true)?),
        SamplerKind::UniPc => Box::new(UniPc::new(cfg, settings, steps)?),
        SamplerKind::Lcm => Box::new(Lcm::new(cfg, settings, steps)?),
    })
}

/// Per-step noise for a batch: row `b` of every draw comes from `generators[b]`, as diffusers'
/// `randn_tensor` draws with a list of generators.
pub struct StepNoise {
    generators: Vec<Generator>,
}

impl StepNoise {
    pub fn new(generators: Vec<Generator>) -> Self {
        Self { generators }
    }

    /// Noise shaped, typed and placed like `like` ([B, ...], one generator per row).
    pub fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let dims = like.dims();
        ensure!(
            dims.first() == Some(&self.generators.len()),
            "step noise for {:?} from {} generator(s)",
            dims,
            self.generators.len()
        );
        let per_row: usize = dims[1..].iter().product();
        let mut values = Vec::with_capacity(per_row * self.generators.len());
        for g in &mut self.generators {
            values.extend(g.randn(per_row));
        }
        Ok(Tensor::from_vec(values, dims, &candle_core::Device::Cpu)?
            .to_device(like.device())?
            .to_dtype(like.dtype())?)
    }
}
