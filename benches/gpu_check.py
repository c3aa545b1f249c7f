#!/usr/bin/env python3
"""The one prepared GPU run (docs/cuda.md): CUDA parity, f16/bf16 quality and speed against
diffusers, in one process tree that ends inside a wall-clock budget.

Run through scripts/gpu-check.sh, which sets the library path and installs the carried wheels.
Stages, in order (each one is recorded in the JSON even when it fails or runs out of time):

  parity     the tiny SD1.5 and SDXL goldens of tests/golden through `tkg generate` in f32 on the
             device: final latent rel L2 against diffusers' (bar 1e-3)
  dtypes     random-sd15 (materialised here, not carried) at 512², 20 steps, in f32, f16 and
             bf16: final latent rel L2 and 8-bit image difference of f16 and bf16 against f32
             (bar 1e-2), no NaN, and each dtype's step rate
  speed      tkg f16 against diffusers fp16 with SDPA on the same folders: SD1.5 512² 50 DDIM
             steps CFG 7.5 at batch 1 and 4, SDXL 1024² at batch 1; end-to-end seconds of a warm
             image (text + denoise + decode; model load excluded on both sides), steps per
             second, peak GPU memory (diffusers: torch.cuda.max_memory_allocated; tkg: the
             driver's used memory over its baseline, sampled every 50 ms)
  batch      batch 4 against 4 x batch 1 on the same seeds: max abs difference of the finals

`--quick` (with `--device cpu`) is the dry run: the built-in tiny models stand in for the
random full-size ones, sizes and step counts are small, and f32 stands in for the dtypes the CPU
refuses, so every stage's logic runs without a GPU.

Writes OUT/gpu-check.json (the fields of benches/results/gpu-h200.json) and prints a table.
Needs numpy and safetensors; the diffusers side needs torch and diffusers.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
GOLDEN = os.path.join(ROOT, "tests", "golden")
PROMPT = "a red vintage car, studio photo"
# (family, variant, stem) of every tiny diffusers golden tests/it/parity.rs checks.
GOLDENS = [
    ("sd15", "a", "golden"),
    ("sd15", "b", "golden"),
    ("sdxl", "a", "golden_empty"),
    ("sdxl", "a", "golden_neg"),
    ("sdxl", "b", "golden_empty"),
    ("sdxl", "b", "golden_neg"),
]
BARS = {"tiny_cuda_f32_rel_l2": 1e-3, "sd15_f16_vs_f32_rel_l2": 1e-2,
        "sd15_bf16_vs_f32_rel_l2": 1e-2}


class Check:
    """The run's state: the JSON being filled, the log, the deadline."""

    def __init__(self, args):
        self.args = args
        self.deadline = time.monotonic() + args.budget
        self.work = args.work
        os.makedirs(self.work, exist_ok=True)
        self.result = {
            "schema": "tkg gpu-check 1",
            "device": args.device,
            "quick": args.quick,
            "errors": [],
            "stages": {},
        }
        self.log_path = os.path.join(args.out, "gpu-check-commands.log")

    def left(self):
        return self.deadline - time.monotonic()

    def log(self, msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def save(self):
        path = os.path.join(self.args.out, "gpu-check.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    def stage(self, name, fn, need_s):
        """Runs one stage unless too little time is left; its failure is recorded, not fatal."""
        left = self.left()
        if left < need_s:
            self.result["stages"][name] = f"skipped: {left:.0f} s left, needs ~{need_s} s"
            self.log(f"stage {name}: skipped ({left:.0f} s left)")
            self.save()
            return
        self.log(f"stage {name}: start ({left:.0f} s left)")
        t = time.monotonic()
        try:
            fn()
            self.result["stages"][name] = f"ok in {time.monotonic() - t:.1f} s"
        except Exception as e:  # noqa: BLE001 - every failure goes into the JSON
            msg = f"{name}: {type(e).__name__}: {e}"
            self.result["errors"].append(msg)
            self.result["stages"][name] = f"failed after {time.monotonic() - t:.1f} s"
            self.log("FAILED " + msg)
        self.save()

    def run(self, cmd, timeout=None, env=None, sampler=None):
        """Runs a command (list), logging it; raises with the stderr tail on failure."""
        timeout = min(timeout or 1e9, max(5.0, self.left()))
        self.log("$ " + " ".join(str(c) for c in cmd))
        if sampler:
            sampler.start()
        t = time.monotonic()
        try:
            p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                               timeout=timeout, env=env)
        finally:
            if sampler:
                sampler.stop()
        wall = time.monotonic() - t
        with open(self.log_path, "a") as f:
            f.write(p.stderr[-4000:] + p.stdout[-2000:])
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"exit {p.returncode}: {' | '.join(tail)}")
        return p, wall


class GpuMemory:
    """The GPU's used memory, sampled in a thread while a command runs (the driver's figure)."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.nvml = None
        if enabled:
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            except Exception:  # noqa: BLE001 - fall back to nvidia-smi
                self.nvml = None
        self.peak = 0
        self.base = 0
        self.thread = None
        self.stop_flag = False

    def used_mib(self):
        if self.nvml:
            m, h = self.nvml
            return m.nvmlDeviceGetMemoryInfo(h).used / 2**20
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                              "nounits", "-i", "0"], capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[0])

    def start(self):
        if not self.enabled:
            return
        self.base = self.used_mib()
        self.peak = self.base
        self.stop_flag = False

        def loop():
            while not self.stop_flag:
                try:
                    self.peak = max(self.peak, self.used_mib())
                except Exception:  # noqa: BLE001 - a missed sample is not an error
                    pass
                time.sleep(0.05)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread:
            self.stop_flag = True
            self.thread.join()
            self.thread = None

    def peak_mib(self):
        return round(self.peak - self.base, 1) if self.enabled else None


def load_tensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def rel_l2(a, b):
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def finite(a):
    import numpy as np

    return bool(np.isfinite(a).all())


def png_rgb(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def generate(ck, model_dir, stem, *, width, height, seed, steps, dtype, prompt=PROMPT,
             negative="", num=1, batch=1, extra=(), sampler=None, timeout=None):
    """One `tkg generate` process; returns (manifest records by seed, latents by seed, wall)."""
    d = os.path.join(ck.work, stem)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    manifest = os.path.join(d, "manifest.jsonl")
    cmd = [ck.args.tkg, "generate", "--model-dir", model_dir, "--prompt", prompt,
           "--negative-prompt", negative, "--width", width, "--height", height, "--seed", seed,
           "--steps", steps, "--guidance", "7.5", "--device", ck.args.tkg_device, "--dtype",
           dtype, "--no-key", "--num-images", num, "--batch-size", batch, "--out",
           os.path.join(d, "{seed}.png"), "--save-latents",
           os.path.join(d, "{seed}.safetensors"), "--manifest", manifest, "--progress", "none",
           *extra]
    _, wall = ck.run(cmd, timeout=timeout, env=ck.env, sampler=sampler)
    records = {}
    with open(manifest) as f:
        for line in f:
            r = json.loads(line)
            records[r["seed"]] = r
    latents = {s: load_tensors(os.path.join(d, f"{s}.safetensors")) for s in records}
    return records, latents, wall


def image_seconds(record):
    t = record["timings"]
    return t["text_s"] + t["denoise_s"] + t["decode_s"]


# ---------------------------------------------------------------------------------------------
# stages


def stage_environment(ck):
    r = ck.result
    out = subprocess.run([ck.args.tkg, "--version"], capture_output=True, text=True, env=ck.env)
    r["tkg_version"] = (out.stdout or out.stderr).strip()
    if ck.args.device == "cuda":
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                            "--format=csv,noheader"], capture_output=True, text=True)
        r["gpu"] = q.stdout.strip() or q.stderr.strip()
    else:
        r["gpu"] = "none (dry run on the CPU)"
    try:
        import torch

        r["torch"] = torch.__version__
        r["torch_cuda"] = torch.version.cuda
    except Exception as e:  # noqa: BLE001
        r["torch"] = f"unavailable: {e}"
    try:
        import diffusers

        r["diffusers"] = diffusers.__version__
    except Exception as e:  # noqa: BLE001
        r["diffusers"] = f"unavailable: {e}"
    r["ld_library_path"] = ck.env.get("LD_LIBRARY_PATH", "")


def start_materialize(ck, name):
    """Starts `tkg models materialize NAME` in the background (CPU work, overlaps the GPU)."""
    d = os.path.join(ck.work, name)
    if os.path.isfile(os.path.join(d, "model_index.json")):
        return d, None
    shutil.rmtree(d, ignore_errors=True)
    ck.log(f"$ {ck.args.tkg} models materialize {name} {d} &")
    p = subprocess.Popen([ck.args.tkg, "models", "materialize", name, d], env=ck.env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return d, p


def wait_materialized(ck, name, pending):
    d, p = pending[name]
    if p is not None:
        t = time.monotonic()
        try:
            _, err = p.communicate(timeout=max(5.0, ck.left()))
        except subprocess.TimeoutExpired:
            p.kill()
            raise RuntimeError(f"materialising {name} ran out of time")
        if p.returncode != 0:
            raise RuntimeError(f"materialising {name}: {err.strip()[-300:]}")
        ck.log(f"{name} ready (waited {time.monotonic() - t:.1f} s)")
        pending[name] = (d, None)
    return d


def stage_parity(ck):
    worst = 0.0
    cases = {}
    for family, variant, stem in GOLDENS:
        g = json.load(open(os.path.join(GOLDEN, family, variant, stem + ".json")))
        want = load_tensors(os.path.join(GOLDEN, family, variant, stem + ".safetensors"))
        extra = ["--shift", g["tkg"]["target_shift"], "--mask-sigma", g["tkg"]["sigma"]]
        micro = g.get("micro_conditioning")
        if micro and micro.get("passed_to_pipeline"):
            oh, ow = micro["original_size"]
            top, left = micro["crops_coords_top_left"]
            extra += ["--original-size", f"{ow}x{oh}", "--crop-top-left", f"{top},{left}"]
        _, lat, _ = generate(
            ck, os.path.join(GOLDEN, family, variant, "model"), f"parity-{family}-{variant}-{stem}",
            width=g["width"], height=g["height"], seed=g["seed"], steps=g["steps"], dtype="f32",
            prompt=g["prompt"], negative=g.get("negative_prompt") or "", extra=extra, timeout=120)
        final = lat[g["seed"]]["final"]
        err = rel_l2(final, want["final"])
        cases[f"{family}/{variant}/{stem}"] = err
        worst = max(worst, err if finite(final) else math.inf)
    ck.result["tiny_parity_cases"] = cases
    ck.result["tiny_cuda_f32_rel_l2"] = worst


def stage_dtypes(ck, model_dir, size, steps, dtypes):
    import numpy as np

    finals, images, rates = {}, {}, {}
    for label, dtype in dtypes:
        recs, lat, _ = generate(ck, model_dir, f"dtype-{label}", width=size, height=size, seed=0,
                                steps=steps, dtype=dtype, timeout=180)
        finals[label] = lat[0]["final"]
        images[label] = png_rgb(recs[0]["path"])
        rates[label] = steps / recs[0]["timings"]["denoise_s"]
        ck.result[f"sd15_{label}_finite"] = finite(finals[label])
        ck.result[f"tkg_sd15_{size}_{label}_steps_per_s_cold"] = rates[label]
    for label in ("f16", "bf16"):
        if label not in finals:
            continue
        ck.result[f"sd15_{label}_vs_f32_rel_l2"] = rel_l2(finals[label], finals["f32"])
        diff = np.abs(images[label] - images["f32"])
        ck.result[f"sd15_{label}_vs_f32_image_max_diff"] = int(diff.max())
        ck.result[f"sd15_{label}_vs_f32_image_mean_diff"] = float(diff.mean())
    ck.result["dtype_check"] = {"size": size, "steps": steps, "dtypes": dict(dtypes),
                                "note": "cold process: the step rate includes the first steps"}


def tkg_speed(ck, key, model_dir, *, size, steps, batch, batches, dtype, mem):
    """Warm end-to-end seconds of one batch: the median over all batches but the first."""
    recs, lat, wall = generate(ck, model_dir, f"speed-{key}", width=size, height=size, seed=0,
                               steps=steps, dtype=dtype, num=batches * batch, batch=batch,
                               sampler=mem, timeout=400)
    seeds = sorted(recs)
    groups = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
    warm = [sum(image_seconds(recs[s]) for s in g) for g in groups[1:]]
    secs = statistics.median(warm)
    cold = sum(image_seconds(recs[s]) for s in groups[0])
    denoise = statistics.median(sum(recs[s]["timings"]["denoise_s"] for s in g)
                                for g in groups[1:])
    ck.result[f"tkg_{key}_s"] = secs
    ck.result[f"tkg_{key}_warm_batches_s"] = warm
    ck.result[f"tkg_{key}_cold_s"] = cold
    ck.result[f"tkg_{key}_steps_per_s"] = steps / denoise
    ck.result[f"tkg_{key}_peak_mib"] = mem.peak_mib()
    ck.result[f"tkg_{key}_process_wall_s"] = wall
    return lat


def diffusers_speed(ck, key, model_dir, *, size, steps, batch, dtype, mem):
    out = os.path.join(ck.work, f"diffusers-{key}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--diffusers-worker", "--model-dir",
           model_dir, "--size", size, "--steps", steps, "--batch", batch, "--dtype", dtype,
           "--device", ck.args.device, "--worker-out", out]
    ck.run(cmd, timeout=400, env=ck.env, sampler=mem)
    w = json.load(open(out))
    ck.result[f"diffusers_{key}_s"] = w["e2e_s"]
    ck.result[f"diffusers_{key}_cold_s"] = w["cold_s"]
    ck.result[f"diffusers_{key}_steps_per_s"] = w["steps_per_s"]
    ck.result[f"diffusers_{key}_peak_mib"] = w["max_memory_allocated_mib"]
    ck.result[f"diffusers_{key}_driver_peak_mib"] = mem.peak_mib()
    ck.result[f"diffusers_{key}_attention"] = w["attention"]


def diffusers_worker(args):
    """Runs in its own process: one diffusers pipeline, a warm-up call, two timed calls."""
    import torch
    from diffusers import DDIMScheduler, DiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    dev = args.device
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = DiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=dtype)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe = pipe.to(dev)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def call():
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            images = pipe(prompt=[PROMPT] * args.batch, negative_prompt=[""] * args.batch,
                          num_inference_steps=args.steps, guidance_scale=7.5, height=args.size,
                          width=args.size, output_type="pil",
                          generator=torch.Generator("cpu").manual_seed(0)).images
        sync()
        assert len(images) == args.batch and images[0].size == (args.size, args.size)
        return time.perf_counter() - t

    cold = call()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [call(), call()]
    e2e = statistics.median(times)
    # The step rate: the denoise loop alone, timed through the scheduler's step calls.
    marks = []
    step = pipe.scheduler.step

    def timed_step(*a, **k):
        sync()
        marks.append(time.perf_counter())
        return step(*a, **k)

    pipe.scheduler.step = timed_step
    call()
    pipe.scheduler.step = step
    steps_per_s = (len(marks) - 1) / (marks[-1] - marks[0]) if len(marks) > 1 else None
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None
    with open(args.worker_out, "w") as f:
        json.dump({"e2e_s": e2e, "times_s": times, "cold_s": cold, "steps_per_s": steps_per_s,
                   "max_memory_allocated_mib": peak, "torch": torch.__version__,
                   "attention": type(pipe.unet.attn_processors[next(iter(
                       pipe.unet.attn_processors))]).__name__}, f)


def stage_batch(ck, b1, b4, batch):
    import numpy as np

    seeds = sorted(b4)[:batch]
    worst = 0.0
    for s in seeds:
        if s not in b1:
            raise RuntimeError(f"seed {s} has no batch-1 image")
        worst = max(worst, float(np.abs(b4[s]["final"].astype(np.float64)
                                        - b1[s]["final"].astype(np.float64)).max()))
    ck.result["batch4_vs_b1_final_max_abs"] = worst
    ck.result["batch4_bit_identical"] = worst == 0.0


def summarize(ck):
    r = ck.result
    checks = {}
    for k, bar in BARS.items():
        if k in r:
            checks[k] = {"value": r[k], "bar": bar, "pass": r[k] <= bar}
    for k in ("sd15_f16_finite", "sd15_bf16_finite"):
        if k in r:
            checks[k] = {"value": r[k], "pass": r[k]}
    for key in ("sd15_512_b1", "sd15_512_b4", "sdxl_1024_b1"):
        t, d = r.get(f"tkg_{key}_s"), r.get(f"diffusers_{key}_s")
        if t and d:
            r[f"ratio_{key}"] = t / d
            checks[f"speed_{key}"] = {"value": t / d, "bar": 1.0, "pass": t / d <= 1.0}
    r["checks"] = checks
    r["all_pass"] = bool(checks) and all(c["pass"] for c in checks.values()) and not r["errors"]
    ck.save()
    print("\n== gpu-check summary ==")
    for k in sorted(r):
        v = r[k]
        if isinstance(v, (int, float, str, bool)) or v is None:
            print(f"{k:<44} {v:.4g}" if isinstance(v, float) else f"{k:<44} {v}")
    for name, c in checks.items():
        print(f"check {name:<38} {'PASS' if c['pass'] else 'FAIL'} ({c['value']})")
    for e in r["errors"]:
        print("error:", e)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=False)
    ap.add_argument("--tkg", default=os.path.join(ROOT, ".gpu", "tkg"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="the dry run's small sizes and models")
    ap.add_argument("--budget", type=float, default=400, help="wall seconds for all stages")
    ap.add_argument("--work", default="/tmp/tkg-gpu-check")
    ap.add_argument("--skip", default="", help="comma-separated stages to leave out")
    ap.add_argument("--diffusers-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir")
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--dtype")
    ap.add_argument("--worker-out")
    args = ap.parse_args()
    if args.diffusers_worker:
        diffusers_worker(args)
        return
    if not args.out:
        ap.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    args.tkg = os.path.abspath(args.tkg)
    args.tkg_device = "cuda:0" if args.device == "cuda" else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    ck = Check(args)
    ck.env = dict(os.environ, HF_HUB_OFFLINE="1",
                  HF_HOME=os.path.join(args.work, "hf-home"))
    if args.quick:
        sd15, sdxl = "tiny-sd15", "tiny-sdxl"
        sd15_size, sdxl_size, dtype_size, steps, dtype_steps = 64, 64, 64, 4, 4
    else:
        sd15, sdxl = "random-sd15", "random-sdxl"
        sd15_size, sdxl_size, dtype_size, steps, dtype_steps = 512, 1024, 512, 50, 20
    gpu = args.device == "cuda"
    # bf16 on the CPU needs AVX-512 BF16, which a dry-run host may lack: the dry run runs f32
    # under that label.
    dtypes = ([("f32", "f32"), ("f16", "f16"), ("bf16", "bf16")] if gpu
              else [("f32", "f32"), ("f16", "f16"), ("bf16", "f32")])
    fast = "f16" if gpu else "f32"
    ck.result.update({"sd15_model": sd15, "sdxl_model": sdxl, "steps": steps,
                      "sd15_size": sd15_size, "sdxl_size": sdxl_size,
                      "speed_dtype": fast, "guidance": 7.5, "sampler": "ddim"})
    mem = GpuMemory(gpu)

    ck.stage("environment", lambda: stage_environment(ck), 5)
    pending = {}
    for name in (sd15, sdxl):
        try:
            pending[name] = start_materialize(ck, name)
        except Exception as e:  # noqa: BLE001
            ck.result["errors"].append(f"materialize {name}: {e}")
    if "parity" not in skip:
        ck.stage("parity", lambda: stage_parity(ck), 20)
    if "dtypes" not in skip:
        ck.stage("dtypes", lambda: stage_dtypes(ck, wait_materialized(ck, sd15, pending),
                                                dtype_size, dtype_steps, dtypes), 40)
    lat = {}

    def speed(key, model, size, batch, batches, side):
        def go():
            d = wait_materialized(ck, model, pending)
            if side == "tkg":
                lat[key] = tkg_speed(ck, key, d, size=size, steps=steps, batch=batch,
                                     batches=batches, dtype=fast, mem=mem)
            else:
                diffusers_speed(ck, key, d, size=size, steps=steps, batch=batch, dtype=fast,
                                mem=mem)
        return go

    # (key, model, size, batch, batches): batch 1 makes the 4 seeds batch 4's first batch has.
    plan = [("sd15_512_b1", sd15, sd15_size, 1, 4), ("sd15_512_b4", sd15, sd15_size, 4, 2),
            ("sdxl_1024_b1", sdxl, sdxl_size, 1, 2)]
    for key, model, size, batch, batches in plan:
        for side in ("tkg", "diffusers"):
            if side not in skip and key not in skip:
                ck.stage(f"{side}_{key}", speed(key, model, size, batch, batches, side), 30)
    if "sd15_512_b1" in lat and "sd15_512_b4" in lat:
        ck.stage("batch", lambda: stage_batch(ck, lat["sd15_512_b1"], lat["sd15_512_b4"], 4), 1)
    for name, (d, p) in pending.items():
        if p is not None and p.poll() is None:
            p.kill()
    summarize(ck)


if __name__ == "__main__":
    main()
