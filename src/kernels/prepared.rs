//! A layer's weight in the forms the kernels prepare once and the layer keeps, so that each
//! call does not transform and pack it again: [`PreparedConv`] and [`PreparedLinear`].

use super::bf16::{self, Packed};
use super::winograd::Variant;
use std::sync::OnceLock;

/// The bf16-packed forms of one convolution weight, made on the first call with bf16 products
/// that needs each and kept for the layer's life: the Winograd planes U[ξ] of F(2x2) and
/// F(4x4), and the [Cout, Cin·kh·kw] matrix of im2col. The weight must not change once a form
/// is made (layers load it once). With f32 products nothing is kept: the f32 planes would
/// take 16/9 or 4x the weight's memory.
#[derive(Default)]
pub struct PreparedConv {
    winograd_f2: OnceLock<Vec<Packed>>,
    winograd_f4: OnceLock<Vec<Packed>>,
    im2col: OnceLock<Option<Packed>>,
}

impl PreparedConv {
    /// The packed Winograd planes of `variant`, made by `make` the first time.
    pub(super) fn winograd(
        &self,
        variant: Variant,
        make: impl FnOnce() -> Vec<Packed>,
    ) -> &[Packed] {
        match variant {
            Variant::F2 => self.winograd_f2.get_or_init(make),
            Variant::F4 => self.winograd_f4.get_or_init(make),
        }
    }

    /// The packed im2col matrix, made by `make` the first time (`None` where the CPU cannot
    /// run packed bf16 products).
    pub(super) fn im2col(&self, make: impl FnOnce() -> Option<Packed>) -> Option<&Packed> {
        self.im2col.get_or_init(make).as_ref()
    }

    /// Whether the form for Winograd `variant`, or for im2col (`None`), has been made.
    pub(super) fn holds(&self, variant: Option<Variant>) -> bool {
        match variant {
            Some(Variant::F2) => self.winograd_f2.get().is_some(),
            Some(Variant::F4) => self.winograd_f4.get().is_some(),
            None => self.im2col.get().is_some_and(Option::is_some),
        }
    }

    /// Bytes held by the packed forms made so far.
    pub fn bytes(&self) -> usize {
        let planes = |p: &OnceLock<Vec<Packed>>| {
            p.get()
                .map_or(0, |v| v.iter().map(Packed::bytes).sum::<usize>())
        };
        planes(&self.winograd_f2)
            + planes(&self.winograd_f4)
            + self
                .im2col
                .get()
                .and_then(Option::as_ref)
                .map_or(0, Packed::bytes)
    }
}

impl std::fmt::Debug for PreparedConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedConv({} bytes)", self.bytes())
    }
}

/// The bf16-packed forms of one linear layer's weight w [N, K], made on the first call with
/// bf16 products that needs each and kept for the layer's life: wᵀ as the right operand
/// (tokens · wᵀ) and w as the left one (w · tokensᵀ, written as a map). As for
/// [`PreparedConv`], the weight must not change once a form is made, and f32 products keep
/// nothing. A clone starts empty (it is always valid to make the forms again).
#[derive(Default)]
pub struct PreparedLinear {
    rhs: OnceLock<Option<Packed>>,
    lhs: OnceLock<Option<Packed>>,
}

impl PreparedLinear {
    /// wᵀ packed as a right operand, made by `make` the first time.
    pub(super) fn rhs(&self, make: impl FnOnce() -> Option<Packed>) -> Option<&Packed> {
        self.rhs.get_or_init(make).as_ref()
    }

    /// w packed as a left operand, made by `make` the first time.
    pub(super) fn lhs(&self, make: impl FnOnce() -> Option<Packed>) -> Option<&Packed> {
        self.lhs.get_or_init(make).as_ref()
    }

    /// Whether the right (or, with `lhs`, the left) operand form has been made.
    pub(super) fn holds(&self, lhs: bool) -> bool {
        let form = if lhs { &self.lhs } else { &self.rhs };
        form.get().is_some_and(Option::is_some)
    }

    /// Bytes held by the packed forms made so far.
    pub fn bytes(&self) -> usize {
        [&self.rhs, &self.lhs]
            .iter()
            .filter_map(|f| f.get().and_then(Option::as_ref))
            .map(Packed::bytes)
            .sum()
    }
}

impl Clone for PreparedLinear {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for PreparedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedLinear({} bytes)", self.bytes())
    }
}

/// Whether a product at `p` runs on packed bf16 operands on this CPU.
pub(super) fn packs(p: super::matmul::Precision) -> bool {
    p == super::matmul::Precision::Bf16 && bf16::native()
}
