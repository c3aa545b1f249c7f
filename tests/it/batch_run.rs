//! `tkg batch` end to end on the built-in tiny model: shards, an interrupted shard resumed
//! with --skip-existing, byte-identity with an unsharded (and batched) run, manifests,
//! validation before work, and `tkg info` round trips.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const TKG: &str = env!("CARGO_BIN_EXE_tkg");

/// A scratch folder with its own HF_HOME (the tiny model materialises itself there).
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tkg-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("hf")).unwrap();
    d
}

fn tkg(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(TKG);
    c.args(args)
        .current_dir(dir)
        .env("HF_HOME", dir.join("hf"))
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX");
    c
}

fn ok(out: Output) -> Output {
    crate::common::cli::assert_ok(&out);
    out
}

/// 20 jobs with different prompts, colours, methods, seeds and guidance.
fn jobs_file(dir: &Path) -> PathBuf {
    let colors = ["green", "blue", "magenta", "#ff8000"];
    let methods = ["tkg", "tkg", "prompt", "plain"];
    let mut text = String::from("# 20 jobs\n");
    for i in 0..20 {
        let mut job = serde_json::json!({
            "prompt": format!("a small red car number {i}"),
            "color": colors[i % 4],
            "method": methods[(i / 4) % 4],
        });
        if i % 3 != 0 {
            job["seed"] = serde_json::json!(1000 + i * 7);
        }
        if i % 5 == 1 {
            job["guidance"] = serde_json::json!(1.0);
        }
        if i % 7 == 2 {
            job["negative_prompt"] = serde_json::json!("blurry, low quality");
        }
        text.push_str(&job.to_string());
        text.push('\n');
    }
    let p = dir.join("jobs.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

const COMMON: [&str; 6] = ["--model", "tiny-sd15", "--steps", "6", "--seed", "77"];
const OUT: &str = "out/{index:03}-{slug}-{seed}.png";

/// Every file under `dir/out`, name → bytes.
fn outputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir.join("out")) else {
        return m;
    };
    for e in rd {
        let e = e.unwrap();
        m.insert(
            e.file_name().to_string_lossy().into_owned(),
            std::fs::read(e.path()).unwrap(),
        );
    }
    m
}

fn manifest_lines(path: &Path) -> Vec<serde_json::Value> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return vec![];
    };
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad manifest line {l}: {e}")))
        .collect()
}

fn png_pixels(bytes: &[u8]) -> Vec<u8> {
    let mut r = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

#[test]
fn sharded_interrupted_resumed_run_equals_one_batched_run() {
    // The reference: one unsharded run, 4 images per UNet call.
    let whole = scratch("whole");
    let jobs = jobs_file(&whole);
    let j = jobs.to_str().unwrap();
    let mut args = vec![
        "batch",
        j,
        "--out",
        OUT,
        "--batch-size",
        "4",
        "--manifest",
        "m.jsonl",
    ];
    args.extend(COMMON);
    ok(tkg(&whole, &args).output().unwrap());
    let reference = outputs(&whole);
    assert_eq!(reference.len(), 60, "20 images x (image, matte, cutout)");
    let lines = manifest_lines(&whole.join("m.jsonl"));
    assert_eq!(lines.len(), 20);
    for l in &lines {
        let path = l["path"].as_str().unwrap();
        assert!(whole.join(path).is_file(), "{path}");
        assert_eq!(l["paths"].as_array().unwrap().len(), 3);
        assert!(l["seed"].as_u64().is_some() && l["steps"] == 6);
        assert!(l["timings"]["total_s"].as_f64().unwrap() > 0.0);
        let bg = l["key"]["background_fraction"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&bg));
        assert!(l["key"]["screen"].as_str().unwrap().starts_with('#'));
        assert!(l["key"]["confidence"].as_f64().is_some());
        assert!(l["parameters"].as_str().unwrap().contains("Seed: "));
    }
    // Jobs without a seed got --seed + their index.
    let by_index: BTreeMap<u64, &serde_json::Value> = lines
        .iter()
        .map(|l| (l["index"].as_u64().unwrap(), l))
        .collect();
    assert_eq!(by_index[&3]["seed"], 80);
    assert_eq!(by_index[&4]["seed"], 1028);

    // The same jobs as two shards: shard 0 is interrupted half-way.
    let split = scratch("split");
    let jobs = jobs_file(&split);
    let j = jobs.to_str().unwrap();
    let shard_args = |shard: &'static str, extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = ["batch", j, "--out", OUT, "--shard", shard]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(COMMON.iter().map(|s| s.to_string()));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a0 = shard_args("0/2", &["--progress", "json", "--manifest", "m0.jsonl"]);
    let a0: Vec<&str> = a0.iter().map(String::as_str).collect();
    let mut child = tkg(&split, &a0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut images_seen = 0;
    let mut events = Vec::new();
    let mut sent = false;
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            if v["event"] == "image" {
                images_seen += 1;
            }
            // Interrupt early in the 5th image's denoising.
            if !sent && images_seen == 4 && v["event"] == "step" && v["step"] == 1 {
                Command::new("kill")
                    .args(["-INT", &child.id().to_string()])
                    .status()
                    .unwrap();
                sent = true;
            }
            events.push(v);
        }
    }
    let status = child.wait().unwrap();
    assert!(sent, "never got to the 5th image: {events:?}");
    assert_eq!(
        status.code(),
        Some(130),
        "an interrupted run exits with 130"
    );
    assert!(events.iter().any(|e| e["event"] == "interrupted"));
    // The signal lands during the 5th image, or (on a loaded machine, where the events are
    // read late) a later one: whatever finished before it is whole, and nothing of the image
    // it cut short is there.
    let finished = events.iter().filter(|e| e["event"] == "image").count();
    assert!(
        (4..10).contains(&finished),
        "{finished} images before the interrupt"
    );
    let partial = outputs(&split);
    assert_eq!(
        partial.len(),
        finished * 3,
        "{finished} whole images, nothing of the next"
    );
    for (name, bytes) in &partial {
        assert_eq!(Some(bytes), reference.get(name), "{name}");
    }
    assert_eq!(manifest_lines(&split.join("m0.jsonl")).len(), finished);

    // Shard 1 runs whole; then both rerun with --skip-existing.
    let a1 = shard_args("1/2", &["--batch-size", "3", "--manifest", "m1.jsonl"]);
    let a1: Vec<&str> = a1.iter().map(String::as_str).collect();
    ok(tkg(&split, &a1).output().unwrap());
    let r0 = shard_args("0/2", &["--skip-existing", "--manifest", "m0.jsonl"]);
    let r0: Vec<&str> = r0.iter().map(String::as_str).collect();
    ok(tkg(&split, &r0).output().unwrap());
    let r1 = shard_args("1/2", &["--skip-existing", "--manifest", "m1.jsonl"]);
    let r1: Vec<&str> = r1.iter().map(String::as_str).collect();
    let again = ok(tkg(&split, &r1).output().unwrap());
    assert!(again.stdout.is_empty(), "nothing left to do for shard 1");

    let result = outputs(&split);
    let names: Vec<&String> = result.keys().collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains("tkg-tmp") || n.starts_with('.')),
        "temporary files left: {names:?}"
    );
    assert_eq!(
        result.keys().collect::<Vec<_>>(),
        reference.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &reference {
        assert!(
            result[name] == *bytes,
            "{name} differs from the unsharded run"
        );
    }
    // Every image is in exactly one manifest line across the shards' runs.
    let mut indices: Vec<u64> = manifest_lines(&split.join("m0.jsonl"))
        .into_iter()
        .chain(manifest_lines(&split.join("m1.jsonl")))
        .map(|l| l["index"].as_u64().unwrap())
        .collect();
    indices.sort();
    assert_eq!(indices, (0..20).collect::<Vec<u64>>());
    for l in manifest_lines(&split.join("m0.jsonl")) {
        assert_eq!(l["index"].as_u64().unwrap() % 2, 0);
        assert_eq!(l["shard"], "0/2");
    }
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&split);
}

#[test]
fn batch_size_four_gives_the_pixels_of_batch_size_one() {
    let d = scratch("bs");
    let run_env = |bs: &str, out: &str, fused: bool| {
        let mut c = tkg(&d, &[]);
        if fused {
            c.env("TKG_FUSED_CPU_BATCH", "1");
        }
        ok(c.args([
            "generate",
            "--model",
            "tiny-sd15",
            "--prompt",
            "a blue vase",
            "--seed",
            "5",
            "--steps",
            "5",
            "--num-images",
            "6",
            "--batch-size",
            bs,
            "--no-key",
            "--out",
            out,
        ])
        .output()
        .unwrap())
    };
    let run = |bs: &str, out: &str| run_env(bs, out, false);
    let one = run("1", "b1-{seed}.png");
    let four = run("4", "b4-{seed}.png");
    assert_eq!(String::from_utf8_lossy(&one.stdout).lines().count(), 6);
    assert_eq!(String::from_utf8_lossy(&four.stdout).lines().count(), 6);
    let mut distinct = std::collections::HashSet::new();
    for seed in 5..11 {
        let a = std::fs::read(d.join(format!("b1-{seed}.png"))).unwrap();
        let b = std::fs::read(d.join(format!("b4-{seed}.png"))).unwrap();
        assert!(png_pixels(&a) == png_pixels(&b), "seed {seed}");
        assert_eq!(a, b, "seed {seed}: the files are byte-identical too");
        distinct.insert(png_pixels(&a));
    }
    assert_eq!(distinct.len(), 6, "each seed gives its own image");
    // The shared-UNet batch GPUs use, forced on the CPU: the same images up to rounding.
    run_env("4", "f4-{seed}.png", true);
    for seed in 5..11 {
        let a = png_pixels(&std::fs::read(d.join(format!("b1-{seed}.png"))).unwrap());
        let f = png_pixels(&std::fs::read(d.join(format!("f4-{seed}.png"))).unwrap());
        let worst = a.iter().zip(&f).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(
            worst <= 2,
            "seed {seed}: fused batch differs by {worst} levels"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn info_round_trips_settings_and_its_command_remakes_the_image() {
    let d = scratch("info");
    ok(tkg(
        &d,
        &[
            "generate",
            "--model",
            "tiny-sd15",
            "--prompt",
            "a cat, sitting: \"calm\"",
            "--negative-prompt",
            "blurry, dark",
            "--seed",
            "1234",
            "--steps",
            "4",
            "--guidance",
            "6.5",
            "--color",
            "#3050ff",
            "--shift",
            "0.05",
            "--mask-sigma",
            "0.4",
            "--subject-center",
            "0.25,-0.5",
            "--subject-center",
            "-0.25,0.5",
            "--rng",
            "torch-cuda",
            "--no-key",
            "--out",
            "cat.png",
        ],
    )
    .output()
    .unwrap());
    let out = ok(tkg(&d, &["info", "--json", "cat.png"]).output().unwrap());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt"], "a cat, sitting: \"calm\"");
    assert_eq!(v["negative_prompt"], "blurry, dark");
    let s = &v["settings"];
    assert_eq!(s["Seed"], "1234");
    assert_eq!(s["Steps"], "4");
    assert_eq!(s["CFG scale"], "6.5");
    assert_eq!(s["Size"], "64x64");
    assert_eq!(s["TKG color"], "#3050ff");
    assert_eq!(s["TKG shift"], "0.05");
    assert_eq!(s["TKG sigma"], "0.4");
    assert_eq!(s["TKG center"], "0.25,-0.5;-0.25,0.5");
    assert_eq!(s["RNG"], "NV");
    let command = v["command"].as_str().unwrap();
    assert!(command.starts_with("tkg generate "), "{command}");

    // The text form prints the same command last.
    let text = ok(tkg(&d, &["info", "cat.png"]).output().unwrap());
    let text = String::from_utf8(text.stdout).unwrap();
    assert_eq!(text.lines().last().unwrap(), command);

    // Run it: the same image, byte for byte.
    let cmd = format!("{TKG} {} --no-key", command.strip_prefix("tkg ").unwrap());
    let out = Command::new("sh")
        .args(["-c", &cmd])
        .current_dir(&d)
        .env("HF_HOME", d.join("hf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(d.join("cat.png")).unwrap(),
        std::fs::read(d.join("cat-repro.png")).unwrap()
    );

    // --method prompt stores the prompt it used; info gives back the user's.
    ok(tkg(
        &d,
        &[
            "generate",
            "--model",
            "tiny-sd15",
            "--prompt",
            "a dog",
            "--seed",
            "3",
            "--steps",
            "3",
            "--method",
            "prompt",
            "--color",
            "blue",
            "--no-key",
            "--out",
            "dog.png",
        ],
    )
    .output()
    .unwrap());
    let out = ok(tkg(&d, &["info", "--json", "dog.png"]).output().unwrap());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt"], "a dog isolated on a solid blue background");
    assert!(v["command"].as_str().unwrap().contains("--prompt 'a dog' "));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_jobs_fail_before_any_work() {
    let d = scratch("bad");
    let jobs = d.join("bad.jsonl");
    std::fs::write(
        &jobs,
        "{\"prompt\": \"ok\"}\n{\"prompt\": \"x\", \"steps\": 0}\n{\"promt\": \"typo\"}\n\
         {\"prompt\": \"y\", \"out\": \"{nope}.png\"}\n{\"prompt\": \"z\", \"model\": \"no-such-model\"}\n",
    )
    .unwrap();
    let j = jobs.to_str().unwrap();
    let out = tkg(&d, &["batch", j, "--model", "tiny-sd15", "--dry-run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    for n in [2, 3, 4] {
        assert!(err.contains(&format!("line {n}:")), "{err}");
    }
    assert!(!err.contains("line 1:"), "{err}");

    // Clashing outputs are an error before work; nothing is written.
    std::fs::write(&jobs, "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n").unwrap();
    let out = tkg(
        &d,
        &[
            "batch",
            j,
            "--model",
            "tiny-sd15",
            "--steps",
            "2",
            "--out",
            "same-{model}.png",
        ],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("clash") && err.contains("line 1") && err.contains("line 2"),
        "{err}"
    );
    assert!(!d.join("same-tiny-sd15.png").exists());

    // An unknown model in a later line is found before the first image is made.
    std::fs::write(
        &jobs,
        "{\"prompt\": \"a\"}\n{\"prompt\": \"b\", \"model\": \"nope\"}\n",
    )
    .unwrap();
    let out = tkg(
        &d,
        &[
            "batch",
            j,
            "--model",
            "tiny-sd15",
            "--steps",
            "2",
            "--out",
            "{index}.png",
        ],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
    assert!(!d.join("0.png").exists());

    // A dry run of a good file lists the plan and writes nothing.
    let prompts = d.join("p.txt");
    std::fs::write(&prompts, "a cat\n\n# skipped\na dog\n").unwrap();
    let out = ok(tkg(
        &d,
        &[
            "batch",
            "--prompt-file",
            prompts.to_str().unwrap(),
            "--model",
            "tiny-sd15",
            "--num-images",
            "2",
            "--out",
            "o/{line}-{image}-{slug}.png",
            "--dry-run",
        ],
    )
    .output()
    .unwrap());
    let plan = String::from_utf8(out.stdout).unwrap();
    assert_eq!(plan.lines().count(), 4, "{plan}");
    assert!(plan.contains("o/4-1-a-dog.png"), "{plan}");
    assert!(!d.join("o").exists());

    // --shard auto reads Slurm's variables.
    let out = ok(tkg(
        &d,
        &[
            "batch",
            "--prompt-file",
            prompts.to_str().unwrap(),
            "--model",
            "tiny-sd15",
            "--num-images",
            "2",
            "--out",
            "{index}.png",
            "--dry-run",
            "--shard",
            "auto",
        ],
    )
    .env("SLURM_ARRAY_TASK_ID", "1")
    .env("SLURM_ARRAY_TASK_COUNT", "2")
    .output()
    .unwrap());
    let plan = String::from_utf8(out.stdout).unwrap();
    let idx: Vec<&str> = plan
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(idx, ["1", "3"]);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn completions_and_man_page() {
    let d = scratch("comp");
    for shell in ["bash", "zsh", "fish"] {
        let out = ok(tkg(&d, &["completions", shell]).output().unwrap());
        let s = String::from_utf8(out.stdout).unwrap();
        assert!(
            s.contains("skip-existing") && s.contains("batch"),
            "{shell}"
        );
    }
    let out = ok(tkg(&d, &["man"]).output().unwrap());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains(".TH") && s.contains("tkg"));
    let _ = std::fs::remove_dir_all(&d);
}
