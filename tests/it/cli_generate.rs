//! The real binary on the built-in tiny model: outputs, metadata, determinism, and every
//! kind of bad input failing with one line and leaving nothing behind.

use crate::common::cli;

use cli::{hf_home, s, scratch, tkg};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A failure: non-zero exit, one line on stderr mentioning `needle`, no panic.
fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.last().copied().unwrap_or("");
    assert!(last.starts_with("error:"), "stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    assert!(
        last.to_lowercase().contains(&needle.to_lowercase()),
        "'{needle}' not in: {last}"
    );
}

fn generate(dir: &Path, name: &str, extra: &[&str]) -> Output {
    generate_command(dir, name, extra).output().unwrap()
}

/// The tiny model's generation of `dir/name`, seed 42, 8 steps, plus `extra`.
fn generate_command(dir: &Path, name: &str, extra: &[&str]) -> std::process::Command {
    let out = dir.join(name);
    let mut args = vec![
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "a red vintage car",
        "--seed",
        "42",
        "--steps",
        "8",
        "--out",
        s(&out),
    ];
    args.extend_from_slice(extra);
    cli::command(&args)
}

fn decode(path: &Path) -> (u32, u32, png::ColorType, Vec<u8>) {
    let dec = png::Decoder::new(std::io::BufReader::new(fs::File::open(path).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, info.color_type, buf)
}

/// Whether two PNGs hold the same pixels (short message on failure, not a pixel dump).
fn same_pixels(a: &Path, b: &Path) -> bool {
    let (a, b) = (decode(a), decode(b));
    if (a.0, a.1) != (b.0, b.1) {
        eprintln!("sizes differ: {}x{} vs {}x{}", a.0, a.1, b.0, b.1);
        return false;
    }
    let n = a.3.iter().zip(&b.3).filter(|(x, y)| x != y).count();
    if n > 0 {
        eprintln!("{n} bytes differ");
    }
    n == 0
}

#[test]
fn generates_image_matte_and_cutout_with_metadata() {
    let d = scratch("ok");
    let out = generate(&d, "car.png", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let paths: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        paths.len(),
        3,
        "stdout must list the written files only: {stdout}"
    );
    for p in &paths {
        assert!(Path::new(p).is_file(), "{p}");
    }
    let (w, h, ct, _) = decode(&d.join("car.png"));
    assert_eq!((w, h, ct), (64, 64, png::ColorType::Rgb));
    let (w, h, ct, matte) = decode(&d.join("car.matte.png"));
    assert_eq!((w, h, ct), (64, 64, png::ColorType::Grayscale));
    let (lo, hi) = (matte.iter().min().unwrap(), matte.iter().max().unwrap());
    assert!(lo < hi, "the matte is constant");
    let (_, _, ct, _) = decode(&d.join("car.cutout.png"));
    assert_eq!(ct, png::ColorType::Rgba);

    let text = tkg::output::read_png_text(&d.join("car.png")).unwrap();
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.starts_with("a red vintage car\n"), "{params}");
    for key in [
        "Steps: 8",
        "Sampler: DDIM",
        "CFG scale: 7.5",
        "Seed: 42",
        "Size: 64x64",
        "Model hash: ",
        "Model: tiny-sd15",
        "TKG color: green",
        "TKG shift: 0.07",
    ] {
        assert!(params.contains(key), "missing {key} in {params}");
    }
    // No temporary files are left behind.
    let names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("tkg-tmp")), "{names:?}");
}

#[test]
fn same_seed_same_bytes_other_seed_other_image() {
    let d = scratch("determinism");
    assert!(generate(&d, "a.png", &["--no-key"]).status.success());
    assert!(generate(&d, "b.png", &["--no-key"]).status.success());
    assert_eq!(
        fs::read(d.join("a.png")).unwrap(),
        fs::read(d.join("b.png")).unwrap()
    );
    let out = tkg(&[
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "a red vintage car",
        "--seed",
        "43",
        "--steps",
        "8",
        "--no-key",
        "--out",
        s(&d.join("c.png")),
    ]);
    assert!(out.status.success());
    assert!(!same_pixels(&d.join("a.png"), &d.join("c.png")));
}

#[test]
fn methods_differ_and_latents_are_saved() {
    let d = scratch("methods");
    let lat = d.join("lat.safetensors");
    let out = generate(&d, "tkg.png", &["--no-key", "--save-latents", s(&lat)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = candle_core::safetensors::load(&lat, &candle_core::Device::Cpu).unwrap();
    for n in ["noise", "init", "final"] {
        assert_eq!(t[n].dims(), &[1, 4, 8, 8], "{n}");
    }
    let diff: f32 = (&t["init"] - &t["noise"])
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff > 0.0, "TKG did not change the noise");
    assert!(
        generate(&d, "plain.png", &["--no-key", "--method", "plain"])
            .status
            .success()
    );
    assert!(
        generate(&d, "prompt.png", &["--no-key", "--method", "prompt"])
            .status
            .success()
    );
    assert!(!same_pixels(&d.join("tkg.png"), &d.join("plain.png")));
    assert!(!same_pixels(&d.join("prompt.png"), &d.join("plain.png")));
    let text = tkg::output::read_png_text(&d.join("prompt.png")).unwrap();
    assert!(
        text[0]
            .1
            .starts_with("a red vintage car isolated on a solid green background")
    );
}

#[test]
fn refuses_to_clobber_without_overwrite() {
    let d = scratch("clobber");
    fs::write(d.join("car.matte.png"), b"precious").unwrap();
    let out = generate(&d, "car.png", &[]);
    assert_fails(&out, "--overwrite");
    assert_eq!(fs::read(d.join("car.matte.png")).unwrap(), b"precious");
    assert!(
        !d.join("car.png").exists(),
        "nothing may be written when refusing"
    );
    let out = generate(&d, "car.png", &["--overwrite"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(fs::read(d.join("car.matte.png")).unwrap(), b"precious");
}

#[test]
fn bad_arguments_fail_cleanly() {
    let d = scratch("badargs");
    assert_fails(&generate(&d, "x.png", &["--width", "60"]), "multiples of 8");
    let out = tkg(&[
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "x",
        "--steps",
        "0",
        "--out",
        s(&d.join("x.png")),
    ]);
    assert_fails(&out, "--steps");
    assert_fails(&generate(&d, "x.png", &["--shift", "0.99"]), "shift");
    let out = tkg(&[
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "x",
        "--color",
        "grene",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("#RRGGBB"));
    let out = tkg(&[
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--out",
        "/nonexistent-tkg-dir/x.png",
    ]);
    assert_fails(&out, "does not exist");
    assert_fails(
        &tkg(&["generate", "--model", "no-such-model", "--prompt", "x"]),
        "tiny-sd15",
    );
    assert_eq!(
        fs::read_dir(&d).unwrap().count(),
        0,
        "failures must write nothing"
    );
}

#[test]
fn long_prompts_warn_and_truncate() {
    let d = scratch("long");
    let long = "a very long prompt about a red car ".repeat(20);
    let out = tkg(&[
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        &long,
        "--seed",
        "1",
        "--steps",
        "2",
        "--no-key",
        "--out",
        s(&d.join("l.png")),
    ]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning:") && err.contains("77"), "{err}");
}

/// A copy of the tiny model in a folder of its own, for damaging.
fn model_copy(name: &str) -> PathBuf {
    let d = scratch(name).join("model");
    let out = tkg(&["models", "materialize", "tiny-sd15", s(&d)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn generate_dir(model: &Path, out: &Path) -> Output {
    tkg(&[
        "generate",
        "--model-dir",
        s(model),
        "--prompt",
        "a car",
        "--seed",
        "3",
        "--steps",
        "2",
        "--out",
        s(out),
    ])
}

#[test]
fn model_dir_gives_the_same_pixels_as_the_named_model() {
    let m = model_copy("samepix");
    let d = m.parent().unwrap();
    let out = tkg(&[
        "generate",
        "--model-dir",
        s(&m),
        "--prompt",
        "a red vintage car",
        "--seed",
        "42",
        "--steps",
        "8",
        "--no-key",
        "--out",
        s(&d.join("dir.png")),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(generate(d, "named.png", &["--no-key"]).status.success());
    assert!(same_pixels(&d.join("dir.png"), &d.join("named.png")));
}

#[test]
fn broken_models_fail_with_the_file_named() {
    // Missing weights file.
    let m = model_copy("missing");
    fs::remove_file(m.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let out_png = m.parent().unwrap().join("x.png");
    assert_fails(&generate_dir(&m, &out_png), "diffusion_pytorch_model");
    assert!(!out_png.exists());

    // Truncated weights file.
    let m = model_copy("truncated");
    let p = m.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = fs::read(&p).unwrap();
    fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails(&generate_dir(&m, &out_png), "safetensors");

    // A config that does not match the weights.
    let m = model_copy("mismatch");
    let p = m.join("unet/config.json");
    let cfg = fs::read_to_string(&p).unwrap().replace(
        "\"attention_head_dim\": 4",
        "\"attention_head_dim\": 4, \"layers_per_block\": 2",
    );
    fs::write(&p, cfg).unwrap();
    assert_fails(&generate_dir(&m, &out_png), "unet");

    // A wrong tensor shape.
    let m = model_copy("shape");
    let p = m.join("text_encoder/config.json");
    let cfg = fs::read_to_string(&p)
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 48");
    fs::write(&p, cfg).unwrap();
    assert_fails(&generate_dir(&m, &out_png), "shape");
    assert!(!out_png.exists());
}

#[test]
fn nan_weights_are_an_error_not_a_black_image() {
    let m = model_copy("nan");
    let p = m.join("vae/diffusion_pytorch_model.safetensors");
    let dev = candle_core::Device::Cpu;
    let mut t = candle_core::safetensors::load(&p, &dev).unwrap();
    let b = t["decoder.conv_out.bias"].clone();
    t.insert("decoder.conv_out.bias".into(), (b * f64::NAN).unwrap());
    candle_core::safetensors::save(&t, &p).unwrap();
    let out_png = m.parent().unwrap().join("nan.png");
    assert_fails(&generate_dir(&m, &out_png), "decoded image");
    assert!(!out_png.exists());
}

#[test]
fn key_subcommand_keys_a_generated_image() {
    let d = scratch("key");
    assert!(generate(&d, "g.png", &["--no-key"]).status.success());
    let out = tkg(&["key", s(&d.join("g.png")), "--out", s(&d.join("k.png"))]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(d.join("k.matte.png").is_file() && d.join("k.cutout.png").is_file());
}

#[test]
fn models_list_shows_the_builtins() {
    let out = tkg(&["models", "list"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sd15") && text.contains("tiny-sd15"),
        "{text}"
    );
    let tiny = text.lines().find(|l| l.starts_with("tiny-sd15")).unwrap();
    assert!(tiny.contains("yes"), "{tiny}");
}

#[test]
fn sampler_flags_are_checked_before_any_work() {
    let d = scratch("badsampler");
    let out = generate(&d, "x.png", &["--sampler", "dpm++3m"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dpm++3m") && err.contains("euler-a") && err.contains("unipc"),
        "the error lists the names: {err}"
    );
    assert_fails(
        &generate(&d, "x.png", &["--sampler", "euler", "--eta", "0.5"]),
        "--eta is DDIM's",
    );
    assert_fails(
        &generate(&d, "x.png", &["--sampler", "ddim", "--schedule", "karras"]),
        "does not apply to ddim",
    );
    assert_fails(&generate(&d, "x.png", &["--eta", "2"]), "--eta must be");
    assert_eq!(fs::read_dir(&d).unwrap().count(), 0, "nothing written");
}

/// Each sampler (with Karras where it takes a schedule, and DDIM with eta) makes its own
/// image, and `tkg info`'s command makes it again, byte for byte.
#[test]
fn every_sampler_reproduces_from_its_info_command() {
    let d = scratch("samplers");
    let cases: &[&[&str]] = &[
        &["--sampler", "ddim", "--eta", "0.5"],
        &["--sampler", "euler"],
        &["--sampler", "euler-a"],
        &["--sampler", "heun"],
        &["--sampler", "dpm++2m", "--schedule", "karras"],
        &["--sampler", "dpm++2m-sde", "--schedule", "karras"],
        &["--sampler", "unipc"],
        &["--sampler", "lcm", "--guidance", "1.5"],
        &[
            "--sampler",
            "euler-a",
            "--timestep-spacing",
            "trailing",
            "--guidance",
            "0",
        ],
    ];
    let mut images: Vec<Vec<u8>> = vec![
        decode(&{
            let out = generate(&d, "ddim.png", &["--no-key"]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            d.join("ddim.png")
        })
        .3,
    ];
    for (i, flags) in cases.iter().enumerate() {
        let name = format!("s{i}.png");
        let mut args = vec!["--no-key"];
        args.extend_from_slice(flags);
        let out = generate(&d, &name, &args);
        assert!(
            out.status.success(),
            "{flags:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info = tkg(&["info", s(&d.join(&name))]);
        let text = String::from_utf8_lossy(&info.stdout);
        let command = text.lines().last().unwrap();
        assert!(command.contains(flags[1]), "{flags:?}: {command}");
        let rerun = std::process::Command::new("sh")
            .arg("-c")
            .arg(command.replacen("tkg ", "\"$TKG\" ", 1) + " --no-key")
            .current_dir(&d)
            .env("TKG", env!("CARGO_BIN_EXE_tkg"))
            .env("HF_HOME", hf_home())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(
            rerun.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&rerun.stderr)
        );
        let repro = d.join(format!("s{i}-repro.png"));
        assert_eq!(
            fs::read(d.join(&name)).unwrap(),
            fs::read(&repro).unwrap(),
            "{flags:?}: the reproduced file differs"
        );
        let pixels = decode(&repro).3;
        assert!(
            images.iter().all(|p| *p != pixels),
            "{flags:?} gives the same image as an earlier sampler"
        );
        images.push(pixels);
    }
}

#[test]
fn a_models_sampling_defaults_apply_where_flags_are_silent() {
    let d = scratch("modeldefaults");
    let toml = d.join("models.toml");
    let model = hf_home().join("hub/tkg--builtin--tiny-sd15");
    fs::write(
        &toml,
        format!(
            "[models.fast]\nfamily = \"sd15\"\ndir = \"{}\"\nsteps = 3\nguidance = 1\n",
            model.display()
        ),
    )
    .unwrap();
    let params = |name: &str, extra: &[&str]| {
        let out = d.join(name);
        let mut args = vec![
            "generate",
            "--model",
            "fast",
            "--models-file",
            s(&toml),
            "--prompt",
            "a car",
            "--seed",
            "1",
            "--no-key",
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        let run = tkg(&args);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let text = tkg::output::read_png_text(&out).unwrap();
        text.into_iter().find(|(k, _)| k == "parameters").unwrap().1
    };
    let p = params("a.png", &[]);
    assert!(
        p.contains("Steps: 3,") && p.contains("CFG scale: 1,"),
        "{p}"
    );
    let p = params("b.png", &["--steps", "2", "--guidance", "3"]);
    assert!(
        p.contains("Steps: 2,") && p.contains("CFG scale: 3,"),
        "{p}"
    );
}

/// The kernels split work by the thread count; no output element's arithmetic may depend on
/// the split, so 1, 2 and 3 threads write the same bytes (docs/batch.md, reproducibility).
#[test]
fn the_thread_count_changes_no_bit() {
    let d = scratch("threads");
    let files = |t: usize| {
        let lat = d.join(format!("t{t}.safetensors"));
        let run = generate_command(
            &d,
            &format!("t{t}.png"),
            &[
                "--width",
                "192",
                "--height",
                "128",
                "--save-latents",
                s(&lat),
            ],
        )
        .env("RAYON_NUM_THREADS", t.to_string())
        .output()
        .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        ["png", "matte.png", "cutout.png", "safetensors"]
            .map(|ext| fs::read(d.join(format!("t{t}.{ext}"))).unwrap())
    };
    let one = files(1);
    for t in [2, 3] {
        for (i, (a, b)) in one.iter().zip(files(t)).enumerate() {
            assert!(*a == b, "{t} threads: output {i} differs from 1 thread's");
        }
    }
}

#[test]
fn bench_times_each_decode_and_keeps_its_report() {
    let d = scratch("bench");
    let json = d.join("bench.json");
    let args = [
        "bench",
        "--model",
        "tiny-sd15",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--vae-calls",
        "3",
        "--json",
        s(&json),
    ];
    cli::assert_ok(&tkg(&args));
    let report: serde_json::Value = serde_json::from_slice(&fs::read(&json).unwrap()).unwrap();
    let decodes = report["vae_decodes_s"].as_array().unwrap();
    assert_eq!(decodes.len(), 3);
    assert_eq!(report["vae_decode_s"], decodes[0]);
    assert!(report["vae_decode_warm_s"].as_f64().unwrap() > 0.0);
    // The report is an output like any other: not replaced without --overwrite.
    let before = fs::read(&json).unwrap();
    assert_fails(&tkg(&args), "already exists");
    assert_eq!(fs::read(&json).unwrap(), before);
    let mut again = args.to_vec();
    again.push("--overwrite");
    cli::assert_ok(&tkg(&again));
    assert_fails(
        &tkg(&["bench", "--model", "tiny-sd15", "--vae-calls", "0"]),
        "--vae-calls must be at least 1",
    );
}
