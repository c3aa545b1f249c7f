//! Property-style tests of the harmonisation geometry: the crop and masks cover what they
//! must, blending back touches nothing else, and the product comes back exactly.

use super::tests::{Rng, ellipse_cutout, noise_photo, random_placements, shadow_at, subject_alpha};
use super::*;
use image::Rgb;

#[test]
fn plans_cover_subject_and_shadow_on_the_vae_grid() {
    for (i, (_, _, p)) in random_placements(12, 30).into_iter().enumerate() {
        let native = if i % 2 == 0 { 512 } else { 1024 };
        // A zero margin leaves the band and the feather to size the crop alone.
        let margin = if i % 3 == 0 { 0 } else { 32 };
        let opts = HarmonizeOptions {
            native,
            vae_factor: 8,
            margin,
        };
        let plan = p.harmonize_plan(&opts).unwrap();
        let (pw, ph) = p.background.dimensions();
        let c = plan.crop;
        assert!(c.right() <= pw && c.bottom() <= ph);
        let sb = p.subject.alpha_box().unwrap();
        assert_eq!(c.union(&sb), c, "crop holds the subject");
        if !p.shadow.is_empty() {
            assert_eq!(c.union(&p.shadow.rect), c, "crop holds the shadow");
        }
        let (mw, mh) = plan.model_size;
        assert!(mw % 8 == 0 && mh % 8 == 0 && mw.max(mh) == native);
        let model_mask = mask_for_model(&plan).unwrap();
        assert_eq!(model_mask.dimensions(), plan.model_size);
        assert!(model_mask.pixels().all(|v| v.0[0] == 0 || v.0[0] == 255));
        let band = plan.band_px as i64;
        for (x, y, m) in plan.mask.enumerate_pixels() {
            let (px, py) = (c.x + x, c.y + y);
            let a = subject_alpha(&p.subject, px, py);
            // A soft edge pixel is always repainted.
            if a > 0 && a < 250 {
                assert_eq!(m.0[0], 255, "edge at {px},{py}");
            }
            // The opaque interior, band pixels deep, never is.
            let deep = (-band..=band).all(|dy| {
                (-band..=band).all(|dx| {
                    let (qx, qy) = (px as i64 + dx, py as i64 + dy);
                    qx >= 0 && qy >= 0 && subject_alpha(&p.subject, qx as u32, qy as u32) >= 250
                })
            });
            if deep {
                assert_eq!(m.0[0], 0, "interior at {px},{py}");
            }
            if a == 0 && shadow_at(&p.shadow, px, py) >= harmonize::SHADOW_MASK_MIN {
                assert_eq!(m.0[0], 255, "shadow at {px},{py}");
            }
        }
        // The feather fades out inside the crop, except where the crop meets the photo's edge.
        let (cw, ch) = (c.width, c.height);
        for (x, y, f) in plan.feathered.enumerate_pixels() {
            let on_crop_edge = (x == 0 && c.x > 0)
                || (y == 0 && c.y > 0)
                || (x == cw - 1 && c.right() < pw)
                || (y == ch - 1 && c.bottom() < ph);
            if on_crop_edge {
                assert_eq!(f.0[0], 0, "feather at the crop's edge {x},{y}");
            }
        }
    }
}

#[test]
fn blending_back_touches_nothing_outside_the_feathered_mask() {
    let mut rng = Rng(13);
    for (_, _, p) in random_placements(14, 30) {
        let opts = HarmonizeOptions {
            native: 64,
            vae_factor: 8,
            margin: 1 + rng.below(40),
        };
        let plan = p.harmonize_plan(&opts).unwrap();
        let model_in = crop_for_model(&p.scene, &plan).unwrap();
        assert_eq!(model_in.dimensions(), plan.model_size);
        // Whatever the model returns.
        let (mw, mh) = plan.model_size;
        let harmonized = noise_photo(&mut rng, mw, mh);
        let out = blend_back(&p.scene, &harmonized, &plan).unwrap();
        let mut changed = 0;
        for (x, y, o) in out.enumerate_pixels() {
            let s = p.scene.get_pixel(x, y);
            let w = if plan.crop.contains(x, y) {
                plan.feathered.get_pixel(x - plan.crop.x, y - plan.crop.y).0[0]
            } else {
                0
            };
            if w == 0 {
                assert_eq!(o, s, "byte-identical at {x},{y}");
            } else {
                changed += (o != s) as u32;
            }
        }
        assert!(changed > 0, "the harmonised pixels came in");
        // And the product comes back exactly at the end.
        let last = restore_subject(&out, &p.subject).unwrap();
        for (x, y, o) in last.enumerate_pixels() {
            if subject_alpha(&p.subject, x, y) == 255 {
                let f = p
                    .subject
                    .rgba
                    .get_pixel(x - p.subject.rect.x, y - p.subject.rect.y);
                assert_eq!(o.0, [f.0[0], f.0[1], f.0[2]]);
            }
        }
    }
}

#[test]
fn a_flat_scene_crops_to_the_same_flat_colour_and_bad_sizes_are_refused() {
    let mut rng = Rng(15);
    let cut = ellipse_cutout(&mut rng, 30, 20);
    let photo = RgbImage::from_pixel(300, 200, Rgb([90, 140, 200]));
    let p = place(
        photo,
        &cut,
        &PlaceOptions {
            shadow: ShadowKind::None,
            ..Default::default()
        },
    )
    .unwrap();
    let plan = p.harmonize_plan(&HarmonizeOptions::new(512)).unwrap();
    let background = crop_for_model(&p.background, &plan).unwrap();
    let want = [90u8, 140, 200];
    assert!(
        background
            .pixels()
            .all(|q| (0..3).all(|k| q.0[k].abs_diff(want[k]) <= 1))
    );
    let wrong = RgbImage::new(plan.model_size.0 + 8, plan.model_size.1);
    assert!(blend_back(&p.scene, &wrong, &plan).is_err());
    assert!(crop_for_model(&RgbImage::new(10, 10), &plan).is_err());
    assert!(
        p.harmonize_plan(&HarmonizeOptions::new(500)).is_err(),
        "not a multiple of 8"
    );
}
