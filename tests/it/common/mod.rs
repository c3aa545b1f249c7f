//! Helpers shared by the parity tests (and examples/dtype_parity.rs).
#![allow(dead_code)]

#[cfg(test)]
pub mod cli;

use candle_core::{DType, Tensor};
use std::path::PathBuf;
use tkg::pipeline::LoadOptions;

/// The committed golden files.
pub fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Load options for the reference runs: f32 on the CPU, no clip skip.
pub fn cpu_f32() -> LoadOptions {
    LoadOptions::cpu_f32()
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let num: f32 = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let den: f32 = b.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
    (num / den).sqrt()
}

/// max |a - b|.
pub fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Largest difference between two 8-bit buffers.
pub fn max_u8_diff(a: &[u8], b: &[u8]) -> i32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as i32 - y as i32).abs())
        .max()
        .unwrap_or(0)
}
