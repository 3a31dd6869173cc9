"""Where the eager host time of one rope call goes, part by part, in one process.

    python bench/profile_host.py [--calls 3000] [--rounds 5]     # on a CUDA GPU
    python bench/profile_host.py --cpu-interpret                  # anywhere: host logic only

Times are wall clock per call on a 1-token decode shape (q ``[1, 1, 32, 128]``, k
``[1, 1, 8, 128]``, bf16, a positions tensor), each row the median of ``--rounds`` rounds
of ``--calls`` calls, the rounds of all rows interleaved, and next to it the ratio to a
trivial torch op (``q.add_(0)``) timed the same way. Rows: the in-place ``apply_rope_``
(positions, ``offsets=int``, QK-norm) and its parts (signature lookup, plan replay with the
launch stubbed, the compiled kernel's own launcher); the serving op
``apply_rope_and_cache_`` writing the token into a bf16 or an FP8 paged cache (its launch
plan, ``op/cache_plans.py``); the out-of-place autograd
``apply_rope`` / ``apply_qk_norm_rope`` and their parts (signature lookup, the plan's
out-of-place replay, the C++ autograd node alone, an ``autograd.Function`` shell of the same
arity allocating the same outputs, ``empty_like``, the whole call with the launch stubbed,
the call with the Python ``autograd.Function`` in place of the C++ node, the call with no
grad).

``--cpu-interpret`` runs the same calls on CPU tensors with ``TRITON_INTERPRET=1`` and every
kernel launch stubbed out (``PreparedLaunch.__call__`` does nothing once the plans are
built), so only the Python host work of our layer is timed, against ``q.add_(0)`` on a CPU
tensor. It takes the branches a CUDA tensor takes (the interpreter sends CPU tensors
through the kernel path and its launch plans) with two differences: ``inv_freq_on`` of a
CPU device returns at once, so it is patched to do the CUDA branch's work (device
normalisation, ``str``, cache lookup); and what it cannot show: the launch itself (Triton's
C launcher, about 1x ``q.add_(0)`` on an H100 host), the CUDA caching allocator behind
``empty_like``, and the CUDA device/stream bookkeeping of the dispatcher and autograd. Use
it to compare versions of the host code, not as the GPU figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if "--cpu-interpret" in sys.argv[1:]:
    # before the first import of triton: the kernel object is built at import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import yarn_triton as yt  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rope import decode_host_inputs  # noqa: E402
from yarn_triton import op  # noqa: E402
from yarn_triton.kernels import launcher  # noqa: E402


def per_call_us(fn, calls: int, sync) -> float:
    """Wall time per call of ``calls`` back-to-back calls, after 100 warm-up calls (the
    method of ``timing.host_us``; ``sync`` waits for the device around the loop)."""
    for _ in range(100):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / calls * 1e6


class _Nothing(torch.autograd.Function):
    """An empty autograd.Function: one input, one output (a view)."""

    @staticmethod
    def forward(ctx, a):
        return a.view_as(a)

    @staticmethod
    def backward(ctx, g):
        return g


class _Shell(torch.autograd.Function):
    """apply_rope's autograd.Function without its work: the same inputs (a tuple of the
    non-tensor arguments, q, k), the same fresh outputs and kept state, no launch."""

    @staticmethod
    def forward(ctx, meta, q, k):
        ctx.meta = meta  # what op.eager's Function keeps: meta and the positions' versions
        ctx.versions = (meta[0]._version, None, None)
        return torch.empty_like(q), torch.empty_like(k)

    @staticmethod
    def backward(ctx, gq, gk):
        return None, gq, gk


def _patch_inv_freq_on_like_cuda() -> None:
    """Make ``RopeParams.inv_freq_on`` of a CPU device cost what the CUDA branch costs
    (device normalisation, its string key, a cache lookup) and return the same tensor."""
    cls = yt.RopeParams

    def inv_freq_on(self, device):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # the CUDA branch's test
            device = torch.device("cuda", 0)
        self._device_cache.get(str(device))
        return self.inv_freq

    cls.inv_freq_on = inv_freq_on


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu-interpret", action="store_true",
                    help="CPU tensors, TRITON_INTERPRET=1, launches stubbed: host logic only")
    a = ap.parse_args()
    cpu = a.cpu_interpret
    if not cpu and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --cpu-interpret for the host logic alone)")
    dev = "cpu" if cpu else "cuda"
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    if cpu:
        _patch_inv_freq_on_like_cuda()

    node = op.native_node.wait()  # the autograd calls' C++ node, built before the first call
    if node is None:
        print(f"(no C++ autograd node: {op.native_node.unavailable_reason()})")
    bf = torch.bfloat16
    x = decode_host_inputs(dev, bf)  # the benchmark's host rows' inputs
    p, q, k, pos, qg, kg = x.p, x.q, x.k, x.pos, x.qg, x.kg
    qm, km, pm, qp, kp, cu = x.qm, x.km, x.pm, x.qp, x.kp, x.cu
    qw = torch.ones(128, device=dev, dtype=bf)
    kw = torch.ones(128, device=dev, dtype=bf)
    qwg, kwg = qw.clone().requires_grad_(), kw.clone().requires_grad_()

    calls = {
        "apply_rope_": lambda: yt.apply_rope_(q, k, pos, p),
        "apply_rope_ offsets": lambda: yt.apply_rope_(q, k, None, p, offsets=4096),
        "apply_rope_ mla": lambda: yt.apply_rope_(qm, km, pos, pm, layout="deepseek"),
        "apply_rope_ packed": lambda: yt.apply_rope_(qp, kp, None, p, cu_seqlens=cu),
        "apply_qk_norm_rope_": lambda: yt.apply_qk_norm_rope_(q, k, pos, p, qw, kw),
        "apply_rope": lambda: yt.apply_rope(qg, kg, pos, p),
        "apply_rope no_grad": lambda: yt.apply_rope(q, k, pos, p),
        "apply_qk_norm_rope": lambda: yt.apply_qk_norm_rope(qg, kg, pos, p, qwg, kwg),
    }
    # the serving op, one decode token into a paged cache (64 blocks of 16), bf16 and FP8
    v = torch.randn_like(k)
    kc = torch.zeros(64, 16, 8, 128, device=dev, dtype=bf)
    vc = torch.zeros_like(kc)
    kf = torch.zeros(64, 16, 8, 128, device=dev, dtype=torch.float8_e4m3fn)
    vf = torch.zeros_like(kf)
    kscale, vscale = torch.full((1,), 0.5, device=dev), torch.full((1,), 0.5, device=dev)
    slot = torch.full((1, 1), 17, device=dev, dtype=torch.long)
    calls["apply_rope_and_cache_"] = lambda: yt.apply_rope_and_cache_(q, k, v, pos, p, kc, vc, slot)
    calls["apply_rope_and_cache_ fp8"] = lambda: yt.apply_rope_and_cache_(q, k, v, pos, p, kf, vf, slot,
                                                                          k_scale=kscale, v_scale=vscale)
    for _ in range(2):  # first: tunes the shape class (GPU); second: builds and keeps the plan
        for fn in calls.values():
            fn()
        with torch.no_grad():
            calls["apply_rope no_grad"]()
    sync()

    key = op.plans._signature(q, k, pos, p, "neox", None, None, None, True, False, None, True)
    key_copy = op.plans._signature(qg, kg, pos, p, "neox", None, None, None, True, False, None, False)
    plan, plan_copy = op.plans._PLANS[key], op.plans._PLANS[key_copy]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    shell_meta = (pos, None, None, plan.inv_freq, p.cos_sin_scale, 0, 128, "neox", False, True)
    shell_apply = super(torch.autograd.Function, _Shell).apply  # the C++ apply, as op.eager uses it

    def no_grad_copy():
        with torch.no_grad():
            yt.apply_rope(q, k, pos, p)

    rows = {
        "q.add_(0)": lambda: q.add_(0),
        "apply_rope_ (in place, positions)": calls["apply_rope_"],
        "apply_rope_ (in place, offsets=int)": calls["apply_rope_ offsets"],
        "apply_rope_ (in place, MLA views, deepseek)": calls["apply_rope_ mla"],
        "apply_rope_ (in place, cu_seqlens, packed)": calls["apply_rope_ packed"],
        "apply_qk_norm_rope_ (in place)": calls["apply_qk_norm_rope_"],
        "apply_rope_and_cache_ (bf16 paged cache)": calls["apply_rope_and_cache_"],
        "apply_rope_and_cache_ (FP8 cache, tensor scales)": calls["apply_rope_and_cache_ fp8"],
        "  signature lookup (in place)": lambda: op.plans._PLANS.get(
            op.plans._signature(q, k, pos, p, "neox", None, None, None, True, False, None, True)),
        "apply_rope (autograd, q/k require grad)": calls["apply_rope"],
        "  signature lookup (out of place)": lambda: op.plans._PLANS.get(
            op.plans._signature(qg, kg, pos, p, "neox", None, None, None, True, False, None, False)),
        "  plan replay out of place (no alloc; GPU: launch too)":
            lambda: plan_copy.run(q, k, pos, None, None, 0, qo, ko),
        "  autograd.Function shell, 2 outputs": lambda: shell_apply(shell_meta, qg, kg),
        "  empty autograd.Function (1 in/out)": lambda: _Nothing.apply(qg),
        "  two empty_like": lambda: (torch.empty_like(q), torch.empty_like(k)),
        "  inv_freq_on(q.device)": lambda: p.inv_freq_on(q.device),
        "  torch.compiler.is_compiling()": lambda: torch.compiler.is_compiling(),
        "apply_rope (inputs need no grad)": calls["apply_rope no_grad"],
        "apply_rope (under torch.no_grad)": no_grad_copy,
        "apply_qk_norm_rope (autograd)": calls["apply_qk_norm_rope"],
    }
    if node is not None:
        node_state = ((None,) * 5, (None, None, None))
        rows["  C++ autograd node alone (2 outputs)"] = lambda: node(None, node_state, qg, kg, None, None, False)
    stub_rows = ("apply_rope_ (in place, positions)", "apply_rope (autograd, q/k require grad)",
                 "apply_qk_norm_rope (autograd)")
    # the same calls with the plans launching through Triton's C launch function instead of
    # the packed launcher (the rows' plans lose their packed spec for the timing loop)
    triton_rows = stub_rows[:2]
    # the autograd calls with the Python autograd.Function in place of the C++ node
    function_rows = stub_rows[1:] if node is not None else ()
    launch = plan.launch
    compiled = None if cpu else launch._aligned
    if compiled is not None:
        ptrs = [q.data_ptr(), q.data_ptr(), k.data_ptr(), k.data_ptr(), pos.data_ptr()]
        ptrs += [plan.inv_ptr] * (launcher._N_PTRS - len(ptrs))  # cu, inv_freq, weights, the cache write's
        args = [*ptrs, *launch.args[launcher._N_PTRS:], *launch._constexprs]
        stream = torch._C._cuda_getCurrentRawStream(q.device.index)
        g0, g1, g2 = launch.grid
        rows["  compiled launcher alone"] = lambda: compiled.run(
            g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None, *args)
        if launch._direct is not None:  # Triton's C launch function, which a replay calls without ours
            c_launch, head = launch._direct
            rows["  Triton's C launch function alone"] = lambda: c_launch(g0, g1, g2, stream, *head, *args)
        if launch._packed is not None:  # what a replayed plan calls where the packed launcher builds
            packed, packed_spec = launch._packed
            ptrs_t = tuple(ptrs)
            rows["  packed launch alone (a replay's launch)"] = lambda: packed(packed_spec, stream, ptrs_t, 0)
        else:
            print(f"(no packed launcher: {launcher.packed_launch.unavailable_reason()})")
    elif not cpu:
        print("(the plan's pointers are not all 16-byte aligned: no 'compiled launcher alone' row)")

    real_call = launcher.PreparedLaunch.__call__

    timed = {}
    for name, fn in rows.items():
        timed[name] = fn
        if not cpu and name in stub_rows:  # the stub swapped in around this row's timing loop
            timed[name + " [launch stubbed]"] = fn
        if not cpu and name in triton_rows:
            timed[name + " [Triton's launcher]"] = fn
        if name in function_rows:
            timed[name + " [Python Function]"] = fn
    if cpu:  # every launch stubbed for the whole run
        launcher.PreparedLaunch.__call__ = lambda self, ptrs, pos_base, tensors, bits=None: None
    samples = {name: [] for name in timed}
    try:
        for _ in range(a.rounds):
            for name, fn in timed.items():
                if name.endswith("[launch stubbed]"):
                    launcher.PreparedLaunch.__call__ = lambda self, ptrs, pos_base, tensors, bits=None: None
                    try:
                        samples[name].append(per_call_us(fn, a.calls, sync))
                    finally:
                        launcher.PreparedLaunch.__call__ = real_call
                elif name.endswith("[Triton's launcher]"):
                    kept = {id(pl.launch): (pl.launch, pl.launch._packed) for pl in op.plans._PLANS.values()}
                    for lp, _ in kept.values():
                        lp._packed = None
                    try:
                        samples[name].append(per_call_us(fn, a.calls, sync))
                    finally:
                        for lp, packed_of in kept.values():
                            lp._packed = packed_of
                elif name.endswith("[Python Function]"):
                    op.native_node.APPLY = None
                    try:
                        samples[name].append(per_call_us(fn, a.calls, sync))
                    finally:
                        op.native_node.APPLY = node
                else:
                    samples[name].append(per_call_us(fn, a.calls, sync))
    finally:
        launcher.PreparedLaunch.__call__ = real_call

    where = "CPU, TRITON_INTERPRET=1, every launch stubbed" if cpu else torch.cuda.get_device_name()
    print(f"host time per call, median of {a.rounds} x {a.calls} calls ({where}; torch {torch.__version__})")
    base = statistics.median(samples["q.add_(0)"])
    for name, s in samples.items():
        us = statistics.median(s)
        print(f"{name:48s} {us:7.2f} us  {us / base:5.2f}x")


if __name__ == "__main__":
    main()
