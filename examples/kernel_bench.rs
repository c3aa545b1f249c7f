//! Micro-benchmarks of the CPU kernels against candle's ops on SD1.5 shapes.
//!
//!   cargo run --release --example kernel_bench [-- FILTER]
//!
//! Prints the best of a few runs, in ms and GFLOP/s. The numbers are noisy on a shared machine.
//! Where the CPU has AVX-512 BF16, the kernels also run with bf16 products ("tkg bf16").

use candle_core::{Device, Module, Tensor};
use std::time::Instant;
use tkg::kernels;
use tkg::kernels::matmul::{Precision, bf16_native, with_precision};

fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// More runs for tiny shapes, whose times are in microseconds.
fn reps(flops: f64) -> usize {
    if flops < 1e8 { 300 } else { 3 }
}

fn report(name: &str, flops: f64, secs: f64) {
    println!(
        "{name:<58} {:>9.2} ms {:>8.1} GFLOP/s",
        secs * 1e3,
        flops / secs / 1e9
    );
}

/// Times `f` with f32 products ("tkg") and, where the CPU has AVX-512 BF16, bf16 ones
/// ("tkg bf16").
fn report_tkg(name: &str, flops: f64, f: impl Fn()) {
    for (label, p) in [("tkg", Precision::F32), ("tkg bf16", Precision::Bf16)] {
        if p == Precision::Bf16 && !bf16_native() {
            continue;
        }
        let s = best(reps(flops), || with_precision(p, &f));
        report(&format!("{name} {label}"), flops, s);
    }
}

fn main() -> anyhow::Result<()> {
    let filter = std::env::args().nth(1).unwrap_or_default();
    // TKG_WINOGRAD=0 and TKG_PROFILE=1 work here as in the CLI.
    kernels::configure(kernels::KernelConfig::from_lookup(&|k| {
        std::env::var(k).ok()
    }))?;
    let dev = Device::Cpu;
    let run = |name: &str| name.contains(&filter);

    // Raw gemm throughput.
    for &(m, n, k) in &[(1024, 1024, 1024), (320, 512, 2880)] {
        let name = format!("gemm {m}x{n}x{k}");
        if run(&name) {
            let a = vec![0.5f32; m * k];
            let b = vec![0.25f32; k * n];
            let mut c = vec![0f32; m * n];
            for (label, par) in [
                ("1 thread", gemm::Parallelism::None),
                (
                    "rayon",
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                ),
            ] {
                let s = best(5, || unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        c.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        b.as_ptr(),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    )
                });
                report(&format!("{name} {label}"), 2.0 * (m * n * k) as f64, s);
            }
        }
    }

    // 3x3 convolutions: (batch, cin, cout, size)
    for &(b, cin, cout, hw) in &[
        (2, 320, 320, 32),
        (2, 320, 320, 64),
        (2, 640, 640, 16),
        (2, 640, 640, 32),
        (2, 1280, 1280, 16),
        (2, 1280, 1280, 8),
        (2, 1280, 1280, 4),
        (2, 2560, 1280, 8),
        (1, 512, 512, 64),
        (1, 256, 256, 128),
        (1, 128, 128, 256),
        // tiny-sd15's lowest levels (conv_small)
        (2, 64, 64, 4),
        (2, 32, 32, 8),
    ] {
        let name = format!("conv3x3 b{b} {cin}->{cout} {hw}x{hw}");
        if !run(&name) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (b, cin, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (cout, cin, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
        let flops = 2.0 * (b * cin * cout * 9 * hw * hw) as f64;
        report_tkg(&name, flops, || {
            kernels::conv::conv2d(&x, &w, Some(&bias), None, 1, 1).unwrap();
        });
        if bf16_native() {
            // As a model's layer runs it: the weight's packed forms kept from call to call.
            let kept = kernels::PreparedConv::default();
            let s = best(reps(flops), || {
                with_precision(Precision::Bf16, || {
                    kernels::conv::conv2d_prepared(&x, &w, &kept, Some(&bias), None, 1, 1, 1)
                        .unwrap();
                })
            });
            report(&format!("{name} tkg bf16 kept"), flops, s);
        }
        let conv = candle_nn::Conv2d::new(
            w.clone(),
            Some(bias.clone()),
            candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        let s = best(2, || {
            conv.forward(&x).unwrap();
        });
        report(&format!("{name} candle"), flops, s);
    }

    // Attention: (batch, tokens, ctx tokens, heads, head dim)
    for &(b, n, nk, heads, d) in &[
        (2, 4096, 4096, 8, 40),
        (2, 1024, 1024, 8, 40),
        (2, 1024, 1024, 8, 80),
        (2, 4096, 77, 8, 40),
        (1, 4096, 4096, 1, 512),
        // tiny-sd15 at 64x64
        (2, 64, 77, 4, 8),
        (2, 64, 64, 4, 8),
    ] {
        let name = format!("attention b{b} {n}x{nk} h{heads} d{d}");
        if !run(&name) {
            continue;
        }
        let c = heads * d;
        let q = Tensor::randn(0f32, 1.0, (b, n, c), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, nk, c), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, nk, c), &dev)?;
        let flops = 4.0 * (b * heads * n * nk * d) as f64;
        report_tkg(&name, flops, || {
            kernels::attention::attention(&q, &k, &v, heads).unwrap();
        });
        let split = |t: &Tensor, m: usize| {
            t.reshape((b, m, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let s = best(2, || {
            let (qh, kh, vh) = (split(&q, n), split(&k, nk), split(&v, nk));
            let o = tkg::models::blocks::attention(&qh, &kh, &vh).unwrap();
            o.transpose(1, 2).unwrap().reshape((b, n, c)).unwrap();
        });
        report(&format!("{name} candle"), flops, s);
    }

    // Linear layers on tokens: (batch, tokens, in, out)
    for &(b, n, k, o) in &[
        (2, 4096, 320, 2560),
        (2, 1024, 640, 5120),
        (2, 4096, 320, 320),
        (2, 77, 768, 320),
        // The 8x8 level of a 256x256 image: few tokens, a large weight.
        (2, 64, 1280, 10240),
        (2, 64, 5120, 1280),
    ] {
        let name = format!("linear b{b} {n}x{k}->{o}");
        if !run(&name) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (b, n, k), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (o, k), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, o, &dev)?;
        let flops = 2.0 * (b * n * k * o) as f64;
        report_tkg(&name, flops, || {
            kernels::linear::linear(&x, &w, None, Some(&bias), None).unwrap();
        });
        if bf16_native() {
            // As a model's layer runs it: the weight's packed form kept from call to call.
            let kept = kernels::PreparedLinear::default();
            let t0 = std::time::Instant::now();
            with_precision(Precision::Bf16, || {
                kernels::linear::linear(&x, &w, Some(&kept), Some(&bias), None).unwrap();
            });
            report(
                &format!("{name} tkg bf16 first"),
                flops,
                t0.elapsed().as_secs_f64(),
            );
            let s = best(reps(flops), || {
                with_precision(Precision::Bf16, || {
                    kernels::linear::linear(&x, &w, Some(&kept), Some(&bias), None).unwrap();
                })
            });
            report(&format!("{name} tkg bf16 kept"), flops, s);
        }
    }

    // Group norm + SiLU: (batch, channels, size)
    for &(b, c, hw) in &[(2, 320, 64), (1, 128, 512), (1, 256, 256)] {
        let name = format!("group_norm+silu b{b} c{c} {hw}x{hw}");
        if !run(&name) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (b, c, hw, hw), &dev)?;
        let g = Tensor::ones(c, candle_core::DType::F32, &dev)?;
        let z = Tensor::zeros(c, candle_core::DType::F32, &dev)?;
        let bytes = (x.elem_count() * 4) as f64;
        let s = best(3, || {
            kernels::norm::group_norm(&x, 32, &g, &z, 1e-6, true).unwrap();
        });
        println!(
            "{name} tkg {:>9.2} ms {:.1} GB/s",
            s * 1e3,
            2.0 * bytes / s / 1e9
        );
        let gn = candle_nn::GroupNorm::new(g.clone(), z.clone(), c, 32, 1e-6)?;
        let s = best(2, || {
            candle_nn::ops::silu(&gn.forward(&x).unwrap()).unwrap();
        });
        println!("{name} candle {:>9.2} ms", s * 1e3);
    }
    Ok(())
}
