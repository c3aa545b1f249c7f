//! The one matrix product the kernels call: the f32 `gemm` crate, or bf16 inputs with f32
//! accumulation ([`super::bf16`]) when a caller runs the model inside [`with_precision`].

use super::bf16::{self, Operand};
use std::cell::Cell;

/// The precision of the inputs to the kernels' matrix products; sums are f32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 inputs (the default).
    #[default]
    F32,
    /// Inputs rounded to bf16 as they are packed, for AVX-512 BF16's dot products (see
    /// [`bf16_native`]): about twice the multiply rate, with bf16's 8-bit mantissa.
    Bf16,
}

/// Whether this CPU runs [`Precision::Bf16`] products natively (AVX-512 BF16). Elsewhere they
/// run on a slow emulation meant for tests.
pub use super::bf16::native as bf16_native;

thread_local! {
    static PRECISION: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `f` with the kernels called from this thread using `p` for their matrix products.
/// Kernels read it on the calling thread when they start, so their tasks on other threads
/// follow it; a model's forward pass run inside `f` is covered whole.
pub fn with_precision<R>(p: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRECISION.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(PRECISION.with(|c| c.replace(p)));
    f()
}

/// The precision set by the innermost [`with_precision`] on this thread.
pub(crate) fn precision() -> Precision {
    PRECISION.with(|c| c.get())
}

/// A matrix product's inputs: `lhs` [m, k] and `rhs` [k, n] as (pointer, row stride, column
/// stride), and `dst` [m, n] with column stride 1.
pub(crate) struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dst: *mut f32,
    pub dst_rs: usize,
    pub lhs: (*const f32, usize, usize),
    pub rhs: (*const f32, usize, usize),
}

/// The fewest rows and columns of an output that [`Precision::Bf16`] products are used for.
pub(crate) const BF16_MIN_SIDE: usize = 128;

impl Precision {
    /// The precision for a kernel's products whose whole output (all its tasks together) is
    /// `rows` x `cols`: f32 below [`BF16_MIN_SIDE`] on either side, where each packed bf16
    /// value serves too few multiplications to pay for its rounding and packing (measured: a
    /// 3x3 conv 1280->1280 on 4x4 pixels, 32 columns, ran 2x slower in bf16, cross-attention
    /// scores over 77 keys 1.7x slower). Decided on the whole output, not per task, so that
    /// the thread count cannot change it.
    pub(crate) fn for_output(self, rows: usize, cols: usize) -> Precision {
        if rows.min(cols) < BF16_MIN_SIDE {
            Precision::F32
        } else {
            self
        }
    }
}

/// `dst = [dst +] scale · lhs · rhs` at precision `p`, single-threaded or over the pool as
/// `par` says. f32 runs the `gemm` crate exactly as before this wrapper existed.
///
/// # Safety
/// As for `gemm::gemm`: the operands readable for their shapes and strides, `dst` writable
/// (and readable when `accumulate`) for [m, n], not overlapping them and not touched by
/// anyone else during the call.
pub(crate) unsafe fn matmul(
    p: Precision,
    g: Product,
    accumulate: bool,
    scale: f32,
    par: gemm::Parallelism,
) {
    let Product {
        m,
        n,
        k,
        dst,
        dst_rs,
        lhs,
        rhs,
    } = g;
    match p {
        // SAFETY: the caller's promise, in the gemm crate's argument order.
        Precision::F32 => unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                dst_rs as isize,
                accumulate,
                lhs.0,
                lhs.2 as isize,
                lhs.1 as isize,
                rhs.0,
                rhs.2 as isize,
                rhs.1 as isize,
                1.0,
                scale,
                false,
                false,
                false,
                par,
            )
        },
        Precision::Bf16 => {
            let (a, b) = (operand(lhs), operand(rhs));
            match par {
                // SAFETY: the caller's promise.
                gemm::Parallelism::None => unsafe {
                    bf16::gemm((m, n, k), dst, dst_rs, accumulate, a, b, scale)
                },
                _ => {
                    // SAFETY: rows r0..r0+rows of dst are each task's alone, inside the
                    // caller's [m, n]; a's rows likewise.
                    for_row_blocks(m, dst, dst_rs, |r0, rows, dst| unsafe {
                        // Whole operands, not their (non-Send) pointer fields.
                        let (a, b) = (a, b);
                        let a = Operand {
                            ptr: a.ptr.wrapping_offset(r0 as isize * a.rs),
                            ..a
                        };
                        bf16::gemm((rows, n, k), dst, dst_rs, accumulate, a, b, scale)
                    });
                }
            }
        }
    }
}

/// `dst [m, n] = [dst +] lhs · rhs` with bf16 products, where rhs is columns col0..col0+n
/// (col0 a multiple of `bf16::NR`) of a matrix packed once by `bf16::pack_b`; single-threaded.
/// The same sums as [`matmul`] at [`Precision::Bf16`] on the unpacked columns.
///
/// # Safety
/// As for [`matmul`], with columns col0..col0+n inside the packed matrix.
pub(crate) unsafe fn matmul_packed_rhs(
    rhs: &bf16::Packed,
    col0: usize,
    (m, n): (usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    lhs: (*const f32, usize, usize),
) {
    // SAFETY: the caller's promise.
    unsafe {
        bf16::gemm_packed_b(
            rhs,
            col0,
            (m, n),
            dst,
            dst_rs,
            accumulate,
            operand(lhs),
            1.0,
        )
    }
}

/// A (pointer, row stride, column stride) operand as the bf16 kernel takes it.
fn operand((ptr, rs, cs): (*const f32, usize, usize)) -> Operand {
    Operand::new(ptr, rs, cs)
}

/// `f(r0, rows, dst + r0·dst_rs)` for fixed blocks of `m` rows over the pool: fixed so that
/// the split, like the sums, does not depend on the thread count.
fn for_row_blocks(
    m: usize,
    dst: *mut f32,
    dst_rs: usize,
    f: impl Fn(usize, usize, *mut f32) + Sync + Send,
) {
    const ROWS: usize = 96;
    struct Dst(*mut f32);
    // SAFETY: each task writes its own rows of dst (the callers' promise).
    unsafe impl Sync for Dst {}
    let d = Dst(dst);
    let d = &d;
    super::for_each_task(m.div_ceil(ROWS), move |t| {
        let r0 = t * ROWS;
        f(r0, ROWS.min(m - r0), d.0.wrapping_add(r0 * dst_rs))
    });
}

/// `dst [m, n] = [dst +] lhs · rhs` with bf16 products, where lhs is rows row0..row0+m (row0
/// a multiple of 8) of a matrix packed once by `bf16::pack_a`; single-threaded or over the
/// pool as `par` says. The same sums as [`matmul`] at [`Precision::Bf16`] on the unpacked rows.
///
/// # Safety
/// As for [`matmul`], with rows row0..row0+m inside the packed matrix.
pub(crate) unsafe fn matmul_packed_lhs(
    lhs: &bf16::Packed,
    row0: usize,
    (m, n): (usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    accumulate: bool,
    rhs: (*const f32, usize, usize),
    par: gemm::Parallelism,
) {
    let b = operand(rhs);
    match par {
        // SAFETY: the caller's promise.
        gemm::Parallelism::None => unsafe {
            bf16::gemm_packed_a(lhs, row0, (m, n), dst, dst_rs, accumulate, b, 1.0)
        },
        // SAFETY: rows r0..r0+rows of dst are each task's alone (96 is a multiple of 8).
        _ => for_row_blocks(m, dst, dst_rs, |r0, rows, dst| unsafe {
            bf16::gemm_packed_a(lhs, row0 + r0, (rows, n), dst, dst_rs, accumulate, b, 1.0)
        }),
    }
}
