#!/usr/bin/env bash
# torchtitan training with and without the yarn-triton switch: llama3 and deepseek_v3 debug
# models, eager and compiled, from one seed checkpoint each; loss curves compared step by
# step (bench/torchtitan_train.py compare; see its docstring).
#
# Here (a CPU machine where pip reaches the registry), once: the packages the device image
# lacks, as wheels for its Python 3.12, into .whl/ (git-ignored):
#     bash bench/fetch_wheels.sh      (or: bash bench/torchtitan_train.sh --fetch-wheels)
# On the device machine (one GPU; carry .whl), both models side by side in one call:
#     bash bench/torchtitan_train.sh              # or one model: ... llama3
# Optional: second argument the modes, eager,compile (default); third the autocast dtype,
# float32 (default: the 1e-3 check) or bfloat16 (deepseek_v3's MoE routing makes bf16
# curves part after some steps; see bench/torchtitan_train.py). Writes the log and a JSON
# summary to $OUT/MODEL (or /tmp/torchtitan_train/MODEL); exits 1 unless every curve is within 1e-3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--fetch-wheels" ]; then  # (the device's wheels: bench/fetch_wheels.sh)
  exec bash bench/fetch_wheels.sh
fi

if compgen -G ".whl/*.whl" >/dev/null; then
  # (not again where bench/device.sh installed them: other parts may be importing from there)
  [ -d /tmp/site/torchtitan ] || "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
"$PY" -c "import torch, triton, torchtitan, datasets; print('torch', torch.__version__, 'triton', triton.__version__,
'datasets', datasets.__version__, torch.cuda.get_device_name())"
OUT=${OUT:-/tmp/torchtitan_train}
# One process per model, side by side on the one GPU (the debug models are small; each run
# is deterministic on its own), each with its own work folder and log under $OUT/MODEL.
"$PY" bench/torchtitan_train.py assets /tmp/torchtitan_train/assets >/dev/null
rc=0
pids=()
IFS=, read -ra models <<<"${1:-llama3,deepseek_v3}"
for m in "${models[@]}"; do
  mkdir -p "/tmp/torchtitan_train/$m" "$OUT/$m"
  cp -r /tmp/torchtitan_train/assets/. "/tmp/torchtitan_train/$m/"
  "$PY" bench/torchtitan_train.py compare --models "$m" --modes "${2:-eager,compile}" --precision "${3:-float32}" \
    --work "/tmp/torchtitan_train/$m" --out "$OUT/$m" >"$OUT/$m/stdout.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || rc=1; done
grep -h -E "^== .*max|ALL OK|SOME FAILED|^run failed|^!!" "$OUT"/*/stdout.txt || true
exit $rc
