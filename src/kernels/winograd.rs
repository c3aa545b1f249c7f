//! 3x3 stride-1 padding-1 convolution by Winograd's minimal filtering, F(2x2, 3x3) and
//! F(4x4, 3x3).
//!
//! Each m x m block of outputs (m = 2 or 4) is computed from an α x α input patch (α = m + 2)
//! with α² multiplications per (input, output) channel pair instead of 9m²: the input patches
//! and the kernels are mapped into the α x α "Winograd domain", multiplied there as α²
//! independent matrix products [Cout, Cin]·[Cin, tiles], and mapped back. F(2x2) uses 16
//! products per 4 outputs (2.25x less gemm work than the direct convolution) with coefficients
//! 0, ±1 and ±1/2, exact in binary, so its rounding stays at the direct convolution's level.
//! F(4x4) uses 36 per 16 (4x less) with the points 0, ±1, ±2: larger coefficients (up to 8 and
//! 1/24) cost some precision (measured in the tests and docs/performance.md), and its tiles
//! are four times larger, so it pays off only on larger maps.
//!
//! Tiles are processed in blocks so a block's transformed input and products stay in cache.

use super::bf16;
use super::matmul::{Precision, Product, matmul, matmul_packed_lhs};
use super::prepared::{PreparedConv, packs};
use super::{
    SendPtr, for_each_task, for_each_task_with, matrix, matrix_mut, threads, with_scratch,
};
use gemm::Parallelism;
use std::cell::Cell;

/// Which member of the family: the output tile's side m.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Variant {
    /// F(2x2, 3x3): 4x4 patches, 16 products.
    F2,
    /// F(4x4, 3x3): 6x6 patches, 36 products.
    F4,
}

impl Variant {
    /// The output tile's side.
    fn m(self) -> usize {
        match self {
            Variant::F2 => 2,
            Variant::F4 => 4,
        }
    }
    /// The input patch's side, α = m + 2.
    fn alpha(self) -> usize {
        self.m() + 2
    }
    /// Tiles covering an oh x ow output.
    pub(super) fn tiles(self, oh: usize, ow: usize) -> usize {
        oh.div_ceil(self.m()) * ow.div_ceil(self.m())
    }
    /// The number of products, α².
    fn planes(self) -> usize {
        self.alpha() * self.alpha()
    }
    /// Tiles per block: F(4x4)'s tiles carry 36 values each, so fewer of them keep a block's
    /// transformed input and products as near the cache as F(2x2)'s.
    fn block_tiles(self) -> usize {
        match self {
            Variant::F2 => BLOCK_TILES,
            Variant::F4 => BLOCK_TILES_F4,
        }
    }
}

/// Tiles (output blocks) per task, F(2x2) and F(4x4).
const BLOCK_TILES: usize = 192;
const BLOCK_TILES_F4: usize = 96;

/// U[ξ][cout][cin] = G·g·Gᵀ for every kernel g = w[cout][cin] (3x3), written into `u`
/// ([α², cout, cin]).
fn transform_weights(variant: Variant, w: &[f32], u: &mut [f32], cout: usize, cin: usize) {
    let n = cout * cin;
    let planes = variant.planes();
    debug_assert!(w.len() == 9 * n && u.len() == planes * n);
    let up = SendPtr::new(u);
    for_each_task_with(
        cout,
        || vec![0f32; 9 * cin],
        |taps, co| {
            let g = &w[co * cin * 9..(co + 1) * cin * 9];
            // SAFETY: row co of each of the α² planes of U ([α², cout, cin]) is written by this
            // task (co) alone; each lies inside U.
            let row = |xi: usize| unsafe { up.slice_mut(xi * n + co * cin, cin) };
            match variant {
                Variant::F2 => weight_rows_f2(g, taps, std::array::from_fn(row)),
                Variant::F4 => weight_rows_f4(g, taps, std::array::from_fn(row)),
            }
        },
    );
}

/// G·(a, b, c) for F(2x2, 3x3): G = [[1,0,0],[½,½,½],[½,-½,½],[0,0,1]].
#[inline(always)]
fn g_f2(a: f32, b: f32, c: f32) -> [f32; 4] {
    [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
}

/// G·(a, b, c) for F(4x4, 3x3): G = [[¼,0,0],[-⅙,-⅙,-⅙],[-⅙,⅙,-⅙],[1/24,1/12,⅙],
/// [1/24,-1/12,⅙],[0,0,1]].
#[inline(always)]
fn g_f4(a: f32, b: f32, c: f32) -> [f32; 6] {
    let (ac, b2) = (a + 4.0 * c, 2.0 * b);
    [
        0.25 * a,
        -(a + b + c) / 6.0,
        -(a - b + c) / 6.0,
        (ac + b2) / 24.0,
        (ac - b2) / 24.0,
        c,
    ]
}

/// One output channel's kernels `g` [cin, 3, 3] into its A rows of U (A = α²), with `gt`
/// applying G to one column of three taps. The taps are first regrouped tap-major (`taps`
/// [9, cin]) so the transform runs along cin in vectors.
#[inline(always)]
fn weight_rows<const ALPHA: usize, const A: usize>(
    g: &[f32],
    taps: &mut [f32],
    rows: [&mut [f32]; A],
    gt: impl Fn(f32, f32, f32) -> [f32; ALPHA],
) {
    let cin = g.len() / 9;
    for (ci, k) in g.chunks_exact(9).enumerate() {
        for (t, &v) in k.iter().enumerate() {
            taps[t * cin + ci] = v;
        }
    }
    let tap: [&[f32]; 9] = std::array::from_fn(|t| &taps[t * cin..(t + 1) * cin]);
    for i in 0..cin {
        // t = G·g (α x 3), column by column; then U = t·Gᵀ (α x α), row by row.
        let cols = [
            gt(tap[0][i], tap[3][i], tap[6][i]),
            gt(tap[1][i], tap[4][i], tap[7][i]),
            gt(tap[2][i], tap[5][i], tap[8][i]),
        ];
        for r in 0..ALPHA {
            let u = gt(cols[0][r], cols[1][r], cols[2][r]);
            for (k, v) in u.into_iter().enumerate() {
                rows[r * ALPHA + k][i] = v;
            }
        }
    }
}

super::simd::multiversion! {
    fn weight_rows_f2(g: &[f32], taps: &mut [f32], rows: [&mut [f32]; 16]) {
        weight_rows::<4, 16>(g, taps, rows, g_f2)
    }
}

super::simd::multiversion! {
    fn weight_rows_f4(g: &[f32], taps: &mut [f32], rows: [&mut [f32]; 36]) {
        weight_rows::<6, 36>(g, taps, rows, g_f4)
    }
}

/// One batch item's input: [Cin, sh, sw] as stored, seen upsampled `up` times.
struct Input<'a> {
    x: &'a [f32],
    cin: usize,
    sh: usize,
    sw: usize,
    up: usize,
}

/// A rectangle of tiles: tile rows ty0..ty1, tile columns tx0..tx1; tiles are numbered
/// row-major inside it.
#[derive(Clone, Copy)]
struct Block {
    ty0: usize,
    ty1: usize,
    tx0: usize,
    tx1: usize,
}

impl Block {
    fn width(&self) -> usize {
        self.tx1 - self.tx0
    }
    fn tiles(&self) -> usize {
        (self.ty1 - self.ty0) * self.width()
    }
}

/// Runs the Winograd convolution `variant` for `items` batch items: `x` is [items, Cin, sh,
/// sw] (seen upsampled `up` times), `w` [Cout, Cin, 3, 3]; `out` ([items, Cout, sh·up,
/// sw·up]) must already hold the bias and residual, and the convolution is added to it.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3(
    (variant, prec): (Variant, Precision),
    x: &[f32],
    w: &[f32],
    prepared: Option<&PreparedConv>,
    out: &mut [f32],
    items: usize,
    cin: usize,
    cout: usize,
    (sh, sw): (usize, usize),
    up: usize,
) {
    let (oh, ow) = (sh * up, sw * up);
    let packed = packs(prec);
    // The weight may be left out (empty) where `prepared` holds its packed planes.
    let kept = packed && prepared.is_some_and(|p| p.holds(Some(variant)));
    assert!(
        x.len() == items * cin * sh * sw
            && (w.len() == cout * cin * 9 || kept && w.is_empty())
            && out.len() == items * cout * oh * ow,
        "winograd: buffer sizes do not match the shapes"
    );
    if out.is_empty() || cin == 0 {
        return;
    }
    let planes = variant.planes();
    let mut run =
        |u: Planes| conv3x3_transformed(variant, x, u, out, items, cin, cout, (sh, sw), up);
    if packed {
        // Each U[ξ] packed once per call (or once per model, kept in `prepared`), not once
        // per block.
        let make = || {
            with_scratch(&WEIGHTS, planes * cout * cin, |u| {
                transform_weights(variant, w, u, cout, cin);
                pack_planes(u, planes, cout, cin)
            })
        };
        match prepared {
            Some(p) => run(Planes::Packed(p.winograd(variant, make))),
            None => run(Planes::Packed(&make())),
        }
        return;
    }
    with_scratch(&WEIGHTS, planes * cout * cin, |u| {
        transform_weights(variant, w, u, cout, cin);
        run(Planes::F32(u, prec));
    });
}

/// The transformed weights as the products read them.
#[derive(Clone, Copy)]
enum Planes<'a> {
    /// U [α², Cout, Cin], multiplied at the precision given.
    F32(&'a [f32], Precision),
    /// Each U[ξ] packed for bf16 products.
    Packed(&'a [bf16::Packed]),
}

/// Packs each plane U[ξ] ([cout, cin] row-major in `u`) for bf16 products.
fn pack_planes(u: &[f32], planes: usize, cout: usize, cin: usize) -> Vec<bf16::Packed> {
    (0..planes)
        .map_while(|xi| {
            let a = bf16::Operand::new(u[xi * cout * cin..].as_ptr(), cin, 1);
            // SAFETY: U[ξ] is [cout, cin] row-major inside u.
            unsafe { bf16::pack_a(a, cout, cin) }
        })
        .collect()
}

thread_local! {
    /// The transformed weights U (α² · Cout · Cin), the inputs' transform V and the products
    /// M of each block: kept from call to call (see [`with_scratch`]).
    static WEIGHTS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static INPUTS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static PRODUCTS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Frees this thread's buffers (see [`super::release_scratch`]).
pub(super) fn release_scratch() {
    for slot in [&WEIGHTS, &INPUTS, &PRODUCTS] {
        drop(slot.take());
    }
}

/// [`conv3x3`] on weights already transformed into `u`.
#[allow(clippy::too_many_arguments)]
fn conv3x3_transformed(
    variant: Variant,
    x: &[f32],
    u: Planes,
    out: &mut [f32],
    items: usize,
    cin: usize,
    cout: usize,
    (sh, sw): (usize, usize),
    up: usize,
) {
    let (oh, ow) = (sh * up, sw * up);
    let (tm, planes) = (variant.m(), variant.planes());
    let (th, tw) = (oh.div_ceil(tm), ow.div_ceil(tm));
    // Blocks of about BLOCK_TILES tiles: whole tile rows when they are short, else row
    // segments. Each block is transformed once; its products are split over output-channel
    // chunks when there are too few blocks to keep every thread busy (a chunk packs only its
    // rows of U, so U is packed once per block whatever the split).
    let block_tiles = variant.block_tiles();
    let bw = tw.min(block_tiles);
    let bh = (block_tiles / bw).clamp(1, th);
    let (nby, nbx) = (th.div_ceil(bh), tw.div_ceil(bw));
    let blocks = items * nby * nbx;
    let want = 3 * threads();
    let chunks = want.div_ceil(blocks).min(cout.div_ceil(16));
    let chunk = cout.div_ceil(chunks).next_multiple_of(8).min(cout);
    let chunks = cout.div_ceil(chunk);
    let out_ptr = SendPtr::new(out);
    let item_in = cin * sh * sw;
    let item_out = cout * oh * ow;
    for_each_task(blocks, |task| {
        let (item, blk) = (task / (nby * nbx), task % (nby * nbx));
        let (by, bx) = (blk / nbx, blk % nbx);
        let block = Block {
            ty0: by * bh,
            ty1: ((by + 1) * bh).min(th),
            tx0: bx * bw,
            tx1: ((bx + 1) * bw).min(tw),
        };
        let n = block.tiles();
        let input = Input {
            x: &x[item * item_in..(item + 1) * item_in],
            cin,
            sh,
            sw,
            up,
        };
        with_scratch(&INPUTS, planes * cin * n, |v| {
            input_transform(variant, &input, v, block);
            let v = &*v;
            for_each_task(chunks, |c| {
                let c0 = c * chunk;
                let mc = chunk.min(cout - c0);
                with_scratch(&PRODUCTS, planes * mc * n, |m| {
                    for xi in 0..planes {
                        // M[ξ] [mc, n] = U[ξ] rows c0..c0+mc [mc, cin] · V[ξ] [cin, n]
                        let rhs = matrix(v, xi * cin * n, (cin, n), (n, 1));
                        let dst = matrix_mut(m, xi * mc * n, (mc, n), (n, 1));
                        let (u, prec) = match u {
                            Planes::F32(u, prec) => (u, prec),
                            Planes::Packed(packed) => {
                                // SAFETY: as below; rows c0..c0+mc (c0 a multiple of 8) lie
                                // inside the packed U[ξ].
                                unsafe {
                                    matmul_packed_lhs(
                                        &packed[xi],
                                        c0,
                                        (mc, n),
                                        (dst, n),
                                        false,
                                        (rhs, n, 1),
                                        Parallelism::None,
                                    )
                                };
                                continue;
                            }
                        };
                        let lhs = matrix(u, xi * cout * cin + c0 * cin, (mc, cin), (cin, 1));
                        // SAFETY: m is this task's own buffer; m, u and v were checked by `matrix`
                        // (in debug builds) for the shapes and strides given to gemm.
                        unsafe {
                            matmul(
                                prec,
                                Product {
                                    m: mc,
                                    n,
                                    k: cin,
                                    dst,
                                    dst_rs: n,
                                    lhs: (lhs, cin, 1),
                                    rhs: (rhs, n, 1),
                                },
                                false,
                                1.0,
                                Parallelism::None,
                            );
                        }
                    }
                    // Channels c0..c0+mc of this item; of them, this task writes only the pixels of
                    // its block's tiles.
                    let dst = out_ptr.sub(item * item_out + c0 * oh * ow, mc * oh * ow);
                    output_transform(variant, m, dst, mc, block, (oh, ow));
                });
            });
        });
    });
}

/// Most tile columns in a block (bounds the row buffers).
const MAX_BLOCK_WIDTH: usize = BLOCK_TILES;

/// V[ξ][cin][tile] = Bᵀ·d·B for the 4x4 input patch d of each tile of `block`, with
/// Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]. Works a tile row at a time: the vertical
/// half of the transform runs along whole input rows, the horizontal half per tile.
fn input_transform(variant: Variant, inp: &Input, v: &mut [f32], block: Block) {
    let f = match variant {
        Variant::F2 => input_transform_rows,
        Variant::F4 => input_transform_rows_f4,
    };
    f(
        inp.x, inp.cin, inp.sh, inp.sw, inp.up, v, block.ty0, block.ty1, block.tx0, block.tx1,
    );
}

super::simd::multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn input_transform_rows(
        x: &[f32],
        cin: usize,
        sh: usize,
        sw: usize,
        up: usize,
        v: &mut [f32],
        ty0: usize,
        ty1: usize,
        tx0: usize,
        tx1: usize,
    ) {
        let bw = tx1 - tx0;
        let n = (ty1 - ty0) * bw;
        let stride_xi = cin * n;
        // Input columns 2·tx0 - 1 .. 2·tx1 + 1 (2·bw + 2 of them), zero outside the image.
        let len = 2 * bw + 2;
        let x0 = 2 * tx0 as isize - 1;
        let mut d = [[0f32; 2 * MAX_BLOCK_WIDTH + 2]; 4];
        let mut e = [[0f32; 2 * MAX_BLOCK_WIDTH + 2]; 4];
        for ci in 0..cin {
            let plane = &x[ci * sh * sw..(ci + 1) * sh * sw];
            for ty in ty0..ty1 {
                for (r, row) in d.iter_mut().enumerate() {
                    let iy = 2 * ty as isize - 1 + r as isize;
                    padded_row(plane, (sh, sw), up, iy, x0, &mut row[..len]);
                }
                // Bᵀ·d along whole rows.
                for i in 0..len {
                    let (d0, d1, d2, d3) = (d[0][i], d[1][i], d[2][i], d[3][i]);
                    e[0][i] = d0 - d2;
                    e[1][i] = d1 + d2;
                    e[2][i] = d2 - d1;
                    e[3][i] = d1 - d3;
                }
                // ·B per tile (columns 2q .. 2q+3 of the row buffers).
                let jrow = (ty - ty0) * bw;
                for (r, er) in e.iter().enumerate() {
                    let base = ci * n + jrow;
                    let [v0, v1, v2, v3] = strided_rows(v, (r * 4) * stride_xi + base, stride_xi, bw);
                    for q in 0..bw {
                        let (a, b, c, dd) = (er[2 * q], er[2 * q + 1], er[2 * q + 2], er[2 * q + 3]);
                        v0[q] = a - c;
                        v1[q] = b + c;
                        v2[q] = c - b;
                        v3[q] = b - dd;
                    }
                }
            }
        }
    }
}

/// Row `iy` of an input `plane` ([sh, sw] as stored, seen upsampled `up` times), columns
/// x0 .. x0 + row.len() of the upsampled image, into `row`; zero outside the image.
#[inline(always)]
fn padded_row(
    plane: &[f32],
    (sh, sw): (usize, usize),
    up: usize,
    iy: isize,
    x0: isize,
    row: &mut [f32],
) {
    let (h, w) = (sh * up, sw * up);
    if iy < 0 || iy >= h as isize {
        row.fill(0.0);
        return;
    }
    let src = &plane[(iy as usize / up) * sw..(iy as usize / up + 1) * sw];
    // Valid i: 0 <= x0 + i < w.
    let len = row.len();
    let lo = (-x0).max(0) as usize;
    let hi = ((w as isize - x0).min(len as isize)).max(lo as isize) as usize;
    row[..lo].fill(0.0);
    row[hi..].fill(0.0);
    if up == 1 {
        let s0 = (x0 + lo as isize) as usize;
        row[lo..hi].copy_from_slice(&src[s0..s0 + hi - lo]);
    } else {
        for (i, val) in row[lo..hi].iter_mut().enumerate() {
            *val = src[(x0 + (lo + i) as isize) as usize / up];
        }
    }
}

/// out[plane co] += the rows `y` of one tile row's outputs: output rows oy0.. (those below
/// oh), columns x0 .. x0 + cols. `out` holds (oh, ow) planes; only this block's pixels are
/// touched, so tasks with other blocks may write the same planes at the same time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn add_tile_rows<const W: usize>(
    out: SendPtr<'_>,
    y: &[[f32; W]],
    co: usize,
    oy0: usize,
    x0: usize,
    cols: usize,
    (oh, ow): (usize, usize),
) {
    for (r, yr) in y.iter().enumerate() {
        let oy = oy0 + r;
        if oy >= oh {
            break;
        }
        // SAFETY: this row segment (oy < oh, x0 + cols <= ow) lies in plane co of `out`
        // (checked by `slice_mut` in debug builds) and belongs to this block's tiles, which no
        // other task writes.
        let o = unsafe { out.slice_mut(co * oh * ow + oy * ow + x0, cols) };
        for (dst, val) in o.iter_mut().zip(&yr[..cols]) {
            *dst += val;
        }
    }
}

/// N disjoint `len`-long rows of `v` starting at `start`, `start + stride`, ... .
#[inline(always)]
fn strided_rows<const N: usize>(
    v: &mut [f32],
    start: usize,
    stride: usize,
    len: usize,
) -> [&mut [f32]; N] {
    let mut rest = &mut v[start..];
    std::array::from_fn(|i| {
        let tail = std::mem::take(&mut rest);
        let (row, tail) = if i + 1 < N {
            tail.split_at_mut(stride)
        } else {
            (tail, &mut [][..])
        };
        rest = tail;
        &mut row[..len]
    })
}

/// out[cout][2x2 block of each tile] += Aᵀ·m·A, Aᵀ = [[1,1,1,0],[0,1,-1,-1]]. `out` points at
/// `cout` planes of (oh, ow); only the pixels of `block`'s tiles are touched, so tasks with
/// other blocks may write the same planes at the same time.
fn output_transform(
    variant: Variant,
    m: &[f32],
    out: SendPtr<'_>,
    cout: usize,
    block: Block,
    (oh, ow): (usize, usize),
) {
    let f = match variant {
        Variant::F2 => output_transform_rows,
        Variant::F4 => output_transform_rows_f4,
    };
    f(
        m, out, cout, block.ty0, block.ty1, block.tx0, block.tx1, oh, ow,
    );
}

super::simd::multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn output_transform_rows(
        m: &[f32],
        out: SendPtr<'_>,
        cout: usize,
        ty0: usize,
        ty1: usize,
        tx0: usize,
        tx1: usize,
        oh: usize,
        ow: usize,
    ) {
        let bw = tx1 - tx0;
        let n = (ty1 - ty0) * bw;
        let stride_xi = cout * n;
        let mut y = [[0f32; 2 * MAX_BLOCK_WIDTH]; 2];
        for co in 0..cout {
            for ty in ty0..ty1 {
                let base = co * n + (ty - ty0) * bw;
                let g = |xi: usize| &m[xi * stride_xi + base..xi * stride_xi + base + bw];
                let (m0, m1, m2, m3) = (g(0), g(1), g(2), g(3));
                let (m4, m5, m6, m7) = (g(4), g(5), g(6), g(7));
                let (m8, m9, m10, m11) = (g(8), g(9), g(10), g(11));
                let (m12, m13, m14, m15) = (g(12), g(13), g(14), g(15));
                for q in 0..bw {
                    // s = Aᵀ·m (rows), then ·A (columns).
                    let s00 = m0[q] + m4[q] + m8[q];
                    let s01 = m1[q] + m5[q] + m9[q];
                    let s02 = m2[q] + m6[q] + m10[q];
                    let s03 = m3[q] + m7[q] + m11[q];
                    let s10 = m4[q] - m8[q] - m12[q];
                    let s11 = m5[q] - m9[q] - m13[q];
                    let s12 = m6[q] - m10[q] - m14[q];
                    let s13 = m7[q] - m11[q] - m15[q];
                    y[0][2 * q] = s00 + s01 + s02;
                    y[0][2 * q + 1] = s01 - s02 - s03;
                    y[1][2 * q] = s10 + s11 + s12;
                    y[1][2 * q + 1] = s11 - s12 - s13;
                }
                let x0 = 2 * tx0;
                add_tile_rows(out, &y, co, 2 * ty, x0, (2 * bw).min(ow - x0), (oh, ow));
            }
        }
    }
}

super::simd::multiversion! {
    /// [`input_transform_rows`] for F(4x4, 3x3): 6x6 patches every 4 pixels, with
    /// Bᵀ = [[4,0,-5,0,1,0],[0,-4,-4,1,1,0],[0,4,-4,-1,1,0],[0,-2,-1,2,1,0],[0,2,-1,-2,1,0],
    /// [0,4,0,-5,0,1]].
    #[allow(clippy::too_many_arguments)]
    fn input_transform_rows_f4(
        x: &[f32],
        cin: usize,
        sh: usize,
        sw: usize,
        up: usize,
        v: &mut [f32],
        ty0: usize,
        ty1: usize,
        tx0: usize,
        tx1: usize,
    ) {
        let bw = tx1 - tx0;
        let n = (ty1 - ty0) * bw;
        let stride_xi = cin * n;
        // Input columns 4·tx0 - 1 .. 4·tx1 + 1 (4·bw + 2 of them), zero outside the image.
        let len = 4 * bw + 2;
        let x0 = 4 * tx0 as isize - 1;
        let mut d = [[0f32; 4 * MAX_BLOCK_WIDTH + 2]; 6];
        let mut e = [[0f32; 4 * MAX_BLOCK_WIDTH + 2]; 6];
        for ci in 0..cin {
            let plane = &x[ci * sh * sw..(ci + 1) * sh * sw];
            for ty in ty0..ty1 {
                for (r, row) in d.iter_mut().enumerate() {
                    let iy = 4 * ty as isize - 1 + r as isize;
                    padded_row(plane, (sh, sw), up, iy, x0, &mut row[..len]);
                }
                // Bᵀ·d along whole rows.
                for i in 0..len {
                    let t = bt_f4([d[0][i], d[1][i], d[2][i], d[3][i], d[4][i], d[5][i]]);
                    (e[0][i], e[1][i], e[2][i]) = (t[0], t[1], t[2]);
                    (e[3][i], e[4][i], e[5][i]) = (t[3], t[4], t[5]);
                }
                // ·B per tile (columns 4q .. 4q+5 of the row buffers).
                let jrow = (ty - ty0) * bw;
                for (r, er) in e.iter().enumerate() {
                    let base = ci * n + jrow;
                    let [v0, v1, v2, v3, v4, v5] =
                        strided_rows(v, (r * 6) * stride_xi + base, stride_xi, bw);
                    for q in 0..bw {
                        let t = bt_f4([
                            er[4 * q],
                            er[4 * q + 1],
                            er[4 * q + 2],
                            er[4 * q + 3],
                            er[4 * q + 4],
                            er[4 * q + 5],
                        ]);
                        (v0[q], v1[q], v2[q]) = (t[0], t[1], t[2]);
                        (v3[q], v4[q], v5[q]) = (t[3], t[4], t[5]);
                    }
                }
            }
        }
    }
}

/// Bᵀ·d for F(4x4, 3x3) (see [`input_transform_rows_f4`]).
#[inline(always)]
fn bt_f4([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
    let (p, q) = (d4 - 4.0 * d2, d3 - 4.0 * d1);
    let (r, s) = (d4 - d2, 2.0 * (d3 - d1));
    [
        4.0 * d0 - 5.0 * d2 + d4,
        p + q,
        p - q,
        r + s,
        r - s,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// Aᵀ·v for F(4x4, 3x3): Aᵀ = [[1,1,1,1,1,0],[0,1,-1,2,-2,0],[0,1,1,4,4,0],[0,1,-1,8,-8,1]].
#[inline(always)]
fn at_f4([v0, v1, v2, v3, v4, v5]: [f32; 6]) -> [f32; 4] {
    let (a, b) = (v1 + v2, v1 - v2);
    let (c, d) = (v3 + v4, v3 - v4);
    [v0 + a + c, b + 2.0 * d, a + 4.0 * c, b + 8.0 * d + v5]
}

super::simd::multiversion! {
    /// [`output_transform_rows`] for F(4x4, 3x3): out += Aᵀ·m·A per 4x4 output block.
    #[allow(clippy::too_many_arguments)]
    fn output_transform_rows_f4(
        m: &[f32],
        out: SendPtr<'_>,
        cout: usize,
        ty0: usize,
        ty1: usize,
        tx0: usize,
        tx1: usize,
        oh: usize,
        ow: usize,
    ) {
        let bw = tx1 - tx0;
        let n = (ty1 - ty0) * bw;
        let stride_xi = cout * n;
        let mut y = [[0f32; 4 * MAX_BLOCK_WIDTH]; 4];
        for co in 0..cout {
            for ty in ty0..ty1 {
                let base = co * n + (ty - ty0) * bw;
                let mm: [&[f32]; 36] = std::array::from_fn(|xi| {
                    &m[xi * stride_xi + base..xi * stride_xi + base + bw]
                });
                for q in 0..bw {
                    // s = Aᵀ·m (4x6, column by column), then s·A (4x4, row by row).
                    let mut s = [[0f32; 6]; 4];
                    for c in 0..6 {
                        let col = at_f4(std::array::from_fn(|r| mm[r * 6 + c][q]));
                        for (r, v) in col.into_iter().enumerate() {
                            s[r][c] = v;
                        }
                    }
                    for (yr, sr) in y.iter_mut().zip(s) {
                        yr[4 * q..4 * q + 4].copy_from_slice(&at_f4(sr));
                    }
                }
                let x0 = 4 * tx0;
                add_tile_rows(out, &y, co, 4 * ty, x0, (4 * bw).min(ow - x0), (oh, ow));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-0.5, 0.5).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The direct convolution in f64: x [items, cin, sh, sw] seen upsampled `up` times.
    fn direct(
        x: &[f32],
        w: &[f32],
        items: usize,
        cin: usize,
        cout: usize,
        (sh, sw): (usize, usize),
        up: usize,
    ) -> Vec<f64> {
        let (h, wd) = (sh * up, sw * up);
        let mut out = vec![0f64; items * cout * h * wd];
        for b in 0..items {
            for co in 0..cout {
                for oy in 0..h {
                    for ox in 0..wd {
                        let mut acc = 0f64;
                        for ci in 0..cin {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    if iy == 0 || ix == 0 || iy > h || ix > wd {
                                        continue;
                                    }
                                    let (iy, ix) = ((iy - 1) / up, (ix - 1) / up);
                                    let xv = x[((b * cin + ci) * sh + iy) * sw + ix];
                                    let wv = w[((co * cin + ci) * 3 + ky) * 3 + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((b * cout + co) * h + oy) * wd + ox] = acc;
                    }
                }
            }
        }
        out
    }

    /// Both variants against the f64 direct convolution, on maps whose sides are not
    /// multiples of the tile, upsampled inputs, several blocks per item, and channel counts
    /// that leave partial output-channel chunks. The error bound is relative to the sum of
    /// |x·w| a tap window can reach (about the output's scale); F(4x4)'s larger coefficients
    /// are allowed 8x F(2x2)'s error.
    #[test]
    fn both_variants_match_the_direct_convolution() {
        // (items, cin, cout, sh, sw, up)
        let cases = [
            (1, 3, 5, 7, 9, 1),
            (2, 8, 12, 17, 23, 1),
            (1, 5, 3, 9, 6, 2),
            (2, 16, 24, 40, 37, 1),
            (1, 4, 40, 70, 3, 1),
            (1, 33, 17, 13, 11, 2),
        ];
        for (i, &(items, cin, cout, sh, sw, up)) in cases.iter().enumerate() {
            let x = values(items * cin * sh * sw, 1 + i as u64);
            let w = values(cout * cin * 9, 100 + i as u64);
            let want = direct(&x, &w, items, cin, cout, (sh, sw), up);
            // Worst case |sum| over a window: 9·cin terms of at most 0.25.
            let scale = 9.0 * cin as f64 * 0.25;
            for (variant, tol) in [(Variant::F2, 1e-6), (Variant::F4, 8e-6)] {
                // The output starts as "bias + residual", here 1.0, and the convolution is added.
                let mut out = vec![1f32; want.len()];
                conv3x3(
                    (variant, Precision::F32),
                    &x,
                    &w,
                    None,
                    &mut out,
                    items,
                    cin,
                    cout,
                    (sh, sw),
                    up,
                );
                let err = out
                    .iter()
                    .zip(&want)
                    .map(|(&o, &r)| (o as f64 - 1.0 - r).abs())
                    .fold(0f64, f64::max);
                assert!(
                    err <= tol * scale,
                    "case {i} {variant:?}: max error {err:e} (scale {scale})"
                );
            }
        }
    }

    /// A call leaves its weight transform on the calling thread; release frees it.
    #[test]
    fn release_frees_the_kept_weight_transform() {
        std::thread::spawn(|| {
            let (cin, cout) = (6, 10);
            let x = values(cin * 20 * 20, 3);
            let w = values(cout * cin * 9, 4);
            let mut out = vec![0f32; cout * 20 * 20];
            conv3x3(
                (Variant::F2, Precision::F32),
                &x,
                &w,
                None,
                &mut out,
                1,
                cin,
                cout,
                (20, 20),
                1,
            );
            let kept = |slot: &'static super::super::Scratch| {
                let buf = slot.take();
                let len = buf.len();
                slot.set(buf);
                len
            };
            assert_eq!(kept(&WEIGHTS), 16 * cout * cin);
            super::super::release_scratch();
            assert_eq!(kept(&WEIGHTS), 0);
        })
        .join()
        .unwrap();
    }

    /// The scratch buffers are reused from call to call (and hold the last call's values):
    /// a second call on other shapes, after a larger one, gives the bits of a first call.
    #[test]
    fn reused_scratch_gives_the_same_bits() {
        let run = |variant, items, cin, cout, (sh, sw)| {
            let x = values(items * cin * sh * sw, 7);
            let w = values(cout * cin * 9, 8);
            let mut out = vec![0f32; items * cout * sh * sw];
            conv3x3(
                (variant, Precision::F32),
                &x,
                &w,
                None,
                &mut out,
                items,
                cin,
                cout,
                (sh, sw),
                1,
            );
            out
        };
        for variant in [Variant::F2, Variant::F4] {
            let first = std::thread::spawn(move || run(variant, 1, 6, 10, (19, 21)))
                .join()
                .unwrap();
            let after_larger = std::thread::spawn(move || {
                run(variant, 2, 24, 32, (40, 40));
                run(variant, 1, 6, 10, (19, 21))
            })
            .join()
            .unwrap();
            assert_eq!(first, after_larger, "{variant:?}");
        }
    }
}
