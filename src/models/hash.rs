//! Model hashes: a file's sha256 (AUTOMATIC1111's "Model hash" is its first 10 hex digits),
//! cached in `<hub cache>/tkg-hashes.json` by canonical path, size and mtime so that a
//! multi-GiB checkpoint is read once, not on every run.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::hub::hub_cache_dir;

#[derive(Serialize, Deserialize, Default)]
struct HashCache {
    #[serde(default)]
    files: BTreeMap<String, HashRecord>,
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Debug)]
struct HashRecord {
    size: u64,
    mtime_s: i64,
    mtime_ns: u32,
    sha256: String,
}

/// The hash cache file: `<hub cache dir>/tkg-hashes.json`.
pub fn hash_cache_file() -> PathBuf {
    hub_cache_dir().join("tkg-hashes.json")
}

/// First 10 hex digits of the file's sha256: AUTOMATIC1111's "Model hash". Cached in
/// [`hash_cache_file`] by canonical path, size and mtime.
pub fn file_sha256_short(path: &Path) -> Result<String> {
    Ok(file_sha256(path)?[..10].to_string())
}

/// The file's full sha256 (lower-case hex), cached as for [`file_sha256_short`].
pub fn file_sha256(path: &Path) -> Result<String> {
    file_sha256_cached(path, Some(&hash_cache_file()))
}

/// [`file_sha256`] with an explicit cache file (`None`: no cache).
///
/// A Hub cache blob named by 64 hex digits (`.../blobs/<sha256>`, how the Hub stores LFS
/// files) is its own sha256 and is not read. Failing to read or write the cache is not an
/// error; the hash is then computed.
pub fn file_sha256_cached(path: &Path, cache_file: Option<&Path>) -> Result<String> {
    let canon = std::fs::canonicalize(path)
        .with_context(|| format!("cannot hash {}: no such file", path.display()))?;
    let meta =
        std::fs::metadata(&canon).with_context(|| format!("cannot hash {}", path.display()))?;
    if !meta.is_file() {
        bail!("cannot hash {}: not a file", path.display());
    }
    if let Some(name) = canon.file_name().and_then(|n| n.to_str())
        && name.len() == 64
        && name.bytes().all(|b| b.is_ascii_hexdigit())
        && canon
            .parent()
            .and_then(|p| p.file_name())
            .is_some_and(|n| n == "blobs")
    {
        return Ok(name.to_ascii_lowercase());
    }
    let (mtime_s, mtime_ns) = match meta.modified() {
        Ok(t) => match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => (
                -(e.duration().as_secs() as i64),
                e.duration().subsec_nanos(),
            ),
        },
        Err(_) => (0, 0),
    };
    let key = canon.to_string_lossy().into_owned();
    let mut cache: HashCache = cache_file
        .and_then(|f| std::fs::read(f).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some(r) = cache.files.get(&key)
        && r.size == meta.len()
        && r.mtime_s == mtime_s
        && r.mtime_ns == mtime_ns
        && r.sha256.len() == 64
    {
        return Ok(r.sha256.clone());
    }
    let sha = sha256_of_file(&canon)?;
    if let Some(f) = cache_file {
        // Drop records of files that are gone, then write atomically (temp + rename).
        cache.files.retain(|k, _| Path::new(k).is_file());
        cache.files.insert(
            key,
            HashRecord {
                size: meta.len(),
                mtime_s,
                mtime_ns,
                sha256: sha.clone(),
            },
        );
        let _ = write_atomic_json(f, &cache);
    }
    Ok(sha)
}

fn write_atomic_json(path: &Path, value: &HashCache) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let bytes = serde_json::to_vec_pretty(value)?;
    crate::output::write_atomic(path, true, |w| Ok(w.write_all(&bytes)?))
}

fn sha256_of_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "tkg-hash-test-{tag}-{}-{}",
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

    #[test]
    fn hash_cache_lives_in_the_hub_cache() {
        assert_eq!(
            hash_cache_file().parent().unwrap(),
            hub_cache_dir().as_path()
        );
        assert!(hash_cache_file().ends_with("tkg-hashes.json"));
    }

    #[test]
    fn hash_is_cached_by_path_size_and_mtime() {
        let t = TempDir::new("hash");
        let file = write(&t.0, "w.safetensors", b"abc");
        let cache = t.0.join("sub/tkg-hashes.json");
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(file_sha256_cached(&file, Some(&cache)).unwrap(), abc);
        assert_eq!(file_sha256_cached(&file, None).unwrap(), abc);

        // The cache file holds the canonical path with size and full hash.
        let text = std::fs::read_to_string(&cache).unwrap();
        let canon = std::fs::canonicalize(&file).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let rec = &json["files"][canon.to_string_lossy().as_ref()];
        assert_eq!(rec["sha256"], abc);
        assert_eq!(rec["size"], 3);

        // A second call trusts the cache and does not reread the file: plant a fake hash.
        let fake = "f".repeat(64);
        std::fs::write(&cache, text.replace(abc, &fake)).unwrap();
        assert_eq!(file_sha256_cached(&file, Some(&cache)).unwrap(), fake);

        // Changing the file (size and mtime) invalidates the record.
        std::fs::write(&file, b"abcd").unwrap();
        let abcd = "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589";
        assert_eq!(file_sha256_cached(&file, Some(&cache)).unwrap(), abcd);
        assert!(std::fs::read_to_string(&cache).unwrap().contains(abcd));

        // A corrupt cache file is ignored (and replaced).
        std::fs::write(&cache, b"not json").unwrap();
        assert_eq!(file_sha256_cached(&file, Some(&cache)).unwrap(), abcd);

        // Short form: 10 hex digits.
        let short = file_sha256(&file).unwrap()[..10].to_string();
        assert_eq!(short, &abcd[..10]);

        // A file bigger than one read chunk.
        let big: Vec<u8> = (0..(3 << 20) + 7).map(|i| (i % 251) as u8).collect();
        let bigf = write(&t.0, "big.bin", &big);
        let expect: String = Sha256::digest(&big)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(file_sha256_cached(&bigf, None).unwrap(), expect);

        assert!(file_sha256_cached(&t.0.join("missing"), Some(&cache)).is_err());
    }

    #[test]
    fn hub_blob_names_are_their_hash() {
        let t = TempDir::new("blob");
        let sha = "a".repeat(64);
        let blob = write(&t.0, &format!("models--a--b/blobs/{sha}"), b"whatever");
        assert_eq!(file_sha256_cached(&blob, None).unwrap(), sha);
        #[cfg(unix)]
        {
            let link = t.0.join("models--a--b/snapshots/x/unet.safetensors");
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(&blob, &link).unwrap();
            assert_eq!(file_sha256_cached(&link, None).unwrap(), sha);
        }
    }
}
