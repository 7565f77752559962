#!/usr/bin/env bash
# One short GPU check for a single CUDA card (sized for an H200, < 10 minutes):
#   1. loss memory at GPU sizes: bf16, vocabulary 128k, 8,192 tokens, hidden 4,096 — fused vs simple (vs TRL if installed);
#   2. distillation throughput: bf16, ~1B llama-config teacher (random init) into a ~300M student, 30 steps,
#      live teacher, through nlm's own trainer; tokens/s, peak memory and MFU against the card's bf16 peak;
#   3. the same student trained from a teacher cache (built first, not timed), for the cached speed-up;
#   4. fused vs simple loss under bf16 autocast (fp32 master weights, vocabulary 128k): loss and gradient
#      differences, next to the fp32 fused loss's difference from the same bf16 reference.
# MFU is against the card's dense bf16 peak (989 TFLOP/s for an SXM H100/H200) and counts the output head's
# FLOPs only at the target tokens, where nlm's fused loss runs it.
#   4. FSDP2 / DeepSpeed ZeRO-2/3 through configs/accelerate/: the fused loss stays on and matches the simple one.
# Prints one JSON object per part, and writes them to ${OUT:-/tmp}/gpu_check.json.
# `python3 bench/gpu_check.py loss --smoke` (or `train --smoke`) runs the same code on the CPU at tiny sizes.
#
# The device image has torch, transformers, accelerate, peft and safetensors, but not datasets or
# pydantic-settings: carry their wheels in .whl/ (see the device README) and they are installed first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl datasets pydantic pydantic-core pydantic-settings python-dotenv typing-inspection dill multiprocess xxhash
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-/tmp}/gpu_check.json"
: > "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 180 python3 bench/gpu_check.py loss | tee -a "$out"
timeout 120 python3 bench/gpu_check.py bf16 | tee -a "$out"
timeout 360 python3 bench/gpu_check.py train | tee -a "$out"
# 4. sharded training through the shipped accelerate configs: FSDP2 (and DeepSpeed ZeRO-2/3 when installed),
#    fused vs simple loss, same step-1 loss and grad norm, fused loss kept on. `python3 bench/gpu_check_sharded.py --smoke`
#    checks the script on the CPU.
timeout 300 python3 bench/gpu_check_sharded.py | tee -a "$out"
