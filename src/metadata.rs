//! The AUTOMATIC1111 `parameters` text: prompt, negative prompt, then `Key: value` pairs.

use std::fmt;

/// Generation settings in A1111's format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub entries: Vec<(String, String)>,
}

impl Parameters {
    pub fn new(prompt: &str, negative_prompt: &str) -> Self {
        Self {
            prompt: prompt.to_string(),
            negative_prompt: negative_prompt.to_string(),
            entries: Vec::new(),
        }
    }

    pub fn push(&mut self, key: &str, value: String) {
        self.entries.push((key.to_string(), value));
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A value with ',', ':' or a newline is written as a JSON string, as A1111 does.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).expect("strings serialise")
    } else {
        v.to_string()
    }
}

impl fmt::Display for Parameters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.prompt)?;
        if !self.negative_prompt.is_empty() {
            writeln!(f, "Negative prompt: {}", self.negative_prompt)?;
        }
        let pairs: Vec<String> = self
            .entries
            .iter()
            .map(|(k, v)| format!("{k}: {}", quote(v)))
            .collect();
        write!(f, "{}", pairs.join(", "))
    }
}

impl Parameters {
    /// Parses A1111 `parameters` text back: prompt lines, an optional `Negative prompt:` part,
    /// then the last line of `Key: value` pairs (values with ',', ':' or a newline are JSON
    /// strings). Text whose last line is not a list of at least three pairs is all prompt, as
    /// A1111 reads it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim_end_matches(['\n', '\r']);
        let (body, last) = match text.rsplit_once('\n') {
            Some((b, l)) => (b, l),
            None => ("", text),
        };
        let (body, entries) = match parse_pairs(last) {
            // As A1111: fewer than three pairs is prompt text.
            Some(e) if e.len() >= 3 => (body, e),
            _ => (text, Vec::new()),
        };
        let (prompt, negative) = match body.find("Negative prompt:") {
            Some(0) => ("", &body["Negative prompt:".len()..]),
            Some(i) if body[..i].ends_with('\n') => {
                (&body[..i - 1], &body[i + "Negative prompt:".len()..])
            }
            _ => (body, ""),
        };
        let negative = negative.strip_prefix(' ').unwrap_or(negative);
        Ok(Self {
            prompt: prompt.to_string(),
            negative_prompt: negative.to_string(),
            entries,
        })
    }
}

/// Parses `Key: value, Key: "quoted, value", ...`; `None` unless the whole line is pairs.
fn parse_pairs(line: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        let colon = rest.find(':')?;
        let key = rest[..colon].trim();
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '/' | '(' | ')'))
        {
            return None;
        }
        rest = rest[colon + 1..].trim_start();
        let value;
        if rest.starts_with('"') {
            // A JSON string: find its closing quote, honouring escapes.
            let bytes = rest.as_bytes();
            let mut i = 1;
            let mut end = None;
            while i < bytes.len() {
                match bytes[i] {
                    b'\\' => i += 2,
                    b'"' => {
                        end = Some(i);
                        break;
                    }
                    _ => i += 1,
                }
            }
            let end = end?;
            value = serde_json::from_str::<String>(&rest[..=end]).ok()?;
            rest = rest[end + 1..].trim_start();
            match rest.strip_prefix(',') {
                Some(r) => rest = r.trim_start(),
                None if rest.is_empty() => {}
                None => return None,
            }
        } else {
            match rest.find(',') {
                Some(i) => {
                    value = rest[..i].trim().to_string();
                    rest = rest[i + 1..].trim_start();
                }
                None => {
                    value = rest.trim().to_string();
                    rest = "";
                }
            }
        }
        out.push((key.to_string(), value));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_layout() {
        let mut p = Parameters::new("a car, red", "");
        p.push("Steps", "50".into());
        p.push("TKG center", "0,0".into());
        assert_eq!(p.to_string(), "a car, red\nSteps: 50, TKG center: \"0,0\"");
        let p = Parameters::new("x", "blurry");
        assert_eq!(p.to_string(), "x\nNegative prompt: blurry\n");
    }

    #[test]
    fn parses_what_it_writes() {
        let mut p = Parameters::new("a car, red\nsecond line: yes", "blurry,\nugly");
        p.push("Steps", "50".into());
        p.push("Seed", "42".into());
        p.push("TKG center", "0,0;0.5,-0.25".into());
        p.push("Note", "say \"hi\": a\\b\nc".into());
        p.push("Size", "512x512".into());
        let back = Parameters::parse(&p.to_string()).unwrap();
        assert_eq!(back, p);
        let q = Parameters::new("only prompt", "");
        let mut q2 = q.clone();
        q2.push("Steps", "2".into());
        q2.push("Seed", "3".into());
        q2.push("Model", "m".into());
        assert_eq!(Parameters::parse(&q2.to_string()).unwrap(), q2);
    }

    #[test]
    fn parses_a1111_text() {
        let text = "masterpiece, a cat\nNegative prompt: lowres\nSteps: 20, Sampler: Euler a, \
                    CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: abcdef1234, \
                    Lora hashes: \"x: 1234, y: 5678\", Version: v1.9.0";
        let p = Parameters::parse(text).unwrap();
        assert_eq!(p.prompt, "masterpiece, a cat");
        assert_eq!(p.negative_prompt, "lowres");
        assert_eq!(p.get("Sampler"), Some("Euler a"));
        assert_eq!(p.get("Lora hashes"), Some("x: 1234, y: 5678"));
        assert_eq!(p.get("Version"), Some("v1.9.0"));
        // A bare prompt is all prompt.
        let p = Parameters::parse("just a prompt, with a comma").unwrap();
        assert_eq!(p.prompt, "just a prompt, with a comma");
        assert!(p.entries.is_empty());
    }
}
