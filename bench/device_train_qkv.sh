#!/usr/bin/env bash
# One device call (one GPU) for issues #26 and #25, from the repository root, carrying .whl
# (bench/fetch_wheels.sh):
#   1. bench/bench_qkv.py --sweep: the fused QKV GEMM rows, the ship line, every config timed
#      (timings first, while nothing else runs on the GPU);
#   2. bench/torchtitan_train.sh: llama3 and deepseek_v3, eager and compiled, with and
#      without our rope, loss curves compared step by step;
# each under the call's budget (BUDGET seconds, default 570); what is skipped is printed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export OUT
mkdir -p "$OUT"
BUDGET=${BUDGET:-570}
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
left() { echo $((BUDGET - SECONDS)); }
PYTHONUNBUFFERED=1 timeout "${QKV_SECONDS:-240}" python3 bench/bench_qkv.py --sweep --out "$OUT/qkv.json" \
  > "$OUT/qkv_log.txt" 2>&1
echo "bench_qkv rc=$?"
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" bash bench/torchtitan_train.sh "${MODELS:-llama3,deepseek_v3}" > "$OUT/torchtitan.txt" 2>&1
  echo "torchtitan rc=$?"
else
  echo "skipped (no time left): bench/torchtitan_train.sh"
fi
tail -25 "$OUT/qkv_log.txt"
tail -12 "$OUT/torchtitan.txt" 2>/dev/null
exit 0
