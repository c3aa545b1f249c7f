//! `tkg place`: puts a keyed cut-out into a photo (see shared/design/insertion.md).
//!
//! [`place`] scales the cut-out ([`resample`]: premultiplied, linear light), anchors the bottom
//! centre of its alpha box at [`PlaceOptions::at`], optionally nudges its colours toward the
//! photo ([`colour_match`]), builds a contact or drop shadow ([`shadow`]) and composites both
//! over the photo in linear light ([`composite`]). It returns every layer separately.
//! [`harmonize`] plans the diffusion pass that covers the seam: which crop the model sees,
//! its mask, and how its output is blended back without touching anything else; and
//! [`restore_subject`] puts the product back exactly, last.
//!
//! Everything is single-threaded and deterministic. Work is proportional to the subject's and
//! the shadow's boxes, not to the photo, apart from the copies of the photo into the scene.

pub mod blur;
pub mod colour;
pub mod colour_match;
pub mod composite;
pub mod harmonize;
#[cfg(test)]
mod harmonize_tests;
pub mod resample;
pub mod shadow;
#[cfg(test)]
mod tests;

use anyhow::{Result, bail, ensure};
use image::{DynamicImage, GrayImage, RgbImage, RgbaImage};

pub use colour_match::ColourShift;
pub use composite::restore_subject;
pub use harmonize::{
    HarmonizeOptions, HarmonizePlan, blend_back, crop_for_model, mask_for_model, plan_harmonize,
};

/// Where the anchor lands by default: horizontally centred, at 90% of the photo's height.
/// Objects stand on something, and the lower part of a photo is usually the floor or table;
/// the last 10% leaves room below the footprint for its contact shadow.
pub const DEFAULT_AT: (f64, f64) = (0.5, 0.9);
/// Default shadow strength (the darkening at the shadow's core).
pub const DEFAULT_SHADOW_OPACITY: f32 = 0.6;
/// Pixels of the cut-out at or below this alpha do not count toward its box (and so its
/// anchor): keyer residue under 3% is invisible and must not move the product.
pub const BOX_MIN_ALPHA: u8 = 8;

/// How big the subject is in the photo.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SubjectSize {
    /// The cut-out's own pixels, 1:1.
    Native,
    /// A factor on the cut-out's own size.
    Scale(f64),
    /// The height of the subject's alpha box in the photo, in pixels.
    Height(u32),
}

/// Which shadow the subject casts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ShadowKind {
    None,
    /// A soft, flattened blob under the footprint: the subject stands on the surface.
    Contact,
    /// The silhouette moved `length` subject heights toward `angle_deg` (0 = right, 90 = down,
    /// image axes), blurred in proportion to that distance.
    Drop {
        angle_deg: f64,
        length: f64,
    },
}

impl ShadowKind {
    /// The names `--shadow` and job lines take.
    pub const NAMES: [&'static str; 3] = ["contact", "drop", "none"];

    /// The name `--shadow` and job lines spell this kind with.
    pub fn name(&self) -> &'static str {
        match self {
            ShadowKind::None => "none",
            ShadowKind::Contact => "contact",
            ShadowKind::Drop { .. } => "drop",
        }
    }

    /// The kind called `name`; a drop shadow gets `(angle_deg, length)`.
    pub fn from_name(name: &str, (angle_deg, length): (f64, f64)) -> Result<Self> {
        Ok(match name {
            "none" => ShadowKind::None,
            "contact" => ShadowKind::Contact,
            "drop" => ShadowKind::Drop { angle_deg, length },
            other => bail!("{other} is not contact, drop or none"),
        })
    }
}

/// Settings of [`place`].
#[derive(Debug, Clone, PartialEq)]
pub struct PlaceOptions {
    /// Where the anchor (the bottom centre of the subject's alpha box) lands, in [0, 1] photo
    /// coordinates; `None` is [`DEFAULT_AT`].
    pub at: Option<(f64, f64)>,
    pub size: SubjectSize,
    pub shadow: ShadowKind,
    /// Darkening at the shadow's core, 0..=1 (capped at [`shadow::MAX_DARKENING`]).
    pub shadow_opacity: f32,
    /// Move the subject's colours toward the photo around it with this strength, 0..=1.
    pub match_colour: Option<f32>,
    /// Allow the subject to extend past the photo's edges (it is cut there).
    pub allow_crop: bool,
}

impl Default for PlaceOptions {
    fn default() -> Self {
        Self {
            at: None,
            size: SubjectSize::Native,
            shadow: ShadowKind::Contact,
            shadow_opacity: DEFAULT_SHADOW_OPACITY,
            match_colour: None,
            allow_crop: false,
        }
    }
}

/// A rectangle in photo pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub fn right(&self) -> u32 {
        self.x + self.width
    }

    pub fn bottom(&self) -> u32 {
        self.y + self.height
    }

    pub fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.x && x < self.right() && y >= self.y && y < self.bottom()
    }

    /// The smallest rectangle holding both.
    pub fn union(&self, other: &Rect) -> Rect {
        let (x, y) = (self.x.min(other.x), self.y.min(other.y));
        let (r, b) = (
            self.right().max(other.right()),
            self.bottom().max(other.bottom()),
        );
        Rect {
            x,
            y,
            width: r - x,
            height: b - y,
        }
    }
}

/// The subject as placed: straight-alpha RGBA8 pixels covering `rect` of the photo (the part
/// of the scaled, colour-matched cut-out that lies inside the photo).
#[derive(Debug, Clone)]
pub struct PlacedSubject {
    pub photo_size: (u32, u32),
    pub rect: Rect,
    pub rgba: RgbaImage,
}

impl PlacedSubject {
    /// The subject as a photo-sized straight-alpha layer (transparent elsewhere).
    pub fn to_layer(&self) -> RgbaImage {
        let (w, h) = self.photo_size;
        let mut layer = RgbaImage::new(w, h);
        for (y, row) in self.rgba.rows().enumerate() {
            for (x, px) in row.enumerate() {
                layer.put_pixel(self.rect.x + x as u32, self.rect.y + y as u32, *px);
            }
        }
        layer
    }

    /// The tight box of its pixels with alpha above zero, in photo pixels.
    pub fn alpha_box(&self) -> Option<Rect> {
        let b = Bounds::of_alpha(&self.rgba, 0)?;
        Some(b.offset(self.rect.x as i64, self.rect.y as i64).to_rect())
    }
}

/// The shadow as the darkening it applies: over `rect`, the background's linear light is
/// multiplied by `1 - d / 255`. Outside `rect`, `d` is 0.
#[derive(Debug, Clone)]
pub struct ShadowLayer {
    pub photo_size: (u32, u32),
    pub rect: Rect,
    pub darkening: GrayImage,
}

impl ShadowLayer {
    /// A photo-sized RGBA8 layer, black with alpha = darkening. Composited normally over the
    /// background in linear light (or multiplied in as `1 - alpha`) it reproduces the scene's
    /// shadow exactly; editors that blend in gamma space render it slightly darker.
    pub fn to_layer(&self) -> RgbaImage {
        let (w, h) = self.photo_size;
        let mut layer = RgbaImage::new(w, h);
        for (x, y, d) in self.darkening.enumerate_pixels() {
            layer.put_pixel(
                self.rect.x + x,
                self.rect.y + y,
                image::Rgba([0, 0, 0, d.0[0]]),
            );
        }
        layer
    }

    /// Whether the shadow darkens nothing.
    pub fn is_empty(&self) -> bool {
        self.rect.width == 0 || self.rect.height == 0
    }
}

/// Everything [`place`] made: the layers and the composite.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The photo as loaded.
    pub background: RgbImage,
    pub subject: PlacedSubject,
    pub shadow: ShadowLayer,
    /// Subject over shadowed background.
    pub scene: RgbImage,
    /// The scale applied to the cut-out.
    pub scale: f64,
    /// What colour matching did, when it ran and found a usable ring.
    pub colour_shift: Option<ColourShift>,
}

impl Placement {
    /// The harmonisation plan for this placement.
    pub fn harmonize_plan(&self, opts: &HarmonizeOptions) -> Result<HarmonizePlan> {
        plan_harmonize(&self.subject, &self.shadow, opts)
    }
}

/// Whether a decoded cut-out still needs keying: it has no alpha channel, or no pixel of it
/// is transparent at all.
pub fn cutout_needs_keying(img: &DynamicImage) -> bool {
    !img.color().has_alpha() || img.to_rgba8().pixels().all(|p| p.0[3] == 255)
}

/// Checks a straight-alpha cut-out and returns its alpha box (alpha above [`BOX_MIN_ALPHA`]).
pub fn check_cutout(cutout: &RgbaImage) -> Result<Rect> {
    ensure!(
        cutout.width() > 0 && cutout.height() > 0,
        "the cut-out is empty"
    );
    if cutout.pixels().all(|p| p.0[3] == 255) {
        bail!("the cut-out has no alpha; key it first or pass --key");
    }
    match Bounds::of_alpha(cutout, BOX_MIN_ALPHA) {
        Some(b) => Ok(b.to_rect()),
        None => bail!("the cut-out is fully transparent; nothing to place"),
    }
}

/// Places `cutout` (straight-alpha RGBA8, as the keyer writes it) into `photo`.
pub fn place(photo: RgbImage, cutout: &RgbaImage, opts: &PlaceOptions) -> Result<Placement> {
    let (pw, ph) = photo.dimensions();
    ensure!(pw > 0 && ph > 0, "the photo is empty");
    check_options(opts)?;
    let cut_box = check_cutout(cutout)?;
    let scale = match opts.size {
        SubjectSize::Native => 1.0,
        SubjectSize::Scale(s) => s,
        SubjectSize::Height(h) => h as f64 / cut_box.height as f64,
    };
    // Before any allocation: the scaled subject has to fit in the photo.
    let (sw, sh) = (cut_box.width as f64 * scale, cut_box.height as f64 * scale);
    if sw.round() > pw as f64 || sh.round() > ph as f64 {
        bail!(
            "the subject would be {:.0}x{:.0}, larger than the {pw}x{ph} photo; make it smaller with --scale or --height",
            sw,
            sh
        );
    }
    if sw < 1.0 || sh < 1.0 {
        bail!("the subject would be {sw:.2}x{sh:.2} pixels, too small to place");
    }
    let (mut scale, mut sprite) = (scale, resample::scale_subject(cutout, cut_box, scale)?);
    let vanished =
        || anyhow::anyhow!("the subject is too small to see; use a larger --scale or --height");
    let mut local = Bounds::of_alpha(&sprite.rgba, BOX_MIN_ALPHA).ok_or_else(vanished)?;
    if let SubjectSize::Height(h) = opts.size
        && local.height() != h as i64
    {
        // The filter softens the edge by about a pixel, which does not scale with the rest:
        // one correction brings the box to the asked height (measured = scale * box + growth).
        let corrected = scale * h as f64 / local.height() as f64;
        if (corrected / scale - 1.0).abs() < 0.25
            && (cut_box.height as f64 * corrected) <= ph as f64
        {
            scale = corrected;
            sprite = resample::scale_subject(cutout, cut_box, scale)?;
            local = Bounds::of_alpha(&sprite.rgba, BOX_MIN_ALPHA).ok_or_else(vanished)?;
        }
    }
    // Anchor: bottom centre of the alpha box, on whole pixels.
    let (ax, ay) = opts.at.unwrap_or(DEFAULT_AT);
    sprite.x = (ax * pw as f64 - (local.x0 + local.x1) as f64 / 2.0).round() as i64;
    sprite.y = (ay * ph as f64).round() as i64 - local.y1;
    let visible = local.offset(sprite.x, sprite.y);
    let photo_bounds = Bounds::of_size(pw, ph);
    if !opts.allow_crop
        && let Some(side) = visible.leaves(&photo_bounds)
    {
        bail!(
            "the subject would leave the photo at the {side} (its box is x {}..{}, y {}..{} in a {pw}x{ph} photo); move it with --at, shrink it, or pass --allow-crop",
            visible.x0,
            visible.x1,
            visible.y0,
            visible.y1
        );
    }
    if visible.intersect(&photo_bounds).is_none() {
        bail!("the subject lands entirely outside the photo; move it with --at");
    }
    let colour_shift = match opts.match_colour {
        Some(strength) if strength > 0.0 => {
            colour_match::match_to_surroundings(&mut sprite, &visible, &photo, strength)
        }
        _ => None,
    };
    let shadow = shadow::cast(&sprite, &visible, opts, (pw, ph));
    let subject = sprite.clip_to_photo(pw, ph)?;
    let mut scene = photo.clone();
    composite::composite_into(&mut scene, &subject, Some(&shadow))?;
    Ok(Placement {
        background: photo,
        subject,
        shadow,
        scene,
        scale,
        colour_shift,
    })
}

fn check_options(opts: &PlaceOptions) -> Result<()> {
    if let Some((x, y)) = opts.at {
        ensure!(
            (0.0..=1.0).contains(&x) && (0.0..=1.0).contains(&y),
            "--at {x},{y} is outside the photo; both coordinates are in [0, 1]"
        );
    }
    match opts.size {
        SubjectSize::Scale(s) if !(s.is_finite() && s > 0.0) => {
            bail!("--scale {s} is not a positive number")
        }
        SubjectSize::Height(0) => bail!("--height must be at least 1 pixel"),
        _ => {}
    }
    if let ShadowKind::Drop { angle_deg, length } = opts.shadow {
        ensure!(
            angle_deg.is_finite(),
            "the shadow angle {angle_deg} is not a number"
        );
        ensure!(
            (0.0..=shadow::MAX_DROP_LENGTH).contains(&length),
            "the shadow length {length} is outside 0..={} subject heights",
            shadow::MAX_DROP_LENGTH
        );
    }
    ensure!(
        (0.0..=1.0).contains(&opts.shadow_opacity),
        "the shadow opacity {} is outside 0..=1",
        opts.shadow_opacity
    );
    if let Some(s) = opts.match_colour {
        ensure!(
            (0.0..=1.0).contains(&s),
            "the colour-match strength {s} is outside 0..=1"
        );
    }
    Ok(())
}

/// A half-open pixel box in signed coordinates: it may lie partly outside an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub x0: i64,
    pub y0: i64,
    pub x1: i64,
    pub y1: i64,
}

impl Bounds {
    pub fn of_size(w: u32, h: u32) -> Self {
        Self {
            x0: 0,
            y0: 0,
            x1: w as i64,
            y1: h as i64,
        }
    }

    /// The tight box of the pixels with alpha above `min_alpha`.
    pub fn of_alpha(img: &RgbaImage, min_alpha: u8) -> Option<Self> {
        let w = img.width() as usize;
        let mut b: Option<Self> = None;
        for (y, row) in img.as_raw().chunks_exact(w * 4).enumerate() {
            let first = row.chunks_exact(4).position(|p| p[3] > min_alpha);
            let Some(first) = first else { continue };
            let last = row
                .chunks_exact(4)
                .rposition(|p| p[3] > min_alpha)
                .unwrap_or(first);
            let (y, x0, x1) = (y as i64, first as i64, last as i64 + 1);
            b = Some(match b {
                None => Self {
                    x0,
                    y0: y,
                    x1,
                    y1: y + 1,
                },
                Some(b) => Self {
                    x0: b.x0.min(x0),
                    y0: b.y0,
                    x1: b.x1.max(x1),
                    y1: y + 1,
                },
            });
        }
        b
    }

    pub fn width(&self) -> i64 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> i64 {
        self.y1 - self.y0
    }

    pub fn offset(&self, dx: i64, dy: i64) -> Self {
        Self {
            x0: self.x0 + dx,
            y0: self.y0 + dy,
            x1: self.x1 + dx,
            y1: self.y1 + dy,
        }
    }

    pub fn pad(&self, by: i64) -> Self {
        Self {
            x0: self.x0 - by,
            y0: self.y0 - by,
            x1: self.x1 + by,
            y1: self.y1 + by,
        }
    }

    pub fn intersect(&self, o: &Self) -> Option<Self> {
        let b = Self {
            x0: self.x0.max(o.x0),
            y0: self.y0.max(o.y0),
            x1: self.x1.min(o.x1),
            y1: self.y1.min(o.y1),
        };
        (b.x0 < b.x1 && b.y0 < b.y1).then_some(b)
    }

    /// Which side of `outer` this box crosses first, if any.
    pub fn leaves(&self, outer: &Self) -> Option<&'static str> {
        [
            (self.x0 < outer.x0, "left"),
            (self.y0 < outer.y0, "top"),
            (self.x1 > outer.x1, "right"),
            (self.y1 > outer.y1, "bottom"),
        ]
        .into_iter()
        .find_map(|(out, side)| out.then_some(side))
    }

    /// As a photo rectangle; only for boxes already inside a photo.
    pub fn to_rect(self) -> Rect {
        Rect {
            x: self.x0.max(0) as u32,
            y: self.y0.max(0) as u32,
            width: self.width().max(0) as u32,
            height: self.height().max(0) as u32,
        }
    }
}

/// Straight-alpha pixels whose top-left corner is at (`x`, `y`) in the photo, possibly outside.
#[derive(Debug, Clone)]
pub(crate) struct Sprite {
    pub x: i64,
    pub y: i64,
    pub rgba: RgbaImage,
}

impl Sprite {
    pub fn bounds(&self) -> Bounds {
        Bounds::of_size(self.rgba.width(), self.rgba.height()).offset(self.x, self.y)
    }

    /// The part inside a `pw` x `ph` photo.
    fn clip_to_photo(&self, pw: u32, ph: u32) -> Result<PlacedSubject> {
        let Some(inside) = self.bounds().intersect(&Bounds::of_size(pw, ph)) else {
            bail!("the subject lands entirely outside the photo; move it with --at");
        };
        let rect = inside.to_rect();
        let view = image::imageops::crop_imm(
            &self.rgba,
            (inside.x0 - self.x) as u32,
            (inside.y0 - self.y) as u32,
            rect.width,
            rect.height,
        );
        Ok(PlacedSubject {
            photo_size: (pw, ph),
            rect,
            rgba: view.to_image(),
        })
    }
}
