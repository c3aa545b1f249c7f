#!/usr/bin/env python3
"""Side-by-side CPU benchmark: `tkg bench` against OpenVINO on the same weights (issue 20).

Both sides use the SAME diffusers folder (by default the materialised built-in random-sd15,
exported with `tkg models materialize random-sd15 DIR` when missing) at the same size, steps
and thread count. OpenVINO gets the diffusers UNet and VAE decoder, loaded in f32 with torch
and converted with `openvino.convert_model(model, example_input=...)` at the requested size
(static shapes), compiled for "CPU" with INFERENCE_NUM_THREADS = --threads and
INFERENCE_PRECISION_HINT = f32 or bf16:

  convert       torch load + openvino.convert_model + save_model, once per size, in its own
                process (reported apart: not part of any step time)
  compile       read_model + compile_model of the saved IR (UNet and VAE decoder)
  unet step     one UNet call on a batch of 2 (classifier-free guidance); median of --steps
                calls after one warm-up call (tkg: median of its --steps steps, which include
                the DDIM step, negligible)
  vae decode    latents [1,4,S/8,S/8] -> 8-bit RGB; median of --vae-calls calls after one
                warm-up (tkg: `tkg bench --vae-calls 1+N`, the median after its first)
  first calls   the UNet's and the VAE's first call on each side (OpenVINO's warm-up calls;
                tkg's first step and first decode, which pack the weights with bf16
                products): what a one-image run pays on top of the steady figures
  peak RSS      VmHWM of the process (each side and precision runs in a fresh process; the
                OpenVINO inference process reads the saved IR, so torch is not in it)

bf16 runs only where `core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")` lists BF16;
elsewhere the table says "not supported" (OpenVINO would silently run f32).

--tkg-dtype f32,bf16 also runs tkg with bf16 products (`--dtype bf16`, AVX-512 BF16 CPUs only).
Ratios are tkg / OpenVINO at the same precision (below 1.0: tkg is faster), and tkg bf16 / f32. The machine is shared and noisy: only
ratios measured side by side in one run mean anything; --repeat N alternates the order.

Usage:
  benches/compare_openvino.py --size 256 --size 512 --steps 2 --threads 2 [--repeat 2]
      [--precision f32,bf16] [--tkg-dtype f32,bf16] [--tkg PATH] [--model-dir DIR] [--ir-dir DIR] [--json-out FILE]

--size also takes a list (--size 256,512). Converted IR is kept in --ir-dir (default: a
temporary folder removed at the end); with an existing --ir-dir of the same size it is reused.

Needs torch, diffusers and openvino (e.g. /work/pyenv/bin/python). CI does not run it.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# The tkg side, the model folder and the RSS reading are compare_diffusers.py's own.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_diffusers  # noqa: E402
from compare_diffusers import default_model_dir, vm_field  # noqa: E402

PROMPT = "a red apple on a table"
STAGES = [
    ("unet_first_s", "UNet step, first call"),
    ("unet_step_s", "UNet step, CFG (batch 2)"),
    ("vae_first_s", "VAE decode, first call"),
    ("vae_decode_s", "VAE decode, warm"),
    ("load_s", "load / compile"),
    ("peak_rss_mib", "peak RSS (MiB)"),
]


def set_thread_env(threads):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(threads)


def convert_worker(args):
    """Own process: torch load (f32) + openvino.convert_model + save_model for one size."""
    set_thread_env(args.threads)
    import openvino as ov
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.set_num_threads(args.threads)
    lat = args.size // vae_factor(args.model_dir)
    report = {"size": args.size, "openvino": ov.__version__, "torch": torch.__version__}

    class UNetWrap(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeDecode(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents, return_dict=False)[0]

    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(
        os.path.join(args.model_dir, "unet"), torch_dtype=torch.float32).eval()
    report["unet_torch_load_s"] = time.perf_counter() - t0
    example = (
        torch.randn(2, unet.config.in_channels, lat, lat),
        torch.tensor(999.0),
        torch.randn(2, 77, unet.config.cross_attention_dim),
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        ov_unet = ov.convert_model(UNetWrap(unet), example_input=example)
    # convert_model leaves the shapes dynamic: pin them to this size (static shapes)
    ov_unet.reshape({i: list(x.shape) for i, x in enumerate(example)})
    report["unet_convert_s"] = time.perf_counter() - t0
    del unet
    t0 = time.perf_counter()
    ov.save_model(ov_unet, os.path.join(args.ir_dir, "unet.xml"), compress_to_fp16=False)
    report["unet_save_s"] = time.perf_counter() - t0
    del ov_unet

    t0 = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(
        os.path.join(args.model_dir, "vae"), torch_dtype=torch.float32).eval()
    report["vae_torch_load_s"] = time.perf_counter() - t0
    report["vae_scaling_factor"] = vae.config.scaling_factor
    t0 = time.perf_counter()
    with torch.no_grad():
        example = torch.randn(1, vae.config.latent_channels, lat, lat)
        ov_vae = ov.convert_model(VaeDecode(vae), example_input=example)
    ov_vae.reshape({0: list(example.shape)})
    report["vae_convert_s"] = time.perf_counter() - t0
    del vae
    t0 = time.perf_counter()
    ov.save_model(ov_vae, os.path.join(args.ir_dir, "vae_decoder.xml"), compress_to_fp16=False)
    report["vae_save_s"] = time.perf_counter() - t0
    report["convert_total_s"] = sum(v for k, v in report.items() if k.endswith("_s"))
    report["peak_rss_mib"] = vm_field("VmHWM")
    json.dump(report, sys.stdout)


def infer_worker(args):
    """Own process: read + compile the saved IR at one precision, time UNet and VAE calls."""
    set_thread_env(args.threads)
    import numpy as np
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": args.threads,
        "INFERENCE_PRECISION_HINT": args.precision,
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    }
    with open(os.path.join(args.model_dir, "vae", "config.json")) as f:
        scaling = json.load(f).get("scaling_factor", 0.18215)
    rng = np.random.default_rng(0)
    t_start = time.perf_counter()
    unet = core.compile_model(core.read_model(os.path.join(args.ir_dir, "unet.xml")), "CPU",
                              config)
    unet_compile_s = time.perf_counter() - t_start
    got = unet.get_property("INFERENCE_PRECISION_HINT")
    got_precision = got.get_type_name() if hasattr(got, "get_type_name") else str(got)
    if got_precision != args.precision:
        raise SystemExit(f"asked for {args.precision}, the compiled model runs {got_precision}")
    got_threads = int(unet.get_property("INFERENCE_NUM_THREADS"))
    request = unet.create_infer_request()
    ins = [p.get_any_name() for p in unet.inputs]
    shape = list(unet.inputs[0].get_shape())
    latents = rng.standard_normal([1] + shape[1:], dtype=np.float32)
    context = rng.standard_normal(list(unet.inputs[2].get_shape()), dtype=np.float32)

    def unet_call(ts):
        x = np.concatenate([latents, latents])
        eps = request.infer({ins[0]: x, ins[1]: np.array(ts, dtype=np.float32),
                             ins[2]: context})[unet.output(0)]
        eu, ec = eps[:1], eps[1:]
        return eu + 7.5 * (ec - eu)

    t = time.perf_counter()
    unet_call(999.0)
    unet_warmup_s = time.perf_counter() - t
    steps = []
    for i in range(args.steps):
        t = time.perf_counter()
        eps = unet_call(999.0 - i * (1000 // max(args.steps, 1)))
        steps.append(time.perf_counter() - t)
    assert list(eps.shape) == [1] + shape[1:]
    del request, unet

    t = time.perf_counter()
    vae = core.compile_model(core.read_model(os.path.join(args.ir_dir, "vae_decoder.xml")),
                             "CPU", config)
    vae_compile_s = time.perf_counter() - t
    vreq = vae.create_infer_request()

    def vae_call():
        image = vreq.infer({0: latents / scaling})[vae.output(0)]
        image = np.clip(image / 2 + 0.5, 0, 1) * 255
        return np.ascontiguousarray(np.round(image).astype(np.uint8)[0].transpose(1, 2, 0))

    t = time.perf_counter()
    vae_call()
    vae_warmup_s = time.perf_counter() - t
    decodes = []
    for _ in range(args.vae_calls):
        t = time.perf_counter()
        image = vae_call()
        decodes.append(time.perf_counter() - t)
    assert image.shape == (args.size, args.size, 3)
    report = {
        "tool": "openvino",
        "openvino": ov.__version__,
        "precision": args.precision,
        "inference_precision": got_precision,
        "threads": got_threads,
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "unet_compile_s": unet_compile_s,
        "vae_compile_s": vae_compile_s,
        "load_s": unet_compile_s + vae_compile_s,
        "unet_warmup_s": unet_warmup_s,
        "unet_steps_s": steps,
        "unet_step_s": statistics.median(steps),
        "unet_step_min_s": min(steps),
        "vae_warmup_s": vae_warmup_s,
        "unet_first_s": unet_warmup_s,
        "vae_first_s": vae_warmup_s,
        "vae_decodes_s": decodes,
        "vae_decode_s": statistics.median(decodes),
        "total_s": time.perf_counter() - t_start,
        "peak_rss_mib": vm_field("VmHWM"),
    }
    json.dump(report, sys.stdout)


def vae_factor(model_dir):
    """Pixels per latent: 2 ** (VAE levels - 1), 8 for SD1.5."""
    with open(os.path.join(model_dir, "vae", "config.json")) as f:
        return 2 ** (len(json.load(f)["block_out_channels"]) - 1)


def worker_cmd(args, mode, size, extra=()):
    return [
        sys.executable, os.path.abspath(__file__), "--worker", mode, "--model-dir",
        args.model_dir, "--size", str(size), "--steps", str(args.steps), "--threads",
        str(args.threads), "--vae-calls", str(args.vae_calls), *extra,
    ]


def run_worker(args, cmd):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise SystemExit(f"worker failed ({out.returncode}): {' '.join(cmd)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_convert(args, size, ir_dir):
    if all(os.path.isfile(os.path.join(ir_dir, f)) for f in ("unet.xml", "vae_decoder.xml")):
        print(f"  reusing IR in {ir_dir}", file=sys.stderr)
        return {"size": size, "reused": ir_dir}
    os.makedirs(ir_dir, exist_ok=True)
    return run_worker(args, worker_cmd(args, "convert", size, ["--ir-dir", ir_dir]))


def run_openvino(args, size, precision, ir_dir):
    return run_worker(args, worker_cmd(args, "infer", size,
                                       ["--ir-dir", ir_dir, "--precision", precision]))


def run_tkg(args, size, dtype):
    """`tkg bench` at `size` in `dtype` (f32, or bf16: f32 tensors with bf16 products), as
    compare_diffusers.py runs it."""
    r = compare_diffusers.run_tkg(argparse.Namespace(
        **dict(vars(args), size=size, dtype=dtype, tkg_vae_calls=1 + args.vae_calls)))
    # The same stages as OpenVINO's: first calls apart, the decode's median after the first.
    r["unet_first_s"] = r["unet_steps_s"][0]
    r["vae_first_s"] = r["vae_decode_s"]
    r["vae_decode_s"] = r["vae_decode_warm_s"]
    return r


def cpu_info(core):
    caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "cpu": str(core.get_property("CPU", "FULL_DEVICE_NAME")),
        "openvino_capabilities": caps,
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def split_list(values, conv):
    out = []
    for v in values:
        out += [conv(x) for x in str(v).split(",") if x.strip()]
    return out


def print_table(size, runs, tkg_dtypes, columns, unsupported, args):
    print(f"\n{size}x{size}, {args.threads} threads, {args.steps} steps, times in s")
    names = [f"tkg-{d}" for d in tkg_dtypes] + [f"ov-{p}" for p in columns]
    # tkg against OpenVINO at the same precision, and tkg's bf16 against its f32.
    ratios = [(f"tkg-{p}", f"ov-{p}") for p in columns if p in tkg_dtypes]
    if "f32" in tkg_dtypes and "bf16" in tkg_dtypes:
        ratios.append(("tkg-bf16", "tkg-f32"))
    header = f"{'stage':<26}" + "".join(f" {n:>10}" for n in names)
    header += "".join(f" {a + '/' + b:>18}" for a, b in ratios)
    header += "".join(f" {'ov-' + p:>10}" for p in unsupported)
    print(header)
    for r, pair in enumerate(runs):
        if len(runs) > 1:
            print(f"-- run {r + 1}")
        for key, label in STAGES:
            line = f"{label:<26}" + "".join(f" {pair[n][key]:>10.4g}" for n in names)
            line += "".join(f" {pair[a][key] / pair[b][key]:>17.2f}x" for a, b in ratios)
            line += "".join(f" {'n/s':>10}" for _ in unsupported)
            print(line)
    for p in unsupported:
        print(f"ov-{p}: not supported on this CPU (no BF16 in OPTIMIZATION_CAPABILITIES)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model-dir")
    ap.add_argument("--size", action="append", help="repeatable, or a list: 256,512")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--vae-calls", type=int, default=1,
                    help="timed OpenVINO VAE decodes after the warm-up (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--precision", default="f32,bf16", help="OpenVINO precisions: f32,bf16")
    ap.add_argument("--tkg-dtype", default="f32",
                    help="tkg dtypes: f32,bf16 (bf16 needs AVX-512 BF16)")
    ap.add_argument("--tkg", default=os.path.join(os.path.dirname(__file__), "..", "target",
                                                  "release", "tkg"))
    ap.add_argument("--ir-dir", help="keep (and reuse) the converted IR here, one folder a size")
    ap.add_argument("--json-out")
    ap.add_argument("--worker", choices=["convert", "infer"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.size = int(args.size[0])
        (convert_worker if args.worker == "convert" else infer_worker)(args)
        return
    sizes = split_list(args.size or ["256"], int)
    precisions = split_list([args.precision], str)
    for p in precisions:
        if p not in ("f32", "bf16"):
            ap.error(f"unknown precision {p}")
    tkg_dtypes = split_list([args.tkg_dtype], str)
    for d in tkg_dtypes:
        if d not in ("f32", "bf16"):
            ap.error(f"unknown tkg dtype {d}")
    args.tkg = os.path.abspath(args.tkg)
    if args.model_dir is None:
        args.model_dir = default_model_dir(args.tkg)

    import openvino as ov

    info = cpu_info(ov.Core())
    info["openvino"] = ov.__version__
    bf16_ok = "BF16" in info["openvino_capabilities"]
    columns = [p for p in precisions if p == "f32" or bf16_ok]
    unsupported = [p for p in precisions if p not in columns]
    print(f"CPU {info['cpu']}; OpenVINO {info['openvino']}; capabilities "
          f"{','.join(info['openvino_capabilities'])}; avx2={info['avx2']} "
          f"avx512f={info['avx512f']} avx512_bf16={info['avx512_bf16']}", file=sys.stderr)

    ir_root = args.ir_dir or tempfile.mkdtemp(prefix="tkg-ov-ir-")
    result = {"machine": info, "threads": args.threads, "steps": args.steps,
              "model_dir": args.model_dir, "unsupported": unsupported, "sizes": {}}
    try:
        for size in sizes:
            ir_dir = os.path.join(ir_root, str(size))
            print(f"{size}x{size}: converting for OpenVINO ...", file=sys.stderr, flush=True)
            conv = run_convert(args, size, ir_dir)
            if "convert_total_s" in conv:
                print(f"  converted in {conv['convert_total_s']:.1f} s, peak RSS "
                      f"{conv['peak_rss_mib']:.0f} MiB", file=sys.stderr)
            sides = [(f"tkg-{d}", lambda s=size, d=d: run_tkg(args, s, d)) for d in tkg_dtypes]
            sides += [(f"ov-{p}", lambda s=size, p=p: run_openvino(args, s, p, ir_dir))
                      for p in columns]
            runs = []
            for r in range(args.repeat):
                order = sides if r % 2 == 0 else sides[::-1]
                pair = {}
                for name, fn in order:
                    print(f"  run {r + 1}/{args.repeat}: {name} ...", file=sys.stderr,
                          flush=True)
                    pair[name] = fn()
                pair["order"] = [n for n, _ in order]
                runs.append(pair)
            result["sizes"][str(size)] = {"convert": conv, "runs": runs}
            print_table(size, runs, tkg_dtypes, columns, unsupported, args)
            if "convert_total_s" in conv:
                print(f"OpenVINO conversion (not in the times above): UNet "
                      f"{conv['unet_convert_s']:.1f} s + save {conv['unet_save_s']:.1f} s, VAE "
                      f"decoder {conv['vae_convert_s']:.1f} s + save {conv['vae_save_s']:.1f} s, "
                      f"torch loads {conv['unet_torch_load_s'] + conv['vae_torch_load_s']:.1f} s;"
                      f" peak RSS {conv['peak_rss_mib']:.0f} MiB")
            sys.stdout.flush()
    finally:
        if not args.ir_dir:
            shutil.rmtree(ir_root, ignore_errors=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
