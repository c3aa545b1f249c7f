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

/// Whether anything (a file, a folder, a link, even a dangling one) is at `path`.
pub fn occupied(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// An output that exists and may not be replaced.
#[derive(Debug, thiserror::Error)]
#[error("{} already exists; pass --overwrite to replace it", .0.display())]
pub struct AlreadyExists(pub PathBuf);

fn already_exists(path: &Path) -> anyhow::Error {
    AlreadyExists(path.to_path_buf()).into()
}

/// Fails early, before expensive work, if any output exists and `overwrite` is off, if an
/// output names a folder, or if a folder to write into is missing.
pub fn check_targets(paths: &[PathBuf], overwrite: bool) -> Result<()> {
    for p in paths {
        check_target(p)?;
        if !overwrite && occupied(p) {
            return Err(already_exists(p));
        }
    }
    Ok(())
}

/// `path` can name an output file: it has a file name, is not a folder, and its folder is one.
pub fn check_target(path: &Path) -> Result<()> {
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with('/') {
        bail!("{} is a folder; give a file name", path.display());
    }
    if path.file_name().is_none() {
        bail!("{} is not a file path", path.display());
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        if dir.exists() {
            bail!("{} is not a folder", dir.display());
        }
        bail!("output folder {} does not exist", dir.display());
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
/// The temporary file has an unpredictable name and is created exclusively, so a link planted
/// in the folder is never followed. Without `overwrite` an existing file is never replaced,
/// even one that appeared meanwhile.
pub fn write_atomic(
    path: &Path,
    overwrite: bool,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    if !overwrite && occupied(path) {
        return Err(already_exists(path));
    }
    check_target(path)?;
    let dir = parent_dir(path);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let result = (|| -> Result<()> {
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tkg-tmp")
            .tempfile_in(dir)
            .map_err(|e| anyhow::anyhow!("cannot write into {}: {e}", dir.display()))?;
        let mut buf = BufWriter::new(tmp.as_file_mut());
        write(&mut buf)?;
        buf.flush()?;
        drop(buf);
        tmp.as_file().sync_all()?;
        let persisted = if overwrite {
            tmp.persist(path)
        } else {
            tmp.persist_noclobber(path)
        };
        // The temporary file is removed when a failed persist drops it.
        match persisted {
            Ok(_) => Ok(()),
            Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(already_exists(path))
            }
            Err(e) => Err(e.error.into()),
        }
    })();
    result.map_err(|e| {
        if e.is::<AlreadyExists>() {
            e
        } else {
            e.context(format!("writing {}", path.display()))
        }
    })
}

/// What a tEXt chunk may hold: printable Latin-1 and line feeds (PNG 11.3.4.3).
#[allow(non_snake_case)]
fn tEXt_char(c: char) -> bool {
    matches!(c as u32, 10 | 32..=126 | 161..=255)
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
        if value.chars().all(tEXt_char) {
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

/// The most text one compressed chunk may inflate to.
const MAX_TEXT_CHUNK: usize = 4 << 20;

/// Reads every tEXt, zTXt and iTXt chunk before the image data as (key, value) pairs.
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
    // Compressed chunks are inflated with a bound: a small chunk can hold gigabytes.
    let bad = |k: &str, e| anyhow::anyhow!("{}: text chunk {k:?}: {e}", path.display());
    for t in &info.compressed_latin1_text {
        let mut t = t.clone();
        t.decompress_text_with_limit(MAX_TEXT_CHUNK)
            .map_err(|e| bad(&t.keyword, e))?;
        out.push((
            t.keyword.clone(),
            t.get_text().map_err(|e| bad(&t.keyword, e))?,
        ));
    }
    for t in &info.utf8_text {
        let mut t = t.clone();
        t.decompress_text_with_limit(MAX_TEXT_CHUNK)
            .map_err(|e| bad(&t.keyword, e))?;
        out.push((
            t.keyword.clone(),
            t.get_text().map_err(|e| bad(&t.keyword, e))?,
        ));
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

    #[cfg(unix)]
    #[test]
    fn links_are_never_written_through() {
        let d = tmpdir("links");
        let victim = d.join("victim.txt");
        fs::write(&victim, b"precious").unwrap();
        let px = [1u8, 2, 3];
        let img = PngImage {
            width: 1,
            height: 1,
            pixels: Pixels::Rgb8(&px),
            text: &[],
        };
        // A link at the output name, even a dangling one, counts as a file there.
        let out = d.join("o.png");
        std::os::unix::fs::symlink(d.join("nowhere"), &out).unwrap();
        let err = write_png(&out, &img, false).unwrap_err();
        assert!(format!("{err:#}").contains("--overwrite"), "{err:#}");
        // Replacing it replaces the link itself, never what it points at.
        fs::remove_file(&out).unwrap();
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        write_png(&out, &img, true).unwrap();
        assert!(!fs::symlink_metadata(&out).unwrap().file_type().is_symlink());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        // The old predictable temporary name is just another file name now.
        let planted = d.join(format!(".p.png.tkg-tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write_png(&d.join("p.png"), &img, false).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }

    #[test]
    fn folders_are_not_file_names() {
        let d = tmpdir("folders");
        let msg = |p: &Path| format!("{:#}", check_target(p).unwrap_err());
        assert!(msg(&d).contains("is a folder"), "{}", msg(&d));
        assert!(msg(&d.join("sub/")).contains("is a folder"));
        let file = d.join("file");
        fs::write(&file, b"x").unwrap();
        assert!(msg(&file.join("o.png")).contains("is not a folder"));
        assert!(msg(&d.join("missing/o.png")).contains("does not exist"));
        check_target(&d.join("o.png")).unwrap();
    }

    #[test]
    fn control_characters_go_to_itxt_and_compressed_text_is_read() {
        let d = tmpdir("ctrl");
        let p = d.join("c.png");
        let text = vec![("parameters".to_string(), "a\x1b[2Jcar\tnow".to_string())];
        let px = [1u8, 2, 3];
        let img = PngImage {
            width: 1,
            height: 1,
            pixels: Pixels::Rgb8(&px),
            text: &text,
        };
        write_png(&p, &img, false).unwrap();
        assert_eq!(read_png_text(&p).unwrap(), text);
        let bytes = fs::read(&p).unwrap();
        assert!(!bytes.windows(4).any(|w| w == b"tEXt"));

        // zTXt and compressed iTXt, as other tools write them.
        let z = d.join("z.png");
        let mut enc = png::Encoder::new(std::io::BufWriter::new(File::create(&z).unwrap()), 1, 1);
        enc.set_color(png::ColorType::Rgb);
        enc.add_ztxt_chunk("parameters".into(), "zipped prompt".into())
            .unwrap();
        let mut w = enc.write_header().unwrap();
        let mut itxt = png::text_metadata::ITXtChunk::new("comment", "x".repeat(5000));
        itxt.compressed = true;
        w.write_text_chunk(&itxt).unwrap();
        w.write_image_data(&px).unwrap();
        w.finish().unwrap();
        let read = read_png_text(&z).unwrap();
        assert!(
            read.contains(&("parameters".into(), "zipped prompt".into())),
            "{read:?}"
        );
        assert!(read.contains(&("comment".into(), "x".repeat(5000))));
    }

    #[test]
    fn sibling_names() {
        assert_eq!(
            sibling(Path::new("out/car.png"), "matte"),
            PathBuf::from("out/car.matte.png")
        );
    }
}
