//! Where the Hub cache, the token and the built-in models live, and whether to go online.
//!
//! The only place the Hub code reads the environment, and then only the Hugging Face
//! variables documented in [`super`]: `HF_HOME`, `HF_HUB_CACHE`, `HF_TOKEN`, `HF_TOKEN_PATH`,
//! `HF_HUB_OFFLINE`, `HF_ENDPOINT`; also, as `huggingface_hub` does, the legacy spellings
//! `HUGGINGFACE_HUB_CACHE` and `HUGGING_FACE_HUB_TOKEN`, and `XDG_CACHE_HOME`, `HOME` (or
//! `USERPROFILE`) for the default `~/.cache/huggingface`.

use std::path::PathBuf;

fn env_nonempty(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// `$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(h) = env_nonempty("HF_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = env_nonempty("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("huggingface");
    }
    home_dir().join(".cache").join("huggingface")
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The Hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub` (see [`hf_home`]).
pub fn hub_cache_dir() -> PathBuf {
    if let Some(c) = env_nonempty("HF_HUB_CACHE").or_else(|| env_nonempty("HUGGINGFACE_HUB_CACHE"))
    {
        return PathBuf::from(c);
    }
    hf_home().join("hub")
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only operation.
pub fn offline_from_env() -> bool {
    env_nonempty("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v))
}

fn is_truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// The Hub token: `$HF_TOKEN`, else the file `$HF_TOKEN_PATH`, else `$HF_HOME/token`.
pub fn hf_token() -> Option<String> {
    if let Some(t) = env_nonempty("HF_TOKEN").or_else(|| env_nonempty("HUGGING_FACE_HUB_TOKEN")) {
        return Some(t.trim().to_string());
    }
    let path = env_nonempty("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("token"));
    std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Where built-in model `name` is materialised: `<hub cache dir>/tkg--builtin--<name>/`, next to
/// the Hub repos, so that one cache folder (and one `HF_HUB_CACHE`/`HF_HOME`) holds everything.
/// The folder counts as materialised once its `model_index.json` exists, so write that last.
pub fn builtin_cache_dir(name: &str) -> PathBuf {
    hub_cache_dir().join(format!("tkg--builtin--{name}"))
}

/// `$HF_ENDPOINT`, the Hub to talk to; `None` means https://huggingface.co.
pub(super) fn hf_endpoint() -> Option<String> {
    env_nonempty("HF_ENDPOINT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_and_flags() {
        assert!(builtin_cache_dir("tiny-sd15").ends_with("tkg--builtin--tiny-sd15"));
        assert_eq!(
            builtin_cache_dir("tiny-sd15").parent().unwrap(),
            hub_cache_dir().as_path()
        );
        for v in ["1", "true", "YES", " on "] {
            assert!(is_truthy(v), "{v}");
        }
        for v in ["0", "false", "no", ""] {
            assert!(!is_truthy(v), "{v}");
        }
    }
}
