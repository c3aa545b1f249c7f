//! `tkg key` end to end: outputs, flags, refusals and one-line errors.

use image::{DynamicImage, ImageBuffer, Rgb};
use std::path::{Path, PathBuf};
use std::process::Command;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tkg-key-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn tkg(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tkg"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn card(path: &Path, screen: [u8; 3]) {
    let img: ImageBuffer<Rgb<u8>, Vec<u8>> = ImageBuffer::from_fn(64, 48, |x, y| {
        let d = ((x as f32 - 32.0).powi(2) + (y as f32 - 24.0).powi(2)).sqrt();
        let a = (12.0 - d + 0.5).clamp(0.0, 1.0);
        let mix = |f: f32, b: u8| (a * f + (1.0 - a) * b as f32).round() as u8;
        Rgb([
            mix(230.0, screen[0]),
            mix(200.0, screen[1]),
            mix(60.0, screen[2]),
        ])
    });
    img.save(path).unwrap();
}

fn names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn keys_with_every_output() {
    let d = dir("all");
    let src = d.join("card.png");
    card(&src, [0, 177, 64]);
    let bg = d.join("bg.png");
    DynamicImage::ImageRgb8(ImageBuffer::from_pixel(10, 30, Rgb([200, 10, 10])))
        .save(&bg)
        .unwrap();
    let (ok, stdout, stderr) = tkg(&[
        "key",
        src.to_str().unwrap(),
        "--matte-depth",
        "16",
        "--premultiplied",
        "--clean-plate",
        "--composite",
        bg.to_str().unwrap(),
        "--refine",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
    assert_eq!(
        names(&d),
        [
            "bg.png",
            "card.composite.png",
            "card.cutout.png",
            "card.matte.png",
            "card.plate.png",
            "card.png",
            "card.premultiplied.png"
        ]
    );
    let matte = image::open(d.join("card.matte.png")).unwrap();
    assert!(matches!(matte, DynamicImage::ImageLuma16(_)));
    let comp = image::open(d.join("card.composite.png")).unwrap().to_rgb8();
    assert_eq!(comp.dimensions(), (64, 48));
    // The screen is replaced by the background, the subject kept.
    assert_eq!(comp.get_pixel(0, 0).0, [200, 10, 10]);
    let c = comp.get_pixel(32, 24).0;
    assert!(c[0] > 200 && c[1] > 170 && c[2] < 90, "{c:?}");
    // Refuses to clobber, before doing any work, and changes nothing.
    let before = std::fs::read(d.join("card.cutout.png")).unwrap();
    let (ok, _, stderr) = tkg(&["key", src.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("--overwrite"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(before, std::fs::read(d.join("card.cutout.png")).unwrap());
}

#[test]
fn other_key_colours_and_a_missing_screen() {
    let d = dir("colours");
    let src = d.join("blue.png");
    card(&src, [10, 60, 210]);
    let (ok, _, stderr) = tkg(&["key", src.to_str().unwrap(), "--color", "blue"]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let matte = image::open(d.join("blue.matte.png")).unwrap().to_luma8();
    assert_eq!(matte.get_pixel(0, 0).0[0], 0);
    assert_eq!(matte.get_pixel(32, 24).0[0], 255);
    // The same image keyed as green: no green screen, and the user is told.
    let out = d.join("asgreen.png");
    let (ok, _, stderr) = tkg(&["key", src.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("warning:"), "{stderr}");
    assert!(stderr.contains("green"), "{stderr}");
}

#[test]
fn bad_inputs_fail_with_one_line_and_write_nothing() {
    let d = dir("bad");
    let good = d.join("good.png");
    card(&good, [0, 177, 64]);
    let bytes = std::fs::read(&good).unwrap();
    let trunc = d.join("trunc.png");
    std::fs::write(&trunc, &bytes[..bytes.len() / 3]).unwrap();
    let junk = d.join("junk.png");
    std::fs::write(&junk, b"GIF89a not really").unwrap();
    for (args, expect) in [
        (vec!["key", trunc.to_str().unwrap()], "trunc.png"),
        (vec!["key", junk.to_str().unwrap()], "junk.png"),
        (
            vec!["key", d.join("none.png").to_str().unwrap()],
            "none.png",
        ),
        (
            vec!["key", good.to_str().unwrap(), "--clip-black", "1.5"],
            "between 0 and 1",
        ),
        (
            vec![
                "key",
                good.to_str().unwrap(),
                "--clip-black",
                "0.5",
                "--clip-white",
                "0.4",
            ],
            "--clip-white",
        ),
        (
            vec!["key", good.to_str().unwrap(), "--matte-depth", "12"],
            "8 or 16",
        ),
        (
            vec![
                "key",
                good.to_str().unwrap(),
                "--composite",
                junk.to_str().unwrap(),
            ],
            "junk.png",
        ),
    ] {
        let before = names(&d);
        let (ok, _, stderr) = tkg(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(before, names(&d), "{args:?} left files behind");
    }
}
