//! Several images at once: side by side on the CPU's cores, one UNet call per step
//! elsewhere; one step callback and one stop for all of them.

use super::{Conditioning, Generated, Pipeline, Request, Start, Timings};
use crate::rng::{Generator, RngKind};
use crate::scheduler::StepNoise;
use anyhow::{Context, Result, ensure};
use candle_core::Tensor;
use rayon::prelude::*;
use std::time::Instant;

impl Pipeline {
    /// Makes several images. Every request must share size, steps, guidance and SDXL
    /// micro-conditioning. `control` gets the batch's mean step (rounded down) after each
    /// image's step, so the same value can come more than once; an error from it stops every
    /// image.
    ///
    /// On the CPU each image runs [`Self::generate_with`] on a core of its own, so its bits
    /// are those of the image alone: one fused UNet call would change gemm's blocking and so
    /// the last bits (`fuse_on_cpu` fuses anyway, to measure that). Elsewhere the B
    /// images share one UNet call per step; each image's prompt encoding, noise, TKG init and
    /// VAE decode are still computed on their own.
    pub fn generate_batch(
        &self,
        reqs: &[Request],
        rng: RngKind,
        fuse_on_cpu: bool,
        control: &mut (dyn FnMut(usize, usize) -> Result<()> + Send),
    ) -> Result<Vec<Generated>> {
        let first = reqs.first().context("an empty batch")?;
        for r in reqs {
            ensure!(
                r.shape_key() == first.shape_key(),
                "internal error: a batch mixes sizes, steps, guidance or micro-conditioning"
            );
        }
        self.check_request(first)?;
        if reqs.len() == 1 || (self.device.is_cpu() && !fuse_on_cpu) {
            let gate = StepGate::new(reqs.len(), control);
            let made = self.per_image(reqs.len(), |i| {
                self.generate_with(&reqs[i], rng, &mut |step, steps| gate.step(i, step, steps))
            });
            return gate.result(made);
        }
        let cfg = first.sampling.uses_cfg();
        let encoded = self.per_image(reqs.len(), |i| {
            let r = &reqs[i];
            let t0 = Instant::now();
            let mut cond = self.encode_prompt(&r.prompt, &r.negative_prompt, cfg)?;
            cond.micro = r.micro;
            let mut generator = Generator::new(rng, r.seed);
            let init = self.start_for(r, &mut generator)?;
            Ok((cond, t0.elapsed(), init, generator))
        })?;
        let mut conds = Vec::with_capacity(reqs.len());
        let mut text_times = Vec::with_capacity(reqs.len());
        let mut inits = Vec::with_capacity(reqs.len());
        let mut generators = Vec::with_capacity(reqs.len());
        for (cond, time, init, generator) in encoded {
            conds.push(cond);
            text_times.push(time);
            inits.push(init);
            generators.push(generator);
        }
        let t1 = Instant::now();
        let cond = stack_conditioning(&conds, cfg)?;
        let starts: Vec<Start> = inits.iter().map(|(_, s, _)| s.clone()).collect();
        let start = Start::stack(&starts)?;
        let mut step_noise = StepNoise::new(generators);
        let final_latents =
            self.denoise_from(&start, &cond, &first.sampling, &mut step_noise, control)?;
        let denoise = t1.elapsed() / reqs.len() as u32;
        let decoded = self.per_image(reqs.len(), |i| {
            let t2 = Instant::now();
            let latents = final_latents.narrow(0, i, 1)?;
            let (rgb, size) = self.decode_for(&reqs[i], &latents)?;
            Ok((latents, rgb, size, t2.elapsed()))
        })?;
        let mut out = Vec::with_capacity(reqs.len());
        let parts = reqs.iter().zip(conds).zip(inits).zip(decoded);
        for (i, (((_, c), (noise, start, shift)), (latents, rgb, size, decode))) in
            parts.enumerate()
        {
            out.push(Generated {
                rgb,
                size,
                noise,
                init: start.noise,
                final_latents: latents,
                shift,
                warnings: c.warnings,
                timings: Timings {
                    text: text_times[i],
                    denoise,
                    decode,
                },
            });
        }
        Ok(out)
    }

    /// `f(0..n)`, side by side on the CPU's cores (each image's arithmetic is the same as
    /// alone; small models leave cores idle inside one image), in order on other devices.
    /// With at least one image per core, each image's kernels run in order on its core.
    fn per_image<T: Send>(
        &self,
        n: usize,
        f: impl Fn(usize) -> Result<T> + Sync + Send,
    ) -> Result<Vec<T>> {
        if self.device.is_cpu() {
            let core_each = n >= rayon::current_num_threads();
            (0..n)
                .into_par_iter()
                .map(|i| {
                    if core_each {
                        crate::kernels::in_order(|| f(i))
                    } else {
                        f(i)
                    }
                })
                .collect()
        } else {
            (0..n).map(f).collect()
        }
    }
}

/// Shares one step callback between the images of a batch running side by side: it runs
/// after every image's step (so an interrupt is seen within one step) with the batch's mean
/// step, and its first error stops every image.
struct StepGate<'a> {
    state: std::sync::Mutex<GateState<'a>>,
}

struct GateState<'a> {
    done: Vec<usize>,
    control: &'a mut (dyn FnMut(usize, usize) -> Result<()> + Send),
    stopped: Option<anyhow::Error>,
}

/// What the other images of a stopped batch return; [`StepGate::result`] swaps it for the
/// callback's own error.
#[derive(Debug)]
struct BatchStopped;

impl std::fmt::Display for BatchStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the batch was stopped")
    }
}

impl std::error::Error for BatchStopped {}

impl<'a> StepGate<'a> {
    fn new(images: usize, control: &'a mut (dyn FnMut(usize, usize) -> Result<()> + Send)) -> Self {
        Self {
            state: std::sync::Mutex::new(GateState {
                done: vec![0; images],
                control,
                stopped: None,
            }),
        }
    }

    /// Image `image` finished `step` of `steps`.
    fn step(&self, image: usize, step: usize, steps: usize) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.stopped.is_some() {
            return Err(BatchStopped.into());
        }
        s.done[image] = step;
        let mean = s.done.iter().sum::<usize>() / s.done.len();
        if let Err(e) = (s.control)(mean, steps) {
            s.stopped = Some(e);
            return Err(BatchStopped.into());
        }
        Ok(())
    }

    /// The batch's outcome: the callback's error when it stopped the batch.
    fn result<T>(self, made: Result<T>) -> Result<T> {
        let stopped = self
            .state
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .stopped;
        match (made, stopped) {
            (Err(_), Some(e)) => Err(e),
            (made, _) => made,
        }
    }
}

/// Stacks per-image conditionings (each [negative, positive] with CFG, else [positive]) into
/// one batch: [negative 1..B, positive 1..B] with CFG, else [positive 1..B].
pub fn stack_conditioning(conds: &[Conditioning], cfg: bool) -> Result<Conditioning> {
    let first = conds.first().context("an empty batch")?;
    let stack = |get: &dyn Fn(&Conditioning) -> Option<&Tensor>| -> Result<Option<Tensor>> {
        if get(first).is_none() {
            return Ok(None);
        }
        let mut parts = Vec::new();
        let halves: &[usize] = if cfg { &[0, 1] } else { &[0] };
        for &h in halves {
            for c in conds {
                let t = get(c).context("internal error: a batch mixes model families")?;
                parts.push(t.narrow(0, h, 1)?);
            }
        }
        Ok(Some(Tensor::cat(&parts, 0)?))
    };
    Ok(Conditioning {
        context: stack(&|c| Some(&c.context))?.expect("context is always there"),
        pooled: stack(&|c| c.pooled.as_ref())?,
        micro: first.micro,
        warnings: conds.iter().flat_map(|c| c.warnings.clone()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    #[test]
    fn step_gate_reports_the_mean_step_and_stops_every_image() {
        let mut seen = Vec::new();
        let mut control = |i: usize, n: usize| -> Result<()> {
            seen.push((i, n));
            if i == 2 {
                bail!("interrupted");
            }
            Ok(())
        };
        let gate = StepGate::new(2, &mut control);
        gate.step(0, 1, 4).unwrap();
        gate.step(0, 2, 4).unwrap();
        gate.step(1, 1, 4).unwrap();
        gate.step(1, 2, 4).unwrap_err(); // mean 2: the callback stops the batch
        let other = gate.step(0, 3, 4).unwrap_err();
        assert!(other.is::<BatchStopped>());
        let err = gate.result::<()>(Err(other)).unwrap_err();
        assert_eq!(err.to_string(), "interrupted");
        assert_eq!(seen, [(0, 4), (1, 4), (1, 4), (2, 4)]);
    }
}
