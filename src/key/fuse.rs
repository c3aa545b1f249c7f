//! Fusing a subject mask (from a segmenter, or a file) into the chroma key.
//!
//! A colour keyer cannot tell a green tie from a green screen; a segmenter can, but its edges
//! are coarse (U²-Net works at 320², SAM at 256²) and it is sometimes simply wrong (it takes a
//! line of text, or a glass panel, for one solid object). So the mask only decides which of
//! the keyer's holes are the subject's own parts:
//! - the mask's confident interior is the mask eroded by a margin wider than its edge error;
//! - inside it, the pixels the keyer did not make opaque form connected regions;
//! - a region is a key-coloured part, made opaque with its true colour and no despill, when
//!   the keyer saw plain screen in it (some alpha below [`SEED_ALPHA`]) and it is enclosed by
//!   the subject: at most [`MAX_OPEN_SHARE`] of its outline lies on the interior's edge
//!   (a stripe may run out to the subject's outline; the screen between letters, or around a
//!   too-wide mask, is open on all sides).
//!
//! Everywhere else, the soft edge band included, the keyer's alpha and colour stay as they
//! are. Two checks distrust a mask as a whole, and then nothing changes: more than
//! [`MAX_OPEN_SCREEN_SHARE`] of its interior is plain screen that no subject encloses, or the
//! regions would cover more than [`MAX_RESTORED_SHARE`] of it.

use super::Keyed;
use super::cleanup::label_runs;
use crate::resize::{FilterType, PixelType, Resize};
use crate::segment::{Prompt, Segmenter, SubjectMask};
use anyhow::{Context, Result, ensure};
use image::GrayImage;
use imageproc::distance_transform::Norm;

/// Mask values at or above this are subject.
const SUBJECT_LEVEL: u8 = 128;
/// Keyer alpha at or above this is opaque already.
const OPAQUE_ALPHA: f32 = 0.98;
/// A region needs a pixel the keyer called screen (alpha below this) to be restored: a
/// translucent glass panel has none.
pub const SEED_ALPHA: f32 = 0.1;
/// Largest share of a region's outline that may lie on the interior's edge.
pub const MAX_OPEN_SHARE: f32 = 0.25;
/// Largest share of the interior that may be plain screen open to the interior's edge.
pub const MAX_OPEN_SCREEN_SHARE: f32 = 0.1;
/// Largest share of the interior the restored regions may cover: past it the mask is more
/// likely wrong (U²-Net takes a line of text for one blob, whose gaps then look enclosed)
/// than the subject mostly key-coloured.
pub const MAX_RESTORED_SHARE: f32 = 0.5;

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
    let alpha = &keyed.alpha;
    let open = |i: usize| inside(i) && alpha[i] < OPAQUE_ALPHA;
    let cc = label_runs(wu, hu, open);
    // Per region: outline pixels, those on the interior's edge, and whether it has a seed.
    let mut outline = vec![0u32; cc.count];
    let mut on_edge = vec![0u32; cc.count];
    let mut seeded = vec![false; cc.count];
    for (r, &c) in cc.runs.iter().zip(&cc.comp) {
        let (y, c) = (r.y as usize, c as usize);
        for x in r.x0 as usize..r.x1 as usize {
            let i = y * wu + x;
            seeded[c] |= alpha[i] < SEED_ALPHA;
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < wu).then(|| i + 1),
                (y > 0).then(|| i - wu),
                (y + 1 < hu).then(|| i + wu),
            ];
            if neighbours.iter().any(|nb| nb.is_none_or(|j| !open(j))) {
                outline[c] += 1;
                if neighbours.iter().any(|nb| nb.is_none_or(|j| !inside(j))) {
                    on_edge[c] += 1;
                }
            }
        }
    }
    let enclosed: Vec<bool> = (0..cc.count)
        .map(|c| seeded[c] && on_edge[c] as f32 <= MAX_OPEN_SHARE * outline[c] as f32)
        .collect();
    let mut stats = FuseStats {
        source: source.to_string(),
        interior: interior.as_raw().iter().filter(|&&p| p != 0).count(),
        ..FuseStats::default()
    };
    if stats.interior == 0 {
        stats.ignored = Some(format!(
            "it marks no subject (no pixel at or above 50%, or none left {} px inside its edge)",
            interior_margin(w, h)
        ));
        keyed.fused = Some(stats);
        return Ok(());
    }
    let (mut restorable, mut open_screen) = (0usize, 0usize);
    for (r, &c) in cc.runs.iter().zip(&cc.comp) {
        let len = (r.x1 - r.x0) as usize;
        if enclosed[c as usize] {
            restorable += len;
        } else {
            let base = r.y as usize * wu;
            open_screen += alpha[base + r.x0 as usize..base + r.x1 as usize]
                .iter()
                .filter(|&&a| a < SEED_ALPHA)
                .count();
        }
    }
    // A mask that takes in plain screen not enclosed by the subject (the space between
    // letters, a blob around a thin subject) is not a mask of this subject.
    if open_screen as f32 > MAX_OPEN_SCREEN_SHARE * stats.interior as f32 {
        stats.ignored = Some(format!(
            "{:.0}% of the mask's interior is open screen: the mask does not fit the subject",
            100.0 * open_screen as f32 / stats.interior as f32
        ));
        keyed.fused = Some(stats);
        return Ok(());
    }
    if restorable as f32 > MAX_RESTORED_SHARE * stats.interior as f32 {
        stats.ignored = Some(format!(
            "the mask would make {:.0}% of its interior opaque: more likely a wrong mask than \
             a subject mostly in the key colour",
            100.0 * restorable as f32 / stats.interior as f32
        ));
        keyed.fused = Some(stats);
        return Ok(());
    }
    for (r, &c) in cc.runs.iter().zip(&cc.comp) {
        if !enclosed[c as usize] {
            continue;
        }
        let base = r.y as usize * wu;
        for i in base + r.x0 as usize..base + r.x1 as usize {
            make_opaque(keyed, rgb, i);
        }
    }
    stats.restored = restorable;
    finish(keyed, stats);
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
