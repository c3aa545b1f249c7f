//! A small reader and writer of ONNX model files (protobuf wire format, no protoc): tkg reads
//! rembg's U²-Net weights by initializer name plus the graph facts it needs (which node uses
//! which initializer, with what attributes), and writes tiny models onnxruntime can run.
//! Input is untrusted: every length is checked against the bytes left before use.

use anyhow::{Context, Result, anyhow, bail};
use std::cell::Cell;
use std::io::Read;
use std::path::Path;

/// Largest ONNX file [`read`] accepts (protobuf itself stops at 2 GiB).
pub const MAX_FILE_BYTES: u64 = 2 << 30;
/// TensorProto / ValueInfo element type codes.
pub const DT_FLOAT: i32 = 1;
pub const DT_INT64: i32 = 7;
// Sub-graphs are skipped, so the schema nests at most 7 deep; this only guards the reader.
const MAX_DEPTH: usize = 16;
// Every message becomes a struct of ~100 bytes even when it is 2 bytes on disk: bound them.
const MAX_MESSAGES: usize = 1 << 22;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Model {
    pub ir_version: i64,
    /// Version of the default ("" / "ai.onnx") operator set.
    pub opset: i64,
    pub producer: String,
    pub graph: Graph,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    pub name: String,
    pub nodes: Vec<Node>,
    pub initializers: Vec<Tensor>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    /// An empty name is an omitted optional input (e.g. Resize's `roi`).
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Attribute {
    pub name: String,
    pub value: AttrValue,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Floats(Vec<f32>),
    /// A STRING attribute (ONNX strings are bytes).
    Bytes(Vec<u8>),
    Tensor(Tensor),
    /// Graphs, string lists, tensor lists…: skipped.
    Other,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<i64>,
    pub data: TensorData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
    /// Another element type (the TensorProto data_type code); its data is not read.
    Unsupported(i32),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: i32,
    /// `None` is a symbolic or unknown dimension. An unknown rank also reads as empty.
    pub shape: Vec<Option<i64>>,
}

impl Model {
    /// Parses a ModelProto. Errors are one line starting "ONNX: ".
    pub fn parse(bytes: &[u8]) -> Result<Model> {
        let budget = Cell::new(MAX_MESSAGES);
        parse_model(Reader::new(bytes, 0, 0, &budget)).map_err(|e| anyhow!("ONNX: {e:#}"))
    }

    /// Serialises as a ModelProto; [`Model::parse`] reads it back equal.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut o = Vec::new();
        put_int(&mut o, 1, self.ir_version);
        put_bytes(&mut o, 2, self.producer.as_bytes());
        put_msg(&mut o, 7, |o| write_graph(o, &self.graph));
        // Last on purpose: it is required, so no strict prefix of the output parses.
        put_msg(&mut o, 8, |o| {
            put_bytes(o, 1, b"");
            put_int(o, 2, self.opset);
        });
        o
    }

    pub fn initializer(&self, name: &str) -> Option<&Tensor> {
        self.graph.initializers.iter().find(|t| t.name == name)
    }
}

impl Node {
    pub fn attr(&self, name: &str) -> Option<&AttrValue> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| &a.value)
    }
    pub fn attr_ints(&self, name: &str) -> Option<&[i64]> {
        match self.attr(name)? {
            AttrValue::Ints(v) => Some(v),
            _ => None,
        }
    }
    pub fn attr_int(&self, name: &str) -> Option<i64> {
        match self.attr(name)? {
            AttrValue::Int(v) => Some(*v),
            _ => None,
        }
    }
    pub fn attr_bytes(&self, name: &str) -> Option<&[u8]> {
        match self.attr(name)? {
            AttrValue::Bytes(v) => Some(v),
            _ => None,
        }
    }
}

impl Tensor {
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }
}

/// Reads and parses an ONNX file of at most [`MAX_FILE_BYTES`]; errors name the file.
pub fn read(path: &Path) -> Result<Model> {
    let named = |e: anyhow::Error| anyhow!("{}: {e:#}", path.display());
    let f = std::fs::File::open(path).map_err(|e| named(e.into()))?;
    let len = f.metadata().map_err(|e| named(e.into()))?.len();
    if len > MAX_FILE_BYTES {
        bail!(
            "{}: {len} bytes is over the 2 GiB ONNX limit",
            path.display()
        );
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // The cap again while reading: the file may grow, or be a device that reports no size.
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| named(e.into()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        bail!("{}: larger than the 2 GiB ONNX limit", path.display());
    }
    Model::parse(&bytes).map_err(named)
}

// ---- wire reader ----

#[derive(Clone, Copy)]
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize, // absolute offset of buf[0] in the file, for messages
    depth: usize,
    budget: &'a Cell<usize>,
}

#[derive(Clone, Copy)]
enum Val<'a> {
    Varint(u64),
    Fixed64,
    Len(Reader<'a>),
    Fixed32(u32),
}

struct Field<'a> {
    num: u64,
    at: usize,
    val: Val<'a>,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize, depth: usize, budget: &'a Cell<usize>) -> Self {
        Reader {
            buf,
            pos: 0,
            base,
            depth,
            budget,
        }
    }
    fn truncated(&self) -> anyhow::Error {
        anyhow!("truncated at byte {}", self.base + self.buf.len())
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.buf.len() - self.pos {
            return Err(self.truncated());
        }
        self.pos += n;
        Ok(&self.buf[self.pos - n..self.pos])
    }
    fn varint(&mut self) -> Result<u64> {
        let at = self.base + self.pos;
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self.buf.get(self.pos).ok_or_else(|| self.truncated())?;
            self.pos += 1;
            if i == 9 && b > 1 {
                break;
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        bail!("varint at byte {at} overflows 64 bits")
    }
    fn field(&mut self) -> Result<Option<Field<'a>>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let at = self.base + self.pos;
        let key = self.varint()?;
        let num = key >> 3;
        if num == 0 || num >= 1 << 29 {
            bail!("bad field number {num} at byte {at}");
        }
        let val = match key & 7 {
            0 => Val::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Val::Fixed64
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| self.truncated())?;
                let base = self.base + self.pos;
                Val::Len(Reader::new(
                    self.take(n)?,
                    base,
                    self.depth + 1,
                    self.budget,
                ))
            }
            5 => Val::Fixed32(u32::from_le_bytes(arr(self.take(4)?))),
            3 | 4 => bail!("protobuf groups are not supported (field {num} at byte {at})"),
            w => bail!("bad wire type {w} at byte {at}"),
        };
        Ok(Some(Field { num, at, val }))
    }
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    b.try_into().unwrap_or([0; N]) // callers pass exactly N bytes
}

impl<'a> Field<'a> {
    fn bad(&self) -> anyhow::Error {
        anyhow!("field {} at byte {}: wrong wire type", self.num, self.at)
    }
    fn int(&self) -> Result<i64> {
        match self.val {
            Val::Varint(v) => Ok(v as i64),
            _ => Err(self.bad()),
        }
    }
    fn int32(&self) -> Result<i32> {
        let v = self.int()?;
        i32::try_from(v).map_err(|_| anyhow!("{v} at byte {} is not an int32", self.at))
    }
    fn float(&self) -> Result<f32> {
        match self.val {
            Val::Fixed32(b) => Ok(f32::from_bits(b)),
            _ => Err(self.bad()),
        }
    }
    fn bytes(&self) -> Result<&'a [u8]> {
        match self.val {
            Val::Len(r) => Ok(r.buf),
            _ => Err(self.bad()),
        }
    }
    fn string(&self) -> Result<String> {
        let s = std::str::from_utf8(self.bytes()?);
        s.map(str::to_owned)
            .map_err(|_| anyhow!("string at byte {} is not UTF-8", self.at))
    }
    fn msg(&self) -> Result<Reader<'a>> {
        let Val::Len(r) = self.val else {
            return Err(self.bad());
        };
        if r.depth > MAX_DEPTH {
            bail!("messages nest deeper than {MAX_DEPTH} at byte {}", self.at);
        }
        let left = r.budget.get().checked_sub(1);
        r.budget.set(left.context("more than 4 Mi messages")?);
        Ok(r)
    }
    /// A repeated int64, packed or not.
    fn push_ints(&self, out: &mut Vec<i64>) -> Result<()> {
        match self.val {
            Val::Varint(v) => out.push(v as i64),
            Val::Len(mut r) => {
                while r.pos < r.buf.len() {
                    out.push(r.varint()? as i64);
                }
            }
            _ => return Err(self.bad()),
        }
        Ok(())
    }
    /// A repeated float, packed or not.
    fn push_floats(&self, out: &mut Vec<f32>) -> Result<()> {
        match self.val {
            Val::Fixed32(b) => out.push(f32::from_bits(b)),
            Val::Len(r) if r.buf.len() % 4 == 0 => {
                out.extend(r.buf.chunks_exact(4).map(|c| f32::from_le_bytes(arr(c))));
            }
            Val::Len(_) => bail!("packed floats at byte {} are not whole floats", self.at),
            _ => return Err(self.bad()),
        }
        Ok(())
    }
}

fn each<'a>(mut r: Reader<'a>, mut f: impl FnMut(Field<'a>) -> Result<()>) -> Result<()> {
    while let Some(field) = r.field()? {
        f(field)?;
    }
    Ok(())
}

/// Calls `f` on each sub-message in field `num`.
fn each_msg<'a>(
    r: Reader<'a>,
    num: u64,
    mut f: impl FnMut(Reader<'a>) -> Result<()>,
) -> Result<()> {
    each(r, |field| {
        if field.num == num {
            f(field.msg()?)
        } else {
            Ok(())
        }
    })
}

/// Names a message for an error: `node "Conv_0"`, or `node 12` when it has no readable name.
fn label(kind: &str, index: usize, mut r: Reader, name_field: u64) -> String {
    while let Ok(Some(f)) = r.field() {
        if f.num == name_field {
            match f.string() {
                Ok(n) if !n.is_empty() => return format!("{kind} {n:?}"),
                _ => break,
            }
        }
    }
    format!("{kind} {index}")
}

// ---- schema ----

fn parse_model(r: Reader) -> Result<Model> {
    let (mut ir, mut opset, mut producer, mut graph) = (None, None, String::new(), None);
    each(r, |f| {
        match f.num {
            1 => ir = Some(f.int()?),
            2 => producer = f.string()?,
            7 => graph = Some(parse_graph(f.msg()?)?),
            8 => {
                let (mut domain, mut version) = (String::new(), 0);
                each(f.msg()?, |f| {
                    match f.num {
                        1 => domain = f.string()?,
                        2 => version = f.int()?,
                        _ => {}
                    }
                    Ok(())
                })?;
                if domain.is_empty() || domain == "ai.onnx" {
                    opset = Some(version);
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(Model {
        ir_version: ir.context("no ir_version")?,
        opset: opset.context("no opset_import for the default domain")?,
        producer,
        graph: graph.context("no graph")?,
    })
}

fn parse_graph(r: Reader) -> Result<Graph> {
    let mut g = Graph::default();
    each(r, |f| {
        match f.num {
            1 => {
                let (m, i) = (f.msg()?, g.nodes.len());
                g.nodes
                    .push(parse_node(m).with_context(|| label("node", i, m, 3))?);
            }
            2 => g.name = f.string()?,
            5 => {
                let (m, i) = (f.msg()?, g.initializers.len());
                let t = parse_tensor(m).with_context(|| label("initializer", i, m, 8))?;
                g.initializers.push(t);
            }
            11 => push_value(&f, &mut g.inputs, "input")?,
            12 => push_value(&f, &mut g.outputs, "output")?,
            _ => {} // value_info (13), doc_string, …
        }
        Ok(())
    })?;
    Ok(g)
}

fn push_value(f: &Field, list: &mut Vec<ValueInfo>, kind: &str) -> Result<()> {
    let (m, i) = (f.msg()?, list.len());
    list.push(parse_value_info(m).with_context(|| label(kind, i, m, 1))?);
    Ok(())
}

fn parse_node(r: Reader) -> Result<Node> {
    let (mut n, mut domain) = (Node::default(), String::new());
    each(r, |f| {
        match f.num {
            1 => n.inputs.push(f.string()?),
            2 => n.outputs.push(f.string()?),
            3 => n.name = f.string()?,
            4 => n.op_type = f.string()?,
            5 => {
                let (m, i) = (f.msg()?, n.attributes.len());
                n.attributes
                    .push(parse_attr(m).with_context(|| label("attribute", i, m, 1))?);
            }
            7 => domain = f.string()?,
            _ => {}
        }
        Ok(())
    })?;
    // Another domain's op of the same name means something else: refuse rather than misread.
    if !(domain.is_empty() || domain == "ai.onnx") {
        bail!("operator domain {domain:?} is not supported");
    }
    Ok(n)
}

fn parse_attr(r: Reader) -> Result<Attribute> {
    let (mut name, mut ty, mut fv, mut iv, mut s, mut t) =
        (String::new(), 0, None, None, None, None);
    let (mut floats, mut ints) = (Vec::new(), Vec::new());
    each(r, |f| {
        match f.num {
            1 => name = f.string()?,
            2 => fv = Some(f.float()?),
            3 => iv = Some(f.int()?),
            4 => s = Some(f.bytes()?.to_vec()),
            5 => t = Some(parse_tensor(f.msg()?).context("tensor")?),
            7 => f.push_floats(&mut floats)?,
            8 => f.push_ints(&mut ints)?,
            20 => ty = f.int()?,
            _ => {} // g, strings, tensors, graphs: not needed, and sub-graphs are not recursed into
        }
        Ok(())
    })?;
    use AttrValue as V;
    let value = match ty {
        1 => V::Float(fv.unwrap_or(0.0)),
        2 => V::Int(iv.unwrap_or(0)),
        3 => V::Bytes(s.unwrap_or_default()),
        4 => V::Tensor(t.context("type TENSOR but no tensor")?),
        6 => V::Floats(floats),
        7 => V::Ints(ints),
        // No type (before IR 2): go by the field that is there.
        0 => match (t, s, fv, iv) {
            (Some(t), ..) => V::Tensor(t),
            (_, Some(s), ..) => V::Bytes(s),
            _ if !floats.is_empty() => V::Floats(floats),
            _ if !ints.is_empty() => V::Ints(ints),
            (_, _, Some(x), _) => V::Float(x),
            (_, _, _, Some(i)) => V::Int(i),
            _ => V::Other,
        },
        _ => V::Other,
    };
    Ok(Attribute { name, value })
}

fn parse_tensor(r: Reader) -> Result<Tensor> {
    let (mut name, mut dims, mut dt, mut raw, mut external) =
        (String::new(), vec![], 0, None, false);
    let (mut floats, mut ints) = (Vec::new(), Vec::new());
    each(r, |f| {
        match f.num {
            1 => f.push_ints(&mut dims)?,
            2 => dt = f.int32()?,
            4 => f.push_floats(&mut floats)?,
            7 => f.push_ints(&mut ints)?,
            8 => name = f.string()?,
            9 => raw = Some(f.bytes()?),
            13 => external = true,
            14 => external |= f.int()? == 1,
            _ => {}
        }
        Ok(())
    })?;
    if external {
        bail!("external data is not supported");
    }
    let count = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?));
    let count = count.with_context(|| format!("dims {dims:?} are negative or overflow"))?;
    let data = match dt {
        DT_FLOAT => TensorData::F32(values(raw, floats, count, &dims, f32::from_le_bytes)?),
        DT_INT64 => TensorData::I64(values(raw, ints, count, &dims, i64::from_le_bytes)?),
        other => TensorData::Unsupported(other),
    };
    Ok(Tensor { name, dims, data })
}

/// A tensor's values from raw_data (little-endian) or the typed field, checked against dims.
fn values<T, const N: usize>(
    raw: Option<&[u8]>,
    typed: Vec<T>,
    count: usize,
    dims: &[i64],
    from_le: fn([u8; N]) -> T,
) -> Result<Vec<T>> {
    let Some(raw) = raw else {
        if typed.len() != count {
            bail!("{} values, dims {dims:?} need {count}", typed.len());
        }
        return Ok(typed);
    };
    if !typed.is_empty() {
        bail!("both raw_data and typed data");
    }
    if raw.len() % N != 0 || raw.len() / N != count {
        let need = count.saturating_mul(N);
        bail!(
            "raw_data holds {} bytes, dims {dims:?} need {need}",
            raw.len()
        );
    }
    Ok(raw.chunks_exact(N).map(|c| from_le(arr(c))).collect())
}

fn parse_value_info(r: Reader) -> Result<ValueInfo> {
    let mut v = ValueInfo::default();
    each(r, |f| {
        match f.num {
            1 => v.name = f.string()?,
            // TypeProto.tensor_type (1): elem_type (1), shape (2) → dim (1) → dim_value (1).
            // Other types (sequence, map) are left with elem_type 0.
            2 => each_msg(f.msg()?, 1, |t| {
                each(t, |f| {
                    match f.num {
                        1 => v.elem_type = f.int32()?,
                        2 => each_msg(f.msg()?, 1, |d| {
                            let mut dim = None;
                            each(d, |f| {
                                if f.num == 1 {
                                    dim = Some(f.int()?);
                                }
                                Ok(())
                            })?;
                            v.shape.push(dim);
                            Ok(())
                        })?,
                        _ => {}
                    }
                    Ok(())
                })
            })?,
            _ => {}
        }
        Ok(())
    })?;
    Ok(v)
}

// ---- writer ----

fn varint(o: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        o.push(v as u8 | 0x80);
        v >>= 7;
    }
    o.push(v as u8);
}
fn put_int(o: &mut Vec<u8>, num: u64, v: i64) {
    varint(o, num << 3);
    varint(o, v as u64);
}
fn put_f32(o: &mut Vec<u8>, num: u64, v: f32) {
    varint(o, num << 3 | 5);
    o.extend(v.to_le_bytes());
}
fn put_bytes(o: &mut Vec<u8>, num: u64, b: &[u8]) {
    varint(o, num << 3 | 2);
    varint(o, b.len() as u64);
    o.extend_from_slice(b);
}
fn put_msg(o: &mut Vec<u8>, num: u64, f: impl FnOnce(&mut Vec<u8>)) {
    let mut m = Vec::new();
    f(&mut m);
    put_bytes(o, num, &m);
}

fn write_graph(o: &mut Vec<u8>, g: &Graph) {
    for n in &g.nodes {
        put_msg(o, 1, |o| {
            n.inputs.iter().for_each(|s| put_bytes(o, 1, s.as_bytes()));
            n.outputs.iter().for_each(|s| put_bytes(o, 2, s.as_bytes()));
            put_bytes(o, 3, n.name.as_bytes());
            put_bytes(o, 4, n.op_type.as_bytes());
            for a in &n.attributes {
                put_msg(o, 5, |o| write_attr(o, a));
            }
        });
    }
    put_bytes(o, 2, g.name.as_bytes());
    for t in &g.initializers {
        put_msg(o, 5, |o| write_tensor(o, t));
    }
    for (num, list) in [(11, &g.inputs), (12, &g.outputs)] {
        list.iter()
            .for_each(|v| put_msg(o, num, |o| write_value_info(o, v)));
    }
}

fn write_attr(o: &mut Vec<u8>, a: &Attribute) {
    put_bytes(o, 1, a.name.as_bytes());
    use AttrValue as V;
    let ty = match &a.value {
        V::Float(_) => 1,
        V::Int(_) => 2,
        V::Bytes(_) => 3,
        V::Tensor(_) => 4,
        V::Floats(_) => 6,
        V::Ints(_) => 7,
        V::Other => return,
    };
    // Lists unpacked, as proto2 writers do.
    match &a.value {
        V::Float(v) => put_f32(o, 2, *v),
        V::Int(v) => put_int(o, 3, *v),
        V::Bytes(v) => put_bytes(o, 4, v),
        V::Tensor(t) => put_msg(o, 5, |o| write_tensor(o, t)),
        V::Floats(v) => v.iter().for_each(|&x| put_f32(o, 7, x)),
        V::Ints(v) => v.iter().for_each(|&x| put_int(o, 8, x)),
        V::Other => {}
    }
    put_int(o, 20, ty);
}

fn write_tensor(o: &mut Vec<u8>, t: &Tensor) {
    if !t.dims.is_empty() {
        put_msg(o, 1, |o| t.dims.iter().for_each(|&d| varint(o, d as u64)));
    }
    let (dt, raw): (i32, Vec<u8>) = match &t.data {
        TensorData::F32(v) => (DT_FLOAT, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::I64(v) => (DT_INT64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::Unsupported(code) => (*code, Vec::new()),
    };
    put_int(o, 2, dt.into());
    if !t.name.is_empty() {
        put_bytes(o, 8, t.name.as_bytes());
    }
    if !raw.is_empty() {
        put_bytes(o, 9, &raw);
    }
}

fn write_value_info(o: &mut Vec<u8>, v: &ValueInfo) {
    put_bytes(o, 1, v.name.as_bytes());
    put_msg(o, 2, |o| {
        put_msg(o, 1, |o| {
            put_int(o, 1, v.elem_type.into());
            put_msg(o, 2, |o| {
                for d in &v.shape {
                    put_msg(o, 1, |o| match d {
                        Some(n) => put_int(o, 1, *n),
                        None => put_bytes(o, 2, b"N"),
                    });
                }
            });
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttrValue as V;

    fn t(name: &str, dims: &[i64], data: TensorData) -> Tensor {
        Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            data,
        }
    }
    fn a(name: &str, value: AttrValue) -> Attribute {
        Attribute {
            name: name.into(),
            value,
        }
    }
    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }
    fn vi(name: &str, shape: &[Option<i64>]) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            elem_type: DT_FLOAT,
            shape: shape.to_vec(),
        }
    }
    fn node(op: &str, inputs: &[&str], out: &str, attributes: Vec<Attribute>) -> Node {
        let (name, inputs, outputs) = (format!("{op}_0"), strs(inputs), strs(&[out]));
        Node {
            name,
            op_type: op.into(),
            inputs,
            outputs,
            attributes,
        }
    }

    /// Conv + Relu, laid out as in U²-Net.
    fn sample() -> Model {
        let w = (0..54).map(|i| i as f32 * 0.01 - 0.2).collect();
        let ints = |v: &[i64]| V::Ints(v.to_vec());
        let conv_attrs = vec![
            a("dilations", ints(&[1, 1])),
            a("group", V::Int(1)),
            a("kernel_shape", ints(&[3, 3])),
            a("pads", ints(&[1, 1, 1, 1])),
            a("strides", ints(&[1, 1])),
        ];
        let graph = Graph {
            name: "g".into(),
            nodes: vec![
                node("Conv", &["input.1", "w", "b"], "c", conv_attrs),
                node("Relu", &["c"], "out", vec![]),
            ],
            initializers: vec![
                t("w", &[2, 3, 3, 3], TensorData::F32(w)),
                t("b", &[2], TensorData::F32(vec![0.5, -0.5])),
            ],
            inputs: vec![vi("input.1", &[Some(1), Some(3), Some(8), Some(8)])],
            outputs: vec![vi("out", &[None, Some(2), Some(8), Some(8)])],
        };
        Model {
            ir_version: 6,
            opset: 11,
            producer: "tkg".into(),
            graph,
        }
    }

    fn err(bytes: &[u8]) -> String {
        format!("{:#}", Model::parse(bytes).unwrap_err())
    }

    /// A model whose graph holds just `init` as its one initializer message.
    fn with_initializer(init: &[u8]) -> Vec<u8> {
        let mut o = Vec::new();
        put_int(&mut o, 1, 6);
        put_msg(&mut o, 7, |g| put_bytes(g, 5, init));
        put_msg(&mut o, 8, |m| put_int(m, 2, 11));
        o
    }

    #[test]
    fn round_trip() {
        let mut m = sample();
        m.graph.nodes[1].attributes = vec![
            a("f", V::Float(-0.75)),
            a("fs", V::Floats(vec![1.5, -2.0])),
            a("s", V::Bytes(b"pytorch_half_pixel".to_vec())),
            a("t", V::Tensor(t("", &[], TensorData::I64(vec![-3])))),
            a("empty", V::Ints(vec![])),
            a("i", V::Int(i64::MIN)),
            a("g", V::Other),
        ];
        m.graph.nodes[1].inputs.push(String::new()); // an omitted optional input survives
        m.graph
            .initializers
            .push(t("e", &[0], TensorData::F32(vec![])));
        m.graph
            .initializers
            .push(t("h", &[2], TensorData::Unsupported(10)));
        let bytes = m.to_bytes();
        let back = Model::parse(&bytes).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(
            back.initializer("b").unwrap().as_f32(),
            Some(&[0.5, -0.5][..])
        );
        let (conv, relu) = (&back.graph.nodes[0], &back.graph.nodes[1]);
        assert_eq!(conv.attr_ints("pads"), Some(&[1, 1, 1, 1][..]));
        assert_eq!(conv.attr_int("group"), Some(1));
        assert_eq!(relu.attr("f"), Some(&V::Float(-0.75)));
        assert_eq!(relu.attr_bytes("s"), Some(&b"pytorch_half_pixel"[..]));
        assert_eq!((relu.attr_int("fs"), relu.attr_ints("none")), (None, None));
    }

    #[test]
    fn hand_built_bytes() {
        // An attribute with no `type`, unpacked ints, and an unknown field of every wire type.
        #[rustfmt::skip]
        let attr = [
            0x0a, 1, b'k', 0x40, 2, 0x40, 3, // name "k", ints 2, 3 (unpacked)
            0x98, 0x06, 0x96, 0x01, // field 99, varint 150
            0x99, 0x06, 1, 2, 3, 4, 5, 6, 7, 8, // field 99, fixed64
            0x9a, 0x06, 2, 0xff, 0xff, // field 99, bytes (not UTF-8, never read)
            0x9d, 0x06, 1, 2, 3, 4, // field 99, fixed32
        ];
        let mut node = Vec::new();
        put_bytes(&mut node, 4, b"MaxPool");
        put_bytes(&mut node, 5, &attr);
        put_msg(&mut node, 5, |o| {
            put_bytes(o, 1, b"p"); // packed ints, type set
            put_msg(o, 8, |o| [0, 1, 300].iter().for_each(|&v| varint(o, v)));
            put_int(o, 20, 7);
        });
        let mut init = Vec::new();
        [2, 1].iter().for_each(|&d| put_int(&mut init, 1, d)); // dims unpacked
        put_int(&mut init, 2, 1);
        [1.0, 2.0].iter().for_each(|&x| put_f32(&mut init, 4, x)); // float_data unpacked
        put_bytes(&mut init, 8, b"x");
        put_int(&mut init, 77, 5);
        let mut o = Vec::new();
        put_int(&mut o, 1, 7);
        put_msg(&mut o, 7, |g| {
            put_bytes(g, 1, &node);
            put_bytes(g, 5, &init);
            put_msg(g, 13, |v| put_bytes(v, 1, b"value_info, skipped"));
        });
        put_msg(&mut o, 8, |m| put_bytes(m, 1, b"com.microsoft"));
        put_msg(&mut o, 8, |m| put_int(m, 2, 13));
        let m = Model::parse(&o).unwrap();
        assert_eq!((m.ir_version, m.opset), (7, 13));
        assert_eq!(m.graph.nodes[0].attr_ints("k"), Some(&[2, 3][..]));
        assert_eq!(m.graph.nodes[0].attr_ints("p"), Some(&[0, 1, 300][..]));
        let x = m.initializer("x").unwrap();
        assert_eq!(
            (&x.dims[..], x.as_f32()),
            (&[2, 1][..], Some(&[1.0, 2.0][..]))
        );
    }

    #[test]
    fn every_prefix_is_an_error() {
        let bytes = sample().to_bytes();
        for n in 0..bytes.len() {
            assert!(Model::parse(&bytes[..n]).is_err(), "prefix {n} parsed");
        }
        let n = bytes.len() - 1;
        assert_eq!(err(&bytes[..n]), format!("ONNX: truncated at byte {n}"));
    }

    #[test]
    fn lying_lengths_and_bad_wire() {
        let mut huge = vec![0x3a]; // graph, 2^62 bytes long
        varint(&mut huge, 1 << 62);
        assert_eq!(err(&huge), "ONNX: truncated at byte 10");
        assert!(err(&[0x08; 11]).contains("truncated at byte 11"));
        let overlong = [
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02,
        ];
        assert!(err(&overlong).contains("overflows"));
        assert!(err(&[0x0b]).contains("groups"));
        assert!(err(&[0x0f]).contains("wire type 7"));
        assert!(err(&[0x0a, 1, 0x08]).contains("wrong wire type"));
        // A node claiming more bytes than its graph holds.
        let mut o = vec![0x08, 6, 0x3a, 5, 0x0a, 50, 0x22, 1, b'X'];
        o.extend([0x42, 2, 0x10, 11]);
        assert_eq!(err(&o), "ONNX: truncated at byte 9");
        assert!(err(&with_initializer(&[0x42, 2, 0xc3, 0x28])).contains("not UTF-8"));
    }

    #[test]
    fn dims_must_match_data() {
        let mut w = Vec::new();
        put_msg(&mut w, 1, |o| {
            [1, 64, 3, 3].iter().for_each(|&d| varint(o, d))
        });
        put_int(&mut w, 2, 1);
        put_bytes(&mut w, 8, b"1967");
        let with = |extra: &dyn Fn(&mut Vec<u8>)| {
            let mut t = w.clone();
            extra(&mut t);
            err(&with_initializer(&t))
        };
        let want =
            r#"ONNX: initializer "1967": raw_data holds 2300 bytes, dims [1, 64, 3, 3] need 2304"#;
        assert_eq!(with(&|t| put_bytes(t, 9, &[0; 2300])), want);
        assert!(with(&|t| put_bytes(t, 9, &[0; 2302])).contains("holds 2302 bytes"));
        assert!(with(&|t| put_f32(t, 4, 1.0)).contains("1 values, dims [1, 64, 3, 3] need 576"));
        let both = with(&|t| {
            put_f32(t, 4, 1.0);
            put_bytes(t, 9, &[0; 2304]);
        });
        assert!(both.contains("both raw_data and typed data"));
        let mut big = Vec::new();
        put_msg(&mut big, 1, |o| {
            [i64::MAX as u64, 4].iter().for_each(|&d| varint(o, d))
        });
        put_int(&mut big, 2, 7);
        assert!(err(&with_initializer(&big)).contains("overflow"));
        let neg = [
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x10, 1,
        ];
        assert!(err(&with_initializer(&neg)).contains("initializer 0: dims [-1] are negative"));
        let i64s = [0x10, 7, 0x4a, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(err(&with_initializer(&i64s)).contains("holds 12 bytes, dims [] need 8"));
    }

    #[test]
    fn external_data_and_missing_parts() {
        let external = [0x10, 1, 0x70, 1]; // data_type FLOAT, data_location EXTERNAL
        assert!(err(&with_initializer(&external)).ends_with("external data is not supported"));
        let mut o = sample().to_bytes();
        o.truncate(o.len() - 6); // the whole opset_import
        assert_eq!(err(&o), "ONNX: no opset_import for the default domain");
        let mut node = Vec::new();
        put_bytes(&mut node, 7, b"com.microsoft");
        let mut o = Vec::new();
        put_int(&mut o, 1, 6);
        put_msg(&mut o, 7, |g| put_bytes(g, 1, &node));
        put_msg(&mut o, 8, |m| put_int(m, 2, 11));
        assert!(err(&o).contains("node 0: operator domain \"com.microsoft\""));
    }

    #[test]
    fn read_caps_and_names_the_file() {
        let dir = std::env::temp_dir().join(format!("tkg-onnx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.onnx");
        std::fs::write(&p, sample().to_bytes()).unwrap();
        assert_eq!(read(&p).unwrap(), sample());
        std::fs::write(&p, b"\x08").unwrap();
        let e = read(&p).unwrap_err().to_string();
        assert_eq!(e, format!("{}: ONNX: truncated at byte 1", p.display()));
        // Sparse: refused from its size alone, before anything is read.
        std::fs::File::create(&p)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        assert!(read(&p).unwrap_err().to_string().contains("over the 2 GiB"));
        assert!(
            read(&dir.join("absent"))
                .unwrap_err()
                .to_string()
                .contains("absent")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rembg_u2netp() {
        let path = Path::new("/work/wheels/rembg-lite/rembg/u2netp.onnx");
        if !path.exists() {
            return; // not in the repository
        }
        let m = read(path).unwrap();
        let g = &m.graph;
        assert_eq!((m.ir_version, m.opset, &m.producer[..]), (6, 11, "pytorch"));
        assert_eq!((g.initializers.len(), g.nodes.len()), (238, 1055));
        let first = &g.initializers[0];
        assert_eq!(
            (&first.name[..], &first.dims[..]),
            ("side1.weight", &[1, 64, 3, 3][..])
        );
        let input = (&g.inputs[0].name[..], &g.inputs[0].shape[..]);
        assert_eq!(
            input,
            ("input.1", &[Some(1), Some(3), Some(320), Some(320)][..])
        );
        let convs: Vec<&Node> = g.nodes.iter().filter(|n| n.op_type == "Conv").collect();
        assert_eq!(convs.len(), 119);
        for c in convs {
            assert_eq!(m.initializer(&c.inputs[1]).map(|w| w.dims.len()), Some(4));
            assert_eq!(c.attr_ints("dilations").map(<[i64]>::len), Some(2));
        }
        let pool = g.nodes.iter().find(|n| n.op_type == "MaxPool").unwrap();
        assert_eq!(pool.attr_int("ceil_mode"), Some(1));
        assert_eq!(Model::parse(&m.to_bytes()).unwrap(), m);
    }
}
