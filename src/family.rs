//! What differs between model families, in one place: default size, TKG-DM shift, the
//! latent→RGB factors key colours are judged by, the text towers and the built-in
//! architecture used for single-file checkpoints. The denoising loop is the same for all.

use crate::color::{LatentRgbFactors, SD15_LATENT_RGB, SDXL_LATENT_RGB};
use anyhow::{Result, bail};
use serde::Deserialize;
use std::fmt;
use std::str::FromStr;

/// Which architecture a model's weights are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Sd15,
    Sdxl,
}

/// The facts of one family.
#[derive(Debug)]
pub struct FamilySpec {
    pub family: Family,
    /// Image side in pixels when neither the user, the registry nor the UNet's
    /// `sample_size` says otherwise.
    pub default_size: usize,
    /// TKG-DM's target shift of the positive fraction (the paper's values).
    pub tkg_shift: f64,
    /// Approximate latent→RGB factors: which latent channels a key colour shifts.
    pub latent_rgb: &'static LatentRgbFactors,
    /// The folders of its text encoders (`text_encoder{suffix}`, `tokenizer{suffix}`).
    pub tower_suffixes: &'static [&'static str],
    /// The pad token of each tower's tokenizer when it comes from the built-in vocabulary.
    pub tower_pads: &'static [&'static str],
    /// img2img's and inpainting's strength when the user gives none (diffusers' pipeline
    /// defaults: SD 0.8 and 1; SDXL 0.3 and 0.9999, which skips the first step).
    pub default_strength: DefaultStrength,
    /// The built-in model whose configs (the real base model's) a single-file checkpoint of
    /// this family is read with.
    pub builtin_architecture: &'static str,
}

/// Default strengths, per pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DefaultStrength {
    pub img2img: f64,
    pub inpaint: f64,
}

/// Image sizes must be multiples of this before any model is loaded: every family's VAE
/// downsamples by 8. A loaded model checks again against its own VAE's factor.
pub const SIZE_MULTIPLE: usize = 8;

const SD15: FamilySpec = FamilySpec {
    family: Family::Sd15,
    default_size: 512,
    tkg_shift: 0.07,
    latent_rgb: &SD15_LATENT_RGB,
    tower_suffixes: &[""],
    tower_pads: &["<|endoftext|>"],
    default_strength: DefaultStrength {
        img2img: 0.8,
        inpaint: 1.0,
    },
    builtin_architecture: "random-sd15",
};

const SDXL: FamilySpec = FamilySpec {
    family: Family::Sdxl,
    default_size: 1024,
    tkg_shift: 0.11,
    latent_rgb: &SDXL_LATENT_RGB,
    tower_suffixes: &["", "_2"],
    tower_pads: &["<|endoftext|>", "!"],
    default_strength: DefaultStrength {
        img2img: 0.3,
        inpaint: 0.9999,
    },
    builtin_architecture: "random-sdxl",
};

impl Family {
    pub fn spec(self) -> &'static FamilySpec {
        match self {
            Family::Sd15 => &SD15,
            Family::Sdxl => &SDXL,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Sd15 => "sd15",
            Family::Sdxl => "sdxl",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Family {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "sd15" => Ok(Family::Sd15),
            "sdxl" => Ok(Family::Sdxl),
            _ => bail!("unknown model family `{s}` (expected sd15 or sdxl)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_their_family_and_towers_line_up() {
        for f in [Family::Sd15, Family::Sdxl] {
            let s = f.spec();
            assert_eq!(s.family, f);
            assert_eq!(s.tower_suffixes.len(), s.tower_pads.len());
            assert_eq!(s.default_size % SIZE_MULTIPLE, 0);
            assert_eq!(f.as_str().parse::<Family>().unwrap(), f);
        }
        assert_eq!(Family::Sdxl.spec().tower_suffixes.len(), 2);
    }
}
