//! Shadows as a darkening layer: the background's linear light is multiplied by `1 - d`, so a
//! shadow dims what is there and never paints black over it.
//!
//! - Contact: the footprint (the lowest [`FOOTPRINT_ROWS`] of the alpha box) becomes a flat
//!   ellipse on the ground line, [`CONTACT_FLATTEN`] times as tall as it is wide, modulated by
//!   how much of each column touches the ground, blurred by [`CONTACT_BLUR`] of the width.
//! - Drop: the silhouette moved `length` subject heights toward the angle, blurred by
//!   [`DROP_BLUR`] of the distance moved: the farther a shadow falls, the softer it is.
//!
//! The shape is drawn and blurred on a grid of cells a third of the blur's sigma wide (a blurred
//! field has no detail finer than that) and read back bilinearly, so a 100-pixel blur on a
//! 48 MP photo costs as little as a 3-pixel one on a small photo.

use super::blur;
use super::{Bounds, PlaceOptions, Rect, ShadowKind, ShadowLayer, Sprite};
use image::GrayImage;

/// The most a shadow darkens: even a full-opacity shadow keeps a tenth of the light.
pub const MAX_DARKENING: f32 = 0.9;
/// Longest drop shadow, in subject heights.
pub const MAX_DROP_LENGTH: f64 = 2.0;
/// The footprint's height, as a fraction of the subject's height.
pub const FOOTPRINT_ROWS: f64 = 0.05;
/// The contact ellipse's half-height, as a fraction of the footprint's width (a surface seen
/// from a few degrees above).
pub const CONTACT_FLATTEN: f64 = 0.08;
/// The contact shadow's blur sigma, as a fraction of the subject's width.
pub const CONTACT_BLUR: f64 = 0.04;
/// The drop shadow's blur sigma, as a fraction of the distance it is moved.
pub const DROP_BLUR: f64 = 0.2;

/// The shadow of `sprite` (whose alpha box in the photo is `visible`) in a `photo` sized
/// scene, clipped to the photo and trimmed to the pixels it darkens.
pub(crate) fn cast(
    sprite: &Sprite,
    visible: &Bounds,
    opts: &PlaceOptions,
    photo: (u32, u32),
) -> ShadowLayer {
    let field = match opts.shadow {
        _ if opts.shadow_opacity <= 0.0 => None,
        ShadowKind::None => None,
        ShadowKind::Contact => contact_shadow(sprite, visible, photo),
        ShadowKind::Drop { angle_deg, length } => {
            drop_shadow(sprite, visible, angle_deg, length, photo)
        }
    };
    match field {
        Some(f) => f.to_layer(opts.shadow_opacity, photo),
        None => empty_layer(photo),
    }
}

pub(crate) fn empty_layer(photo: (u32, u32)) -> ShadowLayer {
    ShadowLayer {
        photo_size: photo,
        rect: Rect {
            x: 0,
            y: 0,
            width: 0,
            height: 0,
        },
        darkening: GrayImage::new(0, 0),
    }
}

fn alpha_at(sprite: &Sprite, x: i64, y: i64) -> f32 {
    let (lx, ly) = (x - sprite.x, y - sprite.y);
    let (w, h) = sprite.rgba.dimensions();
    if lx < 0 || ly < 0 || lx >= w as i64 || ly >= h as i64 {
        return 0.0;
    }
    sprite.rgba.get_pixel(lx as u32, ly as u32).0[3] as f32 / 255.0
}

fn contact_shadow(sprite: &Sprite, vis: &Bounds, photo: (u32, u32)) -> Option<Field> {
    let rows = ((FOOTPRINT_ROWS * vis.height() as f64).round() as i64).max(1);
    // How much of each column touches the ground: its most opaque footprint pixel.
    let touch: Vec<f32> = (vis.x0..vis.x1)
        .map(|x| {
            (vis.y1 - rows..vis.y1)
                .map(|y| alpha_at(sprite, x, y))
                .fold(0.0, f32::max)
        })
        .collect();
    let first = touch.iter().position(|&t| t > 0.05)? as i64;
    let last = touch.iter().rposition(|&t| t > 0.05)? as i64;
    let (fx0, fx1) = (vis.x0 + first, vis.x0 + last + 1);
    let width = (fx1 - fx0) as f64;
    let (cx, half_w) = ((fx0 + fx1) as f64 / 2.0, width / 2.0);
    let half_h = (CONTACT_FLATTEN * width).max(1.0);
    let sigma = (CONTACT_BLUR * vis.width() as f64).max(1.0);
    let ground = vis.y1 as f64;
    let extent = Bounds {
        x0: fx0,
        y0: (ground - half_h).floor() as i64,
        x1: fx1,
        y1: (ground + half_h).ceil() as i64 + 1,
    };
    let mut field = Field::new(&extent, sigma, photo)?;
    for x in fx0..fx1 {
        let t = touch[(x - vis.x0) as usize];
        let u = (x as f64 + 0.5 - cx) / half_w;
        let h = half_h * (1.0 - u * u).max(0.0).sqrt();
        for y in extent.y0..extent.y1 {
            if (y as f64 + 0.5 - ground).abs() <= h {
                field.splat(x, y, t);
            }
        }
    }
    Some(field.blurred())
}

fn drop_shadow(
    sprite: &Sprite,
    vis: &Bounds,
    angle_deg: f64,
    length: f64,
    photo: (u32, u32),
) -> Option<Field> {
    let distance = length * vis.height() as f64;
    let (sin, cos) = angle_deg.to_radians().sin_cos();
    let (dx, dy) = (
        (distance * cos).round() as i64,
        (distance * sin).round() as i64,
    );
    let sigma = (DROP_BLUR * distance).max(1.0);
    let mut field = Field::new(&vis.offset(dx, dy), sigma, photo)?;
    for (x, y, p) in sprite.rgba.enumerate_pixels() {
        if p.0[3] > 0 {
            let (sx, sy) = (sprite.x + x as i64 + dx, sprite.y + y as i64 + dy);
            field.splat(sx, sy, p.0[3] as f32 / 255.0);
        }
    }
    Some(field.blurred())
}

/// A coarse grid of cells `cell` pixels wide whose top-left corner is at (`x0`, `y0`).
struct Field {
    x0: i64,
    y0: i64,
    cell: i64,
    w: usize,
    h: usize,
    radius: usize,
    v: Vec<f32>,
}

impl Field {
    /// A grid for a shape within `extent` (photo pixels) blurred by `sigma` pixels, covering
    /// the blur's reach but no more of the outside of the photo than can reach into it.
    fn new(extent: &Bounds, sigma: f64, (pw, ph): (u32, u32)) -> Option<Field> {
        let cell = ((sigma / 3.0).floor() as i64).max(1);
        let radius = blur::radius_for_sigma((sigma / cell as f64) as f32);
        // Reach of the blur plus the bilinear read-back, in pixels.
        let reach = (blur::PASSES * radius + 2) as i64 * cell;
        let shape = extent.intersect(&Bounds::of_size(pw, ph).pad(reach))?;
        let grid = shape.pad(reach);
        let x0 = grid.x0.div_euclid(cell) * cell;
        let y0 = grid.y0.div_euclid(cell) * cell;
        let w = ((grid.x1 - x0 + cell - 1) / cell) as usize;
        let h = ((grid.y1 - y0 + cell - 1) / cell) as usize;
        Some(Field {
            x0,
            y0,
            cell,
            w,
            h,
            radius,
            v: vec![0.0; w * h],
        })
    }

    /// Adds a pixel's value, averaged into its cell.
    fn splat(&mut self, x: i64, y: i64, value: f32) {
        let (i, j) = (
            (x - self.x0).div_euclid(self.cell),
            (y - self.y0).div_euclid(self.cell),
        );
        if i >= 0 && j >= 0 && (i as usize) < self.w && (j as usize) < self.h {
            self.v[j as usize * self.w + i as usize] += value / (self.cell * self.cell) as f32;
        }
    }

    fn blurred(mut self) -> Field {
        blur::blur_f32(&mut self.v, self.w, self.h, self.radius);
        self
    }

    fn cell_value(&self, i: i64, j: i64) -> f32 {
        if i < 0 || j < 0 || i as usize >= self.w || j as usize >= self.h {
            return 0.0;
        }
        self.v[j as usize * self.w + i as usize]
    }

    /// The field at the centre of pixel (`x`, `y`), bilinear between cell centres.
    fn sample(&self, x: i64, y: i64) -> f32 {
        let k = self.cell as f32;
        let fx = ((x - self.x0) as f32 + 0.5) / k - 0.5;
        let fy = ((y - self.y0) as f32 + 0.5) / k - 0.5;
        let (i, j) = (fx.floor(), fy.floor());
        let (tx, ty) = (fx - i, fy - j);
        let (i, j) = (i as i64, j as i64);
        let top = self.cell_value(i, j) * (1.0 - tx) + self.cell_value(i + 1, j) * tx;
        let bottom = self.cell_value(i, j + 1) * (1.0 - tx) + self.cell_value(i + 1, j + 1) * tx;
        top * (1.0 - ty) + bottom * ty
    }

    /// The darkening `opacity * field`, capped, as 8 bits over the pixels it touches.
    fn to_layer(&self, opacity: f32, (pw, ph): (u32, u32)) -> ShadowLayer {
        let grid = Bounds {
            x0: self.x0,
            y0: self.y0,
            x1: self.x0 + self.w as i64 * self.cell,
            y1: self.y0 + self.h as i64 * self.cell,
        };
        let Some(area) = grid.intersect(&Bounds::of_size(pw, ph)) else {
            return empty_layer((pw, ph));
        };
        let (aw, ah) = (area.width() as u32, area.height() as u32);
        let mut d = GrayImage::new(aw, ah);
        let mut used: Option<Bounds> = None;
        for (x, y, px) in d.enumerate_pixels_mut() {
            let v =
                (opacity * self.sample(area.x0 + x as i64, area.y0 + y as i64)).min(MAX_DARKENING);
            let q = (v * 255.0 + 0.5) as u8;
            if q > 0 {
                let (x, y) = (x as i64, y as i64);
                let b = used.get_or_insert(Bounds {
                    x0: x,
                    y0: y,
                    x1: x + 1,
                    y1: y + 1,
                });
                *b = Bounds {
                    x0: b.x0.min(x),
                    y0: b.y0.min(y),
                    x1: b.x1.max(x + 1),
                    y1: b.y1.max(y + 1),
                };
            }
            px.0[0] = q;
        }
        let Some(used) = used else {
            return empty_layer((pw, ph));
        };
        let rect = used.offset(area.x0, area.y0).to_rect();
        let darkening =
            image::imageops::crop_imm(&d, used.x0 as u32, used.y0 as u32, rect.width, rect.height)
                .to_image();
        ShadowLayer {
            photo_size: (pw, ph),
            rect,
            darkening,
        }
    }
}
