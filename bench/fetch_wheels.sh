#!/usr/bin/env bash
# The pure-Python packages the device machine's image lacks, as wheels for its Python 3.12,
# into .whl/ (git-ignored; carry it to the device): Liger-Kernel, the benchmarks' peer, and
# torchtitan 0.2.2 with what it imports that the image does not hold (KINDS.md's list).
# Run here, where pip reaches the registry:   bash bench/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS="liger-kernel==0.8.5
        torchtitan==0.2.2 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 torchdata==0.11.0
        datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $WHEELS
ls .whl && du -sh .whl
