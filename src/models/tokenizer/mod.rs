//! CLIP BPE tokenizer, token-for-token equal to what diffusers' Stable Diffusion
//! pipelines get from `transformers.CLIPTokenizer` (transformers 5.x) for
//! `tokenizer(prompt, padding="max_length", max_length=77, truncation=True)`.
//!
//! transformers 5 has only one `CLIPTokenizer`: it is backed by the `tokenizers`
//! library and rebuilds its pipeline from `vocab.json` + `merges.txt` (or from the
//! vocabulary and merges inside `tokenizer.json`, whose own pipeline it ignores):
//!
//! 1. added tokens whose `normalized` flag is false (by default the special tokens:
//!    `<|startoftext|>`, `<|endoftext|>` and, for SDXL's `tokenizer_2`, the pad
//!    token `!`) are cut out of the raw text, case-sensitively;
//! 2. each remaining piece is NFC-normalised and lower-cased character by character
//!    (`Σ` always becomes `σ`, `İ` becomes `i` + U+0307); then added tokens whose
//!    `normalized` flag is true are cut out of the normalised text;
//! 3. the text is split with CLIP's pattern
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    (whitespace is dropped), and each piece again with GPT-2's byte-level pattern
//!    (which only changes the two literal special-token alternatives: a lower-cased
//!    `<|endoftext|>` that was not cut out as an added token becomes `<|`, `endoftext`, `|>`);
//! 4. each piece's UTF-8 bytes are mapped with `bytes_to_unicode` and BPE-merged,
//!    with `</w>` appended to the piece's last symbol;
//! 5. `[bos] + tokens[..max_length - 2] + [eos]`, padded with the pad token.
//!
//! No control-character removal, no spacing around CJK characters and no ftfy: those
//! belonged to transformers 4's slow (pure Python) `CLIPTokenizer`, which 5.x removed.

mod files;

use files::{
    TokenSettings, parse_vocab, read_json_opt, resolve_settings, vocab_merges_from_tokenizer_json,
};
pub use files::{build_clip_vocab, parse_merges, tiny_vocab};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, anyhow, ensure};
use regex::Regex;

/// CLIP's text context length (`model_max_length` of every SD tokenizer).
pub const DEFAULT_MAX_LENGTH: usize = 77;
/// Number of CLIP merges shipped in `assets/tokenizer/clip-merges-2000.txt`.
pub const TINY_MAX_MERGES: usize = 2000;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const EOW: &str = "</w>";
/// transformers' `tokenizers`-backed BPE caches at most this many words.
const CACHE_CAPACITY: usize = 10_000;
/// `model_max_length` values above this are transformers' "no limit" sentinel.
const MAX_SANE_LENGTH: u64 = 1_000_000;

const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's byte-level pattern without its whitespace alternatives (CLIP's pieces
/// never contain whitespace, and `\s+(?!\S)` needs look-ahead).
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

static MERGES_2000: &str = include_str!("../../../assets/tokenizer/clip-merges-2000.txt");

/// A vocabulary (token -> id) and the merge list in rank order.
type VocabAndMerges = (HashMap<String, u32>, Vec<(String, String)>);

/// One encoded prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// Exactly `max_length` ids: bos, the first `max_length - 2` tokens, eos, then padding.
    pub ids: Vec<u32>,
    /// The prompt had more than `max_length - 2` tokens; the rest was dropped.
    pub truncated: bool,
    /// Number of prompt tokens before truncation, without bos/eos.
    pub n_tokens: usize,
}

/// A token matched as a whole before BPE (special tokens and other added tokens).
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    /// Matched in the normalised (lower-cased) text rather than in the raw text.
    normalized: bool,
}

/// CLIP tokenizer; see the module documentation for the exact rules.
#[derive(Debug)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// id -> token string, for decoding.
    id_to_token: Vec<Option<String>>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Vocabulary id of each byte's character, and of that character + `</w>`.
    byte_ids: [Option<u32>; 256],
    byte_eow_ids: [Option<u32>; 256],
    /// Added tokens matched in the raw text / in the normalised text.
    raw_added: Vec<AddedToken>,
    normalized_added: Vec<AddedToken>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    pad_token: String,
    max_length: usize,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` (or `tokenizer_2/`) folder: `vocab.json` +
    /// `merges.txt`, or the vocabulary and merges inside `tokenizer.json` when that
    /// exists (transformers 5 rebuilds CLIP's pipeline from those and ignores the rest
    /// of the file), plus `tokenizer_config.json` / `special_tokens_map.json` when
    /// present (special tokens, their `normalized` flags, pad token, `model_max_length`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let config = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json_opt(&dir.join("special_tokens_map.json"))?;
        let settings = resolve_settings(config.as_ref(), special_map.as_ref())?;

        let tokenizer_json = dir.join("tokenizer.json");
        let (vocab, merges) = if tokenizer_json.is_file() {
            let json = read_json_opt(&tokenizer_json)?.expect("file exists");
            vocab_merges_from_tokenizer_json(&json)
                .with_context(|| format!("reading {}", tokenizer_json.display()))?
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            let vocab_text = std::fs::read_to_string(&vocab_path)
                .with_context(|| format!("reading {}", vocab_path.display()))?;
            let vocab = parse_vocab(&vocab_text)
                .with_context(|| format!("parsing {}", vocab_path.display()))?;
            let merges_text = std::fs::read_to_string(&merges_path)
                .with_context(|| format!("reading {}", merges_path.display()))?;
            let merges = parse_merges(&merges_text)
                .with_context(|| format!("parsing {}", merges_path.display()))?;
            (vocab, merges)
        };
        Self::build(vocab, &merges, settings)
            .with_context(|| format!("building the CLIP tokenizer from {}", dir.display()))
    }

    /// Builds a tokenizer from the contents of `vocab.json` and `merges.txt`, with
    /// `<|startoftext|>`/`<|endoftext|>` as bos/eos/unk, the given pad token (which is
    /// also matched as a special token in prompts, as transformers does) and
    /// `max_length` 77.
    pub fn from_strings(vocab_json: &str, merges_txt: &str, pad_token: &str) -> Result<Self> {
        let vocab = parse_vocab(vocab_json).context("parsing vocab.json")?;
        let merges = parse_merges(merges_txt).context("parsing merges.txt")?;
        Self::build(vocab, &merges, TokenSettings::defaults(pad_token))
    }

    /// The built-in tokenizer for tiny test models: [`tiny_vocab`]`(n_merges)` with
    /// `<|endoftext|>` as pad token.
    pub fn tiny(n_merges: usize) -> Result<Self> {
        ensure!(
            n_merges <= TINY_MAX_MERGES,
            "the built-in vocabulary has only {TINY_MAX_MERGES} merges, {n_merges} requested"
        );
        let (vocab, merges) = tiny_vocab(n_merges);
        Self::from_strings(&vocab, &merges, EOS)
    }

    /// Same tokenizer with another output length (`max_length - 2` prompt tokens).
    pub fn with_max_length(mut self, max_length: usize) -> Result<Self> {
        ensure!(
            max_length >= 2,
            "max_length must leave room for bos and eos, got {max_length}"
        );
        self.max_length = max_length;
        Ok(self)
    }

    fn build(
        vocab: HashMap<String, u32>,
        merges: &[(String, String)],
        s: TokenSettings,
    ) -> Result<Self> {
        let mut id_to_token: Vec<Option<String>> = Vec::new();
        let put = |table: &mut Vec<Option<String>>, id: u32, tok: &str| {
            let i = id as usize;
            if table.len() <= i {
                table.resize(i + 1, None);
            }
            table[i] = Some(tok.to_string());
        };
        for (tok, &id) in &vocab {
            put(&mut id_to_token, id, tok);
        }

        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let id_of = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    anyhow!(
                        "merge {} ({a} {b}): token {t:?} is not in vocab.json",
                        rank + 1
                    )
                })
            };
            let merged = format!("{a}{b}");
            let key = (id_of(a)?, id_of(b)?);
            let value = (rank as u32, id_of(&merged)?);
            // Like `tokenizers`, a repeated pair keeps its last rank.
            merge_map.insert(key, value);
        }

        let mut byte_ids = [None; 256];
        let mut byte_eow_ids = [None; 256];
        let mut buf = String::new();
        for (b, &c) in byte_table().iter().enumerate() {
            buf.clear();
            buf.push(c);
            byte_ids[b] = vocab.get(&buf).copied();
            buf.push_str(EOW);
            byte_eow_ids[b] = vocab.get(&buf).copied();
        }

        // Added tokens: the last registration of a content wins (transformers
        // re-adds the special tokens after the ones in `added_tokens_decoder`).
        let mut added: Vec<AddedToken> = Vec::new();
        for (content, normalized, id) in &s.added {
            let id = match vocab.get(content) {
                Some(&id) => id,
                None => {
                    id.ok_or_else(|| anyhow!("special token {content:?} is not in the vocabulary"))?
                }
            };
            put(&mut id_to_token, id, content);
            if let Some(t) = added.iter_mut().find(|t| &t.content == content) {
                t.normalized = *normalized;
                t.id = id;
            } else {
                added.push(AddedToken {
                    content: content.clone(),
                    id,
                    normalized: *normalized,
                });
            }
        }
        let id_of_special = |what: &str, t: &str| {
            added
                .iter()
                .find(|a| a.content == t)
                .map(|a| a.id)
                .or_else(|| vocab.get(t).copied())
                .ok_or_else(|| anyhow!("{what} token {t:?} is not in the vocabulary"))
        };
        let bos_id = id_of_special("bos", &s.bos)?;
        let eos_id = id_of_special("eos", &s.eos)?;
        let unk_id = id_of_special("unk", &s.unk)?;
        let pad_id = id_of_special("pad", &s.pad)?;

        // Compile the shared patterns now rather than in the first `encode`.
        patterns();

        let (normalized_added, raw_added): (Vec<_>, Vec<_>) =
            added.into_iter().partition(|t| t.normalized);
        let normalized_added = normalized_added
            .into_iter()
            .map(|mut t| {
                t.content = normalize(&t.content);
                t
            })
            .filter(|t| !t.content.is_empty())
            .collect();
        let raw_added = raw_added
            .into_iter()
            .filter(|t| !t.content.is_empty())
            .collect();

        Ok(ClipTokenizer {
            vocab,
            id_to_token,
            merges: merge_map,
            byte_ids,
            byte_eow_ids,
            raw_added,
            normalized_added,
            bos_id,
            eos_id,
            pad_id,
            unk_id,
            pad_token: s.pad,
            max_length: s.max_length,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Encodes a prompt like diffusers: `max_length` ids, truncated to
    /// `max_length - 2` prompt tokens.
    pub fn encode(&self, text: &str) -> Result<Encoding> {
        let tokens = self.tokenize(text)?;
        let n_tokens = tokens.len();
        let keep = self.max_length.saturating_sub(2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens[..n_tokens.min(keep)]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(Encoding {
            ids,
            truncated: n_tokens > keep,
            n_tokens,
        })
    }

    /// All of a prompt's token ids, without bos/eos, padding or truncation.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for seg in split_added(text, &self.raw_added) {
            match seg {
                Segment::Added(id) => out.push(id),
                Segment::Text(raw) => {
                    let normalized = normalize(raw);
                    for seg in split_added(&normalized, &self.normalized_added) {
                        match seg {
                            Segment::Added(id) => out.push(id),
                            Segment::Text(t) => self.tokenize_normalized(t, &mut out),
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// What diffusers prints when it truncates a prompt: the decoded tokens that were
    /// dropped, or `None` when the prompt fits.
    pub fn removed_text(&self, text: &str) -> Result<Option<String>> {
        let tokens = self.tokenize(text)?;
        let keep = self.max_length.saturating_sub(2);
        if tokens.len() <= keep {
            return Ok(None);
        }
        self.decode(&tokens[keep..]).map(Some)
    }

    fn tokenize_normalized(&self, text: &str, out: &mut Vec<u32>) {
        let (clip, byte_level) = patterns();
        for m in clip.find_iter(text) {
            for piece in byte_level.find_iter(m.as_str()) {
                self.bpe(piece.as_str(), out);
            }
        }
    }

    /// Byte-level BPE of one pre-token, with `</w>` on its last symbol.
    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        if let Some(ids) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(piece)
        {
            out.extend_from_slice(ids);
            return;
        }
        let bytes = piece.as_bytes();
        let Some(last) = bytes.len().checked_sub(1) else {
            return;
        };
        // Symbols not in the vocabulary become `unk` and never merge.
        let mut syms: Vec<Option<u32>> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if i == last {
                    self.byte_eow_ids[b as usize]
                } else {
                    self.byte_ids[b as usize]
                }
            })
            .collect();
        let mut next = Vec::with_capacity(syms.len());
        while syms.len() > 1 {
            let mut best: Option<((u32, u32), (u32, u32))> = None;
            for w in syms.windows(2) {
                if let (Some(a), Some(b)) = (w[0], w[1])
                    && let Some(&(rank, merged)) = self.merges.get(&(a, b))
                    && best.is_none_or(|(_, (r, _))| rank < r)
                {
                    best = Some(((a, b), (rank, merged)));
                }
            }
            let Some(((a, b), (_, merged))) = best else {
                break;
            };
            next.clear();
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == Some(a) && syms[i + 1] == Some(b) {
                    next.push(Some(merged));
                    i += 2;
                } else {
                    next.push(syms[i]);
                    i += 1;
                }
            }
            std::mem::swap(&mut syms, &mut next);
        }
        let ids: Vec<u32> = syms.into_iter().map(|s| s.unwrap_or(self.unk_id)).collect();
        out.extend_from_slice(&ids);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() < CACHE_CAPACITY {
            cache.insert(piece.to_string(), ids);
        }
    }

    /// Decodes ids like transformers 5's `CLIPTokenizer.decode` (special tokens kept):
    /// byte-level decoding (invalid UTF-8 becomes U+FFFD), every `</w>` becomes a
    /// space, and the result is trimmed.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let byte_of = byte_decoder();
        let mut bytes = Vec::new();
        for &id in ids {
            let tok = self
                .id_to_token
                .get(id as usize)
                .and_then(|t| t.as_deref())
                .ok_or_else(|| anyhow!("token id {id} is not in the vocabulary"))?;
            let mapped: Option<Vec<u8>> = tok.chars().map(|c| byte_of.get(&c).copied()).collect();
            match mapped {
                Some(b) => bytes.extend(b),
                None => bytes.extend_from_slice(tok.as_bytes()),
            }
        }
        let text = String::from_utf8_lossy(&bytes).replace(EOW, " ");
        Ok(text.trim().to_string())
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn pad_token(&self) -> &str {
        &self.pad_token
    }

    /// Length of every [`Encoding::ids`] (`model_max_length`, 77 for SD).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Number of entries in the vocabulary (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Id of a vocabulary token (e.g. `"cat</w>"`), if present.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }
}

enum Segment<'a> {
    Text(&'a str),
    Added(u32),
}

/// Splits `text` on the added tokens, leftmost-longest (like `tokenizers`).
fn split_added<'a>(text: &'a str, added: &[AddedToken]) -> Vec<Segment<'a>> {
    if added.is_empty() {
        return vec![Segment::Text(text)];
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let best = added
            .iter()
            .filter(|t| rest.starts_with(t.content.as_str()))
            .max_by_key(|t| t.content.len());
        if let Some(t) = best {
            if start < i {
                out.push(Segment::Text(&text[start..i]));
            }
            out.push(Segment::Added(t.id));
            i += t.content.len();
            start = i;
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    if start < text.len() {
        out.push(Segment::Text(&text[start..]));
    }
    out
}

/// NFC, then per-character lower-casing (no final-sigma rule), like the `tokenizers`
/// normalisers transformers 5 uses. Whitespace is left alone: it is dropped by the
/// pre-tokenizer anyway.
fn normalize(text: &str) -> String {
    if text.is_ascii() {
        return text.to_ascii_lowercase();
    }
    let mut n = tokenizers::NormalizedString::from(text);
    n.nfc();
    n.get().chars().flat_map(char::to_lowercase).collect()
}

fn patterns() -> &'static (Regex, Regex) {
    static PATTERNS: OnceLock<(Regex, Regex)> = OnceLock::new();
    PATTERNS.get_or_init(|| {
        let clip = Regex::new(CLIP_PATTERN).expect("CLIP pattern compiles");
        let byte_level = Regex::new(BYTE_LEVEL_PATTERN).expect("byte-level pattern compiles");
        // The regex engine builds its automaton lazily, which makes the first prompts
        // that meet a new character cost tens of microseconds per word. Run both
        // patterns once over every printable ASCII character in every context the
        // patterns distinguish, plus common scripts, so that later prompts are fast.
        let mut warm = String::new();
        for prefix in [" ", "a", "1", ",", "'", "<|"] {
            for c in (b' '..=b'~').map(char::from) {
                warm.push_str(prefix);
                warm.push(c);
                warm.push(' ');
            }
        }
        warm.push_str(
            "\t\n <|startoftext|> <|endoftext|> éèàçñüöß αβγ жизнь 東京タワー 한국어 🚗👍🏽",
        );
        for m in clip.find_iter(&warm) {
            for _ in byte_level.find_iter(m.as_str()) {}
        }
        (clip, byte_level)
    })
}

fn is_printable_byte(b: u8) -> bool {
    (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
}

/// GPT-2's reversible byte -> printable character table (`bytes_to_unicode`),
/// indexed by byte: printable bytes map to themselves, the others to U+0100.. in
/// byte order.
fn byte_table() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = ['\0'; 256];
        let mut n = 0;
        for b in 0..=255u8 {
            table[b as usize] = if is_printable_byte(b) {
                char::from(b)
            } else {
                n += 1;
                char::from_u32(255 + n).expect("valid char")
            };
        }
        table
    })
}

/// The byte characters in the order CLIP's vocabulary lists them (the iteration
/// order of `bytes_to_unicode()`: printable bytes first, then the others).
fn clip_byte_order() -> impl Iterator<Item = char> {
    let table = byte_table();
    (0..=255u8)
        .filter(|&b| is_printable_byte(b))
        .chain((0..=255u8).filter(|&b| !is_printable_byte(b)))
        .map(|b| table[b as usize])
}

fn byte_decoder() -> &'static HashMap<char, u8> {
    static DECODER: OnceLock<HashMap<char, u8>> = OnceLock::new();
    DECODER.get_or_init(|| {
        let mut m = HashMap::new();
        for (b, &c) in byte_table().iter().enumerate() {
            m.insert(c, b as u8);
        }
        m
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn tiny() -> ClipTokenizer {
        ClipTokenizer::tiny(TINY_MAX_MERGES).unwrap()
    }

    #[test]
    fn byte_table_is_gpt2_bytes_to_unicode() {
        let table = byte_table();
        let mut seen = std::collections::HashSet::new();
        for (b, &c) in table.iter().enumerate() {
            assert!(seen.insert(c), "duplicate char for byte {b}");
            if is_printable_byte(b as u8) {
                assert_eq!(c as u32, b as u32);
            } else {
                // The 68 other bytes map to U+0100.. in byte order.
                let rank = (0..b as u8).filter(|&x| !is_printable_byte(x)).count() as u32;
                assert_eq!(c as u32, 256 + rank);
            }
        }
        assert_eq!((0..=255u8).filter(|&b| !is_printable_byte(b)).count(), 68);
        for (b, &c) in table.iter().enumerate() {
            assert_eq!(byte_decoder()[&c] as usize, b);
        }
    }

    #[test]
    fn tiny_vocab_layout() {
        let (vocab_json, merges_txt) = tiny_vocab(10);
        let vocab = parse_vocab(&vocab_json).unwrap();
        let merges = parse_merges(&merges_txt).unwrap();
        assert_eq!(merges.len(), 10);
        assert_eq!(vocab.len(), 2 * 256 + 10 + 2);
        for (i, c) in clip_byte_order().enumerate() {
            assert_eq!(vocab[&c.to_string()], i as u32);
            assert_eq!(vocab[&format!("{c}</w>")], 256 + i as u32);
        }
        for (i, (a, b)) in merges.iter().enumerate() {
            assert_eq!(vocab[&format!("{a}{b}")], 512 + i as u32);
        }
        assert_eq!(vocab[BOS], 522);
        assert_eq!(vocab[EOS], 523);
        assert!(merges_txt.starts_with("#version: 0.2\n"));
        // Prefixes of the same list.
        let (_, m2000) = tiny_vocab(TINY_MAX_MERGES);
        assert!(m2000.starts_with(&merges_txt));
        assert_eq!(parse_merges(&m2000).unwrap().len(), TINY_MAX_MERGES);
    }

    #[test]
    #[should_panic(expected = "only 2000 merges")]
    fn tiny_vocab_rejects_too_many_merges() {
        tiny_vocab(TINY_MAX_MERGES + 1);
    }

    #[test]
    fn parse_merges_rules() {
        let m = parse_merges("#version: 0.2\na b\nab c</w>\n").unwrap();
        assert_eq!(
            m,
            vec![("a".into(), "b".into()), ("ab".into(), "c</w>".into())]
        );
        // No header: nothing is dropped (transformers 4's slow tokenizer dropped line 1).
        assert_eq!(parse_merges("a b").unwrap().len(), 1);
        let err = parse_merges("#version: 0.2\na b\nabc\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(parse_merges("a b c\n").is_err());
        assert!(parse_merges("a b\n\nc d\n").is_err());
    }

    #[test]
    fn encode_shape_padding_and_truncation() {
        let tok = tiny();
        let e = tok.encode("a photo of a cat").unwrap();
        assert_eq!(e.ids.len(), DEFAULT_MAX_LENGTH);
        assert_eq!(e.ids[0], tok.bos_id());
        let words = ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"];
        let expect: Vec<u32> = words.iter().map(|w| tok.token_to_id(w).unwrap()).collect();
        assert_eq!(&e.ids[1..6], &expect[..]);
        assert_eq!(e.ids[6], tok.eos_id());
        assert!(e.ids[7..].iter().all(|&i| i == tok.pad_id()));
        assert_eq!((e.n_tokens, e.truncated), (5, false));

        let fits = "a ".repeat(75);
        let e = tok.encode(&fits).unwrap();
        assert_eq!((e.n_tokens, e.truncated), (75, false));
        assert_eq!(e.ids[76], tok.eos_id());
        assert_eq!(tok.removed_text(&fits).unwrap(), None);

        let long = format!("{}cat dog", "a ".repeat(75));
        let e = tok.encode(&long).unwrap();
        assert_eq!((e.n_tokens, e.truncated), (77, true));
        assert_eq!(e.ids.len(), 77);
        assert_eq!(e.ids[75], tok.token_to_id("a</w>").unwrap());
        assert_eq!(e.ids[76], tok.eos_id());
        assert_eq!(tok.removed_text(&long).unwrap().as_deref(), Some("cat dog"));

        let empty = tok.encode("").unwrap();
        assert_eq!((empty.ids[1], empty.n_tokens), (tok.eos_id(), 0));
        assert_eq!(tok.encode("  \t\n ").unwrap(), empty);
    }

    #[test]
    fn with_max_length() {
        let tok = tiny().with_max_length(8).unwrap();
        let e = tok.encode("a photo of a cat on a mat").unwrap();
        assert_eq!(e.ids.len(), 8);
        assert!(e.truncated);
        assert_eq!(e.ids[7], tok.eos_id());
        assert!(tiny().with_max_length(1).is_err());
    }

    #[test]
    fn special_tokens_in_prompts() {
        let tok = tiny();
        let ids = tok.tokenize("x<|endoftext|>y <|startoftext|>").unwrap();
        let x = tok.token_to_id("x</w>").unwrap();
        let y = tok.token_to_id("y</w>").unwrap();
        assert_eq!(ids, vec![x, tok.eos_id(), y, tok.bos_id()]);
        // Not normalised: upper case is ordinary text, split like GPT-2 would.
        let upper = tok.tokenize("<|ENDOFTEXT|>").unwrap();
        assert!(!upper.contains(&tok.eos_id()));
        assert_eq!(
            tok.decode(&upper).unwrap().replace(' ', ""),
            "<|endoftext|>"
        );

        // A pad token "!" is a special token too (SDXL's tokenizer_2).
        let (v, m) = tiny_vocab(TINY_MAX_MERGES);
        let bang = ClipTokenizer::from_strings(&v, &m, "!").unwrap();
        assert_eq!(bang.pad_id(), bang.token_to_id("!").unwrap());
        assert_eq!(bang.tokenize("!!").unwrap(), vec![bang.pad_id(); 2]);
        assert_ne!(tok.tokenize("!!").unwrap(), vec![bang.pad_id(); 2]);
    }

    #[test]
    fn decode_roundtrip() {
        let tok = tiny();
        for text in ["a photo of a cat", "café 東京 🚗", "x<|endoftext|>y"] {
            let ids = tok.tokenize(text).unwrap();
            let decoded = tok.decode(&ids).unwrap();
            assert_eq!(decoded.replace(' ', ""), text.replace(' ', ""), "{text}");
        }
        assert!(tok.decode(&[u32::MAX]).is_err());
        // A lone continuation byte decodes to U+FFFD.
        let cont = tok.token_to_id(&byte_table()[0x80].to_string()).unwrap();
        assert_eq!(tok.decode(&[cont]).unwrap(), "\u{FFFD}");
    }

    #[test]
    fn bpe_cache_is_transparent() {
        let tok = tiny();
        let first = tok.tokenize("photography photographs").unwrap();
        let second = tok.tokenize("photography photographs").unwrap();
        assert_eq!(first, second);
        let fresh = tiny().tokenize("photographs photography").unwrap();
        assert_eq!(
            fresh,
            [&first[first.len() / 2..], &first[..first.len() / 2]].concat()
        );
    }

    #[test]
    fn unknown_bytes_become_unk() {
        // A vocabulary without the byte "z": its symbols map to unk and never merge.
        let (v, m) = tiny_vocab(0);
        let mut vocab: serde_json::Map<String, Value> = serde_json::from_str(&v).unwrap();
        vocab.remove("z</w>");
        let tok = ClipTokenizer::from_strings(&Value::Object(vocab).to_string(), &m, EOS).unwrap();
        let ids = tok.tokenize("az").unwrap();
        assert_eq!(ids, vec![tok.token_to_id("a").unwrap(), tok.eos_id()]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (v, m) = tiny_vocab(5);
        assert!(ClipTokenizer::from_strings("{", &m, EOS).is_err());
        assert!(ClipTokenizer::from_strings(&v, &m, "<pad>").is_err());
        assert!(ClipTokenizer::from_strings(&v, "#version: 0.2\nq qq\n", EOS).is_err());
        assert!(ClipTokenizer::tiny(TINY_MAX_MERGES + 1).is_err());
    }

    #[test]
    fn settings_resolution() {
        let cfg: Value = serde_json::json!({
            "bos_token": {"__type": "AddedToken", "content": BOS, "normalized": true},
            "eos_token": {"__type": "AddedToken", "content": EOS, "normalized": true},
            "pad_token": EOS,
            "model_max_length": 77
        });
        let s = resolve_settings(Some(&cfg), None).unwrap();
        let last = |c: &str| s.added.iter().rev().find(|t| t.0 == c).unwrap().1;
        assert!(last(BOS));
        assert!(!last(EOS), "the plain-string pad token is registered last");
        let huge = serde_json::json!({"model_max_length": 1e30});
        assert_eq!(
            resolve_settings(Some(&huge), None).unwrap().max_length,
            DEFAULT_MAX_LENGTH
        );
        let bad = serde_json::json!({"pad_token": 3});
        assert!(resolve_settings(Some(&bad), None).is_err());
    }

    /// transformers 5's `CLIPTokenizer` pipeline, rebuilt with the `tokenizers` crate
    /// exactly as `tokenization_clip.py` configures it: an independent oracle.
    fn oracle(vocab_json: &str, merges_txt: &str, specials: &[&str]) -> tokenizers::Tokenizer {
        let merges: Vec<Value> = parse_merges(merges_txt)
            .unwrap()
            .into_iter()
            .map(|(a, b)| serde_json::json!([a, b]))
            .collect();
        let vocab: Value = serde_json::from_str(vocab_json).unwrap();
        let added: Vec<Value> = specials
            .iter()
            .map(|s| {
                serde_json::json!({"id": vocab[*s], "content": s, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_PATTERN}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
                "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": merges}
        });
        json.to_string().parse().unwrap()
    }

    /// Deterministic xorshift, to stay free of a `rand` dependency in this module.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn matches_tokenizers_pipeline_on_random_text() {
        let (v, m) = tiny_vocab(TINY_MAX_MERGES);
        for pad in [EOS, "!"] {
            let tok = ClipTokenizer::from_strings(&v, &m, pad).unwrap();
            let oracle = oracle(&v, &m, &[BOS, EOS, pad]);
            let pool: Vec<&str> = vec![
                "a",
                "e",
                "i",
                "o",
                "s",
                "t",
                "n",
                "r",
                "h",
                "l",
                "in",
                "the",
                "ing",
                "photo",
                "cat",
                " ",
                "  ",
                "\t",
                "\n",
                "'s",
                "'t",
                "'ll",
                "'",
                "\"",
                ",",
                ".",
                "!",
                "?",
                "-",
                "_",
                "(",
                ")",
                "<",
                "|",
                ">",
                "1",
                "23",
                "½",
                "²",
                "A",
                "Q",
                "É",
                "é",
                "e\u{301}",
                "\u{301}",
                "ß",
                "İ",
                "Σ",
                "σ",
                "東",
                "京",
                "タ",
                "ワ",
                "ー",
                "한",
                "Ж",
                "م",
                "\u{200b}",
                "\u{200d}",
                "\u{feff}",
                "\u{0}",
                "\u{7}",
                "\u{85}",
                "\u{a0}",
                "\u{3000}",
                "\u{2028}",
                "🚗",
                "👍",
                "\u{1f3fd}",
                "Ａ",
                "１",
                "ﬁ",
                "<|endoftext|>",
                "<|startoftext|>",
                "<|ENDOFTEXT|>",
                "endoftext",
                "\u{fffd}",
                "\u{e000}",
            ];
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            for _ in 0..3000 {
                let n = 1 + rng.below(24);
                let text: String = (0..n).map(|_| pool[rng.below(pool.len())]).collect();
                let expect = oracle
                    .encode(text.as_str(), false)
                    .unwrap()
                    .get_ids()
                    .to_vec();
                assert_eq!(
                    tok.tokenize(&text).unwrap(),
                    expect,
                    "pad {pad:?}, text {text:?}"
                );
            }
        }
    }
}
