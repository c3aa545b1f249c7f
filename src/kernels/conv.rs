//! 2D convolution, f32, NCHW, as one `gemm` per tile of output rows.
//!
//! For a tile of output rows, the im2col block [Cin·kh·kw, rows·W_out] is built straight from
//! the NCHW input (each block row is a shifted copy of an input row, so copies are contiguous),
//! and `out[Cout, tile] += W[Cout, Cin·kh·kw] · col` writes into the NCHW output in place: the
//! weight is used in its stored layout, and the output never needs a transpose. 1x1 stride-1
//! convolutions skip im2col and read the input directly.
//!
//! The output starts as `residual + bias` (either optional; the bias may differ per batch item,
//! which is how a resnet's timestep embedding is fused in), and the gemm accumulates onto it.

use super::bf16;
use super::matmul::{Precision, Product, matmul, matmul_packed_lhs, precision};
use super::prepared::{PreparedConv, packs};
use super::winograd::Variant;
use super::{
    F32View, SendPtr, for_each_chunk, for_each_task, for_each_task_with, gemm_parallelism, matrix,
    matrix_mut, span, tensor, threads,
};
use anyhow::{Result, ensure};
use candle_core::Tensor;
use gemm::Parallelism;

/// Bytes of one im2col tile; the tile's rows are chosen to stay near this.
const TILE_BYTES: usize = 2 << 20;
/// Fewest output columns per tile.
const MIN_TILE_COLS: usize = 64;

/// Which Winograd variant, if any, a convolution with a `kernel` x `kernel` kernel, `stride`,
/// `padding` and `pixels` outputs per item uses: only 3x3 stride-1 padding-1 ones qualify
/// (none when [`KernelConfig::winograd`](super::KernelConfig::winograd) is off, F(2x2) only
/// when `winograd_f4` is, for comparisons, and with bf16 products).
fn winograd_variant(
    (kh, kw): (usize, usize),
    stride: usize,
    padding: usize,
    pixels: usize,
) -> Option<Variant> {
    let cfg = super::config();
    // With bf16 products F(4x4)'s larger coefficients magnify the inputs' rounding: rel L2
    // 2.5e-2 against f32 on a 128->128 64x64 conv, where F(2x2) gives 2e-3 (conv's tests).
    let f4 = cfg.winograd_f4 && precision() != Precision::Bf16;
    if (kh, kw, stride, padding) != (3, 3, 1, 1) || pixels < WINOGRAD_MIN_PIXELS || !cfg.winograd {
        None
    } else if pixels >= WINOGRAD_F4_MIN_PIXELS && f4 {
        Some(Variant::F4)
    } else {
        Some(Variant::F2)
    }
}

/// Below this many output pixels per item, im2col + gemm wins: the weight transform, done on
/// every call, costs more than the multiplications it saves (SD1.5's shapes in
/// docs/performance.md: even with im2col at 8x8, 3x slower at 4x4).
const WINOGRAD_MIN_PIXELS: usize = 16 * 16;
/// From this many output pixels per item F(4x4, 3x3) beats F(2x2, 3x3); at 32x32 it loses
/// (its blocks hold too few tiles; docs/performance.md).
const WINOGRAD_F4_MIN_PIXELS: usize = 64 * 64;

/// Output size of a convolution along one axis.
pub fn out_size(input: usize, kernel: usize, stride: usize, padding: usize) -> usize {
    (input + 2 * padding - kernel) / stride + 1
}

/// `conv2d(x, w) + bias + residual`.
///
/// - `x`: [B, Cin, H, W]; `w`: [Cout, Cin, kh, kw] (groups = 1, dilation = 1)
/// - `bias`: [Cout] or [B, Cout]
/// - `residual`: [B, Cout, H_out, W_out], added to the result
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    conv2d_impl(x, (w, None), bias, residual, stride, padding, 1, false)
}

/// [`conv2d`] of the input upsampled `up` times (1, or 2 as [`conv2d_upsample2x`]) for a
/// layer that keeps its weight's packed forms in `prepared` (see [`PreparedConv`]).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_prepared(
    x: &Tensor,
    w: &Tensor,
    prepared: &PreparedConv,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    stride: usize,
    padding: usize,
    up: usize,
) -> Result<Tensor> {
    ensure!(up == 1 || up == 2, "conv2d: upsampling {up}x");
    conv2d_impl(
        x,
        (w, Some(prepared)),
        bias,
        residual,
        stride,
        padding,
        up,
        false,
    )
}

/// `relu(conv2d(x, w) + bias)`, stride 1: the ReLU runs on each output plane while the
/// convolution's threads still hold it, instead of as another pass over the whole tensor.
pub fn conv2d_relu(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    conv2d_impl(x, (w, None), bias, None, 1, padding, 1, true)
}

/// `conv2d(upsample_nearest_2x(x), w) + bias` (stride 1) without materialising the upsampled
/// input: the im2col reads each input pixel for its 2x2 block.
pub fn conv2d_upsample2x(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    conv2d_impl(x, (w, None), bias, None, 1, padding, 2, false)
}

#[allow(clippy::too_many_arguments)]
fn conv2d_impl(
    x: &Tensor,
    (w, prepared): (&Tensor, Option<&PreparedConv>),
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    stride: usize,
    padding: usize,
    up: usize,
    relu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (b, cin, sh, sw) = x.dims4()?;
    let _p = super::profile::scope(|| {
        let (co, _, k, _) = w.dims4().unwrap_or_default();
        let algo = match winograd_variant((k, k), stride, padding, sh * sw * up * up) {
            Some(Variant::F2) => "winograd",
            Some(Variant::F4) => "winograd4",
            None => "im2col",
        };
        format!(
            "conv{k}x{k} s{stride} {algo} {cin}->{co} {}x{}",
            sh * up,
            sw * up
        )
    });
    // The size the kernel sees (after the nearest upsampling).
    let (h, wd) = (sh * up, sw * up);
    let (cout, wcin, kh, kw) = w.dims4()?;
    ensure!(
        wcin == cin,
        "conv2d: input has {cin} channels, kernel {wcin}"
    );
    ensure!(stride > 0 && h + 2 * padding >= kh && wd + 2 * padding >= kw);
    let oh = out_size(h, kh, stride, padding);
    let ow = out_size(wd, kw, stride, padding);
    let plane = oh * ow;
    let variant = winograd_variant((kh, kw), stride, padding, oh * ow);
    let prec = match variant {
        Some(v) => precision().for_output(cout, b * v.tiles(oh, ow)),
        None => precision().for_output(cout, b * plane),
    };
    // The layer's kept forms, where this call's products use packed operands.
    let prepared = prepared.filter(|_| packs(prec));
    // A weight whose packed form this call will use is not read, so not widened either
    // (weights kept in 16 bits would be, on every call).
    let kept = prepared.is_some_and(|p| p.holds(variant));
    let w = if kept {
        None
    } else {
        Some(super::f32_weight(w)?)
    };

    let bias = bias.map(|t| t.contiguous()).transpose()?;
    let bias_per_item = match &bias {
        Some(t) if t.rank() == 2 => {
            ensure!(t.dims() == [b, cout], "conv2d: bias shape {:?}", t.dims());
            true
        }
        Some(t) => {
            ensure!(t.dims() == [cout], "conv2d: bias shape {:?}", t.dims());
            false
        }
        None => false,
    };
    let residual = residual.map(|t| t.contiguous()).transpose()?;
    if let Some(r) = &residual {
        ensure!(r.dims() == [b, cout, oh, ow], "conv2d: residual shape");
    }

    // out = residual + bias (zeros when neither is given)
    let mut out = match &residual {
        Some(r) => F32View::new(r)?.slice().to_vec(),
        None => vec![0.0; b * cout * plane],
    };
    if let Some(bias) = &bias {
        let bias_v = F32View::new(bias)?;
        let bias_s = bias_v.slice();
        let has_residual = residual.is_some();
        for_each_chunk(&mut out, plane, |i, dst| {
            let (bi, co) = (i / cout, i % cout);
            let bv = if bias_per_item {
                bias_s[bi * cout + co]
            } else {
                bias_s[co]
            };
            if has_residual {
                if bv != 0.0 {
                    dst.iter_mut().for_each(|v| *v += bv);
                }
            } else {
                dst.fill(bv);
            }
        });
    }

    let xv = F32View::new(&x)?;
    let wv = w.as_ref().map(F32View::new).transpose()?;
    let xs = xv.slice();
    // Empty where the kept packed form serves instead.
    let ws = wv.as_ref().map_or(&[][..], |v| v.slice());
    if let Some(variant) = variant {
        super::winograd::conv3x3(
            (variant, prec),
            xs,
            ws,
            prepared,
            &mut out,
            b,
            cin,
            cout,
            (sh, sw),
            up,
        );
        drop(xv);
        drop(wv);
        return finish(out, (b, cout, oh, ow), relu);
    }
    let k = cin * kh * kw;
    // With bf16 products the weight is packed once per call (or once per model, kept in
    // `prepared`), not once per task.
    // SAFETY: ws is the [cout, k] row-major weight.
    let make = || unsafe { bf16::pack_a(bf16::Operand::new(ws.as_ptr(), k, 1), cout, k) };
    let owned;
    let packed = match prepared {
        Some(p) => p.im2col(make),
        None if packs(prec) => {
            owned = make();
            owned.as_ref()
        }
        None => None,
    };
    let dst = SendPtr::new(&mut out);
    let pointwise = kh == 1 && kw == 1 && stride == 1 && padding == 0 && up == 1;
    if !pointwise && b * plane <= SMALL_PIXELS {
        conv_small(
            xs,
            (ws, packed),
            dst,
            (b, cin, sh, sw, up),
            (cout, kh, kw, stride, padding),
            (oh, ow),
        );
        drop(xv);
        drop(wv);
        return finish(out, (b, cout, oh, ow), relu);
    }

    // Tiles of whole output rows, sized to keep one im2col tile near TILE_BYTES.
    let cols_wanted = if pointwise {
        1024
    } else {
        (TILE_BYTES / 4 / k).max(MIN_TILE_COLS)
    };
    let mut rows = cols_wanted.div_ceil(ow).clamp(1, oh);
    let nthreads = threads();
    // Enough tasks to keep every thread busy.
    while rows > 1 && b * oh.div_ceil(rows) < 4 * nthreads {
        rows = rows.div_ceil(2);
    }
    let tiles = oh.div_ceil(rows);
    let tasks = b * tiles;
    let parallel_tasks = tasks >= 2 * nthreads;
    let par = if parallel_tasks {
        Parallelism::None
    } else {
        gemm_parallelism(nthreads)
    };

    let run = |task: usize, col: &mut Vec<f32>| {
        let (bi, tile) = (task / tiles, task % tiles);
        let oy0 = tile * rows;
        let oy1 = (oy0 + rows).min(oh);
        let n = (oy1 - oy0) * ow;
        let x_item = &xs[bi * cin * sh * sw..(bi + 1) * cin * sh * sw];
        let (rhs, rhs_rs): (*const f32, usize) = if pointwise {
            // x_item is [Cin, H·W]: the k x n block from output row oy0 (ow = wd here).
            let rs = h * wd;
            (matrix(x_item, oy0 * ow, (k, n), (rs, 1)), rs)
        } else {
            col.resize(k * n, 0.0);
            im2col_rows(
                x_item,
                col,
                n,
                cin,
                (h, wd, up),
                kh,
                kw,
                stride,
                padding,
                oy0,
                oy1,
                ow,
            );
            (matrix(&col[..], 0, (k, n), (n, 1)), n)
        };
        // SAFETY: the dst block [Cout, rows oy0..oy1] of item bi (rows `plane` apart in the
        // [B, Cout, plane] output) belongs to this task alone, and `at` checks (in debug
        // builds) that it lies inside the output; lhs and rhs were checked by `matrix` for the
        // same shapes and strides as given to gemm, and the packed weight is all cout rows.
        unsafe {
            let dst = dst.at(bi * cout * plane + oy0 * ow, span(cout, n, plane, 1));
            if let Some(packed) = packed {
                matmul_packed_lhs(
                    packed,
                    0,
                    (cout, n),
                    (dst, plane),
                    true,
                    (rhs, rhs_rs, 1),
                    par,
                );
                return;
            }
            let lhs = matrix(ws, 0, (cout, k), (k, 1));
            matmul(
                prec,
                Product {
                    m: cout,
                    n,
                    k,
                    dst,
                    dst_rs: plane,
                    lhs: (lhs, k, 1),
                    rhs: (rhs, rhs_rs, 1),
                },
                true,
                1.0,
                par,
            );
        }
    };
    if parallel_tasks {
        for_each_task_with(tasks, Vec::new, |col, task| run(task, col));
    } else {
        let mut col = Vec::new();
        for task in 0..tasks {
            run(task, &mut col);
        }
    }
    drop(xv);
    drop(wv);
    finish(out, (b, cout, oh, ow), relu)
}

/// The output as a tensor, through a ReLU if asked (in parallel, one plane per task).
fn finish(mut out: Vec<f32>, shape: (usize, usize, usize, usize), relu: bool) -> Result<Tensor> {
    if relu {
        for_each_chunk(&mut out, shape.2 * shape.3, |_, dst| {
            dst.iter_mut().for_each(|v| *v = v.max(0.0));
        });
    }
    tensor(out, shape)
}

/// At most this many output pixels (all batch items together) take [`conv_small`].
const SMALL_PIXELS: usize = 2048;

/// Convolution of small feature maps (the UNet's lowest levels): one im2col matrix for all
/// batch items, and the gemm split over output channels, so each task packs only its rows of
/// the (large) weight and the weight is read once. `out` already holds bias and residual.
fn conv_small(
    xs: &[f32],
    (ws, packed): (&[f32], Option<&bf16::Packed>),
    out: SendPtr<'_>,
    (b, cin, sh, sw, up): (usize, usize, usize, usize, usize),
    (cout, kh, kw, stride, padding): (usize, usize, usize, usize, usize),
    (oh, ow): (usize, usize),
) {
    let plane = oh * ow;
    let prec = precision().for_output(cout, b * plane);
    let ld = b * plane;
    let k = cin * kh * kw;
    let mut col = vec![0.0; k * ld];
    for_each_chunk(&mut col, kh * kw * ld, |ci, rows| {
        if stride == 1 {
            let mut padded = Vec::new();
            for bi in 0..b {
                let x = &xs[(bi * cin + ci) * sh * sw..(bi * cin + ci + 1) * sh * sw];
                pad_plane(x, (sh, sw, up), padding, &mut padded);
                let wp = sw * up + 2 * padding;
                for ky in 0..kh {
                    for kx in 0..kw {
                        let dst = &mut rows[(ky * kw + kx) * ld + bi * plane..][..plane];
                        copy_windows(dst, &padded[ky * wp + kx..], ow, wp);
                    }
                }
            }
            return;
        }
        for bi in 0..b {
            let x = &xs[(bi * cin + ci) * sh * sw..(bi * cin + ci + 1) * sh * sw];
            im2col_rows(
                x,
                &mut rows[bi * plane..],
                ld,
                1,
                (sh * up, sw * up, up),
                kh,
                kw,
                stride,
                padding,
                0,
                oh,
                ow,
            );
        }
    });
    let want = 3 * threads();
    let chunk = cout.div_ceil(want).next_multiple_of(16).min(cout);
    let col = &col;
    for_each_task(cout.div_ceil(chunk), |c| {
        let c0 = c * chunk;
        let m = chunk.min(cout - c0);
        let mut tmp = vec![0.0; m * ld];
        let rhs = matrix(col, 0, (k, ld), (ld, 1));
        let dst_tmp = matrix_mut(&mut tmp, 0, (m, ld), (ld, 1));
        // SAFETY: tmp is this task's own [m, ld] buffer; the weight rows c0..c0+m (c0 a
        // multiple of 16) and the im2col matrix [k, ld] lie inside ws, its packed form and col
        // (checked by `matrix` in debug builds).
        unsafe {
            if let Some(packed) = packed {
                let none = Parallelism::None;
                matmul_packed_lhs(
                    packed,
                    c0,
                    (m, ld),
                    (dst_tmp, ld),
                    false,
                    (rhs, ld, 1),
                    none,
                );
            } else {
                let lhs = matrix(ws, c0 * k, (m, k), (k, 1));
                matmul(
                    prec,
                    Product {
                        m,
                        n: ld,
                        k,
                        dst: dst_tmp,
                        dst_rs: ld,
                        lhs: (lhs, k, 1),
                        rhs: (rhs, ld, 1),
                    },
                    false,
                    1.0,
                    Parallelism::None,
                );
            }
        }
        for bi in 0..b {
            for co in 0..m {
                // SAFETY: channels c0..c0+m of every item are this task's alone, and the plane
                // of channel c0+co < cout of item bi < b lies inside the [b, cout, plane]
                // output (checked in debug builds by `slice_mut`).
                let dst = unsafe { out.slice_mut((bi * cout + c0 + co) * plane, plane) };
                let src = &tmp[co * ld + bi * plane..co * ld + (bi + 1) * plane];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += s;
                }
            }
        }
    });
}

/// `padded` = the plane `x` ([sh, sw], upsampled `up` times) with `padding` zeros around it.
fn pad_plane(
    x: &[f32],
    (sh, sw, up): (usize, usize, usize),
    padding: usize,
    padded: &mut Vec<f32>,
) {
    let (h, w) = (sh * up, sw * up);
    let wp = w + 2 * padding;
    padded.clear();
    padded.resize((h + 2 * padding) * wp, 0.0);
    for y in 0..h {
        let src = &x[(y / up) * sw..][..sw];
        let dst = &mut padded[(y + padding) * wp + padding..][..w];
        if up == 1 {
            dst.copy_from_slice(src);
        } else {
            for (xi, d) in dst.iter_mut().enumerate() {
                *d = src[xi / up];
            }
        }
    }
}

/// `dst` [rows, ow] = the windows `src[r·wp ..][..ow]`: one im2col row of a stride-1
/// convolution read from a padded plane. Small widths get fixed-size copies (a call to
/// `memcpy` per 4 or 8 values would cost more than the copy).
fn copy_windows(dst: &mut [f32], src: &[f32], ow: usize, wp: usize) {
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32], wp: usize) {
        for (r, d) in dst.chunks_exact_mut(N).enumerate() {
            let d: &mut [f32; N] = d.try_into().expect("chunk of N");
            *d = src[r * wp..][..N].try_into().expect("window of N");
        }
    }
    match ow {
        4 => fixed::<4>(dst, src, wp),
        8 => fixed::<8>(dst, src, wp),
        16 => fixed::<16>(dst, src, wp),
        _ => {
            for (r, d) in dst.chunks_exact_mut(ow).enumerate() {
                d.copy_from_slice(&src[r * wp..][..ow]);
            }
        }
    }
}

/// Fills `col` ([Cin·kh·kw, (oy1-oy0)·ow], rows `ld` apart) with the input patches of output
/// rows oy0..oy1, zero where the kernel reads padding. `h`, `w` are the input size the kernel sees:
/// `up` times the stored input's (nearest upsampling).
#[allow(clippy::too_many_arguments)]
fn im2col_rows(
    x: &[f32],
    col: &mut [f32],
    ld: usize,
    cin: usize,
    (h, w, up): (usize, usize, usize),
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    oy0: usize,
    oy1: usize,
    ow: usize,
) {
    let n = (oy1 - oy0) * ow;
    let (sh, sw) = (h / up, w / up);
    // Source column of each output column per kx, usize::MAX in the padding (then `get`
    // gives None): no division or range test in the copy loops below.
    let strided = up > 1 || stride != 1;
    let src_cols: Vec<Vec<usize>> = if strided {
        (0..kw)
            .map(|kx| {
                (0..ow)
                    .map(|ox| {
                        let ix = (ox * stride + kx) as isize - padding as isize;
                        if ix >= 0 && ix < w as isize {
                            ix as usize / up
                        } else {
                            usize::MAX
                        }
                    })
                    .collect()
            })
            .collect()
    } else {
        Vec::new()
    };
    for ci in 0..cin {
        let plane = &x[ci * sh * sw..(ci + 1) * sh * sw];
        for ky in 0..kh {
            for kx in 0..kw {
                let r = (ci * kh + ky) * kw + kx;
                let cols = src_cols.get(kx).map_or(&[][..], Vec::as_slice);
                let dst_row = &mut col[r * ld..r * ld + n];
                for oy in oy0..oy1 {
                    let dst = &mut dst_row[(oy - oy0) * ow..(oy - oy0 + 1) * ow];
                    let iy = (oy * stride + ky) as isize - padding as isize;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let sy = iy as usize / up;
                    let src = &plane[sy * sw..(sy + 1) * sw];
                    if strided {
                        for (d, &i) in dst.iter_mut().zip(cols) {
                            *d = src.get(i).copied().unwrap_or(0.0);
                        }
                    } else {
                        // ix = ox + shift; valid ox: 0 <= ox + shift < w.
                        let shift = kx as isize - padding as isize;
                        let lo = (-shift).max(0) as usize;
                        let hi = ((w as isize - shift).min(ow as isize)).max(lo as isize) as usize;
                        dst[..lo].fill(0.0);
                        dst[lo..hi].copy_from_slice(
                            &src[(lo as isize + shift) as usize..(hi as isize + shift) as usize],
                        );
                        dst[hi..].fill(0.0);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::with_precision;
    use crate::kernels::testing::{max_diff, rand};
    use candle_core::{DType, Module};

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn a_weight_kept_packed_gives_the_bits_of_one_packed_per_call() {
        // (B, C, H, W, k, stride, up): Winograd at F(2x2) sizes, conv_small, F(4x4) sizes
        // (through the 2x upsampling, and not), im2col by output rows (stride 2), and
        // pointwise. 128 channels, so every output takes bf16 products.
        let cases = [
            (2, 128, 16, 16, 3, 1, 1),
            (2, 128, 8, 8, 3, 1, 1),
            (1, 128, 32, 32, 3, 1, 2),
            (1, 128, 64, 64, 3, 1, 1),
            (1, 128, 100, 100, 3, 2, 1),
            (2, 128, 32, 32, 1, 1, 1),
        ];
        for (i, &(b, c, h, w, k, stride, up)) in cases.iter().enumerate() {
            let x = rand(&[b, c, h, w], i as u64);
            let wt = rand(&[c, c, k, k], 10 + i as u64);
            let bias = rand(&[c], 20 + i as u64);
            let pad = k / 2;
            let run = |p: Precision, wt: &Tensor, kept: Option<&PreparedConv>| {
                with_precision(p, || match kept {
                    Some(kept) => conv2d_prepared(&x, wt, kept, Some(&bias), None, stride, pad, up),
                    None if up == 2 => conv2d_upsample2x(&x, wt, Some(&bias), pad),
                    None => conv2d(&x, wt, Some(&bias), None, stride, pad),
                })
                .unwrap()
            };
            // A weight kept in 16 bits is widened per call unless its packed form serves.
            let narrow = wt.to_dtype(DType::BF16).unwrap();
            let kept_narrow = PreparedConv::default();
            let per_call = run(Precision::Bf16, &narrow, None);
            let first = run(Precision::Bf16, &narrow, Some(&kept_narrow));
            let again = run(Precision::Bf16, &narrow, Some(&kept_narrow));
            assert!(bits(&first) == bits(&per_call), "case {i}: made from bf16");
            assert!(bits(&again) == bits(&per_call), "case {i}: kept from bf16");

            let kept = PreparedConv::default();
            let per_call = run(Precision::Bf16, &wt, None);
            let first = run(Precision::Bf16, &wt, Some(&kept));
            let again = run(Precision::Bf16, &wt, Some(&kept));
            assert!(bits(&first) == bits(&per_call), "case {i}: made");
            assert!(bits(&again) == bits(&per_call), "case {i}: kept");
            let f32_out = run(Precision::F32, &wt, Some(&kept));
            let d = max_diff(&f32_out, &per_call);
            if bf16::native() {
                // The kept forms were made and used, and they are bf16 products.
                assert!(kept.bytes() > 0, "case {i}: nothing kept");
                // bf16's error, with none of F(4x4)'s 2.5 % (see winograd_variant).
                let sq = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>();
                let err = (&f32_out - &per_call).unwrap();
                let rel = (sq(&err).unwrap() / sq(&f32_out).unwrap()).sqrt();
                assert!(d > 0.0 && rel < 5e-3, "case {i}: rel L2 {rel}");
            } else {
                assert_eq!(kept.bytes(), 0, "case {i}: kept without bf16 products");
            }
        }
    }

    #[test]
    fn matches_candle() {
        // (B, Cin, H, W, Cout, k, stride, padding)
        let cases = [
            (2, 5, 9, 7, 6, 3, 1, 1),
            (1, 3, 8, 8, 4, 3, 2, 1),
            (2, 4, 9, 9, 3, 3, 2, 0),
            (2, 7, 5, 6, 5, 1, 1, 0),
            (1, 2, 3, 3, 2, 3, 1, 1),
            (3, 16, 33, 31, 8, 3, 1, 1),
            (1, 4, 33, 32, 5, 3, 1, 1),
            (3, 3, 70, 70, 4, 3, 2, 1),
            (2, 7, 40, 40, 5, 1, 1, 0),
            (2, 3, 40, 40, 4, 3, 1, 0),
        ];
        for (i, &(b, cin, h, w, cout, k, s, p)) in cases.iter().enumerate() {
            let x = rand(&[b, cin, h, w], i as u64);
            let wt = rand(&[cout, cin, k, k], 100 + i as u64);
            let bias = rand(&[cout], 200 + i as u64);
            let cfg = candle_nn::Conv2dConfig {
                padding: p,
                stride: s,
                ..Default::default()
            };
            let conv = candle_nn::Conv2d::new(wt.clone(), Some(bias.clone()), cfg);
            let want = conv.forward(&x).unwrap();
            let got = conv2d(&x, &wt, Some(&bias), None, s, p).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(max_diff(&got, &want) < 1e-5, "case {i}");

            // Per-item bias and a residual.
            let bias2 = rand(&[b, cout], 300 + i as u64);
            let res = rand(want.dims(), 400 + i as u64);
            let want2 = (conv
                .forward(&x)
                .unwrap()
                .broadcast_sub(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&bias2.unsqueeze(2).unwrap().unsqueeze(3).unwrap())
                .unwrap()
                + &res)
                .unwrap();
            let got2 = conv2d(&x, &wt, Some(&bias2), Some(&res), s, p).unwrap();
            assert!(max_diff(&got2, &want2) < 1e-5, "case {i} fused");

            if s == 1 {
                let (_, _, h, w) = x.dims4().unwrap();
                let up = x.upsample_nearest2d(2 * h, 2 * w).unwrap();
                let want3 = conv.forward(&up).unwrap();
                let got3 = conv2d_upsample2x(&x, &wt, Some(&bias), p).unwrap();
                // Case 6 upsampled (66x64) runs Winograd F(4x4), whose larger coefficients
                // round a little more (its own bound is in winograd.rs's tests).
                let d = max_diff(&got3, &want3);
                assert!(d < 3e-5, "case {i} upsampled: {d:e}");
            }
        }
    }
}
