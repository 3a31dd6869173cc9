"""The store kernel of the serving benchmark's unfused columns (``bench_cache.py``): one Triton
launch that writes k and v (MLA: kv_c and k_pe) into a paged cache at the slots and copies q
token by token (to an FP8 ``q_out``: quantized), as a serving stack's plain cache-write kernel
does after a separate rope. Also the ``moves`` evidence column: the fused op's bytes, no
arithmetic."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK_SIZE = 16  # bench_cache's page size


def q_heads_per_program(n_heads: int, widths) -> int:
    """Heads of q one store program quantizes: about 4096 elements (padded widths), a power of two."""
    per = sum(1 << (max(w, 1) - 1).bit_length() for w in widths)
    h = 1
    while h * 2 * per <= 4096 and h * 2 <= (1 << (n_heads - 1).bit_length()):
        h *= 2
    return h


@triton.jit
def _move(src, src_sh, dst, dst_sh, scale_ptr, n_heads, D: tl.constexpr, H_P: tl.constexpr, D_P: tl.constexpr,
          QUANT: tl.constexpr, QMAX: tl.constexpr):
    """``n_heads`` rows of ``D`` (row strides ``src_sh``/``dst_sh``), quantized if ``QUANT``."""
    h = tl.arange(0, H_P)[:, None]
    d = tl.arange(0, D_P)[None, :]
    m = (h < n_heads) & (d < D)
    x = tl.load(src + h * src_sh + d, mask=m)
    if QUANT:
        y = x.to(tl.float32) / tl.load(scale_ptr)
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(dst + h * dst_sh + d, y.to(dst.dtype.element_ty), mask=m)
    else:
        tl.store(dst + h * dst_sh + d, x.to(dst.dtype.element_ty), mask=m)


@triton.jit
def _store_q(t, g, qa_ptr, qa_st, qa_sh, qao_ptr, qao_st, qao_sh, qb_ptr, qb_st, qb_sh, qbo_ptr, qbo_st, qbo_sh,
             sq_ptr, n_q_heads, DQA: tl.constexpr, DQA_P: tl.constexpr, DQB: tl.constexpr, DQB_P: tl.constexpr,
             QH: tl.constexpr, HAS_QB: tl.constexpr, Q_QUANT: tl.constexpr, QMAX: tl.constexpr):
    h0 = g * QH
    _move(qa_ptr + t * qa_st + h0 * qa_sh, qa_sh, qao_ptr + t * qao_st + h0 * qao_sh, qao_sh, sq_ptr,
          n_q_heads - h0, DQA, QH, DQA_P, Q_QUANT, QMAX)
    if HAS_QB:
        _move(qb_ptr + t * qb_st + h0 * qb_sh, qb_sh, qbo_ptr + t * qbo_st + h0 * qbo_sh, qbo_sh, sq_ptr,
              n_q_heads - h0, DQB, QH, DQB_P, Q_QUANT, QMAX)


@triton.jit
def _cache_store_kernel(
    slot_ptr, block_size,
    a_ptr, a_st, a_sh, ca_ptr, ca_sb, ca_ss, ca_sh, sa_ptr,
    b_ptr, b_st, b_sh, cb_ptr, cb_sb, cb_ss, cb_sh, sb_ptr,
    qa_ptr, qa_st, qa_sh, qao_ptr, qao_st, qao_sh,
    qb_ptr, qb_st, qb_sh, qbo_ptr, qbo_st, qbo_sh, sq_ptr,
    n_q_heads,
    HA: tl.constexpr, DA: tl.constexpr, HA_P: tl.constexpr, DA_P: tl.constexpr,
    HB: tl.constexpr, DB: tl.constexpr, HB_P: tl.constexpr, DB_P: tl.constexpr,
    DQA: tl.constexpr, DQA_P: tl.constexpr, DQB: tl.constexpr, DQB_P: tl.constexpr, QH: tl.constexpr,
    HAS_KV: tl.constexpr, HAS_B: tl.constexpr, HAS_QB: tl.constexpr,
    KV_QUANT: tl.constexpr, Q_QUANT: tl.constexpr, QMAX: tl.constexpr,
):
    """Program (t, 0): token t's two cache parts (a: k / kv_c, b: v / k_pe) to its slot (skipped
    when < 0). Programs (t, 1 + g) (or (t, g) with no cache part): q heads [g*QH, g*QH + QH)
    of token t, both q parts (a: all of q / q_nope, b: q_pe), to q_out."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    if HAS_KV:
        if j == 0:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:
                blk = slot // block_size
                off = slot - blk * block_size
                _move(a_ptr + t * a_st, a_sh, ca_ptr + blk * ca_sb + off * ca_ss, ca_sh, sa_ptr, HA, DA, HA_P, DA_P,
                      KV_QUANT, QMAX)
                if HAS_B:
                    _move(b_ptr + t * b_st, b_sh, cb_ptr + blk * cb_sb + off * cb_ss, cb_sh, sb_ptr, HB, DB, HB_P,
                          DB_P, KV_QUANT, QMAX)
        else:
            _store_q(t, j - 1, qa_ptr, qa_st, qa_sh, qao_ptr, qao_st, qao_sh, qb_ptr, qb_st, qb_sh, qbo_ptr, qbo_st,
                     qbo_sh, sq_ptr, n_q_heads, DQA, DQA_P, DQB, DQB_P, QH, HAS_QB, Q_QUANT, QMAX)
    else:
        _store_q(t, j, qa_ptr, qa_st, qa_sh, qao_ptr, qao_st, qao_sh, qb_ptr, qb_st, qb_sh, qbo_ptr, qbo_st,
                 qbo_sh, sq_ptr, n_q_heads, DQA, DQA_P, DQB, DQB_P, QH, HAS_QB, Q_QUANT, QMAX)


_ONES: dict = {}


def _one(device):
    """A float32 1 on ``device``, made once (a fresh one in a captured call would add a kernel)."""
    key = str(device)
    if key not in _ONES:
        _ONES[key] = torch.ones(1, device=device, dtype=torch.float32)
    return _ONES[key]


def _p2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def cache_store(slots, kv_parts=(), kv_scales=None, q_parts=(), q_scale=None, block_size: int = BLOCK_SIZE):
    """One launch: ``kv_parts`` (0-2 ``(src [T, H, D], cache [nb, bs, H, D])``, last dims
    contiguous) written at ``slots`` (``cache[s // bs, s % bs] = quant(src[t])``, negative slots
    skipped), and ``q_parts`` (0-2 ``(src [T, H, D], dst [T, H, D])``, one head count) copied
    token by token. Quantized (``clamp(x / scale, -448, 448)``) when the destination is FP8:
    ``kv_scales`` (one scale tensor per kv part) and ``q_scale``, float32 one-element tensors."""
    kv_parts, q_parts = list(kv_parts), list(q_parts)
    if not kv_parts and not q_parts:
        return
    assert len(kv_parts) <= 2 and len(q_parts) <= 2
    T = (kv_parts[0][0] if kv_parts else q_parts[0][0]).shape[0]
    dummy_x = (kv_parts[0][0] if kv_parts else q_parts[0][0])
    kv_quant = bool(kv_parts) and kv_parts[0][1].dtype == FP8
    q_quant = bool(q_parts) and q_parts[0][1].dtype == FP8
    if kv_quant and (kv_scales is None or len(kv_scales) != len(kv_parts)):
        raise ValueError("an FP8 cache needs one scale per part")
    if q_quant and q_scale is None:
        raise ValueError("an FP8 q destination needs q_scale")
    one = _one(dummy_x.device)

    def kv_args(i):
        if i >= len(kv_parts):  # unused (HAS_B False): any pointer, sizes 1
            return (dummy_x, 0, 0, dummy_x, 0, 0, 0, one), (1, 16, 1, 16)
        src, cache = kv_parts[i]
        assert src.dim() == 3 and cache.dim() == 4 and src.stride(-1) == 1 and cache.stride(-1) == 1
        assert src.shape[1:] == cache.shape[2:] and src.shape[0] == T
        scale = kv_scales[i] if kv_quant else one
        return ((src, src.stride(0), src.stride(1), cache, cache.stride(0), cache.stride(1), cache.stride(2), scale),
                (src.shape[1], src.shape[2], _p2(src.shape[1]), _p2(src.shape[2])))

    def q_args(i):
        if i >= len(q_parts):
            return (dummy_x, 0, 0, dummy_x, 0, 0), (16, 16)
        src, dst = q_parts[i]
        assert src.dim() == 3 and dst.shape == src.shape and src.stride(-1) == 1 and dst.stride(-1) == 1
        return (src, src.stride(0), src.stride(1), dst, dst.stride(0), dst.stride(1)), (src.shape[2], _p2(src.shape[2]))

    (a, (ha, da, hap, dap)), (b, (hb, db, hbp, dbp)) = kv_args(0), kv_args(1)
    (qa, (dqa, dqap)), (qb, (dqb, dqbp)) = q_args(0), q_args(1)
    hq = q_parts[0][0].shape[1] if q_parts else 1
    if len(q_parts) == 2:
        assert q_parts[1][0].shape[1] == hq
    qh = q_heads_per_program(hq, [p[0].shape[2] for p in q_parts]) if q_parts else 1
    groups = triton.cdiv(hq, qh) if q_parts else 0
    grid = (T, (1 if kv_parts else 0) + groups)
    _cache_store_kernel[grid](
        slots if kv_parts else dummy_x, block_size, *a, *b, *qa, *qb, q_scale if q_quant else one, hq,
        HA=ha, DA=da, HA_P=hap, DA_P=dap, HB=hb, DB=db, HB_P=hbp, DB_P=dbp,
        DQA=dqa, DQA_P=dqap, DQB=dqb, DQB_P=dqbp, QH=qh,
        HAS_KV=bool(kv_parts), HAS_B=len(kv_parts) == 2, HAS_QB=len(q_parts) == 2,
        KV_QUANT=kv_quant, Q_QUANT=q_quant, QMAX=FP8_MAX, num_warps=4)
