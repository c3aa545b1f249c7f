#!/usr/bin/env bash
# Time to a finished image per sampler on the built-in random-weight SD1.5 (full size), with
# `tkg bench`: every sampler side by side in one run, at a few steps each, then the time at
# the step counts people use, from the measured cost of a UNet call (the samplers' own
# arithmetic is negligible next to it, and the measured rows show that).
#
#   benches/samplers.sh [TKG] [SIZE] [STEPS]      (defaults: target/release/tkg 512 2)
#
# Prints a markdown table: measured image time at STEPS, median UNet call, and the image time
# at typical step counts = text + calls(N) x median call + decode.
set -euo pipefail
tkg=${1:-target/release/tkg}
size=${2:-512}
steps=${3:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name | flags | typical steps
rows=(
  "ddim|--sampler ddim|50"
  "euler|--sampler euler|20"
  "euler-a|--sampler euler-a|20"
  "heun|--sampler heun|20"
  "dpm++2m karras|--sampler dpm++2m --schedule karras|20"
  "dpm++2m-sde karras|--sampler dpm++2m-sde --schedule karras|20"
  "unipc|--sampler unipc|20"
  "lcm, guidance 1.5|--sampler lcm --guidance 1.5|4"
  "turbo: euler-a trailing, guidance 0|--sampler euler-a --timestep-spacing trailing --guidance 0|1"
)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) threads"
echo "tkg bench --model random-sd15 --width $size --height $size --steps $steps, then derived"
echo
echo "| sampler | UNet calls at $steps steps | measured image s | median call s | typical steps | UNet calls | image s (derived) |"
echo "|---|---|---|---|---|---|---|"
i=0
for r in "${rows[@]}"; do
  IFS='|' read -r name flags typical <<<"$r"
  # shellcheck disable=SC2086
  "$tkg" -q bench --model random-sd15 --width "$size" --height "$size" --steps "$steps" \
    $flags --json "$work/$i.json" >/dev/null
  python3 - "$work/$i.json" "$name" "$typical" "$steps" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
name, typical, steps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
calls = len(r["unet_steps_s"])
# Heun calls twice per step but the last.
typ_calls = 2 * typical - 1 if r["sampler"] == "heun" else typical
derived = r["text_s"] + typ_calls * r["unet_step_s"] + r["vae_decode_s"]
print(f"| {name} | {calls} | {r['image_s']:.1f} | {r['unet_step_s']:.2f} | {typical} | {typ_calls} | {derived:.0f} |")
EOF
  i=$((i + 1))
done
