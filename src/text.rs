//! Text from untrusted places (a PNG's chunks, a job file, a prompt) made safe to print on a
//! terminal: escape sequences in it could otherwise clear, retitle or reprogram the terminal,
//! and bidirectional-override characters could make it read differently from what it is.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Controls a terminal may act on: C0 (but `\n` and `\t`, which lay text out), DEL and C1
/// (`char::is_control` is exactly those three ranges), plus the bidirectional embeddings,
/// overrides, isolates and marks, which reorder what is shown ("Trojan Source").
fn is_unsafe(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every unsafe control written as a visible escape: `\x1b` for C0 and DEL,
/// `\u{9b}` for C1 and bidi controls (so the escape says which code point it was). Printable text, line
/// breaks and tabs are kept as they are.
pub fn terminal_safe(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c as u32 {
            _ if !is_unsafe(c) => out.push(c),
            n @ (0..=0x1f | 0x7f) => write!(out, "\\x{n:02x}").expect("String writes"),
            n => write!(out, "\\u{{{n:x}}}").expect("String writes"),
        }
    }
    Cow::Owned(out)
}

/// serde_json escapes C0 controls but writes DEL, C1 and the bidi controls as they are; those
/// can only occur inside JSON strings, so escaping them as `\uXXXX` keeps the same JSON value.
pub fn json_terminal_safe(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if is_unsafe(c) {
            write!(out, "\\u{:04x}", c as u32).expect("String writes");
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_become_visible_escapes() {
        assert!(matches!(
            terminal_safe("a cat\n\tsitting"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            terminal_safe("x\u{1b}[2Jy\u{1b}]0;owned\u{7}z"),
            "x\\x1b[2Jy\\x1b]0;owned\\x07z"
        );
        assert_eq!(terminal_safe("\r\0\u{7f}"), "\\x0d\\x00\\x7f");
        assert_eq!(terminal_safe("a\u{9b}31mb\u{85}"), "a\\u{9b}31mb\\u{85}");
        assert_eq!(terminal_safe("a\u{202e}gnp.exe"), "a\\u{202e}gnp.exe");
        assert_eq!(terminal_safe("\u{2067}x\u{2069}"), "\\u{2067}x\\u{2069}");
        // Printable non-ASCII text stays.
        assert_eq!(terminal_safe("café 猫 \u{a0}"), "café 猫 \u{a0}");
    }

    #[test]
    fn json_keeps_its_value_and_loses_raw_controls() {
        let s = "a\u{1b}[2J\u{7f}\u{9b}\u{202e}b\n";
        let json =
            json_terminal_safe(&serde_json::to_string(&serde_json::json!({ "p": s })).unwrap());
        assert!(!json.chars().any(is_unsafe), "{json:?}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["p"], s);
    }
}
