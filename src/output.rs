//! Writers: PNG files with text metadata, written to a temporary name and renamed, never
//! clobbering an existing file unless asked to.

use anyhow::{Context, Result, bail};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Pixels of one PNG image.
#[derive(Debug, Clone, Copy)]
pub enum Pixels<'a> {
    Rgb8(&'a [u8]),
    Rgba8(&'a [u8]),
    Gray8(&'a [u8]),
    Gray16(&'a [u16]),
}

impl Pixels<'_> {
    fn layout(&self) -> (png::ColorType, png::BitDepth, usize) {
        match self {
            Pixels::Rgb8(d) => (png::ColorType::Rgb, png::BitDepth::Eight, d.len() / 3),
            Pixels::Rgba8(d) => (png::ColorType::Rgba, png::BitDepth::Eight, d.len() / 4),
            Pixels::Gray8(d) => (png::ColorType::Grayscale, png::BitDepth::Eight, d.len()),
            Pixels::Gray16(d) => (png::ColorType::Grayscale, png::BitDepth::Sixteen, d.len()),
        }
    }
}

/// A PNG to write: size, pixels and (key, value) text chunks.
#[derive(Debug, Clone)]
pub struct PngImage<'a> {
    pub width: u32,
    pub height: u32,
    pub pixels: Pixels<'a>,
    pub text: &'a [(String, String)],
}

/// Fails early, before expensive work, if any output exists and `overwrite` is off, or if a
/// folder to write into is missing.
pub fn check_targets(paths: &[PathBuf], overwrite: bool) -> Result<()> {
    for p in paths {
        if !overwrite && p.exists() {
            bail!(
                "{} already exists; pass --overwrite to replace it",
                p.display()
            );
        }
        let dir = parent_dir(p);
        if !dir.is_dir() {
            bail!("output folder {} does not exist", dir.display());
        }
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Writes `path` through a temporary file in the same folder, then moves it into place.
/// Without `overwrite` an existing file is never replaced, even one that appeared meanwhile.
pub fn write_atomic(
    path: &Path,
    overwrite: bool,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    if !overwrite && path.exists() {
        bail!(
            "{} already exists; pass --overwrite to replace it",
            path.display()
        );
    }
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tkg-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let file =
            File::create(&tmp).with_context(|| format!("cannot write into {}", dir.display()))?;
        let mut buf = BufWriter::new(file);
        write(&mut buf)?;
        let file = buf.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        if overwrite {
            fs::rename(&tmp, path)?;
        } else {
            // A hard link fails if the target exists: no-clobber without a race.
            match fs::hard_link(&tmp, path) {
                Ok(()) => fs::remove_file(&tmp)?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                    "{} already exists; pass --overwrite to replace it",
                    path.display()
                ),
                Err(_) => {
                    if path.exists() {
                        bail!(
                            "{} already exists; pass --overwrite to replace it",
                            path.display()
                        );
                    }
                    fs::rename(&tmp, path)?;
                }
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Encodes a PNG into `out`. Text that Latin-1 can carry goes in tEXt chunks, anything else in
/// iTXt (UTF-8), as Pillow and A1111 do.
pub fn encode_png(img: &PngImage, out: &mut dyn Write) -> Result<()> {
    let (color, depth, n_pixels) = img.pixels.layout();
    if n_pixels != img.width as usize * img.height as usize {
        bail!(
            "internal error: {} pixels for a {}x{} image",
            n_pixels,
            img.width,
            img.height
        );
    }
    let mut enc = png::Encoder::new(out, img.width, img.height);
    enc.set_color(color);
    enc.set_depth(depth);
    enc.set_compression(png::Compression::Balanced);
    for (key, value) in img.text {
        if value.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk(key.clone(), value.clone())?;
        } else {
            enc.add_itxt_chunk(key.clone(), value.clone())?;
        }
    }
    let mut writer = enc.write_header()?;
    match img.pixels {
        Pixels::Rgb8(d) | Pixels::Rgba8(d) | Pixels::Gray8(d) => writer.write_image_data(d)?,
        Pixels::Gray16(d) => {
            let bytes: Vec<u8> = d.iter().flat_map(|v| v.to_be_bytes()).collect();
            writer.write_image_data(&bytes)?
        }
    }
    writer.finish()?;
    Ok(())
}

/// Writes one PNG atomically.
pub fn write_png(path: &Path, img: &PngImage, overwrite: bool) -> Result<()> {
    write_atomic(path, overwrite, |w| encode_png(img, w))
}

/// Reads every tEXt/iTXt chunk of a PNG as (key, value) pairs.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .with_context(|| format!("{} is not a readable PNG", path.display()))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        out.push((t.keyword.clone(), t.get_text().unwrap_or_default()));
    }
    Ok(out)
}

/// Sibling output path: `car.png` + `matte` → `car.matte.png`.
pub fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{stem}.{suffix}.png"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tkg-out-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn writes_text_and_refuses_to_clobber() {
        let d = tmpdir("clobber");
        let p = d.join("a.png");
        let text = vec![
            ("parameters".to_string(), "a car\nSteps: 2".to_string()),
            ("comment".to_string(), "東京".to_string()),
        ];
        let px = [10u8, 20, 30, 40, 50, 60];
        let img = PngImage {
            width: 2,
            height: 1,
            pixels: Pixels::Rgb8(&px),
            text: &text,
        };
        write_png(&p, &img, false).unwrap();
        let read = read_png_text(&p).unwrap();
        assert!(
            read.contains(&text[0]) && read.contains(&text[1]),
            "{read:?}"
        );
        let before = fs::read(&p).unwrap();
        let err = write_png(&p, &img, false).unwrap_err();
        assert!(format!("{err:#}").contains("--overwrite"));
        assert_eq!(before, fs::read(&p).unwrap());
        write_png(&p, &img, true).unwrap();
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn failed_encode_leaves_nothing() {
        let d = tmpdir("fail");
        let p = d.join("b.png");
        let px = [1u8, 2, 3];
        let img = PngImage {
            width: 2,
            height: 2,
            pixels: Pixels::Rgb8(&px),
            text: &[],
        };
        assert!(write_png(&p, &img, false).is_err());
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
    }

    #[test]
    fn sibling_names() {
        assert_eq!(
            sibling(Path::new("out/car.png"), "matte"),
            PathBuf::from("out/car.matte.png")
        );
    }
}
