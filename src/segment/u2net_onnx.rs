//! U²-Net weights in rembg's ONNX layout, read and written.
//!
//! PyTorch's export names only the side and fuse convolutions (`side1.weight`, `outconv.bias`);
//! the 112 block convolutions, with their batch norms folded in, get numbered initializers
//! ("1967"). The graph lists nodes in forward order, so the k-th `Conv` node is the k-th
//! convolution of [`u2net::conv_names`]; its dilation, padding and kernel are checked against
//! that, and a named initializer must carry the expected name, so a file of another
//! architecture is refused with what does not match.

use super::u2net::{self, U2NetConfig};
use crate::onnx::ValueInfo;
use crate::onnx::{AttrValue, Attribute, Graph, Model, Node, Tensor as OnnxTensor, TensorData};
use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// What the loader takes from a file: weights by PyTorch name, and the input size.
pub struct U2NetWeights {
    pub tensors: HashMap<String, Tensor>,
    pub config: U2NetConfig,
    /// The network's input (height, width), from the graph's input shape.
    pub input_hw: (usize, usize),
}

/// rembg's input size when the graph leaves it symbolic.
const DEFAULT_INPUT: usize = 320;

pub fn weights(model: &Model, device: &Device) -> Result<U2NetWeights> {
    let g = &model.graph;
    let expected = u2net::conv_names();
    let convs: Vec<&Node> = g.nodes.iter().filter(|n| n.op_type == "Conv").collect();
    if convs.len() != expected.len() {
        bail!(
            "not a U²-Net: {} Conv nodes where U²-Net has {} (rembg's u2net, u2netp and silueta \
             files have that layout)",
            convs.len(),
            expected.len()
        );
    }
    for n in &g.nodes {
        check_op(n)?;
    }
    let by_name: HashMap<&str, &OnnxTensor> = g
        .initializers
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut tensors = HashMap::new();
    for (node, (name, dilation, kernel)) in convs.iter().zip(&expected) {
        check_conv(node, name, *dilation, *kernel)?;
        for (slot, suffix) in [(1, "weight"), (2, "bias")] {
            let key = format!("{name}.{suffix}");
            let src = node
                .inputs
                .get(slot)
                .filter(|s| !s.is_empty())
                .with_context(|| format!("not a U²-Net: the Conv for {name} has no {suffix}"))?;
            // A named initializer says which convolution it is; it must be this one.
            if !src.chars().all(|c| c.is_ascii_digit()) && src != &key {
                bail!("not a U²-Net: found {src} where {key} belongs");
            }
            let t = by_name
                .get(src.as_str())
                .with_context(|| format!("U²-Net {key}: initializer {src} is missing"))?;
            tensors.insert(key, to_candle(t, device)?);
        }
    }
    let config = U2NetConfig::from_shapes(&|name| tensors.get(name).map(|t| t.dims().to_vec()))?;
    let input_hw = input_size(g, config.in_ch)?;
    Ok(U2NetWeights {
        tensors,
        config,
        input_hw,
    })
}

/// Ops whose semantics the candle network assumes.
fn check_op(n: &Node) -> Result<()> {
    match n.op_type.as_str() {
        "Resize" => {
            let mode = n.attr_bytes("mode").unwrap_or(b"nearest");
            let ctm = n
                .attr_bytes("coordinate_transformation_mode")
                .unwrap_or(b"half_pixel");
            ensure!(
                mode == b"linear" && (ctm == b"pytorch_half_pixel" || ctm == b"half_pixel"),
                "not a U²-Net: a Resize is {} with {} coordinates, not bilinear half-pixel",
                String::from_utf8_lossy(mode),
                String::from_utf8_lossy(ctm)
            );
        }
        "MaxPool" => {
            let ok = n.attr_ints("kernel_shape") == Some(&[2, 2][..])
                && n.attr_ints("strides") == Some(&[2, 2][..])
                && n.attr_ints("pads")
                    .is_none_or(|p| p.iter().all(|&v| v == 0));
            ensure!(ok, "not a U²-Net: a MaxPool is not 2x2 with stride 2");
        }
        _ => {}
    }
    Ok(())
}

fn check_conv(n: &Node, name: &str, dilation: usize, kernel: usize) -> Result<()> {
    let d = dilation as i64;
    let k = kernel as i64;
    let p = d * (k / 2);
    let ints = |a: &str, default: &[i64]| {
        n.attr_ints(a)
            .map(<[i64]>::to_vec)
            .unwrap_or(default.to_vec())
    };
    let ok = ints("dilations", &[1, 1]) == [d, d]
        && ints("strides", &[1, 1]) == [1, 1]
        && ints("pads", &[0, 0, 0, 0]) == [p, p, p, p]
        && n.attr_int("group").unwrap_or(1) == 1
        && n.attr_ints("kernel_shape").is_none_or(|s| s == [k, k]);
    ensure!(
        ok,
        "not a U²-Net: the Conv for {name} is not {k}x{k} with dilation {d} and padding {p}"
    );
    Ok(())
}

fn to_candle(t: &OnnxTensor, device: &Device) -> Result<Tensor> {
    let TensorData::F32(v) = &t.data else {
        bail!("U²-Net initializer {} is not float32", t.name);
    };
    let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
    Ok(Tensor::from_slice(v, dims.as_slice(), device)?)
}

fn input_size(g: &Graph, channels: usize) -> Result<(usize, usize)> {
    let input = g
        .inputs
        .iter()
        .find(|i| !g.initializers.iter().any(|t| t.name == i.name));
    let Some(input) = input else {
        bail!("not a U²-Net: the graph has no image input");
    };
    ensure!(
        input.shape.len() == 4 && input.shape[1].is_none_or(|c| c == channels as i64),
        "not a U²-Net: input {} has shape {:?}, not [1, {channels}, H, W]",
        input.name,
        input.shape
    );
    let side = |d: Option<i64>| match d {
        Some(v) if (16..=4096).contains(&v) => Ok(v as usize),
        None => Ok(DEFAULT_INPUT),
        Some(v) => bail!("U²-Net input side {v} is out of range (16..=4096)"),
    };
    Ok((side(input.shape[2])?, side(input.shape[3])?))
}

// ---------------------------------------------------------------------------------------------
// Writing: a random-weight network in the same layout, for tests and the built-in tiny model.

/// Widths of a U²-Net with every stage `mid` wide inside and `out` wide outside (u2netp is
/// 16/64; the built-in tiny model is far smaller).
pub fn uniform_config(mid: usize, out: usize) -> U2NetConfig {
    let stages = u2net::STAGES
        .iter()
        .enumerate()
        .map(|(i, &(_, depth, dilated))| u2net::RsuConfig {
            depth,
            dilated,
            in_ch: match i {
                0 => 3,
                1..=5 => out,
                _ => 2 * out,
            },
            mid_ch: mid,
            out_ch: out,
        })
        .collect();
    U2NetConfig {
        stages,
        in_ch: 3,
        out_ch: 1,
    }
}

/// Builds the graph PyTorch's export would give for `cfg` at `input` × `input`, with random
/// folded weights from `seed` (He-scaled, so activations keep their size through the ReLUs).
pub fn random_model(cfg: &U2NetConfig, input: usize, seed: u64) -> Model {
    let mut w = Writer {
        graph: Graph {
            name: "u2net".into(),
            ..Graph::default()
        },
        next: 0,
        seed,
    };
    w.graph.inputs.push(ValueInfo {
        name: "input.1".into(),
        elem_type: 1,
        shape: vec![Some(1), Some(3), Some(input as i64), Some(input as i64)],
    });
    w.graph.initializers.push(OnnxTensor {
        name: "empty".into(),
        dims: vec![0],
        data: TensorData::F32(Vec::new()),
    });
    let names = u2net::conv_names();
    let mut convs = names.iter();
    let mut conv = |w: &mut Writer, x: &Value, cout: usize, relu: bool| -> Value {
        let (name, d, k) = convs.next().expect("conv_names covers every convolution");
        w.conv(x, name, cout, *d, *k, relu)
    };
    let x = Value {
        name: "input.1".into(),
        c: 3,
        hw: (input, input),
    };
    let mut enc: Vec<Value> = Vec::new();
    for s in &cfg.stages[..6] {
        let input = match enc.last() {
            None => x.clone(),
            Some(prev) => w.pool(prev),
        };
        enc.push(w.rsu(&input, s, &mut conv));
    }
    let mut dec: Vec<Value> = Vec::new();
    for (s, skip) in cfg.stages[6..].iter().zip(enc[..5].iter().rev()) {
        let deeper = dec.last().unwrap_or(&enc[5]).clone();
        let up = w.resize(&deeper, skip.hw);
        let cat = w.concat(&[up, skip.clone()]);
        dec.push(w.rsu(&cat, s, &mut conv));
    }
    let mut sides: Vec<Value> = Vec::new();
    for i in 0..u2net::SIDES {
        let input = if i == 5 {
            enc[5].clone()
        } else {
            dec[4 - i].clone()
        };
        let s = conv(&mut w, &input, cfg.out_ch, false);
        let s = match sides.first() {
            None => s,
            Some(first) => {
                let hw = first.hw;
                w.resize(&s, hw)
            }
        };
        sides.push(s);
    }
    let cat = w.concat(&sides);
    let fused = conv(&mut w, &cat, cfg.out_ch, false);
    let mut outputs = vec![w.unary("Sigmoid", &fused)];
    outputs.extend(sides.iter().map(|s| w.unary("Sigmoid", s)));
    for o in outputs {
        w.graph.outputs.push(ValueInfo {
            name: o.name,
            elem_type: 1,
            shape: vec![
                Some(1),
                Some(o.c as i64),
                Some(o.hw.0 as i64),
                Some(o.hw.1 as i64),
            ],
        });
    }
    Model {
        ir_version: 6,
        opset: 11,
        producer: "tkg".into(),
        graph: w.graph,
    }
}

#[derive(Clone)]
struct Value {
    name: String,
    c: usize,
    hw: (usize, usize),
}

struct Writer {
    graph: Graph,
    next: usize,
    seed: u64,
}

fn ints(name: &str, v: &[i64]) -> Attribute {
    Attribute {
        name: name.into(),
        value: AttrValue::Ints(v.to_vec()),
    }
}

fn text(name: &str, v: &str) -> Attribute {
    Attribute {
        name: name.into(),
        value: AttrValue::Bytes(v.as_bytes().to_vec()),
    }
}

impl Writer {
    fn fresh(&mut self) -> String {
        self.next += 1;
        self.next.to_string()
    }

    fn node(&mut self, op: &str, inputs: Vec<String>, attributes: Vec<Attribute>) -> String {
        let out = self.fresh();
        self.graph.nodes.push(Node {
            name: format!("{op}_{out}"),
            op_type: op.into(),
            inputs,
            outputs: vec![out.clone()],
            attributes,
        });
        out
    }

    fn random(&mut self, n: usize, scale: f32) -> Vec<f32> {
        self.seed = self.seed.wrapping_add(1);
        crate::rng::randn(crate::rng::RngKind::TorchCpu, self.seed, n)
            .into_iter()
            .map(|v| v * scale)
            .collect()
    }

    fn conv(
        &mut self,
        x: &Value,
        name: &str,
        cout: usize,
        d: usize,
        k: usize,
        relu: bool,
    ) -> Value {
        let fan_in = x.c * k * k;
        // Smaller side outputs keep the fused logits within a few units of zero, so the
        // sigmoid is not saturated and the mask has gradations to compare.
        let gain = if name.starts_with("side") { 0.2 } else { 1.0 };
        let weight = self.random(cout * fan_in, gain * (2.0 / fan_in as f32).sqrt());
        let bias = self.random(cout, 0.1);
        // Only the side and fuse convolutions keep their names in PyTorch's export.
        let named = !name.contains(".conv_s1");
        let init = |w: &mut Self, suffix: &str, dims: Vec<i64>, data: Vec<f32>| {
            let iname = if named {
                format!("{name}.{suffix}")
            } else {
                format!("{}", 100_000 + w.graph.initializers.len())
            };
            w.graph.initializers.push(OnnxTensor {
                name: iname.clone(),
                dims,
                data: TensorData::F32(data),
            });
            iname
        };
        let wn = init(
            self,
            "weight",
            vec![cout as i64, x.c as i64, k as i64, k as i64],
            weight,
        );
        let bn = init(self, "bias", vec![cout as i64], bias);
        let (d, k, p) = (d as i64, k as i64, (d * (k / 2)) as i64);
        let attrs = vec![
            ints("dilations", &[d, d]),
            Attribute {
                name: "group".into(),
                value: AttrValue::Int(1),
            },
            ints("kernel_shape", &[k, k]),
            ints("pads", &[p, p, p, p]),
            ints("strides", &[1, 1]),
        ];
        let mut out = self.node("Conv", vec![x.name.clone(), wn, bn], attrs);
        if relu {
            out = self.node("Relu", vec![out], vec![]);
        }
        Value {
            name: out,
            c: cout,
            hw: x.hw,
        }
    }

    fn pool(&mut self, x: &Value) -> Value {
        let attrs = vec![
            Attribute {
                name: "ceil_mode".into(),
                value: AttrValue::Int(1),
            },
            ints("kernel_shape", &[2, 2]),
            ints("pads", &[0, 0, 0, 0]),
            ints("strides", &[2, 2]),
        ];
        let name = self.node("MaxPool", vec![x.name.clone()], attrs);
        Value {
            name,
            c: x.c,
            hw: (x.hw.0.div_ceil(2), x.hw.1.div_ceil(2)),
        }
    }

    fn resize(&mut self, x: &Value, hw: (usize, usize)) -> Value {
        if x.hw == hw {
            return x.clone();
        }
        let sizes = format!("sizes_{}", self.fresh());
        self.graph.initializers.push(OnnxTensor {
            name: sizes.clone(),
            dims: vec![4],
            data: TensorData::I64(vec![1, x.c as i64, hw.0 as i64, hw.1 as i64]),
        });
        let attrs = vec![
            text("coordinate_transformation_mode", "pytorch_half_pixel"),
            Attribute {
                name: "cubic_coeff_a".into(),
                value: AttrValue::Float(-0.75),
            },
            text("mode", "linear"),
            text("nearest_mode", "floor"),
        ];
        let inputs = vec![x.name.clone(), "empty".into(), "empty".into(), sizes];
        let name = self.node("Resize", inputs, attrs);
        Value { name, c: x.c, hw }
    }

    fn concat(&mut self, xs: &[Value]) -> Value {
        let attrs = vec![Attribute {
            name: "axis".into(),
            value: AttrValue::Int(1),
        }];
        let name = self.node("Concat", xs.iter().map(|x| x.name.clone()).collect(), attrs);
        Value {
            name,
            c: xs.iter().map(|x| x.c).sum(),
            hw: xs[0].hw,
        }
    }

    fn add(&mut self, a: &Value, b: &Value) -> Value {
        let name = self.node("Add", vec![a.name.clone(), b.name.clone()], vec![]);
        Value { name, ..a.clone() }
    }

    fn unary(&mut self, op: &str, x: &Value) -> Value {
        let name = self.node(op, vec![x.name.clone()], vec![]);
        Value { name, ..x.clone() }
    }

    fn rsu(
        &mut self,
        x: &Value,
        cfg: &u2net::RsuConfig,
        conv: &mut dyn FnMut(&mut Writer, &Value, usize, bool) -> Value,
    ) -> Value {
        let hxin = conv(self, x, cfg.out_ch, true);
        let mut skips: Vec<Value> = Vec::new();
        for _ in 0..cfg.depth - 1 {
            let input = match skips.last() {
                None => hxin.clone(),
                Some(prev) if cfg.dilated => prev.clone(),
                Some(prev) => self.pool(prev),
            };
            skips.push(conv(self, &input, cfg.mid_ch, true));
        }
        let last = skips.last().expect("depth >= 2").clone();
        let mut d = conv(self, &last, cfg.mid_ch, true);
        let levels = skips.len();
        for (i, skip) in skips.iter().rev().enumerate() {
            let up = self.resize(&d, skip.hw);
            let cat = self.concat(&[up, skip.clone()]);
            let cout = if i + 1 == levels {
                cfg.out_ch
            } else {
                cfg.mid_ch
            };
            d = conv(self, &cat, cout, true);
        }
        self.add(&d, &hxin)
    }
}
