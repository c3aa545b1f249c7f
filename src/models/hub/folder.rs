//! [`ModelFolder`]: the files of a diffusers-layout model, from a local folder or from a Hub
//! repo through the HF cache (downloading what is missing), with the fp16 preference for
//! weights and the refusal of pickle files.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{Result, anyhow, bail};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::errors::{
    Failure, Layout, Why, classify, missing_in_folder, missing_in_hub, pickle_message,
    status_message,
};
use super::paths::{hf_endpoint, hf_token, hub_cache_dir, offline_from_env};

/// File extensions of pickle-based weights, which tkg refuses to load.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "ckpt", "pt", "pth", "pkl"];

/// What the Hub told us about a repo (fetched at most once per [`ModelFolder`]).
#[derive(Debug, Clone)]
enum Remote {
    /// The repo's file list at this revision.
    Listing(BTreeSet<String>),
    /// The network failed: carry on cache-only.
    Unreachable(String),
    /// The Hub answered with an error (repo missing, gated, ...).
    Refused(String),
}

#[derive(Debug)]
enum Location {
    Local(PathBuf),
    Hub {
        cache_dir: PathBuf,
        repo: String,
        revision: String,
        offline: bool,
        endpoint: Option<String>,
        remote: OnceLock<Remote>,
    },
}

/// A view of a diffusers-layout model: a local folder, or a Hub repo through the HF cache.
///
/// It prints nothing: what it has to say (a download starting) goes to the sink given to
/// [`ModelFolder::with_notices`], and hf-hub draws its progress bar only when
/// [`ModelFolder::with_progress`] asks for it.
pub struct ModelFolder {
    loc: Location,
    progress: bool,
    notices: Option<Notices>,
    layout: Layout,
}

/// Where a [`ModelFolder`] sends its notices (one line of text each, no trailing newline).
#[derive(Clone)]
pub struct Notices(Arc<dyn Fn(&str) + Send + Sync>);

impl Notices {
    pub fn new(sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self(Arc::new(sink))
    }

    pub fn send(&self, line: &str) {
        (self.0)(line)
    }
}

impl std::fmt::Debug for Notices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notices")
    }
}

impl std::fmt::Debug for ModelFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFolder")
            .field("loc", &self.loc)
            .field("progress", &self.progress)
            .field("notices", &self.notices.is_some())
            .finish()
    }
}

impl ModelFolder {
    /// A local folder; an error if it is not a folder.
    pub fn local(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            if dir.exists() {
                bail!(
                    "{} is not a folder (a diffusers-layout model folder is expected; use \
                     --model-file for a single-file checkpoint)",
                    dir.display()
                );
            }
            bail!("model folder {} does not exist", dir.display());
        }
        Ok(ModelFolder {
            loc: Location::Local(dir.to_path_buf()),
            progress: false,
            notices: None,
            layout: Layout::Diffusers,
        })
    }

    /// A Hub repo at `revision` (branch, tag or commit), read through [`hub_cache_dir`],
    /// offline if `HF_HUB_OFFLINE` says so.
    pub fn hub(repo: &str, revision: &str) -> Result<Self> {
        Self::hub_in(&hub_cache_dir(), repo, revision, offline_from_env())
    }

    /// A Hub repo read through an explicit cache folder; `offline` forbids all network access.
    pub fn hub_in(cache_dir: &Path, repo: &str, revision: &str, offline: bool) -> Result<Self> {
        if repo.is_empty() || repo.starts_with('/') || repo.ends_with('/') || repo.contains("..") {
            bail!("`{repo}` is not a Hub repo id (ORG/NAME)");
        }
        if revision.is_empty() {
            bail!("empty revision for hub repo {repo}");
        }
        Ok(ModelFolder {
            loc: Location::Hub {
                cache_dir: cache_dir.to_path_buf(),
                repo: repo.to_string(),
                revision: revision.to_string(),
                offline,
                endpoint: hf_endpoint(),
                remote: OnceLock::new(),
            },
            progress: false,
            notices: None,
            layout: Layout::Diffusers,
        })
    }

    /// Use another Hub endpoint than `$HF_ENDPOINT` / https://huggingface.co (mirrors, tests).
    pub fn with_endpoint(mut self, endpoint: &str) -> Self {
        if let Location::Hub { endpoint: e, .. } = &mut self.loc {
            *e = Some(endpoint.trim_end_matches('/').to_string());
        }
        self
    }

    /// What the folder holds, for the advice of its missing-file errors (a diffusers
    /// pipeline by default).
    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Whether hf-hub draws a progress bar on stderr while downloading (only when stderr is a
    /// terminal). Off by default.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// Send notices to `sink` instead of dropping them: one line per file about to be
    /// downloaded, `downloading REL from hub repo ORG/NAME@REV`. None by default.
    pub fn with_notices(self, sink: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.with_notice_sink(Some(Notices::new(sink)))
    }

    /// [`ModelFolder::with_notices`] with a shared sink, or none.
    pub fn with_notice_sink(mut self, sink: Option<Notices>) -> Self {
        self.notices = sink;
        self
    }

    /// "hub repo ORG/NAME@REV" or "folder DIR".
    pub fn describe(&self) -> String {
        match &self.loc {
            Location::Local(d) => format!("folder {}", d.display()),
            Location::Hub { repo, revision, .. } => format!("hub repo {repo}@{revision}"),
        }
    }

    /// Whether the model is available without downloading: the folder exists, or the cached
    /// snapshot has model_index.json (config.json for a VAE-only repo).
    pub fn is_cached(&self) -> bool {
        match &self.loc {
            Location::Local(d) => d.is_dir(),
            Location::Hub { .. } => {
                self.cached("model_index.json").is_some() || self.cached("config.json").is_some()
            }
        }
    }

    /// The local folder, or the cached snapshot folder of a Hub repo (if any is cached).
    pub fn root(&self) -> Option<PathBuf> {
        match &self.loc {
            Location::Local(d) => Some(d.clone()),
            Location::Hub { .. } => self.snapshot_dir(),
        }
    }

    /// A required file, `rel` relative to the model root (e.g. "unet/config.json").
    pub fn file(&self, rel: &str) -> Result<PathBuf> {
        let rel = normalize_rel(rel)?;
        match &self.loc {
            Location::Local(d) => {
                let p = d.join(&rel);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(self.missing(&[rel.as_str()], None))
                }
            }
            Location::Hub { .. } => {
                if let Some(p) = self.cached(&rel) {
                    return Ok(p);
                }
                match self.fetch(&rel)? {
                    Ok(p) => Ok(p),
                    Err(why) => Err(self.missing(&[rel.as_str()], Some(why))),
                }
            }
        }
    }

    /// An optional file: `None` when the model has no such file (or, cache-only, when it is
    /// not cached). Errors only when the Hub refuses access to the repo or a download fails.
    pub fn optional_file(&self, rel: &str) -> Result<Option<PathBuf>> {
        let rel = normalize_rel(rel)?;
        match &self.loc {
            Location::Local(d) => {
                let p = d.join(&rel);
                Ok(p.is_file().then_some(p))
            }
            Location::Hub { .. } => {
                if let Some(p) = self.cached(&rel) {
                    return Ok(Some(p));
                }
                match self.fetch(&rel)? {
                    Ok(p) => Ok(Some(p)),
                    Err(Why::Refused(e)) => {
                        Err(self.missing(&[rel.as_str()], Some(Why::Refused(e))))
                    }
                    Err(_) => Ok(None),
                }
            }
        }
    }

    /// The safetensors weights of `component` (a subfolder such as "unet", or "" for the
    /// root of a VAE-only repo), trying each of `names` (e.g. `["diffusion_pytorch_model"]`).
    ///
    /// With `prefer_fp16`, `{component}/{name}.fp16.safetensors` is used when available, else
    /// `{component}/{name}.safetensors`; a cached file of either kind is preferred over a
    /// download. Without it, the full-precision file is used; the fp16 variant only when the
    /// model has no full-precision file. Pickle weights (.bin/.ckpt/...) are refused.
    pub fn weights(&self, component: &str, names: &[&str], prefer_fp16: bool) -> Result<PathBuf> {
        if names.is_empty() {
            bail!("no weight file names given for `{component}`");
        }
        let comp = component.trim_matches('/');
        let join = |n: &str| {
            if comp.is_empty() {
                n.to_string()
            } else {
                format!("{comp}/{n}")
            }
        };
        let mut primary = Vec::new();
        let mut fallback = Vec::new();
        for n in names {
            if prefer_fp16 {
                primary.push(join(&format!("{n}.fp16.safetensors")));
                primary.push(join(&format!("{n}.safetensors")));
            } else {
                primary.push(join(&format!("{n}.safetensors")));
                fallback.push(join(&format!("{n}.fp16.safetensors")));
            }
        }
        let wanted: Vec<&str> = primary.iter().map(String::as_str).collect();
        match &self.loc {
            Location::Local(d) => {
                if let Some(p) = primary
                    .iter()
                    .chain(&fallback)
                    .map(|r| d.join(r))
                    .find(|p| p.is_file())
                {
                    return Ok(p);
                }
                let pickles = pickles_in_dir(&d.join(comp), comp);
                if !pickles.is_empty() {
                    bail!(pickle_message(comp, &self.describe(), &pickles));
                }
                Err(self.missing(&wanted, None))
            }
            Location::Hub { .. } => {
                // Cached primary files, then downloads of them; then the same for the
                // fallback files (so that a cached fp16 file never shadows an f32 download).
                let mut last_why = None;
                let mut no_fetch = false;
                for group in [&primary, &fallback] {
                    if let Some(p) = group.iter().find_map(|r| self.cached(r)) {
                        return Ok(p);
                    }
                    if no_fetch {
                        continue;
                    }
                    for rel in group.iter() {
                        match self.fetch(rel)? {
                            Ok(p) => return Ok(p),
                            Err(Why::NotInRepo) => last_why = Some(Why::NotInRepo),
                            Err(why) => {
                                last_why = Some(why);
                                no_fetch = true;
                                break;
                            }
                        }
                    }
                }
                // Pickle-only? Look at the repo listing, or the cached snapshot.
                let mut pickles = match self.remote() {
                    Some(Remote::Listing(files)) => files
                        .iter()
                        .filter(|f| is_pickle(f) && parent_of(f) == comp)
                        .cloned()
                        .collect(),
                    _ => Vec::new(),
                };
                if pickles.is_empty()
                    && let Some(snap) = self.snapshot_dir()
                {
                    pickles = pickles_in_dir(&snap.join(comp), comp);
                }
                if !pickles.is_empty() {
                    bail!(pickle_message(comp, &self.describe(), &pickles));
                }
                Err(self.missing(&wanted, last_why))
            }
        }
    }

    // ---- Hub internals ----

    /// The cached snapshot folder for the revision, if the ref (or the commit) is in the cache.
    fn snapshot_dir(&self) -> Option<PathBuf> {
        let Location::Hub {
            cache_dir,
            repo,
            revision,
            ..
        } = &self.loc
        else {
            return None;
        };
        let repo_dir = cache_dir.join(hf_repo(repo, revision).folder_name());
        let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| is_commit_hash(revision).then(|| revision.clone()))?;
        let snap = repo_dir.join("snapshots").join(commit);
        snap.is_dir().then_some(snap)
    }

    /// A file from the cache, without any network access.
    fn cached(&self, rel: &str) -> Option<PathBuf> {
        let Location::Hub {
            cache_dir,
            repo,
            revision,
            ..
        } = &self.loc
        else {
            return None;
        };
        let cache = Cache::new(cache_dir.clone());
        if let Some(p) = cache.repo(hf_repo(repo, revision)).get(rel)
            && p.is_file()
        {
            return Some(p);
        }
        // hf-hub does not trim the ref file and cannot use a commit revision that has no ref.
        let p = self.snapshot_dir()?.join(rel);
        p.is_file().then_some(p)
    }

    fn api(&self) -> Result<hf_hub::api::sync::Api, ApiError> {
        let Location::Hub {
            cache_dir,
            endpoint,
            ..
        } = &self.loc
        else {
            unreachable!("api() on a local folder")
        };
        let mut b = ApiBuilder::from_cache(Cache::new(cache_dir.clone()))
            .with_token(hf_token())
            .with_progress(self.progress && std::io::stderr().is_terminal())
            .with_retries(2)
            .with_user_agent("tkg", env!("CARGO_PKG_VERSION"));
        if let Some(e) = endpoint {
            b = b.with_endpoint(e.clone());
        }
        b.build()
    }

    /// The repo's file listing, fetched once; `None` when offline.
    fn remote(&self) -> Option<&Remote> {
        let Location::Hub {
            repo,
            revision,
            offline,
            remote,
            ..
        } = &self.loc
        else {
            return None;
        };
        if *offline {
            return None;
        }
        Some(remote.get_or_init(|| {
            let info = self
                .api()
                .and_then(|api| api.repo(hf_repo(repo, revision)).info());
            match info {
                Ok(info) => {
                    Remote::Listing(info.siblings.into_iter().map(|s| s.rfilename).collect())
                }
                Err(e) => match classify(e) {
                    Failure::Network(m) => Remote::Unreachable(m),
                    Failure::Status(code, m) => Remote::Refused(status_message(code, &m)),
                    Failure::Other(m) => Remote::Unreachable(m),
                },
            }
        }))
    }

    /// Download `rel` (not in the cache). The outer error is a hard failure; the inner one
    /// says why the file is unavailable.
    fn fetch(&self, rel: &str) -> Result<std::result::Result<PathBuf, Why>> {
        let Location::Hub { repo, revision, .. } = &self.loc else {
            unreachable!("fetch() on a local folder")
        };
        let files = match self.remote() {
            None => return Ok(Err(Why::Offline)),
            Some(Remote::Unreachable(e)) => return Ok(Err(Why::Unreachable(e.clone()))),
            Some(Remote::Refused(e)) => return Ok(Err(Why::Refused(e.clone()))),
            Some(Remote::Listing(files)) => files,
        };
        if !files.contains(rel) {
            return Ok(Err(Why::NotInRepo));
        }
        if let Some(notice) = &self.notices {
            notice.send(&format!(
                "downloading {rel} from hub repo {repo}@{revision}"
            ));
        }
        let api = self
            .api()
            .map_err(|e| anyhow!("cannot set up the Hub client: {e}"))?;
        match api.repo(hf_repo(repo, revision)).download(rel) {
            Ok(p) => Ok(Ok(p)),
            Err(e) => match classify(e) {
                Failure::Network(m) => Ok(Err(Why::Unreachable(m))),
                Failure::Status(code, m) => Ok(Err(Why::Refused(status_message(code, &m)))),
                Failure::Other(m) => Err(anyhow!(
                    "downloading {rel} from hub repo {repo}@{revision} failed: {m}"
                )),
            },
        }
    }

    /// The "missing file" error: names the file(s), the repo or folder, and how to provide it.
    fn missing(&self, rels: &[&str], why: Option<Why>) -> anyhow::Error {
        match &self.loc {
            Location::Local(d) => missing_in_folder(d, rels, self.layout),
            Location::Hub {
                cache_dir,
                repo,
                revision,
                ..
            } => missing_in_hub(cache_dir, repo, revision, rels, why, self.layout),
        }
    }
}

fn hf_repo(repo: &str, revision: &str) -> Repo {
    Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string())
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `rel` as a clean forward-slash relative path; no absolute paths or `..`.
fn normalize_rel(rel: &str) -> Result<String> {
    let parts: Vec<&str> = rel
        .split(['/', '\\'])
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") || rel.starts_with('/') {
        bail!("invalid model file path `{rel}` (must be relative, without `..`)");
    }
    Ok(parts.join("/"))
}

fn parent_of(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("")
}

fn is_pickle(name: &str) -> bool {
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| PICKLE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
}

fn pickles_in_dir(dir: &Path, comp: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_pickle(n))
        .map(|n| {
            if comp.is_empty() {
                n
            } else {
                format!("{comp}/{n}")
            }
        })
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

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

    fn write(dir: &Path, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        p
    }

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A fake HF cache holding `files` of repo `org/name` at `revision` (ref file written with
    /// a trailing newline, which hf-hub itself would not trim).
    fn fake_cache(cache: &Path, repo: &str, revision: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
        write(
            &repo_dir,
            &format!("refs/{revision}"),
            format!("{COMMIT}\n").as_bytes(),
        );
        let snap = repo_dir.join("snapshots").join(COMMIT);
        for (rel, bytes) in files {
            write(&snap, rel, bytes);
        }
        snap
    }

    #[test]
    fn rel_paths_are_checked() {
        assert_eq!(
            normalize_rel("unet//config.json").unwrap(),
            "unet/config.json"
        );
        assert_eq!(
            normalize_rel("./vae\\config.json").unwrap(),
            "vae/config.json"
        );
        assert!(normalize_rel("../secret").is_err());
        assert!(normalize_rel("/etc/passwd").is_err());
        assert!(normalize_rel("").is_err());
    }

    #[test]
    fn reads_a_fake_hub_cache_offline() {
        let t = TempDir::new("cache");
        let snap = fake_cache(
            &t.0,
            "a/b",
            "main",
            &[
                ("model_index.json", b"{}"),
                ("unet/config.json", b"{\"x\":1}"),
            ],
        );
        let f = ModelFolder::hub_in(&t.0, "a/b", "main", true).unwrap();
        assert_eq!(f.describe(), "hub repo a/b@main");
        assert!(f.is_cached());
        assert_eq!(f.root().unwrap(), snap);
        let p = f.file("unet/config.json").unwrap();
        assert_eq!(p, snap.join("unet/config.json"));
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"x\":1}");
        assert_eq!(f.optional_file("tokenizer/tokenizer.json").unwrap(), None);
        assert_eq!(
            f.optional_file("model_index.json").unwrap(),
            Some(snap.join("model_index.json"))
        );

        // Another revision, or another repo, is not cached.
        let other = ModelFolder::hub_in(&t.0, "a/b", "v2", true).unwrap();
        assert!(!other.is_cached());
        assert!(other.root().is_none());
        assert!(
            !ModelFolder::hub_in(&t.0, "a/c", "main", true)
                .unwrap()
                .is_cached()
        );

        // A commit revision works straight from snapshots/, with no ref file.
        let pinned = ModelFolder::hub_in(&t.0, "a/b", COMMIT, true).unwrap();
        assert_eq!(pinned.file("unet/config.json").unwrap(), p);
    }

    #[test]
    fn vae_only_repo_counts_as_cached() {
        let t = TempDir::new("vae");
        fake_cache(
            &t.0,
            "madebyollin/sdxl-vae-fp16-fix",
            "main",
            &[
                ("config.json", b"{}"),
                ("diffusion_pytorch_model.safetensors", b"w"),
            ],
        );
        let f = ModelFolder::hub_in(&t.0, "madebyollin/sdxl-vae-fp16-fix", "main", true).unwrap();
        assert!(f.is_cached());
        let w = f.weights("", &["diffusion_pytorch_model"], true).unwrap();
        assert!(w.ends_with("diffusion_pytorch_model.safetensors"));
    }

    #[test]
    fn offline_missing_file_message() {
        let t = TempDir::new("offline");
        fake_cache(&t.0, "org/model", "main", &[("model_index.json", b"{}")]);
        let f = ModelFolder::hub_in(&t.0, "org/model", "main", true).unwrap();
        let err = format!("{:#}", f.file("vae/config.json").unwrap_err());
        for needle in [
            "`vae/config.json`",
            "org/model@main",
            "HF_HUB_OFFLINE",
            "huggingface-cli download org/model vae/config.json",
            "--model-dir",
            &t.0.display().to_string(),
        ] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
        let f = ModelFolder::hub_in(&t.0, "org/model", "v1.0", true).unwrap();
        let err = format!("{:#}", f.file("unet/config.json").unwrap_err());
        assert!(err.contains("--revision v1.0"), "{err}");

        let err = format!(
            "{:#}",
            ModelFolder::hub_in(&t.0, "org/model", "main", true)
                .unwrap()
                .weights("unet", &["diffusion_pytorch_model"], true)
                .unwrap_err()
        );
        assert!(
            err.contains("unet/diffusion_pytorch_model.fp16.safetensors"),
            "{err}"
        );
        assert!(
            err.contains("unet/diffusion_pytorch_model.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn unreachable_hub_falls_back_to_the_cache() {
        let t = TempDir::new("unreachable");
        // A port nothing listens on: connection refused, i.e. no network.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        fake_cache(&t.0, "a/b", "main", &[("unet/config.json", b"{}")]);
        let f = ModelFolder::hub_in(&t.0, "a/b", "main", false)
            .unwrap()
            .with_endpoint(&format!("http://127.0.0.1:{port}"))
            .with_progress(false);
        assert!(f.file("unet/config.json").is_ok());
        let err = format!("{:#}", f.file("vae/config.json").unwrap_err());
        assert!(err.contains("could not be reached"), "{err}");
        assert!(
            err.contains("huggingface-cli download a/b vae/config.json"),
            "{err}"
        );
        assert_eq!(f.optional_file("tokenizer/tokenizer.json").unwrap(), None);
        let err = format!("{:#}", f.weights("unet", &["x"], false).unwrap_err());
        assert!(
            err.contains("unet/x.safetensors") && err.contains("could not be reached"),
            "{err}"
        );
    }

    #[test]
    fn local_folder_files() {
        let t = TempDir::new("local");
        write(&t.0, "unet/config.json", b"{}");
        let f = ModelFolder::local(&t.0).unwrap();
        assert_eq!(f.describe(), format!("folder {}", t.0.display()));
        assert!(f.is_cached());
        assert_eq!(
            f.file("unet/config.json").unwrap(),
            t.0.join("unet/config.json")
        );
        let err = format!("{:#}", f.file("vae/config.json").unwrap_err());
        assert!(err.contains("`vae/config.json`"), "{err}");
        assert!(err.contains(&t.0.display().to_string()), "{err}");
        assert!(err.contains("--model-dir"), "{err}");
        assert_eq!(f.optional_file("tokenizer/tokenizer.json").unwrap(), None);

        let not_dir = t.0.join("unet/config.json");
        assert!(ModelFolder::local(&not_dir).is_err());
        let err = format!("{:#}", ModelFolder::local(&t.0.join("nope")).unwrap_err());
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn fp16_preference() {
        let t = TempDir::new("fp16");
        let d = &t.0;
        write(d, "unet/diffusion_pytorch_model.safetensors", b"f32");
        write(d, "unet/diffusion_pytorch_model.fp16.safetensors", b"f16");
        write(d, "vae/diffusion_pytorch_model.safetensors", b"f32");
        write(d, "text_encoder/model.fp16.safetensors", b"f16");
        let f = ModelFolder::local(d).unwrap();
        let w = |c: &str, n: &[&str], p: bool| {
            f.weights(c, n, p)
                .unwrap()
                .strip_prefix(d)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        let unet = ["diffusion_pytorch_model"];
        assert_eq!(
            w("unet", &unet, true),
            "unet/diffusion_pytorch_model.fp16.safetensors"
        );
        assert_eq!(
            w("unet", &unet, false),
            "unet/diffusion_pytorch_model.safetensors"
        );
        assert_eq!(
            w("vae", &unet, true),
            "vae/diffusion_pytorch_model.safetensors"
        );
        // Only the fp16 variant exists: used even for f32.
        assert_eq!(
            w("text_encoder", &["model"], false),
            "text_encoder/model.fp16.safetensors"
        );
        // Names are tried in order.
        assert_eq!(
            w("unet", &["nope", "diffusion_pytorch_model"], false),
            "unet/diffusion_pytorch_model.safetensors"
        );
        let err = format!(
            "{:#}",
            f.weights("text_encoder_2", &["model"], true).unwrap_err()
        );
        assert!(
            err.contains("text_encoder_2/model.fp16.safetensors"),
            "{err}"
        );

        // Same through a fake Hub cache.
        let c = TempDir::new("fp16-hub");
        fake_cache(
            &c.0,
            "a/b",
            "main",
            &[
                ("unet/diffusion_pytorch_model.safetensors", b"f32"),
                ("unet/diffusion_pytorch_model.fp16.safetensors", b"f16"),
                ("vae/diffusion_pytorch_model.fp16.safetensors", b"f16"),
            ],
        );
        let h = ModelFolder::hub_in(&c.0, "a/b", "main", true).unwrap();
        let hw = |c: &str, p: bool| {
            h.weights(c, &unet, p)
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        assert_eq!(hw("unet", true), "diffusion_pytorch_model.fp16.safetensors");
        assert_eq!(hw("unet", false), "diffusion_pytorch_model.safetensors");
        assert_eq!(hw("vae", false), "diffusion_pytorch_model.fp16.safetensors");
    }

    #[test]
    fn pickle_only_weights_are_refused() {
        let t = TempDir::new("pickle");
        write(&t.0, "unet/diffusion_pytorch_model.bin", b"pickle");
        write(&t.0, "model.ckpt", b"pickle");
        let f = ModelFolder::local(&t.0).unwrap();
        let err = format!(
            "{:#}",
            f.weights("unet", &["diffusion_pytorch_model"], false)
                .unwrap_err()
        );
        assert!(err.contains("unet/diffusion_pytorch_model.bin"), "{err}");
        assert!(
            err.contains("pickle") && err.contains("arbitrary code"),
            "{err}"
        );
        assert!(err.contains("safetensors"), "{err}");
        let err = format!(
            "{:#}",
            f.weights("", &["diffusion_pytorch_model"], false)
                .unwrap_err()
        );
        assert!(
            err.contains("model.ckpt") && err.contains("pickle"),
            "{err}"
        );

        let c = TempDir::new("pickle-hub");
        fake_cache(
            &c.0,
            "a/b",
            "main",
            &[("vae/diffusion_pytorch_model.bin", b"p")],
        );
        let h = ModelFolder::hub_in(&c.0, "a/b", "main", true).unwrap();
        let err = format!(
            "{:#}",
            h.weights("vae", &["diffusion_pytorch_model"], true)
                .unwrap_err()
        );
        assert!(
            err.contains("vae/diffusion_pytorch_model.bin") && err.contains("pickle"),
            "{err}"
        );
        assert!(err.contains("a/b@main"), "{err}");
    }
}
