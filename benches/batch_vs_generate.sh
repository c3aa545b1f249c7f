#!/usr/bin/env bash
# 8 jobs in one `tkg batch` run vs 8 separate `tkg generate` calls (not a test).
#
#   benches/batch_vs_generate.sh [path/to/tkg] [model] [steps] [batch-size] [repeats]
#
# Defaults: target/release/tkg, tiny-sd15, 20 steps, batch size 8 (on the CPU each image of a
# batch runs on a core of its own; the pixels are the same as batch size 1), 5 repeats. The
# two sides alternate; the best time of each is reported with their ratio (batch /
# separate), and so is the median of the repeats' own ratios. Outputs go to a temporary
# folder. The images of both sides are compared: they must be byte-identical.
set -euo pipefail
TKG=${1:-target/release/tkg}
MODEL=${2:-tiny-sd15}
STEPS=${3:-20}
BATCH=${4:-8}
REPEATS=${5:-5}
TKG=$(realpath "$TKG")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HOME=${HF_HOME:-$WORK/hf}

"$TKG" -q models materialize "$MODEL" >/dev/null 2>&1 || true

for i in $(seq 0 7); do
  printf '{"prompt": "a red toy car number %d", "seed": %d}\n' "$i" $((100 + i))
done > "$WORK/jobs.jsonl"

now() { date +%s.%N; }
best_sep=999999
best_bat=999999
ratios=()
for rep in $(seq "$REPEATS"); do
  rm -rf "$WORK/sep" "$WORK/bat"; mkdir -p "$WORK/sep" "$WORK/bat"
  t0=$(now)
  for i in $(seq 0 7); do
    "$TKG" -q generate --model "$MODEL" --steps "$STEPS" --prompt "a red toy car number $i" \
      --seed $((100 + i)) --out "$WORK/sep/$(printf %05d "$i").png" >/dev/null
  done
  t1=$(now)
  "$TKG" -q batch "$WORK/jobs.jsonl" --model "$MODEL" --steps "$STEPS" --batch-size "$BATCH" \
    --out "$WORK/bat/{index:05}.png" >/dev/null
  t2=$(now)
  sep=$(echo "$t1 - $t0" | bc -l); bat=$(echo "$t2 - $t1" | bc -l)
  best_sep=$(echo "if ($sep < $best_sep) $sep else $best_sep" | bc -l)
  best_bat=$(echo "if ($bat < $best_bat) $bat else $best_bat" | bc -l)
  ratios+=("$(echo "$bat / $sep" | bc -l)")
done
median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}')
for f in "$WORK"/sep/*.png; do cmp -s "$f" "$WORK/bat/$(basename "$f")" || { echo "MISMATCH $f" >&2; exit 1; }; done
printf 'model %s, %s steps, 8 images, batch size %s, %s CPU cores\n' "$MODEL" "$STEPS" "$BATCH" "$(nproc)"
printf '8 x tkg generate: %.2f s\n' "$best_sep"
printf '1 x tkg batch:    %.2f s\n' "$best_bat"
printf 'ratio batch/separate: %.2f (best times), median of %s repeats %.2f [%s]\n' \
  "$(echo "$best_bat / $best_sep" | bc -l)" "$REPEATS" "$median" \
  "$(printf '%.2f ' "${ratios[@]}" | sed 's/ $//')"
