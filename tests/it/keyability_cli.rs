//! Keyability on the real binary and the tiny model: the report in the PNG, the manifest,
//! `tkg key --report` and `tkg info`; `--best-of`, `--min-keyability` with `--retries`, and
//! `--color auto`; their bad input.

use crate::common::cli::{assert_fails, assert_ok, command, s, scratch, tkg};
use serde_json::Value;
use std::fs;
use std::path::Path;

fn generate(dir: &Path, name: &str, extra: &[&str]) -> std::process::Output {
    let out = dir.join(name);
    let manifest = dir.join(format!("{name}.jsonl"));
    let mut args = vec![
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "a red vintage car",
        "--steps",
        "6",
        "--out",
        s(&out),
        "--manifest",
        s(&manifest),
    ];
    args.extend_from_slice(extra);
    tkg(&args)
}

fn manifest(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The keyability score recorded in a PNG, through `tkg info --json`.
fn png_score(path: &Path) -> f64 {
    let out = tkg(&["info", s(path), "--json"]);
    assert_ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["keyability"]["score"].as_f64().unwrap()
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgba8().into_raw()
}

#[test]
fn best_of_keeps_the_seed_whose_key_scores_best() {
    let d = scratch("best-of");
    assert_ok(&generate(
        &d,
        "car.png",
        &["--seed", "42", "--best-of", "4", "--keep", "all"],
    ));
    let m = manifest(&d.join("car.png.jsonl"));
    assert_eq!(m.len(), 1);
    let tries = m[0]["tries"].as_array().unwrap();
    let seeds: Vec<u64> = tries.iter().map(|t| t["seed"].as_u64().unwrap()).collect();
    assert_eq!(seeds, [42, 43, 44, 45]);
    // Each seed made on its own, and its score read from its own PNG.
    let alone: Vec<f64> = (42..46)
        .map(|seed| {
            let name = format!("alone-{seed}.png");
            assert_ok(&generate(&d, &name, &["--seed", &seed.to_string()]));
            png_score(&d.join(name))
        })
        .collect();
    for (t, a) in tries.iter().zip(&alone) {
        assert!(
            (t["score"].as_f64().unwrap() - a).abs() < 0.05,
            "{t} vs {a}"
        );
    }
    let mut best = 0;
    for (i, &a) in alone.iter().enumerate() {
        if a > alone[best] + 0.05 {
            best = i;
        }
    }
    let chosen = m[0]["chosen_try"].as_u64().unwrap() as usize;
    assert!(
        (alone[chosen] - alone[best]).abs() < 0.05,
        "chose try {chosen} ({alone:?})"
    );
    assert_eq!(m[0]["seed"].as_u64(), Some(42 + chosen as u64));
    assert_eq!(
        pixels(&d.join("car.png")),
        pixels(&d.join(format!("alone-{}.png", 42 + chosen)))
    );
    // --keep all: every try with its keyed outputs; the image is the chosen try.
    for t in 0..4 {
        for suffix in ["", ".matte", ".cutout"] {
            let p = d.join(format!("car.try{t}{suffix}.png"));
            assert!(p.is_file(), "{}", p.display());
        }
    }
    assert_eq!(
        pixels(&d.join("car.png")),
        pixels(&d.join(format!("car.try{chosen}.png")))
    );
    // The PNG's parameters name the chosen seed, so `tkg info`'s command remakes it.
    let info = tkg(&["info", s(&d.join("car.png"))]);
    let text = String::from_utf8_lossy(&info.stdout);
    assert!(text.contains(&format!("--seed {}", 42 + chosen)), "{text}");
    assert!(text.contains("Keyability"), "{text}");
    // Without --overwrite a second run clobbers nothing.
    let again = generate(
        &d,
        "car.png",
        &["--seed", "42", "--best-of", "4", "--keep", "all"],
    );
    assert_fails(&again, "exist");
}

#[test]
fn batch_retries_until_the_bar_and_records_the_tries() {
    let d = scratch("retries");
    let jobs = d.join("jobs.jsonl");
    fs::write(
        &jobs,
        "{\"prompt\": \"a watch\", \"seed\": 7, \"min_keyability\": 100, \"retries\": 2}\n\
         {\"prompt\": \"a pack\", \"seed\": 9, \"min_keyability\": 0, \"retries\": 3}\n",
    )
    .unwrap();
    let out = tkg(&[
        "batch",
        s(&jobs),
        "--model",
        "tiny-sd15",
        "--steps",
        "4",
        "--out",
        s(&d.join("{index}.png")),
        "--manifest",
        s(&d.join("m.jsonl")),
    ]);
    assert_ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("below --min-keyability 100"), "{err}");
    let m = manifest(&d.join("m.jsonl"));
    let by_index = |i: u64| m.iter().find(|r| r["index"].as_u64() == Some(i)).unwrap();
    let unmet = by_index(0);
    let seeds: Vec<u64> = unmet["tries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds, [7, 8, 9], "1 + 2 retries");
    assert_eq!(unmet["min_keyability_passed"], Value::Bool(false));
    let met = by_index(1);
    assert_eq!(
        met["tries"].as_array().unwrap().len(),
        1,
        "the bar 0 passes at once"
    );
    assert_eq!(met["min_keyability_passed"], Value::Bool(true));
    assert_eq!(met["seed"].as_u64(), Some(9));
    let score = met["key"]["keyability"]["score"].as_f64().unwrap();
    assert!((png_score(&d.join("1.png")) - score).abs() < 0.05);
}

#[test]
fn color_auto_takes_the_colour_whose_preview_keys_best() {
    let d = scratch("auto");
    assert_ok(&generate(
        &d,
        "c.png",
        &[
            "--seed",
            "3",
            "--color",
            "auto",
            "--colors",
            "green,blue,#ff00ff",
        ],
    ));
    let m = manifest(&d.join("c.png.jsonl"));
    let previews = m[0]["color_previews"].as_array().unwrap();
    let names: Vec<&str> = previews
        .iter()
        .map(|p| p["color"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["green", "blue", "#ff00ff"]);
    let scores: Vec<f64> = previews
        .iter()
        .map(|p| p["score"].as_f64().unwrap())
        .collect();
    let mut best = 0;
    for (i, &v) in scores.iter().enumerate() {
        if v > scores[best] {
            best = i;
        }
    }
    assert_eq!(m[0]["color"].as_str(), Some(names[best]), "{previews:?}");
    // The image is what that colour makes on its own.
    assert_ok(&generate(
        &d,
        "fixed.png",
        &["--seed", "3", "--color", names[best]],
    ));
    assert_eq!(pixels(&d.join("c.png")), pixels(&d.join("fixed.png")));
}

#[test]
fn key_report_is_written_atomically_and_read_back_by_info() {
    let d = scratch("key-report");
    assert_ok(&generate(&d, "g.png", &["--seed", "1", "--no-key"]));
    let report = d.join("r.json");
    let (image, out) = (d.join("g.png"), d.join("k.png"));
    let key = || tkg(&["key", s(&image), "--out", s(&out), "--report", s(&report)]);
    assert_ok(&key());
    let v: Value = serde_json::from_str(&fs::read_to_string(&report).unwrap()).unwrap();
    let k = &v["keyability"];
    let score = k["score"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&score), "{v}");
    for part in [
        "border_screen",
        "plate_residual",
        "entanglement",
        "ambiguous",
        "spill",
    ] {
        assert!(k[part].is_number(), "{part} in {v}");
    }
    // The cut-out carries the same report.
    assert!((png_score(&d.join("k.cutout.png")) - score).abs() < 0.05);
    // No clobbering: the report exists.
    fs::remove_file(d.join("k.matte.png")).unwrap();
    fs::remove_file(d.join("k.cutout.png")).unwrap();
    assert_fails(&key(), "exist");
    assert!(
        !d.join("k.matte.png").exists(),
        "nothing written on refusal"
    );
}

#[test]
fn bad_selection_input_gets_one_line() {
    let d = scratch("bad-select");
    for (extra, needle) in [
        (&["--best-of", "0"][..], "--best-of must be at least 1"),
        (&["--best-of", "40"][..], "at most 32"),
        (
            &["--color", "auto", "--colors", "green,nope"][..],
            "--colors",
        ),
        (&["--colors", "green,blue"][..], "--color auto"),
        (&["--color", "auto", "--colors", "green,green"][..], "twice"),
        (&["--min-keyability", "101"][..], "0 to 100"),
        (&["--min-keyability", "-1"][..], "0 to 100"),
        (&["--retries", "2"][..], "give --min-keyability"),
        (&["--best-of", "2", "--no-key"][..], "need keying"),
        (&["--keep", "some"][..], "best or all"),
    ] {
        let mut args = vec!["--seed", "1"];
        args.extend_from_slice(extra);
        let out = generate(&d, "x.png", &args);
        assert_fails(&out, needle);
        assert!(!d.join("x.png").exists(), "{extra:?} wrote an image");
    }
    let jobs = d.join("jobs.jsonl");
    fs::write(&jobs, "{\"prompt\": \"a\", \"colors\": [\"green\"]}\n").unwrap();
    let out = tkg(&["batch", s(&jobs), "--model", "tiny-sd15", "--dry-run"]);
    assert_fails(&out, "colors");
    fs::write(&jobs, "{\"prompt\": \"a\", \"best_of\": 0}\n").unwrap();
    let out = tkg(&["batch", s(&jobs), "--model", "tiny-sd15", "--dry-run"]);
    assert_fails(&out, "best_of");
}

#[test]
fn a_try_that_cannot_be_written_fails_its_image_alone() {
    use std::io::BufRead;
    let d = scratch("try-fails-alone");
    let jobs = d.join("jobs.jsonl");
    fs::write(
        &jobs,
        "{\"prompt\": \"a watch\", \"seed\": 7, \"best_of\": 2, \"keep\": \"all\"}\n\
         {\"prompt\": \"a pack\", \"seed\": 9, \"best_of\": 2, \"keep\": \"all\"}\n",
    )
    .unwrap();
    let mut child = command(&[
        "batch",
        s(&jobs),
        "--model",
        "tiny-sd15",
        "--steps",
        "16",
        "--batch-size",
        "2",
        "--out",
        s(&d.join("{index}.png")),
        "--manifest",
        s(&d.join("m.jsonl")),
        "--progress",
        "json",
    ])
    .stderr(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .spawn()
    .unwrap();
    // Once the first round is keyed, image 0's second try finds its file taken: another
    // process made it after planning (the plan refuses one that exists at the start). The
    // second round's 16 steps are the time the file has to appear.
    let taken = d.join("0.try1.png");
    let mut stderr = String::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("\"try\"") && !taken.exists() {
            fs::write(&taken, b"precious").unwrap();
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("--overwrite"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(fs::read(&taken).unwrap(), b"precious");
    assert!(!d.join("0.png").exists());
    let m = manifest(&d.join("m.jsonl"));
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["index"].as_u64(), Some(1));
    assert_eq!(m[0]["tries"].as_array().unwrap().len(), 2);
    assert!(d.join("1.png").exists() && d.join("1.try1.png").exists());
}
