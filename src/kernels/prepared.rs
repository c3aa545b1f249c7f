//! A convolution weight's forms prepared once for the kernels and kept by the layer that owns
//! the weight, so that each call does not transform and pack it again.

use super::bf16::PackedA;
use super::winograd::Variant;
use std::sync::OnceLock;

/// The bf16-packed forms of one convolution weight, made on the first call with bf16 products
/// that needs each and kept for the layer's life: the Winograd planes U[ξ] of F(2x2) and
/// F(4x4), and the [Cout, Cin·kh·kw] matrix of im2col. The weight must not change once a form
/// is made (layers load it once). With f32 products nothing is kept: the f32 planes would
/// take 16/9 or 4x the weight's memory.
#[derive(Default)]
pub struct PreparedConv {
    winograd_f2: OnceLock<Vec<PackedA>>,
    winograd_f4: OnceLock<Vec<PackedA>>,
    im2col: OnceLock<Option<PackedA>>,
}

impl PreparedConv {
    /// The packed Winograd planes of `variant`, made by `make` the first time.
    pub(super) fn winograd(
        &self,
        variant: Variant,
        make: impl FnOnce() -> Vec<PackedA>,
    ) -> &[PackedA] {
        match variant {
            Variant::F2 => self.winograd_f2.get_or_init(make),
            Variant::F4 => self.winograd_f4.get_or_init(make),
        }
    }

    /// The packed im2col matrix, made by `make` the first time (`None` where the CPU cannot
    /// run packed bf16 products).
    pub(super) fn im2col(&self, make: impl FnOnce() -> Option<PackedA>) -> Option<&PackedA> {
        self.im2col.get_or_init(make).as_ref()
    }

    /// Bytes held by the packed forms made so far.
    pub fn bytes(&self) -> usize {
        let planes = |p: &OnceLock<Vec<PackedA>>| {
            p.get()
                .map_or(0, |v| v.iter().map(PackedA::bytes).sum::<usize>())
        };
        planes(&self.winograd_f2)
            + planes(&self.winograd_f4)
            + self
                .im2col
                .get()
                .and_then(Option::as_ref)
                .map_or(0, PackedA::bytes)
    }
}

impl std::fmt::Debug for PreparedConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedConv({} bytes)", self.bytes())
    }
}
