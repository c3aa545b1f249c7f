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
