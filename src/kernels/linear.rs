//! Linear layers as row-blocked gemms with the bias and the residual fused in, including the
//! two layout changes around a spatial transformer: a feature map [B, C, H, W] read as tokens
//! [B, H·W, C] (proj_in) and tokens written back as a map (proj_out), without a transpose copy.

use super::bf16;
use super::matmul::{Product, matmul, matmul_packed_lhs, matmul_packed_rhs, precision};
use super::prepared::{PreparedLinear, packs};
use super::{F32View, SendPtr, for_each_chunk, for_each_task, matrix, span, tensor, threads};
use anyhow::{Result, ensure};
use candle_core::Tensor;
use gemm::Parallelism;

/// Rows (or columns) of output per task.
const BLOCK: usize = 128;

/// How the input's [rows, K] matrix lies in memory, per batch item.
#[derive(Clone, Copy)]
struct Input<'a> {
    data: &'a [f32],
    /// Elements between batch items.
    item: usize,
    /// Stride between rows (tokens) and between columns (features).
    rs: usize,
    cs: usize,
}

/// Fills `out` (rows of `n`) with `residual + bias` (or `bias`); returns whether anything was
/// written. The bias runs along each row, or with `bias_per_row` is one value per row (the
/// channel of a map [B, N, H·W]).
fn init_out(
    out: &mut [f32],
    n: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    bias_per_row: bool,
) -> bool {
    if bias.is_none() && residual.is_none() {
        return false;
    }
    for_each_chunk(out, BLOCK * n, |blk, dst| {
        let off = blk * BLOCK * n;
        if let Some(r) = residual {
            dst.copy_from_slice(&r[off..off + dst.len()]);
        }
        let Some(b) = bias else { return };
        for (i, row) in dst.chunks_exact_mut(n).enumerate() {
            match (bias_per_row, residual.is_some()) {
                (true, true) => {
                    let v = b[(blk * BLOCK + i) % b.len()];
                    row.iter_mut().for_each(|x| *x += v);
                }
                (true, false) => row.fill(b[(blk * BLOCK + i) % b.len()]),
                (false, true) => row.iter_mut().zip(b).for_each(|(x, v)| *x += v),
                (false, false) => row.copy_from_slice(b),
            }
        }
    });
    true
}

/// Splits an output of `items` x [tokens, features] into parallel single-threaded gemm tasks
/// `f(item, t0, tokens, f0, features)` with f0 a multiple of `align`: along tokens when there
/// are plenty (every task then packs the whole weight, which its many tokens amortise), else
/// along features (the weight is split, so it is read once in all).
fn for_grid(
    items: usize,
    tokens: usize,
    (features, align): (usize, usize),
    f: impl Fn(usize, usize, usize, usize, usize) + Sync,
) {
    let nthreads = threads();
    let want = 3 * nthreads;
    let (tb, fb) = if items * tokens >= 256 * want {
        let per_item = want.div_ceil(items);
        (tokens.div_ceil(per_item).max(128), features)
    } else {
        let per_item = want.div_ceil(items);
        let fb = features
            .div_ceil(per_item)
            .next_multiple_of(align)
            .max(align);
        (tokens, fb)
    };
    let (nt, nf) = (tokens.div_ceil(tb), features.div_ceil(fb));
    let tasks = items * nt * nf;
    for_each_task(tasks, |t| {
        let (item, rest) = (t / (nt * nf), t % (nt * nf));
        let (ti, fi) = (rest / nf, rest % nf);
        let (t0, f0) = (ti * tb, fi * fb);
        f(item, t0, tb.min(tokens - t0), f0, fb.min(features - f0));
    });
}

/// The weight [N, K] (a 1x1 kernel [N, K, 1, 1] reads as one) as f32, or `None` where `kept`:
/// a packed form kept by the layer serves instead, so a weight kept in 16 bits is not widened.
fn f32_matrix(w: &Tensor, kept: bool) -> Result<Option<Tensor>> {
    if kept {
        return Ok(None);
    }
    let w = super::f32_weight(w)?;
    Ok(Some(w.reshape((w.dim(0)?, ()))?))
}

/// `x · wᵀ + bias + residual` with x: [..., K], w: [N, K], bias: [N], residual: [..., N];
/// `prepared` keeps w's packed form for bf16 products (see [`PreparedLinear`]).
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    prepared: Option<&PreparedLinear>,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (n, k) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    ensure!(
        dims.last() == Some(&k),
        "linear: input {dims:?}, weight [{n}, {k}]"
    );
    let m = x.elem_count() / k;
    let _p = super::profile::scope(|| format!("linear {m}x{k}->{n}"));
    *dims.last_mut().expect("rank >= 1") = n;
    let xv = F32View::new(&x)?;
    let input = Input {
        data: xv.slice(),
        item: 0,
        rs: k,
        cs: 1,
    };
    let out = tokens_out(input, 1, m, (w, prepared), bias, residual)?;
    drop(xv);
    tensor(out, dims)
}

/// A feature map x: [B, Cin, H, W] read as tokens [B, H·W, Cin], then `· wᵀ + bias`:
/// returns [B, H·W, N] (a 1x1 convolution followed by the permute, in one pass).
pub fn linear_from_map(
    x: &Tensor,
    w: &Tensor,
    prepared: Option<&PreparedLinear>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (b, cin, h, wd) = x.dims4()?;
    let n = w.dim(0)?;
    let k = w.elem_count() / n.max(1);
    ensure!(
        k == cin,
        "linear_from_map: {cin} channels, weight [{n}, {k}]"
    );
    let hw = h * wd;
    let _p = super::profile::scope(|| format!("linear_from_map {hw}x{k}->{n}"));
    let xv = F32View::new(&x)?;
    let input = Input {
        data: xv.slice(),
        item: cin * hw,
        rs: 1,
        cs: hw,
    };
    let out = tokens_out(input, b, hw, (w, prepared), bias, None)?;
    drop(xv);
    tensor(out, (b, hw, n))
}

/// Output [items·rows, N] row-major from an input with arbitrary strides.
fn tokens_out(
    input: Input<'_>,
    items: usize,
    rows: usize,
    (w, prepared): (&Tensor, Option<&PreparedLinear>),
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Vec<f32>> {
    let n = w.dim(0)?;
    let k = w.elem_count() / n.max(1);
    let prec = precision().for_output(items * rows, n);
    // The layer's kept forms, where this call's products use packed operands.
    let prepared = prepared.filter(|_| packs(prec));
    let w = f32_matrix(w, prepared.is_some_and(|p| p.holds(false)))?;
    let bias = bias.map(|t| t.contiguous()).transpose()?;
    let residual = residual.map(|t| t.contiguous()).transpose()?;
    if let Some(r) = &residual {
        ensure!(r.elem_count() == items * rows * n, "linear: residual size");
    }
    let bv = bias.as_ref().map(F32View::new).transpose()?;
    let rv = residual.as_ref().map(F32View::new).transpose()?;
    let wv = w.as_ref().map(F32View::new).transpose()?;
    // Empty where the kept packed form serves instead.
    let ws = wv.as_ref().map_or(&[][..], |v| v.slice());
    // wᵀ [K, N] packed once for the layer's life (with bf16 products and a layer to keep it).
    // SAFETY: ws is w [N, K] row-major, so wᵀ [K, N] at strides (1, K).
    let packed = prepared.and_then(|p| {
        p.rhs(|| unsafe { bf16::pack_b(bf16::Operand::new(ws.as_ptr(), 1, k), k, n) })
    });
    let mut out = vec![0.0; items * rows * n];
    let read_dst = init_out(
        &mut out,
        n,
        bv.as_ref().map(|v| v.slice()),
        rv.as_ref().map(|v| v.slice()),
        false,
    );
    let dst = SendPtr::new(&mut out);
    let align = if packed.is_some() { bf16::NR } else { 16 };
    for_grid(items, rows, (n, align), |item, r0, m, c0, nc| {
        // lhs: the item's tokens r0..r0+m, all K features; rhs: wᵀ columns c0..c0+nc.
        let lhs = matrix(
            input.data,
            item * input.item + r0 * input.rs,
            (m, k),
            (input.rs, input.cs),
        );
        // SAFETY: rows r0..r0+m, columns c0..c0+nc of item `item` (rows n apart) are this
        // task's alone and lie inside the output (checked by `at` in debug builds); lhs and
        // rhs were checked by `matrix` for the shapes and strides given to gemm, and c0 is a
        // multiple of NR inside the packed wᵀ.
        unsafe {
            let dst = dst.at((item * rows + r0) * n + c0, span(m, nc, n, 1));
            let lhs = (lhs, input.rs, input.cs);
            if let Some(packed) = packed {
                matmul_packed_rhs(packed, c0, (m, nc), (dst, n), read_dst, lhs);
                return;
            }
            let rhs = matrix(ws, c0 * k, (k, nc), (1, k));
            matmul(
                prec,
                Product {
                    m,
                    n: nc,
                    k,
                    dst,
                    dst_rs: n,
                    lhs,
                    rhs: (rhs, 1, k),
                },
                read_dst,
                1.0,
                Parallelism::None,
            );
        }
    });
    Ok(out)
}

/// Tokens t: [B, H·W, K] through `w: [N, K]` (+ bias), written as a map [B, N, H, W]
/// (+ residual): a linear layer or 1x1 convolution and the permute back, in one pass.
pub fn linear_to_map(
    t: &Tensor,
    w: &Tensor,
    prepared: Option<&PreparedLinear>,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    (h, wd): (usize, usize),
) -> Result<Tensor> {
    let t = t.contiguous()?;
    let (b, hw, k) = t.dims3()?;
    ensure!(hw == h * wd, "linear_to_map: {hw} tokens for {h}x{wd}");
    let n = w.dim(0)?;
    let wk = w.elem_count() / n.max(1);
    ensure!(wk == k, "linear_to_map: {k} features, weight [{n}, {wk}]");
    let prec = precision().for_output(n, b * hw);
    // The layer's kept forms, where this call's products use packed operands.
    let prepared = prepared.filter(|_| packs(prec));
    let w = f32_matrix(w, prepared.is_some_and(|p| p.holds(true)))?;
    let _p = super::profile::scope(|| format!("linear_to_map {hw}x{k}->{n}"));
    let bias = bias.map(|t| t.contiguous()).transpose()?;
    let residual = residual.map(|t| t.contiguous()).transpose()?;
    if let Some(r) = &residual {
        ensure!(r.dims() == [b, n, h, wd], "linear_to_map: residual shape");
    }
    let tv = F32View::new(&t)?;
    let wv = w.as_ref().map(F32View::new).transpose()?;
    let bv = bias.as_ref().map(F32View::new).transpose()?;
    let rv = residual.as_ref().map(F32View::new).transpose()?;
    let mut out = vec![0.0; b * n * hw];
    let read_dst = init_out(
        &mut out,
        hw,
        bv.as_ref().map(|v| v.slice()),
        rv.as_ref().map(|v| v.slice()),
        true,
    );
    let dst = SendPtr::new(&mut out);
    let ts = tv.slice();
    // Empty where the kept packed form serves instead.
    let ws = wv.as_ref().map_or(&[][..], |v| v.slice());
    // w [N, K] packed once for the layer's life (with bf16 products and a layer to keep it).
    // SAFETY: ws is w [N, K] row-major.
    let packed = prepared.and_then(|p| {
        p.lhs(|| unsafe { bf16::pack_a(bf16::Operand::new(ws.as_ptr(), k, 1), n, k) })
    });
    // out[b] [N, HW] = w [N, K] · t[b]ᵀ [K, HW]; tasks over blocks of pixels (columns).
    for_grid(b, hw, (n, 16), |item, p0, cols, f0, nf| {
        // lhs: weight rows f0..f0+nf; rhs: the item's tokens p0..p0+cols, transposed.
        let rhs = matrix(ts, item * hw * k + p0 * k, (k, cols), (1, k));
        // SAFETY: features f0..f0+nf, pixels p0..p0+cols of item `item` (rows hw apart) are
        // this task's alone and lie inside the output (checked by `at` in debug builds); lhs
        // and rhs were checked by `matrix` for the shapes and strides given to gemm, and f0
        // is a multiple of 16 inside the packed w.
        unsafe {
            let dst = dst.at(item * n * hw + f0 * hw + p0, span(nf, cols, hw, 1));
            if let Some(packed) = packed {
                let none = Parallelism::None;
                matmul_packed_lhs(
                    packed,
                    f0,
                    (nf, cols),
                    (dst, hw),
                    read_dst,
                    (rhs, 1, k),
                    none,
                );
                return;
            }
            let lhs = matrix(ws, f0 * k, (nf, k), (k, 1));
            matmul(
                prec,
                Product {
                    m: nf,
                    n: cols,
                    k,
                    dst,
                    dst_rs: hw,
                    lhs: (lhs, k, 1),
                    rhs: (rhs, 1, k),
                },
                read_dst,
                1.0,
                Parallelism::None,
            );
        }
    });
    drop((tv, wv));
    tensor(out, (b, n, h, wd))
}

/// GEGLU: h: [..., 2·I] → h[..., :I] · gelu_erf(h[..., I:]), as [..., I].
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let h = h.contiguous()?;
    let mut dims = h.dims().to_vec();
    let two_i = *dims.last().expect("rank >= 1");
    ensure!(two_i.is_multiple_of(2), "geglu: odd last axis {two_i}");
    let inner = two_i / 2;
    let _p = super::profile::scope(|| format!("geglu {inner}"));
    *dims.last_mut().expect("rank >= 1") = inner;
    let hv = F32View::new(&h)?;
    let hs = hv.slice();
    let mut out = vec![0.0; hs.len() / 2];
    // Rows in blocks, so small tensors do not become one task per row.
    for_each_chunk(&mut out, BLOCK * inner, |blk, o| {
        let rows = &hs[blk * BLOCK * two_i..][..o.len() * 2];
        for (o, row) in o.chunks_exact_mut(inner).zip(rows.chunks_exact(two_i)) {
            super::simd::geglu(&row[..inner], &row[inner..], o);
        }
    });
    drop(hv);
    tensor(out, dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{max_diff, rand};
    use candle_core::Module;

    #[test]
    fn linear_matches_candle() {
        for &(b, m, k, n) in &[
            (2, 300, 17, 9),
            (1, 5, 8, 3),
            (3, 129, 40, 70),
            (1, 2000, 8, 5),
        ] {
            let x = rand(&[b, m, k], 1);
            let w = rand(&[n, k], 2);
            let bias = rand(&[n], 3);
            let res = rand(&[b, m, n], 4);
            let lin = candle_nn::Linear::new(w.clone(), Some(bias.clone()));
            let want = lin.forward(&x).unwrap();
            assert!(max_diff(&linear(&x, &w, None, Some(&bias), None).unwrap(), &want) < 1e-5);
            let want_r = (&want + &res).unwrap();
            assert!(
                max_diff(
                    &linear(&x, &w, None, Some(&bias), Some(&res)).unwrap(),
                    &want_r
                ) < 1e-5
            );
            let want_nb = candle_nn::Linear::new(w.clone(), None).forward(&x).unwrap();
            assert!(max_diff(&linear(&x, &w, None, None, None).unwrap(), &want_nb) < 1e-5);
        }
    }

    #[test]
    fn a_weight_kept_packed_gives_the_bits_of_one_packed_per_call() {
        use crate::kernels::matmul::{Precision, with_precision};
        use candle_core::DType;
        let bits = |t: &Tensor| -> Vec<u32> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        // (B, tokens, K, N): tasks split along tokens, and along features (few tokens).
        for (i, &(b, m, k, n)) in [(2, 700, 64, 200), (2, 64, 160, 500)].iter().enumerate() {
            let x = rand(&[b, m, k], 30 + i as u64);
            let map = rand(&[b, k, m, 1], 40 + i as u64);
            let bias = rand(&[n], 50 + i as u64);
            let res = rand(&[b, n, m, 1], 60 + i as u64);
            // A weight kept in 16 bits as well: its kept form spares the widening.
            for w in [
                rand(&[n, k], 70 + i as u64),
                rand(&[n, k], 80).to_dtype(DType::BF16).unwrap(),
            ] {
                let wt = rand(&[k, n], 90 + i as u64).to_dtype(w.dtype()).unwrap();
                let wt = wt.t().unwrap().contiguous().unwrap();
                let kept = [PreparedLinear::default(), PreparedLinear::default()];
                let kept_map = PreparedLinear::default();
                let run = |kept: Option<&PreparedLinear>, kept_map: Option<&PreparedLinear>| {
                    with_precision(Precision::Bf16, || {
                        [
                            linear(&x, &w, kept, Some(&bias), None).unwrap(),
                            linear_from_map(&map, &w, kept, Some(&bias)).unwrap(),
                            linear_to_map(&x, &wt, kept_map, Some(&bias), Some(&res), (m, 1))
                                .unwrap(),
                        ]
                    })
                };
                let per_call = run(None, None);
                let first = run(Some(&kept[0]), Some(&kept_map));
                let again = run(Some(&kept[0]), Some(&kept_map));
                for j in 0..3 {
                    assert!(bits(&first[j]) == bits(&per_call[j]), "case {i}/{j}: made");
                    assert!(bits(&again[j]) == bits(&per_call[j]), "case {i}/{j}: kept");
                }
                let f32_out = linear(&x, &w, Some(&kept[1]), Some(&bias), None).unwrap();
                if crate::kernels::matmul::bf16_native() {
                    assert!(kept[0].bytes() > 0 && kept_map.bytes() > 0, "case {i}");
                    assert!(max_diff(&f32_out, &per_call[0]) > 0.0, "case {i}: not bf16");
                } else {
                    assert_eq!(kept[0].bytes() + kept_map.bytes(), 0, "case {i}");
                }
                assert_eq!(kept[1].bytes(), 0, "case {i}: kept with f32 products");
            }
        }
    }

    #[test]
    fn geglu_matches_candle() {
        let h = (rand(&[2, 5, 12], 11) * 6.0).unwrap();
        let parts = h.chunk(2, 2).unwrap();
        let want = (&parts[0] * parts[1].gelu_erf().unwrap()).unwrap();
        assert!(max_diff(&geglu(&h).unwrap(), &want) < 2e-6);
    }

    #[test]
    fn map_layouts_match_permutes() {
        let (b, c, h, w, n) = (2, 6, 7, 9, 5);
        let x = rand(&[b, c, h, w], 5);
        let wt = rand(&[n, c], 6);
        let bias = rand(&[n], 7);
        let tokens = x
            .permute((0, 2, 3, 1))
            .unwrap()
            .reshape((b, h * w, c))
            .unwrap();
        let want = candle_nn::Linear::new(wt.clone(), Some(bias.clone()))
            .forward(&tokens)
            .unwrap();
        let got = linear_from_map(&x, &wt, None, Some(&bias)).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);

        let t = rand(&[b, h * w, c], 8);
        let res = rand(&[b, n, h, w], 9);
        let lin = candle_nn::Linear::new(wt.clone(), Some(bias.clone()))
            .forward(&t)
            .unwrap();
        let want = (lin
            .reshape((b, h, w, n))
            .unwrap()
            .permute((0, 3, 1, 2))
            .unwrap()
            + &res)
            .unwrap();
        let got = linear_to_map(&t, &wt, None, Some(&bias), Some(&res), (h, w)).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        let got = linear_to_map(
            &t,
            &wt.reshape((n, c, 1, 1)).unwrap(),
            None,
            Some(&bias),
            Some(&res),
            (h, w),
        )
        .unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }
}
