#!/usr/bin/env python3
"""SDXL refiner goldens: diffusers' StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline with
`requires_aesthetics_score=True` on a tiny refiner-shaped model made here (sdxl_refiner/model/): no `text_encoder`,
only `text_encoder_2` (the real stabilityai/stable-diffusion-xl-refiner-1.0 layout), and a UNet whose added
embedding takes 5 time ids (original size, crop, aesthetic score) instead of 6.

Writes, next to this file:
  sdxl_refiner/model/          the tiny refiner (text_encoder_2, tokenizer_2, vae, scheduler copied from ../sdxl/a)
  sdxl_refiner.safetensors     per case `<case>.final` (f32 latents) and `<case>.image` (u8 decode)
  refiner_cases.json           every case's settings and the time ids the UNet saw

Every case is one real pipeline call with generator=torch.Generator("cpu").manual_seed(seed), output_type="latent".
The time ids are captured by wrapping the UNet's forward; nothing is re-implemented.

Usage: /work/pyenv/bin/python tests/golden/insertion/make_refiner_golden.py   (about 20 s; needs photo_64x64.png and
mask_64x64.png from make_golden.py)
"""
import importlib.util
import json
import os
import shutil
import sys

sys.dont_write_bytecode = True
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)
BASE = os.path.join(GOLDEN, "sdxl/a/model")
OUT = os.path.join(HERE, "sdxl_refiner/model")
STEPS = 10
UNET_SEED = 102

# name, pipeline, strength, aesthetic score, negative aesthetic score, negative prompt, crop top-left
CASES = [
    ("i2i_ddim_s050", "img2img", 0.5, None, None, "blurry, low quality, watermark", (0, 0)),
    ("i2i_ddim_s030_scores", "img2img", 0.3, 7.5, 1.5, "blurry, low quality, watermark", (0, 0)),
    ("i2i_ddim_s050_empty_neg_crop", "img2img", 0.5, None, None, "", (8, 16)),
    ("inp_ddim_s075", "inpaint", 0.75, None, None, "blurry, low quality, watermark", (0, 0)),
]
PROMPT = "a cozy cabin in snowy woods, golden hour"
SEED = 42


def _import(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(GOLDEN, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_refiner(sd15, sdxl):
    from diffusers import UNet2DConditionModel
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    for sub in ("text_encoder_2", "tokenizer_2", "vae", "scheduler"):
        shutil.copytree(os.path.join(BASE, sub), os.path.join(OUT, sub))
    te2 = json.load(open(os.path.join(BASE, "text_encoder_2/config.json")))
    ucfg = dict(UNet2DConditionModel.load_config(os.path.join(BASE, "unet")))
    ucfg["cross_attention_dim"] = te2["hidden_size"]
    ucfg["projection_class_embeddings_input_dim"] = 5 * ucfg["addition_time_embed_dim"] + te2["projection_dim"]
    torch.manual_seed(UNET_SEED)
    unet = UNet2DConditionModel.from_config(ucfg).eval()
    sdxl.perturb_constant_tensors(unet, UNET_SEED)
    sd15.round_to_store_dtype(unet)
    unet.save_pretrained(os.path.join(OUT, "unet"), safe_serialization=True)
    sd15.store_weights(os.path.join(OUT, "unet"))
    # The real refiner's model_index.json: no first text encoder, aesthetic scores, no zeroed negative.
    mi = json.load(open(os.path.join(BASE, "model_index.json")))
    mi.update({"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": [None, None],
               "tokenizer": [None, None], "requires_aesthetics_score": True,
               "force_zeros_for_empty_prompt": False})
    with open(os.path.join(OUT, "model_index.json"), "w") as fh:
        fh.write(json.dumps(mi, indent=2, sort_keys=True) + "\n")
    return ucfg


def main():
    import diffusers
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    sd15 = _import("sd15_make_golden", "sd15/make_golden.py")
    sdxl = _import("sdxl_make_golden", "sdxl/make_golden.py")
    ucfg = build_refiner(sd15, sdxl)

    tensors, cases = {}, []
    for name, kind, strength, score, neg_score, negative, crop in CASES:
        klass = diffusers.StableDiffusionXLInpaintPipeline if kind == "inpaint" else \
            diffusers.StableDiffusionXLImg2ImgPipeline
        pipe = klass.from_pretrained(OUT, torch_dtype=torch.float32)
        assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
        pipe.set_progress_bar_config(disable=True)
        seen = []
        fwd = pipe.unet.forward

        def logged(*a, _fwd=fwd, **k):
            seen.append(k["added_cond_kwargs"]["time_ids"].clone())
            return _fwd(*a, **k)

        pipe.unet.forward = logged
        kwargs = dict(prompt=PROMPT, negative_prompt=negative, image=Image.open(os.path.join(HERE, "photo_64x64.png")),
                      strength=strength, num_inference_steps=STEPS, guidance_scale=7.5, output_type="latent",
                      crops_coords_top_left=crop)
        if score is not None:
            kwargs.update(aesthetic_score=score, negative_aesthetic_score=neg_score)
        if kind == "inpaint":
            kwargs.update(mask_image=Image.open(os.path.join(HERE, "mask_64x64.png")), height=64, width=64)
        g = torch.Generator("cpu").manual_seed(SEED)
        with torch.no_grad():
            final = pipe(**kwargs, generator=g).images.contiguous()
            decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = ((decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0] * 255).round().to(torch.uint8)
        ids = seen[0]
        assert all(torch.equal(s, ids) for s in seen) and ids.shape == (2, 5), ids
        tensors[f"{name}.final"] = final
        tensors[f"{name}.image"] = image.contiguous()
        cases.append({"case": name, "pipeline": klass.__name__, "scheduler": "DDIMScheduler", "steps": STEPS,
                      "strength": strength, "guidance": 7.5, "seed": SEED, "prompt": PROMPT,
                      "negative_prompt": negative, "aesthetic_score": score, "negative_aesthetic_score": neg_score,
                      "crops_coords_top_left": list(crop), "mask": "mask_64x64.png" if kind == "inpaint" else None,
                      "photo": "photo_64x64.png", "time_ids_rows": ids.tolist(),
                      "unet_calls": len(seen)})
    save_file(tensors, os.path.join(HERE, "sdxl_refiner.safetensors"))
    doc = {"model": "tests/golden/insertion/sdxl_refiner/model",
           "made": "text_encoder_2, tokenizer_2, vae, scheduler copied from tests/golden/sdxl/a/model; unet = that "
                   "unet's config with cross_attention_dim = text_encoder_2 hidden_size and "
                   "projection_class_embeddings_input_dim = 5 * addition_time_embed_dim + projection_dim, "
                   f"torch.manual_seed({UNET_SEED}), default init, sdxl/make_golden.py perturb_constant_tensors, "
                   "rounded to float16 and stored as float16",
           "unet": {k: ucfg[k] for k in ("cross_attention_dim", "projection_class_embeddings_input_dim",
                                         "addition_time_embed_dim")},
           "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": np.__version__},
           "cases": cases}
    with open(os.path.join(HERE, "refiner_cases.json"), "w") as fh:
        fh.write(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
