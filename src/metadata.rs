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
}
