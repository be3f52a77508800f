#!/usr/bin/env bash
# Run on a machine WITH network: downloads into .whl/ exactly the wheels tools/gpu_check.sh installs on a GPU
# machine without network whose python (3.12, torch with CUDA, numpy, scipy, safetensors, psutil, pytest,
# huggingface_hub, transformers) lacks them: diffusers, torchsde and their missing dependencies.
#   bash tools/gpu_wheels.sh [PYTHON_VERSION]      (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PYV="${1:-3.12}"
mkdir -p .whl
PIP=(python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp
     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
     --platform any -d .whl)
# the versions the CPU suite runs; diffusers declares importlib_metadata, torchsde needs trampoline (the host has
# huggingface_hub, Pillow, regex, requests, filelock, zipp)
"${PIP[@]}" diffusers==0.42.1 torchsde==0.2.6 trampoline==0.1.2 importlib_metadata
ls -1 .whl
