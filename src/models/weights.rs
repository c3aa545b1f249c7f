//! Weight sources for candle's `VarBuilder`.
//!
//! - [`WeightFile`]: a safetensors file that remembers which tensors were read, so a loader
//!   can refuse a file whose weights the network did not all use.
//! - [`RandomWeights`]: deterministic random tensors, recorded as they are asked for; this is
//!   how the built-in random-weight models are materialised with the exact tensor names and
//!   shapes the real loader reads.

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Where one tensor lives in a safetensors file.
#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

/// A safetensors file read tensor by tensor, with a record of the tensors read from it.
///
/// Tensors are read with positioned reads, not memory-mapped: a mapping keeps the file's
/// pages resident next to the converted copy, which doubles the peak memory of a load.
pub struct WeightFile {
    path: PathBuf,
    file: File,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
    used: Mutex<BTreeSet<String>>,
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl WeightFile {
    pub fn open(path: &Path) -> Result<Arc<Self>> {
        let bad = || format!("{} is not a valid safetensors file", path.display());
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_len = file.metadata()?.len();
        let mut n = [0u8; 8];
        file.read_exact_at(&mut n, 0)
            .with_context(|| format!("{} (too short)", bad()))?;
        let n = u64::from_le_bytes(n);
        ensure!(
            n <= 100 << 20 && 8 + n <= file_len,
            "{} (truncated or corrupt header)",
            bad()
        );
        let mut header = vec![0u8; n as usize];
        file.read_exact_at(&mut header, 8)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).with_context(|| format!("{} (bad header)", bad()))?;
        let data_start = 8 + n;
        let mut entries = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (k, v) in m {
                        metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let dtype_name = v["dtype"].as_str().unwrap_or_default();
            let dtype = parse_dtype(dtype_name).with_context(|| {
                format!(
                    "{}: tensor {name} has unsupported dtype {dtype_name}",
                    path.display()
                )
            })?;
            let shape: Vec<usize> = v["shape"]
                .as_array()
                .with_context(bad)?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<_>>()
                .with_context(bad)?;
            let offs = v["data_offsets"].as_array().with_context(bad)?;
            let (s, e) = match (
                offs.first().and_then(|v| v.as_u64()),
                offs.get(1).and_then(|v| v.as_u64()),
            ) {
                (Some(s), Some(e)) if e >= s && e <= file_len => (s, e),
                _ => bail!("{} (bad offsets for {name})", bad()),
            };
            let bytes = shape
                .iter()
                .try_fold(dtype.size_in_bytes(), |n, &d| n.checked_mul(d))
                .with_context(|| format!("{} ({name}: shape {shape:?} overflows)", bad()))?;
            ensure!(
                (e - s) as usize == bytes,
                "{} ({name}: {} bytes for shape {shape:?})",
                bad(),
                e - s
            );
            ensure!(
                data_start + e <= file_len,
                "{} is truncated: {name} lies past the end of the file",
                path.display()
            );
            entries.insert(
                name,
                Entry {
                    dtype,
                    shape,
                    start: data_start + s,
                    len: (e - s) as usize,
                },
            );
        }
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            file,
            entries,
            metadata,
            used: Mutex::new(BTreeSet::new()),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's `__metadata__` strings.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// A tensor's shape, if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Reads one tensor as stored (on the CPU), without marking it used.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .with_context(|| format!("{} has no tensor {name}", self.path.display()))?;
        let mut buf = vec![0u8; e.len];
        self.file
            .read_exact_at(&mut buf, e.start)
            .with_context(|| format!("reading {name} from {}", self.path.display()))?;
        Ok(Tensor::from_raw_buffer(
            &buf,
            e.dtype,
            &e.shape,
            &Device::Cpu,
        )?)
    }

    fn mark_used(&self, name: &str) {
        self.used.lock().unwrap().insert(name.to_string());
    }

    /// A `VarBuilder` over this file that converts every tensor to `dtype` on `device`.
    pub fn var_builder(self: &Arc<Self>, dtype: DType, device: &Device) -> VarBuilder<'static> {
        source_var_builder(self.clone(), None, dtype, WeightStorage::F32, device)
    }

    /// Reads one tensor as stored (on the CPU) and marks it used.
    pub fn read_used(&self, name: &str) -> Result<Tensor> {
        let t = self.read(name)?;
        self.mark_used(name);
        Ok(t)
    }

    /// Whether the file has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Names of the tensors in the file.
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    /// Tensors in the file that were never read, except those `ignorable` says to skip.
    pub fn unused(&self, ignorable: impl Fn(&str) -> bool) -> Vec<String> {
        let used = self.used.lock().unwrap();
        self.entries
            .keys()
            .filter(|n| !used.contains(*n) && !ignorable(n))
            .cloned()
            .collect()
    }

    /// Fails if any tensor of the file was left unused: a sign that the config does not match
    /// the weights (or that weights were silently dropped).
    pub fn ensure_all_used(&self, ignorable: impl Fn(&str) -> bool) -> Result<()> {
        let unused = self.unused(ignorable);
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(5).map(String::as_str).collect();
            bail!(
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

/// Named tensors a network reads through a `VarBuilder`, by the names the network asks for
/// (diffusers / transformers names). A [`WeightFile`] is one; a single-file checkpoint seen
/// through a name mapping is another.
pub trait TensorSource: Send + Sync {
    /// Whether `name` can be read.
    fn has(&self, name: &str) -> bool;
    /// Reads `name` on the CPU (any float dtype) and records it as used.
    fn fetch(&self, name: &str) -> Result<Tensor>;
}

impl TensorSource for WeightFile {
    fn has(&self, name: &str) -> bool {
        self.contains(name)
    }
    fn fetch(&self, name: &str) -> Result<Tensor> {
        self.read_used(name)
    }
}

/// A change to some weights, applied as they are read (LoRA merging): `delta(name, shape)`
/// is what to add (f32, CPU) to the weight `name`, or `None` to leave it as it is.
pub trait WeightPatch: Send + Sync {
    fn delta(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>>;
}

/// How weight matrices and convolution kernels (tensors of rank 2 or more) are kept in memory
/// when a network computes in f32. Other tensors (biases, norms), and every tensor when the
/// network computes in f16 or bf16, take the compute dtype.
///
/// A narrow weight is widened to f32 each time a layer uses it (exactly: every f16 and bf16
/// value is an f32 value), so a 16-bit file gives the same image whether its weights are kept
/// narrow or widened at load; keeping them narrow halves their memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightStorage {
    /// [`Self::Stored`] for models whose text encoder and UNet files total more than
    /// [`AUTO_STORED_ABOVE`] bytes (SDXL in fp16), else [`Self::F32`]: widening costs a pass
    /// over each weight per use, which small models do not need to save memory.
    #[default]
    Auto,
    /// Keep weights that the file stores in f16 or bf16 as they are (unless a LoRA changed
    /// them); widen the rest.
    Stored,
    /// Widen every weight at load (the fastest compute, twice the memory of 16-bit files).
    F32,
    /// Keep weights in f16, rounding wider ones.
    F16,
    /// Keep weights in bf16, rounding wider ones.
    Bf16,
}

impl WeightStorage {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "stored" => Self::Stored,
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            _ => bail!("unknown weights dtype {s:?} (expected auto, stored, f32, f16 or bf16)"),
        })
    }

    /// [`Self::Auto`] decided for a model whose text encoder and UNet files total
    /// `file_bytes`; other choices stay.
    pub fn resolve(self, file_bytes: u64) -> Self {
        match self {
            Self::Auto if file_bytes > AUTO_STORED_ABOVE => Self::Stored,
            Self::Auto => Self::F32,
            other => other,
        }
    }

    /// The dtype to keep a tensor in: `stored` is its dtype in the file, `compute` the
    /// network's, `patched` whether a LoRA changed it (then it is f32 already).
    fn keep_as(self, stored: DType, compute: DType, rank: usize, patched: bool) -> DType {
        if compute != DType::F32 || rank < 2 {
            return compute;
        }
        match self {
            Self::F32 => compute,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
            Self::Stored if !patched && matches!(stored, DType::F16 | DType::BF16) => stored,
            Self::Stored | Self::Auto => compute,
        }
    }
}

/// Above this many bytes of weight files, [`WeightStorage::Auto`] keeps 16-bit weights
/// narrow: SDXL's fp16 files (6.9 GB) are above it, SD1.5's (2.1 GB) below.
pub const AUTO_STORED_ABOVE: u64 = 4 << 30;

/// A `VarBuilder` over any [`TensorSource`], with an optional [`WeightPatch`]: each tensor is
/// read when the network asks for it, patched in f32 if the patch touches it, then converted
/// to `dtype` on `device`, or for weights to what `storage` says. No other copy of the
/// weights is kept.
pub fn source_var_builder(
    source: Arc<dyn TensorSource>,
    patch: Option<Arc<dyn WeightPatch>>,
    dtype: DType,
    storage: WeightStorage,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(Tracked {
            source,
            patch,
            storage,
        }),
        dtype,
        device.clone(),
    )
}

struct Tracked {
    source: Arc<dyn TensorSource>,
    patch: Option<Arc<dyn WeightPatch>>,
    storage: WeightStorage,
}

fn msg(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

impl SimpleBackend for Tracked {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!(
                "shape mismatch for {name}: the config needs {:?}, the file has {:?}",
                s.dims(),
                t.dims()
            );
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut t = self.source.fetch(name).map_err(msg)?;
        let stored = t.dtype();
        let mut patched = false;
        if let Some(p) = &self.patch
            && let Some(d) = p.delta(name, t.dims()).map_err(msg)?
        {
            t = (t.to_dtype(DType::F32)? + d)?;
            patched = true;
        }
        let keep = self.storage.keep_as(stored, dtype, t.rank(), patched);
        t.to_dtype(keep)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.has(name)
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
    fn auto_keeps_16_bit_weights_only_for_big_models_and_never_biases() {
        use WeightStorage::*;
        assert_eq!(Auto.resolve(AUTO_STORED_ABOVE + 1), Stored);
        assert_eq!(Auto.resolve(2 << 30), F32);
        assert_eq!(F16.resolve(0), F16);
        let (f32_, f16_, bf16_) = (DType::F32, DType::F16, DType::BF16);
        assert_eq!(Stored.keep_as(f16_, f32_, 2, false), f16_);
        assert_eq!(Stored.keep_as(bf16_, f32_, 4, false), bf16_);
        // Biases and norms, LoRA-merged weights and f32 files take the compute dtype.
        assert_eq!(Stored.keep_as(f16_, f32_, 1, false), f32_);
        assert_eq!(Stored.keep_as(f16_, f32_, 2, true), f32_);
        assert_eq!(Stored.keep_as(f32_, f32_, 2, false), f32_);
        assert_eq!(Bf16.keep_as(f32_, f32_, 2, false), bf16_);
        assert_eq!(F32.keep_as(f16_, f32_, 2, false), f32_);
        // 16-bit compute keeps everything in its own dtype.
        assert_eq!(Bf16.keep_as(f32_, f16_, 2, false), f16_);
        assert!(WeightStorage::parse("f8").is_err());
    }

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

#[cfg(test)]
mod file_tests {
    use super::*;

    fn write(name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("tkg-wf-{name}-{}.safetensors", std::process::id()));
        let map: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, &p).unwrap();
        p
    }

    #[test]
    fn reads_converts_and_tracks_use() {
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[5f32, 6.], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let p = write("ok", &[("a.weight", a), ("b.bias", b)]);
        let f = WeightFile::open(&p).unwrap();
        let vb = f.var_builder(DType::F32, &Device::Cpu);
        let got = vb.get((2, 2), "a.weight").unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            vec![vec![1., 2.], vec![3., 4.]]
        );
        assert!(
            vb.get((4,), "a.weight")
                .unwrap_err()
                .to_string()
                .contains("shape mismatch")
        );
        assert_eq!(f.unused(|_| false), vec!["b.bias".to_string()]);
        assert!(f.ensure_all_used(|_| false).is_err());
        assert_eq!(vb.get(2, "b.bias").unwrap().dtype(), DType::F32);
        f.ensure_all_used(|_| false).unwrap();
    }

    #[test]
    fn truncated_files_are_refused_at_open() {
        let a = Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap();
        let p = write("trunc", &[("a", a)]);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        let err = WeightFile::open(&p).err().unwrap().to_string();
        assert!(err.contains("truncated"), "{err}");
        std::fs::write(&p, &bytes[..4]).unwrap();
        assert!(WeightFile::open(&p).is_err());
        std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\x00garbage").unwrap();
        assert!(WeightFile::open(&p).is_err());
    }
}
