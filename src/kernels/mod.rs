//! CPU kernels for f32 where candle's generic ones are slow: convolution (tiled im2col straight
//! from NCHW into `gemm`, with the bias, the timestep embedding and the residual fused in),
//! group norm fused with SiLU, memory-efficient attention that reads heads in place, and GEGLU.
//!
//! Each kernel works on contiguous f32 CPU tensors and returns a new tensor; callers check
//! [`applies`] and keep candle's ops for other devices and dtypes. Work is split over rayon's
//! global pool, and every `gemm` inside a parallel task is single-threaded.

pub mod attention;
mod bf16;
pub mod conv;
pub mod linear;
pub mod matmul;
pub mod norm;
mod prepared;
pub mod simd;
mod winograd;

pub use prepared::{PreparedConv, PreparedLinear};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Shape, Storage, StorageRef, Tensor};
use std::marker::PhantomData;
use std::sync::OnceLock;

/// How the CPU kernels run; built once by the caller (the CLI builds it from flags and the
/// environment, see [`KernelConfig::from_lookup`]) and installed with [`configure`]. The
/// library itself reads no environment variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelConfig {
    /// Whether the fast kernels run at all; `false` runs candle's ops everywhere (for
    /// comparisons).
    pub enabled: bool,
    /// Whether 3x3 stride-1 convolutions on large enough maps use Winograd;
    /// `false` runs im2col for every convolution (for comparisons).
    pub winograd: bool,
    /// Whether the larger maps among those use F(4x4, 3x3) rather than F(2x2, 3x3); `false`
    /// runs F(2x2) wherever Winograd runs (for comparisons).
    pub winograd_f4: bool,
    /// Whether the kernels add their wall-clock time to [`profile`]'s totals.
    pub profile: bool,
}

impl Default for KernelConfig {
    /// Kernels on, Winograd (both tile sizes) on, no profiling.
    fn default() -> Self {
        Self {
            enabled: true,
            winograd: true,
            winograd_f4: true,
            profile: false,
        }
    }
}

impl KernelConfig {
    /// The config from variables looked up by `get` (the CLI passes `std::env::var`):
    /// `TKG_KERNELS=0` turns the kernels off, `TKG_WINOGRAD=0` turns Winograd off,
    /// `TKG_WINOGRAD_F4=0` its 4x4 tiles (any other value, or none, leaves each on),
    /// `TKG_PROFILE=1` turns profiling on (any other value, or none, leaves it off).
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Self {
        let on_unless_zero = |name: &str| get(name).is_none_or(|v| v != "0");
        Self {
            enabled: on_unless_zero("TKG_KERNELS"),
            winograd: on_unless_zero("TKG_WINOGRAD"),
            winograd_f4: on_unless_zero("TKG_WINOGRAD_F4"),
            profile: get("TKG_PROFILE").is_some_and(|v| v == "1"),
        }
    }
}

/// The process-wide config: set by [`configure`], or fixed at the default by the first
/// [`config`] that finds none.
static CONFIG: OnceLock<KernelConfig> = OnceLock::new();

/// Installs the process-wide config (like rayon's global pool: once, before any tensor work).
/// Installing the same config again is fine; a different one is an error, as is any config
/// other than the default once the kernels have run (their first call fixes the default, so
/// a run never changes its kernels half-way).
pub fn configure(cfg: KernelConfig) -> Result<()> {
    install(&CONFIG, cfg)
}

fn install(cell: &OnceLock<KernelConfig>, cfg: KernelConfig) -> Result<()> {
    let installed = *cell.get_or_init(|| cfg);
    anyhow::ensure!(
        installed == cfg,
        "kernels: config {installed:?} already in use, cannot install {cfg:?}"
    );
    Ok(())
}

/// The installed config, else the default (which then stays: see [`configure`]).
pub fn config() -> KernelConfig {
    *CONFIG.get_or_init(KernelConfig::default)
}

/// Whether the fast kernels can run on `t`: f32 on the CPU, and the kernels are enabled in
/// [`config`] (else callers run candle's ops).
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && config().enabled
}

/// A weight as a contiguous f32 tensor. Weights kept in f16 or bf16 (see
/// [`crate::models::weights::WeightStorage`]) are widened here, per call, in parallel chunks;
/// f16 and bf16 widen to f32 exactly, so the result is the weight an f32 load would give.
pub fn f32_weight(w: &Tensor) -> Result<Tensor> {
    match w.dtype() {
        DType::F32 => Ok(w.contiguous()?),
        DType::F16 => widen::<half::f16>(w),
        DType::BF16 => widen::<half::bf16>(w),
        other => bail!("internal: a {other:?} weight cannot be widened to f32"),
    }
}

fn widen<T>(w: &Tensor) -> Result<Tensor>
where
    T: candle_core::WithDType,
    [T]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    // Big enough that a chunk costs more than scheduling it, small enough to balance.
    const CHUNK: usize = 1 << 16;
    let _p = profile::scope(|| format!("widen {:?} weight", T::DTYPE));
    let w = w.contiguous()?;
    let (guard, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*guard else {
        bail!("internal: only CPU weights are widened here");
    };
    let src = &cpu.as_slice::<T>()?[layout.start_offset()..][..w.elem_count()];
    let mut out = vec![0f32; src.len()];
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(o, s)| s.convert_to_f32_slice(o));
    drop(guard);
    tensor(out, w.shape().clone())
}

/// Builds rayon's global pool with `n` threads and 64 MiB stacks. It runs candle's
/// convolutions and the kernels; the big stacks are for callers that run a whole command on a
/// pool thread (as `cli::run` does). Call it once, before any parallel work: rayon fixes its
/// global pool on first use, and this returns an error if that already happened.
pub fn build_thread_pool(n: usize) -> Result<()> {
    anyhow::ensure!(n >= 1, "the thread pool needs at least 1 thread");
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .stack_size(64 << 20)
        .build_global()
        .context("building rayon's global thread pool")
}

/// Read access to a contiguous f32 CPU tensor's values.
pub(crate) struct F32View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> F32View<'a> {
    /// `t` must be contiguous (call `.contiguous()` first).
    pub(crate) fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        if !layout.is_contiguous() {
            bail!("internal: kernel input is not contiguous");
        }
        if !matches!(&*guard, Storage::Cpu(_)) || t.dtype() != DType::F32 {
            bail!("internal: kernel input is not an f32 CPU tensor");
        }
        Ok(Self {
            guard,
            start: layout.start_offset(),
            len: t.elem_count(),
        })
    }

    pub(crate) fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(c) => {
                &c.as_slice::<f32>().expect("checked f32")[self.start..self.start + self.len]
            }
            _ => unreachable!("checked CPU"),
        }
    }
}

/// Wraps kernel output as a CPU tensor (no copy).
pub(crate) fn tensor(data: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Ok(Tensor::from_vec(data, shape.into(), &Device::Cpu)?)
}

/// A mutable f32 buffer handed to parallel tasks that each write a disjoint part of it: a
/// `&'a mut [f32]` split by hand (raw pointers are not `Send`, and the parts are not
/// contiguous runs that `chunks_mut` could make). It keeps the buffer's length, which every
/// access checks in debug builds, and its borrow, so the buffer cannot be touched or freed
/// while a `SendPtr` to it is alive.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: a SendPtr stands for the `&'a mut [f32]` it was made from, which may be sent to
// another thread (f32 is Send). Accesses go through the unsafe `at` and `slice_mut`, whose
// callers guarantee that no two threads touch the same element at the same time.
unsafe impl Send for SendPtr<'_> {}
// SAFETY: sharing a `&SendPtr` shares only the pointer and the length; writes through them
// are made by `at` and `slice_mut` callers on parts of the buffer no other task accesses
// concurrently (f32 is Sync).
unsafe impl Sync for SendPtr<'_> {}

impl<'a> SendPtr<'a> {
    pub(crate) fn new(buf: &'a mut [f32]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: PhantomData,
        }
    }

    /// The elements `offset..offset + len` as a buffer of their own (checked: panics outside
    /// the buffer).
    pub(crate) fn sub(self, offset: usize, len: usize) -> Self {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "SendPtr::sub: {offset}+{len} outside {}",
            self.len
        );
        Self {
            // SAFETY: offset <= self.len (asserted), so the pointer stays inside the buffer
            // or one past its end.
            ptr: unsafe { self.ptr.add(offset) },
            len,
            _buf: PhantomData,
        }
    }

    /// A pointer to element `offset`, for an access to at most the `span` elements from there
    /// (see [`span`]).
    ///
    /// # Safety
    /// `offset + span` must not exceed the buffer's length (checked in debug builds), and
    /// while the pointer is used no other task may access those elements.
    #[inline(always)]
    pub(crate) unsafe fn at(self, offset: usize, span: usize) -> *mut f32 {
        debug_assert!(
            offset.checked_add(span).is_some_and(|end| end <= self.len),
            "SendPtr::at: {offset}+{span} outside {}",
            self.len
        );
        // SAFETY: offset <= len by the caller's promise: inside the buffer or one past its end.
        unsafe { self.ptr.add(offset) }
    }

    /// The elements `offset..offset + len` as a slice.
    ///
    /// # Safety
    /// As for [`SendPtr::at`] with `span = len`, and no other reference to those elements may
    /// exist while the slice does.
    #[inline(always)]
    pub(crate) unsafe fn slice_mut(self, offset: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: the caller's promise: in bounds (debug-checked in `at`) and not aliased.
        unsafe { std::slice::from_raw_parts_mut(self.at(offset, len), len) }
    }
}

/// How many elements a [rows, cols] matrix with row stride `rs` and column stride `cs` spans
/// from its first element: the offset of its last element plus one (0 when it is empty).
#[inline(always)]
pub(crate) fn span(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// A pointer for `gemm` to read a [rows, cols] matrix with strides (rs, cs) from `s[offset..]`,
/// after checking in debug builds that the matrix lies inside `s`.
#[inline(always)]
pub(crate) fn matrix(
    s: &[f32],
    offset: usize,
    (rows, cols): (usize, usize),
    (rs, cs): (usize, usize),
) -> *const f32 {
    debug_assert!(
        offset + span(rows, cols, rs, cs) <= s.len(),
        "matrix [{rows}, {cols}] strides ({rs}, {cs}) at {offset} outside {}",
        s.len()
    );
    s[offset..].as_ptr()
}

/// [`matrix`] for a buffer `gemm` writes.
#[inline(always)]
pub(crate) fn matrix_mut(
    s: &mut [f32],
    offset: usize,
    (rows, cols): (usize, usize),
    (rs, cs): (usize, usize),
) -> *mut f32 {
    debug_assert!(
        offset + span(rows, cols, rs, cs) <= s.len(),
        "matrix [{rows}, {cols}] strides ({rs}, {cs}) at {offset} outside {}",
        s.len()
    );
    s[offset..].as_mut_ptr()
}

/// The number of threads the kernels split work over.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

thread_local! {
    static IN_ORDER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the kernels' tasks executed in order on the calling thread: for work that
/// already runs one item per core (the images of a CPU batch), where splitting each kernel
/// over the pool again only adds overhead. The tasks are the same as in parallel (their
/// partition depends on [`threads`], not on this), so the results are bit-identical.
pub fn in_order<R>(f: impl FnOnce() -> R) -> R {
    let before = IN_ORDER.with(|c| c.replace(true));
    let r = f();
    IN_ORDER.with(|c| c.set(before));
    r
}

fn is_in_order() -> bool {
    IN_ORDER.with(|c| c.get())
}

/// A per-thread spare buffer for [`with_scratch`].
pub(crate) type Scratch = std::thread::LocalKey<std::cell::Cell<Vec<f32>>>;

/// Runs `f` on a buffer of `len` f32s taken from this thread's spare `slot` (grown with zeros
/// when too short, else holding whatever the last user left: `f` must write before it reads),
/// and keeps the buffer for the next call. Large kernel buffers are thus allocated once per
/// thread instead of page-faulted in afresh on every call, which costs as much as the
/// arithmetic on small feature maps. The buffer is taken out, not borrowed, so work that rayon
/// runs on this thread meanwhile (while `f` waits on a join) finds the slot empty and
/// allocates its own.
pub(crate) fn with_scratch<R>(
    slot: &'static Scratch,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut buf = slot.take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    slot.set(buf);
    r
}

/// Frees the buffers the kernels keep on this thread (see [`with_scratch`]); the largest is a
/// Winograd weight transform, up to ~210 MB on SDXL, kept by the thread that calls the model.
/// The pipeline calls this between the denoising loop and the VAE, so the decode's peak does
/// not carry the UNet's largest transform. The pool's threads keep their smaller buffers.
pub fn release_scratch() {
    winograd::release_scratch();
}

/// `f(i)` for every i in 0..n, over rayon's pool (in order inside [`in_order`]).
pub(crate) fn for_each_task(n: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    if is_in_order() {
        (0..n).for_each(f);
    } else {
        (0..n).into_par_iter().for_each(f);
    }
}

/// [`for_each_task`] with scratch state `init()` per worker.
pub(crate) fn for_each_task_with<S>(
    n: usize,
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(&mut S, usize) + Sync + Send,
) {
    use rayon::prelude::*;
    if is_in_order() {
        let mut s = init();
        (0..n).for_each(|i| f(&mut s, i));
    } else {
        (0..n).into_par_iter().for_each_init(init, f);
    }
}

/// `f(i, chunk)` for the consecutive `len`-long chunks of `data` (the last may be shorter),
/// over rayon's pool (in order inside [`in_order`]).
pub(crate) fn for_each_chunk<T: Send>(
    data: &mut [T],
    len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    use rayon::prelude::*;
    if is_in_order() {
        data.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        data.par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// Parallelism for a `gemm` call that is the only task: the pool, or none inside
/// [`in_order`] (the gemm crate's split does not change its arithmetic).
pub(crate) fn gemm_parallelism(nthreads: usize) -> gemm::Parallelism {
    if nthreads == 1 || is_in_order() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(nthreads)
    }
}

/// Per-kernel wall-clock totals, collected when [`KernelConfig::profile`] is on (the CLI turns
/// it on with `TKG_PROFILE=1`, for `tkg bench`).
pub mod profile {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    static TOTALS: Mutex<BTreeMap<String, (Duration, usize)>> = Mutex::new(BTreeMap::new());

    fn enabled() -> bool {
        super::config().profile
    }

    /// Times its scope under `name` while profiling is on.
    pub struct Scope(Option<(String, Instant)>);

    pub fn scope(name: impl FnOnce() -> String) -> Scope {
        Scope(enabled().then(|| (name(), Instant::now())))
    }

    impl Drop for Scope {
        fn drop(&mut self) {
            if let Some((name, t)) = self.0.take() {
                let mut m = TOTALS.lock().unwrap();
                let e = m.entry(name).or_default();
                e.0 += t.elapsed();
                e.1 += 1;
            }
        }
    }

    /// The totals so far, largest first, and clears them.
    pub fn take() -> Vec<(String, Duration, usize)> {
        let mut m = TOTALS.lock().unwrap();
        let mut v: Vec<_> = std::mem::take(&mut *m)
            .into_iter()
            .map(|(k, (d, n))| (k, d, n))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        v
    }
}

/// Helpers shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{Device, Tensor};

    /// Deterministic values in [-0.5, 0.5) (an LCG), on the CPU.
    pub fn rand(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Largest absolute value of a tensor.
    pub fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Largest absolute difference between two tensors of the same shape.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::rand;
    use super::*;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    /// The three switches keep the meanings they had as environment variables.
    #[test]
    fn from_lookup_parses_the_switches() {
        let from = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|&(k, v)| (k.to_string(), v.to_string()))
                .collect();
            KernelConfig::from_lookup(&move |k| {
                vars.iter()
                    .find(|(name, _)| name == k)
                    .map(|(_, v)| v.clone())
            })
        };
        assert_eq!(from(&[]), KernelConfig::default());
        assert_eq!(
            KernelConfig::default(),
            KernelConfig {
                enabled: true,
                winograd: true,
                winograd_f4: true,
                profile: false
            }
        );
        let cfg = |enabled, winograd, profile| KernelConfig {
            enabled,
            winograd,
            winograd_f4: true,
            profile,
        };
        assert_eq!(from(&[("TKG_KERNELS", "0")]), cfg(false, true, false));
        assert_eq!(from(&[("TKG_WINOGRAD", "0")]), cfg(true, false, false));
        assert_eq!(from(&[("TKG_PROFILE", "1")]), cfg(true, true, true));
        assert_eq!(
            from(&[("TKG_WINOGRAD_F4", "0")]),
            KernelConfig {
                winograd_f4: false,
                ..KernelConfig::default()
            }
        );
        assert_eq!(
            from(&[
                ("TKG_KERNELS", "0"),
                ("TKG_WINOGRAD", "0"),
                ("TKG_PROFILE", "1")
            ]),
            cfg(false, false, true)
        );
        // Only "0" turns a kernel switch off and only "1" turns profiling on.
        for v in ["1", "", "false", "00", " 0"] {
            let c = from(&[("TKG_KERNELS", v), ("TKG_WINOGRAD", v)]);
            assert!(c.enabled && c.winograd, "{v:?}");
        }
        for v in ["0", "", "true", "yes", "01"] {
            assert!(!from(&[("TKG_PROFILE", v)]).profile, "{v:?}");
        }
        // Other variables are not looked at.
        assert_eq!(from(&[("TKG_MALLOC_TUNING", "0")]), KernelConfig::default());
    }

    /// A config is installed once: the same one again is fine, a different one is refused
    /// and the first stays.
    #[test]
    fn configure_rejects_a_different_config() {
        let cell = OnceLock::new();
        let first = KernelConfig {
            winograd: false,
            ..KernelConfig::default()
        };
        install(&cell, first).unwrap();
        install(&cell, first).unwrap();
        for other in [
            KernelConfig::default(),
            KernelConfig {
                profile: true,
                ..first
            },
        ] {
            let err = install(&cell, other).unwrap_err().to_string();
            assert!(err.contains("already in use"), "{err}");
        }
        assert_eq!(cell.get(), Some(&first));

        // The process-wide one: other tests run kernels, which fixes the default, so only the
        // default can be installed here (and no test may install anything else).
        configure(KernelConfig::default()).unwrap();
        assert!(
            configure(KernelConfig {
                enabled: false,
                ..KernelConfig::default()
            })
            .is_err()
        );
        assert_eq!(config(), KernelConfig::default());
    }

    /// Every kernel gives the same bits in order as over the pool (the batch relies on it).
    #[test]
    fn in_order_is_bit_identical() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        pool.install(|| {
            let runs: Vec<Box<dyn Fn() -> Tensor + Sync>> = vec![
                // conv_small, tiled im2col (strided), Winograd (upsampled, and with a bias)
                Box::new(|| {
                    let x = rand(&[2, 8, 6, 6], 1);
                    conv::conv2d(&x, &rand(&[40, 8, 3, 3], 2), None, None, 1, 1).unwrap()
                }),
                Box::new(|| {
                    let x = rand(&[2, 5, 70, 70], 3);
                    conv::conv2d(&x, &rand(&[6, 5, 3, 3], 4), None, None, 2, 1).unwrap()
                }),
                Box::new(|| {
                    let x = rand(&[1, 5, 30, 30], 5);
                    conv::conv2d_upsample2x(&x, &rand(&[6, 5, 3, 3], 6), None, 1).unwrap()
                }),
                Box::new(|| {
                    let x = rand(&[2, 16, 40, 40], 7);
                    let b = rand(&[20], 8);
                    conv::conv2d(&x, &rand(&[20, 16, 3, 3], 9), Some(&b), None, 1, 1).unwrap()
                }),
                // few tasks: one gemm split by the gemm crate itself
                Box::new(|| {
                    let x = rand(&[1, 8, 3, 700], 20);
                    conv::conv2d(&x, &rand(&[300, 8, 1, 1], 21), None, None, 1, 0).unwrap()
                }),
                Box::new(|| {
                    let x = rand(&[2, 300, 24], 10);
                    let b = rand(&[70], 11);
                    linear::linear(&x, &rand(&[70, 24], 12), None, Some(&b), None).unwrap()
                }),
                Box::new(|| linear::geglu(&rand(&[3, 200, 64], 13)).unwrap()),
                Box::new(|| {
                    let (g, b) = (rand(&[32], 14), rand(&[32], 15));
                    norm::group_norm(&rand(&[2, 32, 9, 9], 16), 8, &g, &b, 1e-5, true).unwrap()
                }),
                Box::new(|| {
                    let (q, k) = (rand(&[2, 300, 32], 17), rand(&[2, 77, 32], 18));
                    attention::attention(&q, &k, &rand(&[2, 77, 32], 19), 4).unwrap()
                }),
            ];
            for (i, run) in runs.iter().enumerate() {
                assert_eq!(bits(&run()), bits(&in_order(run)), "kernel {i}");
            }
        });
    }
}
