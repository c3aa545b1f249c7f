//! 3x3 stride-1 padding-1 convolution by Winograd's minimal filtering F(2x2, 3x3).
//!
//! Each 2x2 block of outputs is computed from a 4x4 input patch with 16 multiplications per
//! (input, output) channel pair instead of 36: the input patches and the kernels are mapped
//! into a 4x4 "Winograd domain" (additions only, with coefficients 0, ±1 and ±1/2, exact in
//! binary), multiplied there as 16 independent matrix products [Cout, Cin]·[Cin, tiles], and
//! mapped back. The gemm work drops 2.25x; rounding stays at the level of the direct
//! convolution (F(2x2, 3x3) is the numerically benign member of the family).
//!
//! Tiles are processed in blocks so a block's transformed input and products stay in cache.

use super::bf16;
use super::matmul::{Precision, Product, matmul, precision};
use super::{SendPtr, for_each_task, matrix, matrix_mut, threads};
use gemm::Parallelism;

/// Tiles (2x2 output blocks) per task.
const BLOCK_TILES: usize = 192;

/// U[ξ][cout][cin] = G·g·Gᵀ for every kernel g = w[cout][cin] (3x3).
fn transform_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let n = cout * cin;
    let mut u = vec![0f32; 16 * n];
    let up = SendPtr::new(&mut u);
    for_each_task(cout, |co| {
        for ci in 0..cin {
            let g = &w[(co * cin + ci) * 9..(co * cin + ci + 1) * 9];
            // t = G·g (4x3), G = [[1,0,0],[½,½,½],[½,-½,½],[0,0,1]]
            let mut t = [[0f32; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                t[0][c] = g0;
                t[1][c] = 0.5 * (g0 + g1 + g2);
                t[2][c] = 0.5 * (g0 - g1 + g2);
                t[3][c] = g2;
            }
            // U = t·Gᵀ (4x4)
            for (r, row) in t.iter().enumerate() {
                let (a, b, c) = (row[0], row[1], row[2]);
                let vals = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (k, v) in vals.into_iter().enumerate() {
                    // SAFETY: element (ξ = r·4 + k < 16, co, ci) of U [16, cout, cin] is written
                    // by this task (co) alone; `at` checks it lies inside U (debug builds).
                    unsafe { *up.at((r * 4 + k) * n + co * cin + ci, 1) = v };
                }
            }
        }
    });
    u
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

/// Runs the Winograd convolution for `items` batch items: `x` is [items, Cin, sh, sw] (seen
/// upsampled `up` times), `w` [Cout, Cin, 3, 3]; `out` ([items, Cout, sh·up, sw·up]) must
/// already hold the bias and residual, and the convolution is added to it.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv3x3(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    items: usize,
    cin: usize,
    cout: usize,
    (sh, sw): (usize, usize),
    up: usize,
) {
    assert!(
        x.len() == items * cin * sh * sw
            && w.len() == cout * cin * 9
            && out.len() == items * cout * sh * up * sw * up,
        "winograd: buffer sizes do not match the shapes"
    );
    let u = transform_weights(w, cout, cin);
    let (oh, ow) = (sh * up, sw * up);
    let (th, tw) = (oh.div_ceil(2), ow.div_ceil(2));
    let prec = precision().for_output(cout, items * th * tw);
    // With bf16 products each U[ξ] is packed once here, not once per block.
    let u_packed: Vec<bf16::PackedA> = if prec == Precision::Bf16 {
        (0..16)
            .map_while(|xi| {
                let a = bf16::Operand {
                    ptr: u[xi * cout * cin..].as_ptr(),
                    rs: cin as isize,
                    cs: 1,
                };
                // SAFETY: U[ξ] is [cout, cin] row-major inside u.
                unsafe { bf16::pack_a(a, cout, cin) }
            })
            .collect()
    } else {
        Vec::new()
    };
    // Blocks of about BLOCK_TILES tiles: whole tile rows when they are short, else row
    // segments. Each block is transformed once; its products are split over output-channel
    // chunks when there are too few blocks to keep every thread busy (a chunk packs only its
    // rows of U, so U is packed once per block whatever the split).
    let bw = tw.min(BLOCK_TILES);
    let bh = (BLOCK_TILES / bw).clamp(1, th);
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
        let mut v = vec![0f32; 16 * cin * n];
        input_transform(&input, &mut v, block);
        let v = &v;
        let u = &u;
        let u_packed = &u_packed;
        for_each_task(chunks, |c| {
            let c0 = c * chunk;
            let mc = chunk.min(cout - c0);
            let mut m = vec![0f32; 16 * mc * n];
            for xi in 0..16 {
                // M[ξ] [mc, n] = U[ξ] rows c0..c0+mc [mc, cin] · V[ξ] [cin, n]
                let lhs = matrix(u, xi * cout * cin + c0 * cin, (mc, cin), (cin, 1));
                let rhs = matrix(v, xi * cin * n, (cin, n), (n, 1));
                let dst = matrix_mut(&mut m, xi * mc * n, (mc, n), (n, 1));
                if let Some(packed) = u_packed.get(xi) {
                    let rhs = bf16::Operand {
                        ptr: rhs,
                        rs: n as isize,
                        cs: 1,
                    };
                    // SAFETY: as below; rows c0..c0+mc (c0 a multiple of 8) lie inside the
                    // packed U[ξ].
                    unsafe { bf16::gemm_packed_a(packed, c0, (mc, n), dst, n, false, rhs, 1.0) };
                    continue;
                }
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
            output_transform(&m, dst, mc, block, (oh, ow));
        });
    });
}

/// Most tile columns in a block (bounds the row buffers).
const MAX_BLOCK_WIDTH: usize = BLOCK_TILES;

/// V[ξ][cin][tile] = Bᵀ·d·B for the 4x4 input patch d of each tile of `block`, with
/// Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]. Works a tile row at a time: the vertical
/// half of the transform runs along whole input rows, the horizontal half per tile.
fn input_transform(inp: &Input, v: &mut [f32], block: Block) {
    input_transform_rows(
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
        let (h, w) = (sh * up, sw * up);
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
                    let row = &mut row[..len];
                    let iy = 2 * ty as isize - 1 + r as isize;
                    if iy < 0 || iy >= h as isize {
                        row.fill(0.0);
                        continue;
                    }
                    let src = &plane[(iy as usize / up) * sw..(iy as usize / up + 1) * sw];
                    // Valid i: 0 <= x0 + i < w.
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
                    let [v0, v1, v2, v3] = quad_rows(v, (r * 4) * stride_xi + base, stride_xi, bw);
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

/// Four disjoint `len`-long rows of `v` starting at `start`, `start + stride`, ... .
#[inline(always)]
fn quad_rows(v: &mut [f32], start: usize, stride: usize, len: usize) -> [&mut [f32]; 4] {
    let (_, rest) = v.split_at_mut(start);
    let (a, rest) = rest.split_at_mut(stride);
    let (b, rest) = rest.split_at_mut(stride);
    let (c, rest) = rest.split_at_mut(stride);
    [
        &mut a[..len],
        &mut b[..len],
        &mut c[..len],
        &mut rest[..len],
    ]
}

/// out[cout][2x2 block of each tile] += Aᵀ·m·A, Aᵀ = [[1,1,1,0],[0,1,-1,-1]]. `out` points at
/// `cout` planes of (oh, ow); only the pixels of `block`'s tiles are touched, so tasks with
/// other blocks may write the same planes at the same time.
fn output_transform(
    m: &[f32],
    out: SendPtr<'_>,
    cout: usize,
    block: Block,
    (oh, ow): (usize, usize),
) {
    output_transform_rows(
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
                let cols = (2 * bw).min(ow - x0);
                for (r, yr) in y.iter().enumerate() {
                    let oy = 2 * ty + r;
                    if oy >= oh {
                        break;
                    }
                    // SAFETY: this row segment (oy < oh, x0 + cols <= ow) lies in plane co < cout
                    // of `out` (checked by `slice_mut` in debug builds) and belongs to this
                    // block's tiles, which no other task writes.
                    let o = unsafe { out.slice_mut(co * oh * ow + oy * ow + x0, cols) };
                    for (dst, val) in o.iter_mut().zip(&yr[..cols]) {
                        *dst += val;
                    }
                }
            }
        }
    }
}
