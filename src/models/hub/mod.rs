//! Resolving model files: local diffusers-layout folders, and Hugging Face Hub repos through
//! the shared HF cache (the same cache the Python `huggingface_hub` and `hf-hub` use).
//!
//! - Cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
//!   else `~/.cache/huggingface/hub`. Layout: `models--ORG--NAME/refs/<revision>` holds a commit
//!   hash, `models--ORG--NAME/snapshots/<hash>/<path>` the files (symlinks into `blobs/`).
//! - A file already in the cache is used without touching the network. Otherwise it is
//!   downloaded (hf-hub's sync API), unless `HF_HUB_OFFLINE` is `1`/`true`/`yes`/`on`; when the
//!   Hub cannot be reached, tkg carries on cache-only.
//! - Token: `$HF_TOKEN`, else the file `$HF_TOKEN_PATH`, else `$HF_HOME/token` (what
//!   `huggingface-cli login` writes). Endpoint: `$HF_ENDPOINT`, else https://huggingface.co.
//! - Built-in models are materialised into `<hub cache>/tkg--builtin--<name>/`
//!   ([`builtin_cache_dir`]), and model hashes are cached in `<hub cache>/tkg-hashes.json`
//!   ([`file_sha256_short`]).
//!
//! Parts: `paths` (the cache folders, token and offline flag: the only environment read),
//! `folder` ([`ModelFolder`]), `errors` (the wording of what goes wrong); the hashes live in
//! [`crate::models::hash`].

mod errors;
mod folder;
mod paths;

pub use errors::Layout;
pub use folder::{ModelFolder, Notices};
pub use paths::{builtin_cache_dir, hf_home, hf_token, hub_cache_dir, offline_from_env};

pub use super::hash::{file_sha256, file_sha256_cached, file_sha256_short, hash_cache_file};
