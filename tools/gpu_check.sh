#!/usr/bin/env bash
# One command for the first GPU machine (issue 10 §6): a table on stdout and gpu_check.json.
#   bash tools/gpu_check.sh [--json PATH] [--deadline-s S] [--steps a,b]   (flags go to tools/gpu_check.py)
# Fits in 8 minutes on one GPU (every step bounded; the whole run by GPU_CHECK_LIMIT_S, default 450 s) and
# does more with more GPUs. Python: $PYTHON, else the first python3 whose torch sees CUDA (never installs
# a CPU torch over it), else a fresh .venv-gpu with torch from PyPI (CUDA build on Linux). Missing pure-Python
# packages (diffusers, torchsde, ...) come from .whl/ when it exists (tools/gpu_wheels.sh fills it on a machine
# with network; installed with --no-index into a temporary folder), else from PyPI.
# GPU_CHECK_ALLOW_CPU=1 (the test suite) takes $PYTHON without CUDA and runs every step on the CPU (--cpu).
set -uo pipefail
cd "$(dirname "$0")/.."
LIMIT="${GPU_CHECK_LIMIT_S:-450}"
say() { echo "gpu_check: $*" >&2; }

cuda_python() {
    for py in "${PYTHON:-}" /opt/torch/.venv/bin/python3 python3; do
        [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
        if timeout 60 "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    return 1
}

CPU_FLAG=()
if [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    PY="${PYTHON:-python3}"
    CPU_FLAG=(--cpu)
else
    PY="$(cuda_python)"
fi
if [ -z "$PY" ]; then
    say "no python3 here has a torch that sees CUDA; creating .venv-gpu with torch from PyPI"
    python3 -m venv .venv-gpu && timeout 600 .venv-gpu/bin/python -m pip install -q torch || {
        say "could not install torch (no network?); set PYTHON to a python whose torch sees the GPU"; exit 2; }
    PY=.venv-gpu/bin/python
    timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
        say "torch installed but sees no CUDA device: is there a GPU and a driver (nvidia-smi)?"; exit 2; }
fi
say "python: $PY ($("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)'))"

SITE="$(mktemp -d -t pipefusion-gpu-check-XXXXXX)"
trap 'rm -rf "$SITE"' EXIT
missing=$("$PY" - <<'PY'
import importlib.util
need = {"diffusers": "diffusers", "torchsde": "torchsde", "safetensors": "safetensors", "psutil": "psutil",
        "scipy": "scipy", "pytest": "pytest", "PIL": "pillow"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        say "installing from .whl/ (for: $missing) into $SITE"
        timeout 300 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl || { say "pip failed"; exit 2; }
    else
        say "installing from PyPI into $SITE: $missing"
        # shellcheck disable=SC2086
        timeout 300 "$PY" -m pip install -q --target "$SITE" $missing || { say "pip failed (no network? run tools/gpu_wheels.sh where there is one)"; exit 2; }
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout --kill-after=10 "$LIMIT" "$PY" tools/gpu_check.py "${CPU_FLAG[@]}" --deadline-s "$((LIMIT - 60))" "$@"
rc=$?
[ $rc -eq 124 ] && say "stopped after ${LIMIT} s (GPU_CHECK_LIMIT_S); the JSON holds the steps that finished"
exit $rc
