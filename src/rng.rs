//! Initial-noise generators that reproduce PyTorch's `torch.randn`.
//!
//! - [`RngKind::TorchCpu`] (the default) is
//!   `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` for float32:
//!   mt19937, 24-bit uniforms, and PyTorch's 16-wide Box-Muller fill (`normal_fill_16_AVX2`)
//!   whose log and sin/cos are the Cephes polynomials of ATen's `avx_mathfun.h`, with the
//!   fused multiply-adds the shipping wheels compile them to. diffusers' docs recommend the CPU
//!   generator, so their seeds reproduce here bit for bit (verified against torch, see
//!   `tests/golden/rng/`).
//! - [`RngKind::TorchCuda`] is `torch.randn(shape, generator=torch.Generator("cuda")
//!   .manual_seed(seed), device="cuda")` for float32: curand's Philox4x32-10 with one
//!   subsequence per element and `curand_normal4` Box-Muller, as A1111's default "GPU" seed.
//!   The integer stream is exact; the float transform uses correctly rounded `logf`/`sincosf`
//!   where the GPU uses its own `logf` and the `__sincosf` intrinsic, so values agree with a
//!   real GPU to about 1e-6, not bit for bit (see docs/batch.md).

use std::fmt;

/// Which generator draws the initial noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RngKind {
    /// torch's CPU generator (mt19937): diffusers' recommended, reproducible everywhere.
    #[default]
    TorchCpu,
    /// torch's CUDA generator (Philox4x32-10), A1111's "GPU" seed.
    TorchCuda,
}

impl RngKind {
    pub const NAMES: [&'static str; 2] = ["torch-cpu", "torch-cuda"];

    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "torch-cpu" | "cpu" => Ok(RngKind::TorchCpu),
            "torch-cuda" | "cuda" | "gpu" => Ok(RngKind::TorchCuda),
            other => Err(format!(
                "unknown rng '{other}': use torch-cpu or torch-cuda"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RngKind::TorchCpu => "torch-cpu",
            RngKind::TorchCuda => "torch-cuda",
        }
    }
}

impl fmt::Display for RngKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `n` standard-normal float32 values for `seed`, as torch draws a fresh tensor of `n`
/// elements from a freshly seeded generator.
pub fn randn(kind: RngKind, seed: u64, n: usize) -> Vec<f32> {
    Generator::new(kind, seed).randn(n)
}

/// A seeded torch generator whose draws continue one stream, as successive `torch.randn`
/// calls with one `generator` do: the initial latents first, then a stochastic sampler's
/// per-step noise.
///
/// - torch-cpu: the mt19937 state continues, and so does the cached second Box-Muller value
///   of the scalar path (draws below 16 values), which torch keeps in the generator
///   (`next_double_normal_sample`) until a later small draw uses it. Checked against torch for
///   successive draws of 7, 16, 37, 60 and 64 values and a mixed sequence
///   (`tests/golden/samplers/`).
/// - torch-cuda: each draw of n values advances the Philox offset by ATen's
///   `calc_execution_policy` increment, `((n - 1) / (256 * blocks * 4) + 1) * 4` (blocks of 256
///   threads, unroll 4, 4 engine calls per curand_normal4), and the next draw's threads start
///   at `curand_init(seed, thread, offset)`, i.e. Philox counter `offset / 4`. **Not checked on
///   a GPU** (none was available): the first draw is the one `tests/golden/rng/` checks, and
///   the later ones follow from that offset arithmetic, which the unit tests pin down.
pub struct Generator {
    kind: RngKind,
    seed: u64,
    mt: Mt19937,
    /// torch-cpu: the cached second value of `at::normal_distribution<double>`.
    next_normal: Option<f64>,
    /// torch-cuda: `philox_offset_per_thread`, a multiple of 4.
    philox_offset: u64,
    /// torch-cuda: the GPU's thread cap (SMs x max threads per SM); `None`: every element of
    /// a draw gets its own thread (true for latents on current GPUs).
    max_threads: Option<u64>,
}

impl Generator {
    pub fn new(kind: RngKind, seed: u64) -> Self {
        Self {
            kind,
            seed,
            mt: Mt19937::new(seed),
            next_normal: None,
            philox_offset: 0,
            max_threads: None,
        }
    }

    /// For torch-cuda: the GPU's thread cap (see [`torch_cuda_randn_with`]).
    pub fn with_max_threads(mut self, max_threads: Option<u64>) -> Self {
        self.max_threads = max_threads;
        self
    }

    pub fn kind(&self) -> RngKind {
        self.kind
    }

    /// The next `torch.randn(n)` (float32) from this generator.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        match self.kind {
            RngKind::TorchCpu => torch_cpu_randn_from(&mut self.mt, &mut self.next_normal, n),
            RngKind::TorchCuda => {
                let out = torch_cuda_randn_at(self.seed, n, self.max_threads, self.philox_offset);
                self.philox_offset += cuda_offset_increment(n, self.max_threads);
                out
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// torch CPU: mt19937
// ------------------------------------------------------------------------------------------

/// The Mersenne Twister MT19937 (32-bit), as PyTorch's CPU generator uses it.
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for j in 1..624 {
            let prev = state[j - 1];
            state[j] = 1812433253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// torch's `random64()`: two draws, the first is the high half.
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// Uniform float in [0, 1) with 24 random bits (ATen's uniform_real for float).
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Uniform double in [0, 1) with 53 random bits.
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// avx_mathfun.h `log256_ps`, one lane, with the contractions of the compiled wheel.
fn cephes_logf(x0: f32) -> f32 {
    let min_norm_pos = f32::from_bits(0x0080_0000);
    let mut x = x0.max(min_norm_pos);
    let mut imm0 = (x.to_bits() >> 23) as i32;
    x = f32::from_bits((x.to_bits() & !0x7f80_0000) | 0.5f32.to_bits());
    imm0 -= 0x7f;
    let mut e = imm0 as f32;
    e += 1.0;
    let mask = x < std::f32::consts::FRAC_1_SQRT_2;
    let tmp = if mask { x } else { 0.0 };
    x -= 1.0;
    if mask {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = 7.037_683_6e-2f32;
    for c in [
        -1.151_461e-1f32,
        1.167_699_9e-1,
        -1.242_014_1e-1,
        1.424_932_3e-1,
        -1.666_805_8e-1,
        2.000_071_4e-1,
        -2.499_999_4e-1,
        3.333_333e-1,
    ] {
        y = y.mul_add(x, c);
    }
    y *= x;
    let eq1 = e * -2.121_944_4e-4;
    y = y.mul_add(z, eq1);
    y = z.mul_add(-0.5, y);
    x += y;
    e.mul_add(0.693_359_4, x)
}

/// avx_mathfun.h `sincos256_ps`, one lane, with the contractions of the compiled wheel.
fn cephes_sincosf(theta: f32) -> (f32, f32) {
    let mut sign_sin = theta.to_bits() & 0x8000_0000;
    let mut x = f32::from_bits(theta.to_bits() & 0x7fff_ffff);
    let y0 = x * 1.273_239_5f32; // 4/pi
    let mut imm2 = y0 as i32; // cvttps: truncation
    imm2 = (imm2 + 1) & !1;
    let yq = imm2 as f32;
    let swap_sign = ((imm2 & 4) as u32) << 29;
    let poly = (imm2 & 2) == 0;
    sign_sin ^= swap_sign;
    let sign_cos = ((!(imm2 - 2) & 4) as u32) << 29;
    // Extended-precision modular arithmetic (DP1, DP2, DP3 = -pi/4 split in three).
    x = yq.mul_add(-0.785_156_25, x);
    x = yq.mul_add(-2.418_756_5e-4, x);
    x = yq.mul_add(-3.774_895e-8, x);
    let z = x * x;
    let mut yc = 2.443_315_7e-5f32.mul_add(z, -1.388_731_6e-3);
    yc = yc.mul_add(z, 4.166_664_6e-2);
    yc *= z;
    let half_z = z * 0.5;
    yc = yc.mul_add(z, -half_z);
    yc += 1.0;
    let mut ys = (-1.951_529_6e-4f32).mul_add(z, 8.332_161e-3);
    ys = ys.mul_add(z, -1.666_665_5e-1);
    ys *= z;
    ys = ys.mul_add(x, x);
    let (s, c) = if poly { (ys, yc) } else { (yc, ys) };
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(c.to_bits() ^ sign_cos),
    )
}

/// `normal_fill_16_AVX2`: Box-Muller over the pairs (j, j + 8), in place.
fn box_muller_16(data: &mut [f32]) {
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * cephes_logf(u1)).sqrt();
        let (sin, cos) = cephes_sincosf(two_pi * u2);
        // fmadd(n, std = 1, mean = 0) is exact.
        data[j] = radius * cos;
        data[j + 8] = radius * sin;
    }
}

/// `torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))` for float32.
pub fn torch_cpu_randn(seed: u64, n: usize) -> Vec<f32> {
    torch_cpu_randn_from(&mut Mt19937::new(seed), &mut None, n)
}

/// The next `torch.randn(n)` from a CPU generator in state `g` with normal cache `cached`.
fn torch_cpu_randn_from(g: &mut Mt19937, cached: &mut Option<f64>, n: usize) -> Vec<f32> {
    if n < 16 {
        return torch_cpu_randn_scalar(g, cached, n);
    }
    let mut data: Vec<f32> = (0..n).map(|_| g.uniform_f32()).collect();
    for chunk in data.chunks_exact_mut(16) {
        box_muller_16(chunk);
    }
    if !n.is_multiple_of(16) {
        // PyTorch redraws the last 16 values and fills them again.
        let tail = &mut data[n - 16..];
        for v in tail.iter_mut() {
            *v = g.uniform_f32();
        }
        box_muller_16(tail);
    }
    data
}

/// Below 16 elements torch draws each value from `at::normal_distribution<double>`, which
/// caches the second Box-Muller value in the generator (it outlives the call).
fn torch_cpu_randn_scalar(g: &mut Mt19937, cached: &mut Option<f64>, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if let Some(v) = cached.take() {
                return v as f32;
            }
            let u1 = g.uniform_f64();
            let u2 = g.uniform_f64();
            let r = (-2.0 * (-u2).ln_1p()).sqrt();
            let theta = 2.0 * std::f64::consts::PI * u1;
            *cached = Some(r * theta.sin());
            (r * theta.cos()) as f32
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// torch CUDA: Philox4x32-10 (curand)
// ------------------------------------------------------------------------------------------

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

/// One Philox4x32-10 block: 10 rounds over `ctr` with `key`.
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(PHILOX_W0);
            key[1] = key[1].wrapping_add(PHILOX_W1);
        }
        let p0 = (PHILOX_M0 as u64) * (ctr[0] as u64);
        let p1 = (PHILOX_M1 as u64) * (ctr[2] as u64);
        ctr = [
            ((p1 >> 32) as u32) ^ ctr[1] ^ key[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ ctr[3] ^ key[1],
            p0 as u32,
        ];
    }
    ctr
}

/// curand's `_curand_box_muller`: two normals from two 32-bit draws; returns (x, y) =
/// (s sin v, s cos v).
fn curand_box_muller(a: u32, b: u32) -> (f32, f32) {
    const INV: f32 = 2.328_306_4e-10; // CURAND_2POW32_INV
    const INV_2PI: f32 = 2.328_306_4e-10 * 6.283_185_5; // CURAND_2POW32_INV_2PI
    // nvcc contracts x * c + c/2 into one fma.
    let u = (a as f32).mul_add(INV, INV / 2.0);
    let v = (b as f32).mul_add(INV_2PI, INV_2PI / 2.0);
    // log, sin and cos correctly rounded (computed in f64, rounded once to f32).
    let s = (-2.0 * ((u as f64).ln() as f32)).sqrt();
    let v = v as f64;
    ((v.sin() as f32) * s, (v.cos() as f32) * s)
}

/// `curand_normal4` for the thread whose state was `curand_init(seed, subsequence, 0)`,
/// its `call`-th invocation.
fn curand_normal4(key: [u32; 2], subsequence: u64, call: u64) -> [f32; 4] {
    let ctr = [
        call as u32,
        (call >> 32) as u32,
        subsequence as u32,
        (subsequence >> 32) as u32,
    ];
    let r = philox4x32_10(ctr, key);
    let (a, b) = curand_box_muller(r[0], r[1]);
    let (c, d) = curand_box_muller(r[2], r[3]);
    [a, b, c, d]
}

/// The number of GPU threads torch launches for a float normal_ of `n` elements when the
/// grid is not capped by the device (blocks of 256): every element gets its own thread as
/// long as `n` is below the cap (SMs x max threads per SM, e.g. 270336 on an H100, 83968 on
/// a T4); above it the layout depends on the GPU, and `max_threads` must be given.
pub fn torch_cuda_randn_with(seed: u64, n: usize, max_threads: Option<u64>) -> Vec<f32> {
    torch_cuda_randn_at(seed, n, max_threads, 0)
}

const CUDA_BLOCK: u64 = 256;
const CUDA_UNROLL: u64 = 4;
/// curand_normal4 consumes one Philox block of 4 values: ATen's `curand4_engine_calls`.
const CURAND4_ENGINE_CALLS: u64 = 4;

/// The grid ATen launches for `n` elements: blocks of 256, capped at max_threads / 256.
fn cuda_blocks(n: u64, max_threads: Option<u64>) -> u64 {
    let blocks = n.div_ceil(CUDA_BLOCK).max(1);
    match max_threads {
        Some(t) => blocks.min((t / CUDA_BLOCK).max(1)),
        None => blocks,
    }
}

/// How far one float randn of `n` values moves the CUDA generator's Philox offset
/// (`calc_execution_policy`'s counter_offset, which `philox_cuda_state` rounds up to a
/// multiple of 4; it already is one). An empty draw launches nothing.
pub fn cuda_offset_increment(n: usize, max_threads: Option<u64>) -> u64 {
    if n == 0 {
        return 0;
    }
    let n = n as u64;
    let per_pass = CUDA_BLOCK * cuda_blocks(n, max_threads) * CUDA_UNROLL;
    ((n - 1) / per_pass + 1) * CURAND4_ENGINE_CALLS
}

/// A float randn of `n` values on a CUDA generator whose Philox offset is `offset`: thread
/// `idx` starts at `curand_init(seed, idx, offset)`, i.e. Philox counter `offset / 4`.
pub fn torch_cuda_randn_at(seed: u64, n: usize, max_threads: Option<u64>, offset: u64) -> Vec<f32> {
    let n64 = n as u64;
    let threads = cuda_blocks(n64, max_threads) * CUDA_BLOCK;
    let first_call = offset / 4;
    let key = [seed as u32, (seed >> 32) as u32];
    let mut out = vec![0f32; n];
    // distribution_elementwise_grid_stride_kernel: thread idx draws a float4 per loop and
    // writes lane ii to idx + ii * threads; the loop strides by threads * 4.
    for idx in 0..threads.min(n64) {
        let mut call = first_call;
        let mut base = idx;
        while base < n64 {
            let r = curand_normal4(key, idx, call);
            for (ii, v) in r.iter().enumerate() {
                let li = base + ii as u64 * threads;
                if li < n64 {
                    out[li as usize] = *v;
                }
            }
            call += 1;
            base += threads * CUDA_UNROLL;
        }
    }
    out
}

/// `torch.randn(n, generator=torch.Generator("cuda").manual_seed(seed), device="cuda")`,
/// float32, for a freshly seeded generator and a GPU that gives every element a thread.
pub fn torch_cuda_randn(seed: u64, n: usize) -> Vec<f32> {
    torch_cuda_randn_with(seed, n, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_output() {
        // The C++ standard requires the 10000th output of mt19937 seeded 5489 to be 4123659995.
        let mut g = Mt19937::new(5489);
        let mut v = 0;
        for _ in 0..10000 {
            v = g.next_u32();
        }
        assert_eq!(v, 4123659995);
    }

    #[test]
    fn philox_known_answer() {
        // Random123's known-answer vectors for philox4x32_10.
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10(
                [0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff],
                [0xffffffff, 0xffffffff]
            ),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn cephes_math_is_close_to_libm() {
        for i in 1..2000 {
            let x = i as f32 / 2000.0;
            assert!((cephes_logf(x) - x.ln()).abs() < 1e-6, "log {x}");
            let t = x * 6.283_185_5;
            let (s, c) = cephes_sincosf(t);
            assert!(
                (s - t.sin()).abs() < 1e-6 && (c - t.cos()).abs() < 1e-6,
                "{t}"
            );
        }
    }

    #[test]
    fn randn_is_standard_normal_and_seeded() {
        for kind in [RngKind::TorchCpu, RngKind::TorchCuda] {
            let a = randn(kind, 42, 4096);
            let b = randn(kind, 42, 4096);
            let c = randn(kind, 43, 4096);
            assert_eq!(a, b);
            assert_ne!(a, c);
            let mean = a.iter().sum::<f32>() / a.len() as f32;
            let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32;
            assert!(
                mean.abs() < 0.05 && (var - 1.0).abs() < 0.08,
                "{kind}: {mean} {var}"
            );
            assert_eq!(randn(kind, 1, 21).len(), 21);
            assert_eq!(randn(kind, 1, 5).len(), 5);
        }
    }

    #[test]
    fn capped_cuda_grid_changes_only_the_layout() {
        // With one block of 256 threads, element 256 comes from lane 1 of thread 0.
        let full = torch_cuda_randn(7, 300);
        let capped = torch_cuda_randn_with(7, 300, Some(256));
        assert_eq!(full[..256], capped[..256]);
        let key = [7, 0];
        assert_eq!(capped[256], curand_normal4(key, 0, 0)[1]);
    }

    /// Compares against tests/golden/rng/goldens.json (made by make_goldens.py there): the
    /// torch-cpu values were drawn by torch itself; the torch-cuda ones by a NumPy
    /// reimplementation (no GPU here).
    #[test]
    fn matches_the_goldens_bit_for_bit() {
        use sha2::{Digest, Sha256};
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../tests/golden/rng/goldens.json")).unwrap();
        let mut checked = 0;
        for (kind, name) in [
            (RngKind::TorchCpu, "torch-cpu"),
            (RngKind::TorchCuda, "torch-cuda"),
        ] {
            for case in doc[name].as_array().unwrap() {
                let seed = case["seed"].as_u64().unwrap();
                let n = case["n"].as_u64().unwrap() as usize;
                let v = match (kind, case["max_threads"].as_u64()) {
                    (RngKind::TorchCuda, cap @ Some(_)) => torch_cuda_randn_with(seed, n, cap),
                    _ => randn(kind, seed, n),
                };
                let bits = |s: &[f32]| -> Vec<String> {
                    s.iter().map(|x| format!("{:08x}", x.to_bits())).collect()
                };
                let want = |k: &str| -> Vec<String> {
                    case[k]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| b.as_str().unwrap().to_string())
                        .collect()
                };
                assert_eq!(bits(&v[..n.min(8)]), want("head_bits"), "{name} {case}");
                assert_eq!(
                    bits(&v[n.saturating_sub(8)..]),
                    want("tail_bits"),
                    "{name} {case}"
                );
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let digest: String = Sha256::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                assert_eq!(digest, case["sha256"].as_str().unwrap(), "{name} {case}");
                checked += 1;
            }
        }
        assert!(checked >= 20, "only {checked} golden cases");
    }

    #[test]
    fn cuda_first_draw_is_unchanged_and_later_ones_move_the_philox_counter() {
        for n in [1usize, 10, 300, 5000] {
            let mut g = Generator::new(RngKind::TorchCuda, 7);
            assert_eq!(g.randn(n), torch_cuda_randn(7, n), "first draw of {n}");
            // One element per thread: every draw advances the offset by 4, so the second
            // draw's thread j starts at Philox counter 1 and the third at 2.
            let second = g.randn(n);
            let third = g.randn(n);
            for j in [0, n / 2, n - 1] {
                assert_eq!(
                    second[j],
                    curand_normal4([7, 0], j as u64, 1)[0],
                    "n {n} j {j}"
                );
                assert_eq!(
                    third[j],
                    curand_normal4([7, 0], j as u64, 2)[0],
                    "n {n} j {j}"
                );
            }
            assert_ne!(second, third);
        }
    }

    #[test]
    fn cuda_offset_increment_follows_aten() {
        // ((n - 1) / (256 * blocks * 4) + 1) * 4.
        assert_eq!(cuda_offset_increment(0, None), 0);
        assert_eq!(cuda_offset_increment(1, None), 4);
        assert_eq!(cuda_offset_increment(16384, None), 4);
        assert_eq!(cuda_offset_increment(1024, Some(256)), 4);
        assert_eq!(cuda_offset_increment(1025, Some(256)), 8);
        assert_eq!(cuda_offset_increment(65536, Some(40 * 1024)), 4);
        assert_eq!(cuda_offset_increment(4 * 128 * 128, Some(40 * 1024)), 4);
        assert_eq!(cuda_offset_increment(40 * 1024 * 4 + 1, Some(40 * 1024)), 8);
        // A capped grid: the 2000-value draw takes two passes of 1024 per thread block, so the
        // next draw starts two Philox blocks later.
        let mut g = Generator::new(RngKind::TorchCuda, 3).with_max_threads(Some(256));
        let first = g.randn(2000);
        assert_eq!(first, torch_cuda_randn_with(3, 2000, Some(256)));
        let second = g.randn(4);
        assert_eq!(second[0], curand_normal4([3, 0], 0, 2)[0]);
        // An empty draw moves nothing.
        let mut a = Generator::new(RngKind::TorchCuda, 9);
        let mut b = Generator::new(RngKind::TorchCuda, 9);
        a.randn(0);
        assert_eq!(a.randn(8), b.randn(8));
    }

    /// Successive torch.randn calls on one CPU generator, drawn by torch
    /// (tests/golden/samplers/golden.json, `generator`).
    #[test]
    fn cpu_draws_continue_like_torch() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../tests/golden/samplers/golden.json")).unwrap();
        let cases = doc["generator"].as_array().unwrap();
        assert!(cases.len() >= 8);
        for case in cases {
            let seed = case["seed"].as_u64().unwrap();
            let mut g = Generator::new(RngKind::TorchCpu, seed);
            let sizes = case["sizes"].as_array().unwrap();
            let draws = case["draws"].as_array().unwrap();
            assert_eq!(sizes.len(), draws.len());
            for (k, (n, want)) in sizes.iter().zip(draws).enumerate() {
                let v = g.randn(n.as_u64().unwrap() as usize);
                let got: String = v.iter().map(|x| format!("{:08x}", x.to_bits())).collect();
                assert_eq!(
                    got,
                    want.as_str().unwrap(),
                    "seed {seed} sizes {sizes:?} draw {k}"
                );
            }
        }
    }

    #[test]
    fn rng_names_round_trip() {
        for n in RngKind::NAMES {
            assert_eq!(RngKind::parse(n).unwrap().name(), n);
        }
        assert!(RngKind::parse("mersenne").is_err());
    }
}
