//! Matrix products with bf16 inputs and f32 accumulation: `C = [C +] scale · A·B` where A and
//! B are f32 in memory, rounded to bf16 (to nearest even) as they are packed, and multiplied
//! with AVX-512 BF16's `vdpbf16ps` (two bf16 products summed into each f32 lane). Products of
//! two bf16 values are exact in f32, so the only roundings are the inputs' and the f32 sums'.
//!
//! The blocking (`KC`, `MC`, `NC`) is fixed, and every output element is summed in the same
//! order whatever the thread count or the caller's split of the output.
//!
//! CPUs without AVX-512 BF16 get [`gemm_portable`]: the same rounded inputs, multiplied by the
//! f32 `gemm` crate (a different summation order, so not the same bits). It is for tests and
//! odd callers; the pipeline refuses bf16 products on such CPUs (they would be slower than f32).

use std::sync::OnceLock;

/// Rows of A per register tile.
pub(crate) const MR: usize = 8;
/// Columns of B per register tile: three vectors of 16 f32.
pub(crate) const NR: usize = 48;
/// The most depth of one pass over A and B. A B panel of KC x NR bf16 (36 KiB) stays near L1
/// while the A panels stream past it. k is cut into equal even passes (see [`depth_pass`]).
const KC: usize = 384;
/// Rows of A packed at once (a multiple of MR): 48 KiB of bf16, for L2.
const MC: usize = 96;
/// Columns of B packed at once (a multiple of NR): 384 KiB of bf16, for L2.
const NC: usize = 768;

/// A strided f32 matrix operand: element (r, c) at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Operand {
    /// The matrix at `ptr` with element (r, c) at `ptr + r·rs + c·cs`.
    pub(crate) fn new(ptr: *const f32, rs: usize, cs: usize) -> Operand {
        Operand {
            ptr,
            rs: rs as isize,
            cs: cs as isize,
        }
    }

    /// The same matrix read transposed: [cols, rows].
    pub(crate) fn transposed(self) -> Operand {
        Operand {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

// SAFETY: an Operand is only read through, and the caller of the unsafe products that take
// one promises the matrix stays readable and unwritten while they run, on any thread.
unsafe impl Send for Operand {}
// SAFETY: as for Send.
unsafe impl Sync for Operand {}

/// Whether this CPU has AVX-512 BF16 (`vdpbf16ps`) with the AVX-512 BW permutes the packing
/// uses; checked once.
pub fn native() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `dst[m, n] = [dst +] scale · a[m, k] · b[k, n]` with bf16-rounded inputs; `dst` has column
/// stride 1 and row stride `dst_rs`. Natively where [`native`], else [`gemm_portable`].
///
/// # Safety
/// `a` and `b` must be readable for the [m, k] and [k, n] matrices their strides describe,
/// and `dst` writable (and readable, when `accumulate`) for [m, n] with row stride `dst_rs`,
/// not overlapping `a` or `b` and not written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    scale: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if native() {
        // Narrow outputs (a few pixels of a deep convolution) would fill a fraction of the
        // NR-wide tiles; computing Cᵀ = Bᵀ·Aᵀ instead gives the same sums (each element is
        // summed over the same pairs in the same order) with less padding.
        let padded = |m: usize, n: usize| m.next_multiple_of(MR) * n.next_multiple_of(16);
        // SAFETY: the CPU has the features (checked by `native`); the caller's promise covers
        // the operands, read transposed or not.
        unsafe {
            if padded(n, m) < padded(m, n) {
                x86::gemm(
                    (n, m, k),
                    dst,
                    (1, dst_rs),
                    accumulate,
                    x86::Source::Strided(b.transposed()),
                    x86::Source::Strided(a.transposed()),
                    scale,
                );
            } else {
                x86::gemm(
                    (m, n, k),
                    dst,
                    (dst_rs, 1),
                    accumulate,
                    x86::Source::Strided(a),
                    x86::Source::Strided(b),
                    scale,
                );
            }
        }
        return;
    }
    // SAFETY: the caller's promise.
    unsafe { gemm_portable((m, n, k), dst, dst_rs, accumulate, a, b, scale) }
}

/// [`gemm`] on any CPU: copies of A and B rounded to bf16 (held as f32), multiplied by the
/// f32 `gemm` crate.
///
/// # Safety
/// As for [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_portable(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Operand,
    scale: f32,
) {
    let round = |x: f32| half::bf16::from_f32(x).to_f32();
    // SAFETY (both closures): (r, c) inside the operand's [rows, cols], which the caller
    // promises is readable.
    let at = |o: Operand, r: usize, c: usize| unsafe {
        *o.ptr.offset(r as isize * o.rs + c as isize * o.cs)
    };
    let ar: Vec<f32> = (0..m * k).map(|i| round(at(a, i / k, i % k))).collect();
    let br: Vec<f32> = (0..k * n).map(|i| round(at(b, i / n, i % n))).collect();
    // SAFETY: ar and br are [m, k] and [k, n] row-major; dst is the caller's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            ar.as_ptr(),
            1,
            k as isize,
            br.as_ptr(),
            1,
            n as isize,
            1.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// An operand packed once for many products: every pass over k as the kernel packs it, in
/// panels of `width` indices (MR rows of a left operand, see [`pack_a`] and [`gemm_packed_a`],
/// or NR columns of a right one, see [`pack_b`] and [`gemm_packed_b`]) over all `len`.
pub(crate) struct Packed {
    len: usize,
    k: usize,
    width: usize,
    /// Where each pass over k starts in `data`.
    passes: Vec<usize>,
    data: Vec<u32>,
}

impl Packed {
    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// The panels of pass `pass` (`kp` pairs deep) from index `first`, a multiple of the
    /// panel width.
    #[cfg(target_arch = "x86_64")]
    fn panels(&self, pass: usize, first: usize, kp: usize) -> &[u32] {
        &self.data[self.passes[pass] + first / self.width * kp * self.width..]
    }
}

/// Packs `a` [m, k] for [`gemm_packed_a`]; `None` where the CPU has no AVX-512 BF16.
///
/// # Safety
/// `a` must be readable for [m, k] at its strides.
pub(crate) unsafe fn pack_a(a: Operand, m: usize, k: usize) -> Option<Packed> {
    // A as k x m: k along columns, m along rows.
    // SAFETY: the caller's promise.
    unsafe { pack_once(a, (a.cs, a.rs), (m, k), MR) }
}

/// Packs `b` [k, n] for [`gemm_packed_b`]; `None` where the CPU has no AVX-512 BF16.
///
/// # Safety
/// `b` must be readable for [k, n] at its strides.
pub(crate) unsafe fn pack_b(b: Operand, k: usize, n: usize) -> Option<Packed> {
    // SAFETY: the caller's promise.
    unsafe { pack_once(b, (b.rs, b.cs), (n, k), NR) }
}

/// Packs the k x `len` matrix `o` (depth stride `ks`, index stride `xs`) into panels of
/// `width` indices, pass by pass, groups of panels in parallel (a 1280 x 11520 kernel is 15M
/// values to round).
///
/// # Safety
/// `o` must be readable for the [k, len] block at those strides.
unsafe fn pack_once(
    o: Operand,
    (ks, xs): (isize, isize),
    (len, k): (usize, usize),
    width: usize,
) -> Option<Packed> {
    if !native() || len == 0 {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let kpass = depth_pass(k);
        let panels = len.div_ceil(width);
        let pass_len = |kc: usize| panels * width * kc.div_ceil(2);
        let mut passes = Vec::new();
        let mut total = 0;
        for pc in (0..k.max(1)).step_by(kpass) {
            passes.push(total);
            total += pass_len(kpass.min(k - pc.min(k)));
        }
        let mut data = vec![0u32; total];
        let group = (64 / width).max(1);
        let mut rest = &mut data[..];
        for pc in (0..k.max(1)).step_by(kpass) {
            let kc = kpass.min(k - pc.min(k));
            let (pass, tail) = rest.split_at_mut(pass_len(kc));
            rest = tail;
            super::for_each_chunk(pass, group * width * kc.div_ceil(2), |g, out| {
                let x0 = g * group * width;
                let xc = (group * width).min(len - x0);
                // SAFETY: the CPU has the features (`native`); indices x0..x0+xc, depths
                // pc..pc+kc lie inside o (caller); out holds those panels' kc/2 pairs.
                unsafe { x86::pack(o, ks, xs, (pc, kc), (x0, xc), width, out) };
            });
        }
        Some(Packed {
            len,
            k,
            width,
            passes,
            data,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// [`gemm`] with the left operand's rows `row0..row0 + m` (row0 a multiple of [`MR`]) taken
/// from `a`, packed once by [`pack_a`]: the same sums as [`gemm`] in its untransposed
/// orientation, without packing A again.
///
/// # Safety
/// As for [`gemm`], with rows row0..row0+m inside `a`'s.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_packed_a(
    a: &Packed,
    row0: usize,
    (m, n): (usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    b: Operand,
    scale: f32,
) {
    assert!(
        a.width == MR && row0.is_multiple_of(MR) && row0 + m <= a.len,
        "packed rows {row0}..{} of {}",
        row0 + m,
        a.len
    );
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `a` exists only where the CPU has the features; the caller's promise covers the
    // rest.
    unsafe {
        x86::gemm(
            (m, n, a.k),
            dst,
            (dst_rs, 1),
            accumulate,
            x86::Source::Packed(a, row0),
            x86::Source::Strided(b),
            scale,
        )
    }
}

/// [`gemm`] with the right operand's columns `col0..col0 + n` (col0 a multiple of [`NR`])
/// taken from `b`, packed once by [`pack_b`]: the same sums as [`gemm`], without packing B
/// again.
///
/// # Safety
/// As for [`gemm`], with columns col0..col0+n inside `b`'s.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_packed_b(
    b: &Packed,
    col0: usize,
    (m, n): (usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    scale: f32,
) {
    assert!(
        b.width == NR && col0.is_multiple_of(NR) && col0 + n <= b.len,
        "packed columns {col0}..{} of {}",
        col0 + n,
        b.len
    );
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `b` exists only where the CPU has the features; the caller's promise covers the
    // rest.
    unsafe {
        x86::gemm(
            (m, n, b.k),
            dst,
            (dst_rs, 1),
            accumulate,
            x86::Source::Strided(a),
            x86::Source::Packed(b, col0),
            scale,
        )
    }
}

/// The depth of each pass over k: k cut into the fewest passes of at most [`KC`], of equal
/// even length (the last may be shorter), so that no pass is a short remainder that costs a
/// full load and store of the output tiles. A function of k alone, like the sums' order.
fn depth_pass(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC).max(1)).next_multiple_of(2).max(2)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KC, MC, MR, NC, NR, Operand, Packed, depth_pass};
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    thread_local! {
        /// Packed panels of A and B, kept per thread between calls.
        static SCRATCH: RefCell<(Vec<u32>, Vec<u32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    }

    /// An operand of [`gemm`]: strided f32, packed here, or packed once before (its rows,
    /// for the left operand, or columns, for the right one, from the index given).
    pub(super) enum Source<'a> {
        Strided(Operand),
        Packed(&'a Packed, usize),
    }

    /// # Safety
    /// As for [`super::gemm`] with `dst` [m, n] at strides `(dst_rs, dst_cs)`, on a CPU with
    /// AVX-512 F, BW and BF16.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn gemm(
        (m, n, k): (usize, usize, usize),
        dst: *mut f32,
        (dst_rs, dst_cs): (usize, usize),
        accumulate: bool,
        a: Source<'_>,
        b: Source<'_>,
        scale: f32,
    ) {
        SCRATCH.with_borrow_mut(|(ap, bp)| {
            let kp_max = KC / 2;
            ap.resize(MC * kp_max, 0);
            bp.resize(NC * kp_max, 0);
            let kpass = depth_pass(k);
            for jc in (0..n).step_by(NC) {
                let nc = NC.min(n - jc);
                for (pass, pc) in (0..k.max(1)).step_by(kpass).enumerate() {
                    let kc = kpass.min(k - pc.min(k));
                    let kp = kc.div_ceil(2);
                    let bpanels: &[u32] = match b {
                        Source::Strided(b) => {
                            // B as k x n: k along rows (stride rs), n along columns (stride
                            // cs).
                            // SAFETY: rows pc..pc+kc, columns jc..jc+nc lie inside b (caller).
                            unsafe { pack(b, b.rs, b.cs, (pc, kc), (jc, nc), NR, bp) };
                            bp
                        }
                        Source::Packed(p, col0) => p.panels(pass, col0 + jc, kp),
                    };
                    let add = accumulate || pc > 0;
                    for ic in (0..m).step_by(MC) {
                        let mc = MC.min(m - ic);
                        let apanels: &[u32] = match a {
                            Source::Strided(a) => {
                                // A as k x m: k along columns (stride cs), m along rows
                                // (stride rs).
                                // SAFETY: rows ic..ic+mc, columns pc..pc+kc lie inside a
                                // (caller).
                                unsafe { pack(a, a.cs, a.rs, (pc, kc), (ic, mc), MR, ap) };
                                ap
                            }
                            Source::Packed(p, row0) => p.panels(pass, row0 + ic, kp),
                        };
                        for jr in 0..nc.div_ceil(NR) {
                            for ir in 0..mc.div_ceil(MR) {
                                let at = (ic + ir * MR, jc + jr * NR);
                                let size = (MR.min(mc - ir * MR), NR.min(nc - jr * NR));
                                let c = dst.wrapping_add(at.0 * dst_rs + at.1 * dst_cs);
                                // SAFETY: the panels hold kp pairs of MR / NR values (packed
                                // above); the tile lies inside dst (caller).
                                unsafe {
                                    store_tile(
                                        kp,
                                        (
                                            apanels[ir * kp * MR..].as_ptr(),
                                            bpanels[jr * kp * NR..].as_ptr(),
                                        ),
                                        (c, dst_rs, dst_cs),
                                        size,
                                        add,
                                        scale,
                                    )
                                };
                            }
                        }
                    }
                }
            }
        });
    }

    /// [`tile`] into `size` (rows, columns) of `dst` at strides (rs, cs): straight into it for
    /// a whole tile with cs = 1, else through a buffer (the same sums either way).
    ///
    /// # Safety
    /// As for [`tile`], for a dst of `size` at the strides given.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn store_tile(
        kp: usize,
        (a, b): (*const u32, *const u32),
        (dst, rs, cs): (*mut f32, usize, usize),
        (rows, cols): (usize, usize),
        add: bool,
        scale: f32,
    ) {
        // Only the 16-wide vectors that hold columns are multiplied: a 64-wide output (an 8x8
        // map) costs 64 columns of work, not 96.
        let vectors = cols.div_ceil(16);
        if rows == MR && cols == 16 * vectors && cs == 1 {
            // SAFETY: the caller's promise.
            return unsafe { tile_vectors(vectors, kp, (a, b), (dst, rs), add, scale) };
        }
        let mut buf = [0f32; MR * NR];
        // SAFETY: buf holds MR rows of NR values.
        unsafe { tile_vectors(vectors, kp, (a, b), (buf.as_mut_ptr(), NR), false, scale) };
        // SAFETY: the caller's promise.
        unsafe {
            for r in 0..rows {
                for j in 0..cols {
                    let d = dst.add(r * rs + j * cs);
                    let v = buf[r * NR + j];
                    *d = if add { *d + v } else { v };
                }
            }
        }
    }

    /// [`tile`] with `V` = `vectors` (1 to 3).
    ///
    /// # Safety
    /// As for [`tile`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile_vectors(
        vectors: usize,
        kp: usize,
        (a, b): (*const u32, *const u32),
        (c, c_rs): (*mut f32, usize),
        add: bool,
        scale: f32,
    ) {
        // SAFETY: the caller's promise.
        unsafe {
            match vectors {
                1 => tile::<1>(kp, a, b, c, c_rs, add, scale),
                2 => tile::<2>(kp, a, b, c, c_rs, add, scale),
                _ => tile::<3>(kp, a, b, c, c_rs, add, scale),
            }
        }
    }

    /// The first `V` 16-wide vectors of one MR x NR tile: `c = [c +] scale · Σ_p a[p]·b[p]`
    /// over `kp` pairs of k. Each column's sum is the same whatever `V`.
    ///
    /// # Safety
    /// `a` holds kp·MR pairs, `b` kp·NR pairs; c is writable (readable when `add`) for MR rows
    /// of 16·V values, `c_rs` apart.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn tile<const V: usize>(
        kp: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        c_rs: usize,
        add: bool,
        scale: f32,
    ) {
        debug_assert!((1..=NR / 16).contains(&V));
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        for p in 0..kp {
            // SAFETY: pair p of the panels (caller's promise on their lengths); V ≤ 3 vectors
            // of the NR-wide B panel.
            unsafe {
                let bq = b.add(p * NR);
                let bv: [__m512bh; V] =
                    std::array::from_fn(|j| as_bh(_mm512_loadu_si512(bq.add(16 * j).cast())));
                let aq = a.add(p * MR);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = as_bh(_mm512_set1_epi32(*aq.add(r) as i32));
                    for j in 0..V {
                        acc[j] = _mm512_dpbf16_ps(acc[j], av, bv[j]);
                    }
                }
            }
        }
        let s = _mm512_set1_ps(scale);
        for (r, acc) in acc.iter().enumerate() {
            for (j, &v) in acc.iter().enumerate() {
                // SAFETY: row r < MR, values 16j..16j+16 < NR of the tile (caller).
                unsafe {
                    let p = c.add(r * c_rs + 16 * j);
                    let mut v = _mm512_mul_ps(v, s);
                    if add {
                        v = _mm512_add_ps(v, _mm512_loadu_ps(p));
                    }
                    _mm512_storeu_ps(p, v);
                }
            }
        }
    }

    /// Packs `src` seen as a k x x matrix (element (kk, x) at `ptr + kk·ks + x·xs`), depths
    /// k0..k0+kc and indices x0..x0+xc, into panels of `w` indices: u32 at
    /// `(panel·kp + p)·w + i` holds (k0+2p, k0+2p+1) of index x0+panel·w+i as two bf16 (the
    /// lower half first), zeros past the ends.
    ///
    /// # Safety
    /// The [kc, xc] block must lie inside the operand; `out` must hold
    /// `xc.div_ceil(w)·w·kc.div_ceil(2)` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack(
        o: Operand,
        ks: isize,
        xs: isize,
        (k0, kc): (usize, usize),
        (x0, xc): (usize, usize),
        w: usize,
        out: &mut [u32],
    ) {
        let kp = kc.div_ceil(2);
        let panels = xc.div_ceil(w);
        debug_assert!(out.len() >= panels * w * kp);
        let base = o.ptr.wrapping_offset(k0 as isize * ks + x0 as isize * xs);
        if ks == 1 && w.is_multiple_of(8) {
            // Pairs are adjacent in memory: 16 indices x 32 values of k are loaded as 16
            // vectors of 16 pairs, transposed in registers, and stored as 16 runs of 16
            // indices (one per pair), instead of one pair at a time.
            let end = panels * w;
            for x in (0..end).step_by(16) {
                for p0 in (0..kp).step_by(16) {
                    let left = kc - 2 * p0;
                    let (lo_m, hi_m) = (mask(left.min(16)), mask(left.saturating_sub(16).min(16)));
                    let mut r = [_mm512_setzero_si512(); 16];
                    for (i, r) in r.iter_mut().enumerate().take(xc.saturating_sub(x).min(16)) {
                        let row = base.wrapping_offset((x + i) as isize * xs + 2 * p0 as isize);
                        // SAFETY: index x + i < xc; the masks keep the loads to depths < kc
                        // of it, inside the block (caller).
                        unsafe {
                            let lo = _mm512_maskz_loadu_ps(lo_m, row);
                            let hi = _mm512_maskz_loadu_ps(hi_m, row.add(16));
                            *r = as_bits(_mm512_cvtne2ps_pbh(hi, lo));
                        }
                    }
                    let r = transpose16(r);
                    for (j, v) in r.iter().enumerate().take((kp - p0).min(16)) {
                        let p = p0 + j;
                        let at = |x: usize| (x / w * kp + p) * w + x % w;
                        debug_assert!(at(x) + 16.min(end - x) <= out.len());
                        // SAFETY: indices x..x+16 (those below `end`) of pair p lie in
                        // panels x/w and, for w = 8, x/w + 1: inside `out` (caller).
                        unsafe {
                            if w.is_multiple_of(16) {
                                _mm512_storeu_si512(out[at(x)..].as_mut_ptr().cast(), *v);
                            } else {
                                let halves =
                                    (_mm512_castsi512_si256(*v), _mm512_extracti64x4_epi64(*v, 1));
                                _mm256_storeu_si256(out[at(x)..].as_mut_ptr().cast(), halves.0);
                                if x + 8 < end {
                                    _mm256_storeu_si256(
                                        out[at(x + 8)..].as_mut_ptr().cast(),
                                        halves.1,
                                    );
                                }
                            }
                        }
                    }
                }
            }
        } else if xs == 1 && w.is_multiple_of(8) {
            // Indices are adjacent: rows kk and kk+1, up to 16 indices each, interleaved.
            let idx = _mm512_set_epi16(
                31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5,
                20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
            );
            for panel in 0..panels {
                for p in 0..kp {
                    let dst = &mut out[(panel * kp + p) * w..][..w];
                    for v in (0..w).step_by(16) {
                        let width = (w - v).min(16);
                        let x = panel * w + v;
                        let m = mask(xc.saturating_sub(x).min(width));
                        let m1 = if 2 * p + 1 < kc { m } else { 0 };
                        // SAFETY: the masks keep the loads to indices < xc and depths < kc,
                        // inside the block (caller), and the store to dst[v..v + width].
                        unsafe {
                            let r0 = base.wrapping_offset((2 * p) as isize * ks + x as isize);
                            let lo = _mm512_maskz_loadu_ps(m, r0);
                            let hi = _mm512_maskz_loadu_ps(m1, r0.wrapping_offset(ks));
                            let bf = as_bits(_mm512_cvtne2ps_pbh(hi, lo));
                            let inter = _mm512_permutexvar_epi16(idx, bf);
                            let to = dst[v..].as_mut_ptr();
                            _mm512_mask_storeu_epi32(to.cast(), mask(width), inter);
                        }
                    }
                }
            }
        } else {
            for panel in 0..panels {
                for p in 0..kp {
                    for i in 0..w {
                        let x = panel * w + i;
                        let get = |kk: usize| -> u32 {
                            if x < xc && kk < kc {
                                // SAFETY: (kk, x) inside the block (caller).
                                let v = unsafe { *base.offset(kk as isize * ks + x as isize * xs) };
                                half::bf16::from_f32(v).to_bits() as u32
                            } else {
                                0
                            }
                        };
                        out[(panel * kp + p) * w + i] = get(2 * p) | (get(2 * p + 1) << 16);
                    }
                }
            }
        }
    }

    /// The 16 x 16 matrix of u32 whose rows are `r`, transposed.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: [__m512i; 16]) -> [__m512i; 16] {
        // Within 128-bit lanes: after the 32- and 64-bit interleaves, u[4i + c] holds, in
        // lane L, column 4L + c of rows 4i..4i+4.
        let t: [__m512i; 16] = std::array::from_fn(|j| {
            let (a, b) = (r[j & !1], r[j | 1]);
            if j % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        let u: [__m512i; 16] = std::array::from_fn(|j| {
            let (i, c) = (j / 4, j % 4);
            let (a, b) = (t[4 * i + c / 2], t[4 * i + c / 2 + 2]);
            if c % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        // Across lanes: column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
        let mut out = [_mm512_setzero_si512(); 16];
        for c in 0..4 {
            let (a, b, cc, d) = (u[c], u[4 + c], u[8 + c], u[12 + c]);
            let x0 = _mm512_shuffle_i32x4::<0x44>(a, b);
            let x1 = _mm512_shuffle_i32x4::<0xEE>(a, b);
            let y0 = _mm512_shuffle_i32x4::<0x44>(cc, d);
            let y1 = _mm512_shuffle_i32x4::<0xEE>(cc, d);
            out[c] = _mm512_shuffle_i32x4::<0x88>(x0, y0);
            out[4 + c] = _mm512_shuffle_i32x4::<0xDD>(x0, y0);
            out[8 + c] = _mm512_shuffle_i32x4::<0x88>(x1, y1);
            out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(x1, y1);
        }
        out
    }

    /// 32 bf16 values seen as the 512 bits they are.
    #[inline(always)]
    fn as_bits(v: __m512bh) -> __m512i {
        // SAFETY: both are 512-bit vectors of plain bits.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(v) }
    }

    /// 512 bits seen as 32 bf16 values.
    #[inline(always)]
    fn as_bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 512-bit vectors of plain bits.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// A mask of the low `n` (≤ 16) lanes.
    #[inline(always)]
    fn mask(n: usize) -> __mmask16 {
        debug_assert!(n <= 16);
        ((1u32 << n) - 1) as __mmask16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(x: f32) -> f64 {
        half::bf16::from_f32(x).to_f32() as f64
    }

    /// A test matrix: its values and the strides they are read with.
    struct Mat {
        v: Vec<f32>,
        rs: isize,
        cs: isize,
    }

    impl Mat {
        fn op(&self) -> Operand {
            Operand {
                ptr: self.v.as_ptr(),
                rs: self.rs,
                cs: self.cs,
            }
        }

        fn at(&self, r: usize, c: usize) -> f32 {
            self.v[(r as isize * self.rs + c as isize * self.cs) as usize]
        }
    }

    /// A pseudo-random matrix with values in (-2, 2), rows x cols, column-major or row-major.
    fn operand(rows: usize, cols: usize, col_major: bool, seed: u64) -> Mat {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v = (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        let (rs, cs) = if col_major {
            (1, rows as isize)
        } else {
            (cols as isize, 1)
        };
        Mat { v, rs, cs }
    }

    /// Every path against an f64 product of the bf16-rounded inputs, across edge shapes
    /// (tails of MR, NR, odd k, more than one KC / MC / NC block) and both layouts of each
    /// operand, with and without accumulation and scale.
    #[test]
    fn products_of_rounded_inputs_match_f64() {
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (8, 48, 32),
            (9, 49, 33),
            (17, 100, 77),
            (2, 320, 1280),
            (100, 40, 300),
            (97, 800, 40),
            (5, 50, 1000),
            (224, 32, 600),
            (64, 16, 40),
        ];
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            for layout in 0..4 {
                let am = operand(m, k, layout & 1 == 1, si as u64);
                let bm = operand(k, n, layout & 2 == 2, 100 + si as u64);
                for (accumulate, scale) in [(false, 1.0f32), (true, 0.125)] {
                    let init: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 - 3.0).collect();
                    let want: Vec<f64> = (0..m * n)
                        .map(|i| {
                            let (r, c) = (i / n, i % n);
                            let dot: f64 = (0..k).map(|p| bf(am.at(r, p)) * bf(bm.at(p, c))).sum();
                            let base = if accumulate { init[i] as f64 } else { 0.0 };
                            base + scale as f64 * dot
                        })
                        .collect();
                    let norm: Vec<f64> = (0..m * n)
                        .map(|i| {
                            let (r, c) = (i / n, i % n);
                            (0..k)
                                .map(|p| (am.at(r, p) * bm.at(p, c)).abs() as f64)
                                .sum::<f64>()
                                + 1.0
                        })
                        .collect();
                    let (a, b) = (am.op(), bm.op());
                    let mut paths: Vec<(&str, Vec<f32>)> = vec![("portable", init.clone())];
                    if native() {
                        paths.push(("native", init.clone()));
                    }
                    for (name, out) in &mut paths {
                        // SAFETY: the operands and out are [m,k], [k,n], [m,n] as described.
                        unsafe {
                            if *name == "native" {
                                gemm((m, n, k), out.as_mut_ptr(), n, accumulate, a, b, scale);
                            } else {
                                gemm_portable(
                                    (m, n, k),
                                    out.as_mut_ptr(),
                                    n,
                                    accumulate,
                                    a,
                                    b,
                                    scale,
                                );
                            }
                        }
                        for i in 0..m * n {
                            let err = (out[i] as f64 - want[i]).abs() / norm[i];
                            assert!(
                                err < 1e-6,
                                "{name} {m}x{n}x{k} layout {layout} acc {accumulate}: \
                                 [{i}] {} vs {} (err {err:e})",
                                out[i],
                                want[i]
                            );
                        }
                    }
                }
            }
        }
    }

    /// Cᵀ = Bᵀ·Aᵀ gives the bits of C = A·B, so choosing the orientation by shape (as
    /// `gemm` does) cannot change a result.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_orientations_give_the_same_bits() {
        if !native() {
            eprintln!("no AVX-512 BF16 here: the native kernel is not tested");
            return;
        }
        let (m, n, k) = (37, 61, 530);
        let (am, bm) = (operand(m, k, false, 7), operand(k, n, true, 8));
        let (a, b) = (am.op(), bm.op());
        let mut c = vec![0f32; m * n];
        let mut ct = vec![0f32; m * n];
        // SAFETY: [m, k], [k, n] and [m, n] buffers as described (ct written transposed).
        unsafe {
            x86::gemm(
                (m, n, k),
                c.as_mut_ptr(),
                (n, 1),
                false,
                x86::Source::Strided(a),
                x86::Source::Strided(b),
                0.5,
            );
            x86::gemm(
                (n, m, k),
                ct.as_mut_ptr(),
                (1, n),
                false,
                x86::Source::Strided(b.transposed()),
                x86::Source::Strided(a.transposed()),
                0.5,
            );
        }
        assert!(c.iter().zip(&ct).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// Rows of an operand packed once give the bits of the same rows packed per product.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_packed_once_gives_the_bits_of_a_packed_per_product() {
        if !native() {
            eprintln!("no AVX-512 BF16 here: the packed path is not tested");
            return;
        }
        let (m, n, k) = (100, 70, 900);
        let (am, bm) = (operand(m, k, false, 11), operand(k, n, false, 12));
        let (a, b) = (am.op(), bm.op());
        // SAFETY: a is [m, k].
        let packed = unsafe { pack_a(a, m, k) }.unwrap();
        for (row0, rows) in [(0, m), (8, 40), (96, 4)] {
            let sub = Operand {
                ptr: am.v[row0 * k..].as_ptr(),
                ..a
            };
            let mut want = vec![1f32; rows * n];
            let mut got = want.clone();
            // SAFETY: rows row0..row0+rows of a, b [k, n], outputs [rows, n].
            unsafe {
                x86::gemm(
                    (rows, n, k),
                    want.as_mut_ptr(),
                    (n, 1),
                    true,
                    x86::Source::Strided(sub),
                    x86::Source::Strided(b),
                    0.25,
                );
                gemm_packed_a(&packed, row0, (rows, n), got.as_mut_ptr(), n, true, b, 0.25);
            }
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "rows {row0}..{}",
                row0 + rows
            );
        }
    }

    /// Columns of a right operand packed once (here a weight read transposed, as linear
    /// layers do) give the bits of the same columns packed per product.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn b_packed_once_gives_the_bits_of_b_packed_per_product() {
        if !native() {
            eprintln!("no AVX-512 BF16 here: the packed path is not tested");
            return;
        }
        // n over one NC block, so packed panels are read from a second column block too.
        let (m, n, k) = (37, 900, 530);
        let (am, bm) = (operand(m, k, false, 13), operand(k, n, true, 14));
        let (a, b) = (am.op(), bm.op());
        // SAFETY: b is [k, n].
        let packed = unsafe { pack_b(b, k, n) }.unwrap();
        for (col0, cols) in [(0, n), (48, 100), (864, 36)] {
            let sub = Operand {
                ptr: b.ptr.wrapping_offset(col0 as isize * b.cs),
                ..b
            };
            let mut want = vec![1f32; m * cols];
            let mut got = want.clone();
            // SAFETY: a [m, k], columns col0..col0+cols of b, outputs [m, cols].
            unsafe {
                x86::gemm(
                    (m, cols, k),
                    want.as_mut_ptr(),
                    (cols, 1),
                    true,
                    x86::Source::Strided(a),
                    x86::Source::Strided(sub),
                    0.25,
                );
                gemm_packed_b(
                    &packed,
                    col0,
                    (m, cols),
                    got.as_mut_ptr(),
                    cols,
                    true,
                    a,
                    0.25,
                );
            }
            assert!(
                want.iter()
                    .zip(&got)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "columns {col0}..{}",
                col0 + cols
            );
        }
    }

    #[test]
    fn depth_passes_are_even_cover_k_and_stay_within_kc() {
        for k in 1..2000 {
            let d = depth_pass(k);
            assert!(
                d.is_multiple_of(2) && d <= KC && d * k.div_ceil(KC) >= k,
                "k {k}: pass {d}"
            );
        }
        assert_eq!(depth_pass(320), 320);
        assert_eq!(depth_pass(640), 320);
        assert_eq!(depth_pass(2880), 360);
    }

    /// Inputs are rounded (to nearest even), not truncated: a product whose inputs sit just
    /// above a bf16 value must differ from the truncated one.
    #[test]
    fn inputs_are_rounded_to_nearest_even() {
        // 1 + 2^-8 + 2^-10 rounds up to 1 + 2^-7 in bf16 (7 stored mantissa bits).
        let x = 1.0 + 2f32.powi(-8) + 2f32.powi(-10);
        let a = vec![x; 64];
        let b = vec![1.0f32; 64];
        let mut out = [0f32; 1];
        let op = |v: &[f32]| Operand {
            ptr: v.as_ptr(),
            rs: 64,
            cs: 1,
        };
        let bop = Operand {
            ptr: b.as_ptr(),
            rs: 1,
            cs: 1,
        };
        // SAFETY: a is [1, 64], b [64, 1], out [1, 1].
        unsafe { gemm((1, 1, 64), out.as_mut_ptr(), 1, false, op(&a), bop, 1.0) };
        assert_eq!(out[0], 64.0 * (1.0 + 2f32.powi(-7)));
    }
}
