#!/usr/bin/env python3
"""Pipeline goldens for every sampler: diffusers' StableDiffusionPipeline and
StableDiffusionXLPipeline with each scheduler tkg offers, on the tiny golden models
(../sd15/a, ../sd15/b with v-prediction and trailing spacing, ../sdxl/a), from the TKG-DM
initial latents of their DDIM goldens.

The generator follows what tkg does: `torch.Generator("cpu").manual_seed(seed)` draws the
noise first (checked against the DDIM golden's `noise`), TKG-DM shapes it into `init`, and the
same generator goes to the pipeline (`latents=init, generator=g`), so stochastic samplers draw
their step noise from where the initial draw left the stream.

Writes, next to this file:
  cases.json                      every case: model, sampler settings, steps, guidance
  <model>.safetensors             per case `<case>.final` (f32 latents) and `<case>.image` (u8 HWC)

Usage: /work/pyenv/bin/python tests/golden/sampler_pipelines/make_golden.py
Needs no network; deterministic (CPU, float32, one thread).
"""
import json
import os
import sys

sys.dont_write_bytecode = True
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.dirname(HERE)

MODELS = [
    # name, family folder, golden stem
    ("sd15_a", "sd15/a", "golden"),
    ("sd15_b", "sd15/b", "golden"),
    ("sdxl_a", "sdxl/a", "golden_neg"),
]

# tkg's settings -> (diffusers class, config overrides, extra pipeline kwargs).
DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
CASES = [
    # name, tkg sampler, schedule, eta, spacing, steps, guidance, class, overrides
    ("ddim_eta", "ddim", "default", 0.5, None, 20, 7.5, "DDIMScheduler", {}),
    ("euler", "euler", "default", 0.0, None, 20, 7.5, "EulerDiscreteScheduler", {}),
    ("euler_karras", "euler", "karras", 0.0, None, 20, 7.5, "EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("euler_exponential", "euler", "exponential", 0.0, None, 20, 7.5, "EulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    ("euler_a", "euler-a", "default", 0.0, None, 20, 7.5, "EulerAncestralDiscreteScheduler", {}),
    ("heun", "heun", "default", 0.0, None, 20, 7.5, "HeunDiscreteScheduler", {}),
    ("heun_karras", "heun", "karras", 0.0, None, 20, 7.5, "HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    ("dpmpp_2m", "dpm++2m", "default", 0.0, None, 20, 7.5, "DPMSolverMultistepScheduler", DPM),
    ("dpmpp_2m_karras", "dpm++2m", "karras", 0.0, None, 20, 7.5, "DPMSolverMultistepScheduler", {**DPM, "use_karras_sigmas": True}),
    ("dpmpp_2m_sde", "dpm++2m-sde", "default", 0.0, None, 20, 7.5, "DPMSolverMultistepScheduler", SDE),
    ("dpmpp_2m_sde_karras", "dpm++2m-sde", "karras", 0.0, None, 20, 7.5, "DPMSolverMultistepScheduler", {**SDE, "use_karras_sigmas": True}),
    ("unipc", "unipc", "default", 0.0, None, 20, 7.5, "UniPCMultistepScheduler", {}),
    ("unipc_karras", "unipc", "karras", 0.0, None, 20, 7.5, "UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    ("lcm", "lcm", "default", 0.0, None, 4, 1.5, "LCMScheduler", {}),
    # SD-Turbo / SDXL-Turbo style: trailing spacing, no guidance (one UNet pass a step).
    ("turbo", "euler-a", "default", 0.0, "trailing", 2, 0.0, "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    # SDXL-Lightning style: Euler, trailing.
    ("lightning", "euler", "default", 0.0, "trailing", 4, 0.0, "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
]


def main():
    import diffusers
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cases = []
    for model, folder, stem in MODELS:
        d = os.path.join(GOLDEN, folder)
        meta = json.load(open(os.path.join(d, f"{stem}.json")))
        t = load_file(os.path.join(d, f"{stem}.safetensors"))
        sdxl = model.startswith("sdxl")
        cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
        pipe = cls.from_pretrained(os.path.join(d, "model"), torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        base_config = dict(pipe.scheduler.config)
        seed, W, H = meta["seed"], meta["width"], meta["height"]
        kwargs = {"prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"], "width": W, "height": H}
        if sdxl:
            m = meta["micro_conditioning"]
            kwargs.update(original_size=tuple(m["original_size"]),
                          crops_coords_top_left=tuple(m["crops_coords_top_left"]),
                          target_size=tuple(m["target_size"]))
        out = {}
        for name, sampler, schedule, eta, spacing, steps, guidance, klass, overrides in CASES:
            sch = getattr(diffusers, klass).from_config({**base_config, **overrides})
            pipe.scheduler = sch
            g = torch.Generator("cpu").manual_seed(seed)
            noise = torch.randn(t["noise"].shape, generator=g, dtype=torch.float32)
            assert torch.equal(noise, t["noise"]), "the generator's first draw is the golden noise"
            extra = {"eta": eta} if klass == "DDIMScheduler" else {}
            with torch.no_grad():
                final = pipe(**kwargs, latents=t["init"].clone(), generator=g, num_inference_steps=steps,
                             guidance_scale=guidance, output_type="latent", **extra).images
                decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor, return_dict=False)[0]
            x = (decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()[0]
            image = (x * 255).round().astype("uint8")
            assert np.isfinite(final.numpy()).all(), (model, name)
            out[f"{name}.final"] = final.contiguous()
            out[f"{name}.image"] = torch.from_numpy(image.copy())
            cases.append({"model": model, "folder": folder, "stem": stem, "case": name, "sampler": sampler,
                          "schedule": schedule, "eta": eta, "spacing": spacing, "steps": steps,
                          "guidance": guidance, "diffusers_class": klass, "config_overrides": overrides,
                          "timesteps": [float(v) for v in pipe.scheduler.timesteps]})
            print(f"{model} {name}: {len(pipe.scheduler.timesteps)} UNet calls, |final| {final.abs().mean():.4f}")
        save_file(out, os.path.join(HERE, f"{model}.safetensors"),
                  metadata={"generator": "tests/golden/sampler_pipelines/make_golden.py"})
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0]}
    with open(os.path.join(HERE, "cases.json"), "w") as f:
        json.dump({"versions": versions, "cases": cases}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
