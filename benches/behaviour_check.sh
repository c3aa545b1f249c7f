#!/usr/bin/env bash
# Runs one fixed list of tkg commands with two binaries and checks that they write the same
# bytes: every output file (images, mattes, cut-outs, latents), stdout, exit codes, and the
# manifest records less their timings. For refactors, whose bar is "behaviour does not
# change".
#
#   benches/behaviour_check.sh OLD_TKG NEW_TKG
#
# Both binaries must be built the same way (both release or both debug): the bits of a
# generation depend on the code generation, not only on the source. Needs python3 (for the
# manifest comparison) and the repository's tests/golden models; downloads nothing.
set -euo pipefail
old=$(realpath "$1")
new=$(realpath "$2")
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export HF_HOME="$work/hf-home" HF_HUB_OFFLINE=1
golden="$repo/tests/golden"
sd15="$golden/sd15/a/model"
lora="$golden/lora/sd15_kohya.lora.safetensors"

# The cases: a name and a command line (run in the case's own folder; $T is the binary).
cases=(
  'generate|$T generate --model tiny-sd15 --prompt "a red vintage car" --seed 42 --steps 6 --out car.png'
  'generate-sdxl|$T generate --model tiny-sdxl --prompt "a steel watch" --negative-prompt blurry --seed 7 --steps 5 --width 64 --height 48 --original-size 128x96 --crop-top-left 4,8 --subject-center=-0.5,0 --subject-center 0.25,0.5 --color blue --save-latents w.safetensors --matte-depth 16 --premultiplied --clean-plate --out w.png'
  'generate-methods|$T generate --model tiny-sd15 --prompt "a cat" --seed 3 --steps 4 --method prompt --color magenta --rng torch-cuda --out p.png && $T generate --model tiny-sd15 --prompt "a cat" --seed 3 --steps 4 --method plain --no-key --guidance 1 --out q.png'
  'generate-lora|$T generate --model-dir '"$sd15"' --lora '"$lora"':0.7 --prompt "a pack of coffee" --seed 5 --steps 4 --out l.png'
  'generate-lora-tag|mkdir loras && cp '"$lora"' loras/ && $T generate --model-dir '"$sd15"' --lora-dir loras --prompt "a pack <lora:sd15_kohya.lora:0.5>" --seed 5 --steps 4 --clip-skip 2 --out t.png'
  'batch-shards|printf "%s\n" "{\"prompt\": \"a cat\", \"seed\": 100, \"num_images\": 3}" "{\"prompt\": \"a dog\", \"color\": \"blue\", \"steps\": 3}" "{\"prompt\": \"a cup\", \"model\": \"tiny-sdxl\", \"width\": 64, \"height\": 64}" "{\"prompt\": \"x\", \"subject_center\": [[0.5, 0]], \"method\": \"prompt\"}" > jobs.jsonl && $T batch jobs.jsonl --model tiny-sd15 --steps 4 --seed 9 --out "o/{index:03}-{slug}-{seed}.png" --manifest m.jsonl --shard 0/2 --batch-size 2 --progress none && $T batch jobs.jsonl --model tiny-sd15 --steps 4 --seed 9 --out "o/{index:03}-{slug}-{seed}.png" --manifest m.jsonl --shard 1/2 --progress none'
  'batch-resume|printf "a red car\nan apple\na green frog\n" > p.txt && $T batch --prompt-file p.txt --model tiny-sd15 --steps 3 --num-images 2 --manifest m.jsonl --progress none && rm tkg-00001-1.png tkg-00004-4.cutout.png && $T batch --prompt-file p.txt --model tiny-sd15 --steps 3 --num-images 2 --skip-existing --manifest m.jsonl --progress none && $T batch --prompt-file p.txt --model tiny-sd15 --steps 3 --num-images 2 --dry-run --skip-existing'
  'key|$T generate --model tiny-sd15 --prompt "a ball" --seed 1 --steps 3 --no-key --out in.png && $T key in.png --color green --out k.png && $T key in.png --flat-screen --refine --despill 0.5 --matte-depth 16 --out k2.png'
  'info|$T generate --model tiny-sd15 --prompt "it'"'"'s a car, red" --negative-prompt "dull: flat" --seed 11 --steps 3 --subject-center=-0.25,0.5 --out i.png && $T info i.png && $T info --json i.png'
  'errors|printf "%s\n" "{\"prompt\": \"a\", \"steps\": 0}" "{\"promt\": \"x\"}" > bad.jsonl; $T batch bad.jsonl --model tiny-sd15; echo "exit $?"; $T generate --model tiny-sd15 --prompt x --seed 1 --width 100 --out e.png; echo "exit $?"; $T generate --model nope --prompt x --seed 1 --out e.png; echo "exit $?"'
)

run_side() { # binary, folder
  local T=$1 dir=$2 name cmd
  mkdir -p "$dir"
  for c in "${cases[@]}"; do
    name=${c%%|*}
    cmd=${c#*|}
    mkdir -p "$dir/$name"
    (cd "$dir/$name" && T=$T bash -c "$cmd" >stdout 2>stderr; echo "$?" >status) || true
  done
}

echo "old: $old"
echo "new: $new"
run_side "$old" "$work/old"
run_side "$new" "$work/new"

fail=0
for c in "${cases[@]}"; do
  name=${c%%|*}
  a="$work/old/$name" b="$work/new/$name"
  diffs=()
  while IFS= read -r f; do
    case "$f" in
      stderr) [[ $name == errors ]] && ! cmp -s "$a/$f" "$b/$f" && diffs+=("$f"); continue ;;
      m.jsonl)
        if ! python3 - "$a/$f" "$b/$f" <<'EOF'
import json, sys
def load(p):
    out = []
    for line in open(p):
        r = json.loads(line)
        r.pop("timings", None)
        r.pop("finished_unix", None)
        out.append(r)
    return sorted(out, key=lambda r: r["index"])
sys.exit(0 if load(sys.argv[1]) == load(sys.argv[2]) else 1)
EOF
        then diffs+=("$f"); fi ;;
      *) cmp -s "$a/$f" "$b/$f" || diffs+=("$f") ;;
    esac
  done < <( (cd "$a" && find . -type f | sed 's|^\./||'; cd "$b" && find . -type f | sed 's|^\./||') | sort -u)
  files=$(cd "$a" && find . -type f ! -name 'std*' ! -name status | wc -l)
  if [ ${#diffs[@]} -eq 0 ]; then
    echo "same  $name ($files files, stdout, status)"
  else
    echo "DIFF  $name: ${diffs[*]}"
    for f in "${diffs[@]}"; do
      case "$f" in stdout|stderr|status) diff "$a/$f" "$b/$f" | head -12 || true ;; esac
    done
    fail=1
  fi
  if [[ $name != errors ]] && ! cmp -s "$a/stderr" "$b/stderr"; then
    echo "      (stderr differs; not compared, it has timings)"
  fi
done
if [ $fail -eq 0 ]; then echo "behaviour check: all cases byte-identical"; else echo "behaviour check: DIFFERENCES"; exit 1; fi
