#!/usr/bin/env bash
# The GPU check: ONE command that finishes in at most 7 minutes on an H100/H200, whatever happens — every part
# runs under a timeout taken from a 420 s budget (the timeouts add up to 405 s), most important figures first:
#   1. loss (<= 60 s): fused vs simple loss, peak memory and time, bf16, vocabulary 128k, 8,192 tokens, hidden 4,096
#      (vs TRL's chunked loss if trl is installed);
#   2. train (<= 150 s): bf16 distillation throughput through nlm's trainer, ~1B llama-config teacher (random
#      init) into a ~300M student, 20 steps, live teacher then teacher cache: tokens/s, peak memory, MFU against
#      the card's dense bf16 peak (989 TFLOP/s for an SXM H100/H200; the head's FLOPs counted at target tokens);
#   3. bf16 (<= 45 s): fused vs simple loss under bf16 autocast with fp32 master weights: loss and gradient
#      differences, next to the fp32 fused loss's difference from the same bf16 reference;
#   4. sharded (<= 120 s): `nlm train` under `accelerate launch` with configs/accelerate/fsdp2.yaml (and DeepSpeed
#      ZeRO-2/3 when installed): fused vs simple, same step-1 loss and grad norm, fused loss kept on.
# Each part writes ${OUT:-/tmp}/gpu_check/<part>.json as soon as it has a figure (train after each mode, sharded
# after each engine), so a run cut off keeps what it measured; after each part one summary line is printed;
# ${OUT:-/tmp}/gpu_check.json gathers the part files at the end.
#
# `bench/gpu_check.sh --smoke` runs the same parts on the CPU at tiny sizes (checks the script, measures
# nothing; the sharded part then runs FSDP2 for real on two gloo CPU processes, see gpu_check_sharded.py).
#
# The device image has torch, transformers, accelerate, peft and safetensors, but not datasets or
# pydantic-settings: carry their wheels in .whl/ (see the device README) and they are installed first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d .whl datasets pydantic pydantic-core pydantic-settings python-dotenv typing-inspection dill multiprocess xxhash
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=""
[ "${1:-}" = "--smoke" ] && smoke="--smoke"
python="${PYTHON:-python3}"
budget=420
scale=1
[ -n "$smoke" ] && { scale=4; budget=$((budget * scale)); }  # a shared CPU is slower than the card
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  timeout 30 "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
dir="${OUT:-/tmp}/gpu_check"
mkdir -p "$dir"
rm -f "$dir"/*.json
[ -z "$smoke" ] && { timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }

run_part() {  # name, seconds, command...: at most `seconds`, and never past the whole budget
  local name=$1 limit=$(($2 * scale))
  shift 2
  local left=$((budget - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    echo "$name: skipped (the ${budget}s budget is spent)"
    return
  fi
  timeout --kill-after=5 "$limit" "$@" --out "$dir/$name.json" > "$dir/$name.log" 2> "$dir/$name.err"
  local code=$?
  [ "$code" -ne 0 ] && echo "$name: exit $code after $((SECONDS))s total (124: cut off at ${limit}s); last error: $(tail -n 1 "$dir/$name.err")"
  "$python" bench/gpu_check.py summary "$dir/$name.json"
}

run_part loss 60 "$python" bench/gpu_check.py loss $smoke
run_part train 150 "$python" bench/gpu_check.py train $smoke
run_part bf16 45 "$python" bench/gpu_check.py bf16 $smoke
run_part sharded 120 "$python" bench/gpu_check_sharded.py $smoke
cat "$dir"/*.json > "${OUT:-/tmp}/gpu_check.json" 2>/dev/null || true
echo "gpu_check: ${SECONDS}s; part files in $dir"
