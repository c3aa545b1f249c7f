"""Goldens for tkg's U²-Net (tests/it/segment_parity.rs), from onnxruntime.

The model is tkg's built-in `tiny-u2net`: U²-Net's layout (rembg's ONNX export: numbered
block-conv initializers, named side convs, opset 11) at 4/8 channels and a 320x320 input, with
random weights. tkg's own code writes it (`cargo run --example u2net -- write-tiny`); this
script records the file's sha256, so the test knows the goldens belong to the model it builds.

For each input image it stores, the way rembg's U²-Net session processes it:
  NAME.png             the input (drawn here, deterministic)
  NAME.resized.png     PIL's Lanczos resize to 320x320 (rembg's first step)
  NAME.mask.png        rembg's final 8-bit mask: min-max, *255 truncated, Lanczos back
  u2net.safetensors    NAME.raw: the min-max normalised network output on the resized image,
                       every 4th row and column (80x80), float32

Run from the repository root:  python tests/golden/segment/make_u2net_golden.py
Needs: numpy, pillow, onnxruntime, safetensors (pip).
"""

import hashlib
import json
import os
import subprocess
import tempfile

import numpy as np
import onnxruntime as ort
from PIL import Image
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
STRIDE = 4


def draw(name, w, h, seed):
    """A subject (a grey disc with a magenta bar and a screen-green band) on a green screen
    with a gentle gradient and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    img[..., 0] = 10 + 20 * x / w
    img[..., 1] = 170 + 15 * y / h
    img[..., 2] = 60
    cx, cy, r = 0.45 * w, 0.55 * h, 0.3 * min(w, h)
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
    img[disc] = (150, 140, 130)
    bar = disc & (abs(y - cy) < 0.06 * h)
    img[bar] = (200, 30, 160)
    band = disc & (abs(x - cx) < 0.05 * w)
    img[band] = (5, 178, 62)
    img += rng.normal(0, 2.0, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")
    out.save(os.path.join(HERE, name + ".png"))
    return out


def main():
    root = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "tiny-u2net.onnx")
        subprocess.run(
            ["cargo", "run", "-q", "--example", "u2net", "--", "write-tiny", onnx_path],
            cwd=root,
            check=True,
        )
        data = open(onnx_path, "rb").read()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    tensors = {}
    cases = []
    for name, w, h, seed in [("disc", 200, 150, 1), ("tall", 97, 131, 2), ("big", 640, 480, 3)]:
        img = draw(name, w, h, seed)
        resized = img.resize((320, 320), Image.LANCZOS)
        resized.save(os.path.join(HERE, name + ".resized.png"))
        a = np.array(resized) / np.max(np.array(resized))
        t = np.stack([(a[..., c] - MEAN[c]) / STD[c] for c in range(3)])[None].astype(np.float32)
        pred = sess.run(None, {sess.get_inputs()[0].name: t})[0][:, 0]
        raw = (pred - pred.min()) / (pred.max() - pred.min())
        raw = np.squeeze(raw).astype(np.float32)
        tensors[name + ".raw"] = np.ascontiguousarray(raw[::STRIDE, ::STRIDE])
        mask = Image.fromarray((raw * 255).astype(np.uint8), "L").resize((w, h), Image.LANCZOS)
        mask.save(os.path.join(HERE, name + ".mask.png"))
        cases.append({"name": name, "width": w, "height": h, "raw_range": [float(pred.min()), float(pred.max())]})
    save_file(tensors, os.path.join(HERE, "u2net.safetensors"))
    meta = {
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "stride": STRIDE,
        "onnxruntime": ort.__version__,
        "cases": cases,
    }
    with open(os.path.join(HERE, "u2net.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
