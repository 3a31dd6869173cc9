#!/usr/bin/env bash
# One batch on a GPU machine (the device tool's H100): GPU tests, benchmark, profiles.
# Writes everything under ${OUT:-bench/results}; prints a short summary last.
#   MODE=quick: a test subset and the benchmark without the sweep; MODE=full: everything.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
MODE=${MODE:-full}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ls .whl/*.whl >/dev/null 2>&1; then  # peers carried as wheels (liger-kernel)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
bash .ci/install --bench >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
if [ "$MODE" = quick ]; then
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider -n 8 tests/test_core.py tests/test_training.py \
    > "$OUT/pytest.log" 2>&1
else
  timeout ${PYTEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -n 12 tests/ ${PYTEST_EXTRA:-} \
    > "$OUT/pytest.log" 2>&1
fi
echo "pytest exit $?" >> "$OUT/pytest.log"
SWEEP=--no-sweep; [ "$MODE" = full ] && SWEEP=""
timeout ${BENCH_TIMEOUT:-330} python3 bench/bench_rope.py --out "$OUT/bench.json" --plot "$OUT/gbps.png" $SWEEP \
  > "$OUT/bench.log" 2> "$OUT/bench.err"
timeout 90 python3 bench/profile_host.py > "$OUT/host.txt" 2>&1
for s in ${NCU_SHAPES:-llama3-8b-prefill mla-8k-deepseek decode-64}; do
  echo "=== $s" >> "$OUT/ncu.txt"
  timeout ${NCU_TIMEOUT:-90} ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section WarpStateStats python3 bench/ncu_case.py $s \
    >> "$OUT/ncu.txt" 2>&1
done
tail -3 "$OUT/pytest.log"
grep -E "^===|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Block Size|Grid Size|Issued Ipc|No Eligible" \
  "$OUT/ncu.txt" | head -40
cat "$OUT/host.txt"; tail -5 "$OUT/bench.err"; tail -22 "$OUT/bench.log"
