//! The decoder → keyer path on awkward inputs: greyscale, 16-bit, alpha, tiny, large,
//! truncated and corrupt files, and random images (proptest). Nothing may panic; a failure is
//! one clear line.

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
use proptest::prelude::*;
use std::io::Cursor;
use std::path::PathBuf;
use tkg::color::KeyColor;
use tkg::key::{self, KeyOptions};

fn png_bytes(img: &DynamicImage) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, ImageFormat::Png).unwrap();
    buf.into_inner()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tkg-key-robust-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// A green-screen test card: a red disc on chroma green, as RGB8.
fn card(w: u32, h: u32) -> ImageBuffer<Rgb<u8>, Vec<u8>> {
    ImageBuffer::from_fn(w, h, |x, y| {
        let dx = x as f32 - w as f32 / 2.0;
        let dy = y as f32 - h as f32 / 2.0;
        let r = w.min(h) as f32 / 4.0;
        let a = (r - (dx * dx + dy * dy).sqrt() + 0.5).clamp(0.0, 1.0);
        let mix = |f: f32, b: f32| (a * f + (1.0 - a) * b).round() as u8;
        Rgb([mix(210.0, 0.0), mix(40.0, 177.0), mix(50.0, 64.0)])
    })
}

fn check(k: &key::Keyed, w: u32, h: u32) {
    let n = (w * h) as usize;
    assert_eq!(k.alpha.len(), n);
    assert_eq!(k.foreground.len(), 3 * n);
    assert!(k.alpha.iter().all(|a| (0.0..=1.0).contains(a)));
    assert!((0.0..=1.0).contains(&k.background_fraction));
}

fn opts() -> KeyOptions {
    KeyOptions::new(KeyColor::green())
}

#[test]
fn greyscale_and_16_bit_inputs_key() {
    let rgb = card(48, 40);
    let variants = [
        DynamicImage::ImageRgb8(rgb.clone()),
        DynamicImage::ImageRgb16(DynamicImage::ImageRgb8(rgb.clone()).to_rgb16()),
        DynamicImage::ImageLuma8(DynamicImage::ImageRgb8(rgb.clone()).to_luma8()),
        DynamicImage::ImageLuma16(DynamicImage::ImageRgb8(rgb.clone()).to_luma16()),
    ];
    for img in variants {
        let decoded = image::load_from_memory(&png_bytes(&img)).unwrap();
        let k = key::key_image(&decoded, &opts()).unwrap();
        check(&k, 48, 40);
        if decoded.color().has_color() {
            // The disc is opaque and the screen clear, whatever the bit depth.
            assert_eq!(k.alpha[20 * 48 + 24], 1.0);
            assert_eq!(k.alpha[0], 0.0);
        } else {
            // A grey image has no green screen: the keyer says so and keys nothing away.
            let w = k.screen.warning.clone().unwrap_or_default();
            assert!(w.contains("no green screen found"), "{w}");
        }
    }
}

#[test]
fn existing_alpha_is_kept() {
    let rgb = card(40, 40);
    let rgba: ImageBuffer<Rgba<u8>, Vec<u8>> = ImageBuffer::from_fn(40, 40, |x, y| {
        let p = rgb.get_pixel(x, y).0;
        Rgba([p[0], p[1], p[2], if x < 20 { 255 } else { 100 }])
    });
    let img = DynamicImage::ImageRgba8(rgba);
    let k = key::key_image(&img, &opts()).unwrap();
    check(&k, 40, 40);
    let centre_left = k.alpha[20 * 40 + 18];
    let centre_right = k.alpha[20 * 40 + 22];
    assert!((centre_left - 1.0).abs() < 1e-6, "{centre_left}");
    assert!(
        (centre_right - 100.0 / 255.0).abs() < 1e-3,
        "{centre_right}"
    );
    // Grey + alpha too.
    let la: ImageBuffer<LumaA<u16>, Vec<u16>> =
        ImageBuffer::from_fn(9, 7, |x, _| LumaA([x as u16 * 7000, 30000]));
    let k = key::key_image(&DynamicImage::ImageLumaA16(la), &opts()).unwrap();
    check(&k, 9, 7);
}

#[test]
fn one_pixel_and_thin_images_key() {
    for (w, h) in [(1, 1), (1, 300), (300, 1), (2, 3)] {
        let img = DynamicImage::ImageRgb8(card(w, h));
        let decoded = image::load_from_memory(&png_bytes(&img)).unwrap();
        let k = key::key_image(&decoded, &opts()).unwrap();
        check(&k, w, h);
    }
    let one = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(1, 1, Luma([7u8])));
    check(&key::key_image(&one, &opts()).unwrap(), 1, 1);
}

#[test]
fn large_images_key_and_huge_ones_are_refused() {
    let img = card(2048, 1536);
    let k = key::key_rgb8(2048, 1536, img.as_raw(), &opts()).unwrap();
    check(&k, 2048, 1536);
    assert!(k.background_fraction > 0.5);
    let err = key::key_rgb8(40_000, 40_000, &[], &opts())
        .unwrap_err()
        .to_string();
    assert!(err.contains("too large"), "{err}");
}

#[test]
fn truncated_and_corrupt_files_fail_with_one_line() {
    let good = png_bytes(&DynamicImage::ImageRgb8(card(64, 48)));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated-half.png", good[..good.len() / 2].to_vec()),
        ("truncated-header.png", good[..20].to_vec()),
        ("empty.png", Vec::new()),
        ("garbage.png", b"this is not an image at all".to_vec()),
        ("flipped.png", {
            let mut v = good.clone();
            let mid = v.len() / 2;
            for b in &mut v[mid..mid + 40] {
                *b ^= 0x5a;
            }
            v
        }),
    ];
    for (name, bytes) in cases {
        let p = tmp(name);
        std::fs::write(&p, &bytes).unwrap();
        match key::load_image(&p) {
            Ok(img) => {
                // A corrupt chunk the decoder tolerates: keying must still work.
                check(
                    &key::key_image(&img, &opts()).unwrap(),
                    img.width(),
                    img.height(),
                );
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(msg.contains(name), "{name}: {msg}");
                assert!(!msg.contains('\n'), "{name}: {msg}");
            }
        }
    }
    let missing = key::load_image(&tmp("does-not-exist.png")).unwrap_err();
    assert!(format!("{missing:#}").contains("does-not-exist.png"));
}

fn any_image() -> impl Strategy<Value = DynamicImage> {
    (1u32..24, 1u32..24, 0u8..6, any::<u64>()).prop_map(|(w, h, kind, seed)| {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        // Mostly screen-like colours with random subjects, sometimes pure noise.
        let screenish = next() % 2 == 0;
        let mut px = move || {
            let v = next();
            if screenish && v % 3 != 0 {
                [
                    (v >> 8) as u8 % 30,
                    150 + (v >> 16) as u8 % 100,
                    (v >> 24) as u8 % 90,
                ]
            } else {
                [(v >> 8) as u8, (v >> 16) as u8, (v >> 24) as u8]
            }
        };
        match kind {
            0 => DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |_, _| Rgb(px()))),
            1 => DynamicImage::ImageRgba8(ImageBuffer::from_fn(w, h, |_, _| {
                let p = px();
                Rgba([p[0], p[1], p[2], p[0] ^ p[2]])
            })),
            2 => DynamicImage::ImageLuma8(ImageBuffer::from_fn(w, h, |_, _| Luma([px()[1]]))),
            3 => DynamicImage::ImageRgb16(ImageBuffer::from_fn(w, h, |_, _| {
                let p = px();
                Rgb([
                    p[0] as u16 * 257,
                    (p[1] as u16 * 257).saturating_sub(3),
                    p[2] as u16 * 250,
                ])
            })),
            4 => DynamicImage::ImageLumaA8(ImageBuffer::from_fn(w, h, |_, _| {
                let p = px();
                LumaA([p[1], p[2]])
            })),
            _ => DynamicImage::ImageRgba16(ImageBuffer::from_fn(w, h, |_, _| {
                let p = px();
                Rgba([
                    p[0] as u16 * 257,
                    p[1] as u16 * 257,
                    p[2] as u16 * 257,
                    65535,
                ])
            })),
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Encode → decode → key never panics, and the result is well formed, with any options.
    #[test]
    fn random_images_key_without_panic(
        img in any_image(),
        colour in prop::sample::select(vec!["green", "blue", "magenta", "white", "black", "#3a7f20"]),
        refine in any::<bool>(),
        cleanup in any::<bool>(),
        plate in any::<bool>(),
    ) {
        let bytes = png_bytes(&img);
        let decoded = image::load_from_memory(&bytes).unwrap();
        let mut o = KeyOptions::new(KeyColor::parse(colour).unwrap());
        o.refine = refine;
        o.cleanup = cleanup;
        o.fit_plate = plate;
        let k = key::key_image(&decoded, &o).unwrap();
        check(&k, img.width(), img.height());
    }

    /// Damaged PNG bytes: an error or an image, never a panic; an image keys.
    #[test]
    fn damaged_pngs_never_panic(
        img in any_image(),
        cut in 0.0f64..1.0,
        flips in prop::collection::vec((0.0f64..1.0, any::<u8>()), 0..4),
    ) {
        let mut bytes = png_bytes(&img);
        for (pos, v) in flips {
            let i = ((bytes.len() - 1) as f64 * pos) as usize;
            bytes[i] ^= v;
        }
        let keep = ((bytes.len() as f64) * cut) as usize;
        bytes.truncate(keep.max(1));
        if let Ok(decoded) = image::load_from_memory(&bytes) {
            let k = key::key_image(&decoded, &opts()).unwrap();
            check(&k, decoded.width(), decoded.height());
        }
    }
}
