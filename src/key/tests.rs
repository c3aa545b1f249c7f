//! Unit tests of the keyer on small synthetic composites with known alpha.

// Channel and neighbour loops index several arrays at once; ranges read best there.
#![allow(clippy::needless_range_loop)]

use super::*;

const CHROMA_GREEN: [f32; 3] = [0.0, 177.0, 64.0];

/// Composites `fg`/`alpha` over `screen(x, y)`, rounding to 8 bits.
fn composite(
    w: usize,
    h: usize,
    alpha: &dyn Fn(usize, usize) -> f32,
    fg: &dyn Fn(usize, usize) -> [f32; 3],
    screen: &dyn Fn(usize, usize) -> [f32; 3],
) -> (Vec<u8>, Vec<f32>) {
    let mut rgb = Vec::with_capacity(w * h * 3);
    let mut gt = Vec::with_capacity(w * h);
    for y in 0..h {
        for x in 0..w {
            let a = alpha(x, y);
            let f = fg(x, y);
            let b = screen(x, y);
            for k in 0..3 {
                rgb.push((a * f[k] + (1.0 - a) * b[k]).round().clamp(0.0, 255.0) as u8);
            }
            gt.push(a);
        }
    }
    (rgb, gt)
}

fn disc_alpha(cx: f32, cy: f32, r: f32) -> impl Fn(usize, usize) -> f32 {
    move |x, y| {
        let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
        (r - d + 0.5).clamp(0.0, 1.0)
    }
}

fn max_err(pred: &[f32], gt: &[f32]) -> f32 {
    pred.iter()
        .zip(gt)
        .map(|(p, g)| (p - g).abs())
        .fold(0.0, f32::max)
}

fn key(w: usize, h: usize, rgb: &[u8], color: &str) -> Keyed {
    key_rgb8(
        w as u32,
        h as u32,
        rgb,
        &KeyOptions::new(KeyColor::parse(color).unwrap()),
    )
    .unwrap()
}

#[test]
fn anti_aliased_disc_on_flat_green() {
    let (w, h) = (64, 48);
    let (rgb, gt) = composite(
        w,
        h,
        &disc_alpha(30.0, 24.0, 14.3),
        &|_, _| [200.0, 40.0, 50.0],
        &|_, _| CHROMA_GREEN,
    );
    let k = key(w, h, &rgb, "green");
    assert!(!k.screen.fell_back, "{:?}", k.screen);
    assert!(k.screen.warning.is_none(), "{:?}", k.screen.warning);
    for c in 0..3 {
        assert!(
            (k.screen.rgb[c] - CHROMA_GREEN[c]).abs() < 2.0,
            "{:?}",
            k.screen
        );
    }
    let e = max_err(&k.alpha, &gt);
    assert!(e < 0.12, "max alpha error {e}");
    // Interior and exterior exact.
    assert_eq!(k.alpha[24 * w + 30], 1.0);
    assert_eq!(k.alpha[0], 0.0);
    // Unmixed colour at an edge pixel is the subject's, not a green mix.
    let edge = (0..w * h).find(|&i| gt[i] > 0.5 && gt[i] < 0.9).unwrap();
    let f = &k.foreground[3 * edge..3 * edge + 3];
    assert!(
        (f[0] as i32 - 200).abs() < 25 && (f[1] as i32) < 80,
        "{f:?}"
    );
}

#[test]
fn other_key_colours_work() {
    let (w, h) = (48, 48);
    for (name, screen, subject) in [
        ("blue", [10.0, 60.0, 200.0], [230.0, 200.0, 40.0]),
        ("magenta", [230.0, 20.0, 220.0], [30.0, 200.0, 60.0]),
        ("#20c0c0", [30.0, 190.0, 195.0], [220.0, 60.0, 40.0]),
        ("green", [40.0, 220.0, 40.0], [250.0, 250.0, 250.0]),
    ] {
        let (rgb, gt) = composite(
            w,
            h,
            &disc_alpha(24.0, 24.0, 12.6),
            &|_, _| subject,
            &|_, _| screen,
        );
        let k = key(w, h, &rgb, name);
        assert!(!k.screen.fell_back, "{name}: {:?}", k.screen);
        let e = max_err(&k.alpha, &gt);
        assert!(e < 0.15, "{name}: max alpha error {e}");
        // No screen colour left on the subject's edge.
        for i in 0..w * h {
            if gt[i] > 0.3 {
                let f = &k.foreground[3 * i..3 * i + 3];
                let d: f32 = (0..3).map(|c| (f[c] as f32 - subject[c]).abs()).sum();
                assert!(d < 60.0, "{name}: pixel {i} alpha {} fg {f:?}", gt[i]);
            }
        }
    }
}

#[test]
fn gradient_and_vignette_screens_key_cleanly() {
    let (w, h) = (96, 80);
    let vignette = |x: usize, y: usize| {
        let dx = (x as f32 - 48.0) / 60.0;
        let dy = (y as f32 - 40.0) / 60.0;
        let f = 1.0 - 0.45 * (dx * dx + dy * dy);
        let g = 0.8 + 0.3 * x as f32 / w as f32;
        CHROMA_GREEN.map(|v| (v * f * g).min(255.0))
    };
    let (rgb, gt) = composite(
        w,
        h,
        &disc_alpha(48.0, 40.0, 15.0),
        &|_, _| [240.0, 230.0, 220.0],
        &vignette,
    );
    let k = key(w, h, &rgb, "green");
    let flat = key_rgb8(w as u32, h as u32, &rgb, &{
        let mut o = KeyOptions::new(KeyColor::green());
        o.fit_plate = false;
        o
    })
    .unwrap();
    let sad = |a: &[f32]| a.iter().zip(&gt).map(|(p, g)| (p - g).abs()).sum::<f32>();
    assert!(
        sad(&k.alpha) < 0.25 * sad(&flat.alpha),
        "plate {} vs flat {}",
        sad(&k.alpha),
        sad(&flat.alpha)
    );
    assert!(max_err(&k.alpha, &gt) < 0.15);
}

#[test]
fn a_blue_subject_on_green_is_opaque_inside() {
    // Saturated blue lies 71 degrees of hue from chroma green: the soft measure alone reads
    // it as about 12% screen over the whole disc.
    let (w, h) = (64, 48);
    let blue = [28.0, 113.0, 216.0];
    let (rgb, gt) = composite(
        w,
        h,
        &disc_alpha(30.0, 24.0, 16.3),
        &|_, _| blue,
        &|_, _| CHROMA_GREEN,
    );
    let soft = alpha::raw_alpha(blue, CHROMA_GREEN, 1.0);
    assert!(soft < 0.89, "the case this guards: {soft}");
    let k = key(w, h, &rgb, "green");
    // Opaque from two pixels inside the edge (the rim keeps the soft reading, re-read
    // against the interior's colour).
    let inner = disc_alpha(30.0, 24.0, 14.3);
    for i in 0..w * h {
        if inner(i % w, i / w) >= 1.0 {
            assert_eq!(k.alpha[i], 1.0, "pixel {i}");
        }
    }
    let e = max_err(&k.alpha, &gt);
    assert!(e < 0.2, "max alpha error {e}");
}

#[test]
fn shadows_glass_and_strands_survive() {
    let (w, h) = (80, 60);
    // A soft shadow (black, alpha up to 0.35), a glass panel (alpha 0.4, light blue) and a
    // one-pixel strand (alpha 0.6) on one screen.
    let alpha = |x: usize, y: usize| -> f32 {
        if (10..30).contains(&x) && (10..50).contains(&y) {
            0.4
        } else if x == 50 && (5..55).contains(&y) {
            0.6
        } else if (60..76).contains(&x) && (20..50).contains(&y) {
            0.35 * (1.0 - (x as f32 - 68.0).abs() / 9.0)
        } else {
            0.0
        }
    };
    let fg = |x: usize, _y: usize| -> [f32; 3] {
        if x < 30 {
            [200.0, 225.0, 250.0]
        } else if x == 50 {
            [90.0, 60.0, 40.0]
        } else {
            [0.0, 0.0, 0.0]
        }
    };
    let (rgb, gt) = composite(w, h, &alpha, &fg, &|_, _| CHROMA_GREEN);
    let k = key(w, h, &rgb, "green");
    // Glass and shadow are exact up to rounding; the dark brown strand reads a little opaque
    // (a colour-difference keyer's known bias for colours opposite the key), but is kept whole.
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let tol = if x == 50 { 0.2 } else { 0.06 };
            assert!(
                (k.alpha[i] - gt[i]).abs() < tol,
                "({x}, {y}): {} vs {}",
                k.alpha[i],
                gt[i]
            );
        }
    }
}

#[test]
fn islands_go_and_screen_coloured_holes_stay() {
    let (w, h) = (64, 64);
    let mut rgb = Vec::new();
    let mut gt = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let ring = {
                let d = ((x as f32 - 32.0).powi(2) + (y as f32 - 32.0).powi(2)).sqrt();
                (12.0..20.0).contains(&d)
            };
            // A yellow-green pinhole inside the ring body (subject colour close to the key).
            let pinhole = (x == 32 || x == 33) && (y == 16 || y == 17);
            let speck = x == 5 && y == 40;
            let (c, a) = if pinhole {
                ([60u8, 170, 60], 1.0)
            } else if ring {
                ([220, 60, 60], 1.0)
            } else if speck {
                ([30, 150, 70], 0.0)
            } else {
                ([0, 177, 64], 0.0)
            };
            rgb.extend(c);
            gt.push(a);
        }
    }
    let k = key(w, h, &rgb, "green");
    // The speck (slightly off the screen colour) is gone.
    assert_eq!(k.alpha[40 * w + 5], 0.0);
    // The pinhole is filled.
    assert!(k.alpha[16 * w + 32] > 0.9, "{}", k.alpha[16 * w + 32]);
    // The hole in the middle of the ring shows the screen and stays clear.
    assert_eq!(k.alpha[32 * w + 32], 0.0);
    let mut opts = KeyOptions::new(KeyColor::green());
    opts.cleanup = false;
    let raw = key_rgb8(w as u32, h as u32, &rgb, &opts).unwrap();
    assert!(
        raw.alpha[16 * w + 32] < 0.5,
        "the pinhole test needs a pinhole"
    );
    assert!(
        raw.alpha[40 * w + 5] > 0.0,
        "the island test needs an island"
    );
}

#[test]
fn spill_is_suppressed() {
    let (w, h) = (40, 40);
    let r = 12.0;
    let depth = |x: usize, y: usize| {
        r - ((x as f32 + 0.5 - 20.0).powi(2) + (y as f32 + 0.5 - 20.0).powi(2)).sqrt()
    };
    // A light grey subject with screen light spilled on its rim: F' = F + s B.
    let (rgb, gt) = composite(
        w,
        h,
        &disc_alpha(20.0, 20.0, r),
        &|x, y| {
            let s = 0.2 * (-depth(x, y).max(0.0) / 2.5).exp();
            CHROMA_GREEN.map(|b| (200.0 + s * b).min(255.0))
        },
        &|_, _| CHROMA_GREEN,
    );
    let greenness = |f: &[u8]| f[1] as i32 - f[0].max(f[2]) as i32;
    let rim: Vec<usize> = (0..w * h)
        .filter(|&i| gt[i] >= 1.0 && depth(i % w, i / w) < 3.0)
        .collect();
    assert!(!rim.is_empty());
    let k = key(w, h, &rgb, "green");
    for &i in &rim {
        let f = &k.foreground[3 * i..3 * i + 3];
        assert!(greenness(f) <= 3, "green cast left at {i}: {f:?}");
    }
    let mut opts = KeyOptions::new(KeyColor::green());
    opts.despill = 0.0;
    let nod = key_rgb8(w as u32, h as u32, &rgb, &opts).unwrap();
    let worst = rim
        .iter()
        .map(|&i| greenness(&nod.foreground[3 * i..3 * i + 3]))
        .max()
        .unwrap();
    assert!(worst > 10, "the test needs spill: {worst}");
}

#[test]
fn no_screen_is_reported() {
    let (w, h) = (50, 40);
    // A grey-brown "photo" with no green anywhere.
    let rgb: Vec<u8> = (0..w * h)
        .flat_map(|i| {
            let v = (i * 37 % 101) as u8;
            [100 + v, 80 + v / 2, 60 + v / 3]
        })
        .collect();
    let k = key(w, h, &rgb, "green");
    assert!(k.screen.fell_back);
    let warn = k.screen.warning.unwrap();
    assert!(warn.contains("no green screen found"), "{warn}");
    assert!(k.alpha.iter().all(|&a| a == 1.0));
}

#[test]
fn wrong_screen_colour_falls_back_with_a_warning() {
    let (w, h) = (40, 40);
    let (rgb, _) = composite(
        w,
        h,
        &disc_alpha(20.0, 20.0, 8.0),
        &|_, _| [200.0, 200.0, 200.0],
        &|_, _| [10.0, 40.0, 220.0],
    );
    let k = key(w, h, &rgb, "green");
    assert!(k.screen.fell_back);
    let warn = k.screen.warning.unwrap();
    assert!(warn.contains("#0a28dc") && warn.contains("green"), "{warn}");
}

#[test]
fn off_hue_screen_is_estimated_not_rejected() {
    let (w, h) = (40, 40);
    // A teal-ish green, about 20 degrees off pure green.
    let screen = [20.0, 190.0, 120.0];
    let (rgb, gt) = composite(
        w,
        h,
        &disc_alpha(20.0, 20.0, 8.0),
        &|_, _| [220.0, 90.0, 60.0],
        &|_, _| screen,
    );
    let k = key(w, h, &rgb, "green");
    assert!(!k.screen.fell_back, "{:?}", k.screen);
    assert!(max_err(&k.alpha, &gt) < 0.15);
}

#[test]
fn tiny_images_work() {
    for (w, h) in [(1, 1), (1, 7), (5, 1), (2, 2)] {
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 77 % 256) as u8).collect();
        let k = key(w, h, &rgb, "green");
        assert_eq!(k.alpha.len(), w * h);
        assert!(k.alpha.iter().all(|a| (0.0..=1.0).contains(a)));
    }
    assert!(key_rgb8(0, 5, &[], &KeyOptions::new(KeyColor::green())).is_err());
    assert!(key_rgb8(3, 3, &[0; 5], &KeyOptions::new(KeyColor::green())).is_err());
}

#[test]
fn bad_thresholds_are_refused() {
    let mut o = KeyOptions::new(KeyColor::green());
    o.clip_black = Some(0.6);
    o.clip_white = Some(0.5);
    let err = key_rgb8(1, 1, &[0, 0, 0], &o).unwrap_err().to_string();
    assert!(err.contains("clip white"), "{err}");
}

#[test]
fn writes_every_output_and_refuses_to_clobber() {
    let dir = std::env::temp_dir().join(format!("tkg-key-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (w, h) = (32, 24);
    let (rgb, _) = composite(
        w,
        h,
        &disc_alpha(16.0, 12.0, 7.0),
        &|_, _| [200.0, 40.0, 40.0],
        &|_, _| CHROMA_GREEN,
    );
    let k = key(w, h, &rgb, "green");
    let bg_path = dir.join("bg.png");
    let bg: Vec<u8> = (0..50 * 10 * 3).map(|i| (i % 251) as u8).collect();
    output::write_png(
        &bg_path,
        &PngImage {
            width: 50,
            height: 10,
            pixels: Pixels::Rgb8(&bg),
            text: &[],
        },
        false,
    )
    .unwrap();
    let flags = KeyOutputFlags {
        matte16: true,
        premultiplied: true,
        clean_plate: true,
        composite: Some(bg_path),
    };
    let out = dir.join("x.png");
    let written = write_outputs(&out, &k, &flags, &[], false).unwrap();
    assert_eq!(written, output_paths(&out, &flags));
    assert_eq!(written.len(), 5);
    let matte = image::open(&written[0]).unwrap();
    assert!(matches!(matte, DynamicImage::ImageLuma16(_)));
    let m = matte.to_luma16();
    assert_eq!(m.get_pixel(16, 12).0[0], 65535);
    assert_eq!(m.get_pixel(0, 0).0[0], 0);
    let cut = image::open(&written[1]).unwrap().to_rgba8();
    assert_eq!(cut.dimensions(), (w as u32, h as u32));
    assert_eq!(cut.get_pixel(0, 0).0[3], 0);
    for p in &written[2..] {
        let img = image::open(p).unwrap();
        assert_eq!((img.width(), img.height()), (w as u32, h as u32));
    }
    let err = write_outputs(&out, &k, &flags, &[], false).unwrap_err();
    assert!(format!("{err:#}").contains("--overwrite"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ramp_clips_the_ends_and_keeps_the_middle() {
    let r = alpha::Ramp { lo: 0.04, hi: 0.9 };
    assert_eq!(r.apply(0.0), 0.0);
    assert_eq!(r.apply(0.04), 0.0);
    assert_eq!(r.apply(0.9), 1.0);
    assert_eq!(r.apply(1.3), 1.0);
    assert_eq!(r.apply(0.5), 0.5);
    let mut prev = 0.0;
    for k in 0..=1000 {
        let v = r.apply(k as f32 / 1000.0);
        assert!(
            v >= prev && (v - prev) < 0.003,
            "not continuous/monotone at {k}"
        );
        prev = v;
    }
}

#[test]
fn row_and_pixel_raw_alpha_agree() {
    // On a flat plate the interpolated row quantities are exact.
    for screen in [
        CHROMA_GREEN,
        [20.0, 60.0, 210.0],
        [250.0, 250.0, 250.0],
        [30.0, 30.0, 30.0],
    ] {
        let plate = Plate::constant(64, 1, screen);
        let mut row = alpha::PlateRow::default();
        row.fill(&plate, 0);
        let rgb: Vec<u8> = (0..64 * 3).map(|i| (i * 97 % 256) as u8).collect();
        let mut out = vec![0f32; 64];
        let mut solid = vec![0u8; 64];
        alpha::raw_alpha_row(&rgb, &row, 3.0, 0.9, &mut out, &mut solid);
        for x in 0..64 {
            let c = screen::px(&rgb, x);
            let want = alpha::raw_alpha(c, screen, 3.0);
            assert!((out[x] - want).abs() < 1e-4, "{x}: {} vs {want}", out[x]);
            let solid_raw = alpha::solid_raw_alpha(c, screen, 3.0);
            if (solid_raw - 0.9).abs() > 1e-4 {
                assert_eq!(solid[x] != 0, solid_raw >= 0.9, "{x}: {solid_raw}");
            }
        }
    }
}
