#!/usr/bin/env python3
"""Golden reference files for TKG-DM's initial-noise construction.

The reference implementation is the paper authors' repository ryugo417/TKG-DM (file utils.py).
Its code is NOT part of this repository: this script takes the path to a checkout (or a bare git
dir) of that repository, extracts utils.py into a temporary directory at run time, imports it and
calls its own `channel_mean_shift`, `create_2d_gaussian` and `tkg_noise`.

Writes, next to this file:
  tkg.safetensors   tensors per case (see cases.json and ../README.md)
  cases.json        what each case is

Usage:
  /work/pyenv/bin/python tests/golden/tkg/make_golden.py [--tkg-repo PATH]

This module is also imported by ../sd15/make_golden.py, which uses `load_reference` and
`tkg_init` to build the `init` latents of the SD1.5 goldens.
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TKG_REPO = "/work/.mirror/ryugo417+TKG-DM/repo"


# --------------------------------------------------------------------------------------------
# Loading the reference code
# --------------------------------------------------------------------------------------------
def _read_utils_py(repo: str) -> tuple[str, str]:
    """Returns (source of utils.py, a description of where it came from)."""
    plain = os.path.join(repo, "utils.py")
    if os.path.isfile(plain):
        return open(plain, encoding="utf-8").read(), plain
    # A bare git dir (or a work tree whose utils.py is not checked out): read it from HEAD.
    rev = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                         capture_output=True, text=True).stdout.strip()
    src = subprocess.run(["git", "-C", repo, "show", "HEAD:utils.py"], check=True,
                         capture_output=True, text=True).stdout
    return src, f"{repo} @ {rev}:utils.py"


_REF = None


def load_reference(repo: str = DEFAULT_TKG_REPO):
    """Imports the reference utils.py (as module name `utils`, because its tkg_noise does
    `from utils import ...` internally). Returns (module, provenance dict)."""
    global _REF
    if _REF is not None:
        return _REF
    src, origin = _read_utils_py(repo)
    tmp = tempfile.mkdtemp(prefix="tkg_ref_")
    with open(os.path.join(tmp, "utils.py"), "w", encoding="utf-8") as f:
        f.write(src)
    sys.path.insert(0, tmp)
    sys.modules.pop("utils", None)
    mod = importlib.import_module("utils")
    assert os.path.dirname(os.path.abspath(mod.__file__)) == tmp, mod.__file__
    for name in ("channel_mean_shift", "create_2d_gaussian", "tkg_noise"):
        assert hasattr(mod, name), f"reference utils.py has no {name}"
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True).stdout.strip()
    except Exception:  # noqa: BLE001 - a plain directory copy
        rev = None
    import hashlib
    prov = {"repo": "ryugo417/TKG-DM", "commit": rev, "file": "utils.py", "source": origin,
            "utils_py_sha256": hashlib.sha256(src.encode("utf-8")).hexdigest()}
    _REF = (mod, prov)
    return _REF


# --------------------------------------------------------------------------------------------
# Mirror of the reference logic, with the shift and the coarse-grid size as parameters
# --------------------------------------------------------------------------------------------
def cms_delta(z: torch.Tensor, c: int, target_shift: float) -> tuple[float, int]:
    """Mirror of the loop in the reference channel_mean_shift for one channel (sign +).
    Returns (delta as the Python float the reference ends with, number of +0.01 steps)."""
    channel = z[:, c, :, :]
    initial_ratio = (channel > 0).float().mean()
    target_ratio = initial_ratio + target_shift
    delta, k = 0.0, 0
    while True:
        shifted = channel + delta
        if (shifted > 0).float().mean() >= target_ratio:
            return delta, k
        delta += 0.01
        k += 1


def gaussian_grid(gh: int, gw: int, std_dev: float, cx: float = 0.0, cy: float = 0.0) -> torch.Tensor:
    """The reference create_2d_gaussian, but taking the grid size itself (not size*8)."""
    y = torch.linspace(-1, 1, gh)
    x = torch.linspace(-1, 1, gw)
    y_grid, x_grid = torch.meshgrid(y, x, indexing="ij")
    x_grid = x_grid - cx
    y_grid = y_grid - cy
    g = torch.exp(-((x_grid ** 2 + y_grid ** 2) / (2 * std_dev ** 2)))
    return g.unsqueeze(0).unsqueeze(0)


def tkg_grid_size(h: int, w: int) -> tuple[int, int]:
    """Coarse-grid size used for the mask: the reference's (h // 8, w // 8), but at least 2
    cells per side (linspace(-1, 1, 1) would be a single cell at -1 and 0 cells is empty)."""
    return max(2, h // 8), max(2, w // 8)


def tkg_init(z: torch.Tensor, target_shift: float, std_dev: float = 0.5, cx: float = 0.0,
             cy: float = 0.0, channels=(1, 2), grid=None):
    """Mirror of the reference tkg_noise with the shift / mask settings and the grid size as
    parameters. Same ops in the same order and dtypes:
      z* = z with channels 1,2 shifted by +delta (found with the reference loop)
      mask = bilinear(align_corners=False) upsample of the coarse Gaussian to (h, w),
             expanded to all channels, cast to float16
      out = mask * z + (1 - mask) * z*      (1 - mask is computed in float16)
    Returns (out, info dict)."""
    assert z.dtype == torch.float32 and z.shape[0] == 1
    h, w = z.shape[2], z.shape[3]
    gh, gw = grid if grid is not None else tkg_grid_size(h, w)
    z_star = z.clone()
    deltas, steps = [], []
    for c in channels:
        d, k = cms_delta(z, c, target_shift)
        z_star[:, c, :, :] = z[:, c, :, :] + d
        deltas.append(d)
        steps.append(k)
    mask = gaussian_grid(gh, gw, std_dev, cx, cy)
    mask = F.interpolate(mask, size=(h, w), mode="bilinear", align_corners=False)
    mask = mask.expand(-1, z.shape[1], -1, -1)
    mask = mask.to(torch.float16)
    out = mask * z + (1 - mask) * z_star
    info = {"target_shift": target_shift, "channels": list(channels), "signs": [1] * len(channels),
            "delta": deltas, "delta_steps": steps, "sigma": std_dev, "center": [cx, cy],
            "grid": [gh, gw]}
    return out, info


def self_check(ref) -> dict:
    """tkg_init must agree bit for bit with the reference tkg_noise where the grid rule is the
    reference's own (h, w >= 16) and the settings are tkg_noise's (shift 0.11, sigma 0.5,
    centre 0,0)."""
    results = []
    for shape, seed in (([1, 4, 64, 64], 1234), ([1, 4, 32, 48], 99), ([1, 4, 16, 24], 7)):
        z = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        want = ref.tkg_noise(z.clone(), "cpu")
        got, _ = tkg_init(z, 0.11, grid=(shape[2] // 8, shape[3] // 8))
        assert want.dtype == got.dtype == torch.float32, (want.dtype, got.dtype)
        assert torch.equal(want, got), f"tkg_init != reference tkg_noise for {shape}"
        results.append({"shape": shape, "seed": seed, "bit_exact": True})
    return {"what": "tkg_init(z, 0.11, grid=(h//8, w//8)) == reference tkg_noise(z, 'cpu')",
            "cases": results}


def stats(name, t):
    tf = t.double()
    print(f"  {name:28s} {str(t.dtype):14s} {str(list(t.shape)):18s} "
          f"maxabs={tf.abs().max().item():.6g} min={tf.min().item():.6g} "
          f"max={tf.max().item():.6g} mean={tf.mean().item():.6g}")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
# (shape, seed, target_shift for channel_mean_shift, masks: [(sigma, cx, cy)])
CASES = [
    ([1, 4, 64, 64], 0, 0.07, [(0.5, 0.0, 0.0), (0.3, 0.3, -0.2)]),
    ([1, 4, 128, 128], 1, 0.11, [(0.5, 0.0, 0.0), (0.5, 0.3, -0.2)]),
    ([1, 4, 96, 64], 2, 0.11, [(0.5, 0.0, 0.0), (0.3, 0.3, -0.2)]),
    ([1, 4, 32, 48], 3, 0.07, [(0.5, 0.0, 0.0), (0.5, 0.3, -0.2), (0.3, 0.0, 0.0)]),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tkg-repo", default=DEFAULT_TKG_REPO,
                    help="checkout or bare git dir of ryugo417/TKG-DM (default: %(default)s)")
    ap.add_argument("--out", default=HERE, help="output directory (default: this script's directory)")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    ref, prov = load_reference(args.tkg_repo)
    print(f"reference: {prov}")

    check = self_check(ref)
    print("self-check OK:", check["what"])

    tensors, cases = {}, []
    for i, (shape, seed, shift, masks) in enumerate(CASES):
        _, _, h, w = shape
        p = f"case{i}."
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        cms = ref.channel_mean_shift(noise.clone(), shift)
        tkg = ref.tkg_noise(noise.clone(), "cpu")  # its own defaults: shift 0.11, sigma 0.5, centre 0,0

        # delta per channel: mirror the reference loop and check it reproduces cms exactly
        deltas, steps = [], []
        for c in (1, 2):
            d, k = cms_delta(noise, c, shift)
            assert torch.equal(noise[:, c] + d, cms[:, c]), (i, c)
            deltas.append(d)
            steps.append(k)
        assert torch.equal(cms[:, 0], noise[:, 0]) and torch.equal(cms[:, 3], noise[:, 3])
        d11 = []
        for c in (1, 2):
            d11.append(cms_delta(noise, c, 0.11))
        # the tkg_noise output must equal the mirror with its defaults
        mirror, _ = tkg_init(noise, 0.11, grid=(h // 8, w // 8))
        assert torch.equal(mirror, tkg), i

        # The noise itself is not stored: the Rust test draws it again from `seed` with its
        # torch-exact CPU generator (held to torch by tests/golden/rng), to keep the folder small.
        tensors[p + "cms"] = cms
        tensors[p + "delta"] = torch.tensor(deltas, dtype=torch.float64)
        tensors[p + "tkg_noise"] = tkg
        mask_desc = []
        for j, (sigma, cx, cy) in enumerate(masks):
            grid = ref.create_2d_gaussian(h, w, sigma, cx, cy)
            assert grid.shape == (1, 1, h // 8, w // 8)
            up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            tensors[p + f"mask{j}_grid"] = grid.contiguous()
            tensors[p + f"mask{j}"] = up.contiguous()
            mask_desc.append({
                "sigma": sigma, "center": [cx, cy], "grid": [h // 8, w // 8],
                "call": f"create_2d_gaussian({h}, {w}, {sigma}, {cx}, {cy})",
                "tensors": {"grid": p + f"mask{j}_grid", "mask": p + f"mask{j}"},
            })
        cases.append({
            "name": f"case{i}",
            "shape": shape,
            "seed": seed,
            "noise": f"torch.randn({shape}, generator=torch.Generator('cpu').manual_seed({seed}), dtype=float32)",
            "cms": {"call": f"channel_mean_shift(noise, target_shift={shift})", "target_shift": shift,
                    "channels": [1, 2], "signs": [1, 1],
                    "delta": deltas, "delta_steps": steps,
                    "tensors": {"result": p + "cms", "delta": p + "delta"}},
            "tkg_noise": {"call": "tkg_noise(noise, 'cpu')",
                          "effective_settings": {"target_shift": 0.11, "sigma": 0.5, "center": [0, 0],
                                                 "grid": [h // 8, w // 8], "mask_dtype": "float16"},
                          "delta": [d for d, _ in d11], "delta_steps": [k for _, k in d11],
                          "tensors": {"result": p + "tkg_noise"}},
            "masks": mask_desc,
            "tensors": {"noise": "not stored: drawn again from seed"},
        })

    # a tiny-latent case for the max(2, .//8) grid rule (no reference call can make it: the
    # reference would build a 1-cell grid). Computed with the mirror, documented as such.
    tiny_shape, tiny_seed = [1, 4, 12, 16], 5
    noise = torch.randn(tiny_shape, generator=torch.Generator("cpu").manual_seed(tiny_seed), dtype=torch.float32)
    out, info = tkg_init(noise, 0.07)
    tensors["tiny.noise"] = noise
    tensors["tiny.tkg_init"] = out
    tiny = {"name": "tiny", "shape": tiny_shape, "seed": tiny_seed, "mirror_settings": info,
            "note": "NOT a reference call: tkg_init (this script's mirror of tkg_noise) with shift 0.07 and "
                    "grid max(2, h//8) x max(2, w//8); the reference's own grid would be 1x2 here.",
            "tensors": {"noise": "tiny.noise", "result": "tiny.tkg_init"}}

    print("tensors:")
    for k, v in tensors.items():
        stats(k, v)

    from safetensors.torch import save_file
    os.makedirs(args.out, exist_ok=True)
    st_path = os.path.join(args.out, "tkg.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, st_path,
              metadata={"generator": "tests/golden/tkg/make_golden.py"})
    doc = {
        "reference": prov,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "notes": [
            "noise is torch.randn on CPU with torch.Generator('cpu').manual_seed(seed), float32.",
            "channel_mean_shift: per channel c in (1, 2): p0 = mean(z[c] > 0) (float32); target = p0 + shift "
            "(float32); delta starts at 0.0 and is increased by 0.01 in Python float (f64) until "
            "mean(z[c] + delta > 0) >= target; z*[c] = z[c] + delta, the f64 delta rounded to f32 for the add. "
            "`delta` holds that f64 value; `delta_steps` how many times 0.01 was added.",
            "tkg_noise ignores any shift argument: it calls channel_mean_shift with its default 0.11, mask sigma 0.5, "
            "centre (0,0), grid (h//8, w//8).",
            "mask: create_2d_gaussian(h, w, sigma, cx, cy) builds a (h//8) x (w//8) grid of "
            "exp(-((x-cx)^2 + (y-cy)^2) / (2 sigma^2)) with x = linspace(-1, 1, w//8), y = linspace(-1, 1, h//8), "
            "float32; it is then F.interpolate(size=(h, w), mode='bilinear', align_corners=False).",
            "tkg_noise casts the upsampled mask to float16; 1 - mask is computed in float16; "
            "out = mask.float() * z + (1 - mask).float() * z_star, in float32.",
        ],
        "self_check": check,
        "cases": cases + [tiny],
    }
    with open(os.path.join(args.out, "cases.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"wrote {st_path} ({os.path.getsize(st_path)} bytes) and cases.json")


if __name__ == "__main__":
    main()
