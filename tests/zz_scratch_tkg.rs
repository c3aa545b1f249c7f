use candle_core::Device;
fn fm(a: f32, b: f32, c: f32) -> f32 { a.mul_add(b, c) }
fn resize(src: &[f32], ih: usize, iw: usize, oh: usize, ow: usize, v: u32, idxfma: bool) -> Vec<f32> {
    let axis = |insz: usize, outsz: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = insz as f32 / outsz as f32;
        (0..outsz).map(|o| { let real = if idxfma { scale.mul_add(o as f32 + 0.5, -0.5) } else { scale * (o as f32 + 0.5) - 0.5 }.max(0.0);
            let i0 = (real.floor() as usize).min(insz - 1); let i1 = if i0 < insz - 1 { i0 + 1 } else { i0 };
            let l1 = (real - i0 as f32).clamp(0.0, 1.0); (i0, i1, 1.0 - l1, l1) }).collect() };
    let (ry, rx) = (axis(ih, oh), axis(iw, ow));
    let mut out = vec![];
    for &(y0, y1, h0, h1) in &ry { for &(x0, x1, w0, w1) in &rx {
        let (a, b, c, d) = (src[y0*iw+x0], src[y0*iw+x1], src[y1*iw+x0], src[y1*iw+x1]);
        let r = match v {
            0 => h0*w0*a + h0*w1*b + h1*w0*c + h1*w1*d,
            1 => fm(h1*w1, d, fm(h1*w0, c, fm(h0*w1, b, h0*w0*a))),
            2 => { let t0 = a*w0 + b*w1; let t1 = c*w0 + d*w1; t0*h0 + t1*h1 }
            3 => { let t0 = fm(b, w1, a*w0); let t1 = fm(d, w1, c*w0); fm(t1, h1, t0*h0) }
            4 => { let t0 = fm(a, w0, b*w1); let t1 = fm(c, w0, d*w1); fm(t0, h0, t1*h1) }
            5 => { let t0 = fm(b, w1, a*w0); let t1 = fm(d, w1, c*w0); fm(t0, h0, t1*h1) }
            6 => { let t0 = fm(a, w0, b*w1); let t1 = fm(c, w0, d*w1); fm(t1, h1, t0*h0) }
            _ => unreachable!(),
        };
        out.push(r);
    }}
    out
}
#[test]
fn scratch() {
    let t = candle_core::safetensors::load(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/tkg/tkg.safetensors"), &Device::Cpu).unwrap();
    let masks = [(0,0),(0,1),(1,0),(1,1),(2,0),(2,1),(3,0),(3,1),(3,2)];
    for (c, j) in masks {
        let g = &t[&format!("case{c}.mask{j}_grid")]; let (_,_,gh,gw) = g.dims4().unwrap();
        let gv: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let m = &t[&format!("case{c}.mask{j}")]; let (_,_,h,w) = m.dims4().unwrap();
        let mv: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        let mut s = String::new();
        for v in 0..7 { for idx in [false, true] {
            let r = resize(&gv, gh, gw, h, w, v, idx);
            s += &format!(" v{v}{}:{}", if idx {"f"} else {""}, r.iter().zip(&mv).filter(|(x,y)| x != y).count());
        }}
        eprintln!("case{c} mask{j} ({h}x{w}, H+W {}):{s}", h + w);
    }
}
