//! Stage timings of one generation, for `tkg bench` and the side-by-side comparison with
//! diffusers (benches/compare_diffusers.py).
//!
//! The stages are the ones a generation runs, timed through the real pipeline: model load,
//! text encoding (negative + positive prompt), the denoise loop with the chosen sampler (one
//! UNet call on a batch of 2 per step with classifier-free guidance; Heun makes nearly two per
//! step), and the VAE decode to 8-bit pixels. Peak memory is the
//! process's high-water mark of resident memory (`VmHWM`).

use crate::models::hub::ModelFolder;
use crate::pipeline::{LoadOptions, Pipeline, Sampling};
use crate::rng::{Generator, RngKind};
use crate::sampling::SamplerSettings;
use crate::scheduler::StepNoise;
use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device};
use serde::Serialize;
use std::time::Instant;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub width: usize,
    pub height: usize,
    /// Denoising steps; each one is a UNet call on a batch of 2.
    pub steps: usize,
    pub sampler: SamplerSettings,
    /// Classifier-free guidance; 1 or less runs one UNet pass (batch 1) per step.
    pub guidance: f64,
    pub dtype: DType,
    /// How weights are kept when computing in f32.
    pub weights: crate::pipeline::WeightStorage,
    /// Whether the VAE decodes in tiles.
    pub vae_tiling: crate::pipeline::VaeTiling,
    pub device: Device,
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    /// VAE decodes of the same latents (at least 1): the first pays what a one-image run
    /// pays (packing, fresh buffers); the later ones are what a batch's next images pay.
    pub vae_calls: usize,
}

/// Results, in seconds and MiB. Field names are shared with benches/compare_diffusers.py.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub tool: String,
    pub model: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// tkg's sampler name.
    pub sampler: String,
    pub guidance: f64,
    pub dtype: String,
    pub threads: usize,
    pub load_s: f64,
    pub text_s: f64,
    /// Every step's time, in order (the first one includes warm-up costs).
    pub unet_steps_s: Vec<f64>,
    /// The median step: the number to compare.
    pub unet_step_s: f64,
    pub unet_step_min_s: f64,
    pub vae_decode_s: f64,
    /// Every decode's time, in order (the first is `vae_decode_s`).
    pub vae_decodes_s: Vec<f64>,
    /// The median decode after the first (with `vae_calls` of 2 or more): the number to
    /// compare with a peer's decode timed after a warm-up.
    pub vae_decode_warm_s: Option<f64>,
    /// From the prompt to the decoded image: text encoding, every UNet call, the decode.
    pub image_s: f64,
    pub total_s: f64,
    /// Resident memory after loading the model.
    pub rss_after_load_mib: f64,
    /// Peak resident memory of the whole run (VmHWM).
    pub peak_rss_mib: f64,
}

/// The thread count candle's matmul will use (the same rule as candle's).
pub fn threads_in_use() -> usize {
    candle_core::utils::get_num_threads()
}

/// Reads a `Vm*` field of /proc/self/status, in MiB (0 where there is no /proc).
pub fn proc_status_mib(field: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/status") else {
        return 0.0;
    };
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(field)?.strip_prefix(':')?;
            let kb: f64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb / 1024.0)
        })
        .unwrap_or(0.0)
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Loads `folder` and runs one generation, timing each stage.
pub fn run(
    model_name: &str,
    folder: &ModelFolder,
    s: &BenchSettings,
    progress: &mut dyn FnMut(&str),
) -> Result<BenchReport> {
    ensure!(s.steps > 0, "--steps must be at least 1");
    ensure!(s.vae_calls > 0, "--vae-calls must be at least 1");
    let start = Instant::now();
    progress("loading the model");
    let pipe = Pipeline::load(
        folder,
        &LoadOptions {
            device: s.device.clone(),
            dtype: s.dtype,
            weights: s.weights,
            vae_tiling: s.vae_tiling,
            ..LoadOptions::cpu_f32()
        },
    )
    .with_context(|| format!("loading {model_name}"))?;
    let load_s = start.elapsed().as_secs_f64();
    let rss_after_load_mib = proc_status_mib("VmRSS");
    pipe.check_size(crate::settings::Size::new(s.width, s.height))?;

    progress("encoding the prompts");
    let t = Instant::now();
    let sampling = Sampling {
        sampler: s.sampler,
        steps: s.steps,
        guidance: s.guidance,
    };
    let cond = pipe.encode_prompt(&s.prompt, &s.negative_prompt, sampling.uses_cfg())?;
    let text_s = t.elapsed().as_secs_f64();

    // Plain N(0, 1) latents: the cost of a step does not depend on them.
    let f = pipe.vae_factor();
    let c = pipe.unet.config.in_channels;
    let (lh, lw) = (s.height / f, s.width / f);
    let mut generator = Generator::new(RngKind::TorchCpu, s.seed);
    let noise = generator.randn(c * lh * lw);
    let init = candle_core::Tensor::from_vec(noise, (1, c, lh, lw), &Device::Cpu)?;
    let mut unet_steps_s = Vec::with_capacity(s.steps);
    let mut last = Instant::now();
    let mut noise = StepNoise::new(vec![generator]);
    let latents = pipe.denoise(&init, &cond, &sampling, &mut noise, &mut |i, n| {
        let now = Instant::now();
        unet_steps_s.push((now - last).as_secs_f64());
        last = now;
        progress(&format!("step {i}/{n}"));
        Ok(())
    })?;

    let mut vae_decodes_s = Vec::with_capacity(s.vae_calls);
    for i in 0..s.vae_calls {
        progress(&format!("decoding {}/{}", i + 1, s.vae_calls));
        let t = Instant::now();
        let rgb = pipe.decode(&latents)?;
        vae_decodes_s.push(t.elapsed().as_secs_f64());
        ensure!(rgb.len() == s.width * s.height * 3, "unexpected image size");
    }
    let vae_decode_s = vae_decodes_s[0];
    let vae_decode_warm_s = (s.vae_calls > 1).then(|| median(&vae_decodes_s[1..]));
    let total_s = start.elapsed().as_secs_f64();

    let image_s = text_s + unet_steps_s.iter().sum::<f64>() + vae_decode_s;
    Ok(BenchReport {
        tool: "tkg".into(),
        model: model_name.into(),
        width: s.width,
        height: s.height,
        steps: s.steps,
        sampler: s.sampler.kind.name().into(),
        guidance: s.guidance,
        dtype: dtype_name(s.dtype).into(),
        threads: threads_in_use(),
        load_s,
        text_s,
        unet_step_s: median(&unet_steps_s),
        unet_step_min_s: unet_steps_s.iter().copied().fold(f64::INFINITY, f64::min),
        unet_steps_s,
        vae_decode_s,
        vae_decodes_s,
        vae_decode_warm_s,
        image_s,
        total_s,
        rss_after_load_mib,
        peak_rss_mib: proc_status_mib("VmHWM"),
    })
}

impl BenchReport {
    /// A plain-text table, one stage a line.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} {}x{} {} threads={} sampler={} steps={} guidance={}\n",
            self.model,
            self.width,
            self.height,
            self.dtype,
            self.threads,
            self.sampler,
            self.steps,
            self.guidance
        );
        let steps: Vec<String> = self.unet_steps_s.iter().map(|&v| duration(v)).collect();
        let rows = [
            ("model load", duration(self.load_s)),
            ("text encoding", duration(self.text_s)),
            (
                if self.guidance > 1.0 {
                    "UNet call, CFG (batch 2)"
                } else {
                    "UNet call (batch 1)"
                },
                format!(
                    "{} median, {} min [{}]",
                    duration(self.unet_step_s),
                    duration(self.unet_step_min_s),
                    steps.join(", ")
                ),
            ),
            (
                "VAE decode",
                match self.vae_decode_warm_s {
                    Some(warm) => format!(
                        "{} first, {} warm median [{}]",
                        duration(self.vae_decode_s),
                        duration(warm),
                        self.vae_decodes_s
                            .iter()
                            .map(|&v| duration(v))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => duration(self.vae_decode_s),
                },
            ),
            ("image (text, UNet, VAE)", duration(self.image_s)),
            ("total", duration(self.total_s)),
            (
                "RSS after load",
                format!("{:.0} MiB", self.rss_after_load_mib),
            ),
            ("peak RSS", format!("{:.0} MiB", self.peak_rss_mib)),
        ];
        for (k, v) in rows {
            out.push_str(&format!("{k:<26} {v}\n"));
        }
        out
    }
}

/// Seconds for people: three significant figures in s or ms, so a tiny model's millisecond
/// steps do not print as 0.00 s.
pub fn duration(seconds: f64) -> String {
    let ms = seconds * 1e3;
    match seconds {
        s if s >= 1.0 => format!("{s:.2} s"),
        _ if ms >= 100.0 => format!("{ms:.0} ms"),
        _ if ms >= 10.0 => format!("{ms:.1} ms"),
        _ => format!("{ms:.2} ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_keep_three_figures() {
        assert_eq!(duration(12.346), "12.35 s");
        assert_eq!(duration(0.2346), "235 ms");
        assert_eq!(duration(0.02346), "23.5 ms");
        assert_eq!(duration(0.002346), "2.35 ms");
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn reads_own_memory() {
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(proc_status_mib("VmHWM") > 0.0);
            assert!(proc_status_mib("VmRSS") > 0.0);
        }
        assert_eq!(proc_status_mib("NoSuchField"), 0.0);
    }
}
