//! Key colours: parsing (`green`, `#00ff00`, ...) and the latent channel signs TKG-DM shifts.

use std::fmt;

/// Sign of the mean shift on each of the 4 latent channels: +1, -1 or 0 (unshifted).
pub type ChannelSigns = [i8; 4];

/// The named colours with a published channel-sign row (paper's colour study), plus blue and
/// red, whose signs are derived like any `#RRGGBB`.
const NAMED: &[(&str, [u8; 3], Option<ChannelSigns>)] = &[
    ("green", [0, 255, 0], Some([0, 1, 1, 0])),
    ("cyan", [0, 255, 255], Some([0, 1, 0, 0])),
    ("magenta", [255, 0, 255], Some([0, -1, -1, -1])),
    ("purple", [128, 0, 128], Some([0, 0, -1, -1])),
    ("black", [0, 0, 0], Some([-1, 0, 0, 1])),
    ("orange", [255, 165, 0], Some([-1, -1, 1, 0])),
    ("white", [255, 255, 255], Some([0, 0, 0, -1])),
    ("yellow", [255, 255, 0], Some([0, -1, 1, -1])),
    ("blue", [0, 0, 255], None),
    ("red", [255, 0, 0], None),
];

/// Approximate latent → RGB factors (rows: latent channels, columns: R, G, B; output in [-1, 1]).
#[derive(Debug, Clone, Copy)]
pub struct LatentRgbFactors {
    pub factors: [[f32; 3]; 4],
    pub bias: [f32; 3],
}

pub const SD15_LATENT_RGB: LatentRgbFactors = LatentRgbFactors {
    factors: [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ],
    bias: [0.0, 0.0, 0.0],
};

pub const SDXL_LATENT_RGB: LatentRgbFactors = LatentRgbFactors {
    factors: [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ],
    bias: [0.1084, -0.0175, -0.0011],
};

/// An RGB8 preview of latents (`[4, h, w]` row-major, as the UNet leaves them) through the
/// latent-to-RGB factors, which map them to about [-1, 1].
pub fn latent_preview_rgb8(latents: &[f32], h: usize, w: usize, f: &LatentRgbFactors) -> Vec<u8> {
    let n = h * w;
    debug_assert_eq!(latents.len(), 4 * n);
    let mut out = Vec::with_capacity(n * 3);
    for i in 0..n {
        for k in 0..3 {
            let v: f32 = (0..4)
                .map(|c| latents[c * n + i] * f.factors[c][k])
                .sum::<f32>()
                + f.bias[k];
            out.push(((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8);
        }
    }
    out
}

/// A key (screen) colour as the user asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyColor {
    /// The colour's name for named colours, `None` for `#RRGGBB`.
    pub name: Option<&'static str>,
    pub rgb: [u8; 3],
}

impl KeyColor {
    pub fn green() -> Self {
        Self::parse("green").expect("green is a named colour")
    }

    /// Parses a named colour (case-insensitive) or `#RRGGBB` / `RRGGBB`.
    pub fn parse(text: &str) -> Result<Self, ColorParseError> {
        let t = text.trim().to_ascii_lowercase();
        if let Some((name, rgb, _)) = NAMED.iter().find(|(n, _, _)| *n == t) {
            return Ok(Self {
                name: Some(name),
                rgb: *rgb,
            });
        }
        let hex = t.strip_prefix('#').unwrap_or(&t);
        if hex.len() == 6 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            let v = u32::from_str_radix(hex, 16).map_err(|_| ColorParseError(text.to_string()))?;
            let rgb = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
            return Ok(Self { name: None, rgb });
        }
        Err(ColorParseError(text.to_string()))
    }

    /// Words for the prompt baseline (" isolated on a solid <words> background").
    pub fn prompt_words(&self) -> String {
        match self.name {
            Some(n) => n.to_string(),
            None => self.hex(),
        }
    }

    pub fn hex(&self) -> String {
        format!("#{:02x}{:02x}{:02x}", self.rgb[0], self.rgb[1], self.rgb[2])
    }

    /// Channel signs for the TKG-DM mean shift: the published row for a named colour, or the
    /// rule of [`derive_signs`] for anything else.
    pub fn channel_signs(&self, factors: &LatentRgbFactors) -> ChannelSigns {
        let published = self
            .name
            .and_then(|n| NAMED.iter().find(|(m, _, _)| *m == n))
            .and_then(|(_, _, s)| *s);
        published.unwrap_or_else(|| derive_signs(self.rgb, factors))
    }
}

impl fmt::Display for KeyColor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name {
            Some(n) => f.write_str(n),
            None => f.write_str(&self.hex()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColorParseError(pub String);

impl fmt::Display for ColorParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = NAMED.iter().map(|(n, _, _)| *n).collect();
        write!(
            f,
            "cannot parse colour '{}': use one of {} or #RRGGBB",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for ColorParseError {}

/// Derives channel signs for an arbitrary colour.
///
/// The rule: with the linear latent → RGB map `rgb = Fᵀ z + b`, the wanted decoded move is
/// `target - b` (from the colour of a zero latent to the key colour). Among all 80 non-zero
/// sign vectors `s ∈ {-1, 0, +1}⁴`, pick the one whose decoded direction `Fᵀ s` has the
/// largest cosine with that move; on a tie, the one that shifts fewer channels.
pub fn derive_signs(rgb: [u8; 3], factors: &LatentRgbFactors) -> ChannelSigns {
    let want: Vec<f64> = (0..3)
        .map(|k| rgb[k] as f64 / 255.0 * 2.0 - 1.0 - factors.bias[k] as f64)
        .collect();
    let want_norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
    let mut best = ([0i8; 4], f64::NEG_INFINITY, 5usize);
    if want_norm < 1e-9 {
        return best.0;
    }
    for code in 1..81u32 {
        let mut s = [0i8; 4];
        let mut c = code;
        for v in s.iter_mut() {
            *v = (c % 3) as i8 - 1;
            c /= 3;
        }
        let n_shifted = s.iter().filter(|&&v| v != 0).count();
        if n_shifted == 0 {
            continue;
        }
        let dir: Vec<f64> = (0..3)
            .map(|k| {
                (0..4)
                    .map(|ch| s[ch] as f64 * factors.factors[ch][k] as f64)
                    .sum()
            })
            .collect();
        let norm = dir.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm < 1e-12 {
            continue;
        }
        let cos = (0..3).map(|k| dir[k] * want[k]).sum::<f64>() / (norm * want_norm);
        let better = cos > best.1 + 1e-12 || ((cos - best.1).abs() <= 1e-12 && n_shifted < best.2);
        if better {
            best = (s, cos, n_shifted);
        }
    }
    best.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_hex() {
        assert_eq!(KeyColor::parse("Green").unwrap().rgb, [0, 255, 0]);
        assert_eq!(KeyColor::parse("#0047BB").unwrap().rgb, [0, 0x47, 0xbb]);
        assert_eq!(KeyColor::parse("ff00ff").unwrap().name, None);
        let err = KeyColor::parse("grene").unwrap_err().to_string();
        assert!(err.contains("green") && err.contains("#RRGGBB"), "{err}");
        assert!(KeyColor::parse("#12345").is_err());
        assert!(KeyColor::parse("#gg0000").is_err());
    }

    #[test]
    fn published_rows_win_for_named_colours() {
        let g = KeyColor::green();
        assert_eq!(g.channel_signs(&SD15_LATENT_RGB), [0, 1, 1, 0]);
        assert_eq!(g.channel_signs(&SDXL_LATENT_RGB), [0, 1, 1, 0]);
    }

    #[test]
    fn derived_direction_decodes_toward_the_target() {
        // Shifting along the derived signs must move the decoded colour toward the target.
        for (rgb, factors) in [
            ([0u8, 0, 255], SD15_LATENT_RGB),
            ([255, 0, 0], SD15_LATENT_RGB),
            ([0, 0, 255], SDXL_LATENT_RGB),
            ([0x12, 0xc0, 0x40], SDXL_LATENT_RGB),
        ] {
            let s = derive_signs(rgb, &factors);
            assert!(s.iter().any(|&v| v != 0));
            let target: Vec<f32> = rgb.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
            let moved: Vec<f32> = (0..3)
                .map(|k| (0..4).map(|c| s[c] as f32 * factors.factors[c][k]).sum())
                .collect();
            let want: Vec<f32> = (0..3).map(|k| target[k] - factors.bias[k]).collect();
            let dot: f32 = (0..3).map(|k| moved[k] * want[k]).sum();
            assert!(dot > 0.0, "{rgb:?} signs {s:?}");
        }
    }
}
