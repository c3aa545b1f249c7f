//! Photos as users have them: JPEG, PNG (8/16-bit, grey or colour, with or without alpha) and
//! WebP, with the EXIF orientation applied, refused before any pixel buffer is allocated when
//! they are absurdly large, and with one warning when an embedded colour profile is not sRGB
//! (the pixels are used as sRGB regardless: converting them needs a colour-management library).

use anyhow::{Context, Result, bail};
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use std::path::Path;

/// Most pixels in one photo: 120 MP covers 108 MP phone sensors. `tkg place` keeps about
/// 16 bytes a pixel alive (the photo, the scene, the layers), so this is about 2 GiB.
pub const MAX_PHOTO_PIXELS: u64 = 120_000_000;
/// Longest photo side, in pixels.
pub const MAX_PHOTO_SIDE: u32 = 32_768;

/// A decoded photo, upright, as 8-bit sRGB.
#[derive(Debug, Clone)]
pub struct Photo {
    pub rgb: RgbImage,
    /// The alpha channel, when the file had one (`Some` exactly then, even if fully opaque).
    pub alpha: Option<GrayImage>,
    pub format: ImageFormat,
    /// Things the user should hear about (not printed here): a non-sRGB colour profile.
    pub warnings: Vec<String>,
}

impl Photo {
    pub fn width(&self) -> u32 {
        self.rgb.width()
    }

    pub fn height(&self) -> u32 {
        self.rgb.height()
    }

    /// Whether the file had an alpha channel.
    pub fn had_alpha(&self) -> bool {
        self.alpha.is_some()
    }
}

/// Loads a JPEG, PNG or WebP photo: orientation applied, profile checked, size bounded.
pub fn load_photo(path: &Path) -> Result<Photo> {
    let decoded = decode_bounded(path, "photo", MAX_PHOTO_PIXELS)?;
    let mut warnings = Vec::new();
    if let Some(icc) = &decoded.icc
        && let Some(w) = profile_warning(path, icc)
    {
        warnings.push(w);
    }
    let img = decoded.image;
    let alpha = img.color().has_alpha().then(|| alpha_plane(&img));
    Ok(Photo {
        rgb: img.to_rgb8(),
        alpha,
        format: decoded.format,
        warnings,
    })
}

/// Loads a mask from any of the photo formats as 8-bit grey (255 = selected). An image with an
/// alpha channel that is not fully opaque is an alpha mask (a cut-out, or strokes painted on
/// transparency), whatever its colour; any other image is read by its luma.
pub fn load_mask(path: &Path) -> Result<GrayImage> {
    let img = decode_bounded(path, "mask", MAX_PHOTO_PIXELS)?.image;
    if img.color().has_alpha() {
        let a = alpha_plane(&img);
        if a.as_raw().iter().any(|&v| v != 255) {
            return Ok(a);
        }
    }
    Ok(img.to_luma8())
}

/// Whether a mask of `mask` size (width, height) has the aspect of an image of `image` size:
/// within one pixel of it at the mask's size (cross-multiplied, so no rounding).
pub fn same_aspect(mask: (u32, u32), image: (u32, u32)) -> bool {
    let ((mw, mh), (iw, ih)) = (mask, image);
    (mw as f64 * ih as f64 - mh as f64 * iw as f64).abs() / ih.max(1) as f64 <= 1.0
}

/// Loads any image in the photo formats as decoded (bit depth and alpha kept), upright and
/// size-bounded. `what` names its role in messages ("image", "composite background").
pub fn load_image(path: &Path, what: &str) -> Result<DynamicImage> {
    Ok(decode_bounded(path, what, MAX_PHOTO_PIXELS)?.image)
}

/// The size of an image from its header, after the format and size checks that decoding
/// makes, without decoding it. `what` names its role in messages.
pub fn probe(path: &Path, what: &str) -> Result<(u32, u32)> {
    let name = path.display();
    let reader = open(path, what)?;
    let (w, h) = reader
        .into_dimensions()
        .with_context(|| format!("cannot read {what} {name}"))?;
    check_size(w, h, MAX_PHOTO_PIXELS).map_err(|e| anyhow::anyhow!("{what} {name} is {e}"))?;
    Ok((w, h))
}

/// Opens `path` as one of the photo formats, by its content.
fn open(path: &Path, what: &str) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    let name = path.display();
    let reader = ImageReader::open(path)
        .with_context(|| format!("cannot read {what} {name}"))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {what} {name}"))?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => Ok(reader),
        Some(f) => bail!("{what} {name} is {f:?}; give a JPEG, PNG or WebP file"),
        None => bail!("{what} {name} is not a JPEG, PNG or WebP file"),
    }
}

struct Decoded {
    image: DynamicImage,
    icc: Option<Vec<u8>>,
    format: ImageFormat,
}

/// Decodes `path` after checking its header size against `max_pixels`, then applies its EXIF
/// orientation. `what` names the role of the file in messages ("photo", "mask").
fn decode_bounded(path: &Path, what: &str, max_pixels: u64) -> Result<Decoded> {
    let name = path.display();
    let mut reader = open(path, what)?;
    let format = reader
        .format()
        .context("internal error: the format was checked")?;
    // 16-bit RGBA is 8 bytes a pixel; the rest is decoder working memory. No size limits yet, so
    // that an oversized header reaches the one-line message below rather than a generic error.
    let budget = max_pixels * 8 + (256 << 20);
    let mut limits = Limits::default();
    limits.max_alloc = Some(budget);
    reader.limits(limits.clone());
    let mut decoder = reader
        .into_decoder()
        .with_context(|| format!("cannot decode {what} {name}"))?;
    let (w, h) = decoder.dimensions();
    check_size(w, h, max_pixels).map_err(|e| anyhow::anyhow!("{what} {name} is {e}"))?;
    limits.max_image_width = Some(MAX_PHOTO_SIDE);
    limits.max_image_height = Some(MAX_PHOTO_SIDE);
    decoder
        .set_limits(limits)
        .with_context(|| format!("cannot decode {what} {name}"))?;
    if decoder.total_bytes() > budget {
        bail!("{what} {name} is {w}x{h} and too large to decode in memory");
    }
    // Metadata that cannot be read is not worth refusing the photo for.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let icc = decoder.icc_profile().ok().flatten();
    let mut image = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("cannot decode {what} {name}"))?;
    image.apply_orientation(orientation);
    Ok(Decoded { image, icc, format })
}

/// `Ok` when a `w` x `h` image is within bounds; else the size and the bound, for a message.
fn check_size(w: u32, h: u32, max_pixels: u64) -> std::result::Result<(), String> {
    let pixels = w as u64 * h as u64;
    if w == 0 || h == 0 {
        return Err(format!("empty ({w}x{h})"));
    }
    if w > MAX_PHOTO_SIDE || h > MAX_PHOTO_SIDE || pixels > max_pixels {
        return Err(format!(
            "{w}x{h} ({:.1} MP), larger than {} MP or {MAX_PHOTO_SIDE} pixels a side; scale it down first",
            pixels as f64 / 1e6,
            max_pixels / 1_000_000
        ));
    }
    Ok(())
}

/// The alpha channel as 8-bit grey (16-bit alpha rounded).
fn alpha_plane(img: &DynamicImage) -> GrayImage {
    let la = img.to_luma_alpha8();
    let (w, h) = la.dimensions();
    let a: Vec<u8> = la.as_raw().chunks_exact(2).map(|p| p[1]).collect();
    GrayImage::from_raw(w, h, a).expect("one alpha byte per pixel")
}

/// A warning when the embedded ICC profile is not sRGB, or `None` when it is.
///
/// Cheap on purpose: a profile counts as sRGB when its description tag (`desc`, ICC v2 text or
/// v4 `mluc`) mentions "sRGB", which is what the sRGB profiles of cameras, phones, browsers and
/// editors call themselves. Telling an sRGB-equivalent profile under another name apart would
/// mean comparing primaries and curves, i.e. a colour-management library.
fn profile_warning(path: &Path, icc: &[u8]) -> Option<String> {
    let name = path.display();
    match icc_description(icc) {
        Some(d) if d.to_ascii_lowercase().contains("srgb") => None,
        Some(d) => Some(format!(
            "{name} has an embedded colour profile {d:?} that is not sRGB; its pixels are used as sRGB without conversion, so colours may shift"
        )),
        None => Some(format!(
            "{name} has an embedded colour profile that could not be identified; its pixels are used as sRGB without conversion"
        )),
    }
}

/// The description of an ICC profile, from its `desc` tag, or `None` if there is none readable.
fn icc_description(icc: &[u8]) -> Option<String> {
    let be32 = |at: usize| -> Option<usize> {
        let b = icc.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = be32(128)?.min(1024);
    let (offset, size) = (0..count).find_map(|i| {
        let at = 132 + 12 * i;
        if icc.get(at..at + 4)? != b"desc" {
            return None;
        }
        Some((be32(at + 4)?, be32(at + 8)?))
    })?;
    let tag = icc.get(offset..offset.checked_add(size)?)?;
    let tag_be32 = |at: usize| -> Option<usize> {
        let b = tag.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let text = match tag.get(0..4)? {
        b"desc" => {
            let n = tag_be32(8)?;
            let ascii = tag.get(12..12usize.checked_add(n)?)?;
            String::from_utf8_lossy(ascii)
                .trim_end_matches('\0')
                .to_string()
        }
        b"mluc" => {
            // The first localised record: language(2) country(2) length(4) offset(4).
            let (len, off) = (tag_be32(20)?, tag_be32(24)?);
            let units: Vec<u16> = tag
                .get(off..off.checked_add(len)?)?
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
                .trim_end_matches('\0')
                .to_string()
        }
        _ => return None,
    };
    (!text.trim().is_empty()).then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::{jpeg::JpegEncoder, png::PngEncoder, webp::WebPEncoder};
    use image::{ExtendedColorType, ImageEncoder};
    use std::path::PathBuf;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tkg-photo-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    /// Encodes with `enc`, after giving it an EXIF chunk and an ICC profile when asked.
    fn write(
        mut enc: impl ImageEncoder,
        (w, h): (u32, u32),
        color: ExtendedColorType,
        data: &[u8],
        exif: Option<Vec<u8>>,
        icc: Option<Vec<u8>>,
    ) {
        if let Some(e) = exif {
            enc.set_exif_metadata(e).unwrap();
        }
        if let Some(p) = icc {
            enc.set_icc_profile(p).unwrap();
        }
        enc.write_image(data, w, h, color).unwrap();
    }

    fn png(path: &Path, size: (u32, u32), color: ExtendedColorType, data: &[u8]) {
        let f = std::fs::File::create(path).unwrap();
        write(PngEncoder::new(f), size, color, data, None, None);
    }

    /// A big-endian EXIF chunk with one entry: Orientation = `value`.
    fn exif_orientation(value: u16) -> Vec<u8> {
        let mut e = b"MM\0\x2a\0\0\0\x08\0\x01".to_vec();
        e.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1]);
        e.extend_from_slice(&value.to_be_bytes());
        e.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        e
    }

    /// A minimal ICC profile whose only tag is a description; `v4` uses `mluc`, else v2 `desc`.
    fn icc_with_description(text: &str, v4: bool) -> Vec<u8> {
        let mut tag = Vec::new();
        if v4 {
            let units: Vec<u8> = text.encode_utf16().flat_map(|u| u.to_be_bytes()).collect();
            tag.extend_from_slice(b"mluc\0\0\0\0");
            tag.extend_from_slice(&1u32.to_be_bytes());
            tag.extend_from_slice(&12u32.to_be_bytes());
            tag.extend_from_slice(b"enUS");
            tag.extend_from_slice(&(units.len() as u32).to_be_bytes());
            tag.extend_from_slice(&28u32.to_be_bytes());
            tag.extend_from_slice(&units);
        } else {
            tag.extend_from_slice(b"desc\0\0\0\0");
            tag.extend_from_slice(&(text.len() as u32 + 1).to_be_bytes());
            tag.extend_from_slice(text.as_bytes());
            tag.push(0);
        }
        let mut icc = vec![0u8; 128];
        icc.extend_from_slice(&1u32.to_be_bytes());
        icc.extend_from_slice(b"desc");
        icc.extend_from_slice(&144u32.to_be_bytes());
        icc.extend_from_slice(&(tag.len() as u32).to_be_bytes());
        icc.extend_from_slice(&tag);
        let len = icc.len() as u32;
        icc[0..4].copy_from_slice(&len.to_be_bytes());
        icc
    }

    #[test]
    fn sixteen_bit_grey_with_alpha() {
        let p = tmp("la16.png");
        // Grey and alpha values that are exact multiples of 257 convert to 8 bits exactly.
        let px: [u16; 4] = [257 * 10, 257 * 255, 257 * 200, 0];
        let bytes: Vec<u8> = px.iter().flat_map(|v| v.to_be_bytes()).collect();
        png(&p, (2, 1), ExtendedColorType::La16, &bytes);
        let photo = load_photo(&p).unwrap();
        assert_eq!(photo.rgb.as_raw(), &[10, 10, 10, 200, 200, 200]);
        assert_eq!(photo.alpha.as_ref().unwrap().as_raw(), &[255, 0]);
        assert!(photo.had_alpha() && photo.warnings.is_empty());
    }

    #[test]
    fn rgb_without_alpha_and_webp_with_alpha() {
        let p = tmp("rgb.png");
        let data: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 13) as u8).collect();
        png(&p, (2, 3), ExtendedColorType::Rgb8, &data);
        let photo = load_photo(&p).unwrap();
        assert_eq!((photo.width(), photo.height()), (2, 3));
        assert_eq!(photo.rgb.as_raw(), &data);
        assert!(!photo.had_alpha());

        let w = tmp("rgba.webp");
        let rgba: Vec<u8> = (0..3 * 2 * 4).map(|i| (i * 11) as u8).collect();
        let f = std::fs::File::create(&w).unwrap();
        let enc = WebPEncoder::new_lossless(f);
        write(enc, (3, 2), ExtendedColorType::Rgba8, &rgba, None, None);
        let photo = load_photo(&w).unwrap();
        assert_eq!(photo.format, ImageFormat::WebP);
        let alpha: Vec<u8> = rgba.chunks_exact(4).map(|p| p[3]).collect();
        assert_eq!(photo.alpha.unwrap().as_raw(), &alpha);
    }

    #[test]
    fn exif_orientation_is_applied() {
        // 3x2, every pixel distinct; orientation 6 means "rotate 90 degrees clockwise".
        let (w, h) = (3u32, 2u32);
        let data: Vec<u8> = (0..w * h).flat_map(|i| [i as u8 * 20, 0, 0]).collect();
        let p = tmp("rot.png");
        let f = std::fs::File::create(&p).unwrap();
        let exif = Some(exif_orientation(6));
        write(
            PngEncoder::new(f),
            (w, h),
            ExtendedColorType::Rgb8,
            &data,
            exif,
            None,
        );
        let photo = load_photo(&p).unwrap();
        assert_eq!((photo.width(), photo.height()), (h, w));
        for y in 0..w {
            for x in 0..h {
                // Rotating clockwise takes old (y, h - 1 - x) to new (x, y).
                let old = (h - 1 - x) * w + y;
                assert_eq!(photo.rgb.get_pixel(x, y).0[0], old as u8 * 20, "at {x},{y}");
            }
        }
        // The same for a JPEG, by its size only (JPEG is lossy).
        let j = tmp("rot.jpg");
        let f = std::fs::File::create(&j).unwrap();
        let big: Vec<u8> = vec![128; 16 * 8 * 3];
        let enc = JpegEncoder::new_with_quality(f, 90);
        let exif = Some(exif_orientation(8));
        write(enc, (16, 8), ExtendedColorType::Rgb8, &big, exif, None);
        let photo = load_photo(&j).unwrap();
        assert_eq!(
            (photo.width(), photo.height(), photo.format),
            (8, 16, ImageFormat::Jpeg)
        );
    }

    #[test]
    fn colour_profiles() {
        assert_eq!(
            icc_description(&icc_with_description("Display P3", true)).as_deref(),
            Some("Display P3")
        );
        assert_eq!(
            icc_description(&icc_with_description("sRGB IEC61966-2.1", false)).as_deref(),
            Some("sRGB IEC61966-2.1")
        );
        assert_eq!(icc_description(b"short"), None);
        let mut truncated = icc_with_description("Adobe RGB (1998)", false);
        truncated.truncate(150);
        assert_eq!(icc_description(&truncated), None);

        let data = [1u8, 2, 3];
        for (desc, v4, warns) in [
            ("sRGB IEC61966-2.1", false, false),
            ("sRGB built-in", true, false),
            ("Display P3", true, true),
            ("Adobe RGB (1998)", false, true),
        ] {
            let p = tmp(&format!("icc-{}.png", desc.len()));
            let f = std::fs::File::create(&p).unwrap();
            let icc = Some(icc_with_description(desc, v4));
            write(
                PngEncoder::new(f),
                (1, 1),
                ExtendedColorType::Rgb8,
                &data,
                None,
                icc,
            );
            let photo = load_photo(&p).unwrap();
            assert_eq!(
                photo.warnings.len(),
                warns as usize,
                "{desc}: {:?}",
                photo.warnings
            );
            if warns {
                let w = &photo.warnings[0];
                assert!(
                    w.contains(desc) && w.contains("not sRGB") && !w.contains('\n'),
                    "{w}"
                );
            }
        }
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn absurd_sizes_are_refused_from_the_header() {
        // A PNG that claims 40000x30000 but has no pixel data: refused from its header, where
        // decoding would fail on the missing data (or allocate 3.6 GB first).
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&40_000u32.to_be_bytes());
        ihdr.extend_from_slice(&30_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut file = b"\x89PNG\r\n\x1a\n".to_vec();
        file.extend_from_slice(&13u32.to_be_bytes());
        file.extend_from_slice(&ihdr);
        file.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        for chunk in [&b"IDAT"[..], b"IEND"] {
            file.extend_from_slice(&0u32.to_be_bytes());
            file.extend_from_slice(chunk);
            file.extend_from_slice(&crc32(chunk).to_be_bytes());
        }
        let p = tmp("huge.png");
        std::fs::write(&p, &file).unwrap();
        let msg = format!("{:#}", load_photo(&p).unwrap_err());
        assert!(
            msg.contains("huge.png") && msg.contains("40000x30000"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");

        // The pixel bound itself, on a small image and a small bound.
        let s = tmp("small.png");
        png(&s, (4, 4), ExtendedColorType::L8, &[0; 16]);
        assert!(decode_bounded(&s, "photo", 16).is_ok());
        let e = decode_bounded(&s, "photo", 15).err().unwrap();
        assert!(format!("{e:#}").contains("4x4"), "{e:#}");
    }

    #[test]
    fn other_files_are_refused_in_one_line() {
        let p = tmp("notes.png");
        std::fs::write(&p, b"not an image at all").unwrap();
        let msg = format!("{:#}", load_photo(&p).unwrap_err());
        assert!(msg.contains("notes.png") && !msg.contains('\n'), "{msg}");
        let missing = format!("{:#}", load_photo(&tmp("missing.jpg")).unwrap_err());
        assert!(missing.contains("missing.jpg"), "{missing}");
    }

    #[test]
    fn masks_from_luma_or_alpha() {
        let grey = tmp("mask-grey.png");
        png(
            &grey,
            (3, 1),
            ExtendedColorType::Rgb8,
            &[0, 0, 0, 255, 255, 255, 90, 90, 90],
        );
        assert_eq!(load_mask(&grey).unwrap().as_raw(), &[0, 255, 90]);
        // White strokes on transparency: the alpha is the mask, not the (constant) colour.
        let strokes = tmp("mask-alpha.png");
        let rgba = [255, 255, 255, 0, 255, 255, 255, 255, 255, 255, 255, 40];
        png(&strokes, (3, 1), ExtendedColorType::Rgba8, &rgba);
        assert_eq!(load_mask(&strokes).unwrap().as_raw(), &[0, 255, 40]);
        // A fully opaque alpha carries nothing: the luma is used.
        let opaque = tmp("mask-opaque.png");
        png(
            &opaque,
            (2, 1),
            ExtendedColorType::La8,
            &[30, 255, 220, 255],
        );
        assert_eq!(load_mask(&opaque).unwrap().as_raw(), &[30, 220]);
    }

    #[test]
    fn images_to_key_are_upright_and_backgrounds_probed_without_decoding() {
        let j = tmp("key-rot.jpg");
        let f = std::fs::File::create(&j).unwrap();
        let enc = JpegEncoder::new_with_quality(f, 90);
        let exif = Some(exif_orientation(6));
        write(
            enc,
            (16, 8),
            ExtendedColorType::Rgb8,
            &[90; 16 * 8 * 3],
            exif,
            None,
        );
        let img = load_image(&j, "image").unwrap();
        assert_eq!((img.width(), img.height()), (8, 16));
        assert_eq!(probe(&j, "composite background").unwrap(), (16, 8));
        let t = tmp("not-an-image.txt");
        std::fs::write(&t, b"hello").unwrap();
        let e = probe(&t, "composite background").unwrap_err().to_string();
        assert!(
            e.starts_with("composite background ") && e.contains("not a JPEG"),
            "{e}"
        );
        // Named .png but not one: the header cannot be read.
        let t = tmp("not-an-image.png");
        std::fs::write(&t, b"hello").unwrap();
        let e = probe(&t, "composite background").unwrap_err().to_string();
        assert!(e.starts_with("cannot read composite background "), "{e}");
    }
}
