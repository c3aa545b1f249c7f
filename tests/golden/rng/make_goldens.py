#!/usr/bin/env python3
"""Writes tests/golden/rng/goldens.json: reference noise for `tkg --rng torch-cpu|torch-cuda`.

torch-cpu: drawn by torch itself,
    torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
on this machine (the torch version and the ATen CPU capability used are recorded; the AVX2
kernel is the one tkg reproduces).

torch-cuda: there is no GPU here, so these come from the independent NumPy reimplementation
below of what torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed),
device="cuda") computes (PyTorch: aten/src/ATen/native/cuda/DistributionTemplates.h,
normal_and_transform -> distribution_nullary_kernel with curand_normal4, unroll 4, blocks of
256 threads, grid capped at SMs x maxThreadsPerSM / 256; curand: curand_init(seed,
subsequence = thread index, offset = philox offset = 0 for a fresh generator), Philox4x32-10,
_curand_box_muller). The integer stream is exact; log/sin/cos here are correctly rounded
(float64, rounded once), whereas a GPU uses its own logf and the __sincosf intrinsic, so real
GPU values differ from these by about 1e-6. This is the same algorithm as A1111's
modules/rng_philox.py ("NV" seed).

Usage: /work/pyenv/bin/python tests/golden/rng/make_goldens.py  (from the repository root)
"""
import hashlib
import json
import math
import os
import sys

import numpy as np
import torch

CASES = [
    # (seed, shape)
    (0, [1, 4, 64, 64]),  # SD1.5 512x512
    (1, [1, 4, 64, 64]),
    (42, [1, 4, 64, 64]),
    (1234567890, [1, 4, 64, 64]),
    (4294967301, [1, 4, 64, 64]),  # 2^32 + 5: torch's CPU generator keeps the low 32 bits
    (7, [1, 4, 128, 128]),  # SDXL 1024x1024
    (2024, [1, 4, 96, 64]),  # 512x768
    (3, [1, 4, 17, 13]),  # not a multiple of 16: torch redraws the last 16
    (99, [2, 4, 8, 8]),
    (5, [21]),
    (11, [5]),  # below 16: torch's scalar double path
    (123, [16]),
]

# One capped-grid case for torch-cuda: a GPU with 40 SMs x 1024 threads (e.g. a T4).
CUDA_CAPPED = [(7, [1, 4, 128, 128], 40 * 1024)]


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.astype("<f4").tobytes()).hexdigest()


def summary(a: np.ndarray) -> dict:
    bits = a.astype("<f4").view("<u4")
    return {
        "n": int(a.size),
        "sha256": digest(a),
        "head_bits": [f"{int(b):08x}" for b in bits[:8]],
        "tail_bits": [f"{int(b):08x}" for b in bits[-8:]],
        "head": [float(v) for v in a[:4]],
    }


# ---- torch CPU ------------------------------------------------------------------------------


def torch_cpu(seed, shape):
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).reshape(-1).numpy()


# ---- torch CUDA (reimplementation) ----------------------------------------------------------

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)


def philox(ctr, key):
    """ctr: 4 x n uint32, key: 2 x n uint32 -> 4 x n uint32 (Philox4x32-10)."""
    c = [x.astype(np.uint64) for x in ctr]
    k = [x.astype(np.uint64) for x in key]
    mask = np.uint64(0xFFFFFFFF)
    for r in range(10):
        if r:
            k[0] = (k[0] + np.uint64(W0)) & mask
            k[1] = (k[1] + np.uint64(W1)) & mask
        p0 = M0 * c[0]
        p1 = M1 * c[2]
        c = [
            (p1 >> np.uint64(32)) ^ c[1] ^ k[0],
            p1 & mask,
            (p0 >> np.uint64(32)) ^ c[3] ^ k[1],
            p0 & mask,
        ]
    return [x.astype(np.uint32) for x in c]


INV = np.float32(2.3283064e-10)
INV_2PI = np.float32(INV * np.float32(6.2831855))


def fma_f32(x, a, b):
    # x * a + b with one rounding: the exact sum fits x86's 64-bit long double mantissa.
    return (x.astype(np.longdouble) * np.longdouble(a) + np.longdouble(b)).astype(np.float32)


def box_muller(x, y):
    u = fma_f32(x.astype(np.float32), INV, INV / np.float32(2))
    v = fma_f32(y.astype(np.float32), INV_2PI, INV_2PI / np.float32(2))
    logu = np.array([math.log(float(t)) for t in u], dtype=np.float32)
    s = np.sqrt(np.float32(-2.0) * logu).astype(np.float32)
    sin = np.array([math.sin(float(t)) for t in v], dtype=np.float32)
    cos = np.array([math.cos(float(t)) for t in v], dtype=np.float32)
    return (sin * s).astype(np.float32), (cos * s).astype(np.float32)


def torch_cuda(seed, shape, max_threads=None):
    n = int(np.prod(shape))
    block = 256
    blocks = -(-n // block)
    if max_threads is not None:
        blocks = min(blocks, max(max_threads // block, 1))
    threads = blocks * block
    out = np.zeros(n, dtype=np.float32)
    idx = np.arange(min(threads, n), dtype=np.uint64)
    key = [np.full(idx.size, seed & 0xFFFFFFFF, np.uint32), np.full(idx.size, seed >> 32, np.uint32)]
    call, base = 0, idx.copy()
    while True:
        live = base < n
        if not live.any():
            break
        ctr = [
            np.full(idx.size, call & 0xFFFFFFFF, np.uint32),
            np.full(idx.size, call >> 32, np.uint32),
            (idx & np.uint64(0xFFFFFFFF)).astype(np.uint32),
            (idx >> np.uint64(32)).astype(np.uint32),
        ]
        r = philox(ctr, key)
        a, b = box_muller(r[0], r[1])
        c, d = box_muller(r[2], r[3])
        for ii, lane in enumerate([a, b, c, d]):
            li = base + np.uint64(ii * threads)
            ok = li < n
            out[li[ok].astype(np.int64)] = lane[ok]
        call += 1
        base = base + np.uint64(threads * 4)
    return out


def main():
    cpu = []
    for seed, shape in CASES:
        a = torch_cpu(seed, shape)
        cpu.append({"seed": seed, "shape": shape, **summary(a)})
    cuda = []
    for seed, shape in CASES:
        a = torch_cuda(seed, shape)
        cuda.append({"seed": seed, "shape": shape, "max_threads": None, **summary(a)})
    for seed, shape, cap in CUDA_CAPPED:
        a = torch_cuda(seed, shape, cap)
        cuda.append({"seed": seed, "shape": shape, "max_threads": cap, **summary(a)})
    doc = {
        "generated_by": "tests/golden/rng/make_goldens.py",
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch-cpu": cpu,
        "torch-cuda": cuda,
        "torch-cuda_note": "reimplementation, not drawn on a GPU; see make_goldens.py",
    }
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
