#!/usr/bin/env python3
"""Golden reference files for the SD1.5-family pipeline (DDIM + classifier-free guidance) with
TKG-DM initial noise, made with diffusers on two tiny random-weight models.

For each variant (a, b) this writes, next to this file:
  <variant>/model/             the diffusers folder (pipe.save_pretrained, safetensors)
  <variant>/golden.safetensors reference tensors (see ../README.md)
  <variant>/golden.json        settings, timesteps, tensor list, versions

All goldens are computed by the pipeline re-loaded from <variant>/model/, so they belong to the
files on disk, not to the in-memory models that were saved.

Usage:
  /work/pyenv/bin/python tests/golden/sd15/make_golden.py [--tkg-repo PATH] [--variants a b]

--tkg-repo is the path to ryugo417/TKG-DM (a checkout or a bare git dir); its utils.py is used
for the TKG-DM initial latent (see ../tkg/make_golden.py, which this script imports).
"""
import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile

import numpy as np
sys.dont_write_bytecode = True  # do not leave __pycache__ in tests/golden
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)
CLIP_BPE = "/work/pyenv/lib/python3.11/site-packages/open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 1000


def _import_tkg_helpers():
    spec = importlib.util.spec_from_file_location("tkg_make_golden", os.path.join(GOLDEN, "tkg", "make_golden.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------
# Tokenizer: a small CLIP BPE vocabulary (first 1000 merges of the real list)
# --------------------------------------------------------------------------------------------
def bytes_to_unicode():
    """GPT-2 / CLIP byte -> printable unicode char table (same as CLIP's simple_tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_small_clip_vocab(dst: str, bpe_path: str = CLIP_BPE, num_merges: int = NUM_MERGES) -> dict:
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:1 + num_merges]]  # line 0 is the file's header
    assert all(len(m) == 2 for m in merges)
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 256 * 2 + num_merges + 2
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(dst, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    return {"vocab_size": len(vocab), "bos_id": len(vocab) - 2, "eos_id": len(vocab) - 1}


# --------------------------------------------------------------------------------------------
# The two variants
# --------------------------------------------------------------------------------------------
SD_SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading",
                prediction_type="epsilon")

VARIANTS = {
    "a": dict(
        model_seed=0,
        seed=42,
        width=64, height=64,
        prompt="a red vintage car, studio photo",
        negative_prompt="",
        # channels (16, 32) / (16, 32): half of the first version's (32, 64), to keep tests/golden small
        unet=dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2,
                  cross_attention_dim=32, norm_num_groups=8, sample_size=32, in_channels=4, out_channels=4),
        vae=dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                 latent_channels=4, in_channels=3, out_channels=3, scaling_factor=0.18215, sample_size=64),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32),
        sched=dict(SD_SCHED),
        keep_tokenizer_json=False,
        legacy_text_encoder_keys=True,
    ),
    "b": dict(
        model_seed=1,
        seed=1234,
        width=64, height=48,
        prompt="A watch; close-up, 35mm!",
        negative_prompt="blurry, low quality",
        # channels (8, 16, 16) / VAE (8, 16, 16) instead of the first version's (32, 64, 64) / (16, 32, 32), to keep
        # tests/golden small (groups 4, as 8 groups of 8 channels would be 1 channel each); head dims 4, 4, 2
        unet=dict(block_out_channels=(8, 16, 16), down_block_types=("CrossAttnDownBlock2D",) * 3,
                  up_block_types=("CrossAttnUpBlock2D",) * 3, layers_per_block=2, attention_head_dim=(2, 4, 8),
                  use_linear_projection=True, cross_attention_dim=48, norm_num_groups=4, sample_size=16,
                  in_channels=4, out_channels=4),
        vae=dict(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=4,
                 latent_channels=4, in_channels=3, out_channels=3, scaling_factor=0.18215, sample_size=64),
        text=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
                  hidden_act="gelu", projection_dim=48),
        sched=dict(SD_SCHED, prediction_type="v_prediction", timestep_spacing="trailing"),
        keep_tokenizer_json=True,
        legacy_text_encoder_keys=False,
    ),
}

STEPS = 50
GUIDANCE = 7.5
# The weight files store float16 (half the bytes of float32). The models are rounded to float16 values in memory
# before they are saved, and the goldens come from the pipeline loaded back in float32, so both sides compute in
# float32 on exactly the stored values.
STORE_DTYPE = torch.float16
TKG = dict(color="green", channels=[1, 2], signs=[1, 1], target_shift=0.07, sigma=0.5, center=[0.0, 0.0])


def round_to_store_dtype(*models):
    """Rounds every float32 parameter to a STORE_DTYPE value (kept in float32)."""
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                if p.dtype == torch.float32:
                    p.copy_(p.to(STORE_DTYPE).to(torch.float32))


def store_weights(model_dir: str):
    """Rewrites every .safetensors file under model_dir with its float32 tensors as STORE_DTYPE (exact after
    round_to_store_dtype; checked), keeping the other tensors (int64 position_ids) and the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for fn in sorted(files):
            if not fn.endswith(".safetensors"):
                continue
            path = os.path.join(root, fn)
            with safe_open(path, "pt") as fh:
                meta = fh.metadata()
            sd = load_file(path)
            out = {}
            for k, v in sd.items():
                if v.dtype == torch.float32:
                    h = v.to(STORE_DTYPE)
                    assert torch.equal(h.to(torch.float32), v), f"{path}: {k} is not rounded to {STORE_DTYPE}"
                    v = h
                out[k] = v
            save_file(out, path, metadata=meta)


def build_and_save(name: str, cfg: dict, model_dir: str, tok_src: str, tok_info: dict):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(cfg["model_seed"])
    text_cfg = CLIPTextConfig(vocab_size=tok_info["vocab_size"], max_position_embeddings=77,
                              bos_token_id=tok_info["bos_id"], eos_token_id=tok_info["eos_id"],
                              pad_token_id=tok_info["eos_id"], **cfg["text"])
    text_encoder = CLIPTextModel(text_cfg).eval()
    unet = UNet2DConditionModel(**cfg["unet"]).eval()
    vae = AutoencoderKL(**cfg["vae"]).eval()
    round_to_store_dtype(text_encoder, unet, vae)
    scheduler = DDIMScheduler(**cfg["sched"])
    tokenizer = CLIPTokenizer.from_pretrained(tok_src, model_max_length=77, pad_token="<|endoftext|>")
    assert len(tokenizer) == tok_info["vocab_size"], len(tokenizer)
    assert tokenizer.bos_token_id == tok_info["bos_id"] and tokenizer.eos_token_id == tok_info["eos_id"]
    assert tokenizer.pad_token_id == tok_info["eos_id"]

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)

    # transformers 5 saves only tokenizer.json + tokenizer_config.json. Real SD1.5 repos ship
    # vocab.json + merges.txt + special_tokens_map.json and NO tokenizer.json. Variant a mirrors
    # that layout exactly; variant b keeps tokenizer.json as well, so both loader paths are covered.
    tdir = os.path.join(model_dir, "tokenizer")
    for fn in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(tok_src, fn), os.path.join(tdir, fn))

    def added(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    with open(os.path.join(tdir, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
        json.dump({"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
                   "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>")}, fh, indent=2)
        fh.write("\n")
    if not cfg["keep_tokenizer_json"]:
        os.remove(os.path.join(tdir, "tokenizer.json"))

    # transformers 5 saves CLIPTextModel keys without the "text_model." prefix that every SD1.5
    # text_encoder/model.safetensors on the Hub has (saved by transformers 4.x, which also stored
    # the int64 buffer text_model.embeddings.position_ids). Variant a gets that legacy layout,
    # variant b keeps the transformers-5 layout. transformers 5 loads both (checked below).
    if cfg["legacy_text_encoder_keys"]:
        from safetensors.torch import load_file, save_file
        te_path = os.path.join(model_dir, "text_encoder", "model.safetensors")
        sd = load_file(te_path)
        sd = {"text_model." + k: v for k, v in sd.items()}
        sd["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
        save_file(dict(sorted(sd.items())), te_path, metadata={"format": "pt"})
    store_weights(model_dir)
    return pipe


def stats(name, t):
    tf = torch.as_tensor(np.asarray(t)).double() if not isinstance(t, torch.Tensor) else t.double()
    print(f"  {name:18s} {str(t.dtype):14s} {str(list(t.shape)):18s} maxabs={tf.abs().max().item():.6g} "
          f"min={tf.min().item():.6g} max={tf.max().item():.6g} mean={tf.mean().item():.6g} "
          f"std={tf.std().item():.6g}")
    assert torch.isfinite(tf).all(), name
    assert tf.std().item() > 0, f"{name} is constant"


def dir_size(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)


def make_variant(name: str, cfg: dict, tkg, ref, prov, tok_src, tok_info):
    from diffusers import StableDiffusionPipeline
    import diffusers
    import transformers
    import safetensors
    import PIL

    vdir = os.path.join(HERE, name)
    model_dir = os.path.join(vdir, "model")
    os.makedirs(vdir, exist_ok=True)
    pipe_mem = build_and_save(name, cfg, model_dir, tok_src, tok_info)
    tok_mem = pipe_mem.tokenizer

    # ---- everything below uses the pipeline loaded back from disk
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    unet, vae, te, tok, sch = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler
    W, H = cfg["width"], cfg["height"]
    f = pipe.vae_scale_factor
    assert f == 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = H // f, W // f
    prompt, neg = cfg["prompt"], cfg["negative_prompt"]
    seed = cfg["seed"]

    # the weights loaded back from disk must be exactly the ones that were built
    for comp in ("unet", "vae", "text_encoder"):
        a_sd, b_sd = getattr(pipe_mem, comp).state_dict(), getattr(pipe, comp).state_dict()
        assert a_sd.keys() == b_sd.keys(), comp
        assert all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd), comp
        assert all(v.dtype in (torch.float32, torch.int64) for v in b_sd.values()), comp
    del pipe_mem

    # the tokenizer loaded back from disk must agree with the one that was built
    assert type(tok).__name__ == "CLIPTokenizer" and tok.model_max_length == 77
    assert tok.pad_token == "<|endoftext|>" and len(tok) == tok_info["vocab_size"]
    for s in (prompt, neg, "", "  Hello   WORLD\té ü's it'll 2024 -- x!?", "a " * 100):
        a = tok(s, padding="max_length", max_length=77, truncation=True).input_ids
        b = tok_mem(s, padding="max_length", max_length=77, truncation=True).input_ids
        assert a == b, (s, a, b)

    # noise and TKG-DM init
    noise = torch.randn([1, 4, h, w], generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    grid = tkg.tkg_grid_size(h, w)
    init, tkg_info = tkg.tkg_init(noise, TKG["target_shift"], TKG["sigma"], *TKG["center"], grid=grid)
    # where the reference's own grid rule applies, its functions must give the same z* and mask
    ref_grid = (h // 8, w // 8)
    agree_ref = None
    if min(ref_grid) >= 2:
        assert grid == ref_grid
        z_star = ref.channel_mean_shift(noise.clone(), TKG["target_shift"])
        m = ref.create_2d_gaussian(h, w, TKG["sigma"], *TKG["center"])
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        m = m.expand(-1, 4, -1, -1).to(torch.float16)
        want = m * noise + (1 - m) * z_star
        assert torch.equal(want, init)
        agree_ref = "init == reference channel_mean_shift(0.07) + create_2d_gaussian + tkg_noise's blend, bit-exact"

    # text
    tk = tok([neg, prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
             return_tensors="pt")
    input_ids = tk.input_ids.to(torch.int64)
    with torch.no_grad():
        pe, npe = pipe.encode_prompt(prompt, "cpu", 1, True, negative_prompt=neg)
        prompt_embeds = torch.cat([npe, pe])
        direct = te(input_ids)[0]
    assert torch.equal(direct, prompt_embeds), "encode_prompt != text_encoder(input_ids)[0]"

    # step 0 UNet (and the pipeline's own first call, captured with a hook, must agree)
    sch.set_timesteps(STEPS, device="cpu")
    timesteps = sch.timesteps.clone()
    t0 = timesteps[0]
    with torch.no_grad():
        lmi = sch.scale_model_input(torch.cat([init * sch.init_noise_sigma] * 2), t0)
        unet_step0 = unet(lmi, t0, encoder_hidden_states=prompt_embeds, return_dict=False)[0]

    captured = {}

    def hook(mod, args, kwargs, out):
        if "unet_in" not in captured:
            captured["unet_in"] = args[0].clone()
            captured["t"] = args[1].clone() if isinstance(args[1], torch.Tensor) else args[1]
            captured["unet_out"] = out[0].clone()

    step_latents = {}

    def on_step_end(p, i, t, kw):
        if i in (0, 1):
            step_latents[i] = kw["latents"].clone()
        return {}

    hnd = unet.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        final = pipe(prompt, negative_prompt=neg, height=H, width=W, latents=init.clone(),
                     num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                     callback_on_step_end=on_step_end).images
    hnd.remove()
    assert torch.equal(captured["unet_in"], torch.cat([init] * 2))
    assert torch.equal(captured["unet_out"], unet_step0), "pipeline's step-0 UNet output differs"
    assert isinstance(captured["t"], torch.Tensor) and captured["t"].dtype == torch.int64 and captured["t"].dim() == 0
    assert torch.equal(pipe.scheduler.timesteps, timesteps)
    # guided eps/v at step 0
    u, c = unet_step0.chunk(2)
    guided0 = u + GUIDANCE * (c - u)

    with torch.no_grad():
        out_pil = pipe(prompt, negative_prompt=neg, height=H, width=W, latents=init.clone(),
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="pil").images[0]
        vae_decoded = vae.decode(final / vae.config.scaling_factor, return_dict=False)[0]
    image = np.array(out_pil)
    assert image.shape == (H, W, 3) and image.dtype == np.uint8
    # the documented post-processing rule must reproduce the PIL image exactly
    x = (vae_decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()[0]
    assert np.array_equal((x * 255).round().astype("uint8"), image)

    tensors = {
        "noise": noise,
        "init": init,
        "input_ids": input_ids,
        "prompt_embeds": prompt_embeds,
        "timesteps": timesteps.to(torch.int64),
        "unet_step0": unet_step0,
        "guided_step0": guided0,
        "latents_step0": step_latents[0],
        "latents_step1": step_latents[1],
        "final": final,
        "vae_decoded": vae_decoded,
        "image": torch.from_numpy(image.copy()),
    }
    print(f"variant {name}: latent {h}x{w}, image {W}x{H} (WxH), vae factor {f}")
    for k, v in tensors.items():
        stats(k, v)
    frac_sat = float(((image == 0) | (image == 255)).mean())
    print(f"  image: {frac_sat:.1%} of values saturated (0 or 255), distinct values: {len(np.unique(image))}")

    from safetensors.torch import save_file
    st_path = os.path.join(vdir, "golden.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, st_path,
              metadata={"generator": f"tests/golden/sd15/make_golden.py (variant {name})"})

    def sha(p):
        return hashlib.sha256(open(p, "rb").read()).hexdigest()

    doc = {
        "variant": name,
        "prompt": prompt,
        "negative_prompt": neg,
        "width": W,
        "height": H,
        "latent_shape": [1, 4, h, w],
        "vae_scale_factor": f,
        "steps": STEPS,
        "guidance": GUIDANCE,
        "eta": 0.0,
        "seed": seed,
        "noise": f"torch.randn([1, 4, {h}, {w}], generator=torch.Generator('cpu').manual_seed({seed}), dtype=float32)",
        "scheduler": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg["sched"].items()},
        "timesteps": [int(t) for t in timesteps],
        "init_noise_sigma": float(sch.init_noise_sigma),
        "tkg": {
            **TKG,
            "grid": list(grid),
            "grid_rule": "max(2, h // 8) x max(2, w // 8) (the reference's create_2d_gaussian divides the latent "
                         "size by 8 again; for latents under 16 a side that would give < 2 cells)",
            "reference_grid_applies": min(ref_grid) >= 2,
            "delta": tkg_info["delta"],
            "delta_steps": tkg_info["delta_steps"],
            "mask_dtype": "float16 (as in the reference tkg_noise); 1 - mask computed in float16",
            "check": agree_ref,
        },
        "input_ids_rows": ["negative_prompt", "prompt"],
        "tokens": {"negative_prompt": tok.convert_ids_to_tokens(input_ids[0].tolist()),
                   "prompt": tok.convert_ids_to_tokens(input_ids[1].tolist())},
        "tokenizer_files": sorted(os.listdir(os.path.join(model_dir, "tokenizer"))),
        "text_encoder_keys": ("legacy transformers-4 layout: 'text_model.' prefix + int64 text_model.embeddings.position_ids"
                              if cfg["legacy_text_encoder_keys"] else
                              "transformers-5 layout: no 'text_model.' prefix (embeddings.*, encoder.*, final_layer_norm.*)"),
        "model_seed": cfg["model_seed"],
        "weights_dtype": "float16 in the files (the int64 position_ids stay int64); loaded and run in float32",
        "model_dir": "model",
        "model_bytes": dir_size(model_dir),
        "model_files": {os.path.relpath(os.path.join(r, fn), model_dir): os.path.getsize(os.path.join(r, fn))
                        for r, _, fs in os.walk(model_dir) for fn in sorted(fs)},
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()},
        "tensor_notes": {
            "noise": "the seeded Gaussian noise (input of TKG-DM)",
            "init": "TKG-DM initial latent (see tkg); passed to the pipeline as latents=",
            "input_ids": "row 0 = negative prompt, row 1 = prompt; padded with <|endoftext|> to 77",
            "prompt_embeds": "cat([negative, positive]) from pipe.encode_prompt (text_encoder last_hidden_state)",
            "timesteps": "scheduler.timesteps after set_timesteps(50) (also in this json)",
            "unet_step0": "unet(cat([init]*2), timesteps[0], encoder_hidden_states=prompt_embeds); rows uncond, cond",
            "guided_step0": "uncond + 7.5 * (cond - uncond) from unet_step0",
            "latents_step0": "latents after the first scheduler.step (i = 0)",
            "latents_step1": "latents after the second scheduler.step (i = 1)",
            "final": "pipe(..., latents=init, output_type='latent').images",
            "vae_decoded": "vae.decode(final / scaling_factor).sample, before post-processing",
            "image": "np.array of pipe(..., output_type='pil').images[0]; uint8 HWC",
        },
        "reference_tkg": prov,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "safetensors": safetensors.__version__,
                     "numpy": np.__version__, "PIL": PIL.__version__, "python": sys.version.split()[0]},
        "golden_sha256": sha(st_path),
    }
    with open(os.path.join(vdir, "golden.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    print(f"  wrote {vdir}/golden.safetensors ({os.path.getsize(st_path)} bytes), golden.json; "
          f"model folder {dir_size(model_dir)} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tkg-repo", default="/work/.mirror/ryugo417+TKG-DM/repo",
                    help="checkout or bare git dir of ryugo417/TKG-DM (default: %(default)s)")
    ap.add_argument("--variants", nargs="+", default=sorted(VARIANTS), choices=sorted(VARIANTS))
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    tkg = _import_tkg_helpers()
    ref, prov = tkg.load_reference(args.tkg_repo)
    tkg.self_check(ref)

    tok_src = tempfile.mkdtemp(prefix="tiny_clip_tok_")
    tok_info = write_small_clip_vocab(tok_src)
    print(f"tokenizer: {tok_info}")
    for name in args.variants:
        make_variant(name, VARIANTS[name], tkg, ref, prov, tok_src, tok_info)
    shutil.rmtree(tok_src, ignore_errors=True)


if __name__ == "__main__":
    main()
