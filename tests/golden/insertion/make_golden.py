#!/usr/bin/env python3
"""img2img and inpainting goldens: diffusers' StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
StableDiffusionXLImg2ImgPipeline and StableDiffusionXLInpaintPipeline on the tiny golden models (../sd15/a,
../sd15/b, ../sdxl/a) and on two tiny 9-channel inpainting models made here (sd15_inpaint/, sdxl_inpaint/).

Writes, next to this file:
  photo_WxH.png, mask_WxH.png, mask_2x_WxH.png   the inputs (made here, no random numbers)
  sd15_inpaint/model/, sdxl_inpaint/model/         9-channel inpainting models (UNet new, the rest copied)
  <model>.safetensors                              per case `<case>.final`, `<case>.image` and stage tensors
                                                   (each distinct tensor stored once: see cases.json)
  cases.json                                       every case: settings, inputs, timesteps run, generator draws,
                                                   and per tensor the safetensors key that holds it

Every case is one real pipeline call with `generator=torch.Generator("cpu").manual_seed(seed)` and
output_type="latent"; the stage tensors are captured by wrapping pipeline and scheduler methods (nothing is
re-implemented). The generator draws are logged by wrapping `randn_tensor` where diffusers calls it and are
checked by replaying them on a fresh generator (the draws and the generator's final state must match).

Usage: /work/pyenv/bin/python tests/golden/insertion/make_golden.py [--no-pil-check]
Needs no network; deterministic (CPU, float32, one thread). See README.md.
"""
import argparse
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import time

sys.dont_write_bytecode = True  # do not leave __pycache__ in tests/golden
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)
REL = "tests/golden/insertion"


def _import(name, rel):
    spec = importlib.util.spec_from_file_location(name, os.path.join(GOLDEN, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
STEPS = 10
GUIDANCE = 7.5
DPM_KARRAS = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}

# model name -> folder (relative to tests/golden), golden json with prompt/seed/size, family, kind
MODELS = {
    "sd15_a": dict(folder="sd15/a/model", meta="sd15/a/golden.json", sdxl=False, unet_in=4),
    "sd15_b": dict(folder="sd15/b/model", meta="sd15/b/golden.json", sdxl=False, unet_in=4),
    "sdxl_a": dict(folder="sdxl/a/model", meta="sdxl/a/golden_neg.json", sdxl=True, unet_in=4),
    "sd15_inpaint": dict(folder="insertion/sd15_inpaint/model", meta="sd15/a/golden.json", sdxl=False, unet_in=9,
                         base="sd15/a/model", unet_seed=100),
    "sdxl_inpaint": dict(folder="insertion/sdxl_inpaint/model", meta="sdxl/a/golden_neg.json", sdxl=True, unet_in=9,
                         base="sdxl/a/model", unet_seed=101),
}

# case, scheduler class, config overrides, strength, mask input ("mask" or "mask_2x"; None for img2img)
IMG2IMG_CASES = [
    ("i2i_ddim_s035", "DDIMScheduler", {}, 0.35, None),
    ("i2i_ddim_s060", "DDIMScheduler", {}, 0.6, None),
    ("i2i_euler_a_s050", "EulerAncestralDiscreteScheduler", {}, 0.5, None),
    ("i2i_dpmpp_2m_karras_s050", "DPMSolverMultistepScheduler", DPM_KARRAS, 0.5, None),
]
INPAINT_CASES = [
    ("inp_ddim_s075", "DDIMScheduler", {}, 0.75, "mask"),
    ("inp_ddim_s100", "DDIMScheduler", {}, 1.0, "mask"),
    ("inp_ddim_s075_mask2x", "DDIMScheduler", {}, 0.75, "mask_2x"),
    ("inp_euler_a_s080", "EulerAncestralDiscreteScheduler", {}, 0.8, "mask"),
]
INPAINT9_CASES = [
    ("inp9_ddim_s100", "DDIMScheduler", {}, 1.0, "mask"),
    ("inp9_ddim_s075", "DDIMScheduler", {}, 0.75, "mask"),
]

# white (= repaint) rectangles, (x0, y0, x1, y1) half-open, every edge on a multiple of 8 px
MASK_RECTS = {
    (64, 64): [(16, 8, 40, 32), (40, 40, 56, 56)],
    (64, 48): [(16, 8, 40, 24), (40, 32, 56, 40)],
}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def make_photo(W, H):
    """Smooth gradients plus three solid shapes (disc, rectangle, triangle); no random numbers."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    u, v = x / (W - 1), y / (H - 1)
    img = np.empty((H, W, 3), np.float64)
    img[..., 0] = 40 + 180 * u
    img[..., 1] = 30 + 170 * v
    img[..., 2] = 60 + 140 * np.clip(np.sqrt((u - 0.7) ** 2 + (v - 0.3) ** 2) / 0.9, 0, 1)
    disc = (x - 0.3 * W) ** 2 + (y - 0.35 * H) ** 2 <= (0.18 * min(W, H)) ** 2
    img[disc] = (230, 40, 40)
    rect = (x >= 0.55 * W) & (x < 0.85 * W) & (y >= 0.6 * H) & (y < 0.9 * H)
    img[rect] = (20, 60, 140)
    tri = (y >= 0.55 * H) & (y < 0.95 * H) & (np.abs(x - 0.25 * W) <= (y - 0.55 * H) * 0.5)
    img[tri] = (250, 220, 30)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_mask(W, H):
    m = np.zeros((H, W), np.uint8)
    for x0, y0, x1, y1 in MASK_RECTS[(W, H)]:
        assert all(c % 8 == 0 for c in (x0, y0, x1, y1))
        m[y0:y1, x0:x1] = 255
    return m


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def write_inputs(sizes):
    from PIL import Image
    info = {}
    for W, H in sizes:
        photo, mask = make_photo(W, H), make_mask(W, H)
        mask2 = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1)
        for stem, arr, mode in (("photo", photo, "RGB"), ("mask", mask, "L"), ("mask_2x", mask2, "L")):
            fn = f"{stem}_{W}x{H}.png"
            Image.fromarray(arr, mode).save(os.path.join(HERE, fn), format="PNG")
            back = np.array(Image.open(os.path.join(HERE, fn)))
            assert back.dtype == np.uint8 and np.array_equal(back, arr), fn
            info[fn] = {"mode": mode, "width": arr.shape[1], "height": arr.shape[0],
                        "bytes": os.path.getsize(os.path.join(HERE, fn)), "sha256": sha256(os.path.join(HERE, fn))}
            if stem != "photo":
                f = arr.shape[1] // W
                info[fn]["white_rects_xyxy"] = [[c * f for c in r] for r in MASK_RECTS[(W, H)]]
        # what PIL's Lanczos makes of the 2x mask at W x H, before binarisation
        m2 = np.array(Image.open(os.path.join(HERE, f"mask_2x_{W}x{H}.png")).resize((W, H), Image.LANCZOS))
        info[f"mask_2x_{W}x{H}.png"]["lanczos_to_WxH"] = {
            "values_not_0_or_255": int(((m2 != 0) & (m2 != 255)).sum()),
            "min_where_mask_white": int(m2[mask == 255].min()), "max_where_mask_black": int(m2[mask == 0].max()),
            "binarised_equals_mask": bool(np.array_equal((m2.astype(np.float32) / 255 >= 0.5), mask == 255)),
        }
        assert info[f"mask_2x_{W}x{H}.png"]["lanczos_to_WxH"]["binarised_equals_mask"]
    return info


# --------------------------------------------------------------------------------------------
# 9-channel inpainting models
# --------------------------------------------------------------------------------------------
def build_inpaint_model(name, cfg, sd15, sdxl):
    """Copies every component of the base model but the UNet, and makes a new UNet: the base UNet's config
    with in_channels=9, default init under torch.manual_seed(unet_seed) (SDXL: plus the sdxl script's
    perturbation of constant tensors), rounded to float16 values and stored as float16 (as ../sd15 does)."""
    from diffusers import UNet2DConditionModel
    base = os.path.join(GOLDEN, cfg["base"])
    out = os.path.join(GOLDEN, cfg["folder"])
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    for sub in sorted(os.listdir(base)):
        if sub == "unet":
            continue
        src = os.path.join(base, sub)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(out, sub))
    # model_index.json: the base's, with the class name real inpainting repos carry
    # (stable-diffusion-v1-5/stable-diffusion-inpainting, diffusers/stable-diffusion-xl-1.0-inpainting-0.1)
    mi = json.load(open(os.path.join(base, "model_index.json")))
    mi["_class_name"] = "StableDiffusionXLInpaintPipeline" if cfg["sdxl"] else "StableDiffusionInpaintPipeline"
    with open(os.path.join(out, "model_index.json"), "w") as fh:
        fh.write(json.dumps(mi, indent=2, sort_keys=True) + "\n")

    ucfg = dict(UNet2DConditionModel.load_config(os.path.join(base, "unet")))
    assert ucfg["in_channels"] == 4
    ucfg["in_channels"] = 9
    torch.manual_seed(cfg["unet_seed"])
    unet = UNet2DConditionModel.from_config(ucfg).eval()
    perturbed = []
    if cfg["sdxl"]:
        perturbed = sdxl.perturb_constant_tensors(unet, cfg["unet_seed"])
    sd15.round_to_store_dtype(unet)
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    sd15.store_weights(os.path.join(out, "unet"))

    # checks: the copied files are byte-identical, the UNet config differs only in in_channels
    for root, _, files in os.walk(base):
        rel = os.path.relpath(root, base)
        if rel.split(os.sep)[0] == "unet":
            continue
        for fn in files:
            if rel == "." and fn == "model_index.json":
                continue
            assert sha256(os.path.join(root, fn)) == sha256(os.path.join(out, rel, fn)), (rel, fn)
    a = json.load(open(os.path.join(base, "unet", "config.json")))
    b = json.load(open(os.path.join(out, "unet", "config.json")))
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {"in_channels"}, (a, b)
    return {k: v.clone() for k, v in unet.state_dict().items()}, perturbed


# --------------------------------------------------------------------------------------------
# Instrumentation
# --------------------------------------------------------------------------------------------
class Rec:
    def __init__(self):
        self.reset()

    def reset(self):
        self.ctx = None      # "image" / "masked image" while the pipeline encodes one of them
        self.draws = []      # (what, shape, tensor) per generator draw, in order
        self.calls = {}      # wrapped pipeline method -> list of outputs
        self.encodes = []    # (ctx, scaled latents) per _encode_vae_image call
        self.steps = []      # (timestep, sample entering step, got generator) per scheduler.step call
        self.add_noise = []  # (original_samples, noise, timesteps, out) per scheduler.add_noise call


REC = Rec()

RANDN_SITES = {
    "diffusers.models.autoencoders.vae": "vae posterior sample",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img": "noise",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint": "noise",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img": "noise",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint": "noise",
    "diffusers.schedulers.scheduling_ddim": "step noise",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete": "step noise",
    "diffusers.schedulers.scheduling_dpmsolver_multistep": "step noise",
}


def patch_randn():
    from diffusers.utils import torch_utils
    orig = torch_utils.randn_tensor
    for modname, what in RANDN_SITES.items():
        mod = importlib.import_module(modname)
        assert mod.randn_tensor is orig, modname

        def logged(shape, generator=None, device=None, dtype=None, layout=None, _what=what):
            out = orig(shape, generator=generator, device=device, dtype=dtype, layout=layout)
            label = _what
            if _what == "vae posterior sample":
                assert REC.ctx in ("image", "masked image"), REC.ctx
                label = f"{_what} ({REC.ctx})"
            assert isinstance(generator, torch.Generator), (label, generator)
            REC.draws.append((label, tuple(int(s) for s in shape), out.clone()))
            return out

        mod.randn_tensor = logged


def wrap_method(obj, name, ctx):
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def w(*a, **k):
        prev = REC.ctx
        if ctx is not None:
            REC.ctx = ctx
        try:
            out = fn(*a, **k)
        finally:
            REC.ctx = prev
        if name == "_encode_vae_image":
            REC.encodes.append((REC.ctx, out.clone()))
        else:
            REC.calls.setdefault(name, []).append(tuple(t.clone() if isinstance(t, torch.Tensor) else t
                                                        for t in (out if isinstance(out, tuple) else (out,))))
        return out

    setattr(obj, name, w)


def instrument_pipeline(pipe, inpaint):
    wrap_method(pipe, "prepare_latents", "image")
    if inpaint:
        wrap_method(pipe, "prepare_mask_latents", "masked image")
        wrap_method(pipe, "_encode_vae_image", None)


def instrument_scheduler(sch):
    step, add_noise = sch.step, sch.add_noise

    # functools.wraps keeps the signature visible (inspect follows __wrapped__): the pipelines look at it to
    # decide whether to pass `generator` and `eta` to step
    @functools.wraps(step)
    def w_step(model_output, timestep, sample, *a, **k):
        REC.steps.append((timestep, sample.clone(), k.get("generator") is not None))
        return step(model_output, timestep, sample, *a, **k)

    @functools.wraps(add_noise)
    def w_add_noise(original_samples, noise, timesteps):
        out = add_noise(original_samples, noise, timesteps)
        REC.add_noise.append((original_samples.clone(), noise.clone(), timesteps.clone(), out.clone()))
        return out

    sch.step, sch.add_noise = w_step, w_add_noise


def compress(labels):
    out = []
    for lab in labels:
        if out and out[-1][0] == lab:
            out[-1][1] += 1
        else:
            out.append([lab, 1])
    return [lab if n == 1 else f"{lab} x{n}" for lab, n in out]


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
def pipeline_class(sdxl, inpaint):
    import diffusers
    if sdxl:
        return diffusers.StableDiffusionXLInpaintPipeline if inpaint else diffusers.StableDiffusionXLImg2ImgPipeline
    return diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionImg2ImgPipeline


def decode(pipe, final):
    with torch.no_grad():
        decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
    x = (decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()[0]
    return (x * 255).round().astype("uint8")


def first_half(t, what):
    a, b = t.chunk(2)
    assert torch.equal(a, b), f"{what}: the CFG halves differ"
    return a.contiguous()


def run_case(model, mcfg, meta, pipe, base_config, case, klass, overrides, strength, mask_kind, pil_check):
    import diffusers
    from PIL import Image
    W, H, seed = meta["width"], meta["height"], meta["seed"]
    inpaint = mask_kind is not None
    photo_fn = f"photo_{W}x{H}.png"
    mask_fn = None if not inpaint else f"{mask_kind}_{W}x{H}.png"

    def call(output_type):
        sch = getattr(diffusers, klass).from_config({**base_config, **overrides})
        instrument_scheduler(sch)
        pipe.scheduler = sch
        kwargs = dict(prompt=meta["prompt"], negative_prompt=meta["negative_prompt"],
                      image=Image.open(os.path.join(HERE, photo_fn)), strength=strength,
                      num_inference_steps=STEPS, guidance_scale=GUIDANCE, num_images_per_prompt=1,
                      output_type=output_type)
        if inpaint:
            kwargs.update(mask_image=Image.open(os.path.join(HERE, mask_fn)), height=H, width=W)
        if mcfg["sdxl"]:
            m = meta["micro_conditioning"]
            kwargs.update(original_size=tuple(m["original_size"]), crops_coords_top_left=tuple(m["crops_coords_top_left"]),
                          target_size=tuple(m["target_size"]))
        REC.reset()
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            images = pipe(**kwargs, generator=g).images
        return images, g, sch

    final_raw, g, sch = call("latent")
    assert isinstance(final_raw, torch.Tensor) and final_raw.dtype == torch.float32
    # the pipeline's latents are often channels_last-strided (VaeImageProcessor.numpy_to_pt returns a permuted
    # view, and the VAE/elementwise ops keep that layout); the decode must see the tensor as returned, as the
    # pipeline's own decode does: a contiguous copy makes torch pick other conv kernels (1e-6 level)
    layout = "channels_last" if final_raw.is_contiguous(memory_format=torch.channels_last) and \
        not final_raw.is_contiguous() else "contiguous"
    final = final_raw.contiguous()
    draws, steps, add_noise, calls, encodes = REC.draws, REC.steps, REC.add_noise, REC.calls, REC.encodes

    # the draws are consecutive from the seed and nothing else touched the generator
    g2 = torch.Generator("cpu").manual_seed(seed)
    for label, shape, t in draws:
        assert torch.equal(torch.randn(shape, generator=g2, dtype=torch.float32), t), (case, label)
    assert torch.equal(g2.get_state(), g.get_state()), f"{case}: the generator was drawn from elsewhere too"

    image = decode(pipe, final_raw)
    if pil_check:
        pil, _, _ = call("pil")
        assert np.array_equal(np.array(pil[0]), image), f"{case}: decode rule != the pipeline's PIL image"

    t_run = [t for t, _, _ in steps]
    assert len(t_run) == int(STEPS * strength) and len(t_run) >= 1
    assert torch.equal(torch.stack([torch.as_tensor(t) for t in t_run]), sch.timesteps[STEPS - len(t_run):])
    assert all(gen for _, _, gen in steps) == ("generator" in inspect.signature(sch.step).parameters)
    start = steps[0][1].contiguous()
    (lat_out,) = calls["prepare_latents"]
    t0 = t_run[0]

    tensors = {"final": final, "image": torch.from_numpy(image.copy()), "start": start}
    notes = {}
    if not inpaint:
        assert len(lat_out) == 1 and torch.equal(lat_out[0], start)
        assert len(add_noise) == 1, f"{case}: img2img calls add_noise once"
        orig, noise, ts, out = add_noise[0]
        assert torch.equal(out, start) and ts.tolist() == [t0.item()]
        tensors.update(image_latents=orig.contiguous(), noise=noise.contiguous())
        notes["image_latents"] = "scheduler.add_noise's original_samples in prepare_latents: scaling_factor * posterior sample"
        notes["noise"] = "scheduler.add_noise's noise in prepare_latents"
        notes["start"] = "prepare_latents' output = add_noise(image_latents, noise, timesteps[0]); the first scheduler.step's sample"
    else:
        unet9 = pipe.unet.config.in_channels == 9
        latents, noise = lat_out[0], lat_out[1]
        assert torch.equal(latents, start)
        (mask_out,) = calls["prepare_mask_latents"]
        mask_lat = first_half(mask_out[0], "mask")
        masked_lat = first_half(mask_out[1], "masked_image_latents")
        enc_img = [e for c, e in encodes if c == "image"]
        enc_masked = [e for c, e in encodes if c == "masked image"]
        assert len(enc_masked) == 1 and torch.equal(enc_masked[0], masked_lat)
        if not unet9:
            assert len(lat_out) == 3 and len(enc_img) == 1 and torch.equal(enc_img[0], lat_out[2])
        else:
            assert len(lat_out) == 2 and len(enc_img) == (0 if strength == 1.0 else 1)
        if strength == 1.0:
            assert torch.equal(start, noise * sch.init_noise_sigma)
        else:
            assert torch.equal(add_noise[0][3], start)
        # 4-channel: add_noise(image_latents, noise, t_{i+1}) after every step but the last
        assert len(add_noise) == (0 if unet9 else len(t_run) - 1) + (0 if strength == 1.0 else 1)
        tensors.update(noise=noise.contiguous(), mask_latents=mask_lat, masked_image_latents=masked_lat)
        if enc_img:
            tensors["image_latents"] = enc_img[0].contiguous()
            notes["image_latents"] = "the pipeline's _encode_vae_image(init_image): scaling_factor * posterior sample"
        else:
            notes["image_latents"] = ("absent: a 9-channel UNet at strength 1.0 never encodes the image "
                                      "(prepare_latents has return_image_latents False and is_strength_max True)")
        notes["noise"] = "prepare_latents' noise (return_noise=True)"
        notes["start"] = ("noise * scheduler.init_noise_sigma (strength 1.0)" if strength == 1.0 else
                          "add_noise(image_latents, noise, timesteps[0])") + "; the first scheduler.step's sample"
        notes["mask_latents"] = "prepare_mask_latents' mask (first CFG half; both halves checked equal), [1,1,h,w]"
        notes["masked_image_latents"] = "prepare_mask_latents' masked_image_latents (first CFG half), [1,4,h,w]"
    for k, v in tensors.items():
        assert torch.isfinite(v.double()).all() if v.is_floating_point() else True, (case, k)

    labels = [lab for lab, _, _ in draws]
    doc = {
        "model": model,
        "folder": "tests/golden/" + mcfg["folder"],
        "pipeline": type(pipe).__name__,
        "unet_in_channels": pipe.unet.config.in_channels,
        "scheduler": klass,
        "scheduler_overrides": overrides,
        "scheduler_base": "the model folder's scheduler_config.json (DDIM), via from_config({**base, **overrides})",
        "steps": STEPS,
        "strength": strength,
        "init_timestep": f"min(int({STEPS} * {strength}), {STEPS}) = {min(int(STEPS * strength), STEPS)}",
        "t_start": STEPS - len(t_run),
        "begin_index": getattr(sch, "begin_index", None),
        "steps_run": len(t_run),
        "guidance": GUIDANCE,
        "eta": 0.0,
        "seed": seed,
        "generator": f"torch.Generator('cpu').manual_seed({seed}), passed as generator=",
        "prompt": meta["prompt"],
        "negative_prompt": meta["negative_prompt"],
        "width": W,
        "height": H,
        "inputs": {"image": photo_fn, **({"mask_image": mask_fn} if inpaint else {})},
        "timesteps_run": [float(t) for t in t_run],
        "schedule": [float(t) for t in sch.timesteps],
        "init_noise_sigma": float(sch.init_noise_sigma),
        "final_memory_format": layout,
        "start_from": ("pure noise * init_noise_sigma" if inpaint and strength == 1.0 else
                       f"add_noise(image_latents, noise, {float(t0)})"),
        "generator_draws": compress(labels),
        "generator_draws_detail": [{"what": lab, "shape": list(s)} for lab, s, _ in draws],
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()},
        "tensor_notes": notes,
    }
    if mcfg["sdxl"]:
        m = meta["micro_conditioning"]
        doc["micro_conditioning"] = {"original_size": m["original_size"], "crops_coords_top_left": m["crops_coords_top_left"],
                                     "target_size": m["target_size"]}
        doc["requires_aesthetics_score"] = bool(pipe.config.requires_aesthetics_score)
        doc["aesthetic_score"] = "pipeline defaults (6.0 / 2.5), unused while requires_aesthetics_score is false"
    if inpaint and pipe.unet.config.in_channels == 4:
        doc["blend"] = ("after each step i: latents = (1 - mask) * add_noise(image_latents, noise, timesteps[i+1]) "
                        "+ mask * latents; after the last step the un-noised image_latents")
    return tensors, doc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-pil-check", action="store_true",
                    help="skip the second pipeline call per case that checks the decode rule against the PIL output")
    args = ap.parse_args()
    t_begin = time.time()

    import diffusers
    import PIL
    import safetensors
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    sd15 = _import("sd15_make_golden", "sd15/make_golden.py")
    sdxl = _import("sdxl_make_golden", "sdxl/make_golden.py")
    patch_randn()

    metas = {m: json.load(open(os.path.join(GOLDEN, c["meta"]))) for m, c in MODELS.items()}
    sizes = sorted({(mt["width"], mt["height"]) for mt in metas.values()}, reverse=True)
    inputs = write_inputs(sizes)

    model_docs = {}
    built = {}
    for m, c in MODELS.items():
        if "base" in c:
            built[m], perturbed = build_inpaint_model(m, c, sd15, sdxl)
            model_docs[m] = {"folder": "tests/golden/" + c["folder"], "base": "tests/golden/" + c["base"],
                             "made": ("copy of the base folder except unet/; model_index.json _class_name set to "
                                      f"{'StableDiffusionXLInpaintPipeline' if c['sdxl'] else 'StableDiffusionInpaintPipeline'}; "
                                      "unet = base unet config with in_channels 9, torch.manual_seed(unet_seed), "
                                      "default init" + (", constant tensors + 0.1*N(0,1) (sdxl/make_golden.py "
                                                        "perturb_constant_tensors, generator seed unet_seed)"
                                                        if c["sdxl"] else "") +
                                      ", rounded to float16 and stored as float16"),
                             "unet_seed": c["unet_seed"], "perturbed_unet_parameters": len(perturbed)}
        else:
            model_docs[m] = {"folder": "tests/golden/" + c["folder"]}

    cases = []
    for m, c in MODELS.items():
        meta = metas[m]
        d = os.path.join(GOLDEN, c["folder"])
        groups = [(False, IMG2IMG_CASES), (True, INPAINT_CASES)] if c["unet_in"] == 4 else [(True, INPAINT9_CASES)]
        out = {}
        for inpaint, case_list in groups:
            cls = pipeline_class(c["sdxl"], inpaint)
            pipe = cls.from_pretrained(d, torch_dtype=torch.float32)
            pipe.set_progress_bar_config(disable=True)
            assert pipe.unet.config.in_channels == c["unet_in"]
            if c["sdxl"]:
                assert pipe.watermark is None
            else:
                assert pipe.safety_checker is None
            assert all(v.dtype in (torch.float32, torch.int64) for comp in ("unet", "vae", "text_encoder")
                       for v in getattr(pipe, comp).state_dict().values())
            if m in built:
                sd = pipe.unet.state_dict()
                assert sd.keys() == built[m].keys() and all(torch.equal(sd[k], built[m][k]) for k in sd), m
            base_config = dict(pipe.scheduler.config)
            # the preprocessing the Rust side has to match: exact for these inputs
            if inpaint:
                W, H = meta["width"], meta["height"]
                want = torch.from_numpy((make_mask(W, H) >= 128).astype(np.float32))[None, None]
                for mk in ("mask", "mask_2x"):
                    mc = pipe.mask_processor.preprocess(PIL.Image.open(os.path.join(HERE, f"{mk}_{W}x{H}.png")),
                                                        height=H, width=W)
                    assert torch.equal(mc, want), mk
            photo = make_photo(meta["width"], meta["height"])
            pre = pipe.image_processor.preprocess(PIL.Image.open(os.path.join(HERE, f"photo_{meta['width']}x{meta['height']}.png")))
            assert torch.equal(pre, 2.0 * torch.from_numpy(photo.astype(np.float32) / 255.0).permute(2, 0, 1)[None] - 1.0)
            instrument_pipeline(pipe, inpaint)
            for case, klass, overrides, strength, mask_kind in case_list:
                tensors, doc = run_case(m, c, meta, pipe, base_config, case, klass, overrides, strength, mask_kind,
                                        not args.no_pil_check)
                # a tensor bit-identical to the same stage tensor of an earlier case of this model (the same seed
                # gives the same first draws) is stored once; doc["tensors"][name]["key"] names the key to read
                for k, v in tensors.items():
                    key = f"{case}.{k}"
                    for other, ov in out.items():
                        if other.split(".", 1)[1] == k and ov.dtype == v.dtype and ov.shape == v.shape \
                                and torch.equal(ov, v):
                            key = other
                            break
                    else:
                        out[key] = v
                    doc["tensors"][k]["key"] = key
                cases.append({"case": case, **doc})
                print(f"{m} {case}: {doc['steps_run']} steps, draws {doc['generator_draws']}, "
                      f"|final| mean {tensors['final'].abs().mean():.4f}", flush=True)
            del pipe
        if any(cd["case"] == "inp_ddim_s075_mask2x" and cd["model"] == m for cd in cases):
            (c2,) = [cd for cd in cases if cd["case"] == "inp_ddim_s075_mask2x" and cd["model"] == m]
            assert c2["tensors"]["final"]["key"] == "inp_ddim_s075.final", f"{m}: the 2x mask must give the same result"
        path = os.path.join(HERE, f"{m}.safetensors")
        save_file(out, path, metadata={"generator": f"{REL}/make_golden.py"})
        model_docs[m]["golden"] = os.path.basename(path)
        model_docs[m]["golden_tensors"] = len(out)
        model_docs[m]["golden_bytes"] = os.path.getsize(path)
        model_docs[m]["golden_sha256"] = sha256(path)
        if "base" in c:
            model_docs[m]["unet_sha256"] = sha256(os.path.join(GOLDEN, c["folder"], "unet", "diffusion_pytorch_model.safetensors"))
            model_docs[m]["model_bytes"] = sum(os.path.getsize(os.path.join(r, f))
                                               for r, _, fs in os.walk(os.path.join(GOLDEN, c["folder"])) for f in fs)

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "safetensors": safetensors.__version__,
                "numpy": np.__version__, "PIL": PIL.__version__}
    doc = {"versions": versions, "settings": {"steps": STEPS, "guidance": GUIDANCE, "dtype": "float32, CPU, 1 thread, "
                                               "deterministic algorithms"},
           "inputs": inputs, "models": model_docs, "cases": cases}
    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"{len(cases)} cases in {time.time() - t_begin:.1f} s")


if __name__ == "__main__":
    main()
