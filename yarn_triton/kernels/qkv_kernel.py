"""Experiment (issue #26): the QKV projection GEMM with the rope pass in its epilogue.

``out[T, N] = x[T, K] @ w[N, K]^T (+ bias)``, ``N = (Hq + 2 Hk) * D``, the fused ``[q; k; v]``
projection of ``nn.Linear``; q's and k's heads leave the kernel rotated (and RMS-normalised
first with NORM), v's as the GEMM made them. Nothing but x, w (and bias, positions,
``inv_freq``, norm weights) is read and ``out`` written once: the rotation costs no bytes.

Tiles are ``BLOCK_M`` tokens x one head: an N tile is exactly one head's ``D`` output
columns, so which operand a tile belongs to (q, k or v) and so whether its epilogue rotates
is one comparison of the head index. A head's rotary part is accumulated as two
accumulators, the rotation partners, so that the epilogue's rotation is elementwise (no
shuffle across lanes) whatever the layout:

* ``acc1`` over the W rows of the first members of the pairs, ``acc2`` over their
  partners: neox (rotate-half) rows ``h*D + j`` and ``h*D + R/2 + j``; interleaved and
  deepseek (adjacent pairs) rows ``h*D + 2j`` and ``h*D + 2j + 1``. By default the
  adjacent-pair case takes two accumulators over the even / odd rows rather than one
  accumulator split by ``reshape(acc, [BM, R/2, 2])`` + ``split`` in the epilogue: the
  split of a dot's accumulator layout is a register shuffle the compiler may lower through
  shared memory, while even/odd W rows are just another load (a descriptor over W with a
  row stride of ``2 K``); it is one code path for the three layouts and for partial
  rotary. Both triton 3.9's interpreter and its sm_90 compile take either form
  (``ONE_ACC`` below is the split one).
* ``acc_t`` over the pass-through rows ``[R, D)`` of a partial rotary (none when R == D).

``ONE_ACC`` (a config knob for the device sweep; only where the head is all rotary and D a
power of two) is the other way: one ``[BM, D]`` accumulator, one dot per step, and the
partners split out of it in the epilogue (``reshape`` + ``permute`` + ``split``, as the
persistent-matmul tutorial splits its epilogue into subtiles). Two dots of N = D/2 read
x's tile from shared memory twice per step where one of N = D reads it once; which costs
more on Hopper is what the sweep measures.

Epilogue: bias, then (NORM) ``y * rsqrt(mean(y^2 over the head) + eps) * w`` in float32 on
the accumulators (``w`` or ``1 + w``; q's heads take ``qw``, k's ``kw``), then
``o1 = y1 cos - y2 sin``, ``o2 = y2 cos + y1 sin`` (cos/sin times ``scale``, YaRN's
``cos_sin_scale``, as :mod:`.rope_kernel` applies it; pass-through channels unscaled),
rounded once and stored: neox and deepseek write ``o1`` to columns ``[0, R/2)`` and ``o2`` to
``[R/2, R)`` of the head (deepseek's de-interleave), interleaved back to ``2j`` / ``2j + 1``.
v's heads are stored in their own order.

``HEADS`` heads per tile (a knob): the tile's cos/sin are computed once and serve each of
its heads in turn (the heads' main loops and epilogues are unrolled one after the other).

Performance structure (for the device run; the interpreter checks the arithmetic only):
a persistent grid of ``n_progs`` programs walking the tiles with a ``GROUP_M`` L2 swizzle,
the main loop pipelined by ``tl.range(num_stages=NUM_STAGES)``, x and W read through tensor
descriptors (``USE_DESC``: TMA on Hopper; out-of-bounds rows and K columns read as zero)
or masked pointer loads, ``FLATTEN`` / ``WARP_SPECIALIZE`` passed to the tile loop as knobs
(both default off in the launcher: triton 3.6's Hopper support of them is unmeasured here).

``EPILOGUE`` 0 is the plain GEMM with the same tiles and loop (one ``[BM, D]`` accumulator,
no split, no epilogue math): the benchmark's "Triton GEMM" column.

float32 inputs use ``input_precision="ieee"`` (no TF32) so that tests against float64 are
tight; 16-bit inputs accumulate in float32 on the tensor cores.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .rope_kernel import _INTERPRETED, _cos_sin, _round_to

__all__ = ["qkv_rope_kernel"]


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """``acc + a @ b^T``, ``b`` ``[N, BK]`` as W's rows are loaded."""
    if _INTERPRETED and a.dtype == tl.bfloat16:
        # the interpreter's dot multiplies bfloat16's raw bits (numpy has no bfloat16):
        # widen first, which is the tensor cores' arithmetic too (exact products, float32 sums)
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(b), acc)


@triton.jit
def _tile_of(tile_id, n_m, n_heads, GROUP_M: tl.constexpr):
    """``(token block, head)`` of a tile: ``GROUP_M`` token blocks sweep all heads before the
    next group starts, so those blocks of x and all of W stay in L2 together."""
    per_group = GROUP_M * n_heads
    group = tile_id // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    within = tile_id % per_group
    return first_m + within % size_m, within // size_m


@triton.jit
def _w_rows(w_ptr, rows, row_mask, kk, k_mask, sw):
    """Masked pointer load of W rows ``rows`` (int64), K columns ``kk``: ``[len(rows), BK]``."""
    return tl.load(w_ptr + rows[:, None] * sw + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _store_head(dst, rmask, y1, y2, yt, j, t, PAIRED: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                ROT: tl.constexpr, TAIL: tl.constexpr, TAIL_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Round and store one head's tile at ``dst`` (``[BM, 1]`` pointers to its first
    column): PAIRED puts ``(y1, y2)`` at columns ``(2j, 2j + 1)``, else at ``j`` and
    ``HALF + j``; the pass-through part at ``[ROT, ROT + TAIL)``."""
    ty = dst.dtype.element_ty
    if PAIRED:  # one contiguous store of the joined pairs, not two stride-2 ones
        d = tl.arange(0, 2 * HALF_PAD)
        y = tl.reshape(tl.join(y1, y2), [BLOCK_M, 2 * HALF_PAD])
        tl.store(dst + d[None, :], _round_to(y, ty), mask=rmask & (d < 2 * HALF)[None, :])
    else:
        jm = rmask & (j < HALF)[None, :]
        tl.store(dst + j[None, :], _round_to(y1, ty), mask=jm)
        tl.store(dst + HALF + j[None, :], _round_to(y2, ty), mask=jm)
    if TAIL_PAD > 0:
        tl.store(dst + ROT + t[None, :], _round_to(yt, ty), mask=rmask & (t < TAIL)[None, :])


@triton.jit(do_not_specialize=["M", "n_progs"])
def qkv_rope_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, pos_ptr, inv_freq_ptr, qw_ptr, kw_ptr,
    M, K, n_q_heads, n_qk_heads, n_heads, n_progs,
    sx, sw, so, sp,
    scale, eps,
    D: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL: tl.constexpr, TAIL_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    PAIRS: tl.constexpr, OUT_PAIRS: tl.constexpr, EPILOGUE: tl.constexpr, NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISE: tl.constexpr, SINCOS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr, USE_DESC: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    ONE_ACC: tl.constexpr, HEADS: tl.constexpr,
):
    """Grid: ``n_progs = min(tiles, SMs)`` programs, ``tiles = cdiv(M, BLOCK_M) * n_heads / HEADS``.

    x ``[M, K]`` (row stride ``sx``), w ``[n_heads * D, K]`` (``sw``), out ``[M, n_heads * D]``
    (``so``), the last dims contiguous; positions ``[M]`` (stride ``sp``); heads
    ``[0, n_q_heads)`` are q's, ``[n_q_heads, n_qk_heads)`` k's, the rest v's.

    ``HALF`` = R/2 frequencies (``inv_freq [HALF]``), padded to ``HALF_PAD``; ``TAIL`` =
    D - R pass-through channels, padded to ``TAIL_PAD`` (0: none). PAIRS: the rotation
    pairs are adjacent channels in the projection (interleaved, deepseek); OUT_PAIRS: they
    are stored so (interleaved). NORM 1: weight, 2: 1 + weight. ``D_PAD``: D padded (the
    plain GEMM's tile).
    """
    ROT: tl.constexpr = 2 * HALF
    SINGLE: tl.constexpr = EPILOGUE == 0 or ONE_ACC
    # W row of the j-th first member of a pair (+ head * D), and the offset of its partner
    PSTEP: tl.constexpr = 2 if PAIRS else 1
    OFF2: tl.constexpr = 1 if PAIRS else HALF
    start = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_groups = n_heads // HEADS  # the launcher makes HEADS divide n_heads
    n_tiles = n_m * n_groups
    k_tiles = tl.cdiv(K, BLOCK_K)
    N = n_heads * D
    scale = tl.cast(scale, tl.float32)
    eps = tl.cast(eps, tl.float32)

    offs_k = tl.arange(0, BLOCK_K)
    j = tl.arange(0, HALF_PAD)
    t = tl.arange(0, TAIL_PAD if TAIL_PAD > 0 else 1)
    dcol = tl.arange(0, D_PAD)
    inv_freq = tl.load(inv_freq_ptr + j, mask=j < HALF, other=0.0)

    if USE_DESC:
        # out-of-bounds rows (past M or N) and K columns read as zero; rows of a padded
        # part (HALF_PAD > HALF) read the next part's rows, masked in the epilogue
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[sx, 1], block_shape=[BLOCK_M, BLOCK_K])
        if SINGLE:
            wd_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[sw, 1], block_shape=[D_PAD, BLOCK_K])
        else:
            if PAIRS:  # even and odd rows: W seen as [N/2, K] with row stride 2 sw, from rows 0 and 1
                w1_desc = tl.make_tensor_descriptor(w_ptr, shape=[N // 2, K], strides=[2 * sw, 1],
                                                    block_shape=[HALF_PAD, BLOCK_K])
                w2_desc = tl.make_tensor_descriptor(w_ptr + sw, shape=[N // 2, K], strides=[2 * sw, 1],
                                                    block_shape=[HALF_PAD, BLOCK_K])
            else:
                w1_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[sw, 1],
                                                    block_shape=[HALF_PAD, BLOCK_K])
                w2_desc = w1_desc
            if TAIL_PAD > 0:
                wt_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[sw, 1],
                                                    block_shape=[TAIL_PAD, BLOCK_K])

    for tile_id in tl.range(start, n_tiles, n_progs, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, hg = _tile_of(tile_id, n_m, n_groups, GROUP_M)
        m0 = pid_m * BLOCK_M
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        rows64 = rows.to(tl.int64)
        if EPILOGUE:
            # cos/sin of the tile's tokens, once for its HEADS heads (none for v's heads)
            if hg * HEADS < n_qk_heads:
                pos = tl.load(pos_ptr + rows64 * sp, mask=rmask, other=0).to(tl.int64)[:, None]
                c, s = _cos_sin(pos, inv_freq, PRECISE, SINCOS)
                c = c * scale
                s = s * scale
            else:
                c = tl.zeros((BLOCK_M, HALF_PAD), dtype=tl.float32)
                s = tl.zeros((BLOCK_M, HALF_PAD), dtype=tl.float32)
        for hh in tl.static_range(HEADS):
            head = hg * HEADS + hh
            col0 = head * D
            jm = j < HALF
            tm = t < TAIL
            if SINGLE:  # one [BM, D] accumulator over the head's rows
                acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
                wd_rows = (col0 + dcol).to(tl.int64)
                for ki in tl.range(0, k_tiles, num_stages=NUM_STAGES):
                    k0 = ki * BLOCK_K
                    if USE_DESC:
                        a = x_desc.load([m0, k0])
                        b = wd_desc.load([col0, k0])
                    else:
                        kk = k0 + offs_k
                        km = kk < K
                        a = tl.load(x_ptr + rows64[:, None] * sx + kk[None, :], mask=rmask[:, None] & km[None, :],
                                    other=0.0)
                        b = _w_rows(w_ptr, wd_rows, dcol < D, kk, km, sw)
                    acc = _dot(a, b, acc, IEEE)
                if EPILOGUE == 0:
                    if HAS_BIAS:
                        acc += tl.load(b_ptr + col0 + dcol, mask=dcol < D, other=0.0).to(tl.float32)[None, :]
                    dst = out_ptr + rows64[:, None] * so + col0
                    tl.store(dst + dcol[None, :], _round_to(acc, out_ptr.dtype.element_ty),
                             mask=rmask[:, None] & (dcol < D)[None, :])
                else:  # ONE_ACC: the partners split out of the accumulator (D == R, a power of two)
                    if PAIRS:  # columns (2j, 2j + 1)
                        acc1, acc2 = tl.split(tl.reshape(acc, [BLOCK_M, HALF, 2]))
                    else:  # columns j and HALF + j
                        acc1, acc2 = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), (0, 2, 1)))
                    acc_t = tl.zeros((BLOCK_M, 1), dtype=tl.float32)
            else:
                acc1 = tl.zeros((BLOCK_M, HALF_PAD), dtype=tl.float32)
                acc2 = tl.zeros((BLOCK_M, HALF_PAD), dtype=tl.float32)
                acc_t = tl.zeros((BLOCK_M, TAIL_PAD if TAIL_PAD > 0 else 1), dtype=tl.float32)
                w1_rows = (col0 + j * PSTEP).to(tl.int64)
                wt_rows = (col0 + ROT + t).to(tl.int64)
                for ki in tl.range(0, k_tiles, num_stages=NUM_STAGES):
                    k0 = ki * BLOCK_K
                    if USE_DESC:
                        a = x_desc.load([m0, k0])
                        if PAIRS:
                            b1 = w1_desc.load([col0 // 2, k0])
                            b2 = w2_desc.load([col0 // 2, k0])
                        else:
                            b1 = w1_desc.load([col0, k0])
                            b2 = w2_desc.load([col0 + HALF, k0])
                        if TAIL_PAD > 0:
                            bt = wt_desc.load([col0 + ROT, k0])
                    else:
                        kk = k0 + offs_k
                        km = kk < K
                        a = tl.load(x_ptr + rows64[:, None] * sx + kk[None, :], mask=rmask[:, None] & km[None, :],
                                    other=0.0)
                        b1 = _w_rows(w_ptr, w1_rows, jm, kk, km, sw)
                        b2 = _w_rows(w_ptr, w1_rows + OFF2, jm, kk, km, sw)
                        if TAIL_PAD > 0:
                            bt = _w_rows(w_ptr, wt_rows, tm, kk, km, sw)
                    acc1 = _dot(a, b1, acc1, IEEE)
                    acc2 = _dot(a, b2, acc2, IEEE)
                    if TAIL_PAD > 0:
                        acc_t = _dot(a, bt, acc_t, IEEE)

            if EPILOGUE:
                y1 = acc1
                y2 = acc2
                yt = acc_t
                if HAS_BIAS:
                    y1 += tl.load(b_ptr + col0 + j * PSTEP, mask=jm, other=0.0).to(tl.float32)[None, :]
                    y2 += tl.load(b_ptr + col0 + OFF2 + j * PSTEP, mask=jm, other=0.0).to(tl.float32)[None, :]
                    if TAIL_PAD > 0:
                        yt += tl.load(b_ptr + col0 + ROT + t, mask=tm, other=0.0).to(tl.float32)[None, :]
                dst = out_ptr + rows64[:, None] * so + col0
                smask = rmask[:, None]
                if head < n_qk_heads:  # q or k: normalise, rotate
                    if NORM:
                        if HALF_PAD != HALF:  # padded columns may hold the next part's sums
                            y1 = tl.where(jm[None, :], y1, 0.0)
                            y2 = tl.where(jm[None, :], y2, 0.0)
                        sq = tl.sum(y1 * y1 + y2 * y2, axis=1)
                        if TAIL_PAD > 0:
                            if TAIL_PAD != TAIL:
                                yt = tl.where(tm[None, :], yt, 0.0)
                            sq += tl.sum(yt * yt, axis=1)
                        r = tl.rsqrt(sq * (1.0 / D) + eps)[:, None]
                        if head < n_q_heads:
                            nw_ptr = qw_ptr
                        else:
                            nw_ptr = kw_ptr
                        w1 = tl.load(nw_ptr + j * PSTEP, mask=jm, other=0.0).to(tl.float32)[None, :]
                        w2 = tl.load(nw_ptr + OFF2 + j * PSTEP, mask=jm, other=0.0).to(tl.float32)[None, :]
                        if NORM == 2:
                            w1 += 1.0
                            w2 += 1.0
                        y1 = y1 * r * w1
                        y2 = y2 * r * w2
                        if TAIL_PAD > 0:
                            wt = tl.load(nw_ptr + ROT + t, mask=tm, other=0.0).to(tl.float32)[None, :]
                            if NORM == 2:
                                wt += 1.0
                            yt = yt * r * wt
                    o1 = y1 * c - y2 * s
                    o2 = y2 * c + y1 * s
                    _store_head(dst, smask, o1, o2, yt, j, t, OUT_PAIRS, HALF, HALF_PAD, ROT, TAIL, TAIL_PAD, BLOCK_M)
                else:  # v: the projection as it is, in its own column order
                    _store_head(dst, smask, y1, y2, yt, j, t, PAIRS, HALF, HALF_PAD, ROT, TAIL, TAIL_PAD, BLOCK_M)
