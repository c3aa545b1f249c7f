//! Linear layers as row-blocked gemms with the bias and the residual fused in, including the
//! two layout changes around a spatial transformer: a feature map [B, C, H, W] read as tokens
//! [B, H·W, C] (proj_in) and tokens written back as a map (proj_out), without a transpose copy.

use super::matmul::{Product, matmul, precision};
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
/// `f(item, t0, tokens, f0, features)`: along tokens when there are plenty (every task then
/// packs the whole weight, which its many tokens amortise), else along features (the weight is
/// split, so it is read once in all).
fn for_grid(
    items: usize,
    tokens: usize,
    features: usize,
    f: impl Fn(usize, usize, usize, usize, usize) + Sync,
) {
    let nthreads = threads();
    let want = 3 * nthreads;
    let (tb, fb) = if items * tokens >= 256 * want {
        let per_item = want.div_ceil(items);
        (tokens.div_ceil(per_item).max(128), features)
    } else {
        let per_item = want.div_ceil(items);
        let fb = features.div_ceil(per_item).next_multiple_of(16).max(16);
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

/// `x · wᵀ + bias + residual` with x: [..., K], w: [N, K], bias: [N], residual: [..., N].
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = super::f32_weight(w)?;
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
    let out = tokens_out(input, 1, m, &w, bias, residual)?;
    drop(xv);
    tensor(out, dims)
}

/// A feature map x: [B, Cin, H, W] read as tokens [B, H·W, Cin], then `· wᵀ + bias`:
/// returns [B, H·W, N] (a 1x1 convolution followed by the permute, in one pass).
pub fn linear_from_map(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (b, cin, h, wd) = x.dims4()?;
    let w = super::f32_weight(w)?;
    let w = w.reshape((w.dim(0)?, ()))?;
    let (n, k) = w.dims2()?;
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
    let out = tokens_out(input, b, hw, &w, bias, None)?;
    drop(xv);
    tensor(out, (b, hw, n))
}

/// Output [items·rows, N] row-major from an input with arbitrary strides.
fn tokens_out(
    input: Input<'_>,
    items: usize,
    rows: usize,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Vec<f32>> {
    let (n, k) = w.dims2()?;
    let prec = precision().for_output(items * rows, n);
    let bias = bias.map(|t| t.contiguous()).transpose()?;
    let residual = residual.map(|t| t.contiguous()).transpose()?;
    if let Some(r) = &residual {
        ensure!(r.elem_count() == items * rows * n, "linear: residual size");
    }
    let bv = bias.as_ref().map(F32View::new).transpose()?;
    let rv = residual.as_ref().map(F32View::new).transpose()?;
    let wv = F32View::new(w)?;
    let ws = wv.slice();
    let mut out = vec![0.0; items * rows * n];
    let read_dst = init_out(
        &mut out,
        n,
        bv.as_ref().map(|v| v.slice()),
        rv.as_ref().map(|v| v.slice()),
        false,
    );
    let dst = SendPtr::new(&mut out);
    for_grid(items, rows, n, |item, r0, m, c0, nc| {
        // lhs: the item's tokens r0..r0+m, all K features; rhs: wᵀ columns c0..c0+nc.
        let lhs = matrix(
            input.data,
            item * input.item + r0 * input.rs,
            (m, k),
            (input.rs, input.cs),
        );
        let rhs = matrix(ws, c0 * k, (k, nc), (1, k));
        // SAFETY: rows r0..r0+m, columns c0..c0+nc of item `item` (rows n apart) are this
        // task's alone and lie inside the output (checked by `at` in debug builds); lhs and
        // rhs were checked by `matrix` for the shapes and strides given to gemm.
        unsafe {
            matmul(
                prec,
                Product {
                    m,
                    n: nc,
                    k,
                    dst: dst.at((item * rows + r0) * n + c0, span(m, nc, n, 1)),
                    dst_rs: n,
                    lhs: (lhs, input.rs, input.cs),
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
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    (h, wd): (usize, usize),
) -> Result<Tensor> {
    let t = t.contiguous()?;
    let (b, hw, k) = t.dims3()?;
    ensure!(hw == h * wd, "linear_to_map: {hw} tokens for {h}x{wd}");
    let w = super::f32_weight(w)?;
    let w = w.reshape((w.dim(0)?, ()))?;
    let (n, wk) = w.dims2()?;
    ensure!(wk == k, "linear_to_map: {k} features, weight [{n}, {wk}]");
    let prec = precision().for_output(n, b * hw);
    let _p = super::profile::scope(|| format!("linear_to_map {hw}x{k}->{n}"));
    let bias = bias.map(|t| t.contiguous()).transpose()?;
    let residual = residual.map(|t| t.contiguous()).transpose()?;
    if let Some(r) = &residual {
        ensure!(r.dims() == [b, n, h, wd], "linear_to_map: residual shape");
    }
    let tv = F32View::new(&t)?;
    let wv = F32View::new(&w)?;
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
    let (ts, ws) = (tv.slice(), wv.slice());
    // out[b] [N, HW] = w [N, K] · t[b]ᵀ [K, HW]; tasks over blocks of pixels (columns).
    for_grid(b, hw, n, |item, p0, cols, f0, nf| {
        // lhs: weight rows f0..f0+nf; rhs: the item's tokens p0..p0+cols, transposed.
        let lhs = matrix(ws, f0 * k, (nf, k), (k, 1));
        let rhs = matrix(ts, item * hw * k + p0 * k, (k, cols), (1, k));
        // SAFETY: features f0..f0+nf, pixels p0..p0+cols of item `item` (rows hw apart) are
        // this task's alone and lie inside the output (checked by `at` in debug builds); lhs
        // and rhs were checked by `matrix` for the shapes and strides given to gemm.
        unsafe {
            matmul(
                prec,
                Product {
                    m: nf,
                    n: cols,
                    k,
                    dst: dst.at(item * n * hw + f0 * hw + p0, span(nf, cols, hw, 1)),
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
            assert!(max_diff(&linear(&x, &w, Some(&bias), None).unwrap(), &want) < 1e-5);
            let want_r = (&want + &res).unwrap();
            assert!(max_diff(&linear(&x, &w, Some(&bias), Some(&res)).unwrap(), &want_r) < 1e-5);
            let want_nb = candle_nn::Linear::new(w.clone(), None).forward(&x).unwrap();
            assert!(max_diff(&linear(&x, &w, None, None).unwrap(), &want_nb) < 1e-5);
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
        let got = linear_from_map(&x, &wt, Some(&bias)).unwrap();
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
        let got = linear_to_map(&t, &wt, Some(&bias), Some(&res), (h, w)).unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        let got = linear_to_map(
            &t,
            &wt.reshape((n, c, 1, 1)).unwrap(),
            Some(&bias),
            Some(&res),
            (h, w),
        )
        .unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
    }
}
