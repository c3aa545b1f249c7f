//! Vectorisable element-wise math: exp, SiLU, erf-GELU and lane-split sums.
//!
//! The loops are written so LLVM vectorises them (no branches, independent lanes); each public
//! kernel is compiled twice by [`multiversion!`], once for AVX2+FMA (picked at run time when the
//! CPU has them) and once for the baseline target.

/// Defines `fn name(args) -> ret { body }` compiled for AVX2+FMA when the CPU has them, and
/// for the baseline target otherwise. The body must only call `#[inline(always)]` helpers
/// for them to be compiled with the wider instruction set too.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if $crate::kernels::simd::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// Whether this CPU has AVX2 and FMA (cached).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`exp`]'s input range: below it gives ~1e-38 instead of 0, above it e^88.37.
const EXP_MIN: f32 = -87.336_55;
const EXP_MAX: f32 = 88.376_26;
/// ln 2 split in two, so n·ln 2 is subtracted without rounding away r's low bits.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
const ROUND: f32 = 12_582_912.0;
/// Cephes' polynomial for (e^r - 1 - r) / r², highest degree first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// e^x, Cephes' single-precision polynomial (about 1 ulp on the range that matters here).
/// Inputs below -87.3 give ~1e-38 instead of 0; inputs above 88.37 give e^88.37.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Selects rather than clamp (whose NaN checks keep the loop from vectorising) or
    // max/min (which turn a NaN into a bound): a NaN must come out as a NaN.
    let x = if x < EXP_MIN { EXP_MIN } else { x };
    let x = if x > EXP_MAX { EXP_MAX } else { x };
    // The rounded integer sits in the low mantissa bits of `t`: reading it from there keeps
    // the loop free of float-to-int casts, which do not vectorise.
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let y = p * r * r + r + 1.0;
    let e = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    y * f32::from_bits(e << 23)
}

/// erf(x), Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7, 3e-7 after f32 rounding): the
/// approximation PyTorch's vectorised CPU GELU uses.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (0.327_591_1 * a + 1.0);
    let mut r = 1.061_405_4_f32;
    r = r * t - 1.453_152_1;
    r = r * t + 1.421_413_8;
    r = r * t - 0.284_496_72;
    r = r * t + 0.254_829_6;
    let v = 1.0 - r * t * exp(-a * a);
    v.copysign(x)
}

/// x * sigmoid(x).
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// GELU with the exact (erf) form: x/2 * (1 + erf(x/sqrt(2))).
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Sum of `x`, with 16 independent lanes (vectorises) flushed into f64 every 1024 values.
#[inline(always)]
pub fn sum(x: &[f32]) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = [0f32; 16];
        let mut chunks = block.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
                acc[i] += c[i];
            }
        }
        let mut s: f32 = chunks.remainder().iter().sum();
        for a in acc {
            s += a;
        }
        total += s as f64;
    }
    total
}

/// Sum of (x - mean)^2, lane-split like [`sum`].
#[inline(always)]
pub fn sum_sq_dev(x: &[f32], mean: f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = [0f32; 16];
        let mut chunks = block.chunks_exact(16);
        for c in &mut chunks {
            for i in 0..16 {
                let d = c[i] - mean;
                acc[i] += d * d;
            }
        }
        let mut s: f32 = chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum();
        for a in acc {
            s += a;
        }
        total += s as f64;
    }
    total
}

/// Maximum of `x` (lane-split). NaNs are passed over: softmax, its user, still gets a NaN
/// from exp(NaN - max).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder().iter().chain(acc.iter()) {
        m = if v > m { v } else { m };
    }
    m
}

/// In place: x <- exp(x - shift); returns the sum of the results (softmax's inner loop).
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { x86::exp_shifted_sum(x, shift) };
    }
    exp_shifted_sum_portable(x, shift)
}

multiversion! {
    /// [`exp_shifted_sum`] in plain Rust (CPUs without AVX2+FMA, other architectures).
    fn exp_shifted_sum_portable(x: &mut [f32], shift: f32) -> f64 {
        for v in x.iter_mut() {
            *v = exp(*v - shift);
        }
        sum(x)
    }
}

/// Hand-written AVX2+FMA versions where LLVM's vectorised loops leave speed behind: it does
/// not fuse the multiply-adds (Rust forbids it) and runs the tail one value at a time.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// [`super::exp`] on 8 lanes, with fused multiply-adds (same polynomial and range).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        use super::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, ROUND};
        // max/min return their second operand when either is NaN: x goes second, so a NaN
        // stays a NaN.
        let x = _mm256_min_ps(
            _mm256_set1_ps(EXP_MAX),
            _mm256_max_ps(_mm256_set1_ps(EXP_MIN), x),
        );
        let round = _mm256_set1_ps(ROUND);
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), round);
        let n = _mm256_sub_ps(t, round);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        let mut p = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        let y = _mm256_fmadd_ps(
            _mm256_mul_ps(p, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        // 2^n from the integer sitting in t's low mantissa bits.
        let bias = _mm256_set1_epi32(127 - ROUND.to_bits() as i32);
        let pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), bias), 23);
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }

    /// Sum of the 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lane_sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// See [`super::exp_shifted_sum`]. Sums in 8 f32 lanes, flushed into f64 every 1024 values.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f64 {
        let sh = _mm256_set1_ps(shift);
        let mut total = 0f64;
        for block in x.chunks_mut(1024) {
            let mut acc = _mm256_setzero_ps();
            let mut chunks = block.chunks_exact_mut(8);
            for c in &mut chunks {
                debug_assert_eq!(c.len(), 8);
                // SAFETY: c holds 8 floats, what an unaligned 256-bit load reads.
                let e = unsafe { exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), sh)) };
                // SAFETY: c holds 8 floats, what an unaligned 256-bit store writes.
                unsafe { _mm256_storeu_ps(c.as_mut_ptr(), e) };
                acc = _mm256_add_ps(acc, e);
            }
            let tail = chunks.into_remainder();
            if !tail.is_empty() {
                debug_assert!(tail.len() < 8);
                let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(tail.len() as i32), lanes);
                // SAFETY: the mask selects lanes 0..tail.len(), exactly the tail's floats; the
                // masked-off lanes are not read.
                let v = unsafe { _mm256_maskload_ps(tail.as_ptr(), mask) };
                let e = _mm256_and_ps(exp8(_mm256_sub_ps(v, sh)), _mm256_castsi256_ps(mask));
                // SAFETY: the same mask: only the tail's floats are written.
                unsafe { _mm256_maskstore_ps(tail.as_mut_ptr(), mask, e) };
                acc = _mm256_add_ps(acc, e);
            }
            total += lane_sum(acc) as f64;
        }
        total
    }
}

/// Column-wise softmax pieces in AVX-512 (16 lanes, masked tails, which AVX2's masked stores
/// make slow on AMD): a group of up to `V` column vectors stays in registers down all rows.
#[cfg(target_arch = "x86_64")]
mod x86_512 {
    use std::arch::x86_64::*;

    /// [`super::exp`] on 16 lanes, with fused multiply-adds (same polynomial and range).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp16(x: __m512) -> __m512 {
        use super::{EXP_MAX, EXP_MIN, EXP_POLY, LN2_HI, LN2_LO, ROUND};
        // max/min return their second operand when either is NaN: x goes second, so a NaN
        // stays a NaN.
        let x = _mm512_min_ps(
            _mm512_set1_ps(EXP_MAX),
            _mm512_max_ps(_mm512_set1_ps(EXP_MIN), x),
        );
        let round = _mm512_set1_ps(ROUND);
        let t = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), round);
        let n = _mm512_sub_ps(t, round);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_fmadd_ps(
            _mm512_mul_ps(p, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        let bias = _mm512_set1_epi32(127 - ROUND.to_bits() as i32);
        let pow2 = _mm512_slli_epi32(_mm512_add_epi32(_mm512_castps_si512(t), bias), 23);
        _mm512_mul_ps(y, _mm512_castsi512_ps(pow2))
    }

    /// Column vectors per group.
    const GROUP: usize = 4;

    /// Masks of the `V` vectors of the group of columns from j0 (of `cols`).
    #[inline(always)]
    fn masks<const V: usize>(cols: usize, j0: usize) -> [__mmask16; V] {
        std::array::from_fn(|v| {
            let n = (cols - j0).saturating_sub(16 * v).min(16);
            ((1u32 << n) - 1) as __mmask16
        })
    }

    /// See [`super::col_max`].
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `s.len()` a multiple of `cols`, `out.len() == cols`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn col_max(s: &[f32], cols: usize, out: &mut [f32]) {
        for j0 in (0..cols).step_by(16 * GROUP) {
            // SAFETY: the caller's promise.
            unsafe {
                match (cols - j0).div_ceil(16).min(GROUP) {
                    1 => col_max_group::<1>(s, cols, j0, out),
                    2 => col_max_group::<2>(s, cols, j0, out),
                    3 => col_max_group::<3>(s, cols, j0, out),
                    _ => col_max_group::<GROUP>(s, cols, j0, out),
                }
            }
        }
    }

    /// # Safety
    /// As for [`col_max`], with columns j0..j0+16·V (masked at `cols`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn col_max_group<const V: usize>(s: &[f32], cols: usize, j0: usize, out: &mut [f32]) {
        let m = masks::<V>(cols, j0);
        let mut acc = [_mm512_set1_ps(f32::NEG_INFINITY); V];
        for row in s.chunks_exact(cols) {
            let at = row[j0..].as_ptr();
            for v in 0..V {
                debug_assert!(m[v] == 0 || j0 + 16 * v < cols);
                // SAFETY: the mask keeps the load to columns < cols of this row. NaN goes
                // first, so max passes over it.
                acc[v] = _mm512_max_ps(
                    unsafe { _mm512_maskz_loadu_ps(m[v], at.add(16 * v)) },
                    acc[v],
                );
            }
        }
        for v in 0..V {
            // SAFETY: the mask keeps the store to out[j0 + 16v..cols].
            unsafe { _mm512_mask_storeu_ps(out[j0..].as_mut_ptr().add(16 * v), m[v], acc[v]) };
        }
    }

    /// See [`super::exp_shifted_cols`].
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `s.len()` a multiple of `cols`, `shift` and `sums` of
    /// length `cols`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted_cols(s: &mut [f32], cols: usize, shift: &[f32], sums: &mut [f64]) {
        for j0 in (0..cols).step_by(16 * GROUP) {
            // SAFETY: the caller's promise.
            unsafe {
                match (cols - j0).div_ceil(16).min(GROUP) {
                    1 => exp_group::<1>(s, cols, j0, shift, sums),
                    2 => exp_group::<2>(s, cols, j0, shift, sums),
                    3 => exp_group::<3>(s, cols, j0, shift, sums),
                    _ => exp_group::<GROUP>(s, cols, j0, shift, sums),
                }
            }
        }
    }

    /// # Safety
    /// As for [`exp_shifted_cols`], with columns j0..j0+16·V (masked at `cols`).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp_group<const V: usize>(
        s: &mut [f32],
        cols: usize,
        j0: usize,
        shift: &[f32],
        sums: &mut [f64],
    ) {
        let m = masks::<V>(cols, j0);
        // SAFETY (loads and stores below): each mask keeps its access to columns < cols.
        let sh: [__m512; V] = std::array::from_fn(|v| unsafe {
            _mm512_maskz_loadu_ps(m[v], shift[j0..].as_ptr().add(16 * v))
        });
        for block in s.chunks_mut(256 * cols) {
            let mut acc = [_mm512_setzero_ps(); V];
            for row in block.chunks_exact_mut(cols) {
                let at = row[j0..].as_mut_ptr();
                for v in 0..V {
                    unsafe {
                        let x = _mm512_maskz_loadu_ps(m[v], at.add(16 * v));
                        let e = exp16(_mm512_sub_ps(x, sh[v]));
                        _mm512_mask_storeu_ps(at.add(16 * v), m[v], e);
                        acc[v] = _mm512_add_ps(acc[v], e);
                    }
                }
            }
            for v in 0..V {
                let mut lanes = [0f32; 16];
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc[v]) };
                let n = (cols - j0).saturating_sub(16 * v).min(16);
                for (t, &a) in sums[j0 + 16 * v..][..n].iter_mut().zip(&lanes) {
                    *t += a as f64;
                }
            }
        }
    }
}

multiversion! {
    /// In place: x <- silu(x).
    pub fn silu_inplace(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = silu(*v);
        }
    }
}

multiversion! {
    /// out <- a * gelu_erf(g) (GEGLU).
    pub fn geglu(a: &[f32], g: &[f32], out: &mut [f32]) {
        for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
            *o = a * gelu_erf(g);
        }
    }
}

multiversion! {
    /// In place: x <- x * scale + shift, then SiLU when `silu_after`.
    pub fn affine(x: &mut [f32], scale: f32, shift: f32, silu_after: bool) {
        if silu_after {
            for v in x.iter_mut() {
                *v = silu(*v * scale + shift);
            }
        } else {
            for v in x.iter_mut() {
                *v = *v * scale + shift;
            }
        }
    }
}

multiversion! {
    /// Sum of a slice.
    pub fn row_sum(x: &[f32]) -> f64 {
        sum(x)
    }
}

multiversion! {
    /// Maximum of a slice with no NaN.
    pub fn row_max(x: &[f32]) -> f32 {
        max(x)
    }
}

/// The maximum of each column of the row-major [rows, `cols`] `s`, into `out` (NaNs are
/// passed over, as in [`max`]).
pub fn col_max(s: &[f32], cols: usize, out: &mut [f32]) {
    assert!(cols > 0 && s.len().is_multiple_of(cols) && out.len() == cols);
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512 F (checked at run time); the shapes were checked.
        return unsafe { x86_512::col_max(s, cols, out) };
    }
    col_max_portable(s, cols, out)
}

/// In place, column j of the row-major [rows, `cols`] `s`: s[r, j] <- exp(s[r, j] -
/// shift[j]), its sum added to `sums[j]` (summed in f32 down 256 rows, then in f64): the
/// softmax of scores laid out one query per column.
pub fn exp_shifted_cols(s: &mut [f32], cols: usize, shift: &[f32], sums: &mut [f64]) {
    assert!(cols > 0 && s.len().is_multiple_of(cols));
    assert!(shift.len() == cols && sums.len() == cols);
    #[cfg(target_arch = "x86_64")]
    if has_avx512f() {
        // SAFETY: the CPU has AVX-512 F (checked at run time); the shapes were checked.
        return unsafe { x86_512::exp_shifted_cols(s, cols, shift, sums) };
    }
    exp_shifted_cols_portable(s, cols, shift, sums)
}

/// Whether this CPU has AVX-512 F (cached).
#[inline]
pub(crate) fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

multiversion! {
    /// [`col_max`] in plain Rust.
    fn col_max_portable(s: &[f32], cols: usize, out: &mut [f32]) {
        out.fill(f32::NEG_INFINITY);
        for row in s.chunks_exact(cols) {
            for (o, &v) in out.iter_mut().zip(row) {
                // f32::max passes over a NaN v (o never holds one).
                *o = o.max(v);
            }
        }
    }
}

multiversion! {
    /// [`exp_shifted_cols`] in plain Rust.
    fn exp_shifted_cols_portable(s: &mut [f32], cols: usize, shift: &[f32], sums: &mut [f64]) {
        let mut acc = vec![0f32; cols];
        for block in s.chunks_mut(256 * cols) {
            acc.fill(0.0);
            for row in block.chunks_exact_mut(cols) {
                for ((v, a), &m) in row.iter_mut().zip(acc.iter_mut()).zip(shift) {
                    let e = exp(*v - m);
                    *v = e;
                    *a += e;
                }
            }
            for (t, &a) in sums.iter_mut().zip(&acc) {
                *t += a as f64;
            }
        }
    }
}

multiversion! {
    /// Sum of squared deviations from `mean`.
    pub fn sq_dev(x: &[f32], mean: f32) -> f64 {
        sum_sq_dev(x, mean)
    }
}

multiversion! {
    /// out <- x * scale + shift, then SiLU when `silu_after`.
    pub fn affine_to(x: &[f32], out: &mut [f32], scale: f32, shift: f32, silu_after: bool) {
        if silu_after {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = silu(v * scale + shift);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * scale + shift;
            }
        }
    }
}

multiversion! {
    /// In place: x <- x * s.
    pub fn scale_inplace(x: &mut [f32], s: f32) {
        for v in x.iter_mut() {
            *v *= s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "exp relative error {worst}");
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
    }

    /// A NaN anywhere in a softmax row must reach its sum, in the vector body and the tail.
    #[test]
    fn nan_comes_out_as_nan() {
        assert!(exp(f32::NAN).is_nan());
        assert!(silu(f32::NAN).is_nan());
        for len in [1, 7, 8, 9, 31, 64, 77] {
            for at in [0, len / 2, len - 1] {
                let mut x: Vec<f32> = (0..len).map(|i| i as f32 * 0.1).collect();
                x[at] = f32::NAN;
                let mx = row_max(&x);
                let (mut fast, mut portable) = (x.clone(), x.clone());
                assert!(exp_shifted_sum(&mut fast, mx).is_nan(), "len {len} at {at}");
                assert!(exp_shifted_sum_portable(&mut portable, mx).is_nan());
                assert!(fast[at].is_nan() && portable[at].is_nan());
            }
        }
    }

    #[test]
    fn exp_shifted_sum_matches_f64_at_every_length() {
        let mut seed = 7u64;
        for len in (0..40).chain([77, 1023, 1024, 1025, 4100]) {
            let x: Vec<f32> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (seed >> 40) as f32 / (1u64 << 24) as f32 * 100.0 - 95.0
                })
                .collect();
            let shift = 3.0f32;
            let (mut fast, mut portable) = (x.clone(), x.clone());
            let total = exp_shifted_sum(&mut fast, shift);
            let total_portable = exp_shifted_sum_portable(&mut portable, shift);
            let mut want_total = 0f64;
            for ((&v, &f), &p) in x.iter().zip(&fast).zip(&portable) {
                let want = ((v - shift) as f64).exp();
                want_total += want;
                let tol = 3e-7 * want + 1e-37;
                assert!((f as f64 - want).abs() <= tol, "len {len}: exp({v}) = {f}");
                assert!((p as f64 - want).abs() <= tol, "len {len}: exp({v}) = {p}");
            }
            assert!(
                (total - want_total).abs() <= 1e-6 * want_total + 1e-30,
                "len {len}"
            );
            assert!((total_portable - want_total).abs() <= 1e-6 * want_total + 1e-30);
        }
    }

    /// Column by column, the same softmax pieces as a row at a time (NaNs included).
    #[test]
    fn column_softmax_matches_rows() {
        let (rows, cols) = (600, 13);
        let mut s: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.02 - 10.0)
            .collect();
        s[5 * cols + 4] = f32::NAN;
        let mut mx = vec![0f32; cols];
        col_max(&s, cols, &mut mx);
        let mut sums = vec![0f64; cols];
        let mut e = s.clone();
        exp_shifted_cols(&mut e, cols, &mx, &mut sums);
        for j in 0..cols {
            let mut col: Vec<f32> = (0..rows).map(|r| s[r * cols + j]).collect();
            assert_eq!(mx[j], max(&col), "column {j}");
            let total = exp_shifted_sum(&mut col, mx[j]);
            if j == 4 {
                assert!(sums[j].is_nan() && total.is_nan());
                continue;
            }
            assert!((sums[j] - total).abs() <= 1e-6 * total, "column {j}");
            for r in 0..rows {
                let (got, want) = (e[r * cols + j], col[r]);
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "({r}, {j}): {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn erf_is_accurate() {
        let mut x = -6.0f64;
        while x < 6.0 {
            let got = erf(x as f32) as f64;
            let want = libm_erf(x);
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, want {want}");
            x += 0.001;
        }
    }

    /// erf in f64 (Numerical Recipes erfc, relative error < 1.2e-7 is not enough: use series).
    fn libm_erf(x: f64) -> f64 {
        // Taylor series for |x| < 3, continued fraction beyond: accurate to ~1e-12 here.
        let a = x.abs();
        let v = if a < 3.0 {
            let mut term = a;
            let mut s = a;
            let mut n = 0.0;
            loop {
                n += 1.0;
                term *= -a * a / n;
                let add = term / (2.0 * n + 1.0);
                s += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            s * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction (Lentz), 60 terms.
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        v.copysign(x)
    }

    #[test]
    fn silu_and_gelu_match_the_definitions() {
        for i in -200..200 {
            let x = i as f32 * 0.07;
            let s = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!((silu(x) as f64 - s).abs() < 1e-6 * (1.0 + s.abs()));
            let g = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / 2f64.sqrt()));
            assert!((gelu_erf(x) as f64 - g).abs() < 1e-6 * (1.0 + g.abs()));
        }
    }

    #[test]
    fn reductions() {
        let v: Vec<f32> = (0..5000).map(|i| (i % 97) as f32 - 40.0).collect();
        let (s, m) = (row_sum(&v), row_max(&v));
        let want: f64 = v.iter().map(|&x| x as f64).sum();
        assert!((s - want).abs() < 1e-6);
        assert_eq!(m, 56.0);
        let mean = (want / v.len() as f64) as f32;
        let want_sq: f64 = v.iter().map(|&x| ((x - mean) as f64).powi(2)).sum();
        assert!((sq_dev(&v, mean) - want_sq).abs() / want_sq < 1e-6);
        let mut e = vec![0.5f32, -1.0, 2.0];
        let total = exp_shifted_sum(&mut e, 2.0);
        let want = [(-1.5f64).exp(), (-3f64).exp(), 1.0];
        for (g, w) in e.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-7);
        }
        assert!((total - want.iter().sum::<f64>()).abs() < 1e-6);
    }
}
