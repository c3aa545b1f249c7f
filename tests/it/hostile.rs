//! The hostile-input battery: what a careless or malicious user, a broken pipe or a second
//! worker can throw at the binary. Each case ends in one line and a non-zero exit, or in
//! correct work; never a panic, a file written through a link, or a half-written output.
//! docs/reliability.md lists the promises these tests hold.

use crate::common::cli;

use cli::{assert_fails, command, s, scratch, tkg};
use std::fs;
use std::path::Path;
use std::process::Stdio;

/// `tkg generate` on the tiny model with `extra` flags, writing `out`.
fn generate(out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "a red car",
        "--seed",
        "7",
        "--steps",
        "2",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    tkg(&args)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn limits_are_checked_before_anything_is_allocated() {
    let d = scratch("limits");
    let o = d.join("o.png");
    for dry in [false, true] {
        let dry: &[&str] = if dry { &["--dry-run"] } else { &[] };
        let with = |flags: &[&str]| {
            let mut f = flags.to_vec();
            f.extend_from_slice(dry);
            generate(&o, &f)
        };
        assert_fails(
            &with(&["--width", "1048576", "--height", "64"]),
            "too large",
        );
        assert_fails(&with(&["--width", "8192", "--height", "8192"]), "4096x4096");
        assert_fails(&with(&["--num-images", "100000000000"]), "num-images");
        assert_fails(&with(&["--steps", "100000000"]), "steps");
        let mut args = vec![
            "generate",
            "--model",
            "tiny-sd15",
            "--prompt",
            "a red car",
            "--out",
            s(&o),
            "--seed",
            "18446744073709551615",
            "--num-images",
            "2",
        ];
        args.extend_from_slice(dry);
        assert_fails(&tkg(&args), "seeds do not wrap");
    }
    assert_eq!(names(&d), Vec::<String>::new());
}

#[test]
fn job_files_are_bounded() {
    let d = scratch("jobs");
    let jobs = d.join("jobs.jsonl");
    fs::write(
        &jobs,
        "{\"prompt\": \"a cat\", \"num_images\": 100000000000}\n",
    )
    .unwrap();
    let out = tkg(&["batch", s(&jobs), "--model", "tiny-sd15", "--dry-run"]);
    assert_fails(&out, "line 1");
    #[cfg(unix)]
    assert_fails(&tkg(&["batch", "/dev/zero", "--dry-run"]), "larger than");
    fs::write(
        &jobs,
        "{\"prompt\": \"a cat\", \"out\": \"a\\u0000b.png\"}\n",
    )
    .unwrap();
    assert_fails(
        &tkg(&["batch", s(&jobs), "--model", "tiny-sd15", "--dry-run"]),
        "NUL",
    );
}

#[test]
fn output_names_must_be_png_files_in_folders() {
    let d = scratch("names");
    let file = d.join("file");
    fs::write(&file, b"x").unwrap();
    assert_fails(&generate(&file.join("o.png"), &[]), "is not a folder");
    assert_fails(&generate(&d, &[]), "names a folder");
    let sub = format!("{}/", s(&d.join("sub")));
    assert_fails(&generate(Path::new(&sub), &[]), "folder");
    assert_fails(&generate(&d.join("o.jpg"), &[]), ".png");
    // Latents named like the image clash before any work, not after the image is written.
    let o = d.join("o.png");
    assert_fails(&generate(&o, &["--save-latents", s(&o)]), "written twice");
    assert_eq!(names(&d), vec!["file".to_string()]);
}

#[test]
fn usage_errors_are_one_line() {
    let out = tkg(&["generate", "--no-such-flag"]);
    assert_fails(&out, "--no-such-flag");
    assert_eq!(out.status.code(), Some(2));
    assert_fails(&tkg(&["generate", "--steps", "many"]), "many");
}

#[cfg(unix)]
#[test]
fn links_at_output_names_are_never_followed() {
    let d = scratch("links");
    let victim = d.join("victim.txt");
    fs::write(&victim, b"precious").unwrap();
    let o = d.join("o.png");
    std::os::unix::fs::symlink(&victim, &o).unwrap();
    assert_fails(&generate(&o, &["--no-key"]), "already exists");
    let out = generate(&o, &["--no-key", "--overwrite"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(&victim).unwrap(), b"precious");
    assert!(!fs::symlink_metadata(&o).unwrap().file_type().is_symlink());
}

#[test]
fn a_closed_stdout_does_not_stop_the_work() {
    let d = scratch("epipe");
    let o = d.join("img-{index}.png");
    let mut child = command(&[
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "a red car",
        "--seed",
        "7",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--no-key",
        "--out",
        s(&o),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // The reader goes away before the first path is printed, as `| head -0` would.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    assert_eq!(
        names(&d),
        vec!["img-0.png".to_string(), "img-1.png".to_string()]
    );

    #[cfg(target_os = "linux")]
    {
        let d = scratch("devfull");
        let o = d.join("img.png");
        let full = fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let out = command(&[
            "generate",
            "--model",
            "tiny-sd15",
            "--prompt",
            "a red car",
            "--steps",
            "2",
            "--no-key",
            "--out",
            s(&o),
        ])
        .stdout(full)
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("cannot write to standard output"), "{err}");
        assert!(o.is_file());
    }
}

#[test]
fn control_characters_in_prompts_stay_valid_png() {
    let d = scratch("ctrl");
    let o = d.join("o.png");
    let out = tkg(&[
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "a red\u{1b}[2J car\u{7}",
        "--steps",
        "2",
        "--no-key",
        "--out",
        s(&o),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = fs::read(&o).unwrap();
    // tEXt may not carry control characters: the parameters travel in iTXt.
    assert!(!bytes.windows(4).any(|w| w == b"tEXt"));
    assert!(bytes.windows(4).any(|w| w == b"iTXt"));
}

#[test]
fn a_resumed_run_records_images_whose_manifest_line_was_lost() {
    let d = scratch("manifest");
    let jobs = d.join("jobs.jsonl");
    fs::write(
        &jobs,
        "{\"prompt\": \"a cat\", \"seed\": 3}\n{\"prompt\": \"a dog\", \"seed\": 4}\n",
    )
    .unwrap();
    let manifest = d.join("m.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "batch",
            s(&jobs),
            "--model",
            "tiny-sd15",
            "--steps",
            "2",
            "--no-key",
            "--out",
        ];
        let out = d.join("{index}.png");
        let out = s(&out).to_string();
        let m = s(&manifest).to_string();
        args.push(&out);
        args.extend_from_slice(&["--manifest", &m]);
        args.extend_from_slice(extra);
        tkg(&args)
    };
    let first = run(&[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let lines: Vec<String> = fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 2);
    // As if the run had died between image 1 and its manifest line.
    fs::write(&manifest, format!("{}\n", lines[0])).unwrap();
    let second = run(&["--skip-existing"]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let text = fs::read_to_string(&manifest).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{text}");
    let want: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    let got = &records[1];
    assert_eq!(got["recovered"], true);
    for k in [
        "path",
        "seed",
        "prompt",
        "steps",
        "width",
        "height",
        "command",
        "parameters",
    ] {
        assert_eq!(got[k], want[k], "{k}");
    }
    // A third run has nothing to add.
    let third = run(&["--skip-existing"]);
    assert!(third.status.success());
    assert_eq!(fs::read_to_string(&manifest).unwrap(), text);
}

#[test]
fn errors_name_the_file() {
    let d = scratch("names-in-errors");
    let img = d.join("in.png");
    let px: Vec<u8> = [0u8, 200, 0].repeat(16);
    let mut enc = png::Encoder::new(
        std::io::BufWriter::new(fs::File::create(&img).unwrap()),
        4,
        4,
    );
    enc.set_color(png::ColorType::Rgb);
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&px).unwrap();
    w.finish().unwrap();
    let bg = d.join("bg");
    fs::create_dir(&bg).unwrap();
    let out = d.join("out.png");
    let r = tkg(&["key", s(&img), "--out", s(&out), "--composite", s(&bg)]);
    assert_fails(&r, s(&bg));
    // A folder given as the image to key.
    assert_fails(&tkg(&["key", s(&bg), "--out", s(&out)]), s(&bg));
}

#[test]
fn sdxl_only_settings_are_refused_on_sd15() {
    let d = scratch("sdxl-only");
    let o = d.join("o.png");
    assert_fails(&generate(&o, &["--original-size", "1024x1024"]), "SDXL");
    assert_eq!(names(&d), Vec::<String>::new());
}

/// Through the library: a decode that would not fit in the memory the caller says is free
/// is refused before any work.
#[test]
fn sizes_that_do_not_fit_in_memory_are_refused_up_front() {
    use std::sync::atomic::AtomicBool;
    use tkg::run::{EventLog, JobFile, Plan, RunConfig, Runner};
    let d = scratch("memory");
    let settings = tkg::settings::Settings {
        model_dir: Some(cli::hf_home().join("hub/tkg--builtin--tiny-sd15")),
        prompt: "a red car".into(),
        steps: Some(2),
        width: Some(512),
        height: Some(512),
        out: d.join("o.png").display().to_string(),
        ..Default::default()
    };
    let config = RunConfig {
        device: "cpu".into(),
        memory_available: Some(1 << 20),
        ..RunConfig::default()
    };
    let plan = Plan::new(&JobFile::command_line(), &settings, 1, "", &config).unwrap();
    let log = EventLog::default();
    let cancel = AtomicBool::new(false);
    let runner = Runner {
        config: &config,
        events: &log,
        cancel: &cancel,
    };
    let err = format!("{:#}", runner.run(&plan).unwrap_err());
    assert!(
        err.contains("512x512 needs about") && err.contains("GiB are free"),
        "{err}"
    );
    assert_eq!(names(&d), Vec::<String>::new());
}

/// A NaN in the UNet's attention weights: once it slipped through the softmax's exp and made
/// a wrong image with exit 0; now it is an error naming the stage.
#[test]
fn a_nan_weight_is_an_error_not_an_image() {
    let d = scratch("nan-weight");
    let model = d.join("model");
    let src = cli::hf_home().join("hub/tkg--builtin--tiny-sd15");
    let copy = std::process::Command::new("cp")
        .args(["-r", s(&src), s(&model)])
        .status()
        .unwrap();
    assert!(copy.success());
    let file = model.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let target = st
        .names()
        .into_iter()
        .find(|n| n.contains("attn1.to_q.weight"))
        .expect("an attention weight")
        .to_string();
    let tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut data = view.data().to_vec();
            if name == target {
                // One NaN of whatever float type the file holds.
                match view.dtype() {
                    safetensors::Dtype::F32 => data[..4].copy_from_slice(&f32::NAN.to_le_bytes()),
                    safetensors::Dtype::F16 | safetensors::Dtype::BF16 => {
                        data[..2].copy_from_slice(&[0xff, 0x7f])
                    }
                    other => panic!("unexpected dtype {other:?}"),
                }
            }
            (name, view.dtype(), view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, dt, sh, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, sh.clone(), b).unwrap(),
            )
        })
        .collect();
    fs::write(&file, safetensors::serialize(views, None).unwrap()).unwrap();
    let o = d.join("o.png");
    let out = tkg(&[
        "generate",
        "--model-dir",
        s(&model),
        "--prompt",
        "a red car",
        "--seed",
        "1",
        "--steps",
        "2",
        "--out",
        s(&o),
    ]);
    assert_fails(&out, "NaN");
    assert!(!o.exists());
}

mod fuzz {
    use proptest::prelude::*;
    use tkg::metadata::{Parameters, Recipe};
    use tkg::run::template::{Fields, Template};
    use tkg::run::{JobFile, Shard};
    use tkg::settings::{Offset, Settings, SettingsPatch, Size};

    /// JSON-ish text: job lines are mostly objects with known keys and odd values.
    fn job_line() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "prompt",
            "negative_prompt",
            "seed",
            "num_images",
            "steps",
            "guidance",
            "width",
            "height",
            "color",
            "shift",
            "method",
            "out",
            "save_latents",
            "model",
            "lora",
            "subject_center",
            "mask_sigma",
            "clip_skip",
            "rng",
            "original_size",
            "bogus",
        ]);
        let value = prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| format!("{v:e}")),
            "\\PC{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just("null".to_string()),
            Just("[1, \"x\", {}]".to_string()),
            Just("1e400".to_string()),
            Just("18446744073709551616".to_string()),
        ];
        prop_oneof![
            prop::collection::vec((key, value), 0..6).prop_map(|kv| {
                let body: Vec<String> = kv.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
                format!("{{{}}}", body.join(", "))
            }),
            "\\PC{0,40}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn job_lines_never_panic(lines in prop::collection::vec(job_line(), 1..6)) {
            let text = lines.join("\n");
            let _ = SettingsPatch::from_json(&lines[0]);
            if let Ok(jobs) = JobFile::jsonl("jobs.jsonl", &text) {
                let base = Settings { prompt: "base".into(), ..Settings::default() };
                let _ = tkg::run::plan::expand(&jobs, &base, 0, "2026-12-01");
            }
        }

        #[test]
        fn parameters_text_never_panics(text in "\\PC{0,200}", tail in "[A-Za-z ]{1,8}: [^,\\n]{0,8}(, [A-Za-z ]{1,8}: [^,\\n]{0,8}){2,8}") {
            for t in [text.clone(), format!("{text}\n{tail}"), format!("{text}\nNegative prompt: {text}\n{tail}")] {
                if let Ok(p) = Parameters::parse(&t) {
                    let _ = Recipe::from_parameters(&p);
                    // What parses, prints and parses back the same.
                    let again = Parameters::parse(&p.to_string()).unwrap();
                    prop_assert_eq!(again.prompt, p.prompt);
                }
            }
        }

        #[test]
        fn small_parsers_never_panic(s in "\\PC{0,24}") {
            let _ = Template::parse(&s).map(|t| t.render(&Fields {
                index: usize::MAX, seed: u64::MAX, prompt: &s, color: Some(&tkg::color::KeyColor::green()),
                model: &s, date: "", image: 0, line: 0,
            }));
            let _ = Shard::parse(&s);
            let _ = tkg::color::KeyColor::parse(&s);
            let _ = tkg::settings::ColorChoice::parse(&s);
            let _ = tkg::settings::parse_colors(&s);
            let _ = Size::parse(&s);
            let _ = Offset::parse(&s);
            let _ = tkg::settings::parse_center(&s);
        }
    }
}

#[test]
fn a_long_prompt_is_quoted_by_its_start_only() {
    let d = scratch("long-prompt");
    let o = d.join("o.png");
    let prompt = "a red car on a green screen ".repeat(400);
    let out = tkg(&[
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        &prompt,
        "--seed",
        "1",
        "--steps",
        "2",
        "--no-key",
        "--out",
        s(&o),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let warning = err
        .lines()
        .find(|l| l.contains("this part was dropped"))
        .unwrap_or_else(|| panic!("no truncation warning in: {err}"));
    assert!(
        warning.len() < 300,
        "{} characters: {warning}",
        warning.len()
    );
    assert!(warning.contains("more characters"), "{warning}");
}
