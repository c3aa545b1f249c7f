//! Weight sources for candle's `VarBuilder`.
//!
//! - [`WeightFile`]: a safetensors file that remembers which tensors were read, so a loader
//!   can refuse a file whose weights the network did not all use.
//! - [`RandomWeights`]: deterministic random tensors, recorded as they are asked for; this is
//!   how the built-in random-weight models are materialised with the exact tensor names and
//!   shapes the real loader reads.

use anyhow::{Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A memory-mapped safetensors file with a record of the tensors read from it.
pub struct WeightFile {
    path: PathBuf,
    tensors: MmapedSafetensors,
    used: Mutex<BTreeSet<String>>,
}

impl WeightFile {
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        // SAFETY: the file is mapped read-only; tkg never writes weight files it has mapped.
        let tensors = unsafe { MmapedSafetensors::new(path) }.with_context(|| {
            format!(
                "{} is not a valid safetensors file (truncated or corrupt?)",
                path.display()
            )
        })?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            tensors,
            used: Mutex::new(BTreeSet::new()),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A `VarBuilder` over this file that converts every tensor to `dtype` on `device`.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Tracked(self.clone())), dtype, device.clone())
    }

    /// Names of the tensors in the file.
    pub fn names(&self) -> Vec<String> {
        self.tensors
            .tensors()
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// Tensors in the file that were never read, except those `ignorable` says to skip.
    pub fn unused(&self, ignorable: impl Fn(&str) -> bool) -> Vec<String> {
        let used = self.used.lock().unwrap();
        let mut out: Vec<String> = self
            .names()
            .into_iter()
            .filter(|n| !used.contains(n) && !ignorable(n))
            .collect();
        out.sort();
        out
    }

    /// Fails if any tensor of the file was left unused: a sign that the config does not match
    /// the weights (or that weights were silently dropped).
    pub fn ensure_all_used(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let unused = self.unused(ignorable);
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
            anyhow::bail!(
                "{} has {} tensor(s) the network does not use ({}{}): the config does not match the weights",
                self.path.display(),
                unused.len(),
                shown.join(", "),
                if unused.len() > 5 { ", ..." } else { "" }
            );
        }
        Ok(())
    }
}

struct Tracked(Arc<WeightFile>);

impl SimpleBackend for Tracked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = SimpleBackend::get(&self.0.tensors, s, name, h, dtype, dev)?;
        self.0.used.lock().unwrap().insert(name.to_string());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = SimpleBackend::get_unchecked(&self.0.tensors, name, dtype, dev)?;
        self.0.used.lock().unwrap().insert(name.to_string());
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        SimpleBackend::contains_tensor(&self.0.tensors, name)
    }
}

/// Deterministic random weights, recorded by name as a network asks for them.
///
/// Values depend only on the seed and the tensor name, never on the order of requests, so a
/// materialised model is the same on every machine. Scales keep activations sane:
/// matrices and kernels get N(0, 1/fan_in), norm scales 1 + N(0, 0.05²), biases N(0, 0.02²),
/// embeddings N(0, 0.02²) scaled up for positions.
pub struct RandomWeights {
    seed: u64,
    made: Mutex<BTreeMap<String, Tensor>>,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            seed,
            made: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn var_builder(self: &Arc<Self>, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(
            Box::new(RandomBackend(self.clone())),
            DType::F32,
            device.clone(),
        )
    }

    /// Every tensor made so far, by name (f32).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.made.lock().unwrap().clone()
    }

    fn make(&self, shape: &Shape, name: &str) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        let n = shape.elem_count();
        let mut rng = SplitMix64::new(self.seed ^ fnv1a(name.as_bytes()));
        let is_norm_scale = dims.len() == 1
            && name.ends_with(".weight")
            && (name.contains("norm") || name.contains("ln_"));
        let values: Vec<f32> = if is_norm_scale {
            (0..n).map(|_| 1.0 + 0.05 * rng.normal()).collect()
        } else if dims.len() == 1 {
            (0..n).map(|_| 0.02 * rng.normal()).collect()
        } else if name.contains("embedding") && dims.len() == 2 && !name.contains("linear") {
            (0..n).map(|_| 0.02 * rng.normal()).collect()
        } else {
            let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
            let std = (1.0 / fan_in as f64).sqrt() as f32;
            (0..n).map(|_| std * rng.normal()).collect()
        };
        Tensor::from_vec(values, shape.clone(), &Device::Cpu)
    }
}

struct RandomBackend(Arc<RandomWeights>);

impl SimpleBackend for RandomBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut made = self.0.made.lock().unwrap();
        let t = match made.get(name) {
            Some(t) if t.shape() == &s => t.clone(),
            Some(t) => candle_core::bail!(
                "random weights: {name} asked for as {s:?} and as {:?}",
                t.shape()
            ),
            None => {
                let t = self.0.make(&s, name)?;
                made.insert(name.to_string(), t.clone());
                t
            }
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.0.made.lock().unwrap().get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("random weights: {name} has no known shape"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // The diffusers names are the ones loaders try first (e.g. `to_q` before `query`).
        let _ = name;
        true
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A tiny, fixed PRNG: the materialised weights must never change with a crate update.
pub struct SplitMix64 {
    state: u64,
    spare: Option<f32>,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * th.sin()) as f32);
        (r * th.cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_depend_on_name_not_order() {
        let a = RandomWeights::new(7);
        let b = RandomWeights::new(7);
        let va = a.var_builder(&Device::Cpu);
        let vb = b.var_builder(&Device::Cpu);
        let x1 = va.get((3, 4), "x.weight").unwrap();
        let _ = va.get(5, "y.bias").unwrap();
        let _ = vb.get(5, "y.bias").unwrap();
        let x2 = vb.get((3, 4), "x.weight").unwrap();
        let d = (x1 - x2).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(a.tensors().len(), 2);
        assert!(va.get((4, 3), "x.weight").is_err());
    }

    #[test]
    fn normal_has_unit_variance() {
        let mut r = SplitMix64::new(1);
        let v: Vec<f32> = (0..20000).map(|_| r.normal()).collect();
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
