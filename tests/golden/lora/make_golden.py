#!/usr/bin/env python3
"""Golden files for LoRA merging: diffusers' load_lora_weights + fuse_lora on the tiny SD1.5 and
SDXL golden models (tests/golden/sd15/a/model, tests/golden/sdxl/a/model).

For each family this writes, next to this file:
  <family>_peft.lora.safetensors   a PEFT LoRA saved by diffusers' save_lora_weights, with its
                                   lora_adapter_metadata (lora_alpha != r, so scale != 1)
  <family>_kohya.lora.safetensors  a kohya-ss file written by hand (float16): lora_down / lora_up / alpha,
                                   lora_unet_ (SD1: diffusers paths; SDXL: LDM paths),
                                   lora_te_ (SD1) / lora_te1_ + lora_te2_ (SDXL), LoCon 3x3 convs
  <family>_<format>.golden.safetensors   `final`: the pipeline's final latents with the LoRA fused
  golden.json                      settings, multipliers, module counts, versions

Before a golden is written, the fused weights diffusers made are checked against
W + multiplier * alpha / r * up @ down computed here from the file, for every module: the file,
diffusers and the formula agree.

Usage: /work/pyenv/bin/python tests/golden/lora/make_golden.py   (needs peft)
"""
import json
import math
import os
import sys
import tempfile

sys.dont_write_bytecode = True
import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)
RANK = 4
FAMILIES = {
    "sd15": dict(model=os.path.join(GOLDEN, "sd15", "a", "model"),
                 golden=os.path.join(GOLDEN, "sd15", "a", "golden.safetensors"),
                 json=os.path.join(GOLDEN, "sd15", "a", "golden.json")),
    "sdxl": dict(model=os.path.join(GOLDEN, "sdxl", "a", "model"),
                 golden=os.path.join(GOLDEN, "sdxl", "a", "golden_neg.safetensors"),
                 json=os.path.join(GOLDEN, "sdxl", "a", "golden_neg.json")),
}
MULTIPLIER = {"peft": 1.0, "kohya": 0.7}
KOHYA_DTYPE = torch.float16
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj", "conv_shortcut"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def pipeline_class(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    return StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline


def load_pipe(family):
    pipe = pipeline_class(family).from_pretrained(FAMILIES[family]["model"], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_encoders(pipe, family):
    return {"text_encoder": pipe.text_encoder} | ({"text_encoder_2": pipe.text_encoder_2} if family == "sdxl" else {})


def targeted_modules(model, targets):
    """(name, module) of every Linear / Conv2d whose name ends with one of `targets`."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(
                name == t or name.endswith("." + t) for t in targets):
            out.append((name, m))
    return out


def lora_pair(gen, out_f, in_f, kernel):
    """down [r, in, k, k] / up [out, r, 1, 1] (conv) or down [r, in] / up [out, r]."""
    fan_in = in_f * kernel * kernel
    if kernel == 0:
        down = torch.randn(RANK, in_f, generator=gen) * 0.3 / math.sqrt(in_f)
        up = torch.randn(out_f, RANK, generator=gen) * 0.3 / math.sqrt(RANK)
    else:
        down = torch.randn(RANK, in_f, kernel, kernel, generator=gen) * 0.3 / math.sqrt(fan_in)
        up = torch.randn(out_f, RANK, 1, 1, generator=gen) * 0.3 / math.sqrt(RANK)
    return down, up


def delta(down, up):
    r = down.shape[0]
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(
        (up.shape[0],) + tuple(down.shape[1:]))


# ---------------------------------------------------------------------------------------------
# diffusers -> LDM names for the UNet (kohya SDXL files use them)
# ---------------------------------------------------------------------------------------------
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_ldm(name, cfg):
    L = cfg.layers_per_block
    p = name.split(".")

    def res(tail):
        return ".".join([RESNET.get(tail[0], tail[0])] + tail[1:])

    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "resnets":
            return f"input_blocks.{1 + i * (L + 1) + int(p[3])}.0." + res(p[4:])
        if p[2] == "attentions":
            return f"input_blocks.{1 + i * (L + 1) + int(p[3])}.1." + ".".join(p[4:])
        if p[2] == "downsamplers":
            return f"input_blocks.{(i + 1) * (L + 1)}.0.op." + ".".join(p[5:])
    if p[0] == "mid_block":
        slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
        tail = res(p[3:]) if p[1] == "resnets" else ".".join(p[3:])
        return f"middle_block.{slot}." + tail
    if p[0] == "up_blocks":
        i = int(p[1])
        if p[2] == "resnets":
            return f"output_blocks.{i * (L + 1) + int(p[3])}.0." + res(p[4:])
        if p[2] == "attentions":
            return f"output_blocks.{i * (L + 1) + int(p[3])}.1." + ".".join(p[4:])
    if p[0] == "time_embedding":
        return {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[p[1]]
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# PEFT file
# ---------------------------------------------------------------------------------------------
def sort_metadata(path):
    """safetensors 0.8 writes __metadata__ from a Rust HashMap, so with two or more keys their
    order changes from run to run. Rewrites the header with the keys sorted: same length, same
    tensors, and the same bytes every run."""
    import struct
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    text = raw[8:8 + n].decode("utf-8")
    header = json.loads(text)

    def dump(h):
        return json.dumps(h, separators=(",", ":"), ensure_ascii=False)

    assert dump(header) == text.rstrip(" "), f"{path}: header not in the form safetensors writes"
    if "__metadata__" not in header:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    new = dump(header).encode("utf-8").ljust(n, b" ")
    assert len(new) == n
    with open(path, "wb") as f:
        f.write(raw[:8] + new + raw[8 + n:])


def stable_metadata(cfg):
    """cfg.to_dict() without what made two runs differ: target_modules is a set (its order
    follows the string hash seed) and base_model_name_or_path is the absolute path of the
    folder the text encoder was loaded from (so it names the checkout)."""
    d = cfg.to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    d["base_model_name_or_path"] = None
    return d


def make_peft(family, path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    pipe = load_pipe(family)
    gen = torch.Generator().manual_seed(7)
    unet_cfg = LoraConfig(r=RANK, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS)
    te_cfg = LoraConfig(r=RANK, lora_alpha=2, init_lora_weights=False, target_modules=TE_TARGETS)
    pipe.unet.add_adapter(unet_cfg)
    tes = text_encoders(pipe, family)
    for te in tes.values():
        te.add_adapter(te_cfg)
    with torch.no_grad():
        for model in [pipe.unet, *tes.values()]:
            for name, m in model.named_modules():
                if hasattr(m, "lora_A") and "default" in m.lora_A:
                    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
                    kernel = a.shape[-1] if a.dim() == 4 else 0
                    down, up = lora_pair(gen, b.shape[0], a.shape[1], kernel)
                    a.copy_(down)
                    b.copy_(up)
    kwargs = dict(unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                  text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
                  unet_lora_adapter_metadata=stable_metadata(unet_cfg),
                  text_encoder_lora_adapter_metadata=stable_metadata(te_cfg))
    if family == "sdxl":
        kwargs["text_encoder_2_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder_2)
        kwargs["text_encoder_2_lora_adapter_metadata"] = stable_metadata(te_cfg)
    with tempfile.TemporaryDirectory() as d:
        pipeline_class(family).save_lora_weights(d, weight_name="x.safetensors", safe_serialization=True,
                                                 **kwargs)
        os.replace(os.path.join(d, "x.safetensors"), path)
    sort_metadata(path)
    # expected deltas, keyed by (component, module name)
    sd = load_file(path)
    expect = {}
    for k, down in sd.items():
        if ".lora_A." not in k:
            continue
        comp, mod = k.split(".", 1)
        mod = mod.split(".lora_A.")[0]
        up = sd[k.replace(".lora_A.", ".lora_B.")]
        scale = (8 if comp == "unet" else 2) / RANK
        expect[(comp, mod)] = scale * delta(down, up)
    return expect


# ---------------------------------------------------------------------------------------------
# kohya file
# ---------------------------------------------------------------------------------------------
def make_kohya(family, path):
    pipe = load_pipe(family)
    gen = torch.Generator().manual_seed(11)
    tensors, expect = {}, {}
    comps = [("unet", pipe.unet, UNET_TARGETS)] + [(n, te, TE_TARGETS) for n, te in text_encoders(pipe, family).items()]
    for i_comp, (comp, model, targets) in enumerate(comps):
        for j, (name, m) in enumerate(targeted_modules(model, targets)):
            if comp == "unet":
                path_name = unet_ldm(name, pipe.unet.config) if family == "sdxl" else name
                key = "lora_unet_" + path_name.replace(".", "_")
            else:
                prefix = {"text_encoder": "lora_te1_" if family == "sdxl" else "lora_te_",
                          "text_encoder_2": "lora_te2_"}[comp]
                mod_name = name if name.startswith("text_model.") else "text_model." + name
                key = prefix + mod_name.replace(".", "_")
            if isinstance(m, torch.nn.Conv2d):
                out_f, in_f, kernel = m.out_channels, m.in_channels, m.kernel_size[0]
            else:
                out_f, in_f, kernel = m.out_features, m.in_features, 0
            down, up = lora_pair(gen, out_f, in_f, kernel)
            # Stored as float16, as kohya-ss files usually are (save_precision fp16); the PEFT file
            # stays float32. Both loaders upcast, so the expected delta uses the float16 values.
            down, up = down.to(KOHYA_DTYPE), up.to(KOHYA_DTYPE)
            # One alpha for all modules: diffusers 0.42 maps per-module alphas of kohya files
            # through PEFT's alpha_pattern and gets some modules wrong (checked: the fused
            # weights differ), so the parity file keeps alpha uniform (but != rank).
            alpha = float(RANK / 2)
            tensors[key + ".lora_down.weight"] = down.contiguous()
            tensors[key + ".lora_up.weight"] = up.contiguous()
            tensors[key + ".alpha"] = torch.tensor(alpha, dtype=KOHYA_DTYPE)
            expect[(comp, name)] = (alpha / RANK) * delta(down.float(), up.float())
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(RANK)})
    sort_metadata(path)
    return expect


def check_fused(pipe, family, expect, mult):
    comps = {"unet": pipe.unet} | text_encoders(pipe, family)
    base = load_pipe(family)
    base_comps = {"unet": base.unet} | text_encoders(base, family)
    worst = 0.0
    checked = 0
    bad = []
    for (comp, mod), d in expect.items():
        name = mod.removeprefix("text_model.") if comp != "unet" else mod
        fused = dict(comps[comp].named_modules())
        orig = dict(base_comps[comp].named_modules())
        key = mod if mod in fused else ("text_model." + name if "text_model." + name in fused else name)
        w_f = fused[key].weight.detach()
        w_0 = orig[key].weight.detach()
        err = (w_f - (w_0 + mult * d.reshape(w_0.shape))).abs().max().item()
        worst = max(worst, err)
        if err >= 1e-5:
            bad.append((comp, mod, err))
        checked += 1
    # modules without a LoRA are unchanged
    for b in bad[:20]:
        print("  differs:", b)
    assert worst < 1e-5, f"fused weights differ from W + m * alpha/r * up@down by {worst}"
    return checked


def run(pipe, family):
    g = load_file(FAMILIES[family]["golden"])
    j = json.load(open(FAMILIES[family]["json"]))
    with torch.no_grad():
        final = pipe(j["prompt"], negative_prompt=j["negative_prompt"], height=j["height"], width=j["width"],
                     latents=g["init"].clone(), num_inference_steps=j["steps"], guidance_scale=j["guidance"],
                     output_type="latent").images
    return final, j, g


def main():
    import diffusers
    import peft
    import transformers
    doc = {"rank": RANK, "multipliers": MULTIPLIER, "cases": {},
           "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                        "transformers": transformers.__version__, "peft": peft.__version__}}
    only = sys.argv[1:] or None
    if only:  # remaking some cases keeps the others' entries
        with open(os.path.join(HERE, "golden.json")) as f:
            doc["cases"] = json.load(f)["cases"]
    for family in FAMILIES:
        for fmt in ("peft", "kohya"):
            if only and f"{family}_{fmt}" not in only:
                continue
            lora = os.path.join(HERE, f"{family}_{fmt}.lora.safetensors")
            expect = (make_peft if fmt == "peft" else make_kohya)(family, lora)
            pipe = load_pipe(family)
            pipe.load_lora_weights(lora, adapter_name="x")
            pipe.fuse_lora(lora_scale=MULTIPLIER[fmt], adapter_names=["x"])
            pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
            checked = check_fused(pipe, family, expect, MULTIPLIER[fmt])
            assert checked == len(expect)
            final, j, g = run(pipe, family)
            base_final = g["final"]
            rel = ((final - base_final).norm() / base_final.norm()).item()
            print(f"{family} {fmt}: {checked} modules fused and checked; final differs from the base "
                  f"model's by rel L2 {rel:.3f}")
            assert rel > 1e-2, "the LoRA has no visible effect"
            save_file({"final": final.contiguous()}, os.path.join(HERE, f"{family}_{fmt}.golden.safetensors"))
            doc["cases"][f"{family}_{fmt}"] = {
                "model": os.path.relpath(FAMILIES[family]["model"], GOLDEN),
                "settings_from": os.path.relpath(FAMILIES[family]["json"], GOLDEN),
                "init_from": os.path.relpath(FAMILIES[family]["golden"], GOLDEN) + " (init)",
                "lora": os.path.basename(lora),
                "multiplier": MULTIPLIER[fmt],
                "lora_dtype": str(KOHYA_DTYPE if fmt == "kohya" else torch.float32).replace("torch.", ""),
                "modules": checked,
                "final_rel_l2_vs_base": rel,
            }
    with open(os.path.join(HERE, "golden.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
