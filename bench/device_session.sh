#!/usr/bin/env bash
# What produced the figures in docs/: one batch on a GPU machine (H100 of the device tool).
# Writes everything under ${OUT:-bench/results}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
bash .ci/install --bench >/dev/null
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
# 0. the GPU tests that failed in the previous full run (all others passed there)
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_training.py tests/test_robustness.py \
  -k "fast_launch or nan_inf or fused_qkv_head" 2>&1 | tail -2 | tee "$OUT/pytest_rerun.log"
# 1. benchmark: table, JSON, plot
timeout 330 python3 bench/bench_rope.py --out "$OUT/bench.json" --plot "$OUT/gbps.png" 2>&1 \
  | grep -v "Backend impl" > "$OUT/bench.log"
# 2. accuracy table on the GPU
timeout 60 python3 bench/accuracy_table.py --markdown "$OUT/accuracy.md" > "$OUT/accuracy.log" 2>&1
# 3. whole-model forward with and without the transformers switch
timeout 120 python3 bench/model_forward.py --out "$OUT/model.json" > "$OUT/model.log" 2>&1
# 4. memcheck over a GPU subset (every layout, dtype, view and position form)
YARN_TRITON_AUTOTUNE=0 timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest -q -p no:cacheprovider tests/test_core.py tests/test_training.py \
  -k "(kernel_matches and mha and scale0 or matches_reference and gqa and 40) or varlen or offsets or grads" \
  > "$OUT/sanitizer.log" 2>&1
echo "sanitizer exit: $?" >> "$OUT/sanitizer.log"
tail -3 "$OUT/sanitizer.log"; tail -4 "$OUT/model.log"; tail -16 "$OUT/bench.log"
