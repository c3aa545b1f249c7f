//! The tokenizer's files: `vocab.json` + `merges.txt` or `tokenizer.json`, the special
//! tokens and lengths of `tokenizer_config.json` / `special_tokens_map.json`, and the built-in
//! tiny vocabulary.

use super::{
    BOS, DEFAULT_MAX_LENGTH, EOS, EOW, MAX_SANE_LENGTH, MERGES_2000, TINY_MAX_MERGES,
    VocabAndMerges, clip_byte_order,
};
use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

/// Special tokens and lengths taken from `tokenizer_config.json` /
/// `special_tokens_map.json` (or their defaults).
#[derive(Debug, Clone)]
pub(super) struct TokenSettings {
    pub(super) bos: String,
    pub(super) eos: String,
    pub(super) unk: String,
    pub(super) pad: String,
    /// Every added token in the order transformers registers them; a later entry
    /// with the same content overrides an earlier one.
    pub(super) added: Vec<(String, bool, Option<u32>)>,
    pub(super) max_length: usize,
}

impl TokenSettings {
    pub(super) fn defaults(pad_token: &str) -> Self {
        let added = [BOS, EOS, EOS, pad_token]
            .iter()
            .map(|t| (t.to_string(), false, None))
            .collect();
        TokenSettings {
            bos: BOS.into(),
            eos: EOS.into(),
            unk: EOS.into(),
            pad: pad_token.into(),
            added,
            max_length: DEFAULT_MAX_LENGTH,
        }
    }
}

/// `vocab.json` and `merges.txt` contents built from the first `n_merges` merges of
/// CLIP's BPE list exactly as CLIP's 49408-token vocabulary is built: the 256 byte
/// characters (in `bytes_to_unicode` order), the same with `</w>`, one token per
/// merge, then `<|startoftext|>` and `<|endoftext|>`. Ids of shared tokens equal the
/// real vocabulary's (`"a</w>"` = 320, `"photo</w>"` = 1125).
///
/// # Panics
/// If `n_merges` exceeds [`TINY_MAX_MERGES`].
pub fn tiny_vocab(n_merges: usize) -> (String, String) {
    assert!(
        n_merges <= TINY_MAX_MERGES,
        "the built-in vocabulary has only {TINY_MAX_MERGES} merges, {n_merges} requested"
    );
    let merges: Vec<(String, String)> = parse_merges(MERGES_2000)
        .expect("built-in merges are valid")
        .into_iter()
        .take(n_merges)
        .collect();
    build_clip_vocab(&merges)
}

/// Builds CLIP's `vocab.json` and `merges.txt` from a merge list (see [`tiny_vocab`]).
pub fn build_clip_vocab(merges: &[(String, String)]) -> (String, String) {
    let mut tokens: Vec<String> = clip_byte_order().map(String::from).collect();
    let with_eow: Vec<String> = tokens.iter().map(|t| format!("{t}{EOW}")).collect();
    tokens.extend(with_eow);
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.into());
    tokens.push(EOS.into());
    let map: serde_json::Map<String, Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, Value::from(i as u64)))
        .collect();
    let vocab = Value::Object(map).to_string();
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in merges {
        merges_txt.push_str(a);
        merges_txt.push(' ');
        merges_txt.push_str(b);
        merges_txt.push('\n');
    }
    (vocab, merges_txt)
}

/// Parses `merges.txt`: one `left right` pair per line; lines starting with
/// `#version` are skipped (like `tokenizers`, unlike transformers 4's slow tokenizer,
/// which always dropped the first line).
pub fn parse_merges(text: &str) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                merges.push((a.to_string(), b.to_string()))
            }
            _ => bail!(
                "line {}: expected two space-separated tokens, got {line:?}",
                n + 1
            ),
        }
    }
    Ok(merges)
}

pub(super) fn parse_vocab(text: &str) -> Result<HashMap<String, u32>> {
    let raw: HashMap<String, u64> = serde_json::from_str(text)?;
    ensure!(!raw.is_empty(), "the vocabulary is empty");
    raw.into_iter()
        .map(|(k, v)| {
            Ok((
                k,
                u32::try_from(v).map_err(|_| anyhow!("id {v} out of range"))?,
            ))
        })
        .collect()
}

pub(super) fn vocab_merges_from_tokenizer_json(json: &Value) -> Result<VocabAndMerges> {
    let model = json
        .get("model")
        .ok_or_else(|| anyhow!("no \"model\" section"))?;
    if let Some(kind) = model.get("type").and_then(Value::as_str) {
        ensure!(
            kind == "BPE",
            "model type is {kind:?}, a CLIP tokenizer needs \"BPE\""
        );
    }
    let vocab_json = model
        .get("vocab")
        .ok_or_else(|| anyhow!("no model.vocab"))?;
    let vocab: HashMap<String, u32> =
        serde_json::from_value::<HashMap<String, u32>>(vocab_json.clone())
            .context("model.vocab")?;
    ensure!(!vocab.is_empty(), "model.vocab is empty");
    let list = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no model.merges list"))?;
    let mut merges = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let pair = match m {
            Value::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| anyhow!("model.merges[{i}] is not a pair: {m}"))?);
    }
    Ok((vocab, merges))
}

pub(super) fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(value))
}

/// A special token setting as transformers sees it: a plain string (registered with
/// `normalized=false`) or an `AddedToken` with an explicit flag.
#[derive(Debug, Clone)]
struct TokenValue {
    content: String,
    normalized: bool,
}

/// Reads a special token from a config value. `special` is the `special` default
/// transformers uses for dicts in that file (it decides the `normalized` default).
fn token_value(v: &Value, special: bool, what: &str) -> Result<Option<TokenValue>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(TokenValue {
            content: s.clone(),
            normalized: false,
        })),
        Value::Object(o) => {
            let content = o
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| anyhow!("{what}: added token without \"content\""))?;
            let special = o.get("special").and_then(Value::as_bool).unwrap_or(special);
            let normalized = o
                .get("normalized")
                .and_then(Value::as_bool)
                .unwrap_or(!special);
            Ok(Some(TokenValue {
                content: content.into(),
                normalized,
            }))
        }
        other => bail!("{what}: expected a string or an added token, got {other}"),
    }
}

const SPECIAL_KEYS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

/// Mirrors how transformers 5 turns `tokenizer_config.json` and
/// `special_tokens_map.json` into the added tokens of a `CLIPTokenizer`.
pub(super) fn resolve_settings(
    config: Option<&Value>,
    special_map: Option<&Value>,
) -> Result<TokenSettings> {
    let empty = serde_json::Map::new();
    let cfg = match config {
        Some(Value::Object(o)) => o,
        Some(_) => bail!("tokenizer_config.json: expected a JSON object"),
        None => &empty,
    };
    let mut values: HashMap<&str, TokenValue> = HashMap::new();
    for key in SPECIAL_KEYS {
        if let Some(v) = cfg.get(key)
            && let Some(t) = token_value(v, false, &format!("tokenizer_config.json {key}"))?
        {
            values.insert(key, t);
        }
    }

    // `added_tokens_decoder` (current format) or `special_tokens_map.json` (legacy).
    let mut decoder: Vec<(u32, TokenValue)> = Vec::new();
    if let Some(dec) = cfg.get("added_tokens_decoder") {
        let dec = dec.as_object().ok_or_else(|| {
            anyhow!("tokenizer_config.json added_tokens_decoder: expected an object")
        })?;
        for (id, v) in dec {
            let what = format!("tokenizer_config.json added_tokens_decoder[{id}]");
            let id: u32 = id.parse().with_context(|| format!("{what}: bad id"))?;
            if let Some(t) = token_value(v, false, &what)? {
                decoder.push((id, t));
            }
        }
        decoder.sort_by_key(|(id, _)| *id);
    } else if let Some(map) = special_map {
        let map = map
            .as_object()
            .ok_or_else(|| anyhow!("special_tokens_map.json: expected a JSON object"))?;
        for key in SPECIAL_KEYS {
            if let Some(v) = map.get(key)
                && let Some(t) = token_value(v, true, &format!("special_tokens_map.json {key}"))?
            {
                values.insert(key, t);
            }
        }
    }
    // Special tokens named by content take the decoder's flags.
    for t in values.values_mut() {
        if let Some((_, d)) = decoder.iter().find(|(_, d)| d.content == t.content) {
            t.normalized = d.normalized;
        }
    }
    let get = |key: &str, default: &str| {
        values.get(key).cloned().unwrap_or(TokenValue {
            content: default.into(),
            normalized: false,
        })
    };
    let (bos, eos, unk, pad) = (
        get("bos_token", BOS),
        get("eos_token", EOS),
        get("unk_token", EOS),
        get("pad_token", EOS),
    );

    let mut added: Vec<(String, bool, Option<u32>)> = decoder
        .iter()
        .map(|(id, t)| (t.content.clone(), t.normalized, Some(*id)))
        .collect();
    for t in [&bos, &eos, &unk, &pad] {
        added.push((t.content.clone(), t.normalized, None));
    }

    let max_length = match cfg.get("model_max_length") {
        Some(v) => match v.as_u64() {
            Some(n) if (2..=MAX_SANE_LENGTH).contains(&n) => n as usize,
            Some(_) => DEFAULT_MAX_LENGTH,
            // Huge sentinels (1e30) are stored as floats.
            None if v.is_f64() => DEFAULT_MAX_LENGTH,
            None => bail!("tokenizer_config.json model_max_length: expected an integer, got {v}"),
        },
        None => DEFAULT_MAX_LENGTH,
    };
    Ok(TokenSettings {
        bos: bos.content,
        eos: eos.content,
        unk: unk.content,
        pad: pad.content,
        added,
        max_length,
    })
}
