//! Downloads through hf-hub into the HF cache, against a fake Hub on 127.0.0.1: a small HTTP
//! server that answers the repo info API and `resolve/` URLs as huggingface.co does. Only the
//! public API is used (`ModelFolder::hub_in`, `with_endpoint`, ...).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tkg::models::hash::file_sha256_cached;
use tkg::models::hub::ModelFolder;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "tkg-hub-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

struct FakeHub {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

/// Serves repo `repo` at `revision` with `files`, as huggingface.co does for hf-hub:
/// the repo info API and `resolve/` URLs with etag / x-repo-commit / content-range.
/// `status` overrides every answer with an HTTP error status.
fn fake_hub(
    repo: &str,
    revision: &str,
    files: Vec<(String, Vec<u8>)>,
    status: Option<u16>,
) -> FakeHub {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let reqs = requests.clone();
    let info_path = format!("/api/models/{repo}/revision/{revision}");
    let resolve_prefix = format!("/{repo}/resolve/{revision}/");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("range")
                {
                    range = Some(v.trim().to_string());
                }
            }
            reqs.lock().unwrap().push(path.clone());
            let respond = |stream: &mut std::net::TcpStream,
                           code: u16,
                           headers: &[(String, String)],
                           body: &[u8]| {
                let mut head = format!(
                    "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body);
            };
            if let Some(code) = status {
                respond(&mut stream, code, &[], b"{\"error\":\"nope\"}");
            } else if path == info_path {
                let siblings: Vec<_> = files
                    .iter()
                    .map(|(n, _)| serde_json::json!({"rfilename": n}))
                    .collect();
                let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
                respond(&mut stream, 200, &[], body.as_bytes());
            } else if let Some(rel) = path.strip_prefix(&resolve_prefix)
                && let Some((_, bytes)) = files.iter().find(|(n, _)| n == rel)
            {
                let start: usize = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split('-').next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let end = match range.as_deref().and_then(|r| r.split('-').nth(1)) {
                    Some(e) if !e.is_empty() => e.parse::<usize>().unwrap() + 1,
                    _ => bytes.len(),
                }
                .min(bytes.len());
                let etag: String = Sha256::digest(bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let headers = vec![
                    ("ETag".to_string(), format!("\"{etag}\"")),
                    ("X-Repo-Commit".to_string(), COMMIT.to_string()),
                    (
                        "Content-Range".to_string(),
                        format!("bytes {start}-{}/{}", end.max(1) - 1, bytes.len()),
                    ),
                ];
                respond(&mut stream, 206, &headers, &bytes[start..end]);
            } else {
                respond(&mut stream, 404, &[], b"not found");
            }
        }
    });
    FakeHub { url, requests }
}

fn proxy_set() -> bool {
    [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some())
}

/// A notice sink that records what it is told.
fn notice_sink() -> (
    Arc<Mutex<Vec<String>>>,
    impl Fn(&str) + Send + Sync + 'static,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (seen, move |m: &str| s.lock().unwrap().push(m.to_string()))
}

#[test]
fn downloads_into_the_cache_through_hf_hub() {
    if proxy_set() {
        eprintln!("skipped: a proxy is configured, the fake hub on 127.0.0.1 would not be reached");
        return;
    }
    let hub = fake_hub(
        "org/model",
        "main",
        vec![
            (
                "model_index.json".into(),
                b"{\"_class_name\":\"X\"}".to_vec(),
            ),
            ("unet/config.json".into(), b"{\"a\":1}".to_vec()),
            (
                "unet/diffusion_pytorch_model.safetensors".into(),
                vec![7u8; 3000],
            ),
            (
                "unet/diffusion_pytorch_model.fp16.safetensors".into(),
                vec![8u8; 1500],
            ),
            ("vae/diffusion_pytorch_model.bin".into(), b"pickle".to_vec()),
        ],
        None,
    );
    let t = TempDir::new("download");
    let (notices, sink) = notice_sink();
    let f = ModelFolder::hub_in(&t.0, "org/model", "main", false)
        .unwrap()
        .with_endpoint(&hub.url)
        .with_progress(false)
        .with_notices(sink);
    assert!(!f.is_cached());
    let p = f.file("unet/config.json").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"{\"a\":1}");
    let w = f
        .weights("unet", &["diffusion_pytorch_model"], true)
        .unwrap();
    assert!(std::fs::read(&w).unwrap() == vec![8u8; 1500]);
    assert!(w.ends_with("unet/diffusion_pytorch_model.fp16.safetensors"));

    // Files the repo lacks: a clear error, no download attempt; optional ones are None.
    let err = format!("{:#}", f.file("text_encoder/config.json").unwrap_err());
    assert!(
        err.contains("has no file `text_encoder/config.json`"),
        "{err}"
    );
    assert_eq!(f.optional_file("tokenizer/tokenizer.json").unwrap(), None);
    let err = format!(
        "{:#}",
        f.weights("vae", &["diffusion_pytorch_model"], false)
            .unwrap_err()
    );
    assert!(
        err.contains("vae/diffusion_pytorch_model.bin") && err.contains("pickle"),
        "{err}"
    );
    // One notice per download, none for files the repo lacks.
    assert_eq!(
        *notices.lock().unwrap(),
        [
            "downloading unet/config.json from hub repo org/model@main",
            "downloading unet/diffusion_pytorch_model.fp16.safetensors from hub repo org/model@main",
        ]
    );
    let reqs = hub.requests.lock().unwrap().clone();
    assert_eq!(
        reqs.iter().filter(|r| r.starts_with("/api/")).count(),
        1,
        "{reqs:?}"
    );
    assert!(
        !reqs
            .iter()
            .any(|r| r.contains("text_encoder") || r.contains("tokenizer")),
        "{reqs:?}"
    );

    // The cache now has the hf-hub layout, and an offline view reads it.
    let repo_dir = t.0.join("models--org--model");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    assert!(
        repo_dir
            .join("snapshots")
            .join(COMMIT)
            .join("unet/config.json")
            .is_file()
    );
    let off = ModelFolder::hub_in(&t.0, "org/model", "main", true).unwrap();
    assert_eq!(off.file("unet/config.json").unwrap(), p);
    let ow = off
        .weights("unet", &["diffusion_pytorch_model"], true)
        .unwrap();
    assert!(std::fs::read(&ow).unwrap() == vec![8u8; 1500]);
    // The blob is named by its sha256, which is therefore the model hash.
    let expect: String = Sha256::digest(vec![8u8; 1500])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(file_sha256_cached(&ow, None).unwrap(), expect);

    // Cached files need no network at all.
    let n = hub.requests.lock().unwrap().len();
    let (notices, sink) = notice_sink();
    let again = ModelFolder::hub_in(&t.0, "org/model", "main", false)
        .unwrap()
        .with_endpoint(&hub.url)
        .with_progress(false)
        .with_notices(sink);
    again.file("unet/config.json").unwrap();
    again
        .weights("unet", &["diffusion_pytorch_model"], true)
        .unwrap();
    assert_eq!(hub.requests.lock().unwrap().len(), n);
    // The f32 file is downloaded when asked for.
    let w32 = again
        .weights("unet", &["diffusion_pytorch_model"], false)
        .unwrap();
    assert!(
        w32.ends_with("unet/diffusion_pytorch_model.safetensors"),
        "{w32:?}"
    );
    assert!(std::fs::read(&w32).unwrap() == vec![7u8; 3000]);
    assert!(again.file("model_index.json").is_ok());
    assert!(again.is_cached());
    // Cached files are not announced; the two downloads are.
    assert_eq!(
        *notices.lock().unwrap(),
        [
            "downloading unet/diffusion_pytorch_model.safetensors from hub repo org/model@main",
            "downloading model_index.json from hub repo org/model@main",
        ]
    );
}

#[test]
fn hub_refusal_is_reported() {
    if proxy_set() {
        return;
    }
    let hub = fake_hub("org/gated", "main", Vec::new(), Some(401));
    let t = TempDir::new("refused");
    let f = ModelFolder::hub_in(&t.0, "org/gated", "main", false)
        .unwrap()
        .with_endpoint(&hub.url)
        .with_progress(false);
    let err = format!("{:#}", f.file("unet/config.json").unwrap_err());
    assert!(err.contains("401") && err.contains("HF_TOKEN"), "{err}");
    assert!(
        err.contains("`unet/config.json`") && err.contains("org/gated@main"),
        "{err}"
    );
    assert!(f.optional_file("tokenizer/tokenizer.json").is_err());
}

/// Every file under `dir`, as (path relative to it with `/`, bytes).
fn files_under(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(dir)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

#[test]
fn a_run_announces_each_download_and_generates_from_the_cache() {
    if proxy_set() {
        eprintln!("skipped: a proxy is configured, the fake hub on 127.0.0.1 would not be reached");
        return;
    }
    let t = TempDir::new("run");
    // The built-in tiny model's files, served as if it were a Hub repo.
    let folder = t.0.join("tiny-sd15");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tkg"))
        .args(["models", "materialize", "tiny-sd15"])
        .arg(&folder)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hub = fake_hub("org/tiny", "main", files_under(&folder), None);
    let models = t.0.join("models.toml");
    std::fs::write(
        &models,
        "[models.fake]\nfamily = \"sd15\"\nhub = \"org/tiny\"\n",
    )
    .unwrap();
    let run = |name: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tkg"))
            .args(["generate", "--models-file"])
            .arg(&models)
            .args(["--model", "fake", "--prompt", "a red car", "--seed", "1"])
            .args(["--steps", "2", "--no-key", "--out"])
            .arg(t.0.join(name))
            .env("HF_HOME", t.0.join("home"))
            .env("HF_ENDPOINT", &hub.url)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HUGGINGFACE_HUB_CACHE")
            .output()
            .unwrap()
    };
    let first = run("a.png");
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    assert!(
        stderr.contains("tkg: downloading unet/config.json from hub repo org/tiny@main"),
        "{stderr}"
    );
    // Cached now: the second run downloads nothing and says nothing about it.
    let second = run("b.png");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{stderr}");
    assert!(!stderr.contains("downloading"), "{stderr}");
    assert_eq!(
        std::fs::read(t.0.join("a.png")).unwrap(),
        std::fs::read(t.0.join("b.png")).unwrap()
    );
}
