#!/usr/bin/env python3
"""Side-by-side CPU benchmark: `tkg bench` against diffusers (PyTorch) on the same weights.

Both sides load the SAME diffusers folder (by default the materialised built-in random-sd15,
exported with `tkg models materialize random-sd15 DIR` when missing), run the same stages at the
same size, steps and thread count, and each runs in a fresh process so its peak RSS is its own:

  load          from_pretrained / Pipeline::load
  text          negative + positive prompt through the text encoder
  unet step     one UNet call on a batch of 2 (classifier-free guidance) + DDIM step; median
  vae decode    latents -> 8-bit RGB
  peak RSS      VmHWM of the process

Ratios are tkg / PyTorch (below 1.0: tkg is faster). The machine is shared and noisy, so
run both sides in one session and repeat (--repeat N alternates the order).

Usage:
  benches/compare_diffusers.py --size 256 --steps 3 --threads 2 [--repeat 2] [--tkg PATH]
      [--model-dir DIR] [--dtype f32] [--stock] [--json-out FILE]

--stock also runs tkg with TKG_KERNELS=0, i.e. on candle's own CPU ops (the starting point).

Needs torch and diffusers (e.g. /work/pyenv/bin/python).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "a red apple on a table"
STAGES = [
    ("load_s", "model load"),
    ("text_s", "text encoding"),
    ("unet_step_s", "UNet step, CFG (batch 2)"),
    ("vae_decode_s", "VAE decode"),
    ("total_s", "total"),
    ("peak_rss_mib", "peak RSS (MiB)"),
]


def vm_field(name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def torch_worker(args):
    """Runs in its own process: the diffusers side of the benchmark, JSON on stdout."""
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    t_start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model_dir, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t_start
    rss_after_load = vm_field("VmRSS")

    with torch.inference_mode():
        t = time.perf_counter()
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
        text_s = time.perf_counter() - t
        context = torch.cat([uncond, cond])

        sched = pipe.scheduler
        sched.set_timesteps(args.steps)
        gen = torch.Generator("cpu").manual_seed(0)
        h, w = args.size // 8, args.size // 8
        latents = torch.randn((1, 4, h, w), generator=gen, dtype=torch.float32).to(dtype)
        latents = latents * sched.init_noise_sigma
        steps = []
        for ts in sched.timesteps:
            t = time.perf_counter()
            x = sched.scale_model_input(torch.cat([latents, latents]), ts)
            eps = pipe.unet(x, ts, encoder_hidden_states=context).sample
            eu, ec = eps.chunk(2)
            eps = eu + 7.5 * (ec - eu)
            latents = sched.step(eps, ts, latents).prev_sample
            steps.append(time.perf_counter() - t)

        t = time.perf_counter()
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        image = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        image = image[0].permute(1, 2, 0).contiguous().numpy()
        vae_s = time.perf_counter() - t
    total_s = time.perf_counter() - t_start
    assert image.shape == (args.size, args.size, 3)
    report = {
        "tool": "pytorch",
        "torch": torch.__version__,
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "text_s": text_s,
        "unet_steps_s": steps,
        "unet_step_s": statistics.median(steps),
        "unet_step_min_s": min(steps),
        "vae_decode_s": vae_s,
        "total_s": total_s,
        "rss_after_load_mib": rss_after_load,
        "peak_rss_mib": vm_field("VmHWM"),
    }
    json.dump(report, sys.stdout)


def run_torch(args):
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker",
        "--model-dir", args.model_dir, "--size", str(args.size), "--steps", str(args.steps),
        "--threads", str(args.threads), "--dtype", args.dtype,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_tkg(args, extra_env=None):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tkg.json")
        cmd = [
            args.tkg, "bench", "--model-dir", args.model_dir, "--width", str(args.size),
            "--height", str(args.size), "--steps", str(args.steps), "--threads",
            str(args.threads), "--dtype", args.dtype, "--device", "cpu", "--json", path,
        ]
        if getattr(args, "tkg_vae_calls", None):
            cmd += ["--vae-calls", str(args.tkg_vae_calls)]
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), **(extra_env or {}))
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        with open(path) as f:
            return json.load(f)


def default_model_dir(tkg):
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    d = os.path.join(hf_home, "hub", "tkg--builtin--random-sd15")
    if not os.path.isfile(os.path.join(d, "model_index.json")):
        print(f"materialising random-sd15 into {d}", file=sys.stderr)
        subprocess.run([tkg, "models", "materialize", "random-sd15", d], check=True)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--tkg", default=os.path.join(os.path.dirname(__file__), "..", "target",
                                                  "release", "tkg"))
    ap.add_argument("--json-out")
    ap.add_argument("--stock", action="store_true",
                    help="also run tkg with TKG_KERNELS=0 (candle's own CPU ops: the baseline)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        torch_worker(args)
        return
    args.tkg = os.path.abspath(args.tkg)
    if args.model_dir is None:
        args.model_dir = default_model_dir(args.tkg)

    sides = [("tkg", run_tkg)]
    if args.stock:
        sides.append(("tkg-stock", lambda a: run_tkg(a, {"TKG_KERNELS": "0"})))
    sides.append(("pytorch", run_torch))
    runs = []
    for r in range(args.repeat):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        pair = {}
        for name, fn in order:
            print(f"run {r + 1}/{args.repeat}: {name} ...", file=sys.stderr, flush=True)
            pair[name] = fn(args)
        runs.append(pair)

    names = [n for n, _ in sides]
    print(f"\n{args.size}x{args.size}, {args.dtype}, {args.threads} threads, {args.steps} steps, "
          f"model {args.model_dir}")
    header = f"{'stage':<26}" + "".join(f" {n:>10}" for n in names)
    header += "".join(f" {n + '/pt':>14}" for n in names if n != "pytorch")
    print(header)
    for r, pair in enumerate(runs):
        if args.repeat > 1:
            print(f"-- run {r + 1}")
        for key, label in STAGES:
            line = f"{label:<26}" + "".join(f" {pair[n][key]:>10.2f}" for n in names)
            pt = pair["pytorch"][key]
            line += "".join(f" {pair[n][key] / pt:>13.2f}x" for n in names if n != "pytorch")
            print(line)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
