#!/usr/bin/env bash
# One batch on a GPU machine (the device tool's H100): GPU tests, benchmark, profiles.
# Writes everything under ${OUT:-bench/results}; prints a short summary last.
#   MODE=quick: a test subset and the benchmark without the sweep; MODE=full: everything.
#   PARTS: which steps run, default "tests bench sweep host ncu explore". A full session
#   takes longer than one 10-minute device call; split it, e.g.
#     PARTS="tests bench" bash bench/device_session.sh; PARTS="sweep host ncu explore" bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
MODE=${MODE:-full}
PARTS=" ${PARTS:-tests bench sweep host ncu explore} "
has() { [[ "$PARTS" == *" $1 "* ]]; }
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ls .whl/*.whl >/dev/null 2>&1; then  # peers carried as wheels (liger-kernel)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
bash .ci/install --bench >/dev/null 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/device.txt"
if has tests; then
  if [ "$MODE" = quick ]; then
    timeout 240 python3 -m pytest -q -x -p no:cacheprovider -n 8 tests/test_core.py tests/test_training.py \
      > "$OUT/pytest.log" 2>&1
  else
    timeout ${PYTEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -n 12 tests/ ${PYTEST_EXTRA:-} \
      > "$OUT/pytest.log" 2>&1
  fi
  echo "pytest exit $?" >> "$OUT/pytest.log"
fi
if has bench; then  # the rows, QK-norm, M-RoPE and host tables (the sweep is its own part)
  timeout ${BENCH_TIMEOUT:-400} python3 bench/bench_rope.py --out "$OUT/bench.json" --no-sweep \
    > "$OUT/bench.log" 2> "$OUT/bench.err"
fi
if has sweep && [ "$MODE" = full ]; then
  timeout ${SWEEP_TIMEOUT:-150} python3 bench/bench_rope.py --sweep-only --out "$OUT/sweep.json" --plot "$OUT/gbps.png" \
    > "$OUT/sweep.log" 2>&1
fi
has host && timeout 90 python3 bench/profile_host.py > "$OUT/host.txt" 2>&1
if has ncu; then
  for s in ${NCU_SHAPES:-llama3-8b-prefill qwen3.5-prefill decode-64}; do
    echo "=== $s" >> "$OUT/ncu.txt"
    timeout ${NCU_TIMEOUT:-90} ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section WarpStateStats python3 bench/ncu_case.py $s \
      >> "$OUT/ncu.txt" 2>&1
  done
fi
if has explore; then  # the tuner's pick beside the bounds (no candidate sweep: see explore_configs.py)
  timeout ${EXPLORE_TIMEOUT:-120} python3 bench/explore_configs.py --no-configs \
    --shapes ${EXPLORE_SHAPES:-qwen3.5-prefill,llama3-8b-prefill,mla-8k-neox,decode-1,decode-256} \
    --json "$OUT/explore.json" > "$OUT/explore.txt" 2>&1
fi
[ -f "$OUT/pytest.log" ] && tail -3 "$OUT/pytest.log"
[ -f "$OUT/ncu.txt" ] && grep -E "^===|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Block Size|Grid Size|Issued Ipc|No Eligible" \
  "$OUT/ncu.txt" | head -40
[ -f "$OUT/host.txt" ] && cat "$OUT/host.txt"
[ -f "$OUT/explore.txt" ] && grep -E "^==|tuned|touch 4x8 w4 |mul_|liger" "$OUT/explore.txt"
[ -f "$OUT/bench.err" ] && tail -5 "$OUT/bench.err"
[ -f "$OUT/bench.log" ] && tail -40 "$OUT/bench.log"
exit 0
