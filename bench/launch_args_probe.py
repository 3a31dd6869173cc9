"""How the host cost of one Triton launch grows with the kernel's argument count (#25).

    python3 bench/launch_args_probe.py          # on a CUDA GPU (Triton 3.6's launcher)

Our rope kernel takes 101 arguments (15 pointers, 50 scalars, 36 constexprs), and the
C launch function of a replayed plan alone costs about 0.7x a trivial torch op on an H100
host. This builds kernels of the same body (one load, one store) with 2 to 15 pointers,
0 to 50 int arguments and 0 to 36 constexprs, and times, per call, the C launch function
that a replayed plan calls (``launcher._direct_launch``) and Triton's ``compiled.run``,
beside ``q.add_(0)`` and ``torch.empty_like(q)``, all in one process: wall time per call of
20,000 back-to-back calls (``timing.host_us``), median of 5 rounds. It says whether fewer
arguments could take the eager ``apply_rope`` under 3x a trivial op.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from timing import host_us  # noqa: E402

from yarn_triton.kernels.launcher import _RAW_STREAM, _direct_launch  # noqa: E402

SHAPES = [(2, 0, 0), (2, 16, 0), (2, 48, 0), (15, 0, 0), (15, 50, 0), (15, 50, 36)]


def _kernel_source(n_ptrs: int, n_ints: int, n_const: int) -> str:
    ptrs = [f"p{i}" for i in range(n_ptrs)]
    ints = [f"a{i}" for i in range(n_ints)]
    consts = [f"C{i}: tl.constexpr" for i in range(n_const)]
    params = ", ".join(ptrs + ints + consts)
    extra = " + a0" if n_ints else ""
    return (f"import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef k({params}):\n"
            f"    tl.store(p1, tl.load(p0){extra})\n")


def _load(src: str, name: str):
    d = tempfile.mkdtemp()
    path = os.path.join(d, f"{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.k


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    x = torch.randn(64, device="cuda")
    y = torch.empty_like(x)
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    stream = _RAW_STREAM(0)
    rows = {"q.add_(0)": lambda: q.add_(0), "torch.empty_like(q)": lambda: torch.empty_like(q)}
    for n_ptrs, n_ints, n_const in SHAPES:
        kern = _load(_kernel_source(n_ptrs, n_ints, n_const), f"k_{n_ptrs}_{n_ints}_{n_const}")
        args = [x, y] + [x] * (n_ptrs - 2) + [7 + i for i in range(n_ints)]  # (not 1 or 16n: unspecialized)
        consts = {f"C{i}": i + 2 for i in range(n_const)}
        compiled = kern.warmup(*args, **consts, grid=(1,))
        compiled._init_handles()
        ptrs = [t.data_ptr() for t in args[:n_ptrs]]
        flat = [*ptrs, *args[n_ptrs:], *consts.values()]
        direct = _direct_launch(compiled)
        label = f"{n_ptrs} ptrs, {n_ints} ints, {n_const} constexprs"
        rows[f"compiled.run: {label}"] = lambda c=compiled, f=flat: c.run(
            1, 1, 1, stream, c.function, c.packed_metadata, None, None, None, *f)
        if direct is not None:
            launch, head = direct
            rows[f"C launch: {label}"] = lambda la=launch, h=head, f=flat: la(1, 1, 1, stream, *h, *f)
    samples = {name: [] for name in rows}
    for _ in range(5):
        for name, fn in rows.items():
            samples[name].append(host_us(fn, calls=20000))
    base = statistics.median(samples["q.add_(0)"])
    print(f"host time per call, median of 5 x 20000 calls ({torch.cuda.get_device_name()}; torch {torch.__version__})")
    for name, s in samples.items():
        m = statistics.median(s)
        print(f"{name:52s} {m:6.2f} us  {m / base:5.2f}x")


if __name__ == "__main__":
    main()
