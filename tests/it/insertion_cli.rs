//! img2img, inpainting and `tkg place` through the real binary on the tiny models: the
//! product's opaque pixels survive harmonisation exactly, layers and metadata are written,
//! `tkg info` reproduces scenes and images byte for byte, and bad input fails in one line
//! before any work.

use crate::common::cli::{assert_fails, s, scratch, tkg};
use image::{Rgb, RgbImage, Rgba, RgbaImage};
use std::path::{Path, PathBuf};

/// A photo with structure (gradients and a block), `w` x `h`.
fn photo(dir: &Path, name: &str, w: u32, h: u32) -> PathBuf {
    let img = RgbImage::from_fn(w, h, |x, y| {
        let block = (w / 3..w / 2).contains(&x) && (h / 4..h / 2).contains(&y);
        if block {
            Rgb([200, 40, 30])
        } else {
            Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 90])
        }
    });
    let p = dir.join(name);
    img.save(&p).unwrap();
    p
}

/// A cut-out: an opaque disc with a soft rim and a hole of no alpha around it.
fn cutout(dir: &Path, w: u32, h: u32) -> PathBuf {
    let (cx, cy, r) = (w as f32 / 2.0, h as f32 / 2.0, w.min(h) as f32 * 0.35);
    let img = RgbaImage::from_fn(w, h, |x, y| {
        let d = ((x as f32 + 0.5 - cx).powi(2) + (y as f32 + 0.5 - cy).powi(2)).sqrt();
        let a = ((r + 2.0 - d) / 4.0).clamp(0.0, 1.0);
        Rgba([
            30 + (x * 3 % 200) as u8,
            120,
            220,
            (a * 255.0).round() as u8,
        ])
    });
    let p = dir.join("product.cutout.png");
    img.save(&p).unwrap();
    p
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command `tkg info` prints for `image`, as arguments (with single quotes undone).
fn info_command(image: &Path) -> Vec<String> {
    let text = ok(&tkg(&["info", s(image)]));
    let line = text.lines().last().unwrap();
    shell_words(line)
}

fn shell_words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn rerun(cmd: &[String], dir: &Path) -> std::process::Output {
    assert_eq!(cmd[0], "tkg");
    let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
    let mut c = crate::common::cli::command(&args);
    c.current_dir(dir);
    c.output().unwrap()
}

#[test]
fn img2img_and_inpainting_run_and_reproduce_from_info() {
    let d = scratch("img2img");
    photo(&d, "photo.png", 64, 48);
    let mask = RgbImage::from_fn(
        128,
        96,
        |x, _| {
            if x >= 64 { Rgb([255; 3]) } else { Rgb([0; 3]) }
        },
    );
    mask.save(d.join("mask.png")).unwrap();
    for (name, model, extra) in [
        ("i2i.png", "tiny-sd15", &["--strength", "0.5"][..]),
        (
            "inp.png",
            "tiny-sd15",
            &["--mask", "mask.png", "--strength", "0.75"][..],
        ),
        ("inp9.png", "tiny-sd15-inpaint", &["--mask", "mask.png"][..]),
        (
            "xl9.png",
            "tiny-sdxl-inpaint",
            &["--mask", "mask.png", "--sampler", "euler-a"][..],
        ),
    ] {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "a red car",
            "--seed",
            "3",
            "--steps",
            "4",
            "--init-image",
            "photo.png",
            "--no-key",
            "--out",
            name,
        ];
        args.extend_from_slice(extra);
        let mut c = crate::common::cli::command(&args);
        c.current_dir(&d);
        ok(&c.output().unwrap());
        let made = image::open(d.join(name)).unwrap().to_rgb8();
        // The photo's own size (64x48), not the model's 64x64.
        assert_eq!(made.dimensions(), (64, 48), "{name}");
        let cmd = info_command(&d.join(name));
        let joined = cmd.join(" ");
        assert!(joined.contains("--init-image photo.png"), "{joined}");
        ok(&rerun(&cmd, &d));
        let repro = d.join(name.replace(".png", "-repro.png"));
        assert_eq!(
            image::open(&repro).unwrap().to_rgb8(),
            made,
            "{name}: the info command reproduces the image"
        );
    }
}

#[test]
fn bad_img2img_input_fails_in_one_line() {
    let d = scratch("img2img-bad");
    let p = photo(&d, "photo.png", 64, 48);
    let black = RgbImage::new(64, 48);
    black.save(d.join("empty.png")).unwrap();
    let white = RgbImage::from_pixel(64, 48, Rgb([255; 3]));
    white.save(d.join("full.png")).unwrap();
    let square = RgbImage::from_pixel(64, 64, Rgb([255; 3]));
    square.save(d.join("square.png")).unwrap();
    let out = d.join("o.png");
    let base = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "--model",
            "tiny-sd15",
            "--prompt",
            "a car",
            "--seed",
            "1",
            "--steps",
            "4",
            "--out",
            s(&out),
        ];
        a.extend_from_slice(extra);
        tkg(&a)
    };
    assert_fails(&base(&["--strength", "0.5"]), "need --init-image");
    assert_fails(
        &base(&["--init-image", s(&p), "--strength", "0"]),
        "strength",
    );
    assert_fails(
        &base(&["--init-image", s(&p), "--strength", "1.5"]),
        "strength",
    );
    // 4 steps at strength 0.2 run no step.
    assert_fails(
        &base(&["--init-image", s(&p), "--strength", "0.2"]),
        "runs no denoising step",
    );
    let mask = |m: &str| d.join(m).to_str().unwrap().to_string();
    assert_fails(
        &base(&["--init-image", s(&p), "--mask", &mask("empty.png")]),
        "empty",
    );
    assert_fails(
        &base(&["--init-image", s(&p), "--mask", &mask("full.png")]),
        "white everywhere",
    );
    assert_fails(
        &base(&["--init-image", s(&p), "--mask", &mask("square.png")]),
        "aspect",
    );
    // -q: the first use materialises the built-in model, with a notice on stderr.
    let nine = tkg(&[
        "-q",
        "generate",
        "--model",
        "tiny-sd15-inpaint",
        "--prompt",
        "a car",
        "--seed",
        "1",
        "--steps",
        "4",
        "--out",
        s(&out),
        "--init-image",
        s(&p),
    ]);
    assert_fails(&nine, "inpainting model");
    assert!(!out.exists(), "nothing is written");
}

#[test]
fn the_sdxl_refiner_records_its_aesthetic_scores_and_refuses_what_it_cannot_take() {
    let d = scratch("refiner");
    photo(&d, "photo.png", 64, 64);
    let refiner = crate::common::golden().join("insertion/sdxl_refiner/model");
    let run = |model: &[&str], extra: &[&str], out: &str| {
        // -q: a built-in model's first use prints a notice on stderr.
        let mut a = vec!["-q", "generate", "--prompt", "a cabin", "--seed", "5"];
        a.extend_from_slice(&["--steps", "4"]);
        a.extend_from_slice(model);
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--no-key", "--out", out]);
        let mut c = crate::common::cli::command(&a);
        c.current_dir(&d);
        c.output().unwrap()
    };
    let xl = ["--model-dir", s(&refiner)];
    let i2i = ["--init-image", "photo.png", "--strength", "0.5"];
    ok(&run(
        &xl,
        &[&i2i[..], &["--aesthetic-score", "7"]].concat(),
        "r.png",
    ));
    let cmd = info_command(&d.join("r.png"));
    let joined = cmd.join(" ");
    assert!(
        joined.contains("--aesthetic-score 7 --negative-aesthetic-score 2.5"),
        "{joined}"
    );
    ok(&rerun(&cmd, &d));
    assert_eq!(
        image::open(d.join("r-repro.png")).unwrap().to_rgb8(),
        image::open(d.join("r.png")).unwrap().to_rgb8(),
        "the info command reproduces the refined image"
    );
    // The score changes the image.
    ok(&run(
        &xl,
        &[&i2i[..], &["--aesthetic-score", "2"]].concat(),
        "r2.png",
    ));
    assert_ne!(
        image::open(d.join("r2.png")).unwrap().to_rgb8(),
        image::open(d.join("r.png")).unwrap().to_rgb8()
    );

    let out = d.join("bad.png");
    assert_fails(&run(&xl, &[], s(&out)), "give --init-image");
    assert_fails(
        &run(
            &xl,
            &[&i2i[..], &["--target-size", "64x64"]].concat(),
            s(&out),
        ),
        "not --target-size",
    );
    assert_fails(
        &run(
            &xl,
            &[&i2i[..], &["--aesthetic-score", "11"]].concat(),
            s(&out),
        ),
        "[0, 10]",
    );
    assert_fails(
        &run(
            &["--model", "tiny-sdxl"],
            &[&i2i[..], &["--negative-aesthetic-score", "3"]].concat(),
            s(&out),
        ),
        "takes no aesthetic score",
    );
    assert!(!out.exists(), "nothing is written");
}

#[test]
fn place_keeps_the_product_exactly_and_reproduces_from_info() {
    let d = scratch("place");
    let onto = photo(&d, "room.png", 160, 120);
    let cut = cutout(&d, 48, 40);
    let scene = d.join("scene.png");
    let out = tkg(&[
        "place",
        s(&cut),
        "--onto",
        s(&onto),
        "--at",
        "0.5,0.8",
        "--shadow",
        "contact",
        "--match-colour",
        "--harmonize",
        "0.6",
        "--prompt",
        "a wooden table",
        "--model",
        "tiny-sd15",
        "--steps",
        "4",
        "--seed",
        "5",
        "--layers",
        "--out",
        s(&scene),
    ]);
    let printed = ok(&out);
    assert_eq!(printed.lines().count(), 4, "{printed}");
    let scene_img = image::open(&scene).unwrap().to_rgb8();
    assert_eq!(scene_img.dimensions(), (160, 120), "the photo's size");
    let subject = image::open(d.join("scene.subject.png")).unwrap().to_rgba8();
    let shadow = image::open(d.join("scene.shadow.png")).unwrap().to_rgba8();
    let background = image::open(d.join("scene.background.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(subject.dimensions(), (160, 120));
    assert_eq!(shadow.dimensions(), (160, 120));
    assert_eq!(background, image::open(&onto).unwrap().to_rgb8());
    let mut opaque = 0;
    let mut changed = 0;
    for (x, y, p) in subject.enumerate_pixels() {
        let s = scene_img.get_pixel(x, y).0;
        if p.0[3] == 255 {
            opaque += 1;
            assert_eq!(s, [p.0[0], p.0[1], p.0[2]], "({x},{y}) under the product");
        } else if p.0[3] == 0 && s != background.get_pixel(x, y).0 {
            changed += 1;
        }
    }
    assert!(opaque > 300, "{opaque} opaque pixels");
    assert!(
        changed > 0,
        "harmonisation and the shadow change the scene around it"
    );
    // info gives the place command; it makes the same scene.
    let cmd = info_command(&scene);
    assert_eq!(cmd[1], "place", "{cmd:?}");
    ok(&rerun(&cmd, &d));
    assert_eq!(
        image::open(d.join("scene-repro.png")).unwrap().to_rgb8(),
        scene_img
    );
}

#[test]
fn place_refuses_bad_input_in_one_line() {
    let d = scratch("place-bad");
    let onto = photo(&d, "room.png", 80, 60);
    let cut = cutout(&d, 48, 40);
    let opaque = d.join("opaque.png");
    // A product on a green screen, not yet keyed.
    RgbImage::from_fn(40, 40, |x, y| {
        if (12..28).contains(&x) && (12..28).contains(&y) {
            Rgb([200, 30, 30])
        } else {
            Rgb([9, 200, 9])
        }
    })
    .save(&opaque)
    .unwrap();
    let out = d.join("s.png");
    let place = |extra: &[&str]| {
        let mut a = vec!["place"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--out", s(&out)]);
        tkg(&a)
    };
    assert_fails(&place(&[s(&opaque), "--onto", s(&onto)]), "--key");
    assert_fails(
        &place(&[s(&cut), "--onto", s(&onto), "--scale", "3"]),
        "larger than",
    );
    assert_fails(
        &place(&[s(&cut), "--onto", s(&onto), "--at", "0.99,0.5"]),
        "leave the photo",
    );
    assert_fails(
        &place(&[
            s(&cut),
            "--onto",
            s(&onto),
            "--harmonize",
            "1.5",
            "--prompt",
            "x",
        ]),
        "harmonize",
    );
    assert!(!out.exists());
    // A green-screen image keys itself with --key.
    let printed = ok(&place(&[
        s(&opaque),
        "--onto",
        s(&onto),
        "--key",
        "--shadow",
        "none",
    ]));
    assert_eq!(printed.trim(), s(&out));
}

#[test]
fn place_jobs_run_in_shards_and_resume() {
    let d = scratch("place-jobs");
    let onto = photo(&d, "room.png", 80, 60);
    let cut = cutout(&d, 24, 20);
    let jobs = d.join("jobs.jsonl");
    let mut text = String::new();
    for i in 0..4 {
        text.push_str(&format!(
            "{{\"cutout\": \"{}\", \"onto\": \"{}\", \"at\": [0.{}, 0.8], \"out\": \"{}\"}}\n",
            s(&cut),
            s(&onto),
            3 + i,
            s(&d.join(format!("p{i}.png")))
        ));
    }
    std::fs::write(&jobs, text).unwrap();
    let first = ok(&tkg(&["place", "--jobs", s(&jobs), "--shard", "0/2"]));
    assert_eq!(first.lines().count(), 2, "{first}");
    assert!(d.join("p0.png").exists() && d.join("p2.png").exists());
    assert!(!d.join("p1.png").exists());
    let rest = ok(&tkg(&["place", "--jobs", s(&jobs), "--skip-existing"]));
    assert_eq!(rest.lines().count(), 2, "only the other shard's: {rest}");
    let none = ok(&tkg(&["place", "--jobs", s(&jobs), "--skip-existing"]));
    assert!(none.is_empty(), "{none}");
}
