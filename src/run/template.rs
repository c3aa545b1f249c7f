//! Output-name templates such as `assets/{index:05}-{slug}-{seed}.png`.

use crate::color::KeyColor;

/// The fields a template may use.
pub const TEMPLATE_FIELDS: [&str; 8] = [
    "index", "seed", "slug", "color", "model", "date", "image", "line",
];

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field {
        name: String,
        width: usize,
        zero: bool,
    },
}

/// An output-name template such as `assets/{index:05}-{slug}-{seed}.png`. `{{` and `}}` are
/// literal braces.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// Values for a template.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    pub index: usize,
    pub seed: u64,
    pub prompt: &'a str,
    /// `None`: chosen at run time (`--color auto`), named `auto`.
    pub color: Option<&'a KeyColor>,
    pub model: &'a str,
    pub date: &'a str,
    /// The image's number within its job (0-based).
    pub image: usize,
    /// The job's line in its file (1-based; 0 for the command line).
    pub line: usize,
}

impl Template {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut spec = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => spec.push(c),
                            None => return Err(format!("unclosed '{{' in template '{s}'")),
                        }
                    }
                    let (name, fmt) = match spec.split_once(':') {
                        Some((n, f)) => (n.trim(), Some(f.trim())),
                        None => (spec.trim(), None),
                    };
                    if !TEMPLATE_FIELDS.contains(&name) {
                        return Err(format!(
                            "unknown field '{{{name}}}' in template '{s}' (fields: {})",
                            TEMPLATE_FIELDS.join(", ")
                        ));
                    }
                    let (width, zero) = match fmt {
                        None | Some("") => (0, false),
                        Some(f) => {
                            let zero = f.starts_with('0') && f.len() > 1;
                            let w: usize = f.parse().map_err(|_| {
                                format!("bad format '{f}' for {{{name}}} in '{s}' (use e.g. {{{name}:05}})")
                            })?;
                            if w > 64 {
                                return Err(format!("width {w} for {{{name}}} is too large"));
                            }
                            (w, zero)
                        }
                    };
                    if zero && !matches!(name, "index" | "seed" | "image" | "line") {
                        return Err(format!(
                            "{{{name}}} is not a number and cannot be zero-padded"
                        ));
                    }
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Field {
                        name: name.to_string(),
                        width,
                        zero,
                    });
                }
                '}' => return Err(format!("unmatched '}}' in template '{s}' (write '}}}}')")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Self { pieces })
    }

    /// Whether the template uses a field.
    pub fn uses(&self, field: &str) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Field { name, .. } if name == field))
    }

    pub fn render(&self, f: &Fields) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field { name, width, zero } => {
                    let v = match name.as_str() {
                        "index" => f.index.to_string(),
                        "seed" => f.seed.to_string(),
                        "slug" => slug(f.prompt),
                        "color" => f.color.map_or_else(|| "auto".into(), color_slug),
                        "model" => sanitize(f.model),
                        "date" => f.date.to_string(),
                        "image" => f.image.to_string(),
                        "line" => f.line.to_string(),
                        _ => unreachable!("checked in parse"),
                    };
                    if *zero {
                        out.push_str(&format!("{v:0>width$}"));
                    } else {
                        out.push_str(&format!("{v:>width$}"));
                    }
                }
            }
        }
        out
    }
}

/// A file-name-safe slug of a prompt: lowercase ASCII letters and digits joined by '-', at
/// most 48 characters, cut at a word boundary; "image" when nothing is left.
pub fn slug(prompt: &str) -> String {
    let mut out = String::new();
    for word in prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let w = word.to_ascii_lowercase();
        let extra = if out.is_empty() { w.len() } else { w.len() + 1 };
        if out.len() + extra > 48 {
            if out.is_empty() {
                out = w[..48].to_string();
            }
            break;
        }
        if !out.is_empty() {
            out.push('-');
        }
        out.push_str(&w);
    }
    if out.is_empty() { "image".into() } else { out }
}

fn color_slug(c: &KeyColor) -> String {
    match c.name {
        Some(n) => n.to_string(),
        None => c.hex().trim_start_matches('#').to_string(),
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Today's date in UTC, YYYY-MM-DD.
pub fn today_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    civil_date((secs / 86_400) as i64)
}

/// Days since 1970-01-01 → "YYYY-MM-DD" (Howard Hinnant's civil_from_days).
fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_and_reject_unknown_fields() {
        let t = Template::parse("out/{index:05}-{slug}-{seed}-{color}-{model}{{x}}.png").unwrap();
        let c = KeyColor::parse("#102030").unwrap();
        let f = Fields {
            index: 7,
            seed: 42,
            prompt: "A red car, 4K!",
            color: Some(&c),
            model: "my model",
            date: "2026-01-02",
            image: 0,
            line: 3,
        };
        assert_eq!(
            t.render(&f),
            "out/00007-a-red-car-4k-42-102030-my-model{x}.png"
        );
        assert!(
            Template::parse("{nope}")
                .unwrap_err()
                .contains("unknown field")
        );
        assert!(Template::parse("{index").is_err());
        assert!(Template::parse("a}b").is_err());
        assert!(Template::parse("{slug:05}").is_err());
        assert!(Template::parse("{index:x}").is_err());
        assert!(t.uses("seed") && !t.uses("date"));
    }

    #[test]
    fn slugs_are_safe_and_short() {
        assert_eq!(slug("  "), "image");
        assert_eq!(slug("Élan, a cat"), "lan-a-cat");
        let long = "word ".repeat(40);
        let s = slug(&long);
        assert!(s.len() <= 48 && !s.ends_with('-'), "{s}");
    }

    #[test]
    fn dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(19_723), "2024-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
    }
}
