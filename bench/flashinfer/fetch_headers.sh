#!/usr/bin/env bash
# Extract FlashInfer's rope header (include/flashinfer/pos_enc.cuh) and exactly the headers it
# includes transitively -- FlashInfer's own and the CCCL (libcudacxx/cub/thrust) headers it
# bundles -- from the flashinfer-python wheel, into an ignored folder. Runs on any machine
# (no GPU, no CUDA): the headers are found by following #include lines, conditional ones too.
#
#   bench/flashinfer/fetch_headers.sh [WHEEL] [DEST]
#
# WHEEL: a flashinfer_python-0.7.4-*.whl (default: downloaded with pip into a temp folder);
# DEST: default .flashinfer/include at the repo root. DEST gets flashinfer/ (FlashInfer's
# headers) and cccl/{libcudacxx/include,cub,thrust}/ (its bundled CCCL, put on the include
# path first, as FlashInfer's own JIT does). They are FlashInfer's code: fetched, not committed.
set -euo pipefail
VERSION=0.7.4
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WHEEL=${1:-}
DEST=${2:-$ROOT/.flashinfer/include}
if [ -z "$WHEEL" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download -q --no-deps "flashinfer-python==$VERSION" -d "$tmp"
  WHEEL=$(ls "$tmp"/flashinfer_python-*.whl)
fi
rm -rf "$DEST"
mkdir -p "$DEST"
python3 - "$WHEEL" "$DEST" <<'PY'
import os, re, sys, zipfile

wheel, dest = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(wheel)
names = set(z.namelist())
# the include path of FlashInfer's JIT, in the wheel, and where each part goes under DEST
roots = [("flashinfer/data/include/", ""),
         ("flashinfer/data/cccl/libcudacxx/include/", "cccl/libcudacxx/include/"),
         ("flashinfer/data/cccl/cub/", "cccl/cub/"),
         ("flashinfer/data/cccl/thrust/", "cccl/thrust/")]
inc = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]', re.M)

def resolve(name, quoted, here):
    if quoted:  # "x.h": the including file's folder first
        cand = os.path.normpath(os.path.join(os.path.dirname(here), name))
        if cand in names:
            return cand
    for r, _ in roots:
        if r + name in names:
            return r + name
    return None  # a system or CUDA toolkit header (cuda_runtime.h, <vector>, ...)

start = "flashinfer/data/include/flashinfer/pos_enc.cuh"
seen, todo, outside = {start}, [start], set()
while todo:
    f = todo.pop()
    text = z.read(f).decode("utf-8", "replace")
    for q, name in inc.findall(text):
        r = resolve(name, q == '"', f)
        if r is None:
            outside.add(name)
        elif r not in seen:
            seen.add(r)
            todo.append(r)
total = 0
for f in sorted(seen):
    r, d = next((r, d) for r, d in roots if f.startswith(r))
    out = os.path.join(dest, d + f[len(r):])
    os.makedirs(os.path.dirname(out), exist_ok=True)
    data = z.read(f)
    total += len(data)
    with open(out, "wb") as fh:
        fh.write(data)
fi = sum(f.startswith(roots[0][0]) for f in seen)
print(f"{len(seen)} headers ({fi} FlashInfer, {len(seen) - fi} CCCL), {total / 2**20:.2f} MiB -> {dest}")
print("left to the toolkit/system:", " ".join(sorted(n for n in outside if "/" not in n or n.startswith("cuda/")))[:400])
PY
