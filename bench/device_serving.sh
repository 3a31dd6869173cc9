#!/usr/bin/env bash
# The serving op's device checks, for the device tool (one GPU), from the repository root,
# carrying .flashinfer (bench/flashinfer/fetch_headers.sh) and .whl (liger-kernel 0.8.5):
#   bash bench/device_serving.sh bench   # bench/bench_cache.py, then the standalone decode rows
#   bash bench/device_serving.sh check   # the GPU suite, then compute-sanitizer on the serving ops
# Each part fits one call (10 minutes, a fresh machine's start included) on an H100/H200:
# bench_cache's 20 rows take about 4-5 minutes with FlashInfer's two builds, the suite about 3.
set -u
part=${1:-bench}
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
if [ "$part" = bench ]; then
  timeout 420 python3 bench/bench_cache.py --out "$OUT/cache.json" > "$OUT/cache_log.txt" 2>&1
  echo "bench_cache rc=$?"
  timeout 120 python3 bench/bench_rope.py --shapes decode-1,decode-64,decode-256 --no-sweep --no-qknorm --no-mrope \
    --no-host --out "$OUT/rope_decode.json" > "$OUT/rope_decode_log.txt" 2>&1
  echo "bench_rope rc=$?"
  tail -32 "$OUT/cache_log.txt"
  grep -A4 "^device time" "$OUT/rope_decode_log.txt"
else
  timeout 360 python3 -m pytest -q -p no:cacheprovider -n 16 --dist worksteal -rf tests > "$OUT/gpu_suite.txt" 2>&1
  echo "suite rc=$?"
  YARN_TRITON_AUTOTUNE=0 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 bench/sanitize_cache.py > "$OUT/sanitizer.txt" 2>&1
  echo "sanitizer rc=$?"
  tail -5 "$OUT/gpu_suite.txt"
  tail -2 "$OUT/sanitizer.txt"
fi
