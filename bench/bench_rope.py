"""yarn-triton benchmark: our kernel against its peers and the bytes-moved floor, like for like.

    python bench/bench_rope.py                       # every shape, bf16
    python bench/bench_rope.py --shapes llama3-8b-prefill,decode-64 --out results.json

Like for like means:

* every method gets the tensors its own users hand it. transformers' attention hands its
  rope ``q_proj(x).view(B, S, H, D).transpose(1, 2)``: a ``[B, H, S, D]`` *view* of
  ``[B, S, H, D]`` storage. Liger and the PyTorch peers get exactly that view (MLA: the
  rope slice of it), plus the cos/sin table their users compute from the positions. We get
  the same storage as ``[B, S, H, D]`` and the positions;
* peers that need a cos/sin table are reported twice: kernel only (``*_ms``), and with the
  table built once per model forward and spread over the model's layers (``*_e2e_ms``:
  32 layers for Llama-3-8B, 61 for DeepSeek-V3);
* FlashInfer (our binding of its position-id launchers, ``bench/flashinfer/``, when it
  builds) gets ``[B*S, H, D]`` token-major views of the same storage ours gets, and the
  positions flat: ``flashinfer`` takes the fp32 ``[max_pos, R]`` YaRN cos/sin cache that its
  users (vLLM, SGLang) build, ``flashinfer_fly`` computes plain-rope angles in the kernel
  (it cannot express YaRN's blended inv_freq or cos/sin scale; same bytes moved). Its e2e
  adds the cache build over the layers, though those users build it once per model load;
* the profiler lists the GPU kernels each method launches (``kernels`` in the JSON): a
  kernel-only figure is one kernel, and any copy a peer makes of its input is counted,
  because its users pay for it;
* decode rows are device time per call, replayed in a CUDA graph, beside an empty Triton
  kernel replayed the same way; host rows are eager wall time per call beside a trivial
  torch op (``q.add_(0)``), all in one process.

The floor is the rope part of q and k read and written once over the device-to-device copy
bandwidth measured in the same run. FlashInfer's wheel does not install on the device
machine: its columns need ``bench/flashinfer/fetch_headers.sh`` run first (the headers its
binding compiles against, a few MiB; see docs/performance.md). vLLM is not run here.

With no GPU it says so, checks correctness through Triton's interpreter and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import bench_ms, copy_bandwidth, empty_kernel_us, graph_us, host_us, kernels_launched  # noqa: E402

# name: (tokens, q heads, k heads, head dim, rope dim, kind, layout, layers)
SHAPES = {
    "llama3-8b-prefill": (16384, 32, 8, 128, 128, "prefill", "neox", 32),
    "gqa-64x8-8k": (8192, 64, 8, 128, 128, "prefill", "neox", 32),
    "mla-8k-deepseek": (8192, 128, 1, 192, 64, "mla", "deepseek", 61),
    "mla-8k-interleaved": (8192, 128, 1, 192, 64, "mla", "interleaved", 61),
    "mla-8k-neox": (8192, 128, 1, 192, 64, "mla", "neox", 61),
    "decode-1": (1, 32, 8, 128, 128, "decode", "neox", 32),
    "decode-64": (64, 32, 8, 128, 128, "decode", "neox", 32),
    "decode-256": (256, 32, 8, 128, 128, "decode", "neox", 32),
    "train-16k": (16384, 32, 8, 128, 128, "train", "neox", 32),
}
# Qwen3-8B attention (32/8 heads, d128): per-head RMSNorm of q and k, then rope
QKNORM_SHAPES = {
    "qwen3-qknorm-prefill": 16384,
    "qwen3-qknorm-decode-1": 1,
    "qwen3-qknorm-decode-64": 64,
    "qwen3-qknorm-decode-256": 256,
}
# M-RoPE attention shapes from the real configs: (q heads, k heads, head dim, rope dim,
# section, interleaved); prefill 16K tokens and decode 1/64/256, distinct t/h/w streams.
MROPE_MODELS = {
    "qwen3.5": (16, 4, 256, 64, (11, 11, 10), True),
    "qwen3-vl-8b": (32, 8, 128, 128, (24, 20, 20), True),
    "qwen2-vl-sect": (32, 8, 128, 128, (16, 24, 24), False),  # sectioned: what Liger's kernel does
}
# positions each model serves (max_position_embeddings x YaRN factor): what a cache peer sizes
MROPE_CONTEXT = {"qwen3.5": 262144 * 4, "qwen3-vl-8b": 262144, "qwen2-vl-sect": 32768}
MROPE_TOKENS = {"prefill": 16384, "decode-1": 1, "decode-64": 64, "decode-256": 256}
SWEEP_TOKENS = [256, 4096, 65536]


# ------------------------------------------------------------------------------------------
# Peers: what their users run
# ------------------------------------------------------------------------------------------
def hf_cos_sin(positions, inv_freq, scale, dtype):
    """transformers' rotary embedding forward: the per-forward cos/sin table ``[B, S, R]``."""
    freqs = (inv_freq[None, :, None] @ positions[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def hf_apply(q, k, cos, sin):
    """transformers' ``apply_rotary_pos_emb`` on ``[B, H, S, R]`` views (out of place)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def transformers_inputs(q, k, positions, inv_freq):
    """What a transformers attention layer hands its rope function (and so each peer) for
    ``[B, S, H, D]`` q/k storage and ``[B, S]`` positions: ``(q, k)`` as ``[B, H, S, D]``
    views, no copy, and the cos/sin table its rotary embedding builds, in q's dtype."""
    cos, sin = hf_cos_sin(positions, inv_freq, 1.0, q.dtype)
    return q.transpose(1, 2), k.transpose(1, 2), cos, sin


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------
# One shape
# ------------------------------------------------------------------------------------------
def make_inputs(shape, dtype, gen):
    """``[1, T, H, D]`` storage for q and k (MLA: q's rope part is the last 64 of each
    192-wide head, k_pe the last 64 of the 576-wide kv projection), positions ``[1, T]``,
    and the bytes one rope pass must move."""
    T, hq, hk, D, rot, kind, layout, layers = shape
    pos = torch.randint(0, 128 * 1024, (1, T), device="cuda", generator=gen)
    if kind == "mla":
        q = torch.randn(1, T, hq, D, device="cuda", dtype=dtype, generator=gen)[..., D - rot:]
        k = torch.randn(1, T, 512 + rot, device="cuda", dtype=dtype, generator=gen)[..., 512:].unsqueeze(2)
    else:
        q = torch.randn(1, T, hq, D, device="cuda", dtype=dtype, generator=gen)
        k = torch.randn(1, T, hk, D, device="cuda", dtype=dtype, generator=gen)
    nbytes = 2 * T * (hq + hk) * rot * q.element_size()
    return q, k, pos, nbytes


def make_mrope_inputs(model, T, dtype, gen):
    """An M-RoPE model's attention (``MROPE_MODELS``): full-head ``[1, T, H, D]`` q/k storage
    (the rope part is the leading ``rot`` channels), ``[3, 1, T]`` positions with distinct
    t/h/w streams, its YaRN params with the sections, and the bytes one in-place pass moves."""
    import yarn_triton as yt

    hq, hk, D, rot, section, interleaved = MROPE_MODELS[model]
    q = torch.randn(1, T, hq, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(1, T, hk, D, device="cuda", dtype=dtype, generator=gen)
    t = torch.randint(0, 200000, (1, T), device="cuda", generator=gen)
    pos3 = torch.stack([t, torch.randint(0, 512, (1, T), device="cuda", generator=gen),
                        torch.randint(0, 512, (1, T), device="cuda", generator=gen)])
    base = yt.RopeParams.yarn(rot, 1e7, 4.0, 262144)
    params = yt.RopeParams(base.inv_freq, rot, 1.0, 1.0, "yarn").with_mrope(section, interleaved)
    nbytes = 2 * T * (hq + hk) * rot * q.element_size()  # in place: the rope part, read + write
    return q, k, pos3, params, nbytes


FI_CACHE_POSITIONS = 128 * 1024  # positions FlashInfer's cache covers: the rows draw them below 128K


def load_flashinfer():
    """Our FlashInfer binding (``bench/flashinfer/load.py``, imported by its path: that folder
    is no package, so ``import flashinfer`` still finds the real one)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flashinfer", "load.py")
    spec = importlib.util.spec_from_file_location("fi_rope_load", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def flashinfer_methods(fi, q, k, pos, params, theta, layout, row, log) -> dict:
    """FlashInfer's two position-id ropes on ``[nnz, H, D]`` views of ``q``/``k`` (in place,
    as its ``*_inplace`` API), each checked against our reference first: ``flashinfer``
    gathers YaRN's cos/sin from the fp32 cache its users build (its build time is
    ``flashinfer_cache_us``), ``flashinfer_fly`` computes plain rope (theta, scale 1) in the
    kernel. A method whose error is past bf16 rounding (a convention mistake) is left out;
    the fast-math angles of the on-the-fly one are recorded (``*_rel_err``), not judged."""
    import yarn_triton as yt
    from yarn_triton.reference import rope_reference

    assert q.shape[0] == 1 and k.shape[0] == 1
    fq, fk = q.squeeze(0), k.squeeze(0)  # [nnz, H, D]: views, q's and k's strides
    ids = pos.reshape(-1)
    interleave, rot = layout == "interleaved", params.rope_dim
    build = lambda: fi.yarn_cos_sin_cache(params, FI_CACHE_POSITIONS, q.device)  # noqa: E731
    cache = build()
    row["flashinfer_cache_us"] = graph_us(build)
    row["flashinfer_cache_positions"] = FI_CACHE_POSITIONS
    plain = yt.RopeParams.default(rot, theta)
    cands = {"flashinfer": (params, lambda a, b: fi.ext.cos_sin_cache_(a, b, cache, ids, interleave)),
             "flashinfer_fly": (plain, lambda a, b: fi.ext.pos_ids_(a, b, ids, rot, interleave, 1.0, theta))}
    methods = {}
    for m, (p, run) in cands.items():
        try:
            qc = torch.empty_strided(fq.shape, fq.stride(), dtype=q.dtype, device=q.device).copy_(fq)
            kc = torch.empty_strided(fk.shape, fk.stride(), dtype=k.dtype, device=k.device).copy_(fk)
            run(qc, kc)
            rq, rk = rope_reference(fq.double(), fk.double(), ids, p, layout=layout, compute_dtype=torch.float64)
            err = (((qc.double() - rq).norm() ** 2 + (kc.double() - rk).norm() ** 2)
                   / (rq.norm() ** 2 + rk.norm() ** 2)).sqrt().item()
            row[f"{m}_rel_err"] = err
            if (m == "flashinfer" and err > 1e-2) or err > 0.2:
                raise ValueError(f"relative error {err:.2e} against the reference")
            methods[m] = lambda run=run: run(fq, fk)
        except Exception as e:  # a peer failing is reported, not fatal
            row[f"{m}_error"] = f"{type(e).__name__}: {e}"[:200]
            log(f"  {row['shape']}: {m} failed: {row[f'{m}_error']}")
    return methods


def run_shape(name, shape, dtype, bw, liger, compiled_apply, log, fi=None):
    import yarn_triton as yt

    T, hq, hk, D, rot, kind, layout, layers = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, pos, nbytes = make_inputs(shape, dtype, gen)
    # cos/sin scale 1: repeated in-place timing keeps values bounded (same cost)
    theta = 500000.0
    base = yt.RopeParams.yarn(rot, theta, 4.0, 8192)
    params = yt.RopeParams(base.inv_freq, rot, 1.0, 1.0, "yarn")
    inv = params.inv_freq_on("cuda")
    row = {"shape": name, "tokens": T, "q_heads": hq, "k_heads": hk, "head_dim": D, "rope_dim": rot,
           "kind": kind, "layout": layout, "layers": layers}
    floor_us = nbytes / bw * 1e6
    row["floor_us"] = floor_us

    # peers' inputs: the [B, H, S, R] views transformers hands them, and their table
    qv, kv, cos, sin = transformers_inputs(q, k, pos, inv)
    table = lambda: hf_cos_sin(pos, inv, 1.0, dtype)  # noqa: E731
    row["table_us"] = graph_us(table)

    if kind == "train":
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        gq, gk = torch.randn_like(q), torch.randn_like(k)
        nbytes *= 2
        row["floor_us"] = floor_us = nbytes / bw * 1e6

        def ours():
            qo, ko = yt.apply_rope(qg, kg, pos, params)
            return torch.autograd.grad((qo, ko), (qg, kg), (gq, gk))

        methods = {"ours": ours}
        if liger is not None:
            # Liger rotates in place: its users hand it fresh projections each step
            qlv, klv = qg.detach().clone().transpose(1, 2), kg.detach().clone().transpose(1, 2)
            qlv.requires_grad_()
            klv.requires_grad_()
            gqv, gkv = gq.transpose(1, 2), gk.transpose(1, 2)

            def liger_train():
                qo, ko = liger(qlv * 1, klv * 1, cos, sin)  # *1: its in-place kernel needs a non-leaf
                return torch.autograd.grad((qo, ko), (qlv, klv), (gqv, gkv))
            methods["liger"] = liger_train

        def eager_train():
            qo, ko = hf_apply(qg.transpose(1, 2), kg.transpose(1, 2), cos, sin)
            return torch.autograd.grad((qo, ko), (qg, kg), (gq.transpose(1, 2), gk.transpose(1, 2)))
        methods["torch"] = eager_train
        for m, fn in methods.items():
            try:
                row[f"{m}_us"] = bench_ms(fn) * 1e3
                row[f"{m}_graph_us"] = graph_us(fn, calls=10)
            except Exception as e:  # a peer failing is reported, not fatal
                row[f"{m}_error"] = f"{type(e).__name__}: {e}"[:200]
                log(f"  {name}: {m} failed: {row[f'{m}_error']}")
        if liger is not None:  # Liger's own kernels alone (its "x * 1" copies excluded)
            # the backward of a forward run outside a capture queues on the legacy stream
            # and cannot be captured: it is timed eagerly (its launch cost is small at 16K)
            try:
                qo, ko = liger(qlv * 1, klv * 1, cos, sin)
                torch.cuda.synchronize()
                row["liger_kernels_us"] = bench_ms(lambda: torch.autograd.grad(
                    (qo, ko), (qlv, klv), (gqv, gkv), retain_graph=True)) * 1e3 + graph_us(
                    lambda: liger(qv, kv, cos, sin), calls=10)
            except Exception as e:  # noqa: BLE001  (reported, not fatal)
                row["liger_kernels_error"] = f"{type(e).__name__}: {e}"[:200]
                log(f"  {name}: liger kernels alone failed: {row['liger_kernels_error']}")
                torch.cuda.synchronize()
        return row

    def ours():
        yt.apply_rope_(q, k, pos, params, layout=layout)

    methods = {"ours": ours,
               "ours_fp32_angles": lambda: yt.apply_rope_(q, k, pos, params, layout=layout, precise_angles=False),
               "torch": lambda: hf_apply(qv, kv, cos, sin),
               "torch_compile": lambda: compiled_apply(qv, kv, cos, sin)}
    if liger is not None and layout == "neox":
        methods["liger"] = lambda: liger(qv, kv, cos, sin)
    if fi is not None and layout in ("neox", "interleaved"):  # no deepseek layout in FlashInfer
        methods.update(flashinfer_methods(fi, q, k, pos, params, theta, layout, row, log))
    if kind == "decode":  # our own error, beside the timings (the low-precision rotation's A/B reads it)
        from yarn_triton.reference import rope_reference

        qc, kc = q.clone(), k.clone()
        yt.apply_rope_(qc, kc, pos, params, layout=layout)
        rq, rk = rope_reference(q.double(), k.double(), pos, params, layout=layout, compute_dtype=torch.float64)
        row["ours_rel_err"] = (((qc.double() - rq).norm() ** 2 + (kc.double() - rk).norm() ** 2)
                               / (rq.norm() ** 2 + rk.norm() ** 2)).sqrt().item()
    tables = {"flashinfer": "flashinfer_cache_us", "flashinfer_fly": None}  # default: table_us
    for m, fn in methods.items():
        try:
            if kind == "decode":
                row[f"{m}_us"] = graph_us(fn)
            else:
                row[f"{m}_us"] = bench_ms(fn) * 1e3
                row[f"{m}_graph_us"] = graph_us(fn)
            row[f"{m}_kernels"] = kernels_launched(fn)
            if m.startswith("flashinfer") and (len(row[f"{m}_kernels"]) != 1
                                               or "flashinfer" not in row[f"{m}_kernels"][0]):
                log(f"  {name}: {m} launched {row[f'{m}_kernels']}, not FlashInfer's one kernel")
            if m not in ("ours", "ours_fp32_angles"):
                table = tables.get(m, "table_us")
                row[f"{m}_e2e_us"] = row[f"{m}_us"] + (row[table] / layers if table else 0.0)
        except Exception as e:
            row[f"{m}_error"] = f"{type(e).__name__}: {e}"[:200]
            log(f"  {name}: {m} failed: {row[f'{m}_error']}")
    if kind == "mla":  # the same bytes in the same strided pattern, moved by a copy
        dq = torch.empty_strided(q.size(), q.stride(), dtype=dtype, device="cuda")
        dk = torch.empty_strided(k.size(), k.stride(), dtype=dtype, device="cuda")
        row["strided_copy_us"] = graph_us(lambda: (dq.copy_(q), dk.copy_(k)))
    if kind == "decode":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ours()
        torch.cuda.synchronize()
        row["ours_extra_bytes"] = torch.cuda.max_memory_allocated() - before
    return row


def time_in_graphs(row, methods, log) -> None:
    """Device time of each method in a CUDA graph, its kernels, and for peers the time with
    the cos/sin table spread over the layers; a failing peer is reported, not fatal."""
    for m, fn in methods.items():
        try:
            row[f"{m}_us"] = graph_us(fn)
            row[f"{m}_kernels"] = kernels_launched(fn)
            if m != "ours":
                row[f"{m}_e2e_us"] = row[f"{m}_us"] + row["table_us"] / row["layers"]
        except Exception as e:
            row[f"{m}_error"] = f"{type(e).__name__}: {e}"[:200]
            log(f"  {row['shape']}: {m} failed: {row[f'{m}_error']}")


def hf_rms_norm(x, weight, eps):
    """transformers' Qwen3RMSNorm forward."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def run_qknorm_shape(name, T, dtype, bw, liger, liger_norm, compiled_qk, log):
    """Fused norm + rope against the two ops back to back, each as its users run them:
    transformers (q_norm/k_norm on the [B, S, H, D] projection view, transpose, rotate),
    compiled, and Liger's RMSNorm then Liger's rope."""
    import yarn_triton as yt

    hq, hk, D = 32, 8, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, T, hq, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(1, T, hk, D, device="cuda", dtype=dtype, generator=gen)
    pos = torch.randint(0, 128 * 1024, (1, T), device="cuda", generator=gen)
    qw = torch.rand(D, device="cuda", generator=gen).to(dtype) + 0.5
    kw = torch.rand(D, device="cuda", generator=gen).to(dtype) + 0.5
    base = yt.RopeParams.yarn(D, 1e6, 4.0, 32768)
    params = yt.RopeParams(base.inv_freq, D, 1.0, 1.0, "yarn")
    cos, sin = hf_cos_sin(pos, params.inv_freq_on("cuda"), 1.0, dtype)
    nbytes = 2 * T * (hq + hk) * D * q.element_size()
    row = {"shape": name, "tokens": T, "q_heads": hq, "k_heads": hk, "head_dim": D, "rope_dim": D,
           "kind": "qknorm", "layout": "neox", "layers": 36, "floor_us": nbytes / bw * 1e6}
    row["table_us"] = graph_us(lambda: hf_cos_sin(pos, params.inv_freq_on("cuda"), 1.0, dtype))

    def torch_two_ops():
        return hf_apply(hf_rms_norm(q, qw, 1e-6).transpose(1, 2), hf_rms_norm(k, kw, 1e-6).transpose(1, 2), cos, sin)

    methods = {
        "ours": lambda: yt.apply_qk_norm_rope_(q, k, pos, params, qw, kw),
        "torch": torch_two_ops,
        "torch_compile": lambda: compiled_qk(q, k, qw, kw, cos, sin),
    }
    if liger is not None and liger_norm is not None:
        lq, lk = liger_norm(D, qw), liger_norm(D, kw)

        def liger_two_ops():  # its RMSNorm on the projection view, then its rope on the transposed view
            return liger(lq(q).transpose(1, 2), lk(k).transpose(1, 2), cos, sin)
        methods["liger"] = liger_two_ops
    time_in_graphs(row, methods, log)
    return row


_STREAMS: dict = {}


def mrope_tables(pos3, inv_freq, section, interleaved, dtype):
    """transformers' M-RoPE rotary forward: per-stream angles, recomposed per pair, as
    ``[B, S, R]`` cos/sin (what its attention hands ``apply_rotary_pos_emb``), plus the
    per-stream ``[3, B, S, R]`` tables Liger's sectioned kernel takes."""
    from yarn_triton.reference import mrope_stream_of_pairs

    freqs = pos3[..., None].float() * inv_freq  # [3, B, S, half]
    stream = _STREAMS.get((inv_freq.numel(), section, interleaved))
    if stream is None:  # built once, outside any graph capture
        stream = mrope_stream_of_pairs(inv_freq.numel(), section, interleaved).to(pos3.device)
        _STREAMS[(inv_freq.numel(), section, interleaved)] = stream
    picked = freqs.gather(0, stream.expand(1, *freqs.shape[1:3], -1)).squeeze(0)
    emb = torch.cat((picked, picked), -1)
    emb3 = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype), emb3.cos().to(dtype), emb3.sin().to(dtype)


def hf_apply_partial(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with partial rotary (Qwen3.5): rotate the first
    ``cos.shape[-1]`` channels, keep the rest."""
    rot = cos.shape[-1]
    if rot == q.shape[-1]:
        return hf_apply(q, k, cos, sin)
    (qr, qp), (kr, kp) = q.split((rot, q.shape[-1] - rot), -1), k.split((rot, k.shape[-1] - rot), -1)
    qo, ko = hf_apply(qr, kr, cos, sin)
    return torch.cat((qo, qp), -1), torch.cat((ko, kp), -1)


def run_mrope_shape(model, kind, dtype, bw, compiled_partial, log):
    """Our in-place M-RoPE against transformers (eager, compiled) and Liger's sectioned kernel."""
    import yarn_triton as yt

    hq, hk, D, rot, section, interleaved = MROPE_MODELS[model]
    T = MROPE_TOKENS[kind]
    q, k, pos3, params, nbytes = make_mrope_inputs(model, T, dtype, torch.Generator(device="cuda").manual_seed(0))
    inv = params.inv_freq_on("cuda")
    cos, sin, cos3, sin3 = mrope_tables(pos3, inv, section, interleaved, dtype)
    row = {"shape": f"{model}-{kind}", "tokens": T, "q_heads": hq, "k_heads": hk, "head_dim": D, "rope_dim": rot,
           "kind": "mrope-decode" if kind != "prefill" else "mrope", "section": list(section),
           "interleaved": interleaved, "layers": 32, "floor_us": nbytes / bw * 1e6}
    row["table_us"] = graph_us(lambda: mrope_tables(pos3, inv, section, interleaved, dtype))
    qv, kv = q.transpose(1, 2), k.transpose(1, 2)
    methods = {
        "ours": lambda: yt.apply_rope_(q, k, pos3, params),
        "torch": lambda: hf_apply_partial(qv, kv, cos, sin),
        "torch_compile": lambda: compiled_partial(qv, kv, cos, sin),
    }
    if not interleaved and rot == D:
        try:
            from liger_kernel.transformers.qwen2vl_mrope import liger_multimodal_rotary_pos_emb as lm
            methods["liger"] = lambda: lm(qv, kv, cos3, sin3, list(section))
        except Exception as e:
            log(f"Liger M-RoPE not available ({type(e).__name__})")
    time_in_graphs(row, methods, log)
    # memory a cos/sin-cache peer holds for this model's context: vLLM sizes its M-RoPE cache
    # at 4x the context (video positions), one row of rope_dim values (cos and sin) per position
    row["cache_peer_bytes"] = 4 * MROPE_CONTEXT[model] * rot * q.element_size()
    return row


def decode_host_inputs(device, dtype) -> types.SimpleNamespace:
    """The 1-token decode calls whose host cost is measured (here and by
    ``profile_host.py``): Llama-like params ``p`` with q/k ``[1, 1, 32|8, 128]`` and
    positions ``pos``, their autograd leaves ``qg``/``kg``; DeepSeek MLA views ``qm``/``km``
    with params ``pm``; a packed batch of 4 one-token sequences ``qp``/``kp``/``cu``."""
    import yarn_triton as yt

    p = yt.RopeParams.yarn(128, 500000.0, 4.0, 8192)
    q = torch.randn(1, 1, 32, 128, device=device, dtype=dtype)
    k = torch.randn(1, 1, 8, 128, device=device, dtype=dtype)
    return types.SimpleNamespace(
        p=p, q=q, k=k, pos=torch.zeros(1, 1, dtype=torch.long, device=device),
        qg=q.clone().requires_grad_(), kg=k.clone().requires_grad_(),
        qm=torch.randn(1, 1, 128, 192, device=device, dtype=dtype)[..., 128:],
        km=torch.randn(1, 1, 576, device=device, dtype=dtype)[..., 512:].unsqueeze(2),
        pm=yt.RopeParams.yarn(64, 10000.0, 40.0, 4096, mscale=1.0, mscale_all_dim=1.0),
        qp=torch.randn(4, 32, 128, device=device, dtype=dtype), kp=torch.randn(4, 8, 128, device=device, dtype=dtype),
        cu=torch.tensor([0, 1, 2, 3, 4], device=device, dtype=torch.int32),
    )


def host_costs(dtype, liger) -> dict:
    """Eager wall time per call, 1-token decode (32/8 heads, d128), every method."""
    import yarn_triton as yt
    from yarn_triton.op import native_node

    x = decode_host_inputs("cuda", dtype)
    p, q, k, pos, qg, kg = x.p, x.q, x.k, x.pos, x.qg, x.kg
    qm, km, pm, qp, kp, cu = x.qm, x.km, x.pm, x.qp, x.kp, x.cu
    qv, kv, cos, sin = transformers_inputs(q, k, pos, p.inv_freq_on("cuda"))
    offs = torch.tensor([100, 200, 300, 400], device="cuda")
    qb, kb = torch.randn(4, 1, 32, 128, device="cuda", dtype=dtype), torch.randn(4, 1, 8, 128, device="cuda", dtype=dtype)
    rows = {
        "trivial torch op (q.add_(0))": lambda: q.add_(0),
        "ours apply_rope_ (positions)": lambda: yt.apply_rope_(q, k, pos, p),
        "ours apply_rope_ (offsets=int)": lambda: yt.apply_rope_(q, k, None, p, offsets=4096),
        "ours apply_rope_ (offsets tensor [4])": lambda: yt.apply_rope_(qb, kb, None, p, offsets=offs),
        "ours apply_rope_ (cu_seqlens, packed)": lambda: yt.apply_rope_(qp, kp, None, p, cu_seqlens=cu),
        "ours apply_rope_ (MLA views, deepseek)": lambda: yt.apply_rope_(qm, km, pos, pm, layout="deepseek"),
        "ours apply_rope (autograd)": lambda: yt.apply_rope(qg, kg, pos, p),
        "torch (transformers apply_rotary_pos_emb)": lambda: hf_apply(qv, kv, cos, sin),
    }
    # torch.compile(fullgraph) of a function calling our ops: the generated code launches
    # the Triton kernel itself (triton_op), so this is the compiled per-call cost
    compiled_ = torch.compile(lambda a, b, c: yt.apply_rope_(a, b, c, p), fullgraph=True)
    compiled = torch.compile(lambda a, b, c: yt.apply_rope(a, b, c, p), fullgraph=True)
    rows["ours apply_rope_ in torch.compile (fullgraph)"] = lambda: compiled_(q, k, pos)
    rows["ours apply_rope in torch.compile (fullgraph)"] = lambda: compiled(qg, kg, pos)
    if liger is not None:
        rows["liger"] = lambda: liger(qv, kv, cos, sin)
    # the eager autograd call's C++ node is built in the background by the first call that
    # can use it (about 10 s, then cached): waited for, so that the rows time the steady state
    native_node.wait()
    for fn in rows.values():  # compile, tune, warm up
        fn()
    # rounds over all rows, median per row: one slow stretch of the host hits every row once
    rounds = [{name: host_us(fn, 600) for name, fn in rows.items()} for _ in range(5)]
    out = {name: statistics.median(r[name] for r in rounds) for name in rows}
    # the same calls replayed in a CUDA graph: device time per call (no host cost at all)
    out["device us in a CUDA graph: ours apply_rope_"] = graph_us(rows["ours apply_rope_ (positions)"])
    out["device us in a CUDA graph: ours in torch.compile"] = graph_us(
        rows["ours apply_rope_ in torch.compile (fullgraph)"])
    return out


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
def _fmt(r, key):
    return f"{r[key]:.2f}" if key in r else "-"


def print_tables(meta, rows, host):
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['dtype']} | "
          f"copy {meta['copy_tbps']:.2f} TB/s | empty Triton kernel in a graph {meta['empty_kernel_us']:.2f} us")
    print("device time, us (decode: per call in a CUDA graph; e2e = kernel + cos/sin table / layers)")
    print(f"{'shape':20s} {'floor':>7s} {'ours':>7s} {'x floor':>7s} {'liger':>7s} {'liger e2e':>9s} "
          f"{'torch':>7s} {'compile':>7s} {'compile e2e':>11s} {'fp32 ang':>8s} {'fi cache':>8s} {'fi e2e':>7s} "
          f"{'fi fly':>7s}")
    for r in rows:
        ours = r.get("ours_us", float("nan"))
        print(f"{r['shape']:20s} {r['floor_us']:7.2f} {ours:7.2f} {ours / r['floor_us']:7.3f} "
              f"{_fmt(r, 'liger_us'):>7s} {_fmt(r, 'liger_e2e_us'):>9s} {_fmt(r, 'torch_us'):>7s} "
              f"{_fmt(r, 'torch_compile_us'):>7s} {_fmt(r, 'torch_compile_e2e_us'):>11s} "
              f"{_fmt(r, 'ours_fp32_angles_us'):>8s} {_fmt(r, 'flashinfer_us'):>8s} {_fmt(r, 'flashinfer_e2e_us'):>7s} "
              f"{_fmt(r, 'flashinfer_fly_us'):>7s}")
    print("host: eager wall time per call, us (1-token decode unless named)")
    for name, us in host.items():
        print(f"  {name:54s} {us:7.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default="bench_results.json", help="JSON results path")
    ap.add_argument("--plot", default="", help="PNG path for GB/s vs tokens (needs matplotlib)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tokens sweep for the plot")
    ap.add_argument("--no-qknorm", dest="qknorm", action="store_false", help="skip the QK-norm + rope rows")
    ap.add_argument("--no-mrope", dest="mrope", action="store_false", help="skip the M-RoPE rows")
    ap.add_argument("--no-host", dest="host", action="store_false", help="skip the host-cost table")
    ap.add_argument("--no-flashinfer", dest="flashinfer", action="store_false",
                    help="skip the FlashInfer columns (built from .flashinfer/include: bench/flashinfer/fetch_headers.sh)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the tokens sweep and its plot (e.g. a second device call): no rows, no host table")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        return cpu_check()

    import triton

    from yarn_triton.kernels import launcher

    dtype = getattr(torch, args.dtype)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    bw = copy_bandwidth()
    meta = {"device": torch.cuda.get_device_name(), "copy_tbps": bw / 1e12, "torch": torch.__version__,
            "triton": triton.__version__, "dtype": args.dtype, "empty_kernel_us": empty_kernel_us(),
            "low_precision_rotation": launcher.LOW_PRECISION_ROTATION}
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb as liger
    except Exception as e:
        liger = None
        log(f"Liger-Kernel not available ({type(e).__name__}): its columns are skipped")
    fi = None
    if args.flashinfer:
        try:
            fi = load_flashinfer()
            fi.ext = fi.load()
        except Exception as e:  # no headers, no nvcc, a build error: its columns are skipped
            fi = None
            log(f"FlashInfer binding not available ({type(e).__name__}: {str(e)[-300:]}): its columns are skipped")
    compiled_apply = torch.compile(hf_apply)

    def qk_two_ops(q, k, qw, kw, cos, sin):
        return hf_apply(hf_rms_norm(q, qw, 1e-6).transpose(1, 2), hf_rms_norm(k, kw, 1e-6).transpose(1, 2), cos, sin)
    compiled_qk = torch.compile(qk_two_ops)
    liger_norm = None
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm

        def liger_norm(dim, weight):
            m = LigerRMSNorm(dim, eps=1e-6, in_place=False).to("cuda", weight.dtype)
            with torch.no_grad():
                m.weight.copy_(weight)
            return m
    except Exception as e:
        log(f"Liger RMSNorm not available ({type(e).__name__})")

    from yarn_triton.kernels.launcher import tuned_configs

    def with_picks(run, *a):
        """``run(*a)``'s row, plus the launch shapes the tuner picked for it (tokens per
        program, heads per step, warps, stages, head groups): what a rerun should compare."""
        before = set(tuned_configs())
        row = run(*a)
        row["ours_tuned"] = [list(c) for key, c in tuned_configs().items() if key not in before]
        return row

    if args.sweep_only:
        args.shapes, args.qknorm, args.mrope, args.host, args.no_sweep = "", False, False, False, False
    rows = []
    for name in filter(None, args.shapes.split(",")):
        log(f"running {name} ...")
        rows.append(with_picks(run_shape, name, SHAPES[name], dtype, bw, liger, compiled_apply, log, fi))
        with open(args.out, "w") as f:  # as we go: a killed run still leaves its rows
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    host = host_costs(dtype, liger) if args.host else {}

    def save(sweep=()):
        with open(args.out, "w") as f:  # as we go: a killed run still leaves its rows
            json.dump({"meta": meta, "rows": rows, "host_us": host, "sweep": list(sweep)}, f, indent=1)

    save()
    if args.qknorm:
        for name, T in QKNORM_SHAPES.items():
            log(f"running {name} ...")
            rows.append(with_picks(run_qknorm_shape, name, T, dtype, bw, liger, liger_norm, compiled_qk, log))
            save()
    compiled_partial = torch.compile(hf_apply_partial)
    if args.mrope:
        for model in MROPE_MODELS:
            for kind in MROPE_TOKENS:
                if model == "qwen2-vl-sect" and kind not in ("prefill", "decode-64"):
                    continue
                log(f"running {model}-{kind} ...")
                rows.append(with_picks(run_mrope_shape, model, kind, dtype, bw, compiled_partial, log))
                save()

    sweep = []
    if not args.no_sweep:
        for T in SWEEP_TOKENS:
            r = run_shape(f"sweep-{T}", (T, 32, 8, 128, 128, "prefill", "neox", 32), dtype, bw, liger,
                          compiled_apply, log, fi)
            sweep.append(r)
    save(sweep)
    if args.plot and sweep:
        plot(sweep, meta, args.plot, log)
    print_tables(meta, rows, host)
    return 0


def plot(sweep, meta, path, log):
    """The sweep's GB/s plot (drawn by ``bench/report.py``, which can redraw it from the JSON)."""
    from report import plot_sweep

    if not plot_sweep(sweep, meta, path):
        log("matplotlib not installed: no plot")


if __name__ == "__main__":
    sys.exit(main())
