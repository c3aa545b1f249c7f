//! What a `tkg place` scene records: its inputs and settings as `TKG ...` keys of the
//! `parameters` chunk (the harmonising pass's prompt as its prompt, its sampling under
//! A1111's keys), and the `tkg place` command that makes it again.

use super::{Parameters, fmt_num, shell_quote};
use crate::place::{PlaceOptions, ShadowKind, SubjectSize};
use crate::sampling::{SamplerKind, SamplerSettings, Schedule};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// The value of `TKG tool` that marks a placed scene.
pub const PLACE_TOOL: &str = "place";

/// A placed scene's recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaceRecipe {
    pub cutout: String,
    pub onto: String,
    pub options: PlaceOptions,
    /// The cut-out was keyed first (`--key`).
    pub key: bool,
    pub harmonize: Option<HarmonizeRecipe>,
}

/// The inpainting pass of `--harmonize`.
#[derive(Debug, Clone, PartialEq)]
pub struct HarmonizeRecipe {
    pub strength: f64,
    pub prompt: String,
    pub negative_prompt: String,
    pub model: String,
    pub model_dir: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: SamplerSettings,
}

fn shadow_text(s: ShadowKind) -> String {
    match s {
        ShadowKind::Drop { angle_deg, length } => {
            format!("drop {},{}", fmt_num(angle_deg), fmt_num(length))
        }
        other => other.name().into(),
    }
}

impl PlaceRecipe {
    pub fn to_parameters(&self) -> Parameters {
        let h = self.harmonize.as_ref();
        let mut p = Parameters::new(
            h.map(|h| h.prompt.as_str()).unwrap_or(""),
            h.map(|h| h.negative_prompt.as_str()).unwrap_or(""),
        );
        p.push("TKG tool", PLACE_TOOL.into());
        p.push("TKG cutout", self.cutout.clone());
        p.push("TKG onto", self.onto.clone());
        if let Some((x, y)) = self.options.at {
            p.push("TKG at", format!("{},{}", fmt_num(x), fmt_num(y)));
        }
        match self.options.size {
            SubjectSize::Native => {}
            SubjectSize::Scale(s) => p.push("TKG scale", fmt_num(s)),
            SubjectSize::Height(px) => p.push("TKG height", px.to_string()),
        }
        p.push("TKG shadow", shadow_text(self.options.shadow));
        p.push(
            "TKG shadow opacity",
            fmt_num(self.options.shadow_opacity as f64),
        );
        if let Some(m) = self.options.match_colour {
            p.push("TKG match colour", fmt_num(m as f64));
        }
        if self.options.allow_crop {
            p.push("TKG allow crop", "true".into());
        }
        if self.key {
            p.push("TKG key", "true".into());
        }
        if let Some(h) = h {
            p.push("Denoising strength", fmt_num(h.strength));
            p.push("Steps", h.steps.to_string());
            p.push("Sampler", h.sampler.kind.a1111_name().into());
            if h.sampler.schedule != Schedule::Default {
                p.push("Schedule type", h.sampler.schedule.a1111_name().into());
            }
            p.push("CFG scale", fmt_num(h.guidance));
            p.push("Seed", h.seed.to_string());
            p.push("Model", h.model.clone());
            if let Some(d) = &h.model_dir {
                p.push("TKG model dir", d.clone());
            }
        }
        p.push("Version", format!("tkg {}", env!("CARGO_PKG_VERSION")));
        p
    }

    /// The recipe of a placed scene (`None` when the parameters are not one).
    pub fn from_parameters(p: &Parameters) -> Result<Option<Self>> {
        if p.get("TKG tool") != Some(PLACE_TOOL) {
            return Ok(None);
        }
        let num = |k: &str| -> Result<Option<f64>> {
            p.get(k)
                .map(|v| {
                    v.trim()
                        .parse::<f64>()
                        .with_context(|| format!("{k} '{v}' is not a number"))
                })
                .transpose()
        };
        let need = |k: &str| p.get(k).with_context(|| format!("no {k}"));
        let at = match p.get("TKG at") {
            Some(v) => {
                let (x, y) = v
                    .split_once(',')
                    .with_context(|| format!("TKG at '{v}' is not X,Y"))?;
                let f = |s: &str| -> Result<f64> {
                    s.trim()
                        .parse()
                        .with_context(|| format!("TKG at '{v}' is not X,Y"))
                };
                Some((f(x)?, f(y)?))
            }
            None => None,
        };
        let size = match (num("TKG scale")?, p.get("TKG height")) {
            (Some(s), None) => SubjectSize::Scale(s),
            (None, Some(h)) => SubjectSize::Height(
                h.trim()
                    .parse()
                    .with_context(|| format!("TKG height '{h}' is not a number"))?,
            ),
            (None, None) => SubjectSize::Native,
            (Some(_), Some(_)) => bail!("both TKG scale and TKG height"),
        };
        let shadow = parse_shadow(need("TKG shadow")?)?;
        let harmonize = match num("Denoising strength")? {
            None => None,
            Some(strength) => {
                let (kind, named) = SamplerKind::from_a1111(need("Sampler")?)
                    .with_context(|| "the sampler is not one tkg has".to_string())?;
                let schedule = match p.get("Schedule type") {
                    Some(t) => Schedule::parse(t).map_err(anyhow::Error::msg)?,
                    None => named.unwrap_or_default(),
                };
                let count = |k: &str| -> Result<u64> {
                    let v = need(k)?;
                    v.trim()
                        .parse()
                        .with_context(|| format!("{k} '{v}' is not a number"))
                };
                Some(HarmonizeRecipe {
                    strength,
                    prompt: p.prompt.clone(),
                    negative_prompt: p.negative_prompt.clone(),
                    model: need("Model")?.to_string(),
                    model_dir: p.get("TKG model dir").map(str::to_string),
                    seed: count("Seed")?,
                    steps: count("Steps")? as usize,
                    guidance: num("CFG scale")?.context("no CFG scale")?,
                    sampler: SamplerSettings {
                        kind,
                        schedule,
                        ..SamplerSettings::default()
                    },
                })
            }
        };
        Ok(Some(Self {
            cutout: need("TKG cutout")?.to_string(),
            onto: need("TKG onto")?.to_string(),
            options: PlaceOptions {
                at,
                size,
                shadow,
                shadow_opacity: num("TKG shadow opacity")?
                    .unwrap_or(crate::place::DEFAULT_SHADOW_OPACITY as f64)
                    as f32,
                match_colour: num("TKG match colour")?.map(|v| v as f32),
                allow_crop: p.get("TKG allow crop") == Some("true"),
            },
            key: p.get("TKG key") == Some("true"),
            harmonize,
        }))
    }

    /// The `tkg place` command that makes this scene again, writing `out`.
    pub fn command(&self, out: &Path) -> String {
        let mut args: Vec<String> = vec!["tkg".into(), "place".into(), shell_quote(&self.cutout)];
        let mut push = |flag: &str, v: &str| {
            args.push(flag.to_string());
            args.push(shell_quote(v));
        };
        push("--onto", &self.onto);
        if let Some((x, y)) = self.options.at {
            push("--at", &format!("{},{}", fmt_num(x), fmt_num(y)));
        }
        match self.options.size {
            SubjectSize::Native => {}
            SubjectSize::Scale(s) => push("--scale", &fmt_num(s)),
            SubjectSize::Height(px) => push("--height", &px.to_string()),
        }
        push("--shadow", self.options.shadow.name());
        if let ShadowKind::Drop { angle_deg, length } = self.options.shadow {
            push("--shadow-angle", &fmt_num(angle_deg));
            push("--shadow-length", &fmt_num(length));
        }
        push(
            "--shadow-opacity",
            &fmt_num(self.options.shadow_opacity as f64),
        );
        if let Some(m) = self.options.match_colour {
            push("--match-colour", &fmt_num(m as f64));
        }
        if let Some(h) = &self.harmonize {
            push("--harmonize", &fmt_num(h.strength));
            push("--prompt", &h.prompt);
            if !h.negative_prompt.is_empty() {
                push("--negative-prompt", &h.negative_prompt);
            }
            match &h.model_dir {
                Some(d) => push("--model-dir", d),
                None => push("--model", &h.model),
            }
            push("--seed", &h.seed.to_string());
            push("--steps", &h.steps.to_string());
            push("--guidance", &fmt_num(h.guidance));
            push("--sampler", h.sampler.kind.name());
            if h.sampler.kind.takes_schedule() {
                push("--schedule", h.sampler.schedule.name());
            }
        }
        push("--out", &out.display().to_string());
        if self.options.allow_crop {
            args.push("--allow-crop".into());
        }
        if self.key {
            args.push("--key".into());
        }
        args.join(" ")
    }
}

fn parse_shadow(v: &str) -> Result<ShadowKind> {
    Ok(match v.trim() {
        name @ ("none" | "contact") => ShadowKind::from_name(name, (0.0, 0.0))?,
        other => {
            let rest = other
                .strip_prefix("drop ")
                .with_context(|| format!("TKG shadow '{v}' is not none, contact or drop A,L"))?;
            let (a, l) = rest
                .split_once(',')
                .with_context(|| format!("TKG shadow '{v}' is not drop A,L"))?;
            let f = |s: &str| -> Result<f64> {
                s.trim()
                    .parse()
                    .with_context(|| format!("TKG shadow '{v}' is not drop A,L"))
            };
            ShadowKind::Drop {
                angle_deg: f(a)?,
                length: f(l)?,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> PlaceRecipe {
        PlaceRecipe {
            cutout: "car.cutout.png".into(),
            onto: "photos/road 1.jpg".into(),
            options: PlaceOptions {
                at: Some((0.4, 0.85)),
                size: SubjectSize::Height(300),
                shadow: ShadowKind::Drop {
                    angle_deg: 60.0,
                    length: 0.3,
                },
                shadow_opacity: 0.5,
                match_colour: Some(0.5),
                allow_crop: false,
            },
            key: true,
            harmonize: Some(HarmonizeRecipe {
                strength: 0.4,
                prompt: "a mountain road, dusk".into(),
                negative_prompt: String::new(),
                model: "sd15-inpaint".into(),
                model_dir: None,
                seed: 7,
                steps: 20,
                guidance: 7.5,
                sampler: SamplerSettings {
                    kind: SamplerKind::DpmPp2m,
                    schedule: Schedule::Karras,
                    ..SamplerSettings::default()
                },
            }),
        }
    }

    #[test]
    fn place_recipes_round_trip_and_name_every_setting() {
        let r = recipe();
        let text = r.to_parameters().to_string();
        let back = PlaceRecipe::from_parameters(&Parameters::parse(&text).unwrap()).unwrap();
        assert_eq!(back, Some(r.clone()));
        let plain = PlaceRecipe {
            options: PlaceOptions {
                size: SubjectSize::Scale(0.5),
                shadow: ShadowKind::Contact,
                at: None,
                match_colour: None,
                ..r.options.clone()
            },
            harmonize: None,
            key: false,
            ..r.clone()
        };
        let text = plain.to_parameters().to_string();
        let back = PlaceRecipe::from_parameters(&Parameters::parse(&text).unwrap()).unwrap();
        assert_eq!(back, Some(plain));
        assert_eq!(
            r.command(Path::new("s.png")),
            "tkg place car.cutout.png --onto 'photos/road 1.jpg' --at 0.4,0.85 --height 300 \
             --shadow drop --shadow-angle 60 --shadow-length 0.3 --shadow-opacity 0.5 \
             --match-colour 0.5 --harmonize 0.4 --prompt 'a mountain road, dusk' \
             --model sd15-inpaint --seed 7 --steps 20 --guidance 7.5 --sampler dpm++2m \
             --schedule karras --out s.png --key"
        );
        // A generated image's parameters are not a place recipe.
        let generated = Parameters::new("a car", "");
        assert_eq!(PlaceRecipe::from_parameters(&generated).unwrap(), None);
    }
}
