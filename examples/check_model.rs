//! Loads a diffusers folder with tkg's loaders (every tensor of every component must be used)
//! and, given a one-step golden, runs one UNet step and prints its error against it.
//!
//! cargo run --release --example check_model -- DIR [unet_step.safetensors]
//!
//! The golden holds `sample`, `encoder_hidden_states`, `timestep`, `out` and, for SDXL,
//! `text_embeds` and `time_ids` (see benches/sdxl_full/make_random_sdxl.py).

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use std::path::PathBuf;
use std::time::Instant;
use tkg::models::hub::ModelFolder;
use tkg::models::unet::AddedCond;
use tkg::pipeline::{LoadOptions, Pipeline};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().context("usage: check_model DIR [golden]")?);
    let golden = args.next().map(PathBuf::from);
    let t = Instant::now();
    let opts = LoadOptions::cpu_f32();
    let pipe = Pipeline::load(&ModelFolder::local(&dir)?, &opts)?;
    println!(
        "loaded {} ({}) in {:.1}s: every tensor of every component used, none missing",
        dir.display(),
        pipe.family,
        t.elapsed().as_secs_f64()
    );
    if let Some(g) = golden {
        let t = candle_core::safetensors::load(&g, &Device::Cpu)?;
        let timestep = t["timestep"]
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?[0];
        let added = t.get("text_embeds").map(|te| AddedCond {
            text_embeds: te.clone(),
            time_ids: t["time_ids"].clone(),
        });
        let start = Instant::now();
        let out = pipe.unet.forward(
            &t["sample"],
            timestep,
            &t["encoder_hidden_states"],
            added.as_ref(),
        )?;
        let want = &t["out"];
        let num: f32 = (&out - want)?.sqr()?.sum_all()?.to_scalar()?;
        let den: f32 = want.sqr()?.sum_all()?.to_scalar()?;
        println!(
            "one UNet step {:?} in {:.1}s: relative L2 error vs diffusers {:.3e}",
            out.dims(),
            start.elapsed().as_secs_f64(),
            (num / den).sqrt()
        );
    }
    Ok(())
}
