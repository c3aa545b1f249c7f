#!/usr/bin/env bash
# Prepares what the one GPU run carries (docs/cuda.md, "The GPU check"), on a machine with no
# GPU: the stripped CUDA release binary in .gpu/tkg and the wheels the device machine lacks in
# .whl/ (diffusers and importlib_metadata; it has PyTorch, transformers, safetensors, Pillow).
# Both folders are kept out of git through .git/info/exclude.
#
#   scripts/gpu-prepare.sh [TOOLCHAIN_DIR]     (CUDA_COMPUTE_CAP defaults to 90: H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cuda-toolchain.sh
source scripts/cuda-toolchain.sh "${1:-}"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
nice -n 10 cargo build --release --features cuda
mkdir -p .gpu .whl
strip -o .gpu/tkg "$CARGO_TARGET_DIR/release/tkg"
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 importlib_metadata==8.7.0
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
for p in /.gpu/ /.whl/; do grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"; done
ls -l .gpu/tkg .whl/
