//! Fusing a subject mask (from a segmenter, or a file) into the chroma key.
//!
//! A colour keyer cannot tell a green tie from a green screen; a segmenter can, but its edges
//! are coarse (U²-Net works at 320², SAM at 256²) and it is sometimes simply wrong (it takes a
//! line of text, or a glass panel, for one solid object). So the mask only decides which of
//! the keyer's holes are the subject's own parts:
//! - the mask's confident interior is the mask eroded by a margin wider than its edge error;
//! - inside it, the pixels the keyer called screen (alpha below [`SEED_ALPHA`]) form
//!   connected regions, and so do the pixels it made partly transparent;
//! - a screen region is a part in the key colour when the subject encloses it: at most
//!   [`MAX_OPEN_SHARE`] of its outline lies on the interior's edge (a stripe may run out to
//!   the subject's outline; the screen between letters, or around a too-wide mask, is open);
//! - a partial region comes back with an enclosed screen region it touches (that part's
//!   anti-aliased rim), or on its own when it is a darker shade of the screen
//!   ([`is_screen_shade`]: the keyer reads it as a shadow, which cannot lie on an opaque
//!   subject) and at most [`MAX_SHADE_OPEN_SHARE`] of it is open. A partial region that is
//!   neither (a glass panel, lighter and paler than the screen) stays as the keyer has it.
//!
//! Restored pixels become opaque with their observed colour and no despill. Everywhere else,
//! the soft edge band included, the keyer's alpha and colour stay as they are. Three checks
//! distrust a mask as a whole, and then nothing changes: its interior holds more than
//! [`MAX_SCREEN_REGIONS`] patches of screen (hair, lettering), more than
//! [`MAX_OPEN_SCREEN_SHARE`] of it is plain screen that no subject encloses, or the restored
//! regions would cover more than [`MAX_RESTORED_SHARE`] of it.

use super::Keyed;
use super::cleanup::label_runs;
use super::screen::{ACHROMATIC_CHROMA, chroma, dot, norm};
use crate::resize::{FilterType, PixelType, Resize};
use crate::segment::{Prompt, Segmenter, SubjectMask};
use anyhow::{Context, Result, ensure};
use image::GrayImage;
use imageproc::distance_transform::Norm;

/// Mask values at or above this are subject.
const SUBJECT_LEVEL: u8 = 128;
/// Keyer alpha at or above this is opaque already.
const OPAQUE_ALPHA: f32 = 0.98;
/// Keyer alpha below this is screen; between it and [`OPAQUE_ALPHA`], partly transparent.
pub const SEED_ALPHA: f32 = 0.1;
/// Largest share of a screen region's outline that may lie on the interior's edge.
pub const MAX_OPEN_SHARE: f32 = 0.25;
/// Largest share of the interior that may be plain screen open to the interior's edge.
pub const MAX_OPEN_SCREEN_SHARE: f32 = 0.1;
/// Largest share of the interior the restored regions may cover: past it the mask is more
/// likely wrong (U²-Net takes a line of text for one blob, whose gaps then look enclosed)
/// than the subject mostly key-coloured.
pub const MAX_RESTORED_SHARE: f32 = 0.5;
/// Most separate patches of screen (of 2 pixels or more) the interior may hold: past it the
/// mask covers a texture of subject and screen (hair, fur, lettering), whose gaps are each
/// enclosed by strands.
pub const MAX_SCREEN_REGIONS: usize = 80;
/// Largest share of a screen-shade region's outline that may lie on the interior's edge: a
/// darker band along the subject's outline is open on its long side, and a real hole cannot
/// be a shade (it shows the screen itself).
pub const MAX_SHADE_OPEN_SHARE: f32 = 0.6;
/// Smallest screen-shade region that is restored on its colour alone.
const MIN_SHADE_PIXELS: u32 = 20;
/// The screen-shade test ([`is_screen_shade`]).
const SHADE_MAX_HUE_DEG: f32 = 30.0;
const SHADE_MIN_SATURATION: f32 = 0.5;
const SHADE_MAX_BRIGHTNESS: f32 = 1.1;

/// What the fusion changed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FuseStats {
    /// Where the mask came from: the segmenter's name, or the mask file.
    pub source: String,
    /// Pixels in the mask's confident interior.
    pub interior: usize,
    /// Interior pixels the keyer had made (partly) transparent, now opaque.
    pub restored: usize,
    /// Why the mask was not used, when it was not.
    pub ignored: Option<String>,
}

/// The erosion margin in pixels: wider than a segmenter's edge error, which grows with the
/// image (one 320² network pixel is 3.2 pixels of a 1024² image).
pub fn interior_margin(width: u32, height: u32) -> u8 {
    width.max(height).div_ceil(160).clamp(3, 255) as u8
}

/// Runs `segmenter` on the keyed image (RGB8 `rgb`) and fuses its mask in. A promptable
/// segmenter (SAM) is prompted from the key itself ([`keyer_prompt`]), with `hints` (pixel
/// positions where the subject is expected, such as TKG-DM's subject centres) as extra
/// positive points.
pub fn segment_and_fuse(
    keyed: &mut Keyed,
    rgb: &[u8],
    segmenter: &dyn Segmenter,
    hints: &[[f32; 2]],
) -> Result<()> {
    let prompt = if segmenter.wants_prompt() {
        match keyer_prompt(keyed, hints) {
            Some(p) => p,
            None => {
                keyed.fused = Some(FuseStats {
                    source: segmenter.name().to_string(),
                    ignored: Some(format!(
                        "the keyer found no opaque subject to prompt {} with",
                        segmenter.name()
                    )),
                    ..FuseStats::default()
                });
                return Ok(());
            }
        }
    } else {
        Prompt::default()
    };
    let image = image::RgbImage::from_raw(keyed.width, keyed.height, rgb.to_vec())
        .context("internal error: image and key differ in size")?;
    let mask = segmenter.segment(&image, &prompt)?;
    fuse_subject_mask(keyed, rgb, &mask, segmenter.name())
}

/// Most positive points [`keyer_prompt`] gives (besides the hints).
const PROMPT_POINTS: usize = 3;
/// Most negative points.
const PROMPT_NEGATIVES: usize = 2;

/// A SAM prompt read off the key: the box around what the keyer kept (alpha ≥ 0.5, with a
/// margin of 1% of the longest side), positive points deepest inside the opaque subject,
/// negative points deepest in the screen outside the box (never inside it, where a
/// key-coloured part of the subject looks like screen), and the `hints` that fall in the box.
/// `None` when the keyer kept no opaque pixel.
pub fn keyer_prompt(keyed: &Keyed, hints: &[[f32; 2]]) -> Option<Prompt> {
    let (w, h) = (keyed.width, keyed.height);
    let (wu, hu) = (w as usize, h as usize);
    let alpha = &keyed.alpha;
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (i, _) in alpha.iter().enumerate().filter(|(_, a)| **a >= 0.5) {
        let (x, y) = (i % wu, i / wu);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x + 1);
        y1 = y1.max(y + 1);
    }
    if x0 >= x1 || !alpha.iter().any(|&a| a >= OPAQUE_ALPHA) {
        return None;
    }
    let m = (w.max(h) as usize).div_ceil(100);
    let (x0, y0) = (x0.saturating_sub(m), y0.saturating_sub(m));
    let (x1, y1) = ((x1 + m).min(wu), (y1 + m).min(hu));
    let in_box = |x: usize, y: usize| (x0..x1).contains(&x) && (y0..y1).contains(&y);
    // Each pixel's distance to the nearest pixel outside the class it is picked from.
    let depth = |class: &dyn Fn(usize) -> bool| {
        let other = GrayImage::from_fn(w, h, |x, y| {
            image::Luma([if class(y as usize * wu + x as usize) {
                0
            } else {
                255
            }])
        });
        imageproc::distance_transform::distance_transform(&other, Norm::L2).into_raw()
    };
    let spread = (((x1 - x0).pow(2) + (y1 - y0).pow(2)) as f32).sqrt() / 4.0;
    let pick = |depth: &[u8], allowed: &dyn Fn(usize, usize) -> bool, n: usize| {
        let mut chosen: Vec<[f32; 2]> = Vec::new();
        for _ in 0..n {
            let mut best: Option<(u8, usize)> = None;
            for (i, &d) in depth.iter().enumerate() {
                let (x, y) = (i % wu, i / wu);
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                let far = chosen
                    .iter()
                    .all(|c| (c[0] - px).hypot(c[1] - py) >= spread);
                if d > 0 && far && allowed(x, y) && best.is_none_or(|(bd, _)| d > bd) {
                    best = Some((d, i));
                }
            }
            let Some((_, i)) = best else { break };
            chosen.push([(i % wu) as f32 + 0.5, (i / wu) as f32 + 0.5]);
        }
        chosen
    };
    let opaque = depth(&|i| alpha[i] >= OPAQUE_ALPHA);
    let mut points = pick(&opaque, &|_, _| true, PROMPT_POINTS);
    points.extend(
        hints
            .iter()
            .filter(|p| p[0] >= 0.0 && p[1] >= 0.0 && in_box(p[0] as usize, p[1] as usize)),
    );
    let screen = depth(&|i| alpha[i] < SEED_ALPHA);
    let negative_points = pick(&screen, &|x, y| !in_box(x, y), PROMPT_NEGATIVES);
    Some(Prompt {
        points,
        negative_points,
        bbox: Some([x0 as f32, y0 as f32, x1 as f32, y1 as f32]),
    })
}

/// Connected regions of one class of interior pixels, with what the fusion asks of each.
struct Regions {
    /// Region of each pixel (`u32::MAX` outside the class).
    label: Vec<u32>,
    /// Pixels per region.
    size: Vec<u32>,
    /// Outline pixels per region, and those of them on the interior's edge.
    outline: Vec<u32>,
    on_edge: Vec<u32>,
}

impl Regions {
    /// 8-connected regions of the pixels where `class` holds (all inside `inside`).
    fn of(
        w: usize,
        h: usize,
        class: &dyn Fn(usize) -> bool,
        inside: &dyn Fn(usize) -> bool,
    ) -> Self {
        let cc = label_runs(w, h, class);
        let mut r = Regions {
            label: vec![u32::MAX; w * h],
            size: vec![0; cc.count],
            outline: vec![0; cc.count],
            on_edge: vec![0; cc.count],
        };
        for (run, &c) in cc.runs.iter().zip(&cc.comp) {
            let y = run.y as usize;
            for x in run.x0 as usize..run.x1 as usize {
                let i = y * w + x;
                r.label[i] = c;
                r.size[c as usize] += 1;
                let neighbours = [
                    (x > 0).then(|| i - 1),
                    (x + 1 < w).then(|| i + 1),
                    (y > 0).then(|| i - w),
                    (y + 1 < h).then(|| i + w),
                ];
                if neighbours.iter().any(|nb| nb.is_none_or(|j| !class(j))) {
                    r.outline[c as usize] += 1;
                    if neighbours.iter().any(|nb| nb.is_none_or(|j| !inside(j))) {
                        r.on_edge[c as usize] += 1;
                    }
                }
            }
        }
        r
    }

    fn count(&self) -> usize {
        self.size.len()
    }

    /// Whether at most `share` of region `c`'s outline lies on the interior's edge.
    fn enclosed(&self, c: usize, share: f32) -> bool {
        self.on_edge[c] as f32 <= share * self.outline[c] as f32
    }
}

/// Fuses `mask` (from `source`, for the record) into `keyed`; `rgb` is the keyed image
/// (RGB8). A mask of another size is stretched to the image first.
pub fn fuse_subject_mask(
    keyed: &mut Keyed,
    rgb: &[u8],
    mask: &SubjectMask,
    source: &str,
) -> Result<()> {
    let (w, h) = (keyed.width, keyed.height);
    let (wu, hu) = (w as usize, h as usize);
    let n = wu * hu;
    ensure!(
        rgb.len() == 3 * n,
        "internal error: image and key differ in size"
    );
    let interior = confident_interior(mask, w, h)?;
    let inside = |i: usize| interior.as_raw()[i] != 0;
    let mut stats = FuseStats {
        source: source.to_string(),
        interior: interior.as_raw().iter().filter(|&&p| p != 0).count(),
        ..FuseStats::default()
    };
    if stats.interior == 0 {
        return ignore(
            &mut keyed.fused,
            &stats,
            format!(
                "it marks no subject (no pixel at or above 50%, or none left {} px inside its edge)",
                interior_margin(w, h)
            ),
        );
    }
    let alpha = &keyed.alpha;
    let screen = |i: usize| inside(i) && alpha[i] < SEED_ALPHA;
    let partial = |i: usize| inside(i) && (SEED_ALPHA..OPAQUE_ALPHA).contains(&alpha[i]);
    let screens = Regions::of(wu, hu, &screen, &inside);
    let patches = screens.size.iter().filter(|&&s| s >= 2).count();
    if patches > MAX_SCREEN_REGIONS {
        return ignore(
            &mut keyed.fused,
            &stats,
            format!(
                "its interior holds {patches} separate patches of screen: a texture such as hair \
             or lettering, which the keyer's matte serves better"
            ),
        );
    }
    let screen_ok: Vec<bool> = (0..screens.count())
        .map(|c| screens.enclosed(c, MAX_OPEN_SHARE))
        .collect();
    let open_screen: usize = (0..screens.count())
        .filter(|&c| !screen_ok[c])
        .map(|c| screens.size[c] as usize)
        .sum();
    // A mask that takes in plain screen not enclosed by the subject (the space between
    // letters, a blob around a thin subject) is not a mask of this subject.
    if open_screen as f32 > MAX_OPEN_SCREEN_SHARE * stats.interior as f32 {
        return ignore(
            &mut keyed.fused,
            &stats,
            format!(
                "{:.0}% of the mask's interior is open screen: the mask does not fit the subject",
                100.0 * open_screen as f32 / stats.interior as f32
            ),
        );
    }
    let partials = Regions::of(wu, hu, &partial, &inside);
    // Partial regions next to a screen region that comes back: the part's anti-aliased rim.
    let mut beside_restored = vec![false; partials.count()];
    // Colour sums per partial region: observed, and the plate under it.
    let mut colour = vec![[0f64; 6]; partials.count()];
    for (i, &c) in partials.label.iter().enumerate() {
        if c == u32::MAX {
            continue;
        }
        let c = c as usize;
        let (x, y) = (i % wu, i / wu);
        let b = keyed.plate.at(x, y);
        for k in 0..3 {
            colour[c][k] += f64::from(rgb[3 * i + k]);
            colour[c][3 + k] += f64::from(b[k]);
        }
        if !beside_restored[c] {
            let (x0, x1) = (x.saturating_sub(1), (x + 1).min(wu - 1));
            let (y0, y1) = (y.saturating_sub(1), (y + 1).min(hu - 1));
            beside_restored[c] = (y0..=y1).any(|yy| {
                (x0..=x1).any(|xx| {
                    let s = screens.label[yy * wu + xx];
                    s != u32::MAX && screen_ok[s as usize]
                })
            });
        }
    }
    let partial_ok: Vec<bool> = (0..partials.count())
        .map(|c| {
            (beside_restored[c] && partials.enclosed(c, MAX_OPEN_SHARE))
                || (partials.size[c] >= MIN_SHADE_PIXELS
                    && partials.enclosed(c, MAX_SHADE_OPEN_SHARE)
                    && is_screen_shade(&colour[c], partials.size[c]))
        })
        .collect();
    let restore = |i: usize| {
        let s = screens.label[i];
        let p = partials.label[i];
        (s != u32::MAX && screen_ok[s as usize]) || (p != u32::MAX && partial_ok[p as usize])
    };
    let chosen: Vec<usize> = (0..n).filter(|&i| restore(i)).collect();
    let restorable = chosen.len();
    if restorable as f32 > MAX_RESTORED_SHARE * stats.interior as f32 {
        return ignore(
            &mut keyed.fused,
            &stats,
            format!(
                "the mask would make {:.0}% of its interior opaque: more likely a wrong mask than \
             a subject mostly in the key colour",
                100.0 * restorable as f32 / stats.interior as f32
            ),
        );
    }
    for i in chosen {
        make_opaque(keyed, rgb, i);
    }
    stats.restored = restorable;
    finish(keyed, stats);
    Ok(())
}

/// Whether a region's mean colour (`sums[..3]` over `count` pixels) is a shade of the plate
/// under it (`sums[3..]`): the plate's hue within [`SHADE_MAX_HUE_DEG`], at least
/// [`SHADE_MIN_SATURATION`] of its saturation, and no brighter than [`SHADE_MAX_BRIGHTNESS`]
/// times it. The keyer reads such a region as a shadow on the screen; inside a subject's mask
/// it is a part in a darker shade of the key colour. Glass lightens and desaturates the
/// screen, and fails the test.
fn is_screen_shade(sums: &[f64; 6], count: u32) -> bool {
    let n = f64::from(count.max(1));
    let mean = |k: usize| [sums[k] / n, sums[k + 1] / n, sums[k + 2] / n].map(|v| v as f32);
    let (c, b) = (mean(0), mean(3));
    let brightness = |v: [f32; 3]| (v[0] + v[1] + v[2]) / 3.0;
    let (cc, bc) = (chroma(c), chroma(b));
    let (cn, bn) = (norm(cc), norm(bc));
    let (cm, bm) = (brightness(c), brightness(b));
    if bn < ACHROMATIC_CHROMA || cn <= 0.0 || bm <= 0.0 || cm <= 0.0 {
        return false;
    }
    let saturation = (cn / cm) / (bn / bm);
    dot(cc, bc) / (cn * bn) >= SHADE_MAX_HUE_DEG.to_radians().cos()
        && saturation >= SHADE_MIN_SATURATION
        && cm <= SHADE_MAX_BRIGHTNESS * bm
}

/// Records that the mask was not used, and why.
fn ignore(record: &mut Option<FuseStats>, stats: &FuseStats, why: String) -> Result<()> {
    *record = Some(FuseStats {
        ignored: Some(why),
        ..stats.clone()
    });
    Ok(())
}

/// Pixel `i` becomes opaque subject with its observed colour (no despill).
fn make_opaque(keyed: &mut Keyed, rgb: &[u8], i: usize) {
    keyed.alpha[i] = 1.0;
    keyed.foreground[3 * i..3 * i + 3].copy_from_slice(&rgb[3 * i..3 * i + 3]);
}

/// Records the fusion and the new share of background.
fn finish(keyed: &mut Keyed, stats: FuseStats) {
    let n = keyed.alpha.len().max(1);
    keyed.background_fraction = keyed.alpha.iter().filter(|&&a| a < 0.5).count() as f32 / n as f32;
    keyed.fused = Some(stats);
}

/// The mask stretched to `w` x `h`, thresholded and eroded by [`interior_margin`].
fn confident_interior(mask: &SubjectMask, w: u32, h: u32) -> Result<GrayImage> {
    ensure!(
        mask.values.len() == mask.width as usize * mask.height as usize && !mask.values.is_empty(),
        "the subject mask is empty"
    );
    let bytes = Resize::new(PixelType::U8, FilterType::Bilinear).to_vec(
        mask.to_u8(),
        (mask.width, mask.height),
        (w, h),
    )?;
    let subject = GrayImage::from_fn(w, h, |x, y| {
        let v = bytes[y as usize * w as usize + x as usize];
        image::Luma([if v >= SUBJECT_LEVEL { 255 } else { 0 }])
    });
    Ok(imageproc::morphology::erode(
        &subject,
        Norm::L2,
        interior_margin(w, h),
    ))
}

/// Fuses a mask known to be right (`--trust-mask`): every pixel of its interior becomes
/// opaque with its observed colour, enclosed or not, so a subject entirely in the key colour
/// keeps its body; the edge band is still the keyer's.
pub fn fuse_trusted_mask(
    keyed: &mut Keyed,
    rgb: &[u8],
    mask: &SubjectMask,
    source: &str,
) -> Result<()> {
    let n = keyed.width as usize * keyed.height as usize;
    ensure!(
        rgb.len() == 3 * n,
        "internal error: image and key differ in size"
    );
    let interior = confident_interior(mask, keyed.width, keyed.height)?;
    let mut stats = FuseStats {
        source: source.to_string(),
        ..FuseStats::default()
    };
    for (i, p) in interior.as_raw().iter().enumerate() {
        if *p == 0 {
            continue;
        }
        stats.interior += 1;
        if keyed.alpha[i] < 1.0 {
            make_opaque(keyed, rgb, i);
            stats.restored += 1;
        }
    }
    finish(keyed, stats);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::color::KeyColor;
    use crate::key::{KeyOptions, key_rgb8};

    const N: u32 = 96;
    const SCREEN: [u8; 3] = [0, 177, 64];

    /// A grey disc of radius 30 on the screen, crossed by a band of the screen's own colour.
    fn scene() -> Vec<u8> {
        let mut rgb = Vec::new();
        for y in 0..N {
            for x in 0..N {
                let d = ((x as f32 - 48.0).powi(2) + (y as f32 - 48.0).powi(2)).sqrt();
                let band = (44..52).contains(&y);
                rgb.extend(if d < 30.0 && !band {
                    [128, 128, 128]
                } else {
                    SCREEN
                });
            }
        }
        rgb
    }

    fn disc(radius: f32, size: u32) -> SubjectMask {
        let s = size as f32 / N as f32;
        let values = (0..size * size)
            .map(|i| {
                let (x, y) = ((i % size) as f32 / s, (i / size) as f32 / s);
                let d = ((x - 48.0).powi(2) + (y - 48.0).powi(2)).sqrt();
                if d < radius { 1.0 } else { 0.0 }
            })
            .collect();
        SubjectMask {
            width: size,
            height: size,
            values,
        }
    }

    fn dist(i: usize) -> f32 {
        let (x, y) = ((i as u32 % N) as f32, (i as u32 / N) as f32);
        ((x - 48.0).powi(2) + (y - 48.0).powi(2)).sqrt()
    }

    #[test]
    fn the_screen_coloured_band_inside_the_subject_comes_back() {
        let rgb = scene();
        let keyed = key_rgb8(N, N, &rgb, &KeyOptions::new(KeyColor::green())).unwrap();
        let band_centre = (48 * N + 48) as usize;
        assert!(
            keyed.alpha[band_centre] < 0.1,
            "the keyer alone loses the band"
        );
        for (radius, size) in [(30.0, N), (33.0, N), (27.5, N), (30.0, 40)] {
            let mut fused = keyed.clone();
            fuse_subject_mask(&mut fused, &rgb, &disc(radius, size), "test").unwrap();
            let stats = fused.fused.as_ref().unwrap();
            assert!(stats.restored > 100, "{radius} {size}: {stats:?}");
            assert_eq!(fused.alpha[band_centre], 1.0);
            assert_eq!(
                fused.foreground[3 * band_centre..3 * band_centre + 3],
                SCREEN
            );
            for i in 0..(N * N) as usize {
                if dist(i) > 31.0 {
                    // The screen around the subject, and the soft edge, are the keyer's.
                    assert_eq!(fused.alpha[i], keyed.alpha[i], "{radius} {size}: pixel {i}");
                    assert_eq!(
                        fused.foreground[3 * i..3 * i + 3],
                        keyed.foreground[3 * i..3 * i + 3]
                    );
                }
            }
            assert!(fused.background_fraction < keyed.background_fraction);
        }
    }

    #[test]
    fn a_band_in_a_darker_shade_of_the_screen_comes_back() {
        // The keyer reads a darker green as a shadow (partly transparent, no pixel of plain
        // screen); inside the subject's mask it is a part of the subject.
        const SHADE: [u8; 3] = [0, 130, 47];
        let rgb: Vec<u8> = scene()
            .chunks(3)
            .enumerate()
            .flat_map(|(i, p)| {
                let band = (44..52).contains(&(i as u32 / N));
                if band && dist(i) < 30.0 {
                    SHADE
                } else {
                    [p[0], p[1], p[2]]
                }
            })
            .collect();
        let keyed = key(&rgb);
        let centre = (48 * N + 48) as usize;
        assert!(
            keyed.alpha[centre] > SEED_ALPHA && keyed.alpha[centre] < 0.9,
            "the keyer alone makes the band a shadow: {}",
            keyed.alpha[centre]
        );
        let mut fused = keyed.clone();
        fuse_subject_mask(&mut fused, &rgb, &disc(30.0, N), "test").unwrap();
        assert_eq!(fused.alpha[centre], 1.0, "{:?}", fused.fused);
        assert_eq!(fused.foreground[3 * centre..3 * centre + 3], SHADE);
        for i in 0..(N * N) as usize {
            if dist(i) > 31.0 {
                assert_eq!(fused.alpha[i], keyed.alpha[i], "pixel {i}");
            }
        }
    }

    #[test]
    fn a_mask_over_a_texture_of_screen_patches_is_ignored() {
        // Hair or lettering under one blob: a grey disc full of small screen-coloured holes,
        // each enclosed.
        let rgb: Vec<u8> = (0..(N * N) as usize)
            .flat_map(|i| {
                let (x, y) = (i as u32 % N, i as u32 / N);
                let hole = (1..3).contains(&(x % 5)) && (1..3).contains(&(y % 5));
                if dist(i) < 30.0 && !hole {
                    [128, 128, 128]
                } else {
                    SCREEN
                }
            })
            .collect();
        let keyed = key(&rgb);
        let mut fused = keyed.clone();
        fuse_subject_mask(&mut fused, &rgb, &disc(30.0, N), "blob").unwrap();
        assert!(fused.alpha == keyed.alpha, "{:?}", fused.fused);
        let why = fused.fused.unwrap().ignored.unwrap_or_default();
        assert!(why.contains("patches of screen"), "{why}");
    }

    #[test]
    fn the_keyer_prompts_sam_inside_the_subject_and_on_the_screen_outside_it() {
        let rgb = scene();
        let keyed = key_rgb8(N, N, &rgb, &KeyOptions::new(KeyColor::green())).unwrap();
        let hint = [40.0, 60.0];
        let p = keyer_prompt(&keyed, &[hint, [2.0, 2.0]]).unwrap();
        let [x0, y0, x1, y1] = p.bbox.unwrap();
        // The disc of radius 30 around (48, 48), with a 1 px margin.
        assert!(
            x0 <= 18.0 && y0 <= 18.0 && x1 >= 78.0 && y1 >= 78.0,
            "{:?}",
            p.bbox
        );
        assert!(
            x0 >= 15.0 && y0 >= 15.0 && x1 <= 81.0 && y1 <= 81.0,
            "{:?}",
            p.bbox
        );
        let at = |q: &[f32; 2]| (q[1] as usize) * N as usize + q[0] as usize;
        assert_eq!(p.points.len(), PROMPT_POINTS + 1, "{p:?}");
        for q in &p.points[..PROMPT_POINTS] {
            assert!(keyed.alpha[at(q)] >= OPAQUE_ALPHA, "{q:?}");
        }
        assert_eq!(
            p.points[PROMPT_POINTS], hint,
            "the hint in the box is kept, the other not"
        );
        assert_eq!(p.negative_points.len(), PROMPT_NEGATIVES);
        for q in &p.negative_points {
            assert!(keyed.alpha[at(q)] < SEED_ALPHA, "{q:?}");
            assert!(
                !(x0..x1).contains(&q[0]) || !(y0..y1).contains(&q[1]),
                "{q:?}"
            );
        }
    }

    #[test]
    fn a_promptable_segmenter_is_not_asked_when_nothing_is_opaque() {
        struct Asks;
        impl Segmenter for Asks {
            fn name(&self) -> &str {
                "asks"
            }
            fn segment(&self, _: &image::RgbImage, _: &Prompt) -> Result<SubjectMask> {
                anyhow::bail!("must not be called")
            }
            fn wants_prompt(&self) -> bool {
                true
            }
        }
        let rgb: Vec<u8> = (0..N * N).flat_map(|_| SCREEN).collect();
        let mut keyed = key_rgb8(N, N, &rgb, &KeyOptions::new(KeyColor::green())).unwrap();
        segment_and_fuse(&mut keyed, &rgb, &Asks, &[]).unwrap();
        let why = keyed.fused.unwrap().ignored.unwrap();
        assert!(why.contains("no opaque subject"), "{why}");
    }

    #[test]
    fn an_empty_mask_changes_nothing_and_says_why() {
        let rgb = scene();
        let keyed = key_rgb8(N, N, &rgb, &KeyOptions::new(KeyColor::green())).unwrap();
        let mut fused = keyed.clone();
        fuse_subject_mask(&mut fused, &rgb, &disc(0.0, N), "none").unwrap();
        assert_eq!(fused.alpha, keyed.alpha);
        let stats = fused.fused.unwrap();
        assert_eq!(stats.restored, 0);
        assert!(stats.ignored.unwrap().contains("marks no subject"));
    }

    /// A thin grey ring around a wide disc of screen colour.
    fn ring_scene() -> Vec<u8> {
        (0..(N * N) as usize)
            .flat_map(|i| {
                if (26.0..30.0).contains(&dist(i)) {
                    [128, 128, 128]
                } else {
                    SCREEN
                }
            })
            .collect()
    }

    fn key(rgb: &[u8]) -> Keyed {
        key_rgb8(N, N, rgb, &KeyOptions::new(KeyColor::green())).unwrap()
    }

    #[test]
    fn screen_the_mask_takes_in_by_mistake_stays_screen() {
        // A mask far too wide: the screen ring it covers is open to its edge, and the band
        // joins that ring, so nothing is enclosed.
        let rgb = scene();
        let keyed = key(&rgb);
        let mut fused = keyed.clone();
        fuse_subject_mask(&mut fused, &rgb, &disc(45.0, N), "wide").unwrap();
        assert_eq!(fused.alpha, keyed.alpha);
        assert_eq!(fused.fused.unwrap().restored, 0);
    }

    #[test]
    fn translucent_parts_are_left_to_the_keyer() {
        // A disc of glass: half grey, half screen. The keyer sees no plain screen in it.
        let mut rgb = Vec::new();
        for i in 0..(N * N) as usize {
            let glass = dist(i) < 30.0 && dist(i) > 25.0 || dist(i) < 20.0;
            let frame = (20.0..=25.0).contains(&dist(i));
            rgb.extend(if frame {
                [128, 128, 128]
            } else if glass {
                [64, 152, 96]
            } else {
                SCREEN
            });
        }
        let keyed = key(&rgb);
        let centre = (48 * N + 48) as usize;
        assert!(
            keyed.alpha[centre] > 0.2 && keyed.alpha[centre] < 0.9,
            "{}",
            keyed.alpha[centre]
        );
        let mut fused = keyed.clone();
        fuse_subject_mask(&mut fused, &rgb, &disc(30.0, N), "glass").unwrap();
        assert_eq!(fused.alpha[centre], keyed.alpha[centre]);
    }

    #[test]
    fn a_mask_that_is_mostly_the_keys_holes_is_ignored() {
        // A thin grey ring around a wide disc of screen colour: enclosed, but most of the
        // mask's interior.
        let rgb = ring_scene();
        let keyed = key(&rgb);
        let mut fused = keyed.clone();
        fuse_subject_mask(&mut fused, &rgb, &disc(30.0, N), "ring").unwrap();
        assert_eq!(fused.alpha, keyed.alpha);
        let stats = fused.fused.unwrap();
        assert!(
            stats
                .ignored
                .as_deref()
                .unwrap_or("")
                .contains("interior opaque"),
            "{stats:?}"
        );
    }

    #[test]
    fn a_trusted_mask_keeps_a_subject_entirely_in_the_key_colour() {
        // The ring scene: ignored as a segmenter's mask, kept whole when trusted.
        let rgb = ring_scene();
        let keyed = key(&rgb);
        let mut fused = keyed.clone();
        fuse_trusted_mask(&mut fused, &rgb, &disc(30.0, N), "trusted").unwrap();
        let centre = (48 * N + 48) as usize;
        assert_eq!(fused.alpha[centre], 1.0);
        assert_eq!(fused.foreground[3 * centre..3 * centre + 3], SCREEN);
        for i in 0..(N * N) as usize {
            if dist(i) > 31.0 {
                assert_eq!(fused.alpha[i], keyed.alpha[i], "pixel {i}");
            }
        }
        assert!(fused.fused.unwrap().restored > 2000);
    }

    #[test]
    fn the_margin_grows_with_the_image() {
        assert_eq!(interior_margin(96, 96), 3);
        assert_eq!(interior_margin(1024, 768), 7);
        assert_eq!(interior_margin(100_000, 10), 255);
    }
}
