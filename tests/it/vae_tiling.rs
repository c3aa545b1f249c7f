//! VAE tiling against diffusers' own `AutoencoderKL.enable_tiling()` (tests/golden/vae_tiling,
//! made by its make_golden.py): the tiny VAE of sd15/a with sample_size 16, so a 48x64 image
//! spans 4x6 tiles. Bar: relative L2 <= 1e-4 for the decoded image and the encoded
//! distribution.

use crate::common;

use candle_core::{DType, Device, Tensor};
use common::{golden, max_abs, rel_l2};
use std::collections::HashMap;
use tkg::models::config::VaeConfig;
use tkg::models::vae::{Vae, VaeTiling};
use tkg::models::weights::WeightFile;

fn load() -> (Vae, HashMap<String, Tensor>) {
    let dir = golden().join("vae_tiling");
    let cfg: VaeConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let weights = golden().join("sd15/a/model/vae/diffusion_pytorch_model.safetensors");
    let vb = WeightFile::open(&weights)
        .unwrap()
        .var_builder(DType::F32, &Device::Cpu);
    let vae = Vae::load(vb, &cfg).unwrap();
    let t = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    (vae, t)
}

#[test]
fn tiled_decode_matches_diffusers() {
    let (vae, t) = load();
    let got = vae.decode_with(&t["latents"], VaeTiling::On).unwrap();
    let want = &t["tiled_image"];
    assert_eq!(got.dims(), want.dims());
    let rel = rel_l2(&got, want);
    println!(
        "tiled decode vs diffusers: rel L2 {rel:.3e}, max abs {:.3e}",
        max_abs(&got, want)
    );
    assert!(rel <= 1e-4, "rel L2 {rel}");
    // The tiles matter at this size: untiled is far from diffusers' tiled image (and close to
    // its untiled one), so the bar above could not be met without tiling.
    let untiled = vae.decode_with(&t["latents"], VaeTiling::Off).unwrap();
    assert!(rel_l2(&untiled, want) > 1e-2);
    assert!(rel_l2(&untiled, &t["untiled_image"]) <= 1e-4);
}

#[test]
fn tiled_encode_matches_diffusers() {
    let (vae, t) = load();
    let (mean, std) = vae
        .encode_distribution_with(&t["image"], VaeTiling::On)
        .unwrap();
    for (name, got) in [("tiled_mean", &mean), ("tiled_std", &std)] {
        let want = &t[name];
        assert_eq!(got.dims(), want.dims(), "{name}");
        let rel = rel_l2(got, want);
        println!("{name} vs diffusers: rel L2 {rel:.3e}");
        assert!(rel <= 1e-4, "{name}: rel L2 {rel}");
    }
    let (untiled, _) = vae
        .encode_distribution_with(&t["image"], VaeTiling::Off)
        .unwrap();
    assert!(rel_l2(&untiled, &t["tiled_mean"]) > 1e-2);
}
