"""Where the eager host time of one rope call goes, part by part, in one process.

    python bench/profile_host.py [--calls 3000]

Times (wall clock per call, a 1-token decode shape): a trivial torch op; our whole
``apply_rope_``; the signature lookup alone; the plan replay with the launch stubbed out;
the compiled kernel's own launcher alone; and for ``apply_rope`` (autograd) the cost of an
empty ``autograd.Function`` and of allocating the outputs. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import yarn_triton as yt
from yarn_triton import op
from yarn_triton.kernels import rope_kernel as rk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rope import host_us  # noqa: E402  (the benchmark's own host timer)


def per_call_us(fn, calls: int) -> float:
    return host_us(fn, calls)


class _Nothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g):
        return g


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    n = ap.parse_args().calls
    p = yt.RopeParams.yarn(128, 500000.0, 4.0, 8192)
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    qg = q.clone().requires_grad_()
    yt.apply_rope_(q, k, pos, p)  # tunes this shape class
    yt.apply_rope_(q, k, pos, p)  # compiles the tuned shape, keeps the plan
    key = op._signature(q, k, pos, p, "neox", None, None, None, True, False, None, True)
    plan = op._PLANS[key]
    launch = plan.launch
    compiled = launch._aligned
    args = [q.data_ptr(), q.data_ptr(), k.data_ptr(), k.data_ptr(), pos.data_ptr(), plan.inv_ptr, plan.inv_ptr,
            plan.inv_ptr, plan.inv_ptr, *launch.args[rk._N_PTRS:], *launch._constexprs]
    stream = torch._C._cuda_getCurrentRawStream(0)
    g0, g1, g2 = launch.grid

    rows = {
        "q.add_(0)": lambda: q.add_(0),
        "apply_rope_ (whole call)": lambda: yt.apply_rope_(q, k, pos, p),
        "  signature lookup": lambda: op._PLANS.get(op._signature(q, k, pos, p, "neox", None, None, None, True,
                                                                   False, None, True)),
        "  compiled launcher alone": lambda: compiled.run(g0, g1, g2, stream, compiled.function,
                                                          compiled.packed_metadata, None, None, None, *args),
        "apply_rope (autograd, whole call)": lambda: yt.apply_rope(qg, k, pos, p),
        "  empty autograd.Function": lambda: _Nothing.apply(qg),
        "  two empty_like": lambda: (torch.empty_like(q), torch.empty_like(k)),
        "  torch.compiler.is_compiling()": lambda: torch.compiler.is_compiling(),
    }
    out = {name: per_call_us(fn, n) for name, fn in rows.items()}
    real_call = rk.PreparedLaunch.__call__
    try:  # the plan replay without its launch
        rk.PreparedLaunch.__call__ = lambda self, ptrs, pos_base, tensors: None
        out["  apply_rope_ with the launch stubbed"] = per_call_us(lambda: yt.apply_rope_(q, k, pos, p), n)
    finally:
        rk.PreparedLaunch.__call__ = real_call
    for name, us in out.items():
        print(f"{name:40s} {us:7.2f} us")


if __name__ == "__main__":
    main()
