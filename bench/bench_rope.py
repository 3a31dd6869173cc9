"""yarn-triton benchmark: our kernel vs peers and vs the bytes-moved floor, in one run.

    python bench/bench_rope.py                    # embedded default shapes, bf16
    python bench/bench_rope.py --shapes llama3-8b-prefill,decode-64 --dtype float16
    python bench/bench_rope.py --out results.json --plot gbps.png

For every shape: our median time (triton.testing.do_bench), GB/s, % of the device-to-device
copy bandwidth measured in this same run, the floor (bytes / copy bandwidth), and the
ratio of each peer's time to ours: eager PyTorch (transformers style: cos/sin from
positions, rotate_half), torch.compile of it, and Liger-Kernel's Triton rope when
installed (given precomputed cos/sin, i.e. kernel only). flash-attention's rotary needs
its compiled package and is skipped when absent. Decode shapes are also timed as CUDA
graphs. Also: our eager host overhead per call, extra device memory per call, the
autotuner's chosen launch shape, and the cost of precise angles.

With no GPU it says so, then checks correctness through Triton's interpreter and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


# ------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------
# name: (tokens, q heads, k heads, head dim, rope dim, kind)
SHAPES = {
    "llama3-8b-prefill": (16384, 32, 8, 128, 128, "prefill"),
    "gqa-64x8-8k": (8192, 64, 8, 128, 128, "prefill"),
    "deepseek-v3-mla-4k": (4096, 128, 1, 192, 64, "mla"),
    "decode-1": (1, 32, 8, 128, 128, "decode"),
    "decode-8": (8, 32, 8, 128, 128, "decode"),
    "decode-64": (64, 32, 8, 128, 128, "decode"),
    "decode-256": (256, 32, 8, 128, 128, "decode"),
    "llama3-8b-train-4k": (4096, 32, 8, 128, 128, "train"),
    "llama3-8b-train-16k": (16384, 32, 8, 128, 128, "train"),
}
SWEEP_TOKENS = [64, 256, 1024, 4096, 16384, 32768]


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def hf_style_rope(q, k, positions, inv_freq, scale: float):
    """The transformers way: cos/sin from positions, then x*cos + rotate_half(x)*sin.
    q, k: [B, S, H, D] (rope over the whole head)."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scale).to(q.dtype)[..., None, :]
    sin = (emb.sin() * scale).to(q.dtype)[..., None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# ------------------------------------------------------------------------------------------
# Timing helpers
# ------------------------------------------------------------------------------------------
def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median)."""
    from triton.testing import do_bench

    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def bench_ms(fn, warmup=25, rep=100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def graph_ms(fn, calls: int = 20) -> float:
    """Median time per call of ``fn`` captured ``calls`` times in one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return bench_ms(g.replay) / calls


def host_overhead_us(fn, calls: int = 2000) -> float:
    """Wall time per call of a tiny launch loop: the host cost, GPU work being shorter."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


# ------------------------------------------------------------------------------------------
# One shape
# ------------------------------------------------------------------------------------------
def make_inputs(shape, dtype):
    """Returns (q, k, positions, bytes moved by one in-place rope). MLA: q's rope part is
    the last 64 of each 192-wide head, k_pe the last 64 of the 576-wide kv projection."""
    T, hq, hk, D, rot, kind = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = torch.randint(0, 128 * 1024, (1, T), device="cuda", generator=g)
    esize = torch.tensor([], dtype=dtype).element_size()
    if kind == "mla":
        qf = torch.randn(1, T, hq, D, device="cuda", dtype=dtype, generator=g)
        kv = torch.randn(1, T, 512 + rot, device="cuda", dtype=dtype, generator=g)
        q = qf[..., D - rot:]
        k = kv[..., 512:].unsqueeze(2)
    else:
        q = torch.randn(1, T, hq, D, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(1, T, hk, D, device="cuda", dtype=dtype, generator=g)
    nbytes = 2 * T * (hq + hk) * rot * esize  # read + write of the rope part
    return q, k, pos, nbytes


def run_shape(name, shape, dtype, params, bw, peers, compiled, log):
    import yarn_triton as yt
    from yarn_triton.kernels.rope_kernel import rope_kernel_autotuned

    T, hq, hk, D, rot, kind = shape
    q, k, pos, nbytes = make_inputs(shape, dtype)
    inv = params.inv_freq_on("cuda")
    row = {"shape": name, "tokens": T, "q_heads": hq, "k_heads": hk, "head_dim": D, "rope_dim": rot,
           "kind": kind, "dtype": str(dtype).split(".")[-1]}

    if kind == "train":
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        gq, gk = torch.randn_like(q), torch.randn_like(k)

        # autograd.grad, not backward: no accumulation into .grad inflating the bytes
        def ours():
            qo, ko = yt.apply_rope(qg, kg, pos, params)
            return torch.autograd.grad((qo, ko), (qg, kg), (gq, gk))

        def eager():
            qo, ko = hf_style_rope(qg, kg, pos, inv, params.cos_sin_scale)
            return torch.autograd.grad((qo, ko), (qg, kg), (gq, gk))

        def comp():
            qo, ko = compiled(qg, kg, pos, inv, params.cos_sin_scale)
            return torch.autograd.grad((qo, ko), (qg, kg), (gq, gk))

        nbytes *= 2  # forward and backward each read and write q and k
        fwd_ms = bench_ms(lambda: yt.apply_rope(qg, kg, pos, params))
        bwd_ms = bench_ms(lambda: torch.ops.yarn_triton.rope(gq, gk, pos, None, None, inv, params.cos_sin_scale,
                                                             0, rot, "neox", True, True))
        row.update(fwd_ms=fwd_ms, bwd_ms=bwd_ms)
        # device time of each kernel alone: forward (out of place) and backward (inverse)
        row["graph_fwd_us"] = graph_ms(lambda: yt.apply_rope(qg, kg, pos, params), calls=10) * 1e3
        row["graph_bwd_us"] = graph_ms(lambda: torch.ops.yarn_triton.rope(
            gq, gk, pos, None, None, inv, params.cos_sin_scale, 0, rot, "neox", True, True), calls=10) * 1e3
        t_ours = bench_ms(ours)
        peer_fns = {"eager": eager, "compile": comp}
    else:
        def ours():
            yt.apply_rope_(q, k, pos, params)

        # peers work on [B, S, H, D] full heads (MLA: the rope views materialised for them)
        qp, kp = q.contiguous(), k.contiguous()
        peer_fns = {
            "eager": lambda: hf_style_rope(qp, kp, pos, inv, params.cos_sin_scale),
            "compile": lambda: compiled(qp, kp, pos, inv, params.cos_sin_scale),
        }
        if "liger" in peers:
            freqs = pos[..., None].float() * inv
            emb = torch.cat((freqs, freqs), -1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            qt, kt = qp.transpose(1, 2).contiguous(), kp.transpose(1, 2).contiguous()
            peer_fns["liger"] = lambda: peers["liger"](qt, kt, cos, sin)
        t_ours = bench_ms(ours)
        if kind != "decode":
            t_fp32 = bench_ms(lambda: yt.apply_rope_(q, k, pos, params, precise_angles=False))
            row["fp32_angles_ms"] = t_fp32
            row["precise_cost_pct"] = 100 * (t_ours / t_fp32 - 1)

    row["ours_ms"] = t_ours
    row["floor_ms"] = nbytes / bw * 1e3
    row["gbps"] = nbytes / (t_ours * 1e-3) / 1e9
    row["pct_copy_bw"] = 100 * row["floor_ms"] / t_ours
    cfg = getattr(rope_kernel_autotuned, "best_config", None)
    row["config"] = str(cfg) if cfg is not None else "heuristic"
    for pname, fn in peer_fns.items():
        try:
            row[f"{pname}_ms"] = bench_ms(fn)
            row[f"x_vs_{pname}"] = row[f"{pname}_ms"] / t_ours
        except Exception as e:  # a peer failing is reported, not fatal
            row[f"{pname}_error"] = f"{type(e).__name__}: {e}"[:200]
            log(f"  {name}: peer {pname} failed: {row[f'{pname}_error']}")

    if kind == "mla":
        # the same bytes in the same strided pattern, moved by PyTorch's copy: what this
        # access pattern costs without any rope arithmetic
        dq = torch.empty_strided(q.size(), q.stride(), dtype=dtype, device="cuda")
        dk = torch.empty_strided(k.size(), k.stride(), dtype=dtype, device="cuda")
        row["strided_copy_us"] = graph_ms(lambda: (dq.copy_(q), dk.copy_(k)), calls=10) * 1e3
    # device time alone (launch gaps removed): the kernel's own speed vs the floor
    row["graph_ours_us"] = graph_ms(ours, calls=10 if kind != "decode" else 20) * 1e3
    row["graph_pct_copy_bw"] = 100 * row["floor_ms"] * 1e3 / row["graph_ours_us"]
    if kind == "decode":
        for pname in ("eager", "compile"):
            try:
                row[f"graph_{pname}_us"] = graph_ms(peer_fns[pname]) * 1e3
            except Exception as e:
                row[f"graph_{pname}_error"] = f"{type(e).__name__}: {e}"[:200]
        # extra memory of one call: should be 0 (no cos/sin cache, no workspace)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ours()
        torch.cuda.synchronize()
        row["extra_bytes_per_call"] = torch.cuda.max_memory_allocated() - before
    return row


# ------------------------------------------------------------------------------------------
# CPU: correctness through the interpreter
# ------------------------------------------------------------------------------------------
def cpu_check() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable] + sys.argv)  # triton reads it at import
    import yarn_triton as yt
    from yarn_triton.reference import rope_reference

    print("No CUDA GPU: skipping timings; checking the kernel through Triton's interpreter.")
    worst = 0.0
    for layout in ("neox", "interleaved", "deepseek"):
        p = yt.RopeParams.yarn(64, 10000.0, 40.0, 4096, mscale=0.707, mscale_all_dim=0.707)
        q = torch.randn(2, 16, 8, 96)
        k = torch.randn(2, 16, 1, 64)
        pos = torch.randint(0, 1 << 20, (2, 16))
        rq, rk = rope_reference(q, k, pos, p, layout=layout, compute_dtype=torch.float64)
        yt.apply_rope_(q, k, pos, p, layout=layout)
        err = max(((q.double() - rq).norm() / rq.norm()).item(), ((k.double() - rk).norm() / rk.norm()).item())
        worst = max(worst, err)
        print(f"  {layout:12s} rel err vs float64 reference: {err:.2e}")
    ok = worst < 2e-6
    print("interpreter correctness check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default="bench_results.json", help="JSON results path")
    ap.add_argument("--plot", default="", help="PNG path for GB/s vs tokens (needs matplotlib)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tokens sweep for the plot")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        return cpu_check()

    import triton
    import yarn_triton as yt

    dtype = getattr(torch, args.dtype)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    bw = copy_bandwidth()
    dev = torch.cuda.get_device_name()
    log(f"{dev}: device-to-device copy {bw / 1e12:.3f} TB/s")

    peers = {}
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        peers["liger"] = liger_rotary_pos_emb
    except Exception as e:
        log(f"Liger-Kernel not available ({type(e).__name__}): its column is skipped")
    log("flash-attention rotary: needs the compiled flash_attn package; skipped when absent")
    try:
        from flash_attn.ops.triton.rotary import apply_rotary  # noqa: F401
        log("flash-attention present but not wired into this benchmark")
    except Exception:
        pass
    compiled = torch.compile(hf_style_rope)

    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        # cos/sin scale 1: repeated in-place timing then keeps values bounded (same cost)
        base = yt.RopeParams.yarn(shape[4], 500000.0, 4.0, 8192)
        params = yt.RopeParams(base.inv_freq, shape[4], 1.0, 1.0, "yarn")
        log(f"running {name} ...")
        rows.append(run_shape(name, shape, dtype, params, bw, peers, compiled, log))
        with open(args.out, "w") as f:  # as we go: a killed run still leaves its rows
            json.dump({"rows": rows}, f, indent=1)

    # host overhead of one eager call (tiny decode input)
    p = yt.RopeParams.yarn(128, 500000.0, 4.0, 8192)
    q1 = torch.randn(1, 1, 32, 128, device="cuda", dtype=dtype)
    k1 = torch.randn(1, 1, 8, 128, device="cuda", dtype=dtype)
    pos1 = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    host_us = host_overhead_us(lambda: yt.apply_rope_(q1, k1, pos1, p))
    host_empty_us = host_overhead_us(lambda: torch.empty(0, device="cuda").add_(1))

    sweep = []
    if not args.no_sweep:
        base = yt.RopeParams.yarn(128, 500000.0, 4.0, 8192)
        params = yt.RopeParams(base.inv_freq, 128, 1.0, 1.0, "yarn")
        for T in SWEEP_TOKENS:
            r = run_shape(f"sweep-{T}", (T, 32, 8, 128, 128, "prefill"), dtype, params, bw, peers, compiled, log)
            sweep.append(r)

    meta = {"device": dev, "copy_tbps": bw / 1e12, "torch": torch.__version__, "triton": triton.__version__,
            "dtype": args.dtype, "host_overhead_us": host_us, "host_overhead_trivial_torch_op_us": host_empty_us}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "sweep": sweep}, f, indent=1)

    if args.plot and sweep:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(7, 4))
            toks = [r["tokens"] for r in sweep]
            ax.plot(toks, [r["gbps"] for r in sweep], "o-", label="yarn-triton")
            for pname in ("eager", "compile", "liger"):
                if all(f"{pname}_ms" in r for r in sweep):
                    ax.plot(toks, [r["gbps"] * r[f"x_vs_{pname}"] ** -1 for r in sweep], "o--", label=pname)
            ax.axhline(bw / 1e9, color="gray", ls=":", label="d2d copy")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens (32 q / 8 kv heads, dim 128)")
            ax.set_ylabel("GB/s (rope bytes / time)")
            ax.set_title(f"{dev}, {args.dtype}")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
        except ImportError:
            log("matplotlib not installed: no plot")

    # the short table, last
    print(f"\n{dev} | torch {torch.__version__} | triton {triton.__version__} | {args.dtype} | "
          f"copy {bw / 1e12:.2f} TB/s | eager host overhead {host_us:.1f} us/call "
          f"(a trivial torch op: {host_empty_us:.1f})")
    hdr = (f"{'shape':22s} {'ours us':>8s} {'graph us':>8s} {'floor us':>8s} {'%copy':>6s} {'%copy(g)':>8s} "
           f"{'x eager':>8s} {'x compile':>9s} {'x liger':>8s}  extra")
    print(hdr)
    for r in rows:
        extra = ""
        if "extra_bytes_per_call" in r:
            extra = (f"graph: compile {r.get('graph_compile_us', float('nan')):.2f}, "
                     f"eager {r.get('graph_eager_us', float('nan')):.2f}; mem/call {r['extra_bytes_per_call']} B")
        elif "precise_cost_pct" in r:
            extra = f"precise angles cost {r['precise_cost_pct']:+.1f}%"
            if "strided_copy_us" in r:
                extra += f"; strided copy of the same views {r['strided_copy_us']:.1f} us"
        elif "fwd_ms" in r:
            extra = (f"fwd {r['fwd_ms'] * 1e3:.1f} us, bwd {r['bwd_ms'] * 1e3:.1f} us; "
                     f"graph: fwd {r['graph_fwd_us']:.1f} us, bwd {r['graph_bwd_us']:.1f} us")
        fmt = lambda key: f"{r[key]:.2f}" if key in r else "-"
        print(f"{r['shape']:22s} {r['ours_ms'] * 1e3:8.1f} {r['graph_ours_us']:8.1f} {r['floor_ms'] * 1e3:8.1f} "
              f"{r['pct_copy_bw']:6.1f} {r['graph_pct_copy_bw']:8.1f} "
              f"{fmt('x_vs_eager'):>8s} {fmt('x_vs_compile'):>9s} {fmt('x_vs_liger'):>8s}  {extra}")
    print("configs: " + "; ".join(f"{r['shape']}={r['config']}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
