//! `tkg generate` with --lora, <lora:...> tags, --lora-strict and --model-file: the report on
//! stderr, the PNG metadata, and one-line failures.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tkg-lora-cli-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn tkg(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tkg"))
        .args(args)
        .env("HF_HOME", home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn fails_with(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {err}");
    assert!(
        lines[0].starts_with("error:") && err.contains(needle),
        "{err}"
    );
}

#[test]
fn lora_tags_flags_and_metadata() {
    let d = scratch("tags");
    let model = root().join("tests/golden/sd15/a/model");
    let loras = root().join("tests/golden/lora");
    let out_png = d.join("car.png");
    let out = tkg(
        &d,
        &[
            "generate",
            "--model-dir",
            model.to_str().unwrap(),
            "--prompt",
            "a red car <lora:sd15_kohya.lora:0.7>",
            "--lora-dir",
            loras.to_str().unwrap(),
            "--lora",
            &format!("{}:0.5", loras.join("sd15_peft.lora.safetensors").display()),
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "1",
            "--no-key",
            "--lora-strict",
            "--out",
            out_png.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("applied 89/89 modules"), "{err}");
    let png = fs::read(&out_png).unwrap();
    let text = String::from_utf8_lossy(&png);
    assert!(
        text.contains("<lora:sd15_kohya.lora:0.7>"),
        "the tag stays in the prompt"
    );
    assert!(
        text.contains("Lora hashes"),
        "no Lora hashes in the metadata"
    );
    assert!(text.contains("sd15_peft.lora: "), "the --lora file's hash");
    assert!(text.contains("Model hash"));

    // A LoRA for SDXL on an SD1.5 model, an unknown tag, a missing --lora-dir.
    let base = [
        "generate",
        "--model-dir",
        model.to_str().unwrap(),
        "--steps",
        "1",
        "--seed",
        "1",
        "--no-key",
        "--out",
    ];
    let png2 = d.join("x.png");
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.push(png2.to_str().unwrap());
        a.extend_from_slice(extra);
        tkg(&d, &a)
    };
    let xl = loras.join("sdxl_kohya.lora.safetensors");
    fails_with(
        &with(&["--prompt", "x", "--lora", xl.to_str().unwrap()]),
        "targets SDXL",
    );
    fails_with(
        &with(&[
            "--prompt",
            "x <lora:nope:1>",
            "--lora-dir",
            loras.to_str().unwrap(),
        ]),
        "no nope.safetensors",
    );
    fails_with(&with(&["--prompt", "x <lora:nope:1>"]), "--lora-dir");
    let ckpt = d.join("m.ckpt");
    fs::write(&ckpt, b"x").unwrap();
    let out = tkg(
        &d,
        &[
            "generate",
            "--model-file",
            ckpt.to_str().unwrap(),
            "--prompt",
            "x",
            "--seed",
            "1",
            "--out",
            png2.to_str().unwrap(),
        ],
    );
    fails_with(&out, "pickle");
    assert!(!png2.exists());
    fs::remove_dir_all(&d).unwrap();
}

/// Pixels of a PNG (the metadata differs between `generate` and `batch` runs).
fn pixels(p: &Path) -> Vec<u8> {
    let dec = png::Decoder::new(std::io::BufReader::new(fs::File::open(p).unwrap()));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let n = reader.next_frame(&mut buf).unwrap().buffer_size();
    buf.truncate(n);
    buf
}

#[test]
fn batch_jobs_with_different_lora_sets() {
    let d = scratch("batch");
    let model = root().join("tests/golden/sd15/a/model");
    let loras = root().join("tests/golden/lora");
    let peft = loras.join("sd15_peft.lora.safetensors");
    let jobs = d.join("jobs.jsonl");
    let lines = [
        serde_json::json!({"prompt": "a red car", "seed": 7}),
        serde_json::json!({"prompt": "a red car", "seed": 7,
            "lora": format!("{}:0.8", peft.display())}),
        serde_json::json!({"prompt": "a red car <lora:sd15_kohya.lora:0.7>", "seed": 7}),
        serde_json::json!({"prompt": "a blue car", "seed": 8}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    fs::write(&jobs, text).unwrap();
    let common = [
        "--model-dir",
        model.to_str().unwrap(),
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--no-key",
    ];
    let out_t = d.join("b/{index}.png");
    let mut args = vec![
        "batch",
        jobs.to_str().unwrap(),
        "--lora-dir",
        loras.to_str().unwrap(),
        "--out",
        out_t.to_str().unwrap(),
    ];
    args.extend(common);
    let out = tkg(&d, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Each job as its own `tkg generate` run.
    let single = |name: &str, prompt: &str, seed: &str, extra: &[&str]| {
        let p = d.join(format!("{name}.png"));
        let mut args = vec![
            "generate",
            "--prompt",
            prompt,
            "--seed",
            seed,
            "--out",
            p.to_str().unwrap(),
            "--lora-dir",
            loras.to_str().unwrap(),
        ];
        args.extend(common);
        args.extend(extra);
        let out = tkg(&d, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        pixels(&p)
    };
    let lora_arg = format!("{}:0.8", peft.display());
    let want = [
        single("plain", "a red car", "7", &[]),
        single("peft", "a red car", "7", &["--lora", &lora_arg]),
        single("tag", "a red car <lora:sd15_kohya.lora:0.7>", "7", &[]),
        single("blue", "a blue car", "8", &[]),
    ];
    for (i, w) in want.iter().enumerate() {
        assert!(
            pixels(&d.join(format!("b/{i}.png"))) == *w,
            "job {i} differs from its own generate run"
        );
    }
    assert!(want[0] != want[1] && want[0] != want[2] && want[1] != want[2]);
    let meta = |i: usize| fs::read(d.join(format!("b/{i}.png"))).unwrap();
    let has = |i: usize, s: &str| meta(i).windows(s.len()).any(|w| w == s.as_bytes());
    assert!(!has(0, "Lora hashes") && !has(3, "Lora hashes"));
    assert!(has(1, "Lora hashes") && has(2, "Lora hashes"));

    // A missing LoRA file is reported with its line before any work starts.
    fs::write(
        &jobs,
        "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"lora\": \"/nonexistent/x.safetensors\"}\n",
    )
    .unwrap();
    let out = tkg(&d, &args);
    fails_with(&out, "line 2");
    assert!(!d.join("b2").exists());
}
