//! U²-Net parity helper for the golden and benchmark scripts (tests/golden/segment/,
//! benches/u2net_parity.py); not part of the CLI.
//!
//! ```sh
//! cargo run --example u2net -- write-tiny OUT.onnx            # the built-in tiny model's file
//! cargo run --example u2net -- raw MODEL RESIZED.png OUT.f32  # raw mask from a resized input
//! cargo run --example u2net -- resize MODEL IMAGE OUT.png     # tkg's resize to the input size
//! cargo run --example u2net -- time MODEL N                   # seconds per forward pass
//! cargo run --example u2net -- profile MODEL                  # where one pass spends its time
//! ```
//! MODEL is an .onnx file or `tiny-u2net`. RESIZED.png is an RGB image already at the
//! network's input size (rembg's resize, made by the script), so the two networks see the
//! same tensor; OUT.f32 is the min-max normalised mask, little-endian f32, row-major.

use anyhow::{Context, Result, bail};
use candle_core::Device;
use std::path::Path;
use tkg::segment::{self, U2NetSegmenter};

fn load(model: &str) -> Result<U2NetSegmenter> {
    segment::load(&segment::locate(model, &[])?, model, &Device::Cpu)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .context("missing argument; see the example's doc comment")
    };
    match a(0)? {
        "write-tiny" => {
            std::fs::write(a(1)?, segment::tiny_u2net_model().to_bytes())?;
        }
        "raw" => {
            let net = load(a(1)?)?;
            let img = image::open(a(2)?)?.to_rgb8();
            let raw = net.raw_mask(&net.normalize(img.as_raw())?)?;
            let bytes: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(a(3)?, bytes)?;
        }
        "resize" => {
            let net = load(a(1)?)?;
            let img = image::open(a(2)?)?.to_rgb8();
            let (h, w) = net.input_size();
            let resized = net.resize_input(&img)?;
            image::RgbImage::from_raw(w as u32, h as u32, resized)
                .context("resize size")?
                .save(Path::new(a(3)?))?;
        }
        "time" => {
            let net = load(a(1)?)?;
            let n: usize = a(2)?.parse()?;
            let (h, w) = net.input_size();
            let input = net.normalize(&vec![128u8; 3 * h * w])?;
            net.raw_mask(&input)?;
            let t = std::time::Instant::now();
            for _ in 0..n {
                net.raw_mask(&input)?;
            }
            println!("{:.4}", t.elapsed().as_secs_f64() / n as f64);
        }
        "profile" => {
            tkg::kernels::configure(tkg::kernels::KernelConfig {
                profile: true,
                ..Default::default()
            })?;
            let net = load(a(1)?)?;
            let (h, w) = net.input_size();
            let input = net.normalize(&vec![128u8; 3 * h * w])?;
            net.raw_mask(&input)?;
            tkg::kernels::profile::take();
            let t = std::time::Instant::now();
            net.raw_mask(&input)?;
            let total = t.elapsed();
            let scopes = tkg::kernels::profile::take();
            let in_kernels: std::time::Duration = scopes.iter().map(|s| s.1).sum();
            for (name, d, n) in &scopes {
                println!("{:8.1} ms  {n:4}x  {name}", d.as_secs_f64() * 1000.0);
            }
            println!(
                "total {:.1} ms, timed scopes {:.1} ms, the rest {:.1} ms",
                total.as_secs_f64() * 1000.0,
                in_kernels.as_secs_f64() * 1000.0,
                (total - in_kernels).as_secs_f64() * 1000.0
            );
        }
        other => bail!("unknown command {other}"),
    }
    Ok(())
}
