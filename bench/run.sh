#!/usr/bin/env bash
# The main job: installs what is missing, then runs the benchmark on its embedded default
# shapes (on a machine with no GPU: says so and checks correctness through the interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install --bench
exec "${PYTHON:-python3}" bench/bench_rope.py "$@"
