"""Which compiled calls of the in-place ops lose a write, and whose bug it is.

tests/test_rope_cache.py::test_torch_compile_fullgraph_matches_eager failed on the H100
(torch 2.11, Inductor): after the compiled call, the v half of a cache passed as
``kv.unbind(0)`` views held the wrong bytes, while the k half was right. This probe runs
each in-place op compiled with aot_eager and with Inductor, on graph inputs that alias
each other (unbind views, views of one fused qkv buffer), on ones that do not, and on
views taken inside the graph, and compares every base tensor bit for bit with eager. Then
the same patterns without our package (CUDA only): a two-line Triton kernel that adds to
two mutated arguments (unbind views, or two tensors of their own), registered as a
``triton_op`` and as an opaque ``custom_op``. One line per case; with ``--only CASE`` just that case (for
``TORCH_LOGS=aot_graphs,output_code``).

On an H100 (torch 2.11, 2026-12-06): every case is right with aot_eager; with Inductor the
serving op loses the v cache's writes when the caches are passed in (as unbind views, and
as two separate tensors), is right when the whole cache is passed in and split inside, and
the two-line kernel on unbind views loses its second argument's writes as a ``triton_op``
and as a ``custom_op`` alike: torch's bug, not the kernel's (on two tensors of their own,
it loses them as a ``triton_op`` and is right as a ``custom_op``). On the CPU (torch 2.13)
all are right.

    python bench/compile_alias_probe.py [--only cache_unbind_fp8] [--backends aot_eager,inductor]
"""

from __future__ import annotations

import argparse

import torch

import yarn_triton as yt

E4M3 = torch.float8_e4m3fn


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _params(rot: int) -> yt.RopeParams:
    return yt.RopeParams.yarn(rot, 10000.0, 4.0, 64, mscale=0.707, mscale_all_dim=0.5)


def _case_cache(dev, gen, unbind: bool, fp8: bool, in_graph_unbind: bool = False):
    T, hq, hk, d, nb, bs = 4, 4, 2, 32, 2, 4
    p = _params(32)
    buf = torch.randn(T, (hq + 2 * hk) * d, generator=gen).to(dev, torch.bfloat16)
    q, k, v = buf[:, :hq * d].unflatten(-1, (hq, d)), buf[:, hq * d:(hq + hk) * d].unflatten(-1, (hk, d)), \
        buf[:, (hq + hk) * d:].unflatten(-1, (hk, d))
    pos = torch.randint(0, 1 << 20, (T,), generator=gen).to(dev)
    slots = torch.randperm(nb * bs, generator=gen)[:T].to(dev)
    cdt = E4M3 if fp8 else torch.bfloat16
    kv0 = torch.randn(2, nb, bs, hk, d, generator=gen).to(dev, cdt)
    sc = dict(k_scale=torch.tensor(0.05, device=dev), v_scale=torch.tensor(0.03, device=dev)) if fp8 else {}

    def f(q, k, v, pos, kc, vc, slots):
        if in_graph_unbind:
            kc, vc = kc.unbind(0)  # (kc is the whole kv here)
        yt.apply_rope_and_cache_(q, k, v, pos, p, kc, vc, slots, **sc)
        return q * 1

    def run(fn):
        kv, qq = kv0.clone(), q.clone()
        if in_graph_unbind:
            out = fn(qq, k, v, pos, kv, None, slots)
        elif unbind:
            kc, vc = kv.unbind(0)
            out = fn(qq, k, v, pos, kc, vc, slots)
        else:
            kc, vc = kv[0].clone(), kv[1].clone()
            out = fn(qq, k, v, pos, kc, vc, slots)
            kv = torch.stack([kc, vc])
        return {"out": out, "q": qq, "kv": kv}

    return f, run


def _case_rope_views(dev, gen):
    T, hq, hk, d = 8, 4, 2, 64
    p = _params(64)
    buf0 = torch.randn(T, (hq + 2 * hk) * d, generator=gen).to(dev, torch.bfloat16)
    pos = torch.randint(0, 1 << 20, (T,), generator=gen).to(dev)

    def f(q, k, pos):
        yt.apply_rope_(q, k, pos, p)
        return q * 1, k * 1

    def run(fn):
        buf = buf0.clone()
        q, k = buf[:, :hq * d].unflatten(-1, (hq, d)), buf[:, hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
        a, b = fn(q, k, pos)
        return {"q*1": a, "k*1": b, "buf": buf}

    return f, run


def _case_rope_views_in_graph(dev, gen):
    """q and k sliced inside the compiled function from an intermediate (a fused
    projection's output), rotated in place: the Phi-3 / fused-QKV pattern."""
    T, hq, hk, d = 8, 4, 2, 64
    p = _params(64)
    x = torch.randn(T, (hq + 2 * hk) * d, generator=gen).to(dev, torch.bfloat16)
    pos = torch.randint(0, 1 << 20, (T,), generator=gen).to(dev)

    def f(x, pos):
        buf = x * 2
        q, k = buf[:, :hq * d].unflatten(-1, (hq, d)), buf[:, hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
        yt.apply_rope_(q, k, pos, p)
        return q * 1, k * 1, buf

    def run(fn):
        a, b, c = fn(x, pos)
        return {"q*1": a, "k*1": b, "buf": c}

    return f, run


def _case_mla(dev, gen):
    T, H, nope, R, L, nb, bs = 4, 2, 16, 16, 32, 2, 4
    pm = _params(R)
    qm0 = torch.randn(T, H, nope + R, generator=gen).to(dev, torch.bfloat16)
    k_pe = torch.randn(T, R, generator=gen).to(dev, torch.bfloat16)
    kv_c = torch.randn(T, L, generator=gen).to(dev, torch.bfloat16)
    cache0 = torch.randn(nb, bs, L + R, generator=gen).to(dev, torch.bfloat16)
    pos = torch.randint(0, 1 << 20, (T,), generator=gen).to(dev)
    slots = torch.randperm(nb * bs, generator=gen)[:T].to(dev)

    def f(q_pe, k_pe, kv_c, pos, cache, slots):
        yt.apply_mla_rope_and_cache_(q_pe, k_pe, kv_c, pos, pm, cache, slots)
        return q_pe * 1

    def run(fn):
        qm, cache = qm0.clone(), cache0.clone()
        out = fn(qm[..., nope:], k_pe, kv_c, pos, cache, slots)
        return {"out": out, "q": qm, "cache": cache}

    return f, run


def _minimal_cases() -> dict:
    """The unbind pattern without yarn_triton: ``a += 1; b += 2`` by one Triton kernel on
    ``a, b = kv.unbind(0)``, registered as a ``triton_op`` (the compiler traces the launch)
    and as an opaque ``custom_op`` (CUDA only: Triton compiles for the GPU)."""
    import triton
    import triton.language as tl

    @triton.jit
    def add_two(a_ptr, b_ptr, n, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        m = o < n
        tl.store(a_ptr + o, tl.load(a_ptr + o, mask=m) + 1.0, mask=m)
        tl.store(b_ptr + o, tl.load(b_ptr + o, mask=m) + 2.0, mask=m)

    def launch(a, b, kernel):
        kernel[(1,)](a, b, a.numel(), BLOCK=triton.next_power_of_2(a.numel()))

    @torch.library.triton_op("yt_probe::add_two_traced", mutates_args=("a", "b"))
    def traced(a: torch.Tensor, b: torch.Tensor) -> None:
        launch(a, b, torch.library.wrap_triton(add_two))

    @torch.library.custom_op("yt_probe::add_two_opaque", mutates_args=("a", "b"))
    def opaque(a: torch.Tensor, b: torch.Tensor) -> None:
        launch(a, b, add_two)

    def make(op, unbind):
        def case(dev, gen):
            kv0 = torch.randn(2, 64, generator=gen).to(dev)

            def f(a, b):
                op(a, b)
                return a * 1, b * 1

            def run(fn):
                kv = kv0.clone()
                if unbind:
                    x, y = fn(*kv.unbind(0))
                else:  # two tensors of their own, stacked back for the comparison
                    a, b = kv[0].clone(), kv[1].clone()
                    x, y = fn(a, b)
                    kv = torch.stack([a, b])
                return {"a*1": x, "b*1": y, "kv": kv}
            return f, run
        return case

    return {"minimal_unbind_triton_op": make(traced, True), "minimal_unbind_custom_op": make(opaque, True),
            "minimal_separate_triton_op": make(traced, False), "minimal_separate_custom_op": make(opaque, False)}


CASES = {
    "cache_unbind_fp8": lambda dev, gen: _case_cache(dev, gen, True, True),
    "cache_unbind_bf16": lambda dev, gen: _case_cache(dev, gen, True, False),
    "cache_separate_fp8": lambda dev, gen: _case_cache(dev, gen, False, True),
    "cache_unbind_in_graph": lambda dev, gen: _case_cache(dev, gen, True, True, True),
    "rope_qk_views": _case_rope_views,
    "rope_qk_views_in_graph": _case_rope_views_in_graph,
    "mla_q_pe_view": _case_mla,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None)
    ap.add_argument("--backends", default="aot_eager,inductor")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__} on {dev}")
    cases = dict(CASES)
    if dev == "cuda":
        cases.update(_minimal_cases())
    for name, make in cases.items():
        if a.only and name != a.only:
            continue
        for backend in a.backends.split(","):
            gen = torch.Generator().manual_seed(0)
            f, run = make(dev, gen)
            want = run(f)
            torch._dynamo.reset()
            try:
                got = run(torch.compile(f, fullgraph=True, backend=backend))
            except Exception as e:  # noqa: BLE001 - a probe: report and go on
                print(f"{name:24s} {backend:10s} ERROR {type(e).__name__}: {str(e)[:200]}")
                continue
            finally:
                torch._dynamo.reset()
            bad = []
            for key in want:
                n = int((_bits(got[key]) != _bits(want[key])).sum())
                if n:
                    bad.append(f"{key}: {n}/{want[key].numel()} differ")
            print(f"{name:24s} {backend:10s} {'ok' if not bad else 'WRONG ' + '; '.join(bad)}")


if __name__ == "__main__":
    main()
