#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite.
# With no GPU, kernels run through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1);
# with a CUDA GPU they run natively (set TRITON_INTERPRET=1 yourself to force the interpreter).
# One pytest-xdist worker per core (YARN_TRITON_TEST_WORKERS=N to choose, 0 for one process);
# tests are handed out one at a time (worksteal), so a long one does not hold back a queue.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash .ci/install --test
if [ -z "${TRITON_INTERPRET:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
echo "TRITON_INTERPRET=${TRITON_INTERPRET:-0}"
exec "$PY" -m pytest -q -p no:cacheprovider -n "${YARN_TRITON_TEST_WORKERS:-auto}" --dist worksteal "$@"
