#!/usr/bin/env python3
"""Full-size SDXL base (stabilityai/stable-diffusion-xl-base-1.0) with RANDOM weights, for weight-name
coverage tests of tkg's SDXL loader, plus a one-step UNet golden at a reduced latent size.

Nothing is downloaded. The configs below were written by hand from the published values of
stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/, text_encoder_2/, tokenizer*/,
scheduler/ config files); the tokenizers are built from the full CLIP merge list in
tests/data/clip-merges.txt.gz. The output is a diffusers folder that StableDiffusionXLPipeline loads.

Output (default /work/sdxl-full, keep it OUT of git):
  model_index.json, scheduler/, tokenizer/, tokenizer_2/
  text_encoder/    CLIPTextModel (CLIP ViT-L/14 text), keys with the "text_model." prefix as on the Hub
  text_encoder_2/  CLIPTextModelWithProjection (OpenCLIP bigG text), "text_model." prefix + text_projection
  vae/             AutoencoderKL
  unet/            UNet2DConditionModel
  manifest.json    every tensor name, dtype and shape per component file, plus counts
  unet_step.safetensors / unet_step.json   one UNet call in f32 on CPU (see below)

Weights are stored in float16 (--dtype fp16, the default) to save disk and RAM; the UNet golden is computed
with the UNet loaded back from disk and upcast to float32, so it belongs to the files on disk exactly
(every f16 value is exact in f32).

Random init: each module's default init (diffusers: PyTorch defaults; transformers: CLIP's _init_weights),
then every floating tensor that the default init leaves constant (norm weights = 1, norm / CLIP-linear
biases = 0, ...) gets  +0.1 * N(0, 1), so that a loader that drops or swaps such a tensor is caught.

Each part runs in its own subprocess so its memory is returned before the next one starts.
Peak RSS is about 11 GB (UNet built in f32, then halved; and the golden's f32 UNet).

Usage:
  /work/pyenv/bin/python benches/sdxl_full/make_random_sdxl.py [--out /work/sdxl-full] [--dtype fp16|fp32]
        [--parts tokenizers text_encoder text_encoder_2 vae unet index manifest golden] [--threads 2]
"""
import argparse
import gc
import gzip
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.dont_write_bytecode = True

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
FULL_MERGES_GZ = os.path.join(ROOT, "tests", "data", "clip-merges.txt.gz")
PARTS = ["tokenizers", "text_encoder", "text_encoder_2", "vae", "unet", "index", "manifest", "golden"]

# ---------------------------------------------------------------------------------------------------------
# Configs, written from the published stabilityai/stable-diffusion-xl-base-1.0 files (not downloaded)
# ---------------------------------------------------------------------------------------------------------
UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    only_cross_attention=False, block_out_channels=[320, 640, 1280], layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=2048, transformer_layers_per_block=[1, 2, 10],
    encoder_hid_dim=None, encoder_hid_dim_type=None, attention_head_dim=[5, 10, 20], num_attention_heads=None,
    dual_cross_attention=False, use_linear_projection=True, class_embed_type=None,
    addition_embed_type="text_time", addition_time_embed_dim=256, num_class_embeds=None, upcast_attention=False,
    resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    time_embedding_type="positional", time_embedding_dim=None, time_embedding_act_fn=None,
    timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    projection_class_embeddings_input_dim=2816, class_embeddings_concat=False,
    mid_block_only_cross_attention=None, cross_attention_norm=None, addition_embed_type_num_heads=64,
)
VAE = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=4,
    norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
)
# SDXL's published text configs keep the legacy bos/eos/pad ids 0/2/1; eos_token_id == 2 selects
# transformers' argmax(input_ids) EOS pooling.
TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)
TEXT_ENCODER_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
    attention_dropout=0.0, initializer_range=0.02, initializer_factor=1.0, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)
SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    trained_betas=None, prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
    timestep_spacing="leading", steps_offset=1,
)
SEEDS = dict(text_encoder=10, text_encoder_2=11, vae=12, unet=13, golden=14)


def rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (peak RSS {rss_gb():.2f} GB)", flush=True)


def perturb_constant_tensors(model, seed):
    """+0.1*N(0,1) on every floating tensor the default init left constant (norm affine params, zero biases)."""
    import torch
    g = torch.Generator("cpu").manual_seed(seed + 1000)
    n = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dtype.is_floating_point and p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
                n += 1
    return n


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
def part_tokenizers(out, args):
    from transformers import CLIPTokenizer
    lines = gzip.open(FULL_MERGES_GZ).read().decode("utf-8").split("\n")
    assert lines[0].startswith("#version")
    merges = [tuple(m.split()) for m in lines[1:] if m]
    assert len(merges) == 49152 - 256 - 2 and all(len(m) == 2 for m in merges)
    # vocab exactly as tests/golden/tokenizer/make_golden.py builds it
    sys.path.insert(0, os.path.join(ROOT, "tests", "golden", "tokenizer"))
    try:
        from make_golden import build_vocab, merges_txt  # noqa: E402
    finally:
        sys.path.pop(0)
    vocab = build_vocab(merges)
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0
    src = os.path.join(out, "_tok_src")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(src, "merges.txt"), "w", encoding="utf-8") as f:
        f.write(merges_txt(merges))
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        d = os.path.join(out, sub)
        shutil.rmtree(d, ignore_errors=True)
        tok = CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"),
                            pad_token=pad, model_max_length=77)
        tok.save_pretrained(d)
        # the Hub layout: vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json, no tokenizer.json
        for fn in ("vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(src, fn), os.path.join(d, fn))

        def added(content):
            return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

        with open(os.path.join(d, "special_tokens_map.json"), "w", encoding="utf-8") as fh:
            json.dump({"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
                       "pad_token": pad, "unk_token": added("<|endoftext|>")}, fh, indent=2)
            fh.write("\n")
        os.remove(os.path.join(d, "tokenizer.json"))
        t2 = CLIPTokenizer.from_pretrained(d)
        ids = t2("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
        log(f"{sub}: pad {t2.pad_token!r} ({t2.pad_token_id}), 'a photo of a cat' -> {ids[:8]} ...")
        assert ids[0] == 49406 and ids[ids.index(49407) + 1] == t2.pad_token_id
    shutil.rmtree(src)


def _save_text(out, sub, cls_name, cfg, args):
    import torch
    import transformers
    from transformers import CLIPTextConfig
    torch.manual_seed(SEEDS[sub])
    cls = getattr(transformers, cls_name)
    model = cls(CLIPTextConfig(**cfg)).eval()
    n = perturb_constant_tensors(model, SEEDS[sub])
    log(f"{sub}: built {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, perturbed {n} tensors")
    if args.dtype == "fp16":
        model = model.half()
    d = os.path.join(out, sub)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True)
    del model
    gc.collect()
    # transformers 5 writes CLIPTextModel keys without "text_model."; the Hub's SDXL text_encoder has it.
    from safetensors.torch import load_file, save_file
    files = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    assert files == ["model.safetensors"], files
    p = os.path.join(d, "model.safetensors")
    sd = load_file(p)
    if not all(k.startswith("text_model.") or k == "text_projection.weight" for k in sd):
        sd = {("text_model." + k if not k.startswith("text_model.") and k != "text_projection.weight" else k): v
              for k, v in sd.items()}
        save_file(dict(sorted(sd.items())), p, metadata={"format": "pt"})
    del sd
    gc.collect()
    # loads back with no missing / unexpected keys
    m2, info = cls.from_pretrained(d, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    log(f"{sub}: saved {os.path.getsize(p) / 1e9:.3f} GB, reload OK")


def part_text_encoder(out, args):
    _save_text(out, "text_encoder", "CLIPTextModel", TEXT_ENCODER, args)


def part_text_encoder_2(out, args):
    _save_text(out, "text_encoder_2", "CLIPTextModelWithProjection", TEXT_ENCODER_2, args)


def _save_diffusers(out, sub, cls_name, cfg, args):
    import torch
    import diffusers
    torch.manual_seed(SEEDS[sub])
    cls = getattr(diffusers, cls_name)
    model = cls(**cfg).eval()
    n = perturb_constant_tensors(model, SEEDS[sub])
    log(f"{sub}: built {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, perturbed {n} tensors")
    if args.dtype == "fp16":
        model = model.half()
    d = os.path.join(out, sub)
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(d, safe_serialization=True, max_shard_size="100GB")
    del model
    gc.collect()
    log(f"{sub}: saved {sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 1e9:.3f} GB")


def part_vae(out, args):
    _save_diffusers(out, "vae", "AutoencoderKL", VAE, args)


def part_unet(out, args):
    _save_diffusers(out, "unet", "UNet2DConditionModel", UNET, args)


def part_index(out, args):
    import diffusers
    from diffusers import EulerDiscreteScheduler
    d = os.path.join(out, "scheduler")
    shutil.rmtree(d, ignore_errors=True)
    EulerDiscreteScheduler(**SCHEDULER).save_pretrained(d)
    idx = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(idx, f, indent=2)
        f.write("\n")
    log("model_index.json + scheduler written")


def part_manifest(out, args):
    from safetensors import safe_open
    man = {"note": "random weights; configs written by hand from the published SDXL base values", "components": {}}
    total = 0
    for sub in ("text_encoder", "text_encoder_2", "vae", "unet"):
        d = os.path.join(out, sub)
        comp = {}
        for fn in sorted(f for f in os.listdir(d) if f.endswith(".safetensors")):
            p = os.path.join(d, fn)
            with safe_open(p, "pt") as f:
                tensors = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    tensors[k] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
            n_el = sum(int(__import__("math").prod(v["shape"])) for v in tensors.values())
            comp[fn] = {"bytes": os.path.getsize(p), "sha256": sha256(p), "num_tensors": len(tensors),
                        "num_elements": n_el, "tensors": tensors}
            total += len(tensors)
            log(f"{sub}/{fn}: {len(tensors)} tensors, {n_el / 1e6:.1f} M elements")
        man["components"][sub] = comp
    man["total_tensors"] = total
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(man, f, indent=1)
        f.write("\n")


def part_golden(out, args):
    """One UNet call at latent 32x32 (image 256x256), f32 on CPU, with the UNet loaded back from disk."""
    import numpy as np
    import torch
    import diffusers
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    # Built on the meta device and filled from the file (strict: every key used, none missing), then upcast:
    # the same weights from_pretrained(torch_dtype=float32) gives, without a random init and a second copy.
    from safetensors.torch import load_file
    udir = os.path.join(out, "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(udir))
    sd = load_file(os.path.join(udir, "diffusion_pytorch_model.safetensors"))
    unet.load_state_dict(sd, strict=True, assign=True)
    del sd
    gc.collect()
    unet = unet.float().eval()
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in unet.parameters())
    assert all(b.device.type == "cpu" for b in unet.buffers())
    log("golden: UNet loaded as f32")
    g = torch.Generator("cpu").manual_seed(SEEDS["golden"])
    B, H, W = 2, 32, 32
    sample = torch.randn([B, 4, H, W], generator=g)
    ehs = torch.randn([B, 77, 2048], generator=g)
    text_embeds = torch.randn([B, 1280], generator=g)
    time_ids = torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]] * B)
    t = torch.tensor(981, dtype=torch.int64)
    t0 = time.time()
    with torch.no_grad():
        outp = unet(sample, t, encoder_hidden_states=ehs,
                    added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]
    dt = time.time() - t0
    log(f"golden: UNet step {dt:.1f} s; out maxabs {outp.abs().max():.4g} std {outp.std():.4g}")
    assert torch.isfinite(outp).all()
    # sensitivity: the same call with a different thread count
    check = None
    if args.check_threads:
        torch.set_num_threads(1 if args.threads != 1 else 2)
        with torch.no_grad():
            o2 = unet(sample, t, encoder_hidden_states=ehs,
                      added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]
        check = {"threads": torch.get_num_threads(), "max_abs_diff": float((o2 - outp).abs().max()),
                 "rel_l2": float((o2 - outp).norm() / outp.norm())}
        log(f"golden: thread-count sensitivity {check}")
    tensors = {"sample": sample, "timestep": t.reshape(1), "encoder_hidden_states": ehs,
               "text_embeds": text_embeds, "time_ids": time_ids, "out": outp}
    p = os.path.join(out, "unet_step.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, p,
              metadata={"generator": "benches/sdxl_full/make_random_sdxl.py (golden)"})
    import transformers
    doc = {
        "call": "unet(sample, timestep (0-d int64 981), encoder_hidden_states=..., added_cond_kwargs={'text_embeds': "
                "..., 'time_ids': ...}).sample in float32 on CPU; the UNet is built from unet/config.json on the meta "
                "device, filled with load_state_dict(strict=True, assign=True) from unet/*.safetensors (f16) and "
                "upcast with .float() (the same weights as from_pretrained(torch_dtype=float32))",
        "peak_rss_gb": rss_gb(),
        "inputs": "torch.randn with Generator('cpu').manual_seed(%d), drawn in order sample, encoder_hidden_states, "
                  "text_embeds; time_ids = [256,256,0,0,256,256] per row" % SEEDS["golden"],
        "threads": args.threads,
        "seconds": dt,
        "thread_sensitivity": check,
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in tensors.items()},
        "out_stats": {"maxabs": float(outp.abs().max()), "mean": float(outp.mean()), "std": float(outp.std()),
                      "l2": float(outp.norm())},
        "unet_sha256": {f: sha256(os.path.join(out, "unet", f)) for f in sorted(os.listdir(os.path.join(out, "unet")))
                        if f.endswith(".safetensors")},
        "golden_sha256": sha256(p),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "numpy": np.__version__},
    }
    with open(os.path.join(out, "unet_step.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    log(f"golden: wrote {p}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/sdxl-full")
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check-threads", action="store_true", help="golden: rerun with another thread count")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if out == ROOT or out.startswith(ROOT + os.sep):
        sys.exit(f"--out {out} is inside the repository; keep these weights out of git")
    os.makedirs(out, exist_ok=True)
    if args._child:
        import torch
        torch.set_num_threads(args.threads)
        for p in args.parts:
            globals()["part_" + p](out, args)
        return
    t0 = time.time()
    for p in args.parts:  # one subprocess per part: its memory is returned to the OS when it exits
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--out", out, "--dtype", args.dtype,
               "--threads", str(args.threads), "--parts", p] + (["--check-threads"] if args.check_threads else [])
        log(f"=== part {p}")
        subprocess.run(cmd, check=True)
    log(f"all parts done in {time.time() - t0:.0f} s; output in {out}")


if __name__ == "__main__":
    main()
