//! Hostile input through the CLI: PNG text chunks carrying terminal escapes (`tkg info`),
//! model folders that cannot be created (`tkg models materialize`), a Hub cache whose
//! snapshot links dangle and a registry family that the model's configs contradict
//! (`tkg models list`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TKG: &str = env!("CARGO_BIN_EXE_tkg");

/// A scratch folder of this test, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("tkg-hostile-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// tkg with its environment confined to `dir`: its own HF cache and home, no user
/// models.toml, offline.
fn tkg(dir: &Path, args: &[&str]) -> Output {
    Command::new(TKG)
        .args(args)
        .current_dir(dir)
        .env("HF_HOME", dir.join("hf"))
        .env("HF_HUB_CACHE", dir.join("hub"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HOME", dir.join("home"))
        .env("XDG_CONFIG_HOME", dir.join("xdg"))
        .env_remove("TKG_MODELS")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A 1×1 PNG with these text chunks: tEXt where Latin-1 holds the text, else iTXt.
fn write_png(path: &Path, chunks: &[(&str, &str)]) {
    let file = fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 1, 1);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in chunks {
        if v.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk(k.to_string(), v.to_string()).unwrap();
        } else {
            enc.add_itxt_chunk(k.to_string(), v.to_string()).unwrap();
        }
    }
    let mut w = enc.write_header().unwrap();
    w.write_image_data(&[0, 255, 0]).unwrap();
    w.finish().unwrap();
}

/// The first C0 (but `\n`, `\t`), DEL or C1 control in `bytes`, read as UTF-8.
fn raw_control(bytes: &[u8]) -> Option<char> {
    String::from_utf8_lossy(bytes)
        .chars()
        .find(|c| c.is_control() && *c != '\n' && *c != '\t')
}

const CLEAR: &str = "\u{1b}[2J";
const TITLE: &str = "\u{1b}]0;owned\u{7}";
const CSI_C1: &str = "\u{9b}31m";

/// `parameters` text whose prompt, negative prompt and values carry escapes but still make
/// a recipe.
fn hostile_parameters(extra: &str) -> String {
    format!(
        "a cat{CLEAR}{TITLE}\r\u{7f}{CSI_C1}\nsecond line\tok\nNegative prompt: dark{TITLE}\n\
         Steps: 4, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64, \
         Model: m{CLEAR}, Note: \"x{CSI_C1}\"{extra}"
    )
}

#[test]
fn info_prints_no_raw_controls_from_the_png() {
    let s = Scratch::new("info");
    let latin1 = hostile_parameters("");
    // A non-Latin-1 character forces iTXt, the other text chunk kind.
    let utf8 = hostile_parameters(", Comment: 猫");
    for (name, text) in [("latin1.png", &latin1), ("utf8.png", &utf8)] {
        write_png(&s.0.join(name), &[("parameters", text)]);

        let out = tkg(&s.0, &["info", name]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert_eq!(raw_control(&out.stdout), None, "{name}: stdout");
        assert_eq!(raw_control(&out.stderr), None, "{name}: stderr");
        let shown = String::from_utf8(out.stdout.clone()).unwrap();
        for needle in [
            "Prompt: a cat\\x1b[2J\\x1b]0;owned\\x07\\x0d\\x7f\\u{9b}31m",
            // Line breaks and tabs are layout, kept as they are.
            "\nsecond line\tok\n",
            "Negative prompt: dark\\x1b]0;owned\\x07",
            "Model: m\\x1b[2J",
            "Note: x\\u{9b}31m",
            "tkg generate --prompt ",
        ] {
            assert!(
                shown.contains(needle),
                "{name}: {needle:?} not in {shown:?}"
            );
        }
        // The command cannot carry the controls: the user is told.
        assert!(
            stderr(&out).contains("control characters"),
            "{}",
            stderr(&out)
        );

        let out = tkg(&s.0, &["info", "--json", name]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert_eq!(raw_control(&out.stdout), None, "{name}: json");
        // Escaping keeps the JSON values: they read back as the chunk's text.
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let prompt = text.split("\nNegative prompt:").next().unwrap();
        assert_eq!(v["prompt"], prompt);
        assert_eq!(v["negative_prompt"], format!("dark{TITLE}"));
        assert_eq!(v["settings"]["Model"], format!("m{CLEAR}"));
        assert_eq!(v["settings"]["Note"], format!("x{CSI_C1}"));
    }
}

#[test]
fn info_errors_quote_the_png_safely() {
    let s = Scratch::new("info-error");
    let text = format!("a cat\nSteps: 4, CFG scale: 7, Seed: 1{TITLE}, Size: 64x64, Model: m");
    write_png(&s.0.join("bad.png"), &[("parameters", &text)]);
    for args in [&["info", "bad.png"][..], &["info", "--json", "bad.png"]] {
        let out = tkg(&s.0, args);
        assert_eq!(raw_control(&out.stdout), None, "{args:?}: stdout");
        assert_eq!(raw_control(&out.stderr), None, "{args:?}: stderr");
    }
    let out = tkg(&s.0, &["info", "bad.png"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("Seed '1\\x1b]0;owned\\x07'"), "{err}");
}

/// The one `error:` line of a failed command.
fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", stderr(out));
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    lines[0].to_string()
}

#[test]
fn materialize_errors_name_the_folder() {
    let s = Scratch::new("materialize");
    fs::write(s.0.join("plain"), "a file").unwrap();
    for (dir, cause) in [
        ("plain", "a file of that name exists"),
        ("plain/m", "plain is a file, not a folder"),
        ("plain/a/b", "plain is a file, not a folder"),
    ] {
        let line = error_line(&tkg(&s.0, &["models", "materialize", "tiny-sd15", dir]));
        assert!(
            line.contains(&format!("cannot create {dir}: {cause}")),
            "{line}"
        );
        assert!(!line.contains("os error"), "{line}");
    }

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = s.0.join("ro");
        fs::create_dir(&ro).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        // Root writes anyway: then there is nothing to refuse.
        let writable = fs::write(ro.join("probe"), "x").is_ok();
        if writable {
            eprintln!("skipping the unwritable-folder case: this user can write into {ro:?}");
        } else {
            let line = error_line(&tkg(&s.0, &["models", "materialize", "tiny-sd15", "ro/m"]));
            assert!(line.contains("cannot create ro/m: "), "{line}");
            assert!(line.to_lowercase().contains("permission denied"), "{line}");
        }
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(fs::read_dir(&ro).unwrap().count(), usize::from(writable));
    }
}

/// The CACHED column of `name` in `tkg models list`.
fn cached(dir: &Path, name: &str, extra: &[&str]) -> String {
    let mut args = vec!["models", "list"];
    args.extend(extra);
    let out = tkg(dir, &args);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .split_whitespace()
        .collect();
    row[2].to_string()
}

/// An SD1.5 pipeline's files, as the Hub cache holds them: snapshot links into `blobs/`.
#[cfg(unix)]
fn fake_hub_repo(cache: &Path, repo: &str) -> PathBuf {
    let files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    ];
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let sha = "0123456789abcdef0123456789abcdef01234567";
    fs::create_dir_all(repo_dir.join("refs")).unwrap();
    fs::write(repo_dir.join("refs/main"), sha).unwrap();
    fs::create_dir_all(repo_dir.join("blobs")).unwrap();
    let snap = repo_dir.join("snapshots").join(sha);
    for (i, f) in files.iter().enumerate() {
        fs::write(repo_dir.join(format!("blobs/b{i}")), "{}").unwrap();
        let link = snap.join(f);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        let up = "../".repeat(f.matches('/').count() + 2);
        std::os::unix::fs::symlink(format!("{up}blobs/b{i}"), &link).unwrap();
    }
    repo_dir
}

#[cfg(unix)]
#[test]
fn list_does_not_count_dangling_hub_links_as_cached() {
    let s = Scratch::new("dangling");
    let repo = fake_hub_repo(
        &s.0.join("hub"),
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
    );
    assert_eq!(cached(&s.0, "sd15", &[]), "yes");
    assert_eq!(cached(&s.0, "sdxl", &[]), "no");
    // The weights' blob goes (the link stays): the model cannot be used offline.
    fs::remove_file(repo.join("blobs/b2")).unwrap();
    assert_eq!(cached(&s.0, "sd15", &[]), "no");
    fs::write(repo.join("blobs/b2"), "{}").unwrap();
    assert_eq!(cached(&s.0, "sd15", &[]), "yes");
    // So does model_index.json's, the snapshot's marker.
    fs::remove_file(repo.join("blobs/b0")).unwrap();
    assert_eq!(cached(&s.0, "sd15", &[]), "no");
}

#[test]
fn list_warns_when_a_folder_is_not_its_registry_family() {
    let s = Scratch::new("family");
    let out = tkg(&s.0, &["models", "materialize", "tiny-sd15", "m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    fs::write(
        s.0.join("models.toml"),
        "[models.right]\nfamily = \"sd15\"\ndir = \"m\"\n\
         [models.wrong]\nfamily = \"sdxl\"\ndir = \"m\"\n",
    )
    .unwrap();
    let out = tkg(&s.0, &["models", "list", "--models-file", "models.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    for needle in ["`wrong`", "listed as sdxl", "sd15 model", "models.toml"] {
        assert!(warnings[0].contains(needle), "{needle}: {err}");
    }
    let extra = ["--models-file", "models.toml"];
    assert_eq!(cached(&s.0, "right", &extra), "yes");
    // An SDXL model needs a second text tower, which this folder lacks.
    assert_eq!(cached(&s.0, "wrong", &extra), "no");
}
