"""yarn-triton benchmark: rope + paged KV-cache write (issue #24), fused against its peers.

    python bench/bench_cache.py --out results/cache.json     # every row; JSON + a CSV beside it
    python bench/bench_cache.py --rows decode-64 --models llama3-8b --caches fp8 --out x.json
    python bench/bench_cache.py --check-only                  # correctness of every column, no timing

Needs, for its peers: Liger-Kernel (``pip install liger-kernel``; the device takes its wheel from
``.whl``) and FlashInfer's headers at ``.flashinfer/include`` (``bench/flashinfer/fetch_headers.sh``;
the two bindings build on first use, about a minute). A full run took 180 s on an H100.

What one call does, per model: rotate q and k (MLA: q_pe and k_pe) and write k, v (MLA:
kv_c, k_pe) to a paged cache at ``slot = block_table[seq][pos // 16] * 16 + pos % 16``.

Rows (``ROWS``). Decode at 1, 8, 64 and 256 tokens: that many sequences, one new token each,
at random positions below 128K. Prefill at 8K tokens: ONE sequence of 8192 tokens at positions
0..8191 (``--prefill-seqs N`` splits it into N sequences of 8192/N, each from position 0).
Block tables (``make_paging``): the cache has ``NUM_BLOCKS`` = 16384 blocks of 16 tokens; each
sequence's table row is distinct random blocks of it (8192 wide at 128K positions), the blocks
written in the call are distinct across sequences, and rows may share blocks the call does not
write (256 disjoint rows of 128K would need 2M blocks, 64 GiB of Llama cache).

Models (``MODELS``). Llama-3-8B: q ``[T, 32, 128]``, k, v ``[T, 8, 128]`` (separate contiguous
projections), neox layout, YaRN params as ``bench_rope.py`` builds them (inv_freq of YaRN factor 4
over 8192 at theta 500000, cos/sin scale 1 so repeated in-place timing stays bounded);
caches ``[16384, 16, 8, 128]`` each. DeepSeek-V3 MLA: q ``[T, 128, 192]``, q_pe = its last 64
(a strided view), kv ``[T, 576]`` with kv_c = ``kv[:, :512]``, k_pe = ``kv[:, 512:]`` (views),
the cache ``[16384, 16, 576]``, DeepSeek-V3's YaRN (64, theta 1e4, factor 40 over 4096, mscale 1
= mscale_all_dim), layout "interleaved" (GPT-J pairs: what vLLM and FlashInfer run for DeepSeek;
FlashInfer has no "deepseek" layout). MLA FP8 rows take q ``[T, 128, 576]`` instead (the
absorbed decode q, 512 + 64): FlashInfer's fused MLA function takes ONE no-rope width for q_nope
and kv_c, so it cannot write a 192-wide q (``--mla-fp8-q-nope 128`` keeps 192 and drops it).

Caches: bf16 (the model's dtype) and FP8 e4m3fn with float32 one-element scale tensors (k and v
one scale, ``KV_SCALE``, since FlashInfer's fused function has one; q ``Q_SCALE``); quant(x) =
``clamp(x / scale, -448, 448)`` rounded to e4m3 (FlashInfer: ``x * (1 / scale)``, saturated).

Columns, each checked against the float64 reference (``rope_reference`` then the cache writes in
torch) before it is timed, its entries at the slots compared and every other cache byte
verified untouched:

* ``ours``: ``apply_rope_and_cache_`` / ``apply_mla_rope_and_cache_``, one launch. In FP8 rows it
  also writes q to an FP8 ``q_out`` (``q_scale``), as FlashInfer's fused function does (q is then
  left as it was); MLA: ``q_nope`` and the rotated ``q_pe`` both, through the op's ``q_nope``.
  Skipped, with a message, while yarn_triton lacks the op.
* ``unfused``: ``yarn_triton.apply_rope_`` (q, k in place), then ``cache_store`` (``cache_store.py``): k, v
  to the cache at the slots (FP8: quantized), and in FP8 rows q to ``q_out``. Two launches.
* ``liger``: Liger-Kernel's ``LigerRopeFunction`` on the ``[B, H, S, D]`` views transformers
  hands it (``[B, S, H, D]`` storage, transposed) with the cos/sin table transformers builds
  (``liger_table_us``; ``liger_e2e_us`` adds it spread over the model's layers), then the same
  store. Llama: in place, two launches. MLA: its kernel is neox only (checked against the neox
  reference), and it copies the strided q_pe and k_pe views (``.contiguous()``): its launches
  include those copies, which its users pay for; the store reads its outputs.
* ``flashinfer``: our binding (``bench/flashinfer/``) of FlashInfer 0.7.4. FP8: its fused
  ``RopeQuantizeAppendPagedKVCache`` / ``RopeQuantizeAppendPagedMLACache`` (one launch; rope
  from the fp32 cos/sin table, q to FP8 ``q_out``, k, v / kv_c, k_pe to the FP8 cache). bf16:
  ``BatchQKApplyRotaryPosIdsCosSinCache`` (in place) then ``AppendPagedKVCache`` /
  ``AppendPagedKVMlaCache`` (two launches). Its table is the fp32 ``[131072, R]`` YaRN cos/sin
  cache its users (vLLM, SGLang) build once per model (``fi_table_bytes``: 64 MiB Llama,
  32 MiB MLA); paging through ``indptr = b * width``, ``indices = block_table.flatten()``,
  ``batch_indices``, ``positions`` (int32), rope ids int64.
* ``floor``: bytes moved over the device-to-device copy bandwidth measured in the same run:
  q's rope part read and written (FP8 rows: all of q read, ``q_out`` written, 1 byte), k and v
  (kv_c and k_pe) read, the cache entries written (``floor_parts``). Slots, positions and
  tables are not counted.

Timing: device time per call, 20 calls captured in one CUDA graph and replayed
(``timing.graph_us``), every row; the profiler lists each column's kernels (``*_kernels``)
and a count other than the expected one is logged. Ratios: ``*_x_floor`` (time / floor),
``fuse_gain`` (unfused / ours), ``fi_over_ours`` (flashinfer / ours).

With no GPU it says so, runs the correctness checks of the columns that run on a CPU (the store
kernel and yarn_triton through Triton's interpreter) on small shapes, and exits 0 if they pass.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import types
import zlib

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
# the unfused columns' store kernel, its page size and FP8 format (q_heads_per_program: for the tests)
from cache_store import BLOCK_SIZE, FP8, FP8_MAX, cache_store, q_heads_per_program  # noqa: E402,F401

MAX_POS = 128 * 1024
NUM_BLOCKS = 16384
KV_SCALE = 1.0 / 32  # powers of two: x / s and FlashInfer's x * (1 / s) round alike
Q_SCALE = 1.0 / 16
MLA_LAYOUT = "interleaved"

MODELS = {
    "llama3-8b": {"kind": "gqa", "q_heads": 32, "kv_heads": 8, "head_dim": 128, "rope_dim": 128,
                  "layout": "neox", "layers": 32},
    "deepseek-v3": {"kind": "mla", "q_heads": 128, "q_nope": 128, "rope_dim": 64, "kv_lora": 512,
                    "layout": MLA_LAYOUT, "layers": 61},
}
# name: (sequences, new tokens per sequence, decode)
ROWS = {
    "decode-1": (1, 1, True),
    "decode-8": (8, 1, True),
    "decode-64": (64, 1, True),
    "decode-256": (256, 1, True),
    "prefill-8k": (1, 8192, False),
}
CACHES = ("bf16", "fp8")
METHODS = ("ours", "unfused", "liger", "flashinfer")
TOL = {"bf16": 1e-2, "fp8": 6e-2}  # relative error bound of a column vs the reference (FP8: vs the
# reference quantized; a bf16-rounded rope then quantized flips ~3% of the e4m3 steps, 1.7e-2)


# ------------------------------------------------------------------------------------------
# Pure Python: paging, bytes
# ------------------------------------------------------------------------------------------
def make_paging(starts, tokens_per_seq: int, num_blocks: int = NUM_BLOCKS, block_size: int = BLOCK_SIZE,
                gen: torch.Generator = None) -> types.SimpleNamespace:
    """Block tables and slots for ``len(starts)`` sequences of ``tokens_per_seq`` new tokens,
    sequence ``b``'s at positions ``starts[b] ..``, on the CPU.

    Each row of ``block_table`` (``[B, width]``, ``width`` logical blocks up to the last
    position) is distinct random blocks of the ``num_blocks`` cache; the blocks the new tokens
    land in are distinct across sequences (so no two tokens share a slot); the other entries may
    repeat across rows. Returns ``positions`` (int64 ``[T]``, token-major: sequence 0's tokens
    first), ``seq`` (its sequence), ``block_table``, ``slots`` (int64, ``block_table[seq][pos //
    bs] * bs + pos % bs``), and FlashInfer's paging of the same: ``indptr`` (``b * width``),
    ``indices`` (the table flattened), ``batch_indices`` and ``positions_i32`` (int32)."""
    starts = torch.as_tensor(starts, dtype=torch.int64).reshape(-1)
    nseq, n = starts.numel(), int(tokens_per_seq)
    if nseq < 1 or n < 1 or bool((starts < 0).any()):
        raise ValueError("need at least one sequence of at least one token at positions >= 0")
    positions = (starts[:, None] + torch.arange(n)).reshape(-1)
    seq = torch.arange(nseq).repeat_interleave(n)
    width = int((starts.max() + n - 1) // block_size + 1)
    first, last = starts // block_size, (starts + n - 1) // block_size
    n_new = last - first + 1
    if width > num_blocks or int(n_new.sum()) > num_blocks:
        raise ValueError(f"a cache of {num_blocks} blocks cannot hold these tables")
    written = torch.randperm(num_blocks, generator=gen)[: int(n_new.sum())]
    table = torch.empty(nseq, width, dtype=torch.int64)
    o = 0
    for b in range(nseq):
        mine = written[o: o + int(n_new[b])]
        o += int(n_new[b])
        taken = torch.zeros(num_blocks, dtype=torch.bool)
        taken[mine] = True
        perm = torch.randperm(num_blocks, generator=gen)
        new = torch.zeros(width, dtype=torch.bool)
        new[int(first[b]): int(last[b]) + 1] = True
        table[b, new] = mine
        table[b, ~new] = perm[~taken[perm]][: width - int(n_new[b])]
    slots = table[seq, positions // block_size] * block_size + positions % block_size
    return types.SimpleNamespace(
        positions=positions, seq=seq, block_table=table.to(torch.int32), slots=slots, width=width,
        indptr=(torch.arange(nseq + 1) * width).to(torch.int32), indices=table.reshape(-1).to(torch.int32),
        batch_indices=seq.to(torch.int32), positions_i32=positions.to(torch.int32))


def row_paging(row: str, gen: torch.Generator, prefill_seqs: int = 1, max_pos: int = MAX_POS,
               num_blocks: int = NUM_BLOCKS, block_size: int = BLOCK_SIZE) -> types.SimpleNamespace:
    """The paging of a ``ROWS`` row: decode, random positions below ``max_pos``; prefill,
    ``prefill_seqs`` sequences sharing its tokens, each from position 0."""
    nseq, n, decode = ROWS[row]
    if decode:
        starts = torch.randint(0, max_pos, (nseq,), generator=gen)
    else:
        if n % prefill_seqs:
            raise ValueError(f"--prefill-seqs {prefill_seqs} does not divide {n} tokens")
        nseq, n = prefill_seqs, n // prefill_seqs
        starts = torch.zeros(nseq, dtype=torch.int64)
    return make_paging(starts, n, num_blocks, block_size, gen)


def mla_q_width(cache: str, fp8_q_nope: int = 512) -> int:
    """Head width of MLA q in a row: 128 + 64 (bf16), FlashInfer's absorbed 512 + 64 (FP8)."""
    m = MODELS["deepseek-v3"]
    return (fp8_q_nope if cache == "fp8" else m["q_nope"]) + m["rope_dim"]


def floor_parts(model: str, tokens: int, cache: str, q_width: int = None) -> dict:
    """Bytes one call must move (bf16 inputs): q (its rope part read and written; FP8 rows: all
    of q read and the 1-byte ``q_out`` written), k and v read (MLA: kv_c and k_pe), the cache
    entries written (1 byte each in FP8)."""
    m, el, c = MODELS[model], 2, (1 if cache == "fp8" else 2)
    if m["kind"] == "gqa":
        hq, hk, d, r = m["q_heads"], m["kv_heads"], m["head_dim"], m["rope_dim"]
        q = hq * d * (el + 1) if cache == "fp8" else 2 * hq * r * el
        kv_in, kv_out = 2 * hk * d * el, 2 * hk * d * c
    else:
        h, r, lat = m["q_heads"], m["rope_dim"], m["kv_lora"]
        w = q_width or mla_q_width(cache)
        q = h * w * (el + 1) if cache == "fp8" else 2 * h * r * el
        kv_in, kv_out = (lat + r) * el, (lat + r) * c
    return {"q": tokens * q, "kv_read": tokens * kv_in, "cache_write": tokens * kv_out}


def floor_bytes(model: str, tokens: int, cache: str, q_width: int = None) -> int:
    return sum(floor_parts(model, tokens, cache, q_width).values())


def fi_table_bytes(model: str, max_pos: int = MAX_POS) -> int:
    """FlashInfer's fp32 ``[max_pos, R]`` cos/sin table."""
    return max_pos * MODELS[model]["rope_dim"] * 4


def expected_kernels(method: str, model: str, cache: str):
    """Kernels one call of a column launches (None: not fixed; Liger on MLA adds the copies
    of its strided inputs, one per input with more than one token)."""
    mla = MODELS[model]["kind"] == "mla"
    if method == "liger" and mla:
        return None
    return {"ours": 1, "unfused": 2, "liger": 2,
            "flashinfer": 1 if cache == "fp8" else 2}[method]


# ------------------------------------------------------------------------------------------
# One row: tensors, columns, checks
# ------------------------------------------------------------------------------------------
def model_params(model: str):
    import yarn_triton as yt

    if model == "llama3-8b":  # as bench_rope.py builds them: cos/sin scale 1
        base = yt.RopeParams.yarn(128, 500000.0, 4.0, 8192)
        return yt.RopeParams(base.inv_freq, 128, 1.0, 1.0, "yarn")
    base = yt.RopeParams.yarn(64, 10000.0, 40.0, 4096, 32, 1, 1.0, 1.0)  # DeepSeek-V3 (mscale ratio 1)
    return yt.RopeParams(base.inv_freq, 64, 1.0, 1.0, "yarn")


class Caches:
    """The paged caches of one (model, cache dtype), shared by its rows."""

    def __init__(self, model, cache, device, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE):
        m = MODELS[model]
        dt = FP8 if cache == "fp8" else torch.bfloat16
        if m["kind"] == "gqa":
            shape = (num_blocks, block_size, m["kv_heads"], m["head_dim"])
            self.k = torch.empty(shape, device=device, dtype=dt)
            self.v = torch.empty(shape, device=device, dtype=dt)
            self.all = [self.k, self.v]
        else:
            lat = m["kv_lora"]
            self.kv = torch.empty(num_blocks, block_size, lat + m["rope_dim"], device=device, dtype=dt)
            self.ckv, self.kpe = self.kv[..., :lat], self.kv[..., lat:]
            self.all = [self.kv]


class Row:
    """Tensors of one (model, cache dtype, row) and its columns: ``methods()`` maps a name to a
    function doing one call and returning the tensor holding its q result (``q_out`` in FP8
    rows, else the rotated rope part of q)."""

    def __init__(self, model, cache, row, caches, paging, device, gen, fp8_q_nope=512):
        import yarn_triton as yt

        self.model, self.cache, self.row, self.m = model, cache, row, MODELS[model]
        self.caches, self.device = caches, device
        self.fp8 = cache == "fp8"
        self.params = model_params(model)
        self.layout = self.m["layout"]
        p = paging
        self.nseq = int(p.indptr.numel() - 1)
        self.T = T = int(p.positions.numel())
        self.per_seq = T // self.nseq
        to = dict(device=device)
        self.pos = p.positions.to(**to)
        self.slots = p.slots.to(**to)
        self.fi_paging = [p.indices.to(**to), p.indptr.to(**to), p.batch_indices.to(**to), p.positions_i32.to(**to)]
        bf = torch.bfloat16
        r = self.m["rope_dim"]
        self.kv_scale = torch.full((1,), KV_SCALE, device=device)
        self.q_scale = torch.full((1,), Q_SCALE, device=device)
        if self.m["kind"] == "gqa":
            hq, hk, d = self.m["q_heads"], self.m["kv_heads"], self.m["head_dim"]
            self.q = torch.randn(T, hq, d, device=device, dtype=bf, generator=gen)
            self.k = torch.randn(T, hk, d, device=device, dtype=bf, generator=gen)
            self.v = torch.randn(T, hk, d, device=device, dtype=bf, generator=gen)
            self.storages = [self.q, self.k, self.v]
            self.q_rope, self.k_rope, self.q_width = self.q, self.k, d
        else:
            h, lat = self.m["q_heads"], self.m["kv_lora"]
            self.q_width = w = mla_q_width(cache, fp8_q_nope)
            self.q = torch.randn(T, h, w, device=device, dtype=bf, generator=gen)
            self.q_nope, self.q_pe = self.q[..., : w - r], self.q[..., w - r:]
            self.kvp = torch.randn(T, lat + r, device=device, dtype=bf, generator=gen)
            self.kv_c, self.k_pe = self.kvp[:, :lat], self.kvp[:, lat:]
            self.k_pe3 = self.k_pe.unsqueeze(1)
            self.storages = [self.q, self.kvp]
            self.q_rope, self.k_rope = self.q_pe, self.k_pe3
        self.pristine = [s.clone() for s in self.storages]
        self.q_out = torch.zeros(self.q.shape, device=device, dtype=FP8) if self.fp8 else None
        self.yt = yt

    def restore(self):
        for s, p in zip(self.storages, self.pristine):
            s.copy_(p)

    # -- the store of the unfused columns ---------------------------------------------------
    def store(self, k_rot, q_rot):
        """``k_rot`` ([T, Hk, D] / MLA [T, 1, R]) and v (MLA kv_c) to the cache; in FP8 rows q
        (its pass-through part from q, the rope part from ``q_rot``) to ``q_out``."""
        c, sc = self.caches, ([self.kv_scale, self.kv_scale] if self.fp8 else None)
        if self.m["kind"] == "gqa":
            kv = [(k_rot, c.k), (self.v, c.v)]
            qp = [(q_rot, self.q_out)] if self.fp8 else []
        else:
            kv = [(self.kv_c.unsqueeze(1), c.ckv.unsqueeze(2)), (k_rot, c.kpe.unsqueeze(2))]
            w, r = self.q_width, self.m["rope_dim"]
            qp = [(self.q_nope, self.q_out[..., : w - r]), (q_rot, self.q_out[..., w - r:])] if self.fp8 else []
        cache_store(self.slots, kv, sc, qp, self.q_scale if self.fp8 else None)

    def moves(self):
        """The fused column's bytes moved in one launch of the plain store kernel, no
        arithmetic: q's rope part read and written back (FP8: all of q to ``q_out``), k and v
        (MLA: kv_c and k_pe) to the cache. Not a peer: evidence of what the access pattern
        costs beyond the floor's byte count (the floor does not know how the bytes lie)."""
        c, sc = self.caches, ([self.kv_scale, self.kv_scale] if self.fp8 else None)
        if self.m["kind"] == "gqa":
            kv = [(self.k, c.k), (self.v, c.v)]
            qp = [(self.q, self.q_out if self.fp8 else self.q)]
        else:
            kv = [(self.kv_c.unsqueeze(1), c.ckv.unsqueeze(2)), (self.k_pe3, c.kpe.unsqueeze(2))]
            w, r = self.q_width, self.m["rope_dim"]
            qp = ([(self.q_nope, self.q_out[..., : w - r]), (self.q_pe, self.q_out[..., w - r:])] if self.fp8
                  else [(self.q_pe, self.q_pe)])
        cache_store(self.slots, kv, sc, qp, self.q_scale if self.fp8 else None)

    # -- columns ------------------------------------------------------------------------------
    def methods(self, liger=None, fi=None) -> dict:
        """name -> (function, layout of its reference, note)."""
        yt, out = self.yt, {}
        gqa, fp8 = self.m["kind"] == "gqa", self.fp8
        qres = (lambda: self.q_out) if fp8 else (lambda: self.q_rope)
        fused_name = "apply_rope_and_cache_" if gqa else "apply_mla_rope_and_cache_"
        fused = getattr(yt, fused_name, None)
        if fused is None:
            out["ours"] = (None, self.layout, f"skipped: yarn_triton has no {fused_name} (the op has not landed)")
        elif gqa:
            kw = dict(layout=self.layout)
            if fp8:
                kw.update(k_scale=self.kv_scale, v_scale=self.kv_scale, q_out=self.q_out, q_scale=self.q_scale)

            def ours():
                fused(self.q, self.k, self.v, self.pos, self.params, self.caches.k, self.caches.v, self.slots, **kw)
                return qres()
            out["ours"] = (ours, self.layout, "one launch" + ("; q -> FP8 q_out" if fp8 else ""))
        else:
            kw = dict(layout=self.layout)
            if fp8:  # all of q to the FP8 q_out: q_nope's channels, then the rotated q_pe
                kw.update(scale=self.kv_scale, q_out=self.q_out, q_scale=self.q_scale, q_nope=self.q_nope)

            def ours():
                fused(self.q_pe, self.k_pe, self.kv_c, self.pos, self.params, self.caches.kv, self.slots, **kw)
                return qres()
            out["ours"] = (ours, self.layout, "one launch" + ("; q_nope and q_pe -> FP8 q_out" if fp8 else ""))

        def unfused():
            yt.apply_rope_(self.q_rope, self.k_rope, self.pos, self.params, layout=self.layout)
            self.store(self.k_rope, self.q_rope)
            return qres()
        out["unfused"] = (unfused, self.layout, "apply_rope_ then cache_store")

        if liger is not None:
            B, S = self.nseq, self.per_seq
            # transformers: [B, S, H, D] storage handed over as its [B, H, S, D] view
            qv = self.q_rope.unflatten(0, (B, S)).transpose(1, 2)
            kv = self.k_rope.unflatten(0, (B, S)).transpose(1, 2)
            from bench_rope import hf_cos_sin

            inv = self.params.inv_freq_on(self.device)
            pos2 = self.pos.view(B, S)
            self.liger_table = lambda: hf_cos_sin(pos2, inv, 1.0, torch.bfloat16)  # noqa: E731
            cos, sin = self.liger_table()

            def liger_fn():
                ql, kl = liger.apply(qv, kv, cos, sin)
                ql, kl = ql.transpose(1, 2).flatten(0, 1), kl.transpose(1, 2).flatten(0, 1)
                self.store(kl, ql)
                return self.q_out if fp8 else ql
            note = "LigerRopeFunction on [B, H, S, D] views, then cache_store"
            if not gqa:
                note += "; neox (Liger has no interleaved), copies its strided inputs"
            out["liger"] = (liger_fn, "neox", note)

        if fi is not None and (gqa or not fp8 or self.q_width - self.m["rope_dim"] == self.m["kv_lora"]):
            table, interleave = fi.table, self.layout == "interleaved"
            idx, indptr, bidx, pos32 = self.fi_paging
            c = self.caches
            if gqa and fp8:
                def fi_fn():
                    fi.cache.gqa_rope_quant_append_(self.q, self.k, self.v, self.q_out, c.k, c.v, table, self.pos, idx,
                                                    indptr, bidx, pos32, 1.0 / Q_SCALE, 1.0 / KV_SCALE, interleave)
                    return self.q_out
                note = "RopeQuantizeAppendPagedKVCache (one launch)"
            elif gqa:
                def fi_fn():
                    fi.rope.cos_sin_cache_(self.q, self.k, table, self.pos, interleave)
                    fi.cache.append_paged_kv_(self.k, self.v, c.k, c.v, idx, indptr, bidx, pos32)
                    return self.q
                note = "BatchQKApplyRotaryPosIdsCosSinCache then AppendPagedKVCache"
            elif fp8:
                w, r = self.q_width, self.m["rope_dim"]

                def fi_fn():
                    fi.cache.mla_rope_quant_append_(self.q_pe, self.q_nope, self.k_pe, self.kv_c,
                                                    self.q_out[..., w - r:], self.q_out[..., : w - r], c.ckv, c.kpe,
                                                    table, self.pos, idx, indptr, bidx, pos32, 1.0 / Q_SCALE,
                                                    1.0 / KV_SCALE, interleave)
                    return self.q_out
                note = "RopeQuantizeAppendPagedMLACache (one launch)"
            else:
                def fi_fn():
                    fi.rope.cos_sin_cache_(self.q_pe, self.k_pe3, table, self.pos, interleave)
                    fi.cache.append_paged_mla_(self.kv_c, self.k_pe, c.ckv, c.kpe, idx, indptr, bidx, pos32)
                    return self.q_pe
                note = "BatchQKApplyRotaryPosIdsCosSinCache then AppendPagedKVMlaCache"
            out["flashinfer"] = (fi_fn, self.layout, note)
        elif fi is not None:
            out["flashinfer"] = (None, self.layout, "skipped: FlashInfer's MLA function needs q_nope as wide as kv_c")
        return out

    # -- checks -------------------------------------------------------------------------------
    def reference(self, layout):
        """float64 ``(q rope part, k rope part)`` rotated, for ``layout``."""
        from yarn_triton.reference import rope_reference

        if not hasattr(self, "_refs"):
            self._refs = {}
        if layout not in self._refs:
            qi, ki = self.pristine_views()
            self._refs[layout] = rope_reference(qi.double(), ki.double(), self.pos, self.params, layout=layout,
                                                compute_dtype=torch.float64)
        return self._refs[layout]

    def pristine_views(self):
        """The rope parts of the pristine q and k."""
        if self.m["kind"] == "gqa":
            return self.pristine[0], self.pristine[1]
        r, lat = self.m["rope_dim"], self.m["kv_lora"]
        return self.pristine[0][..., self.q_width - r:], self.pristine[1][:, lat:].unsqueeze(1)

    def check(self, fn, layout) -> dict:
        """One call of ``fn`` on fresh inputs and poisoned caches: relative errors of q's
        result, of the cache entries at the slots (vs the reference, quantized like the
        cache in FP8 rows), and the number of other cache bytes it changed."""
        self.restore()
        poison = 0x55
        for t in self.caches.all:
            t.view(torch.uint8).fill_(poison)
        if self.q_out is not None:
            self.q_out.view(torch.uint8).zero_()
        qres = fn()
        rq, rk = self.reference(layout)
        blk, off = self.slots // BLOCK_SIZE, self.slots % BLOCK_SIZE
        res = {}
        if qres.dtype == FP8:  # q_out: all channels, rope part rotated
            if self.m["kind"] == "gqa":
                want = rq
            else:
                r = self.m["rope_dim"]
                want = torch.cat((self.pristine[0][..., : self.q_width - r].float(), rq.float()), -1)
            res["q_err"] = _quant_err(qres, want.float(), Q_SCALE)
        else:
            res["q_err"] = _rel(qres.double(), rq)
        if self.m["kind"] == "gqa":
            want_k, want_v = rk, self.pristine[2].double()
            got_k, got_v = _at(self.caches.k, blk, off), _at(self.caches.v, blk, off)
        else:
            lat = self.m["kv_lora"]
            want_k, want_v = rk.squeeze(1), self.pristine[1][:, :lat].double()
            got_k, got_v = _at(self.caches.kpe, blk, off), _at(self.caches.ckv, blk, off)
        if self.fp8:
            res["k_err"], res["v_err"] = _quant_err(got_k, want_k, KV_SCALE), _quant_err(got_v, want_v, KV_SCALE)
        else:
            res["k_err"], res["v_err"] = _rel(got_k.double(), want_k), _rel(got_v.double(), want_v)
        stray = 0
        for t in self.caches.all:
            u = t.view(torch.uint8)
            u.view(u.shape[0], u.shape[1], -1)[blk, off] = poison
            stray += int((u != poison).sum())
        res["stray_bytes"] = stray
        res["ok"] = bool(max(res["q_err"], res["k_err"], res["v_err"]) < TOL[self.cache] and stray == 0)
        self.restore()
        return res

    def floor(self):
        return floor_parts(self.model, self.T, self.cache, self.q_width)


def _at(cache, blk, off):
    """``cache[blk, off]`` (gathered through a byte view: FP8 has few indexing kernels)."""
    if cache.dtype != FP8:
        return cache[blk, off]
    return cache.view(torch.uint8)[blk, off].view(FP8)


def _rel(got, want) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def _quant_err(got_fp8, want, scale) -> float:
    """||dequant(got) - dequant(quant(want))|| / ||want||: bits the column rounded otherwise
    than the reference (each differing element is one e4m3 step, 1/16 of it at most)."""
    want = want.float()  # (float32: e4m3 steps are far above its rounding)
    ref = (want / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale
    return ((got_fp8.float() * scale - ref).norm() / want.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------
def load_flashinfer(log):
    """Our FlashInfer bindings: ``fi.rope`` (cos/sin-cache rope), ``fi.cache`` (paged append and
    the fused FP8 functions), ``fi.table_for(params)``; None, with the reason logged, if they do
    not build."""
    try:
        from bench_rope import load_flashinfer as loader

        mod = loader()
        fi = types.SimpleNamespace(mod=mod, rope=mod.load(), cache=mod.load_cache(), table=None)
        return fi
    except Exception as e:  # no headers, no nvcc, a build error: its column is skipped
        log(f"FlashInfer binding not available ({type(e).__name__}: {str(e)[-3000:]}): its column is skipped")
        return None


def load_liger(log):
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        return LigerRopeFunction
    except Exception as e:
        log(f"Liger-Kernel not available ({type(e).__name__}: {e}): its column is skipped")
        return None


def run_row(model, cache, row, caches, args, liger, fi, bw, log, device="cuda", timing=True, max_pos=MAX_POS,
            num_blocks=NUM_BLOCKS):
    from timing import graph_us, kernels_launched

    gen_cpu = torch.Generator().manual_seed(zlib.crc32(row.encode()))  # one paging per row, every model
    paging = row_paging(row, gen_cpu, args.prefill_seqs, max_pos, num_blocks)
    gen = torch.Generator(device=device).manual_seed(1)
    r = Row(model, cache, row, caches, paging, device, gen, args.mla_fp8_q_nope)
    out = {"model": model, "cache": cache, "row": row, "tokens": r.T, "sequences": r.nseq,
           "tokens_per_seq": r.per_seq, "q_width": r.q_width, "layout": r.layout,
           "layers": MODELS[model]["layers"], "block_table_width": paging.width}
    parts = r.floor()
    out["floor_bytes"] = sum(parts.values())
    out["floor_parts"] = parts
    if bw:
        out["floor_us"] = out["floor_bytes"] / bw * 1e6
    if fi is not None:
        fi.table = fi.mod.yarn_cos_sin_cache(r.params, MAX_POS, device)
        out["fi_table_bytes"] = fi.table.numel() * fi.table.element_size()
        out["fi_table_positions"] = MAX_POS
    methods = r.methods(liger, fi)
    from yarn_triton.kernels.launcher import tuned_configs

    for m, (fn, layout, note) in methods.items():
        out[f"{m}_note"] = note
        if fn is None:
            out[f"{m}_error"] = note
            continue
        before = set(tuned_configs())
        try:
            chk = r.check(fn, layout)
            out[f"{m}_check"] = chk
            if not chk["ok"]:
                log(f"  {model} {cache} {row}: {m} FAILS its check: {chk}")
        except Exception as e:  # a column failing is reported, not fatal
            out[f"{m}_error"] = f"{type(e).__name__}: {e}"[:400]
            log(f"  {model} {cache} {row}: {m} failed: {out[f'{m}_error']}")
            if device == "cuda":
                torch.cuda.synchronize()
            continue
        if not timing:
            continue
        try:
            out[f"{m}_us"] = graph_us(fn)
            ks = kernels_launched(fn)
            out[f"{m}_kernels"] = ks
            want = expected_kernels(m, model, cache)
            if want is not None and len(ks) != want:
                log(f"  {model} {cache} {row}: {m} launched {len(ks)} kernels, not {want}: {ks}")
            if bw:
                out[f"{m}_x_floor"] = out[f"{m}_us"] / out["floor_us"]
            # the launch shapes the tuner picked for this column's calls (tokens per program,
            # heads per step, warps, stages, head groups); empty when an earlier row's shape
            # class already held them
            out[f"{m}_tuned"] = [list(c) for key, c in tuned_configs().items() if key not in before]
        except Exception as e:
            out[f"{m}_error"] = f"{type(e).__name__}: {e}"[:400]
            log(f"  {model} {cache} {row}: {m} failed in timing: {out[f'{m}_error']}")
    if timing:
        try:
            out["moves_us"] = graph_us(r.moves)
            if bw:
                out["moves_x_floor"] = out["moves_us"] / out["floor_us"]
        except Exception as e:  # evidence, not a column: reported, not fatal
            out["moves_error"] = f"{type(e).__name__}: {e}"[:400]
    if timing and "liger" in methods and "liger_us" in out:
        out["liger_table_us"] = graph_us(r.liger_table)
        out["liger_e2e_us"] = out["liger_us"] + out["liger_table_us"] / out["layers"]
    if "ours_us" in out and "unfused_us" in out:
        out["fuse_gain"] = out["unfused_us"] / out["ours_us"]
    if "ours_us" in out and "flashinfer_us" in out:
        out["fi_over_ours"] = out["flashinfer_us"] / out["ours_us"]
    r.restore()
    if fi is not None:
        fi.table = None
    return out


def _fmt(r, key, spec="7.2f"):
    v = r.get(key)
    if v is None:
        return "-"
    s = format(v, spec)
    m = key.rsplit("_", 1)[0]
    if isinstance(r.get(f"{m}_check"), dict) and not r[f"{m}_check"]["ok"]:
        s += "!"
    return s


def print_table(meta, rows):
    print(f"\n{meta.get('device', '?')} | torch {meta.get('torch')} | triton {meta.get('triton')} | "
          f"copy {meta.get('copy_tbps', float('nan')):.2f} TB/s | empty Triton kernel in a graph "
          f"{meta.get('empty_kernel_us', float('nan')):.2f} us | yarn_triton fused op: "
          f"{'yes' if meta.get('fused_available') else 'NO (ours skipped)'}")
    print("device time per call, us (20 calls in a CUDA graph); x fl = ours / floor; gain = unfused / ours; "
          "fi/ours = flashinfer / ours; moves = the same bytes in one launch, no arithmetic; ! = failed its check")
    print(f"{'model':12s} {'cache':5s} {'row':11s} {'tokens':>6s} {'floor':>7s} {'ours':>7s} {'x fl':>6s} "
          f"{'unfused':>7s} {'gain':>5s} {'liger':>7s} {'fi':>7s} {'fi/ours':>7s} {'moves':>7s}")
    for r in rows:
        print(f"{r['model']:12s} {r['cache']:5s} {r['row']:11s} {r['tokens']:6d} {_fmt(r, 'floor_us')} "
              f"{_fmt(r, 'ours_us')} {_fmt(r, 'ours_x_floor', '6.2f')} {_fmt(r, 'unfused_us')} "
              f"{_fmt(r, 'fuse_gain', '5.2f')} {_fmt(r, 'liger_us')} {_fmt(r, 'flashinfer_us')} "
              f"{_fmt(r, 'fi_over_ours', '7.2f')} {_fmt(r, 'moves_us')}")
    tables = {r["model"]: r["fi_table_bytes"] for r in rows if "fi_table_bytes" in r}
    for model, nbytes in tables.items():
        print(f"FlashInfer's fp32 cos/sin table, {model}: {MAX_POS} positions x {MODELS[model]['rope_dim']} = "
              f"{nbytes} bytes ({nbytes / 2**20:.0f} MiB)")


def write_csv(path, rows):
    keys = []
    for r in rows:
        for k, v in r.items():
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            cells = []
            for k in keys:
                v = r.get(k, "")
                if isinstance(v, list):
                    v = ";".join(map(str, v))
                elif isinstance(v, dict):
                    v = json.dumps(v, sort_keys=True)
                cells.append(v)
            w.writerow(cells)


def _package_digest() -> str:
    """sha1 of yarn_triton's .py sources (names and bytes): which op code ran, also where the
    tree was overlaid or is ahead of its git HEAD."""
    import hashlib

    import yarn_triton

    root = os.path.dirname(os.path.abspath(yarn_triton.__file__))
    h = hashlib.sha1()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except Exception:
        return None


def cpu_check(args) -> int:
    """No GPU: the checks of the columns that run on a CPU, small shapes, through Triton's
    interpreter (the store kernel; yarn_triton's kernel and, if present, the fused op)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable] + sys.argv)  # triton reads it at import
    import yarn_triton as yt

    print("No CUDA GPU: skipping timings; checking the columns that run on a CPU (Triton's interpreter), "
          "small shapes, bf16 caches. Not here: FP8 (the interpreter rounds fp32 -> e4m3 ties away from zero and "
          "drops mantissa carries), Liger (NaNs from bf16 under the interpreter), FlashInfer (CUDA only).")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    bad = 0
    small = types.SimpleNamespace(prefill_seqs=2, mla_fp8_q_nope=args.mla_fp8_q_nope)
    saved = dict(ROWS)
    ROWS.clear()
    ROWS.update({"decode-4": (4, 1, True), "prefill-32": (1, 32, False)})
    try:
        for model in MODELS:
            for cache in ("bf16",):
                caches = Caches(model, cache, "cpu", num_blocks=64)
                for row in ROWS:
                    out = run_row(model, cache, row, caches, small, None, None, None, log, device="cpu",
                                  timing=False, max_pos=512, num_blocks=64)
                    for m in ("ours", "unfused"):
                        chk = out.get(f"{m}_check")
                        if chk is None:
                            print(f"  {model:12s} {cache:5s} {row:11s} {m:8s} {out.get(f'{m}_error', '-')[:90]}")
                            continue
                        bad += not chk["ok"]
                        print(f"  {model:12s} {cache:5s} {row:11s} {m:8s} q {chk['q_err']:.1e} k {chk['k_err']:.1e} "
                              f"v {chk['v_err']:.1e} stray {chk['stray_bytes']} {'ok' if chk['ok'] else 'FAIL'}")
    finally:
        ROWS.clear()
        ROWS.update(saved)
    print("fused op present:", hasattr(yt, "apply_rope_and_cache_"))
    print("CPU check:", "PASS" if not bad else f"FAIL ({bad})")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_cache.json", help="JSON results path (a CSV goes beside it)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {list(MODELS)}")
    ap.add_argument("--caches", default=",".join(CACHES), help="comma list of bf16,fp8")
    ap.add_argument("--prefill-seqs", type=int, default=1, help="sequences sharing the 8192 prefill tokens")
    ap.add_argument("--mla-fp8-q-nope", type=int, default=512, choices=[128, 512],
                    help="MLA FP8 rows: q_nope width (512: FlashInfer's absorbed q; 128: q stays 192, no FlashInfer)")
    ap.add_argument("--no-flashinfer", dest="flashinfer", action="store_false")
    ap.add_argument("--no-liger", dest="liger", action="store_false")
    ap.add_argument("--check-only", action="store_true", help="the correctness checks alone (exit 1 on a failure)")
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        return cpu_check(args)

    import yarn_triton as yt
    from timing import copy_bandwidth, empty_kernel_us

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    timing = not args.check_only
    bw = copy_bandwidth() if timing else None
    fused = hasattr(yt, "apply_rope_and_cache_") and hasattr(yt, "apply_mla_rope_and_cache_")
    if not fused:
        log("yarn_triton has no apply_rope_and_cache_ / apply_mla_rope_and_cache_ (the op has not landed): "
            "the 'ours' column is skipped")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": _git_commit(), "yarn_triton_digest": _package_digest(), "fused_available": fused,
            "block_size": BLOCK_SIZE, "num_blocks": NUM_BLOCKS,
            "max_pos": MAX_POS, "kv_scale": KV_SCALE, "q_scale": Q_SCALE, "fp8": str(FP8),
            "prefill_seqs": args.prefill_seqs, "mla_fp8_q_nope": args.mla_fp8_q_nope, "timing": "cuda graph, 20 calls"}
    if timing:
        meta["copy_tbps"] = bw / 1e12
        meta["empty_kernel_us"] = empty_kernel_us()
    liger = load_liger(log) if args.liger else None
    if liger is not None:
        try:
            from importlib.metadata import version

            meta["liger"] = version("liger-kernel")
        except Exception:
            pass
    fi = load_flashinfer(log) if args.flashinfer else None
    meta["flashinfer"] = "0.7.4 headers, bench/flashinfer binding" if fi is not None else None

    rows, bad = [], 0
    for model in filter(None, args.models.split(",")):
        for cache in filter(None, args.caches.split(",")):
            caches = Caches(model, cache, "cuda")
            for row in filter(None, args.rows.split(",")):
                log(f"running {model} {cache} {row} ...")
                out = run_row(model, cache, row, caches, args, liger, fi, bw, log, timing=timing)
                bad += sum(1 for m in METHODS if isinstance(out.get(f"{m}_check"), dict)
                           and not out[f"{m}_check"]["ok"])
                rows.append(out)
                with open(args.out, "w") as f:  # as we go: a killed run still leaves its rows
                    json.dump({"meta": meta, "rows": rows}, f, indent=1)
            del caches
            torch.cuda.empty_cache()
    write_csv(os.path.splitext(args.out)[0] + ".csv", rows)
    if args.check_only:
        print(f"{'model':12s} {'cache':5s} {'row':11s} {'column':10s} {'q err':>8s} {'k err':>8s} {'v err':>8s} stray")
        for r in rows:
            for m in METHODS:
                c = r.get(f"{m}_check")
                if c:
                    print(f"{r['model']:12s} {r['cache']:5s} {r['row']:11s} {m:10s} {c['q_err']:8.1e} "
                          f"{c['k_err']:8.1e} {c['v_err']:8.1e} {c['stray_bytes']}{'' if c['ok'] else '  FAIL'}")
                elif f"{m}_error" in r:
                    print(f"{r['model']:12s} {r['cache']:5s} {r['row']:11s} {m:10s} {r[f'{m}_error'][:80]}")
        print("checks:", "PASS" if not bad else f"FAIL ({bad})")
        return 1 if bad else 0
    print_table(meta, rows)
    if bad:
        print(f"{bad} column(s) failed their check (marked !)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
