#!/usr/bin/env bash
# Device checks and timings for the device tool (one GPU), as named parts run in the order
# given, all under one call budget (BUDGET seconds from the start, default 560: a call has
# 600). A slow part shortens or skips the later ones, and what is skipped is printed.
# From the repository root, carrying .whl (bench/fetch_wheels.sh) and .flashinfer/include
# (bench/flashinfer/fetch_headers.sh):
#   bash bench/device.sh fi qkv ncu cache host decode   # timings (#26, #24, #25's host ratio)
#   bash bench/device.sh titan suite san                # torchtitan curves, GPU suite, sanitizer
# Everything written under $OUT comes back as $OUT/device_out.tgz (KEEP_FILES=1: as files).
# Parts:
#   fi      build FlashInfer's two bindings in the background (CPU only; `cache` waits for it)
#   qkv     bench/bench_qkv.py --sweep: the fused QKV GEMM rows, ship line, every config (#26)
#   ncu     Nsight Compute on one fused QKV launch and one plain Triton GEMM at 16K tokens
#   cache   bench/bench_cache.py: the serving table (#24); CACHE_ARGS adds arguments (e.g. some
#           rows: CACHE_ARGS="--models deepseek-v3 --caches fp8"; YARN_TRITON_TUNE_LOG=1 logs
#           the tuner's timings into cache_log.txt)
#   decode  bench/bench_rope.py decode rows, default and YARN_TRITON_LOW_PRECISION_ROTATION=1
#   host    bench/profile_host.py: host time per eager call vs a trivial torch op (#25)
#   args    bench/launch_args_probe.py: a Triton launch's host cost against its argument count
#   titan   bench/torchtitan_train.sh: llama3 + deepseek_v3 loss curves, eager and compiled
#   suite   the GPU test suite (-rf names failures)
#   san     compute-sanitizer memcheck on the serving ops
#   probe   (in the background) bench/compile_alias_probe.py: which compiled in-place calls lose a write (aot_eager,
#           Inductor; ours, and a minimal kernel as triton_op and custom_op), and the
#           serving case's AOT graphs and Inductor code
#   verify  suite and san at once
#   checks  titan, suite and san at once (correctness only, no timing: they share the GPU)
#   shapes  DeepSeek-V3 FP8 serving rows (SHAPES_ROWS, default decode-1 decode-8): graph time of
#           the fused call at the tuner's pick and at each decode launch shape
#   why     profiler evidence for the serving misses: Nsight Compute on DeepSeek-V3 FP8
#           decode-1 (ours, the plain store of the same bytes), each launch shape's graph
#           time there and at 8 tokens, and decode-256 ours against Liger's kernel
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
export OUT
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/device.txt"
BUDGET=${BUDGET:-560}
step() {  # step SECONDS CMD...: at most SECONDS, and never past the budget
  local want=$1 left=$((BUDGET - SECONDS))
  shift
  if [ "$left" -lt 20 ]; then echo "skipped (no time left): $*"; return 0; fi
  timeout $((want < left ? want : left)) "$@"
}
shapes_of() {  # shapes_of ROWS...: graph time per launch shape of DeepSeek-V3 FP8 rows, fastest 3 shown
  for r in "$@"; do
    step 60 python3 bench/ncu_cache_case.py deepseek-v3 fp8 "$r" ours --shapes 2>&1 | tee -a "$OUT/ds_fp8_shapes.txt" \
      | sort -t: -k2 -n | head -3
  done
}
gpu_suite() {  # gpu_suite WORKERS: the GPU test suite (-rf names failures)
  step "${SUITE_SECONDS:-300}" python3 -m pytest -q -p no:cacheprovider -n "$1" --dist worksteal -rf \
    --durations=15 tests > "$OUT/gpu_suite.txt" 2>&1
}
sanitizer() {  # sanitizer SECONDS: compute-sanitizer memcheck on the serving ops
  YARN_TRITON_AUTOTUNE=0 step "$1" compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 bench/sanitize_cache.py > "$OUT/sanitizer.txt" 2>&1
}
suite_and_san() {  # suite_and_san WORKERS: the GPU suite in the background, the sanitizer beside it
  gpu_suite "$1" &
  local s_pid=$!
  sanitizer 150
  echo "san rc=$?"
  wait $s_pid; echo "suite rc=$?"
}
fi_pid=
probe_pid=
for part in "$@"; do
  t0=$SECONDS
  case "$part" in
    fi) (cd bench/flashinfer && timeout 400 python3 -c "import load; load.load(); load.load_cache(); print('built')" \
          > "$OUT/flashinfer_build.txt" 2>&1) &
        fi_pid=$! ;;
    qkv) step "${QKV_SECONDS:-200}" python3 bench/bench_qkv.py --sweep --out "$OUT/qkv.json" > "$OUT/qkv_log.txt" 2>&1
         echo "qkv rc=$?" ;;
    ncu) # every qkv_rope_kernel launch of one 16K-token run (the plain GEMM's and the fused
         # one's; EPILOGUE in the report's launch arguments tells them apart), then cuBLAS's
         YARN_TRITON_AUTOTUNE=0 step 150 ncu --kernel-name regex:qkv --launch-count 6 --set full \
           --export "$OUT/qkv_16k" --force-overwrite \
           python3 bench/bench_qkv.py --models llama3-8b --tokens 16384 --out "$OUT/qkv_ncu_run.json" > "$OUT/ncu_log.txt" 2>&1
         echo "ncu rc=$?"
         [ -f "$OUT/qkv_16k.ncu-rep" ] && ncu --import "$OUT/qkv_16k.ncu-rep" --page details > "$OUT/qkv_16k_ncu.txt" 2>&1
         YARN_TRITON_AUTOTUNE=0 step 90 ncu --kernel-name regex:"nvjet|xmma|gemm|cutlass" --launch-count 1 --set full \
           --export "$OUT/cublas_16k" --force-overwrite \
           python3 bench/bench_qkv.py --models llama3-8b --tokens 16384 --out "$OUT/qkv_ncu_run2.json" > "$OUT/ncu_log2.txt" 2>&1
         [ -f "$OUT/cublas_16k.ncu-rep" ] && ncu --import "$OUT/cublas_16k.ncu-rep" --page details > "$OUT/cublas_16k_ncu.txt" 2>&1
         grep -hE "^  [a-zA-Z_0-9]+.*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy" \
           "$OUT/qkv_16k_ncu.txt" "$OUT/cublas_16k_ncu.txt" 2>/dev/null | head -40 ;;
    cache) [ -n "$fi_pid" ] && { wait "$fi_pid"; tail -1 "$OUT/flashinfer_build.txt"; }
           step "${CACHE_SECONDS:-220}" python3 bench/bench_cache.py --out "$OUT/cache.json" ${CACHE_ARGS:-} \
             > "$OUT/cache_log.txt" 2>&1
           echo "cache rc=$?" ;;
    decode) step 90 python3 bench/bench_rope.py --shapes decode-1,decode-64,decode-256 --no-sweep --no-qknorm --no-mrope \
              --no-host --out "$OUT/rope_decode.json" > "$OUT/rope_decode_log.txt" 2>&1
            echo "decode rc=$?"
            YARN_TRITON_LOW_PRECISION_ROTATION=1 step 90 python3 bench/bench_rope.py --shapes decode-1,decode-64,decode-256 \
              --no-sweep --no-qknorm --no-mrope --no-host --out "$OUT/rope_decode_lowrot.json" > "$OUT/rope_decode_lowrot_log.txt" 2>&1
            echo "decode low-precision rotation rc=$?" ;;
    host) h="$OUT/host.txt"; n=1  # (named again, the part runs again: host_2.txt, ...)
          while [ -e "$h" ]; do n=$((n + 1)); h="$OUT/host_$n.txt"; done
          step "${HOST_SECONDS:-120}" python3 bench/profile_host.py --calls 3000 --rounds 5 > "$h" 2>&1
          echo "host rc=$?" ;;
    args) step 60 python3 bench/launch_args_probe.py > "$OUT/launch_args.txt" 2>&1
          echo "args rc=$?" ;;
    titan) step "${TITAN_SECONDS:-420}" bash bench/torchtitan_train.sh > "$OUT/torchtitan.txt" 2>&1
           echo "titan rc=$?" ;;
    suite) gpu_suite 16
           echo "suite rc=$?" ;;
    san) sanitizer "${SAN_SECONDS:-150}"
         echo "san rc=$?" ;;
    probe) (step 150 python3 bench/compile_alias_probe.py > "$OUT/probe.txt" 2>&1
            TORCH_LOGS=aot_graphs,output_code step 90 python3 bench/compile_alias_probe.py --only minimal_unbind_triton_op \
              --backends inductor > "$OUT/probe_logs.txt" 2>&1) &
           probe_pid=$! ;;  # (in the background: the next parts start at once; reported at the end)
    checks) step "${TITAN_SECONDS:-420}" bash bench/torchtitan_train.sh > "$OUT/torchtitan.txt" 2>&1 &
            t_pid=$!
            suite_and_san 12  # (12 workers: torchtitan shares the CPUs)
            wait $t_pid; echo "titan rc=$?" ;;
    shapes) shapes_of ${SHAPES_ROWS:-decode-1 decode-8} ;;
    verify) suite_and_san 14 ;;
    why) # (WHY_FULL=1: also the plain store's profile and each launch shape's graph time)
         ms="ours"; [ -n "${WHY_FULL:-}" ] && ms="ours moves"
         for m in $ms; do
           step 60 ncu --profile-from-start off --set full --export "$OUT/ds_fp8_d1_$m" \
             --force-overwrite python3 bench/ncu_cache_case.py deepseek-v3 fp8 decode-1 $m > "$OUT/ncu_ds_$m.log" 2>&1
           ncu --import "$OUT/ds_fp8_d1_$m.ncu-rep" --page details > "$OUT/ds_fp8_d1_$m.txt" 2>&1
         done
         [ -n "${WHY_FULL:-}" ] && shapes_of decode-1 decode-8
         for peer in ours liger; do
           a=""; [ $peer = liger ] && a="liger"
           step 60 ncu --profile-from-start off --set full --export "$OUT/decode256_$peer" --force-overwrite \
             python3 bench/ncu_case.py decode-256 1 $a > "$OUT/ncu_d256_$peer.log" 2>&1
           ncu --import "$OUT/decode256_$peer.ncu-rep" --page details > "$OUT/decode256_$peer.txt" 2>&1
         done
         grep -hE "^  [a-z_]+|Duration|Registers Per|Achieved Occupancy|Grid Size|Block Size|Executed Ipc A" \
           "$OUT"/ds_fp8_d1_*.txt "$OUT"/decode256_*.txt | head -40
         echo "why done" ;;
    *) echo "unknown part: $part" >&2 ;;
  esac
  echo "  ($part: $((SECONDS - t0)) s, $((BUDGET - SECONDS)) s left)"
done
[ -n "$fi_pid" ] && kill "$fi_pid" 2>/dev/null
[ -n "$probe_pid" ] && { wait "$probe_pid"; cat "$OUT/probe.txt"; }
# the short report, last
[ -f "$OUT/gpu_suite.txt" ] && { grep -E "^(FAILED|ERROR)" "$OUT/gpu_suite.txt" | head -20; tail -1 "$OUT/gpu_suite.txt"; }
[ -f "$OUT/sanitizer.txt" ] && tail -1 "$OUT/sanitizer.txt"
[ -f "$OUT/torchtitan.txt" ] && tail -8 "$OUT/torchtitan.txt"
for h in "$OUT"/host*.txt; do [ -f "$h" ] && { echo "$h:"; grep -E "add_|apply_rope|launch" "$h"; }; done
[ -f "$OUT/launch_args.txt" ] && cat "$OUT/launch_args.txt"
[ -f "$OUT/rope_decode_log.txt" ] && grep -A4 "^device time" "$OUT/rope_decode_log.txt"
[ -f "$OUT/rope_decode_lowrot_log.txt" ] && grep -A4 "^device time" "$OUT/rope_decode_lowrot_log.txt"
[ -f "$OUT/cache_log.txt" ] && tail -30 "$OUT/cache_log.txt"
[ -f "$OUT/qkv_log.txt" ] && tail -12 "$OUT/qkv_log.txt"
# The device tool returns at most 8 files from $OUT: everything goes back as one archive
# (an earlier call lost its qkv logs and Nsight Compute report to that limit).
if [ -z "${KEEP_FILES:-}" ]; then
  (cd "$OUT" && tar czf /tmp/device_out.tgz . && find . -mindepth 1 -delete && mv /tmp/device_out.tgz device_out.tgz)
  echo "all outputs: \$OUT/device_out.tgz"
fi
exit 0
