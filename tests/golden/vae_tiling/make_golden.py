"""Goldens for tkg's VAE tiling: diffusers' own AutoencoderKL tiled decode and tiled encode
(`enable_tiling()`) on the tiny VAE of tests/golden/sd15/a, with its sample_size lowered to
16 so that a 48x64 image spans 4x6 tiles (latent tiles of 8, pixel tiles of 16).

Writes config.json (the VAE config with that sample_size) and golden.safetensors:
  latents        [1, 4, 24, 32]  scaled latents, as the pipeline hands them to the VAE
  tiled_image    [1, 3, 48, 64]  vae.decode(latents / scaling_factor) with tiling
  untiled_image  [1, 3, 48, 64]  the same without tiling (to show the tiles matter)
  image          [1, 3, 48, 64]  an image in [-1, 1]
  tiled_mean, tiled_std [1, 4, 24, 32]  vae.encode(image).latent_dist with tiling

Run from the repository root: /work/pyenv/bin/python tests/golden/vae_tiling/make_golden.py
"""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

HERE = Path(__file__).parent
SRC = HERE.parent / "sd15" / "a" / "model" / "vae"
SAMPLE_SIZE = 16

vae = AutoencoderKL.from_pretrained(SRC, sample_size=SAMPLE_SIZE, torch_dtype=torch.float32).eval()
assert vae.tile_sample_min_size == SAMPLE_SIZE and vae.tile_latent_min_size == 8

cfg = json.loads((SRC / "config.json").read_text())
cfg["sample_size"] = SAMPLE_SIZE
(HERE / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

g = torch.Generator().manual_seed(20)
latents = torch.randn((1, 4, 24, 32), generator=g) * 0.8
image = torch.rand((1, 3, 48, 64), generator=g) * 2 - 1

with torch.no_grad():
    z = latents / vae.config.scaling_factor
    untiled = vae.decode(z).sample
    vae.enable_tiling()
    tiled = vae.decode(z).sample
    dist = vae.encode(image).latent_dist

out = {
    "latents": latents,
    "tiled_image": tiled,
    "untiled_image": untiled,
    "image": image,
    "tiled_mean": dist.mean,
    "tiled_std": dist.std,
}
save_file({k: v.contiguous() for k, v in out.items()}, HERE / "golden.safetensors")
diff = (tiled - untiled).abs().max().item()
print(f"wrote {HERE}: tiled vs untiled decode max abs {diff:.4g}")
