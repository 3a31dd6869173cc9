"""Experiment for issue #26: the QKV projection GEMM with rope fused into its epilogue,
against cuBLAS alone and cuBLAS followed by our standalone rope.

    python bench/bench_qkv.py --out $OUT/qkv.json            # the rows and the ship line
    python bench/bench_qkv.py --sweep --out $OUT/qkv_sweep.json   # + every QkvConfig, timed

Rows: 512, 4096 and 16384 tokens x {Llama-3-8B: 4096 -> 32 q / 8 kv heads x 128, YaRN
params; Qwen3-8B: the same dims with q/k RMSNorm}, bf16. Columns, device time per call
(``timing.graph_us``: 20 calls in a CUDA graph):

* ``cublas``: ``F.linear(x, w_qkv)``, the projection alone (the target);
* ``cublas_rope``: that, then our standalone rope in place on its q/k views
  (``apply_rope_``; with the norm ``apply_qk_norm_rope_``): what users run today;
* ``triton_gemm``: our kernel with ``EPILOGUE=0`` (the same tiles and loop, one
  accumulator, no rotation): how far the GEMM itself is from cuBLAS;
* ``fused``: ``yarn_triton.op.qkv.qkv_rope``, the default config.

Each row first checks the fused output against cuBLAS + rope (bf16: both round the
projection once, cuBLAS + rope twice, so they differ by about two bf16 roundings) and
records the profiler's kernel list per column (only the intended kernels may run). Ratios
are to ``cublas``. The ship line: fused faster than ``cublas_rope`` at 4K and 16K tokens, and
``fused / cublas <= 1.02`` there. ``--sweep`` times every ``candidate_configs()`` entry on
the fused kernel (a config that fails to compile is recorded with its error).

ncu (one fused launch at 16K tokens: the first ``qkv`` kernel of a run is the fused call of
the first row's correctness check; add ``--launch-skip 1`` for its plain GEMM)::

    ncu --kernel-name regex:qkv --launch-count 1 --set full \\
        python bench/bench_qkv.py --models llama3-8b --tokens 16384 --out /tmp/x.json

With no GPU it checks the fused kernel through Triton's interpreter at a tiny shape and
exits 0 (1 if the check fails).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the package of this tree, not an installed copy
sys.path.insert(0, _HERE)
from timing import graph_us, kernels_launched  # noqa: E402

# name: (hidden, q heads, kv heads, head dim, q/k norm)
MODELS = {
    "llama3-8b": (4096, 32, 8, 128, False),
    "qwen3-8b": (4096, 32, 8, 128, True),
}
TOKENS = (512, 4096, 16384)
SHIP_TOKENS = (4096, 16384)
SHIP_RATIO = 1.02


def _params(model):
    import yarn_triton as yt

    if model == "qwen3-8b":  # Qwen3's YaRN extension (theta 1e6, factor 4 over 32K)
        return yt.RopeParams.yarn(128, 1e6, 4.0, 32768)
    return yt.RopeParams.yarn(128, 500000.0, 4.0, 8192)  # as bench_rope's Llama-3 rows


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def make_case(model, tokens, dtype, device, gen):
    hidden, hq, hk, d, norm = MODELS[model]
    n = (hq + 2 * hk) * d
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    w = (torch.randn(n, hidden, generator=gen) / hidden ** 0.5).to(device, dtype)
    pos = torch.randint(0, 32768, (tokens,), generator=gen).to(device)
    qn = kn = None
    if norm:
        qn = (torch.rand(d, generator=gen) + 0.5).to(device, dtype)
        kn = (torch.rand(d, generator=gen) + 0.5).to(device, dtype)
    return dict(x=x, w=w, pos=pos, qn=qn, kn=kn, p=_params(model), hq=hq, hk=hk, d=d)


def methods(c, config=None):
    """The four columns as zero-argument callables, and the plain GEMM's output buffer."""
    import yarn_triton as yt
    from yarn_triton.kernels.qkv_launcher import launch_qkv
    from yarn_triton.op.qkv import qkv_rope

    x, w, pos, p, qn, kn, hq, hk, d = (c[k] for k in ("x", "w", "pos", "p", "qn", "kn", "hq", "hk", "d"))
    plain = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)

    def cublas():
        return F.linear(x, w)

    def cublas_rope():
        y = F.linear(x, w)
        qv = y[:, :hq * d].unflatten(-1, (hq, d))
        kv = y[:, hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
        if qn is None:
            yt.apply_rope_(qv, kv, pos, p)
        else:
            yt.apply_qk_norm_rope_(qv, kv, pos, p, qn, kn)
        return y

    def triton_gemm():
        launch_qkv(x, w, None, plain, pos, p.inv_freq_on(x.device), p.cos_sin_scale, n_q_heads=hq, n_k_heads=hk,
                   head_dim=d, rot=d, layout="neox", epilogue=0, config=config)

    def fused():
        return qkv_rope(x, w, pos, p, num_heads=hq, num_kv_heads=hk, head_dim=d, q_norm=qn, k_norm=kn, config=config)

    return dict(cublas=cublas, cublas_rope=cublas_rope, triton_gemm=triton_gemm, fused=fused), plain


def check(c, cols, plain) -> dict:
    """Fused vs cuBLAS + rope, and the plain Triton GEMM vs cuBLAS, relative errors."""
    proj = cols["cublas_rope"]()
    q, k, v = cols["fused"]()
    fused = torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=1)
    cols["triton_gemm"]()
    ref = F.linear(c["x"], c["w"])
    torch.cuda.synchronize()
    return {"fused_vs_cublas_rope": _rel(fused, proj), "triton_gemm_vs_cublas": _rel(plain, ref)}


def run_row(model, tokens, dtype, gen) -> dict:
    c = make_case(model, tokens, dtype, "cuda", gen)
    cols, plain = methods(c)
    row = {"model": model, "tokens": tokens, **check(c, cols, plain)}
    # bf16: cuBLAS + rope rounds the projection, then the rotation: ~2 roundings apart
    row["correct"] = row["fused_vs_cublas_rope"] < 1e-2 and row["triton_gemm_vs_cublas"] < 1e-2
    flops = 2.0 * tokens * c["x"].shape[1] * c["w"].shape[0]
    for name, fn in cols.items():
        us = graph_us(fn)
        row[f"{name}_us"] = us
        row[f"{name}_tflops"] = flops / us / 1e6
        row[f"{name}_kernels"] = kernels_launched(fn)
    for name in cols:
        row[f"{name}_x_cublas"] = row[f"{name}_us"] / row["cublas_us"]
    return row


def sweep(model, tokens, dtype, gen, save) -> list:
    """Every candidate config on the fused call; ``save(records)`` after each one, so that a
    compiler crash that takes the process down still leaves the configs timed before it."""
    from yarn_triton.kernels.qkv_launcher import candidate_configs

    c = make_case(model, tokens, dtype, "cuda", gen)
    base, _ = methods(c)
    want = base["cublas_rope"]()
    cublas_us = graph_us(base["cublas"])
    out = []
    for cfg in candidate_configs():
        rec = {"model": model, "tokens": tokens, "config": cfg._asdict()}
        try:
            fused = methods(c, cfg)[0]["fused"]
            q, k, v = fused()
            rec["err_vs_cublas_rope"] = _rel(torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), 1), want)
            rec["us"] = graph_us(fused)
            rec["x_cublas"] = rec["us"] / cublas_us
        except Exception as e:  # a config triton 3.6 cannot compile or run: recorded, not fatal
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"  {model} {tokens} {tuple(cfg)} -> {rec.get('us', float('nan')):.1f} us "
              f"{rec.get('x_cublas', float('nan')):.3f}x {rec.get('error', '')}", file=sys.stderr, flush=True)
        out.append(rec)
        save(out)
    return out


def ship_line(rows) -> dict:
    """The criterion, per model: fused < cuBLAS + rope and fused / cuBLAS <= 1.02 at 4K and 16K."""
    verdict = {}
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model and r["tokens"] in SHIP_TOKENS]
        if len(rs) < len(SHIP_TOKENS):
            verdict[model] = "not measured at 4K and 16K tokens"
            continue
        beats = all(r["fused_us"] < r["cublas_rope_us"] for r in rs)
        near = all(r["fused_x_cublas"] <= SHIP_RATIO for r in rs)
        ok = beats and near and all(r["correct"] for r in rs)
        ratios = ", ".join("%d: %.3fx" % (r["tokens"], r["fused_x_cublas"]) for r in rs)
        verdict[model] = (f"{'SHIP' if ok else 'NO'}: fused < cuBLAS+rope {beats}, fused/cuBLAS <= {SHIP_RATIO} "
                          f"{near} ({ratios})")
    return verdict


def print_table(meta, rows, verdict):
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['dtype']}")
    print("device time per call, us (x cuBLAS); err = fused vs cuBLAS + rope")
    print(f"{'model':10s} {'tokens':>6s} {'cuBLAS':>8s} {'+rope':>16s} {'triton gemm':>16s} {'fused':>16s} {'err':>8s}")
    for r in rows:
        cell = lambda k: f"{r[k + '_us']:8.1f} ({r[k + '_x_cublas']:.3f})"  # noqa: E731
        print(f"{r['model']:10s} {r['tokens']:6d} {r['cublas_us']:8.1f} {cell('cublas_rope'):>16s} "
              f"{cell('triton_gemm'):>16s} {cell('fused'):>16s} {r['fused_vs_cublas_rope']:8.1e}")
    for model, v in verdict.items():
        print(f"ship criterion {model}: {v}")


def cpu_check() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable] + sys.argv)  # triton reads it at import
    import yarn_triton as yt
    from yarn_triton.op.qkv import qkv_rope
    from yarn_triton.reference import qk_norm_rope_reference, rope_reference

    print("No CUDA GPU: skipping timings; checking the fused kernel through Triton's interpreter.")
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    T, hidden, hq, hk, d = 19, 48, 2, 1, 32
    p = yt.RopeParams.yarn(d, 1e6, 4.0, 4096, mscale=1.0, mscale_all_dim=0.0)
    for layout in ("neox", "interleaved", "deepseek"):
        for norm in (False, True):
            x = torch.randn(T, hidden, generator=gen)
            w = torch.randn((hq + 2 * hk) * d, hidden, generator=gen) / hidden ** 0.5
            pos = torch.randint(0, 1 << 20, (T,), generator=gen)
            qn, kn = (torch.rand(d, generator=gen) + 0.5, torch.rand(d, generator=gen) + 0.5) if norm else (None, None)
            q, k, v = qkv_rope(x, w, pos, p, num_heads=hq, num_kv_heads=hk, head_dim=d, layout=layout,
                               q_norm=qn, k_norm=kn)
            y = F.linear(x.double(), w.double())
            rq, rk, rv = (t.unflatten(-1, (-1, d)) for t in y.split([hq * d, hk * d, hk * d], -1))
            if norm:
                rq, rk = qk_norm_rope_reference(rq, rk, pos, p, qn.double(), kn.double(), layout=layout,
                                                compute_dtype=torch.float64)
            else:
                rq, rk = rope_reference(rq, rk, pos, p, layout=layout, compute_dtype=torch.float64)
            err = max(_rel(q, rq), _rel(k, rk), _rel(v, rv))
            worst = max(worst, err)
            print(f"  {layout:12s} norm={norm!s:5s} rel err vs float64 composition: {err:.2e}")
    ok = worst < 2e-6
    print("interpreter correctness check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of token counts")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", default="bench_qkv.json", help="JSON results path")
    ap.add_argument("--sweep", action="store_true", help="also time every candidate config of the fused kernel")
    ap.add_argument("--sweep-tokens", default="4096,16384", help="token counts of the sweep")
    ap.add_argument("--sweep-models", default="llama3-8b", help="models of the sweep (each compiles every config)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        return cpu_check()

    import triton

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "dtype": args.dtype}
    models = [m for m in args.models.split(",") if m]
    tokens = [int(t) for t in args.tokens.split(",") if t]
    rows = []
    for model in models:
        for t in tokens:
            print(f"{model} {t} tokens ...", file=sys.stderr, flush=True)
            rows.append(run_row(model, t, dtype, gen))
    verdict = ship_line(rows)
    result = {"meta": meta, "rows": rows, "ship": verdict}

    def save(sweep_records=None):
        if sweep_records is not None:
            result["sweep"] = done + sweep_records
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    done = []
    save()  # the rows and the ship line are on disk before the sweep compiles anything
    if args.sweep:
        print_table(meta, rows, verdict)
        for model in (m for m in args.sweep_models.split(",") if m):
            for t in (int(s) for s in args.sweep_tokens.split(",") if s):
                done = done + sweep(model, t, dtype, gen, save)
        print("\nsweep, best per (model, tokens):")
        for key in sorted({(r["model"], r["tokens"]) for r in done}):
            ok = [r for r in done if (r["model"], r["tokens"]) == key and "us" in r]
            if ok:
                best = min(ok, key=lambda r: r["us"])
                print(f"  {key[0]} {key[1]}: {best['us']:.1f} us ({best['x_cublas']:.3f}x cuBLAS) {best['config']}")
    print_table(meta, rows, verdict)
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
