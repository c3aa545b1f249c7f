#!/usr/bin/env python3
"""Single-file (A1111 / ComfyUI, LDM names) versions of the tiny golden models, as manifests.

For tests/golden/sd15/a/model and tests/golden/sdxl/a/model this converts the diffusers folder
into one single-file state dict with the inverse of diffusers' mapping (written here, from the
LDM layout), then checks that diffusers' own forward conversion (loaders/single_file_utils.py:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint) turns it back into exactly the folder's weights.

The single files themselves (6 MB and 3 MB of random floats) are not committed. Instead
<family>.manifest.json lists, for every tensor of the single file, how it is made from the
folder's files: ["ldm name", op, "component file", ["source tensor", ...]] with op one of
  copy      the tensor as stored
  cat       q, k, v concatenated along dim 0 (OpenCLIP's fused in_proj)
  t         transposed (OpenCLIP's text_projection, stored [in, out])
  conv1x1   a [C, C] linear weight stored as a [C, C, 1, 1] conv (VAE mid-block attention)
The Rust test (tests/it/single_file_load.rs) builds the file from the manifest and checks that
loading it gives exactly what loading the folder gives.

Usage: /work/pyenv/bin/python tests/golden/single_file/make_manifest.py
"""
import json
import os
import sys

sys.dont_write_bytecode = True
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)
MODELS = {"sd15": os.path.join(GOLDEN, "sd15", "a", "model"), "sdxl": os.path.join(GOLDEN, "sdxl", "a", "model")}

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_ldm(name, cfg):
    L = cfg["layers_per_block"]
    p = name.split(".")
    j = ".".join

    def res(tail):
        return j([RESNET.get(tail[0], tail[0])] + tail[1:])

    top = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if p[0] in top:
        return top[p[0]] + "." + j(p[1:])
    if p[0] in ("time_embedding", "add_embedding"):
        base = "time_embed" if p[0] == "time_embedding" else "label_emb.0"
        return f"{base}.{ {'linear_1': 0, 'linear_2': 2}[p[1]] }." + j(p[2:])
    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "resnets":
            return f"input_blocks.{1 + i * (L + 1) + int(p[3])}.0." + res(p[4:])
        if p[2] == "attentions":
            return f"input_blocks.{1 + i * (L + 1) + int(p[3])}.1." + j(p[4:])
        if p[2] == "downsamplers":
            return f"input_blocks.{(i + 1) * (L + 1)}.0.op." + j(p[5:])
    if p[0] == "mid_block":
        slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
        return f"middle_block.{slot}." + (res(p[3:]) if p[1] == "resnets" else j(p[3:]))
    if p[0] == "up_blocks":
        i = int(p[1])
        if p[2] == "resnets":
            return f"output_blocks.{i * (L + 1) + int(p[3])}.0." + res(p[4:])
        if p[2] == "attentions":
            return f"output_blocks.{i * (L + 1) + int(p[3])}.1." + j(p[4:])
        if p[2] == "upsamplers":
            slot = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
            return f"output_blocks.{i * (L + 1) + L}.{slot}.conv." + j(p[5:])
    raise KeyError(name)


def vae_ldm(name, cfg):
    """-> (ldm name, op)"""
    n = len(cfg["block_out_channels"])
    p = name.split(".")
    j = ".".join
    if p[0] in ("quant_conv", "post_quant_conv"):
        return name, "copy"

    def res(tail):
        return j(["nin_shortcut" if tail[0] == "conv_shortcut" else tail[0]] + tail[1:])

    side = p[0]
    if p[1] in ("conv_in", "conv_out"):
        return name, "copy"
    if p[1] == "conv_norm_out":
        return f"{side}.norm_out." + j(p[2:]), "copy"
    if p[1] == "mid_block":
        if p[2] == "resnets":
            return f"{side}.mid.block_{int(p[3]) + 1}." + res(p[4:]), "copy"
        mod = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[p[4]]
        tail = p[6:] if p[4] == "to_out" else p[5:]
        op = "conv1x1" if mod != "norm" and tail == ["weight"] else "copy"
        return f"{side}.mid.attn_1.{mod}." + j(tail), op
    if p[1] == "down_blocks":
        if p[3] == "resnets":
            return f"encoder.down.{p[2]}.block.{p[4]}." + res(p[5:]), "copy"
        return f"encoder.down.{p[2]}.downsample." + j(p[5:]), "copy"
    if p[1] == "up_blocks":
        k = n - 1 - int(p[2])
        if p[3] == "resnets":
            return f"decoder.up.{k}.block.{p[4]}." + res(p[5:]), "copy"
        return f"decoder.up.{k}.upsample." + j(p[5:]), "copy"
    raise KeyError(name)


OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def open_clip_entries(sd, file, prefix):
    out = []
    for k in sorted(sd):
        if k.endswith("position_ids"):
            continue
        n = k.removeprefix("text_model.")
        if k == "text_projection.weight":
            out.append([prefix + "text_projection", "t", file, [k]])
        elif n == "embeddings.token_embedding.weight":
            out.append([prefix + "token_embedding.weight", "copy", file, [k]])
        elif n == "embeddings.position_embedding.weight":
            out.append([prefix + "positional_embedding", "copy", file, [k]])
        elif n.startswith("final_layer_norm."):
            out.append([prefix + "ln_final." + n.split(".")[-1], "copy", file, [k]])
        else:
            p = n.split(".")  # encoder.layers.i.<module...>.<param>
            i, module, param = p[2], ".".join(p[3:-1]), p[-1]
            block = f"{prefix}transformer.resblocks.{i}."
            if module == "self_attn.q_proj":
                srcs = [k.replace("q_proj", x) for x in ("q_proj", "k_proj", "v_proj")]
                out.append([block + f"attn.in_proj_{param}", "cat", file, srcs])
            elif module in ("self_attn.k_proj", "self_attn.v_proj"):
                continue
            else:
                out.append([block + OPEN_CLIP[module] + "." + param, "copy", file, [k]])
    return out


def build(entries, folder):
    cache = {}
    ckpt = {}
    for ldm, op, file, srcs in entries:
        if file not in cache:
            cache[file] = load_file(os.path.join(folder, file))
        ts = [cache[file][s] for s in srcs]
        if op == "copy":
            v = ts[0]
        elif op == "cat":
            v = torch.cat(ts, 0)
        elif op == "t":
            v = ts[0].T.contiguous()
        elif op == "conv1x1":
            v = ts[0][:, :, None, None]
        assert ldm not in ckpt, ldm
        ckpt[ldm] = v.contiguous()
    return ckpt


def main():
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    import diffusers
    for family, folder in MODELS.items():
        cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
        pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
        ucfg = dict(pipe.unet.config)
        vcfg = dict(pipe.vae.config)
        entries = []
        f = "unet/diffusion_pytorch_model.safetensors"
        entries += [["model.diffusion_model." + unet_ldm(k, ucfg), "copy", f, [k]] for k in sorted(load_file(os.path.join(folder, f)))]
        f = "vae/diffusion_pytorch_model.safetensors"
        for k in sorted(load_file(os.path.join(folder, f))):
            ldm, op = vae_ldm(k, vcfg)
            entries.append(["first_stage_model." + ldm, op, f, [k]])
        f = "text_encoder/model.safetensors"
        clip_prefix = "cond_stage_model.transformer." if family == "sd15" else "conditioner.embedders.0.transformer."
        for k in sorted(load_file(os.path.join(folder, f))):
            if k.endswith("position_ids"):
                continue
            kk = k if k.startswith("text_model.") else "text_model." + k
            entries.append([clip_prefix + kk, "copy", f, [k]])
        if family == "sdxl":
            f = "text_encoder_2/model.safetensors"
            entries += open_clip_entries(load_file(os.path.join(folder, f)), f, "conditioner.embedders.1.model.")
        ckpt = build(entries, folder)

        # diffusers' forward mapping must give back exactly the folder's weights
        def same(got, model, what):
            # transformers 5 names CLIP weights without "text_model."; compare without it
            want = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()
                    if not k.endswith("position_ids")}
            got = {k.removeprefix("text_model."): v for k, v in got.items() if not k.endswith("position_ids")}
            assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:10])
            for k in want:
                assert torch.equal(got[k].reshape(want[k].shape), want[k]), (what, k)
            print(f"  {family} {what}: {len(want)} tensors round-trip exactly")

        same(convert_ldm_unet_checkpoint(dict(ckpt), ucfg), pipe.unet, "unet")
        same(convert_ldm_vae_checkpoint(dict(ckpt), vcfg), pipe.vae, "vae")
        same(convert_ldm_clip_checkpoint(dict(ckpt)), pipe.text_encoder, "text_encoder")
        if family == "sdxl":
            same(convert_open_clip_checkpoint(pipe.text_encoder_2, dict(ckpt), prefix="conditioner.embedders.1.model."),
                 pipe.text_encoder_2, "text_encoder_2")
        doc = {"family": family, "model": os.path.relpath(folder, GOLDEN),
               "generator": "tests/golden/single_file/make_manifest.py",
               "diffusers": diffusers.__version__, "tensors": len(entries), "entries": entries}
        with open(os.path.join(HERE, f"{family}.manifest.json"), "w") as fh:
            json.dump(doc, fh, indent=0)
            fh.write("\n")


if __name__ == "__main__":
    main()
