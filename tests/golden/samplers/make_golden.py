#!/usr/bin/env python3
"""Writes tests/golden/samplers/golden.json: diffusers' schedulers driven by a synthetic model.

For each case a scheduler class is built with `Class.from_config(config, **overrides)` (keys the
config lacks take the class's own defaults, exactly as a diffusers user switching scheduler gets),
`set_timesteps(steps)` is called, and the denoise loop of diffusers' pipelines runs:

    latents = randn_tensor(shape, generator=[Generator("cpu").manual_seed(s) for s in seeds])
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(model(x, t), t, latents, [generator=..., eta=...]).prev_sample

with the same list of generators passed to `step` for the stochastic samplers (euler-a,
dpm++2m-sde, lcm, ddim with eta > 0). `model` is a fixed float32 function made of basic
arithmetic only (so tkg can compute it bit for bit):

    model(x, t) = (x * 0.9) / ((x * x) * 0.05 + 1.0) + f32(0.05 * cos(t / 100))

Recorded per case: the timesteps as the UNet gets them, init_noise_sigma, and the latents after
step len(timesteps) // 2 - 1 ("mid", none for a single call) and at the end ("final"), as float32
bit patterns (8 hex digits per value, concatenated). Plus `generator`: successive torch.randn calls
on one CPU generator.

Usage (from the repository root, no network): /work/pyenv/bin/python tests/golden/samplers/make_golden.py
    [--out PATH]
"""
import json
import math
import os
import platform
import sys

import numpy as np
import torch

import diffusers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden.json")
if "--out" in sys.argv:
    OUT = sys.argv[sys.argv.index("--out") + 1]

SHAPE = (2, 4, 3, 5)  # 60 values per row: not a multiple of 16 (torch's tail redraw)
SEEDS = [42, 1234]

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json (a PNDMScheduler config)
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
CONFIGS = {
    "sd15": SD15,
    "sdxl": SDXL,
    "vpred": {**SDXL, "prediction_type": "v_prediction"},
    "trailing": {**SD15, "timestep_spacing": "trailing"},
    "defaults": {},  # every value from the class defaults
}

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}
STOCHASTIC = {"euler-a", "dpm++2m-sde", "lcm"}
# The schedules each class supports (use_karras_sigmas / use_exponential_sigmas in __init__).
SCHEDULES = {
    "ddim": ["default"],
    "euler": ["default", "karras", "exponential"],
    "euler-a": ["default"],
    "heun": ["default", "karras", "exponential"],
    "dpm++2m": ["default", "karras", "exponential"],
    "dpm++2m-sde": ["default", "karras", "exponential"],
    "unipc": ["default", "karras", "exponential"],
    "lcm": ["default"],
}
SCHEDULE_KW = {
    "default": {},
    "karras": {"use_karras_sigmas": True, "use_exponential_sigmas": False},
    "exponential": {"use_exponential_sigmas": True, "use_karras_sigmas": False},
}


def model(x: torch.Tensor, t) -> torch.Tensor:
    c = float(np.float32(0.05 * math.cos(float(t) / 100.0)))
    return (x * 0.9) / ((x * x) * 0.05 + 1.0) + c


def hexf(t: torch.Tensor) -> str:
    a = t.detach().to(torch.float32).contiguous().numpy().astype("<f4").reshape(-1)
    return "".join(f"{int(b):08x}" for b in a.view("<u4"))


def run_case(name, sampler, schedule, config_name, steps, extra=None, spacing=None, eta=0.0):
    cls, kw = SAMPLERS[sampler]
    cfg = dict(CONFIGS[config_name])
    overrides = {**kw, **SCHEDULE_KW[schedule], **(extra or {})}
    if spacing is not None:
        overrides["timestep_spacing"] = spacing
    sched = cls.from_config(cfg, **overrides)
    sched.set_timesteps(steps)
    gens = [torch.Generator("cpu").manual_seed(s) for s in SEEDS]
    latents = randn_tensor(SHAPE, generator=gens, dtype=torch.float32)
    latents = latents * sched.init_noise_sigma
    timesteps = [float(t) for t in sched.timesteps]
    stochastic = sampler in STOCHASTIC or (sampler == "ddim" and eta > 0)
    mid_at = len(timesteps) // 2 - 1
    mid = None
    for i, t in enumerate(sched.timesteps):
        x = sched.scale_model_input(latents, t)
        out = model(x, t)
        kwargs = {}
        if stochastic:
            kwargs["generator"] = gens
        if sampler == "ddim":
            kwargs["eta"] = eta
        latents = sched.step(out, t, latents, **kwargs).prev_sample
        if i == mid_at:
            mid = latents
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all(), name
    ins = sched.init_noise_sigma
    return {
        "name": name,
        "sampler": sampler,
        "schedule": schedule,
        "config": config_name,
        "steps": steps,
        "extra": extra or {},
        "spacing": spacing,
        "eta": eta,
        "class": cls.__name__,
        "timesteps": timesteps,
        "timesteps_dtype": str(sched.timesteps.dtype).replace("torch.", ""),
        "init_noise_sigma": float(ins),
        "mid_index": mid_at,
        "mid": hexf(mid) if mid is not None else None,
        "final": hexf(latents),
    }


def cases():
    out = []
    for sampler in SAMPLERS:
        steps = 4 if sampler == "lcm" else 20
        for schedule in SCHEDULES[sampler]:
            for config_name in CONFIGS:
                out.append(dict(sampler=sampler, schedule=schedule, config_name=config_name, steps=steps))
        # Turbo-like use: 1 and 2 steps with trailing spacing (LCM: its own schedule).
        for steps in (1, 2):
            out.append(dict(sampler=sampler, schedule="default", config_name="trailing", steps=steps))
        # Below 15 steps the multistep solvers lower their order at the end.
        if sampler in ("dpm++2m", "dpm++2m-sde", "unipc"):
            for schedule in SCHEDULES[sampler]:
                out.append(dict(sampler=sampler, schedule=schedule, config_name="sd15", steps=8))
        # tkg's --timestep-spacing overriding the config's.
        if sampler not in ("lcm",):
            for spacing in ("linspace", "trailing"):
                out.append(dict(sampler=sampler, schedule="default", config_name="sdxl", steps=20, spacing=spacing))
    # Config options.
    extra = [
        ("ddim", "sd15", 20, {}, 0.5),
        ("ddim", "trailing", 20, {}, 1.0),
        ("ddim", "vpred", 8, {}, 0.3),
        ("euler", "sdxl", 20, {"final_sigmas_type": "sigma_min"}, 0.0),
        ("euler", "vpred", 20, {"timestep_type": "continuous"}, 0.0),
        ("euler", "sd15", 20, {"prediction_type": "sample"}, 0.0),
        ("euler", "sdxl", 20, {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0}, 0.0),
        ("heun", "sd15", 20, {"clip_sample": True, "clip_sample_range": 2.0}, 0.0),
        ("heun", "sd15", 20, {"prediction_type": "sample"}, 0.0),
        ("dpm++2m", "sdxl", 20, {"final_sigmas_type": "sigma_min"}, 0.0),
        ("dpm++2m", "sdxl", 20, {"solver_type": "heun"}, 0.0),
        ("dpm++2m", "sd15", 8, {"euler_at_final": True}, 0.0),
        ("dpm++2m", "sd15", 8, {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 0.0),
        ("dpm++2m", "sd15", 20, {"prediction_type": "sample"}, 0.0),
        ("dpm++2m", "sd15", 20, {"lambda_min_clipped": -5.1}, 0.0),
        ("dpm++2m-sde", "sdxl", 20, {"solver_type": "heun"}, 0.0),
        ("dpm++2m-sde", "vpred", 20, {"final_sigmas_type": "sigma_min"}, 0.0),
        ("dpm++2m", "sdxl", 20, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 0.0),
        ("unipc", "sdxl", 20, {"final_sigmas_type": "sigma_min"}, 0.0),
        ("unipc", "sdxl", 20, {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 0.0),
        ("unipc", "sd15", 20, {"solver_order": 3}, 0.0),
        ("unipc", "sd15", 8, {"solver_order": 3}, 0.0),
        ("unipc", "sd15", 20, {"solver_order": 1}, 0.0),
        ("unipc", "sd15", 20, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 0.0),
        ("unipc", "sd15", 20, {"predict_x0": False, "final_sigmas_type": "sigma_min"}, 0.0),
        ("unipc", "sd15", 20, {"disable_corrector": [0, 3]}, 0.0),
        ("unipc", "sd15", 8, {"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 0.0),
        ("unipc", "vpred", 20, {"prediction_type": "sample"}, 0.0),
        ("lcm", "sd15", 1, {}, 0.0),
        ("lcm", "sd15", 2, {}, 0.0),
        ("lcm", "sd15", 8, {"original_inference_steps": 100}, 0.0),
        ("lcm", "vpred", 4, {"timestep_scaling": 5.0}, 0.0),
        ("lcm", "sd15", 4, {"clip_sample": True, "set_alpha_to_one": False}, 0.0),
    ]
    for sampler, config_name, steps, ex, eta in extra:
        out.append(dict(sampler=sampler, schedule="default", config_name=config_name, steps=steps, extra=ex, eta=eta))
    return out


def generator_goldens():
    out = []
    sequences = [[7, 7], [16, 16], [37, 37], [64, 64], [7, 64, 5, 3, 37, 1], [60, 60, 60]]
    for seed in (0, 42):
        for seq in sequences:
            g = torch.Generator("cpu").manual_seed(seed)
            draws = [hexf(torch.randn(n, generator=g, dtype=torch.float32)) for n in seq]
            out.append({"seed": seed, "sizes": seq, "draws": draws})
    return out


def main():
    res = []
    names = set()
    for c in cases():
        name = "{sampler}/{schedule}/{config_name}/{steps}".format(**c)
        if c.get("spacing"):
            name += "/spacing=" + c["spacing"]
        if c.get("extra"):
            name += "/" + ",".join(f"{k}={v}" for k, v in sorted(c["extra"].items()))
        if c.get("eta"):
            name += f"/eta={c['eta']}"
        assert name not in names, name
        names.add(name)
        res.append(run_case(name, **c))
    doc = {
        "about": "made by tests/golden/samplers/make_golden.py; see README.md there",
        "shape": list(SHAPE),
        "seeds": SEEDS,
        "configs": CONFIGS,
        "sampler_overrides": {k: v[1] for k, v in SAMPLERS.items()},
        "schedule_overrides": SCHEDULE_KW,
        "cases": res,
        "generator": generator_goldens(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "numpy": np.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
    }
    # One case (one generator sequence) per line: small, and diffs stay readable.
    cases_ = doc.pop("cases")
    gens = doc.pop("generator")
    with open(OUT, "w") as f:
        head = json.dumps(doc, indent=1, sort_keys=True)
        f.write(head[:-2] + ',\n "cases": [\n')
        f.write(",\n".join(json.dumps(c, sort_keys=True) for c in cases_))
        f.write('\n ],\n "generator": [\n')
        f.write(",\n".join(json.dumps(g, sort_keys=True) for g in gens))
        f.write("\n ]\n}\n")
    json.load(open(OUT))
    print(f"{len(res)} cases -> {OUT} ({os.path.getsize(OUT)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
