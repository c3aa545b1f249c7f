//! The wording of the errors a user sees when a model file cannot be had: missing from a
//! folder, or from a Hub repo that is offline, unreachable or refuses access; pickle-only
//! weights; and what an hf-hub error means.

use std::path::Path;

use anyhow::anyhow;
use hf_hub::api::sync::ApiError;

/// What a folder or repo is expected to hold, for the advice in its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// A diffusers pipeline, given locally with `--model-dir`.
    #[default]
    Diffusers,
    /// A transformers `SamModel`, given locally with `--segment-model`.
    SamModel,
}

impl Layout {
    /// "a diffusers-layout" / "a transformers SamModel", before "folder" or "repo".
    fn kind(self) -> &'static str {
        match self {
            Layout::Diffusers => "a diffusers-layout",
            Layout::SamModel => "a transformers SamModel",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Layout::Diffusers => "--model-dir",
            Layout::SamModel => "--segment-model",
        }
    }
}

/// Why a Hub file could not be had.
pub(super) enum Why {
    Offline,
    Unreachable(String),
    NotInRepo,
    Refused(String),
}

/// `rels[0]`, and " (also tried B, C)" for the rest.
fn first_and_alts<'a>(rels: &[&'a str]) -> (&'a str, String) {
    let first = rels[0];
    let alts = if rels.len() > 1 {
        format!(" (also tried {})", rels[1..].join(", "))
    } else {
        String::new()
    };
    (first, alts)
}

/// The "missing file" error of a local folder: names the file(s), the folder, and how to
/// provide it.
pub(super) fn missing_in_folder(dir: &Path, rels: &[&str], layout: Layout) -> anyhow::Error {
    let (first, alts) = first_and_alts(rels);
    anyhow!(
        "missing file `{first}`{alts} in model folder {dir}. The folder must be {kind} \
         folder (as written by save_pretrained); download a model with \
         `huggingface-cli download REPO --local-dir {dir}`, or pass another {flag} DIR",
        dir = dir.display(),
        kind = layout.kind(),
        flag = layout.flag(),
    )
}

/// The "missing file" error of a Hub repo read through `cache_dir`: names the file(s), the
/// repo, why it could not be downloaded, and how to provide it.
pub(super) fn missing_in_hub(
    cache_dir: &Path,
    repo: &str,
    revision: &str,
    rels: &[&str],
    why: Option<Why>,
    layout: Layout,
) -> anyhow::Error {
    let (kind, flag) = (layout.kind(), layout.flag());
    let (first, alts) = first_and_alts(rels);
    let rev_arg = if revision == "main" {
        String::new()
    } else {
        format!(" --revision {revision}")
    };
    let how = format!(
        "Download it with `huggingface-cli download {repo} {first}{rev_arg}`, or pass \
         {flag} DIR with {kind} folder that has it"
    );
    let cache = cache_dir.display();
    match why {
        Some(Why::NotInRepo) => anyhow!(
            "hub repo {repo}@{revision} has no file `{first}`{alts}; is it {kind} \
             repo? Pass {flag} DIR with {kind} folder instead"
        ),
        Some(Why::Refused(e)) => anyhow!(
            "missing file `{first}`{alts} of hub repo {repo}@{revision}: not in the \
             cache ({cache}) and the Hub refused it: {e}. {how}"
        ),
        Some(Why::Unreachable(e)) => anyhow!(
            "missing file `{first}`{alts} of hub repo {repo}@{revision}: not in the \
             cache ({cache}) and the Hub could not be reached ({e}). {how}"
        ),
        Some(Why::Offline) | None => anyhow!(
            "missing file `{first}`{alts} of hub repo {repo}@{revision}: not in the \
             cache ({cache}) and HF_HUB_OFFLINE is set, so nothing is downloaded. \
             {how}, or unset HF_HUB_OFFLINE"
        ),
    }
}

/// The refusal of pickle-only weights of `comp` ("" for the model root) in `describe`.
pub(super) fn pickle_message(comp: &str, describe: &str, pickles: &[String]) -> String {
    let what = if comp.is_empty() {
        "the model".to_string()
    } else {
        format!("`{comp}`")
    };
    format!(
        "{what} in {describe} has only pickle weights ({}), and tkg refuses pickle files \
         (.bin/.ckpt/.pt) because loading them can run arbitrary code. Convert them to \
         safetensors (e.g. with diffusers: `from_pretrained(...)` then \
         `save_pretrained(OUT, safe_serialization=True)`), or use a repo that has \
         .safetensors files",
        pickles.join(", ")
    )
}

/// What went wrong talking to the Hub.
pub(super) enum Failure {
    /// No answer from the Hub (DNS, connection, TLS, I/O).
    Network(String),
    /// The Hub answered with an HTTP error status.
    Status(u16, String),
    /// Anything else (local I/O, a malformed answer, ...).
    Other(String),
}

/// Sorts an hf-hub error into [`Failure`]; a retried error keeps its kind, except that
/// retries that ended in an unclassified error count as a network failure.
pub(super) fn classify(e: ApiError) -> Failure {
    match e {
        ApiError::RequestError(err) => {
            let msg = err.to_string();
            match (*err).into_response() {
                Some(resp) => Failure::Status(resp.status(), msg),
                None => Failure::Network(msg),
            }
        }
        ApiError::TooManyRetries(inner) => match classify(*inner) {
            Failure::Other(m) => Failure::Network(m),
            f => f,
        },
        ApiError::IoError(e) => Failure::Other(format!("I/O error: {e}")),
        other => Failure::Other(other.to_string()),
    }
}

/// An HTTP error status from the Hub, with what to do about it.
pub(super) fn status_message(code: u16, msg: &str) -> String {
    match code {
        401 | 403 => format!(
            "HTTP {code} ({msg}): the repo does not exist, or it is gated/private; accept its \
             terms on huggingface.co and set HF_TOKEN (or run `huggingface-cli login`)"
        ),
        404 => format!("HTTP 404 ({msg}): check the repo name and revision"),
        _ => format!("HTTP {code} ({msg})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_missing_file_names_it_and_the_alternatives() {
        let err = missing_in_folder(
            Path::new("/m"),
            &["a.safetensors", "b", "c"],
            Layout::Diffusers,
        )
        .to_string();
        assert!(
            err.starts_with("missing file `a.safetensors` (also tried b, c) in model folder /m."),
            "{err}"
        );
        assert!(
            err.contains("--local-dir /m") && err.contains("--model-dir"),
            "{err}"
        );
        let err = missing_in_folder(Path::new("/m"), &["a"], Layout::Diffusers).to_string();
        assert!(!err.contains("also tried"), "{err}");
        let sam = missing_in_folder(Path::new("/m"), &["a"], Layout::SamModel).to_string();
        assert!(
            sam.contains("a transformers SamModel folder") && sam.ends_with("--segment-model DIR"),
            "{sam}"
        );
    }

    #[test]
    fn hub_missing_file_says_why() {
        let c = Path::new("/cache");
        let msg = |rev: &str, why| {
            missing_in_hub(c, "o/n", rev, &["x", "y"], why, Layout::Diffusers).to_string()
        };
        let sam = missing_in_hub(c, "o/n", "main", &["x"], None, Layout::SamModel).to_string();
        assert!(
            sam.contains("--segment-model DIR with a transformers SamModel folder")
                && !sam.contains("diffusers"),
            "{sam}"
        );
        let not_in_repo = msg("main", Some(Why::NotInRepo));
        assert!(
            not_in_repo.starts_with("hub repo o/n@main has no file `x` (also tried y);"),
            "{not_in_repo}"
        );
        assert!(!not_in_repo.contains("/cache"), "{not_in_repo}");
        let refused = msg("main", Some(Why::Refused("HTTP 401".into())));
        assert!(
            refused.contains("not in the cache (/cache) and the Hub refused it: HTTP 401."),
            "{refused}"
        );
        assert!(
            refused.contains("`huggingface-cli download o/n x`, or pass --model-dir DIR"),
            "{refused}"
        );
        let unreachable = msg("v2", Some(Why::Unreachable("refused".into())));
        assert!(
            unreachable.contains("the Hub could not be reached (refused)"),
            "{unreachable}"
        );
        assert!(
            unreachable.contains("`huggingface-cli download o/n x --revision v2`"),
            "{unreachable}"
        );
        for offline in [msg("main", Some(Why::Offline)), msg("main", None)] {
            assert!(
                offline.contains("HF_HUB_OFFLINE is set, so nothing is downloaded")
                    && offline.ends_with(", or unset HF_HUB_OFFLINE"),
                "{offline}"
            );
        }
    }

    #[test]
    fn status_and_pickle_wording() {
        for code in [401, 403] {
            let m = status_message(code, "nope");
            assert!(m.starts_with(&format!("HTTP {code} (nope): ")), "{m}");
            assert!(m.contains("HF_TOKEN") && m.contains("gated"), "{m}");
        }
        let m = status_message(404, "nope");
        assert_eq!(m, "HTTP 404 (nope): check the repo name and revision");
        assert_eq!(status_message(500, "oops"), "HTTP 500 (oops)");

        let p = pickle_message("", "folder /m", &["a.ckpt".into(), "b.bin".into()]);
        assert!(
            p.starts_with("the model in folder /m has only pickle weights (a.ckpt, b.bin)"),
            "{p}"
        );
        let p = pickle_message("unet", "hub repo o/n@main", &["unet/x.bin".into()]);
        assert!(p.starts_with("`unet` in hub repo o/n@main has only"), "{p}");
        assert!(
            p.contains("arbitrary code") && p.contains("safetensors"),
            "{p}"
        );
    }

    #[test]
    fn hf_hub_errors_are_classified() {
        let io = || ApiError::IoError(std::io::Error::other("disk"));
        assert!(matches!(classify(io()), Failure::Other(m) if m == "I/O error: disk"));
        // Retries that end in an unclassified error: the network is to blame.
        let retried = ApiError::TooManyRetries(Box::new(io()));
        assert!(matches!(classify(retried), Failure::Network(m) if m == "I/O error: disk"));
        assert!(matches!(
            classify(ApiError::InvalidResume),
            Failure::Other(_)
        ));
    }
}
