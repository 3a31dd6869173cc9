"""Every launch shape of the rope kernel on the benchmark's shapes, beside what bounds them.

    python bench/explore_configs.py [--shapes decode-1,llama3-8b-prefill] [--json out.json]

For each shape: the device time (CUDA-graph replay) of every candidate launch shape, the
tuner's own pick, Liger's kernel on its users' layout, an empty Triton kernel, and
two in-place references that move exactly the rope bytes and compute nothing: torch's
``mul_`` on the same views, and a minimal Triton kernel that loads the rope part of every
head and stores it back. The last one is what a Triton kernel with this access pattern
reaches on this GPU: the gap between it and the copy-bandwidth floor is the memory
system's, not the rotation's. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rope import (MROPE_MODELS, MROPE_TOKENS, SHAPES, hf_apply, make_inputs,  # noqa: E402
                        make_mrope_inputs, transformers_inputs)
from timing import copy_bandwidth, empty_kernel_us, graph_us  # noqa: E402

import yarn_triton as yt  # noqa: E402
from yarn_triton.kernels import configs, launcher  # noqa: E402

EXTRA = [(64, 1, 1, 8), (32, 2, 1, 8), (32, 1, 1, 8), (16, 4, 1, 8), (16, 2, 1, 8), (8, 2, 1, 4), (8, 4, 1, 4),
         (2, 1, 32, 1), (1, 2, 16, 1), (1, 4, 8, 1), (1, 1, 16, 1), (8, 1, 8, 2), (16, 1, 4, 4), (4, 1, 16, 1),
         # few heads of a narrow rope part (Qwen3.5: 16/4 heads, 64 of 256 channels)
         (1, 16, 1, 1), (1, 16, 1, 2), (2, 16, 1, 2), (2, 8, 1, 1), (4, 8, 1, 2), (4, 16, 1, 4), (8, 16, 1, 4),
         (1, 8, 2, 1), (2, 8, 2, 1), (2, 4, 4, 1),
         # one or two tokens per program, all their heads (decode)
         (1, 32, 1, 2), (1, 32, 1, 8), (2, 32, 1, 8), (1, 16, 2, 4), (1, 16, 1, 4)]


@triton.jit
def _touch(x_ptr, n_tokens, n_heads, s_t, s_h, ROT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
           HINTS: tl.constexpr):
    """Load the first ROT channels of every head of BLOCK_T tokens and store them back.
    HINTS 1: streaming stores (``.cs``); 2: also loads marked evict-first."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, ROT)
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        off = t.to(tl.int64)[None, :, None] * s_t + h[:, None, None] * s_h + d[None, None, :]
        m = (t < n_tokens)[None, :, None] & (h < n_heads)[:, None, None]
        if HINTS == 2:
            x = tl.load(x_ptr + off, mask=m, eviction_policy="evict_first")
        else:
            x = tl.load(x_ptr + off, mask=m)
        if HINTS >= 1:
            tl.store(x_ptr + off, x * 1.0, mask=m, cache_modifier=".cs")
        else:
            tl.store(x_ptr + off, x * 1.0, mask=m)


@triton.jit
def _touch_qk(q_ptr, k_ptr, q_st, q_sh, k_st, k_sh, n_q, n_k, ROT: tl.constexpr, HQ: tl.constexpr,
              HK: tl.constexpr):
    """One program per token loads the first ROT channels of all its q and k heads and
    stores them back: a decode launch's memory traffic in one launch, with nothing
    computed (no positions, no angles)."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, ROT)[None, :]
    hq = tl.arange(0, HQ)[:, None]
    hk = tl.arange(0, HK)[:, None]
    qo = t * q_st + hq * q_sh + d
    ko = t * k_st + hk * k_sh + d
    x = tl.load(q_ptr + qo, mask=hq < n_q)
    y = tl.load(k_ptr + ko, mask=hk < n_k)
    tl.store(q_ptr + qo, x * 1.0, mask=hq < n_q)
    tl.store(k_ptr + ko, y * 1.0, mask=hk < n_k)


def touch_qk(q: torch.Tensor, k: torch.Tensor, warps: int) -> None:
    """``q``/``k``: ``[1, T, H, R]`` views with unit channel stride: :func:`_touch_qk`."""
    T, R = q.shape[1], q.shape[3]
    _touch_qk[(T,)](q, k, q.stride(1), q.stride(2), k.stride(1), k.stride(2), q.shape[2], k.shape[2], R,
                    triton.next_power_of_2(q.shape[2]), triton.next_power_of_2(k.shape[2]), num_warps=warps)


def touch(x: torch.Tensor, block_t: int, block_h: int, warps: int, hints: int = 0) -> None:
    """``x``: ``[1, T, H, R]`` view with unit channel stride."""
    T, H, R = x.shape[1], x.shape[2], x.shape[3]
    _touch[(triton.cdiv(T, block_t),)](x, T, H, x.stride(1), x.stride(2), R, block_t, block_h, hints,
                                       num_warps=warps)


def mrope_inputs(name: str, gen):
    """An M-RoPE row of the benchmark by name (``qwen3.5-prefill``, ...), in bf16:
    ``(T, hq, hk, rot), q, k, positions [3, 1, T], params, bytes moved``."""
    model = next(m for m in MROPE_MODELS if name.startswith(m + "-"))
    T = MROPE_TOKENS[name[len(model) + 1:]]
    hq, hk, _, rot, _, _ = MROPE_MODELS[model]
    q, k, pos3, p, nbytes = make_mrope_inputs(model, T, torch.bfloat16, gen)
    return (T, hq, hk, rot), q, k, pos3, p, nbytes


def shape_of(name: str):
    """A benchmark row's shape, or ``llama3-8b-<tokens>``: the Llama-3-8B prefill at another
    token count (the plot's sweep points)."""
    if name in SHAPES:
        return SHAPES[name]
    prefix = "llama3-8b-"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return (int(name[len(prefix):]),) + SHAPES["llama3-8b-prefill"][1:]
    return None


def best(fn, reps: int = 3):
    """Fastest of ``reps`` graph timings, or the error's text (one failure must not end the run)."""
    try:
        return min(graph_us(fn) for _ in range(reps))
    except Exception as e:  # noqa: BLE001
        return repr(e)[:100]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="decode-1,decode-64,decode-256,llama3-8b-prefill,mla-8k-deepseek,mla-8k-neox")
    ap.add_argument("--json", default="")
    ap.add_argument("--hints", action="store_true", help="also time the touch kernels with cache hints")
    ap.add_argument("--out-of-place", action="store_true",
                    help="prefill rows: also ours and torch.compile out of place")
    ap.add_argument("--no-configs", dest="configs", action="store_false", help="only the tuner's pick and bounds")
    args = ap.parse_args()
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb as liger
    except ImportError:
        liger = None
    bw = copy_bandwidth()
    empty = empty_kernel_us()
    out = {"copy_tbps": bw / 1e12, "empty_us": empty, "shapes": {}}
    print(f"copy {bw / 1e12:.2f} TB/s, empty kernel {empty:.2f} us")
    for name in args.shapes.split(","):
        gen = torch.Generator(device="cuda").manual_seed(0)
        shape = shape_of(name)
        if shape is not None:
            T, hq, hk, D, rot, kind, layout, _ = shape
            q, k, pos, nbytes = make_inputs(shape, torch.bfloat16, gen)
            base = yt.RopeParams.yarn(rot, 500000.0, 4.0, 8192)
            p = yt.RopeParams(base.inv_freq, rot, 1.0, 1.0, "yarn")
        else:  # an M-RoPE row: partial rotary (Qwen3.5) over full-head storage
            (T, hq, hk, rot), q, k, pos, p, nbytes = mrope_inputs(name, gen)
            kind, layout = "mrope", "neox"
        res = {"floor_us": nbytes / bw * 1e6}
        yt.apply_rope_(q, k, pos, p, layout=layout)  # the tuner's pick
        res["tuned"] = best(lambda: yt.apply_rope_(q, k, pos, p, layout=layout))
        res["tuned_cfg"] = [str(c) for c in launcher.tuned_configs().values()][-1:]
        if kind == "mrope":
            res["torch mul_"] = best(lambda: (q[..., :rot].mul_(1.0), k[..., :rot].mul_(1.0)))
        else:
            res["torch mul_"] = best(lambda: (q.mul_(1.0), k.mul_(1.0)))
        for bt, bh, w in [(16, 1, 4), (32, 1, 4), (8, 4, 4), (64, 1, 8), (4, 8, 4), (1, 1, 1), (1, 8, 1)]:
            if bt <= max(T, 1) * 2:
                qr, kr = q[..., :rot] if kind == "mrope" else q, k[..., :rot] if kind == "mrope" else k
                res[f"touch {bt}x{bh} w{w}"] = best(lambda: (touch(qr, bt, bh, w), touch(kr, bt, bh, w)))
                if args.hints and bh > 1:
                    for hn in (1, 2):
                        res[f"touch {bt}x{bh} w{w} hints{hn}"] = best(
                            lambda: (touch(qr, bt, bh, w, hn), touch(kr, bt, bh, w, hn)))
        if kind == "decode":  # q and k together, one program per token: a decode launch's bytes
            for w in (1, 2, 4):
                res[f"touch q+k 1 launch w{w}"] = best(lambda: touch_qk(q, k, w))
        if kind not in ("mla", "mrope"):  # the [B, H, S, D] views transformers passes, its table
            qv, kv, cos, sin = transformers_inputs(q, k, pos, p.inv_freq_on("cuda"))
        if kind == "prefill" and args.out_of_place:
            # the same bytes moved out of place (reads q, k; writes fresh tensors): ours, and
            # torch.compile of transformers' formula (which also reads a cos/sin table)
            res["ours out of place"] = best(lambda: yt.apply_rope(q, k, pos, p, layout=layout))
            compiled = torch.compile(hf_apply)
            res["torch.compile out of place"] = best(lambda: compiled(qv, kv, cos, sin))
        if liger is not None and layout == "neox" and kind not in ("mla", "mrope"):  # its kernel rotates whole heads
            res["liger"] = best(lambda: liger(qv, kv, cos, sin))
        for bt, bh, g, w in list(dict.fromkeys(configs._CANDIDATES + EXTRA)) if args.configs else []:
            if bt > 2 * max(T, 1) or g > max(hq, hk):
                continue
            cfg = configs.LaunchConfig(bt, bh, w, 1, g)
            res[f"cfg {bt},{bh},{g},w{w}"] = best(lambda: yt.apply_rope_(q, k, pos, p, layout=layout, config=cfg))
        out["shapes"][name] = res
        nums = sorted((v, key) for key, v in res.items() if isinstance(v, float) and key.startswith("cfg"))
        print(f"\n== {name}: floor {res['floor_us']:.2f}  tuned {res['tuned']} {res['tuned_cfg']}")
        for key in [kk for kk in res if not kk.startswith("cfg") and kk != "tuned_cfg"]:
            print(f"   {key:22s} {res[key]}")
        for v, key in nums[:6]:
            print(f"   {key:22s} {v:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
