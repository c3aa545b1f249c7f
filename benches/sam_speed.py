#!/usr/bin/env python3
"""CPU time of SAM's image encoder at 1024²: tkg against transformers on the same weights.

Builds random-weight SamModel folders with transformers (the Hub is unreachable here, and the
cost of a forward pass does not depend on the weights): ViT-B (SamConfig's defaults, i.e.
facebook/sam-vit-base's shapes) and SlimSAM-uniform-50 / -77's shapes (hidden 384 / 168,
mlp_dim 1536 / 696, 12 heads), into --cache (kept for reruns). Then, for each, on one 1024x768
image with one point:

  tkg          `tkg -v segment IMAGE --model DIR --point X,Y` (the "segmented in" figure: the
               processor, the image encoder, one prompt through the decoder, post-processing;
               the model load is reported apart)
  transformers SamModel.get_image_embeddings on the processed pixels, eager and SDPA attention
               (the encoder alone: the decoder is a few percent)

each run twice, the faster kept, with the same thread count (--threads, default 2).

Usage: /work/pyenv/bin/python benches/sam_speed.py [--tkg target/release/tkg] [--threads 2]
           [--models vit-b,slimsam-50,slimsam-77] [--cache /tmp/tkg-sam-speed] [--tkg-only]
"""

import argparse
import os
import re
import subprocess
import sys
import time

SHAPES = {
    "vit-b": {},
    "slimsam-50": dict(hidden_size=384, mlp_dim=1536),
    "slimsam-77": dict(hidden_size=168, mlp_dim=696),
}


def build(name, d):
    import torch
    from transformers import SamConfig, SamImageProcessorPil, SamModel

    if os.path.isfile(os.path.join(d, "preprocessor_config.json")):
        return
    torch.manual_seed(0)
    model = SamModel(SamConfig(vision_config=SHAPES[name])).eval()
    model.save_pretrained(d, safe_serialization=True)
    # The PIL processor: the torchvision one computes the same pixels (make_sam_golden.py).
    SamImageProcessorPil().save_pretrained(d)


def image(path):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (1024, 768), (0, 177, 64))
    ImageDraw.Draw(im).ellipse((300, 180, 720, 600), fill=(150, 90, 60))
    im.save(path)


def tkg_time(tkg, d, img, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = os.path.join(os.path.dirname(img), "mask.png")
    best = None
    for _ in range(2):
        p = subprocess.run([tkg, "-v", "segment", img, "--model", d, "--point", "512,384",
                            "--out", out, "--overwrite"], capture_output=True, text=True,
                           env=env, check=True)
        m = re.search(r"loaded in (\d+) ms, segmented in (\d+) ms", p.stderr)
        if not m:
            sys.exit(f"no timing in tkg's output: {p.stderr}")
        t = int(m.group(2)) / 1000
        best = t if best is None else min(best, t)
    return best


def torch_time(d, img, threads, attn):
    import torch
    from PIL import Image
    from transformers import SamModel, SamProcessor

    torch.set_num_threads(threads)
    proc = SamProcessor.from_pretrained(d)
    model = SamModel.from_pretrained(d, attn_implementation=attn).eval()
    pv = proc(images=Image.open(img).convert("RGB"), return_tensors="pt")["pixel_values"]
    best = None
    with torch.no_grad():
        for _ in range(2):
            t = time.perf_counter()
            model.get_image_embeddings(pv)
            t = time.perf_counter() - t
            best = t if best is None else min(best, t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--tkg", default=os.path.join(here, "..", "target", "release", "tkg"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="vit-b,slimsam-50,slimsam-77")
    ap.add_argument("--cache", default="/tmp/tkg-sam-speed")
    ap.add_argument("--tkg-only", action="store_true", help="time tkg alone")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    img = os.path.join(args.cache, "image.png")
    image(img)
    rows = []
    for name in args.models.split(","):
        d = os.path.join(args.cache, name)
        print(f"{name}: building", file=sys.stderr, flush=True)
        build(name, d)
        print(f"{name}: timing", file=sys.stderr, flush=True)
        t = tkg_time(os.path.abspath(args.tkg), d, img, args.threads)
        e = float("nan") if args.tkg_only else torch_time(d, img, args.threads, "eager")
        s = float("nan") if args.tkg_only else torch_time(d, img, args.threads, "sdpa")
        rows.append((name, t, e, s))
    print(f"\n1024x768 image, {args.threads} threads, best of 2")
    print(f"{'model':<12} {'tkg segment':>12} {'tf eager enc':>13} {'tf sdpa enc':>12} "
          f"{'tkg/sdpa':>9}")
    for name, t, e, s in rows:
        print(f"{name:<12} {t:>11.2f}s {e:>12.2f}s {s:>11.2f}s {t / s:>8.2f}x")


if __name__ == "__main__":
    main()
