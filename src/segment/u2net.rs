//! U²-Net (Qin et al. 2020), the salient-object segmenter rembg ships as `u2net`, `u2netp`
//! and `silueta`: nested U-blocks (RSU) in a U-shaped encoder–decoder, six side outputs fused
//! by a 1x1 convolution. Every convolution is followed by a batch norm and a ReLU; rembg's
//! ONNX files carry the norms folded into the convolutions, and so do these weights.
//!
//! The topology is fixed (stage depths 7, 6, 5, 4, 4F, 4F and back); every width comes from
//! the weights, so one loader serves all three files.

use crate::kernels::F32View;
use anyhow::{Context, Result, bail, ensure};
use candle_core::{D, Tensor};
use candle_nn::VarBuilder;

/// One residual U-block's shape: `depth` convolutions deep; a dilated ("F") block keeps the
/// resolution and dilates instead of pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RsuConfig {
    pub depth: usize,
    pub dilated: bool,
    pub in_ch: usize,
    pub mid_ch: usize,
    pub out_ch: usize,
}

/// The stages in forward order: six encoder stages, then five decoder stages.
pub const STAGES: [(&str, usize, bool); 11] = [
    ("stage1", 7, false),
    ("stage2", 6, false),
    ("stage3", 5, false),
    ("stage4", 4, false),
    ("stage5", 4, true),
    ("stage6", 4, true),
    ("stage5d", 4, true),
    ("stage4d", 4, false),
    ("stage3d", 5, false),
    ("stage2d", 6, false),
    ("stage1d", 7, false),
];

/// Side outputs, in forward order; `sideN` reads the decoder output at level N (side6 reads
/// stage6).
pub const SIDES: usize = 6;

/// A whole network's widths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct U2NetConfig {
    pub stages: Vec<RsuConfig>,
    /// Input channels (3) and the side outputs' channels (1).
    pub in_ch: usize,
    pub out_ch: usize,
}

/// One block's convolutions in forward order: `(name, dilation)`.
pub fn rsu_convs(depth: usize, dilated: bool) -> Vec<(String, usize)> {
    let mut v = vec![("rebnconvin".to_string(), 1)];
    for i in 1..=depth {
        let d = if dilated {
            1 << (i - 1)
        } else if i == depth {
            2
        } else {
            1
        };
        v.push((format!("rebnconv{i}"), d));
    }
    for i in (1..depth).rev() {
        let d = if dilated { 1 << (i - 1) } else { 1 };
        v.push((format!("rebnconv{i}d"), d));
    }
    v
}

/// Every convolution of the network in forward order: `(weight name prefix, dilation, kernel)`.
pub fn conv_names() -> Vec<(String, usize, usize)> {
    let mut v = Vec::new();
    for (stage, depth, dilated) in STAGES {
        for (conv, d) in rsu_convs(depth, dilated) {
            v.push((format!("{stage}.{conv}.conv_s1"), d, 3));
        }
    }
    for i in 1..=SIDES {
        v.push((format!("side{i}"), 1, 3));
    }
    v.push(("outconv".to_string(), 1, 1));
    v
}

impl U2NetConfig {
    /// Reads the widths from the weights' shapes (`shape(name)` gives a tensor's dims), and
    /// checks that they chain.
    pub fn from_shapes(shape: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<Self> {
        let dims = |name: &str| -> Result<Vec<usize>> {
            let d = shape(name).with_context(|| format!("U²-Net weight {name} is missing"))?;
            ensure!(
                d.len() == 4,
                "U²-Net weight {name} has shape {d:?}, not 4-D"
            );
            Ok(d)
        };
        let mut stages = Vec::new();
        for (stage, depth, dilated) in STAGES {
            let conv_in = dims(&format!("{stage}.rebnconvin.conv_s1.weight"))?;
            let conv1 = dims(&format!("{stage}.rebnconv1.conv_s1.weight"))?;
            stages.push(RsuConfig {
                depth,
                dilated,
                in_ch: conv_in[1],
                mid_ch: conv1[0],
                out_ch: conv_in[0],
            });
        }
        let side1 = dims("side1.weight")?;
        let cfg = Self {
            in_ch: stages[0].in_ch,
            out_ch: side1[0],
            stages,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// The widths must chain as the forward pass concatenates them.
    fn check(&self) -> Result<()> {
        let s = &self.stages;
        for i in 1..6 {
            ensure!(
                s[i].in_ch == s[i - 1].out_ch,
                "U²-Net {} takes {} channels but {} gives {}",
                STAGES[i].0,
                s[i].in_ch,
                STAGES[i - 1].0,
                s[i - 1].out_ch
            );
        }
        // Decoder stage k (5d..1d) reads the upsampled deeper output and encoder stage k.
        for (j, enc) in (6..11).zip((0..5).rev()) {
            let deeper = s[j - 1].out_ch;
            ensure!(
                s[j].in_ch == deeper + s[enc].out_ch,
                "U²-Net {} takes {} channels, not {} + {}",
                STAGES[j].0,
                s[j].in_ch,
                deeper,
                s[enc].out_ch
            );
        }
        ensure!(
            self.in_ch > 0 && self.out_ch > 0 && s.iter().all(|c| c.mid_ch > 0 && c.out_ch > 0),
            "U²-Net has a zero width"
        );
        Ok(())
    }

    /// Channels read by side output `i` (1-based): decoder level i, or stage6 for side6.
    pub fn side_in(&self, i: usize) -> usize {
        match i {
            6 => self.stages[5].out_ch,
            _ => self.stages[11 - i].out_ch,
        }
    }
}

/// Convolution (norm folded in) + ReLU.
#[derive(Debug)]
struct ConvRelu {
    conv: Conv,
}

#[derive(Debug)]
struct Conv {
    weight: Tensor,
    bias: Tensor,
    dilation: usize,
}

impl Conv {
    fn load(vb: VarBuilder, cin: usize, cout: usize, k: usize, dilation: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get((cout, cin, k, k), "weight")?,
            bias: vb.get(cout, "bias")?,
            dilation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.weight.dim(2)?;
        let pad = self.dilation * (k / 2);
        if self.dilation == 1 && crate::kernels::applies(x) {
            return crate::kernels::conv::conv2d(x, &self.weight, Some(&self.bias), None, 1, pad);
        }
        let _p = crate::kernels::profile::scope(|| format!("u2net candle conv d{}", self.dilation));
        let y = x.conv2d(&self.weight, pad, 1, self.dilation, 1)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?)
    }
}

impl ConvRelu {
    fn load(vb: VarBuilder, cin: usize, cout: usize, dilation: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv::load(vb.pp("conv_s1"), cin, cout, 3, dilation)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.conv;
        if c.dilation == 1 && crate::kernels::applies(x) {
            return crate::kernels::conv::conv2d_relu(x, &c.weight, Some(&c.bias), 1);
        }
        Ok(c.forward(x)?.relu()?)
    }
}

/// 2x2 max pooling, stride 2, rounding the output size up (PyTorch's `ceil_mode`: a window
/// over the odd edge takes the pixels it has). In parallel over planes on the CPU.
fn pool2(x: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let _p = crate::kernels::profile::scope(|| "u2net pool".to_string());
    let (b, c, h, w) = x.dims4()?;
    if !crate::kernels::applies(x) {
        // The pooled maps come out of ReLUs, so zeros pad like -inf.
        let mut x = x.clone();
        if h % 2 == 1 {
            x = x.pad_with_zeros(2, 0, 1)?;
        }
        if w % 2 == 1 {
            x = x.pad_with_zeros(3, 0, 1)?;
        }
        return Ok(x.max_pool2d(2)?);
    }
    let x = x.contiguous()?;
    let view = F32View::new(&x)?;
    let input = view.slice();
    let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
    let mut out = vec![0f32; b * c * oh * ow];
    out.par_chunks_mut(oh * ow)
        .zip(input.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for oy in 0..oh {
                let (r0, r1) = (2 * oy, (2 * oy + 1).min(h - 1));
                for ox in 0..ow {
                    let (c0, c1) = (2 * ox, (2 * ox + 1).min(w - 1));
                    dst[oy * ow + ox] = src[r0 * w + c0]
                        .max(src[r0 * w + c1])
                        .max(src[r1 * w + c0])
                        .max(src[r1 * w + c1]);
                }
            }
        });
    Ok(Tensor::from_vec(out, (b, c, oh, ow), x.device())?)
}

/// `a + b` (same shapes), in parallel on the CPU.
fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let _p = crate::kernels::profile::scope(|| "u2net add".to_string());
    if !crate::kernels::applies(a) || a.dims() != b.dims() {
        return Ok((a + b)?);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (va, vb) = (F32View::new(&a)?, F32View::new(&b)?);
    let mut out = vec![0f32; a.elem_count()];
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(
            va.slice()
                .par_chunks(CHUNK)
                .zip(vb.slice().par_chunks(CHUNK)),
        )
        .for_each(|(o, (p, q))| {
            for ((o, p), q) in o.iter_mut().zip(p).zip(q) {
                *o = p + q;
            }
        });
    Ok(Tensor::from_vec(out, a.dims(), a.device())?)
}

/// Bilinear resize to `like`'s size (PyTorch's `align_corners=False`, as rembg's files do).
fn upsample_like(x: &Tensor, like: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = like.dims4()?;
    let (_, _, xh, xw) = x.dims4()?;
    if (xh, xw) == (h, w) {
        return Ok(x.clone());
    }
    if (h, w) == (2 * xh, 2 * xw) && crate::kernels::applies(x) {
        return upsample2x(x);
    }
    Ok(x.upsample_bilinear2d(h, w, false)?)
}

/// Exactly 2x bilinear with half-pixel centres, in parallel over planes: each output pixel
/// is 3/4 of its nearest input and 1/4 of the next one out, per axis, clamped at the edges
/// (what PyTorch's `align_corners=False` gives at this ratio).
fn upsample2x(x: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let _p = crate::kernels::profile::scope(|| "u2net upsample".to_string());
    let (b, c, h, w) = x.dims4()?;
    let x = x.contiguous()?;
    let view = F32View::new(&x)?;
    let input = view.slice();
    let (oh, ow) = (2 * h, 2 * w);
    let mut out = vec![0f32; b * c * oh * ow];
    out.par_chunks_mut(oh * ow)
        .zip(input.par_chunks(h * w))
        .for_each(|(dst, src)| {
            let mut rows = vec![0f32; h * ow];
            for (r, row) in rows.chunks_exact_mut(ow).enumerate() {
                let s = &src[r * w..(r + 1) * w];
                for j in 0..w {
                    let (l, rr) = (s[j.saturating_sub(1)], s[(j + 1).min(w - 1)]);
                    row[2 * j] = if j == 0 { s[0] } else { 0.25 * l + 0.75 * s[j] };
                    row[2 * j + 1] = if j + 1 == w {
                        s[j]
                    } else {
                        0.75 * s[j] + 0.25 * rr
                    };
                }
            }
            for i in 0..h {
                let cur = &rows[i * ow..(i + 1) * ow];
                let up = &rows[i.saturating_sub(1) * ow..(i.saturating_sub(1) + 1) * ow];
                let down = &rows[(i + 1).min(h - 1) * ow..((i + 1).min(h - 1) + 1) * ow];
                let (even, odd) = dst[2 * i * ow..(2 * i + 2) * ow].split_at_mut(ow);
                for k in 0..ow {
                    even[k] = if i == 0 {
                        cur[k]
                    } else {
                        0.25 * up[k] + 0.75 * cur[k]
                    };
                    odd[k] = if i + 1 == h {
                        cur[k]
                    } else {
                        0.75 * cur[k] + 0.25 * down[k]
                    };
                }
            }
        });
    Ok(Tensor::from_vec(out, (b, c, oh, ow), x.device())?)
}

/// Concatenation along channels.
fn cat(xs: &[&Tensor]) -> Result<Tensor> {
    let _p = crate::kernels::profile::scope(|| "u2net cat".to_string());
    Ok(Tensor::cat(xs, 1)?)
}

/// A residual U-block.
#[derive(Debug)]
struct Rsu {
    conv_in: ConvRelu,
    encoder: Vec<ConvRelu>,
    decoder: Vec<ConvRelu>,
    dilated: bool,
}

impl Rsu {
    fn load(vb: VarBuilder, cfg: &RsuConfig) -> Result<Self> {
        let convs = rsu_convs(cfg.depth, cfg.dilated);
        let (m, o) = (cfg.mid_ch, cfg.out_ch);
        let conv_in = ConvRelu::load(vb.pp(&convs[0].0), cfg.in_ch, o, convs[0].1)?;
        let mut encoder = Vec::new();
        for (i, (name, d)) in convs[1..=cfg.depth].iter().enumerate() {
            let cin = if i == 0 { o } else { m };
            encoder.push(ConvRelu::load(vb.pp(name), cin, m, *d)?);
        }
        let mut decoder = Vec::new();
        for (name, d) in &convs[cfg.depth + 1..] {
            let cout = if name == "rebnconv1d" { o } else { m };
            decoder.push(ConvRelu::load(vb.pp(name), 2 * m, cout, *d)?);
        }
        Ok(Self {
            conv_in,
            encoder,
            decoder,
            dilated: cfg.dilated,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hxin = self.conv_in.forward(x)?;
        let depth = self.encoder.len();
        // Encoder outputs at levels 1..depth-1; the deepest conv reads the last of them
        // without pooling.
        let mut skips: Vec<Tensor> = Vec::with_capacity(depth);
        for conv in &self.encoder[..depth - 1] {
            let input = match skips.last() {
                None => hxin.clone(),
                Some(prev) if self.dilated => prev.clone(),
                Some(prev) => pool2(prev)?,
            };
            skips.push(conv.forward(&input)?);
        }
        let mut d = self.encoder[depth - 1].forward(&skips[depth - 2])?;
        for (conv, skip) in self.decoder.iter().zip(skips.iter().rev()) {
            let up = upsample_like(&d, skip)?;
            d = conv.forward(&cat(&[&up, skip])?)?;
        }
        add(&d, &hxin)
    }
}

/// The network: image in [B, 3, H, W] (normalised), saliency out [B, 1, H, W] in [0, 1].
#[derive(Debug)]
pub struct U2Net {
    stages: Vec<Rsu>,
    sides: Vec<Conv>,
    outconv: Conv,
    pub config: U2NetConfig,
}

impl U2Net {
    pub fn load(vb: VarBuilder, cfg: &U2NetConfig) -> Result<Self> {
        if cfg.stages.len() != STAGES.len() {
            bail!(
                "U²-Net has {} stages, not {}",
                cfg.stages.len(),
                STAGES.len()
            );
        }
        let mut stages = Vec::new();
        for ((name, _, _), s) in STAGES.iter().zip(&cfg.stages) {
            stages.push(Rsu::load(vb.pp(*name), s)?);
        }
        let mut sides = Vec::new();
        for i in 1..=SIDES {
            sides.push(Conv::load(
                vb.pp(format!("side{i}")),
                cfg.side_in(i),
                cfg.out_ch,
                3,
                1,
            )?);
        }
        let outconv = Conv::load(vb.pp("outconv"), SIDES * cfg.out_ch, cfg.out_ch, 1, 1)?;
        Ok(Self {
            stages,
            sides,
            outconv,
            config: cfg.clone(),
        })
    }

    /// The fused saliency map, after the sigmoid (rembg's first output).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut enc: Vec<Tensor> = Vec::with_capacity(6);
        for stage in &self.stages[..6] {
            let input = match enc.last() {
                None => x.clone(),
                Some(prev) => pool2(prev)?,
            };
            enc.push(stage.forward(&input)?);
        }
        // Decoder outputs, deepest first: hx5d, hx4d, hx3d, hx2d, hx1d.
        let mut dec: Vec<Tensor> = Vec::with_capacity(5);
        for (stage, skip) in self.stages[6..].iter().zip(enc[..5].iter().rev()) {
            let deeper = dec.last().unwrap_or(&enc[5]);
            let up = upsample_like(deeper, skip)?;
            let h = stage.forward(&cat(&[&up, skip])?)?;
            dec.push(h);
        }
        // Side i reads level i: hx1d .. hx5d, then hx6.
        let mut side_out = Vec::with_capacity(SIDES);
        for (i, side) in self.sides.iter().enumerate() {
            let input = if i == 5 { &enc[5] } else { &dec[4 - i] };
            let s = side.forward(input)?;
            let s = match side_out.first() {
                None => s,
                Some(first) => upsample_like(&s, first)?,
            };
            side_out.push(s);
        }
        let fused = self
            .outconv
            .forward(&cat(&side_out.iter().collect::<Vec<_>>())?)?;
        Ok(candle_nn::ops::sigmoid(&fused)?)
    }
}

/// Min-max normalises a saliency map to [0, 1] over the whole map, as rembg does before
/// quantising; a constant map becomes all zeros.
pub fn min_max(x: &Tensor) -> Result<Tensor> {
    let flat = x.flatten_all()?;
    let lo = flat.min(D::Minus1)?.to_scalar::<f32>()?;
    let hi = flat.max(D::Minus1)?.to_scalar::<f32>()?;
    ensure!(
        lo.is_finite() && hi.is_finite(),
        "the segmenter's output is not finite"
    );
    if hi <= lo {
        return Ok(x.zeros_like()?);
    }
    Ok(((x - lo as f64)? / (hi - lo) as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pooling_and_adding_are_candles() {
        for (h, w) in [(6, 8), (5, 7), (1, 1)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu)
                .unwrap()
                .relu()
                .unwrap();
            let padded = x
                .pad_with_zeros(2, 0, h % 2)
                .unwrap()
                .pad_with_zeros(3, 0, w % 2)
                .unwrap();
            let want = padded.max_pool2d(2).unwrap();
            let got = pool2(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap();
            assert_eq!(
                diff.max(0).unwrap().to_scalar::<f32>().unwrap(),
                0.0,
                "{h}x{w}"
            );
            let sum = add(&x, &x).unwrap();
            let want = (&x + &x).unwrap();
            let diff = (sum - want).unwrap().abs().unwrap().flatten_all().unwrap();
            assert_eq!(diff.max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn concatenation_is_candles() {
        let a = Tensor::randn(0f32, 1.0, (2, 3, 4, 5), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, (2, 1, 4, 5), &Device::Cpu).unwrap();
        let got = cat(&[&a, &b])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = Tensor::cat(&[&a, &b], 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn the_2x_upsample_is_candles_bilinear() {
        for (h, w) in [(5, 7), (1, 1), (2, 3)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).unwrap();
            let fast = upsample2x(&x).unwrap();
            let slow = x.upsample_bilinear2d(2 * h, 2 * w, false).unwrap();
            let d = (fast - slow).unwrap().abs().unwrap().flatten_all().unwrap();
            let max = d.max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(max <= 1e-6, "{h}x{w}: {max}");
        }
    }
}
