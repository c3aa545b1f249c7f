//! VAE tiling as diffusers' `AutoencoderKL.enable_tiling()` does it (`tiled_decode`,
//! `_tiled_encode`): the input is cut into overlapping square tiles, each tile runs through
//! the network on its own, and each output tile is blended linearly into the one above and
//! the one to its left over the overlap, then cropped, so the memory of the network's
//! activations is one tile's whatever the image size.
//!
//! Tiles are `sample_size` pixels (the config's, see [`VaeConfig::tile_sample_size`]) or
//! `sample_size / factor` latents, and overlap by a quarter. The same tiles, the same blend
//! weights and the same order of blending as diffusers give diffusers' image; only one row
//! of tiles is kept at a time (diffusers keeps them all).

use crate::models::config::VaeConfig;
use anyhow::{Result, bail, ensure};
use candle_core::{DType, Device, Tensor};

/// Whether the VAE decodes (and encodes) in tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeTiling {
    /// Tile only big images: at least [`AUTO_MIN_PIXELS`] pixels and larger than one tile
    /// in width or height. Smaller images run untiled, exactly as with `Off`.
    #[default]
    Auto,
    /// Tile whenever the image is larger than one tile (diffusers' `enable_tiling()`).
    On,
    /// Never tile: one pass over the whole image (the most memory).
    Off,
}

/// `Auto` tiles images of at least 1024x1024 pixels: below that an untiled decode fits in a
/// few GiB, and the tiled image differs slightly from the untiled one.
pub const AUTO_MIN_PIXELS: usize = 1024 * 1024;

/// diffusers' `tile_overlap_factor`.
const OVERLAP: f64 = 0.25;

impl VaeTiling {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "on" => Self::On,
            "off" => Self::Off,
            _ => bail!("unknown VAE tiling {s:?} (expected auto, on or off)"),
        })
    }

    /// Whether latents of `height` x `width` decode in tiles: diffusers' test (larger than a
    /// latent tile either way), and for `Auto` an image of at least [`AUTO_MIN_PIXELS`].
    pub fn tiles_decode(self, cfg: &VaeConfig, height: usize, width: usize) -> bool {
        let tile = cfg.tile_sample_size() / cfg.downscale_factor();
        let f = cfg.downscale_factor();
        self.decide(height > tile || width > tile, height * f * width * f)
    }

    /// Whether an image of `height` x `width` pixels encodes in tiles: diffusers' test
    /// (larger than a pixel tile either way), and for `Auto` at least [`AUTO_MIN_PIXELS`].
    pub fn tiles_encode(self, cfg: &VaeConfig, height: usize, width: usize) -> bool {
        let tile = cfg.tile_sample_size();
        self.decide(height > tile || width > tile, height * width)
    }

    fn decide(self, larger_than_tile: bool, pixels: usize) -> bool {
        match self {
            Self::Off => false,
            Self::On => larger_than_tile,
            Self::Auto => larger_than_tile && pixels >= AUTO_MIN_PIXELS,
        }
    }
}

/// How a tiled pass cuts its input and assembles its output, in diffusers' terms: input tiles
/// of `tile` starting every `stride`; output tiles blended over `blend` rows and columns,
/// then cropped to `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub tile: usize,
    pub stride: usize,
    pub blend: usize,
    pub limit: usize,
}

impl Grid {
    /// `tiled_decode`: latent tiles in, pixel tiles out.
    pub fn decode(cfg: &VaeConfig) -> Result<Self> {
        let (pixels, latents) = sizes(cfg)?;
        Self::new(latents, pixels)
    }

    /// `_tiled_encode`: pixel tiles in, latent tiles out.
    pub fn encode(cfg: &VaeConfig) -> Result<Self> {
        let (pixels, latents) = sizes(cfg)?;
        Self::new(pixels, latents)
    }

    fn new(tile_in: usize, tile_out: usize) -> Result<Self> {
        // diffusers' int(): truncation of a positive product.
        let stride = (tile_in as f64 * (1.0 - OVERLAP)) as usize;
        let blend = (tile_out as f64 * OVERLAP) as usize;
        ensure!(
            stride > 0,
            "VAE tiles of {tile_in} are too small to overlap"
        );
        Ok(Self {
            tile: tile_in,
            stride,
            blend,
            limit: tile_out - blend,
        })
    }
}

/// (pixel tile, latent tile) of `cfg`.
fn sizes(cfg: &VaeConfig) -> Result<(usize, usize)> {
    let pixels = cfg.tile_sample_size();
    let latents = pixels / cfg.downscale_factor();
    ensure!(
        latents >= 2,
        "vae config: sample_size {pixels} is too small to tile (at least {} pixels)",
        2 * cfg.downscale_factor()
    );
    Ok((pixels, latents))
}

/// One output tile on the host in f32: [b, c, h, w] row-major.
struct Block {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    data: Vec<f32>,
}

impl Block {
    fn from_tensor(t: &Tensor) -> Result<Self> {
        let (b, c, h, w) = t.dims4()?;
        let data = t
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        Ok(Self { b, c, h, w, data })
    }

    fn at(&self, plane: usize, y: usize, x: usize) -> usize {
        (plane * self.h + y) * self.w + x
    }
}

/// diffusers' weights of a blend step: `1 - i / extent` and `i / extent`, computed in f64 and
/// applied in f32, as torch multiplies an f32 tensor by a Python float.
fn weights(i: usize, extent: usize) -> (f32, f32) {
    let t = i as f64 / extent as f64;
    ((1.0 - t) as f32, t as f32)
}

/// diffusers' `blend_v`: the first rows of `b` fade in from the last rows of `a` (above it).
fn blend_v(a: &Block, b: &mut Block, extent: usize) {
    let e = extent.min(a.h).min(b.h);
    for y in 0..e {
        let (wa, wb) = weights(y, e);
        for p in 0..b.b * b.c {
            for x in 0..b.w {
                let i = b.at(p, y, x);
                b.data[i] = a.data[a.at(p, a.h - e + y, x)] * wa + b.data[i] * wb;
            }
        }
    }
}

/// diffusers' `blend_h`: the first columns of `b` fade in from the last columns of `a` (to
/// its left).
fn blend_h(a: &Block, b: &mut Block, extent: usize) {
    let e = extent.min(a.w).min(b.w);
    for p in 0..b.b * b.c {
        for y in 0..b.h {
            for x in 0..e {
                let (wa, wb) = weights(x, e);
                let i = b.at(p, y, x);
                b.data[i] = a.data[a.at(p, y, a.w - e + x)] * wa + b.data[i] * wb;
            }
        }
    }
}

/// Runs `f` on the tiles of `x` ([B, C, H, W]) and assembles its outputs as diffusers'
/// tiled passes do. The result is f32 on the CPU.
pub fn run_tiled(
    x: &Tensor,
    grid: Grid,
    mut f: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    ensure!(h > 0 && w > 0, "cannot tile an empty {h}x{w} input");
    let starts = |n: usize| (0..n).step_by(grid.stride).collect::<Vec<_>>();
    let cols = starts(w);
    let mut above: Vec<Block> = Vec::new();
    // Each row of tiles blended, cropped and side by side: (height, [b*c planes][rows][cols]).
    let mut strips: Vec<(usize, Vec<f32>)> = Vec::new();
    let (mut out_w, mut dims) = (None, (0, 0));
    for i in starts(h) {
        let mut row: Vec<Block> = Vec::with_capacity(cols.len());
        for (j, &jx) in cols.iter().enumerate() {
            let tile =
                x.narrow(2, i, grid.tile.min(h - i))?
                    .narrow(3, jx, grid.tile.min(w - jx))?;
            let mut b = Block::from_tensor(&f(&tile)?)?;
            // diffusers' order: the tile above (blended already), then the tile to the left
            // (blended with its own neighbours already).
            if let Some(a) = above.get(j) {
                ensure!(
                    a.w == b.w && a.b * a.c == b.b * b.c,
                    "internal error: VAE tiles of one column differ"
                );
                blend_v(a, &mut b, grid.blend);
            }
            if let Some(a) = row.last() {
                ensure!(
                    a.h == b.h && a.b * a.c == b.b * b.c,
                    "internal error: VAE tiles of one row differ"
                );
                blend_h(a, &mut b, grid.blend);
            }
            row.push(b);
        }
        let (first_b, first_c, first_h) = (row[0].b, row[0].c, row[0].h);
        let rh = first_h.min(grid.limit);
        let rw: usize = row.iter().map(|b| b.w.min(grid.limit)).sum();
        ensure!(
            *out_w.get_or_insert(rw) == rw && (strips.is_empty() || dims == (first_b, first_c)),
            "internal error: VAE tile rows differ in width"
        );
        dims = (first_b, first_c);
        let mut strip = Vec::with_capacity(first_b * first_c * rh * rw);
        for p in 0..first_b * first_c {
            for y in 0..rh {
                for b in &row {
                    let s = b.at(p, y, 0);
                    strip.extend_from_slice(&b.data[s..s + b.w.min(grid.limit)]);
                }
            }
        }
        strips.push((rh, strip));
        above = row;
    }
    let (b, c) = dims;
    let out_w = out_w.unwrap_or(0);
    let out_h: usize = strips.iter().map(|(rh, _)| rh).sum();
    let mut data = Vec::with_capacity(b * c * out_h * out_w);
    for p in 0..b * c {
        for (rh, strip) in &strips {
            let n = rh * out_w;
            data.extend_from_slice(&strip[p * n..(p + 1) * n]);
        }
    }
    Ok(Tensor::from_vec(data, (b, c, out_h, out_w), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::rand;

    fn cfg(levels: usize, sample_size: Option<usize>) -> VaeConfig {
        let mut v =
            serde_json::json!({ "block_out_channels": vec![32; levels], "norm_num_groups": 8 });
        if let Some(s) = sample_size {
            v["sample_size"] = s.into();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn parse_and_default() {
        assert_eq!(VaeTiling::parse("auto").unwrap(), VaeTiling::Auto);
        assert_eq!(VaeTiling::parse("on").unwrap(), VaeTiling::On);
        assert_eq!(VaeTiling::parse("off").unwrap(), VaeTiling::Off);
        assert_eq!(VaeTiling::default(), VaeTiling::Auto);
        let err = VaeTiling::parse("yes").unwrap_err().to_string();
        assert!(err.contains("expected auto, on or off"), "{err}");
    }

    /// diffusers' numbers for SD1.5's VAE (sample_size 512, factor 8).
    #[test]
    fn grids_are_diffusers() {
        let sd15 = cfg(4, Some(512));
        let d = Grid::decode(&sd15).unwrap();
        assert_eq!((d.tile, d.stride, d.blend, d.limit), (64, 48, 128, 384));
        let e = Grid::encode(&sd15).unwrap();
        assert_eq!((e.tile, e.stride, e.blend, e.limit), (512, 384, 16, 48));
        // A pair takes its first value; no sample_size is 512.
        let pair: VaeConfig = serde_json::from_value(serde_json::json!({
            "block_out_channels": [32, 32, 32, 32], "sample_size": [256, 256]
        }))
        .unwrap();
        assert_eq!(Grid::decode(&pair).unwrap().tile, 32);
        assert_eq!(Grid::decode(&cfg(4, None)).unwrap(), d);
        let err = Grid::decode(&cfg(4, Some(8))).unwrap_err().to_string();
        assert!(err.contains("too small to tile"), "{err}");
    }

    #[test]
    fn when_it_tiles() {
        let sd15 = cfg(4, Some(512));
        let sdxl = cfg(4, Some(1024));
        let dec = |t: VaeTiling, c: &VaeConfig, px: usize| t.tiles_decode(c, px / 8, px / 8);
        let enc = |t: VaeTiling, c: &VaeConfig, px: usize| t.tiles_encode(c, px, px);
        for (t, c, px, want) in [
            // One tile or less: never.
            (VaeTiling::On, &sd15, 512, false),
            (VaeTiling::On, &sd15, 768, true),
            (VaeTiling::Auto, &sd15, 768, false),
            (VaeTiling::Auto, &sd15, 1024, true),
            (VaeTiling::Off, &sd15, 2048, false),
            // SDXL's tile is the whole 1024x1024 image, as in diffusers.
            (VaeTiling::Auto, &sdxl, 1024, false),
            (VaeTiling::On, &sdxl, 1024, false),
            (VaeTiling::Auto, &sdxl, 2048, true),
        ] {
            assert_eq!(dec(t, c, px), want, "decode {t:?} {px}");
            assert_eq!(enc(t, c, px), want, "encode {t:?} {px}");
        }
        // Either side larger than a tile is enough, if the image is big enough for auto.
        assert!(VaeTiling::Auto.tiles_decode(&sd15, 65, 300));
        assert!(!VaeTiling::Auto.tiles_decode(&sd15, 65, 200));
        assert!(VaeTiling::On.tiles_decode(&sd15, 65, 8));
        assert!(!VaeTiling::On.tiles_decode(&sd15, 64, 64));
    }

    /// With an identity network the blends mix equal values, so the assembled output is the
    /// input: every output pixel is placed once, where it belongs.
    #[test]
    fn identity_tiles_reassemble_the_input() {
        let grid = Grid::new(8, 8).unwrap();
        assert_eq!((grid.stride, grid.blend, grid.limit), (6, 2, 6));
        let x = rand(&[2, 3, 20, 23], 5);
        let mut calls = 0;
        let y = run_tiled(&x, grid, |t| {
            calls += 1;
            Ok(t.clone())
        })
        .unwrap();
        assert_eq!(calls, 4 * 4);
        assert_eq!(y.dims(), x.dims());
        let d = crate::kernels::testing::max_abs(&(y - x).unwrap());
        assert!(d < 1e-6, "{d}");
    }

    /// The blend weights and order on a hand-worked case: two tiles side by side, the left
    /// one all 1, the right one all 0, blended over 2 columns.
    #[test]
    fn blend_is_linear_over_the_overlap() {
        let grid = Grid {
            tile: 4,
            stride: 2,
            blend: 2,
            limit: 2,
        };
        let x = Tensor::zeros((1, 1, 1, 4), DType::F32, &Device::Cpu).unwrap();
        let mut first = true;
        let y = run_tiled(&x, grid, |t| {
            let v = if std::mem::take(&mut first) {
                1f32
            } else {
                0f32
            };
            Ok(t.ones_like()?.affine(v as f64, 0.0)?)
        })
        .unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        // Left tile cropped to 2; the right tile's columns fade from the left's last ones
        // with weights 1 and 1/2.
        assert_eq!(v, vec![1.0, 1.0, 1.0, 0.5]);
    }
}
