//! Scaled dot-product attention that never holds more than one block of scores per thread.
//!
//! Queries, keys and values are read in the [B, N, heads·d] layout the projections produce
//! (heads are column blocks, so no transpose or copy), and the output is written in the same
//! layout, ready for the output projection. For each (item, head, block of queries) a task
//! computes the block's scores [rows, Nk] with one gemm, takes an exact row softmax in place,
//! multiplies by V with a second gemm, and divides by the row sums. At 64x64 latents this
//! replaces an 8 x 4096 x 4096 f32 score tensor (512 MiB per item) with 1 MiB per thread.
//! Where it measured faster, the blocks are transposed instead, one query per column (see
//! [`attention_transposed`]).

use super::bf16::{self, Operand, Packed};
use super::matmul::{Precision, Product, matmul, precision};
use super::simd;
use super::{SendPtr, matrix, matrix_mut, span, tensor, threads};
use anyhow::{Result, bail, ensure};
use candle_core::{DType, Storage, StorageRef, Tensor};
use gemm::Parallelism;

/// Scores per task, in floats (1 MiB).
const BLOCK_FLOATS: usize = 1 << 18;

/// A [B, N, C] f32 CPU tensor with unit stride on its last axis (possibly a column slice).
struct Rows<'a> {
    guard: StorageRef<'a>,
    start: usize,
    batch_stride: usize,
    row_stride: usize,
}

impl<'a> Rows<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        ensure!(
            t.rank() == 3 && t.dtype() == DType::F32,
            "attention: need [B, N, C] f32"
        );
        ensure!(
            matches!(&*guard, Storage::Cpu(_)),
            "attention: need a CPU tensor"
        );
        let st = layout.stride();
        ensure!(st[2] == 1, "attention: last axis must have unit stride");
        Ok(Self {
            start: layout.start_offset(),
            batch_stride: st[0],
            row_stride: st[1],
            guard,
        })
    }

    /// The storage from the view's first element on.
    fn data(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(c) => &c.as_slice::<f32>().expect("checked f32")[self.start..],
            _ => unreachable!("checked CPU"),
        }
    }
}

/// softmax(q·kᵀ/√d)·v per head. `q`: [B, Nq, H·d], `k` and `v`: [B, Nk, H·d] (the last axis
/// must have unit stride; other strides are free). Returns [B, Nq, H·d].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let prec = precision();
    let (b, nq, c) = q.dims3()?;
    let (kb, nk, kc) = k.dims3()?;
    ensure!(
        kb == b && kc == c && v.dims() == k.dims(),
        "attention: shapes differ"
    );
    if heads == 0 || !c.is_multiple_of(heads) {
        bail!("attention: {c} channels do not split into {heads} heads");
    }
    let d = c / heads;
    // Scores [nq, nk], then outputs [nq, d].
    let (prec_scores, prec_out) = (prec.for_output(nq, nk), prec.for_output(nq, d));
    let _p = super::profile::scope(|| format!("attention {nq}x{nk} h{heads} d{d}"));
    let scale = (d as f32).powf(-0.5);
    let (qr, kr, vr) = (Rows::new(q)?, Rows::new(k)?, Rows::new(v)?);
    let (qs, ks, vs) = (qr.data(), kr.data(), vr.data());

    let nthreads = threads();
    // Transposed blocks, where measured faster (kernel_bench / docs/performance.md, AVX-512):
    // bf16 products 2.1x at 4096x4096 d40; f32 0.85-0.88x for head dims under 64 (self- and
    // cross-attention), +1-5% from 64 (SDXL's, the VAE's 512). Without AVX-512 the column
    // softmax is slower than the row one and f32 loses 6-8%.
    let transposed = match prec_scores {
        Precision::Bf16 => bf16::native(),
        Precision::F32 => d < 64 && simd::has_avx512f(),
    };
    if transposed {
        let out = attention_transposed(
            (&qr, &kr, &vr),
            (b, nq, nk, heads, d),
            scale,
            nthreads,
            prec_scores,
        );
        drop((qr, kr, vr));
        return tensor(out, (b, nq, c));
    }
    // bf16 products (emulated here) pack K and V per query block: larger blocks pack them
    // fewer times.
    let block_floats = match prec_scores {
        Precision::F32 => BLOCK_FLOATS,
        Precision::Bf16 => 4 * BLOCK_FLOATS,
    };
    let mut rows = (block_floats / nk).clamp(8, 512).min(nq);
    while rows > 8 && b * heads * nq.div_ceil(rows) < 4 * nthreads {
        rows = rows.div_ceil(2);
    }
    let blocks = nq.div_ceil(rows);
    let tasks = b * heads * blocks;

    let mut out = vec![0.0; b * nq * c];
    let op = SendPtr::new(&mut out);
    let run = |task: usize, s: &mut Vec<f32>| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / heads, bh % heads);
        let q0 = blk * rows;
        let m = rows.min(nq - q0);
        s.resize(m * nk, 0.0);
        // Head hi's columns of item bi: queries q0..q0+m, all keys and values.
        let qb = matrix(
            qs,
            bi * qr.batch_stride + q0 * qr.row_stride + hi * d,
            (m, d),
            (qr.row_stride, 1),
        );
        let kb = matrix(
            ks,
            bi * kr.batch_stride + hi * d,
            (d, nk),
            (1, kr.row_stride),
        );
        let vb = matrix(
            vs,
            bi * vr.batch_stride + hi * d,
            (nk, d),
            (vr.row_stride, 1),
        );
        let o0 = bi * nq * c + q0 * c + hi * d;
        // s[m, nk] = scale · q[m, d] · kᵀ[d, nk]
        // SAFETY: q, k and the scores (this task's own buffer) were checked by `matrix` (in
        // debug builds) for the shapes and strides given to gemm.
        unsafe {
            matmul(
                prec_scores,
                Product {
                    m,
                    n: nk,
                    k: d,
                    dst: matrix_mut(s, 0, (m, nk), (nk, 1)),
                    dst_rs: nk,
                    lhs: (qb, qr.row_stride, 1),
                    rhs: (kb, 1, kr.row_stride),
                },
                false,
                scale,
                Parallelism::None,
            );
        }
        let mut inv = [0f32; 512];
        for (r, row) in s.chunks_exact_mut(nk).enumerate() {
            let mx = simd::row_max(row);
            inv[r] = (1.0 / simd::exp_shifted_sum(row, mx)) as f32;
        }
        // out[m, d] = p[m, nk] · v[nk, d]
        // SAFETY: this task alone writes rows q0..q0+m, columns hi·d..(hi+1)·d of item bi of
        // the output, which `at` checks lie inside it (in debug builds); the scores and v were
        // checked by `matrix` for the shapes and strides given to gemm.
        unsafe {
            matmul(
                prec_out,
                Product {
                    m,
                    n: d,
                    k: nk,
                    dst: op.at(o0, span(m, d, c, 1)),
                    dst_rs: c,
                    lhs: (matrix(s, 0, (m, nk), (nk, 1)), nk, 1),
                    rhs: (vb, vr.row_stride, 1),
                },
                false,
                1.0,
                Parallelism::None,
            );
        }
        for (r, &f) in inv.iter().enumerate().take(m) {
            // SAFETY: row r < m of the block this task alone writes (see above): d values from
            // o0 + r·c, inside the output (checked by `slice_mut` in debug builds).
            simd::scale_inplace(unsafe { op.slice_mut(o0 + r * c, d) }, f);
        }
    };
    super::for_each_task_with(tasks, Vec::new, |s, t| run(t, s));
    drop((qr, kr, vr));
    tensor(out, (b, nq, c))
}

/// [`attention`] with the scores computed transposed, one query per column (Sᵀ = K·Qᵀ), then
/// Oᵀ = Vᵀ·Pᵀ: the softmax runs down the columns on whole vectors, whatever the head size,
/// and with bf16 products (`prec`, on a CPU with AVX-512 BF16) Pᵀ is packed by the
/// vectorised interleave of rows (a row-major P is packed one pair of values at a time) and
/// each head's K and Vᵀ are packed once for all its query blocks. No sum depends on the size
/// of a query block, so the thread count, which sets it, cannot change the bits.
fn attention_transposed(
    (qr, kr, vr): (&Rows, &Rows, &Rows),
    (b, nq, nk, heads, d): (usize, usize, usize, usize, usize),
    scale: f32,
    nthreads: usize,
    prec: Precision,
) -> Vec<f32> {
    let c = heads * d;
    let (qs, ks, vs) = (qr.data(), kr.data(), vr.data());
    let k_at = |bh: usize| (bh / heads) * kr.batch_stride + (bh % heads) * d;
    let v_at = |bh: usize| (bh / heads) * vr.batch_stride + (bh % heads) * d;
    // K [nk, d] and Vᵀ [d, nk] of each (item, head), the left operands.
    let kh = |bh: usize| matrix(ks, k_at(bh), (nk, d), (kr.row_stride, 1));
    let vt = |bh: usize| matrix(vs, v_at(bh), (d, nk), (1, vr.row_stride));
    let packed: Option<Vec<(Packed, Packed)>> = (prec == Precision::Bf16).then(|| {
        (0..b * heads)
            .map(|bh| {
                let (kh, vt) = (kh(bh), vt(bh));
                // SAFETY: `matrix` checked (in debug builds) that both lie inside k and v; the
                // CPU has AVX-512 BF16 (checked by the caller), so packing gives Some.
                unsafe {
                    (
                        bf16::pack_a(Operand::new(kh, kr.row_stride, 1), nk, d),
                        bf16::pack_a(Operand::new(vt, 1, vr.row_stride), d, nk),
                    )
                }
            })
            .map(|(k, v)| (k.expect("native bf16"), v.expect("native bf16")))
            .collect()
    });

    // Queries per block: a multiple of the tile width, with Sᵀ near the size of L2.
    let nr = bf16::NR;
    let mut cols = (BLOCK_FLOATS / nk / nr * nr).clamp(nr, 10 * nr).min(nq);
    while cols > nr && b * heads * nq.div_ceil(cols) < 4 * nthreads {
        cols = (cols / 2).next_multiple_of(nr);
    }
    let blocks = nq.div_ceil(cols);

    let mut out = vec![0.0; b * nq * c];
    let op = SendPtr::new(&mut out);
    let run = |task: usize, (st, ot, mx, sums): &mut (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f64>)| {
        let (bh, blk) = (task / blocks, task % blocks);
        let (bi, hi) = (bh / heads, bh % heads);
        let q0 = blk * cols;
        let m = cols.min(nq - q0);
        st.resize(nk * m, 0.0);
        ot.resize(d * m, 0.0);
        let qt = matrix(
            qs,
            bi * qr.batch_stride + q0 * qr.row_stride + hi * d,
            (d, m),
            (1, qr.row_stride),
        );
        // Sᵀ[nk, m] = scale · K[nk, d] · Qᵀ[d, m]
        // SAFETY: Qᵀ, K (when not packed for its nk rows) and Sᵀ (this task's own buffer)
        // were checked by `matrix` (in debug builds) for the shapes and strides given.
        unsafe {
            let dst = matrix_mut(st, 0, (nk, m), (m, 1));
            match &packed {
                Some(p) => bf16::gemm_packed_a(
                    &p[bh].0,
                    0,
                    (nk, m),
                    dst,
                    m,
                    false,
                    Operand::new(qt, 1, qr.row_stride),
                    scale,
                ),
                None => matmul(
                    prec,
                    Product {
                        m: nk,
                        n: m,
                        k: d,
                        dst,
                        dst_rs: m,
                        lhs: (kh(bh), kr.row_stride, 1),
                        rhs: (qt, 1, qr.row_stride),
                    },
                    false,
                    scale,
                    Parallelism::None,
                ),
            }
        }
        mx.resize(m, 0.0);
        simd::col_max(st, m, mx);
        sums.clear();
        sums.resize(m, 0.0);
        simd::exp_shifted_cols(st, m, mx, sums);
        // Oᵀ[d, m] = Vᵀ[d, nk] · Pᵀ[nk, m]
        // SAFETY: Pᵀ and Oᵀ are this task's own buffers; they and Vᵀ (when not packed for
        // its d rows) were checked by `matrix` (in debug builds).
        unsafe {
            let (dst, pt) = (
                matrix_mut(ot, 0, (d, m), (m, 1)),
                matrix(st, 0, (nk, m), (m, 1)),
            );
            match &packed {
                Some(p) => bf16::gemm_packed_a(
                    &p[bh].1,
                    0,
                    (d, m),
                    dst,
                    m,
                    false,
                    Operand::new(pt, m, 1),
                    1.0,
                ),
                None => matmul(
                    prec,
                    Product {
                        m: d,
                        n: m,
                        k: nk,
                        dst,
                        dst_rs: m,
                        lhs: (vt(bh), 1, vr.row_stride),
                        rhs: (pt, m, 1),
                    },
                    false,
                    1.0,
                    Parallelism::None,
                ),
            }
        }
        let o0 = bi * nq * c + q0 * c + hi * d;
        for (qi, &sum) in sums.iter().enumerate() {
            let inv = (1.0 / sum) as f32;
            // SAFETY: this task alone writes rows q0..q0+m, columns hi·d..(hi+1)·d of item bi
            // of the output: d values from o0 + qi·c, inside it (checked by `slice_mut` in
            // debug builds).
            let row = unsafe { op.slice_mut(o0 + qi * c, d) };
            for (r, o) in row.iter_mut().enumerate() {
                *o = ot[r * m + qi] * inv;
            }
        }
    };
    super::for_each_task_with(
        b * heads * blocks,
        || (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        |s, t| run(t, s),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{self, max_diff};

    /// Values in [-2, 2).
    fn rand(shape: &[usize], seed: u64) -> Tensor {
        testing::rand(shape, seed).affine(4.0, 0.0).unwrap()
    }

    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
        let (b, nq, c) = q.dims3().unwrap();
        let nk = k.dim(1).unwrap();
        let d = c / heads;
        let split = |t: &Tensor, n: usize| {
            t.reshape((b, n, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q, nq), split(k, nk), split(v, nk));
        let s = (q.matmul(&k.t().unwrap()).unwrap() * (d as f64).powf(-0.5)).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, nq, c))
            .unwrap()
    }

    #[test]
    fn matches_reference() {
        // Head sizes under 64 take the transposed blocks on AVX-512, 64 the row blocks.
        for &(b, nq, nk, heads, d) in &[
            (2, 37, 37, 3, 8),
            (1, 300, 77, 2, 16),
            (2, 9, 1000, 1, 5),
            (1, 150, 130, 2, 64),
        ] {
            let q = rand(&[b, nq, heads * d], 1);
            let k = rand(&[b, nk, heads * d], 2);
            let v = rand(&[b, nk, heads * d], 3);
            let want = reference(&q, &k, &v, heads);
            let got = attention(&q, &k, &v, heads).unwrap();
            let diff: f32 = max_diff(&got, &want);
            assert!(diff < 1e-5, "max diff {diff}");
        }
    }

    fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
        let err = (got - want).unwrap().sqr().unwrap().sum_all().unwrap();
        let norm = want.sqr().unwrap().sum_all().unwrap();
        (err.to_scalar::<f32>().unwrap() as f64 / norm.to_scalar::<f32>().unwrap() as f64).sqrt()
    }

    /// Both precisions' products (bf16 where the CPU has it) near candle's f32 reference,
    /// and the same bits on 1 and 3 threads and in order (which change the query blocks),
    /// across head sizes on both sides of 64, blocks with tails, and column slices of a fused
    /// projection.
    #[test]
    fn products_stay_close_and_ignore_the_thread_count() {
        use crate::kernels::matmul::with_precision;
        let mut precisions = vec![(Precision::F32, 1e-5)];
        if bf16::native() {
            precisions.push((Precision::Bf16, 1e-2));
        }
        let shapes = [
            (2, 300, 300, 2, 40),
            (1, 700, 1000, 3, 24),
            (1, 130, 129, 1, 7),
            (2, 200, 77, 2, 72),
        ];
        for (prec, tol) in precisions {
            for &(b, nq, nk, heads, d) in &shapes {
                let c = heads * d;
                let qkv = rand(&[b, nq.max(nk), 3 * c], 21);
                let q = qkv.narrow(1, 0, nq).unwrap().narrow(2, 0, c).unwrap();
                let k = qkv.narrow(1, 0, nk).unwrap().narrow(2, c, c).unwrap();
                let v = qkv.narrow(1, 0, nk).unwrap().narrow(2, 2 * c, c).unwrap();
                let contiguous = |t: &Tensor| t.contiguous().unwrap();
                let want = reference(&contiguous(&q), &contiguous(&k), &contiguous(&v), heads);
                let attend = || with_precision(prec, || attention(&q, &k, &v, heads).unwrap());
                let on = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    pool.install(attend)
                };
                let one = on(1);
                let err = rel_l2(&one, &want);
                let what = format!("{prec:?} {b}x{nq}x{nk} h{heads} d{d}");
                assert!(err < tol, "{what}: rel L2 {err}");
                let bits = |t: &Tensor| {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(bits(&one), bits(&on(3)), "{what}: 3 threads");
                assert_eq!(
                    bits(&one),
                    bits(&crate::kernels::in_order(attend)),
                    "{what}: in order"
                );
            }
        }
    }

    #[test]
    fn reads_column_slices() {
        let (b, n, heads, d) = (2, 20, 2, 4);
        let c = heads * d;
        let qkv = rand(&[b, n, 3 * c], 9);
        let q = qkv.narrow(2, 0, c).unwrap();
        let k = qkv.narrow(2, c, c).unwrap();
        let v = qkv.narrow(2, 2 * c, c).unwrap();
        let want = reference(
            &q.contiguous().unwrap(),
            &k.contiguous().unwrap(),
            &v.contiguous().unwrap(),
            heads,
        );
        let got = attention(&q, &k, &v, heads).unwrap();
        let diff: f32 = max_diff(&got, &want);
        assert!(diff < 1e-5, "max diff {diff}");
    }
}
