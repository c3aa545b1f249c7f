//! Property-style tests of the whole placement flow, on random small photos and cut-outs from
//! a fixed-seed generator (deterministic, no extra dependency). The harmonisation flow's are in
//! `harmonize_tests.rs`, on the same generators.

use super::*;
use image::{Rgb, Rgba};

/// xorshift64*: enough randomness for test cases.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(super) fn below(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32
    }

    pub(super) fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub(super) fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

pub(super) fn noise_photo(rng: &mut Rng, w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |_, _| Rgb([rng.byte(), rng.byte(), rng.byte()]))
}

/// A soft-edged ellipse with an opaque interior, a noisy colour, and garbage colour in its
/// transparent pixels (as a keyer may leave them).
pub(super) fn ellipse_cutout(rng: &mut Rng, w: u32, h: u32) -> RgbaImage {
    let base = [rng.byte(), rng.byte(), rng.byte()];
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let (rx, ry) = (cx - 1.5, cy - 1.5);
    RgbaImage::from_fn(w, h, |x, y| {
        let u = (x as f32 + 0.5 - cx) / rx;
        let v = (y as f32 + 0.5 - cy) / ry;
        let d = (u * u + v * v).sqrt();
        let a = ((1.0 - d) * rx.min(ry) * 0.7 + 0.5).clamp(0.0, 1.0);
        let a8 = (a * 255.0).round() as u8;
        if a8 == 0 {
            Rgba([rng.byte(), rng.byte(), rng.byte(), 0])
        } else {
            let n = rng.byte() % 16;
            Rgba([
                base[0].saturating_add(n),
                base[1],
                base[2].saturating_sub(n),
                a8,
            ])
        }
    })
}

/// The anchor box of a placed subject, in photo pixels.
pub(super) fn anchor_box(s: &PlacedSubject) -> Bounds {
    Bounds::of_alpha(&s.rgba, BOX_MIN_ALPHA)
        .unwrap()
        .offset(s.rect.x as i64, s.rect.y as i64)
}

pub(super) fn subject_alpha(s: &PlacedSubject, x: u32, y: u32) -> u8 {
    if s.rect.contains(x, y) {
        s.rgba.get_pixel(x - s.rect.x, y - s.rect.y).0[3]
    } else {
        0
    }
}

pub(super) fn shadow_at(s: &ShadowLayer, x: u32, y: u32) -> u8 {
    if s.rect.contains(x, y) {
        s.darkening.get_pixel(x - s.rect.x, y - s.rect.y).0[0]
    } else {
        0
    }
}

/// Random placements that succeed, with the photo, cut-out and options used.
pub(super) fn random_placements(seed: u64, n: usize) -> Vec<(RgbaImage, PlaceOptions, Placement)> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    while out.len() < n {
        let (pw, ph) = (60 + rng.below(140), 60 + rng.below(140));
        let photo = noise_photo(&mut rng, pw, ph);
        let (cw, ch) = (12 + rng.below(40), 12 + rng.below(40));
        let cut = ellipse_cutout(&mut rng, cw, ch);
        let opts = PlaceOptions {
            at: Some((rng.unit(), 0.3 + 0.7 * rng.unit())),
            size: match rng.below(3) {
                0 => SubjectSize::Native,
                1 => SubjectSize::Scale(0.5 + 1.5 * rng.unit()),
                _ => SubjectSize::Height(10 + rng.below(40)),
            },
            shadow: match rng.below(3) {
                0 => ShadowKind::None,
                1 => ShadowKind::Contact,
                _ => ShadowKind::Drop {
                    angle_deg: 360.0 * rng.unit(),
                    length: rng.unit(),
                },
            },
            shadow_opacity: rng.unit() as f32,
            match_colour: (rng.below(2) == 0).then(|| rng.unit() as f32),
            allow_crop: rng.below(4) == 0,
        };
        if let Ok(p) = place(photo, &cut, &opts) {
            out.push((cut, opts, p));
        }
    }
    out
}

#[test]
fn the_anchor_lands_where_asked() {
    let mut heights = 0;
    for (_, opts, p) in random_placements(1, 40) {
        if opts.allow_crop {
            continue;
        }
        let (pw, ph) = p.background.dimensions();
        let (ax, ay) = opts.at.unwrap();
        let b = anchor_box(&p.subject);
        assert_eq!(b.y1, (ay * ph as f64).round() as i64, "{opts:?}");
        let centre = (b.x0 + b.x1) as f64 / 2.0;
        assert!(
            (centre - ax * pw as f64).abs() <= 0.5,
            "{centre} vs {}",
            ax * pw as f64
        );
        if let SubjectSize::Height(h) = opts.size {
            assert!(
                (b.height() - h as i64).abs() <= 1,
                "height {} for {h}",
                b.height()
            );
            heights += 1;
        }
    }
    assert!(heights > 3, "the cases include --height");
}

#[test]
fn the_default_anchor_is_bottom_centre_at_ninety_percent() {
    let mut rng = Rng(7);
    let cut = ellipse_cutout(&mut rng, 20, 30);
    let p = place(
        noise_photo(&mut rng, 100, 200),
        &cut,
        &PlaceOptions::default(),
    )
    .unwrap();
    let b = anchor_box(&p.subject);
    // Bottom centre at (50, 180): the centre is on a whole or half pixel.
    assert!((b.x0 + b.x1 - 100).abs() <= 1 && b.y1 == 180, "{b:?}");
    assert_eq!(p.scale, 1.0);
}

#[test]
fn the_scene_changes_only_under_the_subject_and_its_shadow() {
    for (_, _, p) in random_placements(2, 40) {
        for (x, y, s) in p.scene.enumerate_pixels() {
            let b = p.background.get_pixel(x, y);
            let (a, d) = (subject_alpha(&p.subject, x, y), shadow_at(&p.shadow, x, y));
            if a == 0 && d == 0 {
                assert_eq!(s, b, "untouched at {x},{y}");
            } else if a == 0 {
                for k in 0..3 {
                    // Darker, never black: at least a tenth of the light stays.
                    let floor = colour::to_srgb(colour::to_linear(b.0[k]) * 0.097);
                    assert!(
                        s.0[k] <= b.0[k] && s.0[k] >= floor,
                        "{:?} over {:?}",
                        s.0,
                        b.0
                    );
                }
            } else if a == 255 {
                let f = p
                    .subject
                    .rgba
                    .get_pixel(x - p.subject.rect.x, y - p.subject.rect.y);
                assert_eq!(s.0, [f.0[0], f.0[1], f.0[2]]);
            }
        }
    }
}

#[test]
fn leaving_the_photo_needs_allow_crop() {
    let mut rng = Rng(3);
    let cut = ellipse_cutout(&mut rng, 30, 30);
    let photo = noise_photo(&mut rng, 100, 100);
    let opts = PlaceOptions {
        at: Some((0.05, 0.9)),
        ..Default::default()
    };
    let e = format!("{:#}", place(photo.clone(), &cut, &opts).unwrap_err());
    assert!(
        e.contains("left") && e.contains("--allow-crop") && !e.contains('\n'),
        "{e}"
    );
    let p = place(
        photo.clone(),
        &cut,
        &PlaceOptions {
            allow_crop: true,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(p.subject.rect.x, 0);
    assert!(p.subject.rect.width < 30);
    let corner = PlaceOptions {
        at: Some((0.0, 0.1)),
        allow_crop: true,
        ..opts
    };
    assert!(
        place(photo.clone(), &cut, &corner).is_ok(),
        "a corner of it is still inside"
    );
    let gone = PlaceOptions {
        at: Some((0.0, 0.0)),
        ..corner
    };
    let e = format!("{:#}", place(photo.clone(), &cut, &gone).unwrap_err());
    assert!(e.contains("entirely outside"), "{e}");
    let high = PlaceOptions {
        at: Some((0.5, 0.1)),
        ..opts
    };
    let e = format!("{:#}", place(photo, &cut, &high).unwrap_err());
    assert!(e.contains("top"), "{e}");
}

#[test]
fn oversized_subjects_and_bad_options_are_refused() {
    let mut rng = Rng(4);
    let cut = ellipse_cutout(&mut rng, 40, 40);
    let photo = noise_photo(&mut rng, 50, 30);
    let big = PlaceOptions {
        size: SubjectSize::Scale(3.0),
        ..Default::default()
    };
    let e = format!("{:#}", place(photo.clone(), &cut, &big).unwrap_err());
    assert!(
        e.contains("--scale") && e.contains("--height") && e.contains("50x30"),
        "{e}"
    );
    for bad in [
        PlaceOptions {
            at: Some((1.5, 0.5)),
            ..Default::default()
        },
        PlaceOptions {
            size: SubjectSize::Scale(f64::NAN),
            ..Default::default()
        },
        PlaceOptions {
            size: SubjectSize::Height(0),
            ..Default::default()
        },
        PlaceOptions {
            shadow_opacity: 2.0,
            ..Default::default()
        },
        PlaceOptions {
            match_colour: Some(-1.0),
            ..Default::default()
        },
        PlaceOptions {
            shadow: ShadowKind::Drop {
                angle_deg: 0.0,
                length: 50.0,
            },
            ..Default::default()
        },
    ] {
        assert!(place(photo.clone(), &cut, &bad).is_err(), "{bad:?}");
    }
}

#[test]
fn cutouts_without_transparency_need_keying() {
    let opaque = RgbaImage::from_pixel(8, 8, Rgba([1, 2, 3, 255]));
    let e = format!("{:#}", check_cutout(&opaque).unwrap_err());
    assert!(e.contains("key it first or pass --key"), "{e}");
    let empty = RgbaImage::from_pixel(8, 8, Rgba([1, 2, 3, 0]));
    assert!(check_cutout(&empty).is_err());
    assert!(cutout_needs_keying(&DynamicImage::ImageRgb8(
        RgbImage::new(4, 4)
    )));
    assert!(cutout_needs_keying(&DynamicImage::ImageRgba8(opaque)));
    let mut rng = Rng(5);
    let cut = ellipse_cutout(&mut rng, 10, 10);
    assert!(!cutout_needs_keying(&DynamicImage::ImageRgba8(cut.clone())));
    assert_eq!(
        check_cutout(&cut).unwrap(),
        Bounds::of_alpha(&cut, BOX_MIN_ALPHA).unwrap().to_rect()
    );
}

/// The darkening-weighted centre of a shadow layer, in photo pixels.
fn shadow_centre(s: &ShadowLayer) -> (f64, f64) {
    let (mut w, mut x, mut y) = (0.0, 0.0, 0.0);
    for (px, py, d) in s.darkening.enumerate_pixels() {
        let v = d.0[0] as f64;
        w += v;
        x += v * (s.rect.x + px) as f64;
        y += v * (s.rect.y + py) as f64;
    }
    (x / w, y / w)
}

#[test]
fn contact_shadows_sit_under_the_footprint() {
    let mut rng = Rng(6);
    // A box standing on its whole width.
    let cut = RgbaImage::from_fn(40, 60, |x, y| {
        let inside = (2..38).contains(&x) && (2..58).contains(&y);
        Rgba([200, 100, 50, if inside { 255 } else { 0 }])
    });
    let p = place(
        noise_photo(&mut rng, 200, 200),
        &cut,
        &PlaceOptions::default(),
    )
    .unwrap();
    let b = anchor_box(&p.subject);
    let (cx, cy) = shadow_centre(&p.shadow);
    assert!(
        (cx - (b.x0 + b.x1) as f64 / 2.0).abs() < 1.5,
        "centred: {cx}"
    );
    assert!(
        (cy - b.y1 as f64).abs() < 3.0,
        "on the ground line: {cy} vs {}",
        b.y1
    );
    // Flat: much wider than tall, and no darker than the cap.
    assert!(
        p.shadow.rect.width > 2 * p.shadow.rect.height,
        "{:?}",
        p.shadow.rect
    );
    let peak = p.shadow.darkening.pixels().map(|d| d.0[0]).max().unwrap();
    assert!(
        peak > 40 && peak as f32 <= 255.0 * DEFAULT_SHADOW_OPACITY + 1.0,
        "peak {peak}"
    );
}

#[test]
fn drop_shadows_follow_the_angle_and_length() {
    let mut rng = Rng(8);
    let cut = ellipse_cutout(&mut rng, 30, 30);
    let photo = noise_photo(&mut rng, 200, 200);
    for (angle, dx, dy) in [
        (0.0, 1.0, 0.0),
        (90.0, 0.0, 1.0),
        (
            225.0,
            -std::f64::consts::FRAC_1_SQRT_2,
            -std::f64::consts::FRAC_1_SQRT_2,
        ),
    ] {
        let opts = PlaceOptions {
            at: Some((0.5, 0.6)),
            shadow: ShadowKind::Drop {
                angle_deg: angle,
                length: 0.8,
            },
            ..Default::default()
        };
        let p = place(photo.clone(), &cut, &opts).unwrap();
        let b = anchor_box(&p.subject);
        let (sx, sy) = ((b.x0 + b.x1) as f64 / 2.0, (b.y0 + b.y1) as f64 / 2.0);
        let (cx, cy) = shadow_centre(&p.shadow);
        let d = 0.8 * b.height() as f64;
        assert!(
            (cx - sx - d * dx).abs() < 2.0 && (cy - sy - d * dy).abs() < 2.0,
            "{angle}: {cx},{cy}"
        );
    }
    let none = PlaceOptions {
        shadow: ShadowKind::None,
        ..Default::default()
    };
    assert!(place(photo, &cut, &none).unwrap().shadow.is_empty());
}

#[test]
fn layers_rebuild_the_scene() {
    for (_, _, p) in random_placements(9, 10) {
        let subject = p.subject.to_layer();
        let shadow = p.shadow.to_layer();
        assert_eq!(subject.dimensions(), p.scene.dimensions());
        for (x, y, px) in subject.enumerate_pixels() {
            assert_eq!(px.0[3], subject_alpha(&p.subject, x, y));
            assert_eq!(
                shadow.get_pixel(x, y).0,
                [0, 0, 0, shadow_at(&p.shadow, x, y)]
            );
        }
    }
}

#[test]
fn restoring_keeps_opaque_pixels_exact_and_the_rest_of_the_scene() {
    let mut rng = Rng(10);
    for (_, _, p) in random_placements(11, 30) {
        // Any scene at all: what harmonisation gave back.
        let (w, h) = p.scene.dimensions();
        let scene = noise_photo(&mut rng, w, h);
        let out = restore_subject(&scene, &p.subject).unwrap();
        let mut worst = 0;
        for (x, y, o) in out.enumerate_pixels() {
            match subject_alpha(&p.subject, x, y) {
                255 => {
                    let f = p
                        .subject
                        .rgba
                        .get_pixel(x - p.subject.rect.x, y - p.subject.rect.y);
                    for k in 0..3 {
                        worst = worst.max(o.0[k].abs_diff(f.0[k]));
                    }
                }
                0 => assert_eq!(o, scene.get_pixel(x, y)),
                _ => {}
            }
        }
        assert_eq!(worst, 0, "opaque pixels are the subject's exactly");
    }
}
