"""One serving-benchmark row's column under a profiler window, for Nsight Compute:

    ncu --profile-from-start off --set full python3 bench/ncu_cache_case.py deepseek-v3 fp8 decode-1 ours
    ncu ... python3 bench/ncu_cache_case.py deepseek-v3 fp8 decode-1 moves    # the plain store, same bytes
    python3 bench/ncu_cache_case.py deepseek-v3 fp8 decode-1 ours --shapes    # graph time per launch shape

The row's tensors, paging and column are ``bench_cache``'s own (``Row``), so the profile
is of the launch the table times. The column runs three times before the window opens
(tuning and compilation stay outside it), then ``--calls`` times inside it.

``--shapes`` instead times the fused column (CUDA-graph device time, ``timing.graph_us``) at
its tuned launch shape and at each decode candidate shape, to show whether the tuner's
pick is the fastest on offer.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cache as bc  # noqa: E402


def _row(model: str, cache: str, row: str):
    gen_cpu = torch.Generator().manual_seed(zlib.crc32(row.encode()))  # bench_cache.run_row's paging
    paging = bc.row_paging(row, gen_cpu)
    caches = bc.Caches(model, cache, "cuda")
    return bc.Row(model, cache, row, caches, paging, "cuda", torch.Generator(device="cuda").manual_seed(1))


def _with_config(r, config):
    """The row's fused column with an explicit launch shape (None: the tuner's)."""
    import yarn_triton as yt

    if r.m["kind"] == "gqa":
        kw = dict(layout=r.layout, config=config)
        if r.fp8:
            kw.update(k_scale=r.kv_scale, v_scale=r.kv_scale, q_out=r.q_out, q_scale=r.q_scale)
        return lambda: yt.apply_rope_and_cache_(r.q, r.k, r.v, r.pos, r.params, r.caches.k, r.caches.v, r.slots, **kw)
    kw = dict(layout=r.layout, config=config)
    if r.fp8:
        kw.update(scale=r.kv_scale, q_out=r.q_out, q_scale=r.q_scale, q_nope=r.q_nope)
    return lambda: yt.apply_mla_rope_and_cache_(r.q_pe, r.k_pe, r.kv_c, r.pos, r.params, r.caches.kv, r.slots, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=sorted(bc.MODELS))
    ap.add_argument("cache", choices=["bf16", "fp8"])
    ap.add_argument("row", choices=sorted(bc.ROWS))
    ap.add_argument("method", choices=["ours", "unfused", "moves"])
    ap.add_argument("--calls", type=int, default=1)
    ap.add_argument("--shapes", action="store_true", help="graph time of the fused column per launch shape")
    a = ap.parse_args()
    r = _row(a.model, a.cache, a.row)
    if a.shapes:
        from timing import graph_us

        from yarn_triton.kernels.configs import LaunchConfig

        shapes = [None] + [LaunchConfig(bt, 1, w, 1, g) for bt in (1, 2, 4) for w in (1, 2, 4)
                           for g in (32, 64, 128) if bt <= r.T]
        for cfg in shapes:
            fn = _with_config(r, cfg)
            fn()
            print(f"{a.model} {a.cache} {a.row} config {cfg or 'tuned'}: {graph_us(fn):.2f} us", flush=True)
        return
    fn = r.moves if a.method == "moves" else r.methods()[a.method][0]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(a.calls):
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
