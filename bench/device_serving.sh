#!/usr/bin/env bash
# The serving op's device checks (one GPU), as parts of bench/device.sh (see there), from the
# repository root, carrying .flashinfer/include (bench/flashinfer/fetch_headers.sh) and .whl
# (bench/fetch_wheels.sh):
#   bash bench/device_serving.sh bench   # bench/bench_cache.py, then the standalone decode rows
#   bash bench/device_serving.sh check   # the GPU suite, then compute-sanitizer on the serving ops
#   bash bench/device_serving.sh all     # FlashInfer's bindings build beside the suite, then the
#                                        # timings, the host profile and the sanitizer
# Each fits one call; `all` keeps to BUDGET seconds (560) and prints what it had to skip.
set -u
here=$(dirname "$0")
case "${1:-bench}" in
  bench) exec bash "$here/device.sh" fi cache decode ;;
  check) exec bash "$here/device.sh" suite san ;;
  all) SUITE_SECONDS=${SUITE_SECONDS:-240} CACHE_SECONDS=${CACHE_SECONDS:-200} \
         exec bash "$here/device.sh" fi suite cache decode host san ;;
  *) echo "usage: $0 bench|check|all" >&2; exit 2 ;;
esac
