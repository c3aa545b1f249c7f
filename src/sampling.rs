//! The names of the sampling choices (sampler, schedule, timestep spacing) and the user's and
//! the model's settings of them. The samplers themselves are [`crate::scheduler`].

use serde::{Deserialize, Serialize};
use std::fmt;

/// Which sampler, by tkg's names; each is one diffusers scheduler class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum SamplerKind {
    /// DDIMScheduler.
    #[default]
    #[serde(rename = "ddim")]
    Ddim,
    /// EulerDiscreteScheduler.
    #[serde(rename = "euler")]
    Euler,
    /// EulerAncestralDiscreteScheduler.
    #[serde(rename = "euler-a")]
    EulerAncestral,
    /// HeunDiscreteScheduler.
    #[serde(rename = "heun")]
    Heun,
    /// DPMSolverMultistepScheduler, dpmsolver++, order 2.
    #[serde(rename = "dpm++2m")]
    DpmPp2m,
    /// DPMSolverMultistepScheduler, sde-dpmsolver++, order 2.
    #[serde(rename = "dpm++2m-sde")]
    DpmPp2mSde,
    /// UniPCMultistepScheduler.
    #[serde(rename = "unipc")]
    UniPc,
    /// LCMScheduler.
    #[serde(rename = "lcm")]
    Lcm,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 8] = [
        SamplerKind::Ddim,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::Heun,
        SamplerKind::DpmPp2m,
        SamplerKind::DpmPp2mSde,
        SamplerKind::UniPc,
        SamplerKind::Lcm,
    ];

    /// tkg's name (`--sampler`).
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "ddim",
            SamplerKind::Euler => "euler",
            SamplerKind::EulerAncestral => "euler-a",
            SamplerKind::Heun => "heun",
            SamplerKind::DpmPp2m => "dpm++2m",
            SamplerKind::DpmPp2mSde => "dpm++2m-sde",
            SamplerKind::UniPc => "unipc",
            SamplerKind::Lcm => "lcm",
        }
    }

    /// AUTOMATIC1111's name (its `Sampler:` parameter, 1.9+ form, without the schedule).
    pub fn a1111_name(self) -> &'static str {
        match self {
            SamplerKind::Ddim => "DDIM",
            SamplerKind::Euler => "Euler",
            SamplerKind::EulerAncestral => "Euler a",
            SamplerKind::Heun => "Heun",
            SamplerKind::DpmPp2m => "DPM++ 2M",
            SamplerKind::DpmPp2mSde => "DPM++ 2M SDE",
            SamplerKind::UniPc => "UniPC",
            SamplerKind::Lcm => "LCM",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|k| k.name() == t)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("unknown sampler '{s}': use {}", names.join(", "))
            })
    }

    /// An A1111 `Sampler:` value, in the 1.9+ form ("DPM++ 2M", with the schedule in its own
    /// `Schedule type:`) or the older one that names the schedule ("DPM++ 2M Karras").
    pub fn from_a1111(s: &str) -> Option<(SamplerKind, Option<Schedule>)> {
        let s = s.trim();
        let (base, schedule) = match s.strip_suffix(" Karras") {
            Some(b) => (b, Some(Schedule::Karras)),
            None => match s.strip_suffix(" Exponential") {
                Some(b) => (b, Some(Schedule::Exponential)),
                None => (s, None),
            },
        };
        let kind = Self::ALL
            .into_iter()
            .find(|k| k.a1111_name().eq_ignore_ascii_case(base))?;
        Some((kind, schedule))
    }

    /// Whether each step draws fresh noise.
    pub fn is_stochastic(self, eta: f64) -> bool {
        match self {
            SamplerKind::EulerAncestral | SamplerKind::DpmPp2mSde | SamplerKind::Lcm => true,
            SamplerKind::Ddim => eta > 0.0,
            _ => false,
        }
    }

    /// Whether `--schedule` (the sigma spacing) means something for this sampler: its
    /// diffusers class has `use_karras_sigmas` and `use_exponential_sigmas`.
    pub fn takes_schedule(self) -> bool {
        !matches!(
            self,
            SamplerKind::Ddim | SamplerKind::EulerAncestral | SamplerKind::Lcm
        )
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the noise levels of the chosen steps are spaced (`use_karras_sigmas`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Schedule {
    /// The scheduler's own spacing of its timesteps.
    #[default]
    #[serde(rename = "default")]
    Default,
    /// Karras et al. (2022), `use_karras_sigmas`.
    #[serde(rename = "karras")]
    Karras,
    /// `use_exponential_sigmas`.
    #[serde(rename = "exponential")]
    Exponential,
}

impl Schedule {
    pub const ALL: [Schedule; 3] = [Schedule::Default, Schedule::Karras, Schedule::Exponential];

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Default => "default",
            Schedule::Karras => "karras",
            Schedule::Exponential => "exponential",
        }
    }

    /// A1111's `Schedule type:` value.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Schedule::Default => "Automatic",
            Schedule::Karras => "Karras",
            Schedule::Exponential => "Exponential",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|k| k.name() == t || k.a1111_name().eq_ignore_ascii_case(&t))
            .ok_or_else(|| format!("unknown schedule '{s}': use default, karras or exponential"))
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// diffusers' `timestep_spacing`: where the chosen steps sit among the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Spacing {
    pub fn name(self) -> &'static str {
        match self {
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Linspace => "linspace",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "leading" => Ok(Spacing::Leading),
            "trailing" => Ok(Spacing::Trailing),
            "linspace" => Ok(Spacing::Linspace),
            _ => Err(format!(
                "unknown timestep spacing '{s}': use leading, trailing or linspace"
            )),
        }
    }
}

impl fmt::Display for Spacing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The user's choice of sampler, on top of the model's scheduler config.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplerSettings {
    pub kind: SamplerKind,
    pub schedule: Schedule,
    /// DDIM's eta (0: deterministic).
    pub eta: f64,
    /// Overrides the config's `timestep_spacing` (Turbo and Lightning models want trailing).
    pub spacing: Option<Spacing>,
}

/// A model's own sampling defaults (its models.toml entry), used where the settings leave a
/// field unset: Turbo wants 1-4 steps without guidance, Lightning Euler with trailing spacing.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub sampler: Option<SamplerKind>,
    pub schedule: Option<Schedule>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub spacing: Option<Spacing>,
}

/// How the denoise loop runs: the sampler, its steps and the guidance scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub sampler: SamplerSettings,
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less runs the UNet once per step, without CFG.
    pub guidance: f64,
}

impl Sampling {
    /// diffusers' defaults for a sampler: DDIM with eta 0 and so on.
    pub fn new(steps: usize, guidance: f64) -> Self {
        Self {
            sampler: SamplerSettings::default(),
            steps,
            guidance,
        }
    }

    pub fn uses_cfg(&self) -> bool {
        self.guidance > 1.0
    }
}
