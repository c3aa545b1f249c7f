fn main() {
    let img = image::open(std::env::args().nth(1).unwrap())
        .unwrap()
        .to_rgb8();
    let o = tkg::key::KeyOptions::new(tkg::color::KeyColor::green());
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let k = tkg::key::key_rgb8(img.width(), img.height(), img.as_raw(), &o).unwrap();
        eprintln!(
            "total {:.1} ms bg {}",
            t.elapsed().as_secs_f64() * 1e3,
            k.background_fraction
        );
    }
}
