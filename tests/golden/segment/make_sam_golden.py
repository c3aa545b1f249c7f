"""Goldens for tkg's Segment Anything port (tests/it/sam_parity.rs), from transformers.

Two tiny random-weight `SamModel`s, saved the way the Hub's SAM checkpoints are (config.json,
model.safetensors, preprocessor_config.json), then run through `SamProcessor` + `SamModel` on a
small image with points and a box:

  sam/      SAM's layout at small widths: vision hidden 32, 2 heads, 3 layers, window 4,
            global attention at layer 2, mlp_dim = 4 x hidden.
  slimsam/  pruned like SlimSAM: SlimSAM-uniform-77 keeps 12 heads on a 168-wide ViT
            (head_dim 14) with mlp_dim 696 (not 4 x 168); here hidden 21 with 3 heads
            (head_dim 7), mlp_dim 58, a window of 3 that does not divide the 8x8 grid (the
            padded window path), two global layers, a 24-wide decoder with an IoU head of
            depth 4, 3 two-way layers.

Both use image_size 64 and patch_size 8 (an 8x8 embedding grid, 32x32 low-res masks) in the
vision and the prompt encoder configs, and a processor with longest_edge 64 and pad_size 64x64:
transformers reads all of these from the configs, so the same code paths run as at 1024.

Every parameter is drawn again (transformers initialises rel_pos, pos_embed and the biases to
zero, which would hide mistakes there), rounded to float16 values and stored as F16; the goldens
come from the model loaded back from the folder in float32.

Per model, golden.safetensors holds
  pixel_values       [1,3,64,64]  SamProcessor's output
  image_embeddings   [1,C,8,8]    SamModel.get_image_embeddings
  CASE.input_points  [1,1,N,2] f64, CASE.input_boxes [1,1,4] f64: the processor's coordinates
  CASE.pred_masks    [1,1,M,32,32] low-res mask logits, CASE.iou_scores [1,1,M]
  CASE.masks         [1,M,H,W] u8: processor.post_process_masks (threshold 0) at the image size
and golden.json the cases' prompts, sizes, the processor class and the versions.

Run from the repository root:  /work/pyenv/bin/python tests/golden/segment/make_sam_golden.py
Needs: torch, transformers, safetensors, numpy, pillow. No network.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import PIL
import safetensors
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import SamConfig, SamModel, SamProcessor

HERE = os.path.dirname(os.path.abspath(__file__))
STORE_DTYPE = torch.float16

VARIANTS = {
    "sam": dict(
        seed=0,
        image=(50, 37),  # W x H: upscaled to 64 x 47
        vision=dict(
            hidden_size=32,
            output_channels=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=64,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[2],
            num_pos_feats=16,
        ),
        prompt=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=8),
        decoder=dict(
            hidden_size=32,
            mlp_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            iou_head_hidden_dim=32,
            iou_head_depth=3,
        ),
    ),
    "slimsam": dict(
        seed=1,
        image=(120, 83),  # downscaled to 64 x 44 (PIL's antialiased bilinear)
        vision=dict(
            hidden_size=21,
            output_channels=24,
            num_hidden_layers=4,
            num_attention_heads=3,
            mlp_dim=58,
            image_size=64,
            patch_size=8,
            window_size=3,
            global_attn_indexes=[1, 3],
            num_pos_feats=12,
        ),
        prompt=dict(hidden_size=24, image_size=64, patch_size=8, mask_input_channels=8),
        decoder=dict(
            hidden_size=24,
            mlp_dim=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            iou_head_hidden_dim=20,
            iou_head_depth=4,
        ),
    ),
}


def cases(w, h):
    """Prompts in image pixels: points (label 1 subject, 0 background), a box, both."""
    return [
        dict(name="points", points=[[0.3 * w, 0.4 * h], [0.8 * w, 0.2 * h]], labels=[1, 0], box=None, multimask=True),
        dict(name="point", points=[[0.55 * w, 0.6 * h]], labels=[1], box=None, multimask=False),
        dict(name="box", points=None, labels=None, box=[0.1 * w, 0.15 * h, 0.7 * w, 0.9 * h], multimask=True),
        dict(
            name="both",
            points=[[0.45 * w, 0.5 * h], [0.05 * w, 0.95 * h], [0.9 * w, 0.1 * h]],
            labels=[1, 0, 1],
            box=[0.2 * w, 0.1 * h, 0.95 * w, 0.8 * h],
            multimask=True,
        ),
        # A mask prompt: the `points` case's best low-res logits fed back with its points.
        dict(
            name="refine",
            points=[[0.3 * w, 0.4 * h], [0.8 * w, 0.2 * h]],
            labels=[1, 0],
            box=None,
            multimask=False,
            mask_from="points",
        ),
    ]


def draw(name, w, h, seed, out_dir):
    """A subject (a grey disc with a magenta bar) on a green screen with a gradient and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    img[..., 0] = 10 + 60 * x / w
    img[..., 1] = 170 + 40 * y / h
    img[..., 2] = 60
    cx, cy, r = 0.45 * w, 0.55 * h, 0.3 * min(w, h)
    disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
    img[disc] = (150, 140, 130)
    img[disc & (abs(y - cy) < 0.08 * h)] = (200, 30, 160)
    img += rng.normal(0, 6.0, img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), "RGB")
    out.save(os.path.join(out_dir, "image.png"))
    return out


EMBEDDINGS = ("iou_token", "mask_tokens", "not_a_point_embed", "no_mask_embed")


def randomise(model, seed):
    """Draws every parameter again, in name order, so that nothing is zero or one by default."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            n = torch.randn(p.shape, generator=g, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if "layer_norm" in name and leaf == "weight":
                v = 1 + 0.1 * n
            elif leaf == "bias":
                v = 0.1 * n
            elif leaf in ("rel_pos_h", "rel_pos_w", "pos_embed"):
                v = 0.3 * n
            elif leaf == "positional_embedding":
                v = n  # the original SAM's PositionEmbeddingRandom(scale=1)
            elif name.rsplit(".", 2)[-2] in EMBEDDINGS or ".point_embed." in name:
                v = n  # nn.Embedding tables
            elif "upscale_conv" in name:
                v = n / p.shape[0] ** 0.5  # ConvTranspose2d: [in, out, k, k], k = stride
            else:
                v = n / float(np.prod(p.shape[1:])) ** 0.5
            p.copy_(v.to(STORE_DTYPE).to(torch.float32))


def store_weights(model_dir):
    """Rewrites model.safetensors with its float32 tensors as float16 (exact: checked)."""
    path = os.path.join(model_dir, "model.safetensors")
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
    out = {}
    for k, v in load_file(path).items():
        if v.dtype == torch.float32:
            h = v.to(STORE_DTYPE)
            assert torch.equal(h.to(torch.float32), v), f"{k} is not rounded"
            v = h
        out[k] = v
    save_file(out, path, metadata=meta)


def processor_classes():
    """transformers 5's SAM processors: the torchvision one (the default where torchvision is
    installed) and the PIL one."""
    found = {}
    try:
        import torchvision  # noqa: F401  (without it, SamImageProcessor falls back to the PIL one)
        from transformers import SamImageProcessor

        found["SamImageProcessor"] = SamImageProcessor
    except ImportError:
        pass
    from transformers import SamImageProcessorPil

    found["SamImageProcessorPil"] = SamImageProcessorPil
    return found


# `--full DIR`: SlimSAM-uniform-77's shapes at the real 1024 input (random weights, about
# 38 MB; not committed), for tests/it/sam_parity.rs's ignored full-size test.
FULL = dict(
    seed=2,
    image=(640, 427),
    vision=dict(hidden_size=168, mlp_dim=696),
    prompt=dict(),
    decoder=dict(),
    longest_edge=1024,
)


def make(name, spec, out_dir=None):
    out_dir = out_dir or os.path.join(HERE, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    torch.manual_seed(spec["seed"])
    config = SamConfig(
        vision_config=spec["vision"],
        prompt_encoder_config=spec["prompt"],
        mask_decoder_config=spec["decoder"],
    )
    built = SamModel(config).eval()
    randomise(built, 1000 + spec["seed"])
    built.save_pretrained(out_dir, safe_serialization=True)
    store_weights(out_dir)

    classes = processor_classes()
    edge = spec.get("longest_edge", 64)
    kwargs = dict(size={"longest_edge": edge}, pad_size={"height": edge, "width": edge})
    procs = {k: SamProcessor(image_processor=c(**kwargs)) for k, c in classes.items()}
    proc_name = "SamImageProcessor" if "SamImageProcessor" in procs else "SamImageProcessorPil"
    processor = procs[proc_name]
    processor.image_processor.save_pretrained(out_dir)

    model = SamModel.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    for (k, p), (k2, q) in zip(sorted(model.state_dict().items()), sorted(built.state_dict().items())):
        assert k == k2 and p.dtype == torch.float32 and torch.equal(p, q), k

    w, h = spec["image"]
    image = draw(name, w, h, spec["seed"], out_dir)
    tensors = {}
    meta_cases = []
    with torch.no_grad():
        base = processor(images=image, return_tensors="pt")
        pixel_values = base["pixel_values"]
        for other, p in procs.items():
            pv = p(images=image, return_tensors="pt")["pixel_values"]
            diff = (pv - pixel_values).abs().max().item()
            assert diff < 1e-5, f"{other} differs from {proc_name} by {diff}"
        tensors["pixel_values"] = pixel_values.contiguous()
        emb = model.get_image_embeddings(pixel_values)
        tensors["image_embeddings"] = emb.contiguous()
        for case in cases(w, h):
            kw = {}
            if case["points"] is not None:
                kw["input_points"] = [[case["points"]]]
                kw["input_labels"] = [[case["labels"]]]
            if case["box"] is not None:
                kw["input_boxes"] = [[case["box"]]]
            inputs = processor(images=image, return_tensors="pt", **kw)
            assert torch.equal(inputs["pixel_values"], pixel_values)
            input_masks = None
            if case.get("mask_from"):
                src = case["mask_from"]
                best = int(tensors[f"{src}.iou_scores"].flatten().argmax())
                input_masks = tensors[f"{src}.pred_masks"][:, 0, best : best + 1].clone()
                tensors[f"{case['name']}.input_masks"] = input_masks
            out = model(
                pixel_values=inputs["pixel_values"],
                input_points=inputs.get("input_points"),
                input_labels=inputs.get("input_labels"),
                input_boxes=inputs.get("input_boxes"),
                input_masks=input_masks,
                multimask_output=case["multimask"],
            )
            again = model(
                image_embeddings=emb,
                input_points=inputs.get("input_points"),
                input_labels=inputs.get("input_labels"),
                input_boxes=inputs.get("input_boxes"),
                input_masks=input_masks,
                multimask_output=case["multimask"],
            )
            assert torch.allclose(again.pred_masks, out.pred_masks, atol=1e-5)
            masks = processor.post_process_masks(
                out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )[0]
            c = case["name"]
            if case["points"] is not None:
                tensors[f"{c}.input_points"] = inputs["input_points"].to(torch.float64).contiguous()
            if case["box"] is not None:
                tensors[f"{c}.input_boxes"] = inputs["input_boxes"].to(torch.float64).contiguous()
            tensors[f"{c}.pred_masks"] = out.pred_masks.contiguous()
            tensors[f"{c}.iou_scores"] = out.iou_scores.contiguous()
            tensors[f"{c}.masks"] = masks.to(torch.uint8).contiguous()
            meta_cases.append(
                dict(
                    case,
                    mask_fraction=[round(float(m.float().mean()), 4) for m in masks[0]],
                    iou_scores=[round(float(v), 6) for v in out.iou_scores.flatten()],
                )
            )
        reshaped = [int(v) for v in base["reshaped_input_sizes"][0]]
    golden = os.path.join(out_dir, "golden.safetensors")
    save_file(tensors, golden)
    with safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as fh:
        names = sorted(fh.keys())
    info = dict(
        image=dict(width=w, height=h, reshaped_hw=reshaped),
        processor=proc_name,
        processors_compared=sorted(procs),
        attn_implementation="eager",
        cases=meta_cases,
        config=dict(vision=spec["vision"], prompt=spec["prompt"], decoder=spec["decoder"]),
        tied_positional_embedding=[n for n in names if n.endswith("positional_embedding")],
        sizes={f: os.path.getsize(os.path.join(out_dir, f)) for f in sorted(os.listdir(out_dir))},
        golden_sha256=hashlib.sha256(open(golden, "rb").read()).hexdigest(),
        versions=dict(
            torch=torch.__version__,
            transformers=transformers.__version__,
            safetensors=safetensors.__version__,
            numpy=np.__version__,
            pillow=PIL.__version__,
        ),
    )
    with open(os.path.join(out_dir, "golden.json"), "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    print(name, info["sizes"], [c["mask_fraction"] for c in meta_cases])


def main():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--full", help="write only the full-size SlimSAM-77-shaped check into this folder")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if args.full:
        make("full", FULL, os.path.abspath(args.full))
        return
    for name, spec in VARIANTS.items():
        make(name, spec)


if __name__ == "__main__":
    main()
