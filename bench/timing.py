"""How the benchmarks measure, on a CUDA GPU: device time in CUDA graphs, eager host time,
the copy bandwidth behind every floor, and the kernels one call launches.

Shared by ``bench_rope.py``, ``bench_cache.py`` and the other scripts here, so that every
table is measured the same way.
"""

from __future__ import annotations

import time

import torch


def bench_ms(fn, warmup=25, rep=100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / (bench_ms(lambda: dst.copy_(src), rep=200) * 1e-3)


def graph_us(fn, calls: int = 20) -> float:
    """Device time per call of ``fn``: ``calls`` calls captured in one CUDA graph, replayed.
    Every shape takes 20 calls: a replay's own launch costs microseconds, which 5 calls of a
    30 us kernel (Qwen3.5's prefill) would have counted as 5% of the kernel."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return bench_ms(g.replay) / calls * 1e3


def host_us(fn, calls: int = 3000) -> float:
    """Eager wall time per call of a launch loop (GPU work shorter than the host's)."""
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def kernels_launched(fn) -> list:
    """Names of the GPU kernels one call of ``fn`` launches (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    return [n[:60] for n in names]


def empty_kernel_us() -> float:
    """An empty Triton kernel, replayed in a CUDA graph: the floor of any decode launch."""
    import triton

    @triton.jit
    def _empty(x):
        pass

    x = torch.empty(1, device="cuda")
    return graph_us(lambda: _empty[(1,)](x))
