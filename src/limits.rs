//! The bounds every input is held to before anything is allocated for it: image sizes, counts,
//! file sizes and model dimensions. One place, so that `--dry-run`, the job files and the
//! loaders refuse the same things with the same words.

use anyhow::{Context, Result, bail};
use std::io::Read;
use std::path::Path;

/// Longest image side, in pixels.
pub const MAX_SIDE: usize = 8192;
/// Most pixels in one image (4096 x 4096): the VAE decode alone then needs about 25 GiB.
pub const MAX_PIXELS: usize = 4096 * 4096;
/// Most denoising steps.
pub const MAX_STEPS: usize = 10_000;
/// Most images one job line or one run may ask for.
pub const MAX_IMAGES: usize = 1_000_000;
/// Most seeds one image may try (`best_of` plus `retries`).
pub const MAX_TRIES: usize = 32;
/// Most key colours `--color auto` compares.
pub const MAX_AUTO_COLORS: usize = 8;
/// Largest job or prompt file.
pub const MAX_JOB_FILE: u64 = 64 << 20;
/// Longest prompt, in characters (CLIP reads 77 tokens; A1111-style chunking a few hundred).
pub const MAX_PROMPT_CHARS: usize = 100_000;

/// Checks an image size against [`MAX_SIDE`] and [`MAX_PIXELS`].
pub fn check_image_size(width: usize, height: usize) -> Result<(), String> {
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(format!(
            "{width}x{height} is too large: at most {MAX_SIDE} pixels a side"
        ));
    }
    if width.saturating_mul(height) > MAX_PIXELS {
        return Err(format!(
            "{width}x{height} is too large: at most {MAX_PIXELS} pixels (4096x4096)"
        ));
    }
    Ok(())
}

/// A model dimension read from a config: `what` is `value`, at most `max`.
pub fn check_dim(what: &str, value: usize, max: usize) -> Result<()> {
    if value > max {
        bail!("{what} {value} is beyond any real model (at most {max})");
    }
    Ok(())
}

/// Reads a text file of at most `limit` bytes, without reading more than that from it (it may
/// be a pipe or /dev/zero).
pub fn read_text_bounded(path: &Path, limit: u64) -> Result<String> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > limit {
        bail!(
            "{} is larger than {} MiB; split it into several files",
            path.display(),
            limit >> 20
        );
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_dims() {
        assert!(check_image_size(1024, 1024).is_ok());
        assert!(check_image_size(MAX_SIDE, 8).is_ok());
        assert!(check_image_size(MAX_SIDE + 8, 8).is_err());
        assert!(
            check_image_size(8192, 4096)
                .unwrap_err()
                .contains("4096x4096")
        );
        assert!(check_image_size(usize::MAX, usize::MAX).is_err());
        assert!(check_dim("layers_per_block", 2, 64).is_ok());
        assert!(check_dim("layers_per_block", 1 << 40, 64).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn bounded_reads_stop_at_the_limit() {
        let e = read_text_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(format!("{e:#}").contains("larger than 1 MiB"), "{e:#}");
        let d = std::env::temp_dir().join(format!("tkg-limits-{}", std::process::id()));
        std::fs::write(&d, "a cat\n").unwrap();
        assert_eq!(read_text_bounded(&d, 6).unwrap(), "a cat\n");
        assert!(read_text_bounded(&d, 5).is_err());
        std::fs::write(&d, b"\xff\xfe").unwrap();
        assert!(format!("{:#}", read_text_bounded(&d, 5).unwrap_err()).contains("UTF-8"));
        let _ = std::fs::remove_file(&d);
    }
}
