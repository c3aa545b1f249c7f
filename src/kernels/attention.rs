//! Scaled dot-product attention that never holds more than one block of scores per thread.
//!
//! Queries, keys and values are read in the [B, N, heads·d] layout the projections produce
//! (heads are column blocks, so no transpose or copy), and the output is written in the same
//! layout, ready for the output projection. For each (item, head, block of queries) a task
//! computes the block's scores [rows, Nk] with one gemm, takes an exact row softmax in place,
//! multiplies by V with a second gemm, and divides by the row sums. At 64x64 latents this
//! replaces an 8 x 4096 x 4096 f32 score tensor (512 MiB per item) with 1 MiB per thread.
//! With bf16 products on a CPU that has them, the blocks are transposed instead (one query
//! per column; see [`attention_bf16`]).

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
    if prec_scores == Precision::Bf16 && bf16::native() {
        let out = attention_bf16((&qr, &kr, &vr), (b, nq, nk, heads, d), scale, nthreads);
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

/// [`attention`] with bf16 products, on a CPU with AVX-512 BF16. Each head's keys and values
/// are packed once for all its query blocks, and the scores are computed transposed, one
/// query per column (Sᵀ = K·Qᵀ): the softmax then runs down the columns on whole vectors, and
/// Pᵀ is packed for Oᵀ = Vᵀ·Pᵀ by the vectorised interleave of rows (a row-major P is packed
/// one pair of values at a time). No sum depends on the size of a query block, so the thread
/// count, which sets it, cannot change the bits.
fn attention_bf16(
    (qr, kr, vr): (&Rows, &Rows, &Rows),
    (b, nq, nk, heads, d): (usize, usize, usize, usize, usize),
    scale: f32,
    nthreads: usize,
) -> Vec<f32> {
    let c = heads * d;
    let (qs, ks, vs) = (qr.data(), kr.data(), vr.data());
    // K [nk, d] and Vᵀ [d, nk] of each (item, head), as left operands.
    let packed: Vec<(Packed, Packed)> = (0..b * heads)
        .map(|bh| {
            let (bi, hi) = (bh / heads, bh % heads);
            let k0 = bi * kr.batch_stride + hi * d;
            let v0 = bi * vr.batch_stride + hi * d;
            let kh = matrix(ks, k0, (nk, d), (kr.row_stride, 1));
            let vt = matrix(vs, v0, (d, nk), (1, vr.row_stride));
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
        .collect();

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
        let (kh, vt) = &packed[bh];
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
        // SAFETY: Qᵀ and Sᵀ (this task's own buffer) were checked by `matrix` (in debug
        // builds) for the shapes and strides given; K is packed for nk rows.
        unsafe {
            bf16::gemm_packed_a(
                kh,
                0,
                (nk, m),
                matrix_mut(st, 0, (nk, m), (m, 1)),
                m,
                false,
                Operand::new(qt, 1, qr.row_stride),
                scale,
            );
        }
        mx.resize(m, 0.0);
        simd::col_max(st, m, mx);
        sums.clear();
        sums.resize(m, 0.0);
        simd::exp_shifted_cols(st, m, mx, sums);
        // Oᵀ[d, m] = Vᵀ[d, nk] · Pᵀ[nk, m]
        // SAFETY: Pᵀ and Oᵀ are this task's own buffers, checked by `matrix` (in debug
        // builds); Vᵀ is packed for d rows.
        unsafe {
            bf16::gemm_packed_a(
                vt,
                0,
                (d, m),
                matrix_mut(ot, 0, (d, m), (m, 1)),
                m,
                false,
                Operand::new(matrix(st, 0, (nk, m), (m, 1)), m, 1),
                1.0,
            );
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
        for &(b, nq, nk, heads, d) in &[(2, 37, 37, 3, 8), (1, 300, 77, 2, 16), (2, 9, 1000, 1, 5)]
        {
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

    /// bf16 products (where the CPU has them, else there is nothing to test): near the f32
    /// result, and the same bits on 1 and 3 threads and in order, across odd head sizes,
    /// query blocks with tails, and column slices of a fused projection.
    #[test]
    fn bf16_products_stay_close_and_ignore_the_thread_count() {
        if !bf16::native() {
            return;
        }
        use crate::kernels::matmul::with_precision;
        for &(b, nq, nk, heads, d) in &[
            (2, 300, 300, 2, 40),
            (1, 700, 1000, 3, 24),
            (1, 130, 129, 1, 7),
        ] {
            let c = heads * d;
            let qkv = rand(&[b, nq.max(nk), 3 * c], 21);
            let q = qkv.narrow(1, 0, nq).unwrap().narrow(2, 0, c).unwrap();
            let k = qkv.narrow(1, 0, nk).unwrap().narrow(2, c, c).unwrap();
            let v = qkv.narrow(1, 0, nk).unwrap().narrow(2, 2 * c, c).unwrap();
            let contiguous = |t: &Tensor| t.contiguous().unwrap();
            let want = reference(&contiguous(&q), &contiguous(&k), &contiguous(&v), heads);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    with_precision(Precision::Bf16, || attention(&q, &k, &v, heads).unwrap())
                })
            };
            let one = run(1);
            let err = rel_l2(&one, &want);
            assert!(err < 1e-2, "rel L2 {err}");
            let bits = |t: &Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert_eq!(bits(&one), bits(&run(3)), "3 threads");
            let ordered = crate::kernels::in_order(|| {
                with_precision(Precision::Bf16, || attention(&q, &k, &v, heads).unwrap())
            });
            assert_eq!(bits(&one), bits(&ordered), "in order");
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
