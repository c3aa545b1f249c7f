#!/usr/bin/env bash
# The one prepared GPU run (docs/cuda.md): parity, dtypes and speed against diffusers.
#
#   scripts/gpu-check.sh OUT [--tkg BIN] [--wheels DIR] [--device cuda|cpu] [--quick]
#                            [--budget SECONDS] [--skip STAGE,...]
#
# OUT gets gpu-check.json, gpu-check.log and gpu-check-commands.log. BIN defaults to .gpu/tkg
# (the stripped CUDA build), DIR to .whl (diffusers and the pure-Python packages the device
# machine lacks; installed into a private folder only when `import diffusers` fails).
# `--device cpu --quick` is the dry run on a machine without a GPU. PYTHON picks the
# interpreter (default python3: on the device machine, the one that has PyTorch).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: scripts/gpu-check.sh OUT [options]" >&2; exit 2; }
out=$1; shift
wheels=.whl
tkg=.gpu/tkg
device=cuda
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels=$2; shift 2 ;;
        --tkg) tkg=$2; shift 2 ;;
        --device) device=$2; args+=("$1" "$2"); shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done
py=${PYTHON:-python3}
mkdir -p "$out" || exit 1
exec > >(tee -a "$out/gpu-check.log") 2>&1
echo "gpu-check: $(date -u +%FT%TZ) device=$device tkg=$tkg python=$py"

if [ "$device" = cuda ]; then
    nvidia-smi || echo "gpu-check: nvidia-smi failed"
fi

# cuBLAS, cuRAND (and cuDNN) from the interpreter's own NVIDIA wheels: a cu130 PyTorch has them.
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# CUDA 13 wheels unpack into nvidia/cu13/lib; older layouts use nvidia/<name>/lib.
for d in "$site"/nvidia/*/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
echo "gpu-check: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
if [ ! -x "$tkg" ]; then
    echo "gpu-check: no tkg binary at $tkg (build it: docs/cuda.md)"; exit 1
fi
missing=$(ldd "$tkg" | grep "not found")
if [ -n "$missing" ]; then
    echo "gpu-check: libraries not found:"; echo "$missing"; exit 1
fi
ldd "$tkg" | grep -E "libcuda|libcublas|libcurand|libcudnn"

if ! "$py" -c 'import diffusers' 2>/dev/null; then
    if compgen -G "$wheels/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/tkg-gpu-site "$wheels"/*.whl || exit 1
        export PYTHONPATH="/tmp/tkg-gpu-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu-check: diffusers is missing and $wheels has no wheels: the diffusers side fails"
    fi
fi

PYTHONUNBUFFERED=1 "$py" benches/gpu_check.py --out "$out" --tkg "$tkg" "${args[@]}"
