#!/usr/bin/env bash
# The serving op's device checks, for the device tool (one GPU), from the repository root,
# carrying .flashinfer (bench/flashinfer/fetch_headers.sh) and .whl (bench/fetch_wheels.sh):
#   bash bench/device_serving.sh bench   # bench/bench_cache.py, then the standalone decode rows
#   bash bench/device_serving.sh check   # the GPU suite, then compute-sanitizer on the serving ops
#   bash bench/device_serving.sh all     # both in one call: FlashInfer's bindings build (carry
#                                        # .flashinfer/include) beside the suite, then the timings
# Each part fits one call (10 minutes, a fresh machine's start included) on an H100/H200:
# bench_cache's 20 rows take about 4-5 minutes with FlashInfer's two builds, the suite about 3;
# `all` keeps to BUDGET seconds (560) and prints what it had to skip.
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
# Every step runs under `step SECONDS CMD...`: at most SECONDS, and never past the call's
# budget (BUDGET seconds from the start, default 560: a device call has 600), so a slow
# step shortens or skips the ones after it instead of losing the whole call's output.
BUDGET=${BUDGET:-560}
step() {
  local want=$1 left=$((BUDGET - SECONDS))
  shift
  if [ "$left" -lt 20 ]; then echo "skipped (no time left): $*"; return 0; fi
  timeout $((want < left ? want : left)) "$@"
}
bench() {
  step "${1:-420}" python3 bench/bench_cache.py --out "$OUT/cache.json" > "$OUT/cache_log.txt" 2>&1
  echo "bench_cache rc=$?"
  step 100 python3 bench/bench_rope.py --shapes decode-1,decode-64,decode-256 --no-sweep --no-qknorm --no-mrope \
    --no-host --out "$OUT/rope_decode.json" > "$OUT/rope_decode_log.txt" 2>&1
  echo "bench_rope rc=$?"
  # the opt-in low-precision rotation (its "ours" columns), beside the run above
  YARN_TRITON_LOW_PRECISION_ROTATION=1 step 100 python3 bench/bench_rope.py --shapes decode-1,decode-64,decode-256 \
    --no-sweep --no-qknorm --no-mrope --no-host --out "$OUT/rope_decode_lowrot.json" > "$OUT/rope_decode_lowrot_log.txt" 2>&1
  echo "bench_rope low-precision rotation rc=$?"
}
suite() {
  step "${1:-360}" python3 -m pytest -q -p no:cacheprovider -n 16 --dist worksteal -rf tests > "$OUT/gpu_suite.txt" 2>&1
  echo "suite rc=$?"
}
sanitize() {
  YARN_TRITON_AUTOTUNE=0 step 100 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 bench/sanitize_cache.py > "$OUT/sanitizer.txt" 2>&1
  echo "sanitizer rc=$?"
}
host() {
  step 60 python3 bench/profile_host.py --calls 3000 --rounds 5 > "$OUT/host.txt" 2>&1
  echo "profile_host rc=$?"
}
report() {
  [ -f "$OUT/gpu_suite.txt" ] && { grep -E "^(FAILED|ERROR)" "$OUT/gpu_suite.txt" | head -20; tail -2 "$OUT/gpu_suite.txt"; }
  [ -f "$OUT/sanitizer.txt" ] && tail -2 "$OUT/sanitizer.txt"
  [ -f "$OUT/cache_log.txt" ] && tail -32 "$OUT/cache_log.txt"
  [ -f "$OUT/host.txt" ] && grep -E "add_|apply_rope" "$OUT/host.txt"
  [ -f "$OUT/rope_decode_log.txt" ] && grep -A4 "^device time" "$OUT/rope_decode_log.txt"
  [ -f "$OUT/rope_decode_lowrot_log.txt" ] && grep -A4 "^device time" "$OUT/rope_decode_lowrot_log.txt"
  return 0
}
case "$part" in
  bench) bench ;;
  check) suite; sanitize ;;
  all)  # the two bindings build while the suite runs (nvcc beside pytest: no timing is taken then);
        # then the timings, the host profile and the sanitizer, as long as the budget lasts
    (cd bench/flashinfer && timeout 400 python3 -c "import load; load.load(); load.load_cache(); print('built')" \
      > "$OUT/flashinfer_build.txt" 2>&1) &
    suite 240
    wait
    tail -1 "$OUT/flashinfer_build.txt"
    bench 200
    host
    sanitize ;;
  *) echo "usage: $0 bench|check|all" >&2; exit 2 ;;
esac
report
