"""The one Triton kernel of yarn-triton: rotary embedding of q and k in one launch.

Each program owns ``BLOCK_T`` tokens and one of ``HEAD_GROUPS`` slices of q's heads and of
k's heads, which it walks a few heads at a time, so q and k are rotated together whatever
their head counts. Per token it finds the position, forms ``angle = position * inv_freq`` and takes
cos/sin in registers: nothing is read but q, k, the positions and ``inv_freq``, and no
cos/sin cache exists anywhere.

Compile-time switches select the variant, not copies of the kernel:

* ``IN_PAIRS`` / ``OUT_PAIRS``: whether rotation pairs are read/written as adjacent
  channels ``(x[2i], x[2i+1])`` or as halves ``(x[i], x[i + R/2])``. neox is halves/halves,
  interleaved pairs/pairs, deepseek pairs/halves (its de-interleave happens on the way
  through registers) and deepseek's inverse halves/pairs.
* ``INVERSE``: rotate by ``-angle`` (the backward pass).
* ``PRECISE``: form the angle in float64, so it is right to ~1e-7 rad at any int32
  position instead of ``|angle| * 6e-8``. Either way it is reduced in float64 before it is
  rounded to float32.
* ``SINCOS``: how cos/sin of the reduced angle are taken (``_cos_sin``). 0: short
  polynomials after a reduction by pi/2 (float32 outputs, error below 1e-8). 1: the
  special-function unit after a reduction by 2 pi (16-bit outputs: error below 1e-6, a
  third of the instructions); 2: the interpreter's stand-in for 1.
* ``INPLACE``: output pointers equal the inputs; otherwise the pass-through channels of a
  partial rotary are copied too (``TAIL_PAD`` wide), making the out-of-place call a single
  pass.
* ``TAIL_FIRST``: where a head's pass-through channels lie. False: after the rotary part
  (channels ``[rot, head_dim)``, Llama/Phi-3 partial rotary). True: before it (the rotary
  part is the trailing ``rot`` channels, Mistral-4's ``[q_pass, q_rot]``): the pointers
  still address each head's first channel, the kernel moves to the rotary part itself
  (``+ tail`` channels, ``q_tail``/``k_tail`` then always given) and finds the tail at
  ``-tail`` from there. With NORM the tail's weights are ``weight[:tail]``.
* ``POS_MODE``: 0 reads a position per token; 1 derives it as ``pos_base + index in the
  sequence (+ offsets[seq] when HAS_OFFSETS)``. ``VARLEN`` finds each token's sequence in
  ``cu_seqlens`` (packed ``[T, H, D]`` batches) by binary search.
* ``CP`` (with POS_MODE 1): the sequences are rank ``cp_rank``'s shards of a context-parallel
  head-tail split over ``cp_size`` ranks (torch's ``_HeadTailLoadBalancer``,
  TransformerEngine's ``cp_size``/``cp_rank``): each global sequence was cut into
  ``2 * cp_size`` chunks and the rank holds chunks ``cp_rank`` and ``2 * cp_size - 1 -
  cp_rank``, so a local sequence of ``L`` tokens (``seq_len``, or its ``cu_seqlens`` range)
  is two chunks of ``c = L // 2`` and its index ``i`` is the global index ``i + c * cp_rank``
  (first chunk) or ``i + c * (2 * cp_size - 2 - cp_rank)`` (second) (:func:`_cp_index`).
* ``Q_SCALE``: multiply every channel of q's heads (the pass-through ones too) by the
  Llama-4 query scale of the token's position, ``1 + qs_beta * log(1 + floor(pos /
  qs_omax))`` (``_query_scale``); k is not scaled.
* ``NORM`` (per-head RMSNorm first: weight, or ``1 + weight``) and ``MROPE`` (none,
  sectioned, interleaved: which t/h/w position stream each frequency pair takes).
* ``Q_ONE_STEP`` / ``K_ONE_STEP``: one step of heads covers the operand's group (the
  host knows the head counts): the head loop and its prefetch go, about a quarter of a
  decode program's instructions.
* ``CACHE``: the serving path's KV-cache write (:func:`_cache_rows`). k's rotated heads
  go to ``ko_ptr``, a paged cache, at the token's slot ``s = slot_mapping[t]`` (block
  ``s // block_size``, row ``s % block_size``; tokens whose slot is negative or past the
  cache write nothing) instead of back into k, which is only read; v's heads are copied
  to ``vc_ptr`` at the same slots (``V_DIM`` channels, ``V_PAD`` padded). An output of an
  FP8 dtype stores ``x / scale`` saturated to the format's range (:func:`_quantize`),
  the scale per operand (q, k, v) a float argument or, by ``QUANT_PTRS`` bit 1/2/4, a
  one-element float32 tensor read on the device (CUDA graphs replay new scales).
* ``WIDE``: 64-bit element offsets, only when some tensor spans 2**31 elements (32-bit
  arithmetic halves the instructions before a decode launch's first load). ``ROWS``: 1 for
  a one-row batch, 2 for one token per row, where the token -> (row, index) division
  is skipped.

This module holds the kernel alone: its launch shapes are chosen in ``configs`` and it is
launched from ``launcher`` (the package's ``__init__`` maps the rooms).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

__all__ = ["rope_kernel", "INTERPRETED"]

# pi/2 split for Cody-Waite reduction: _PIO2_HI has 22 significant bits, so n * _PIO2_HI is
# exact in float64 for |n| < 2**31; _PIO2_LO is the rest of pi/2 (beyond float64's pi/2 too).
_HI = math.ldexp(round(math.ldexp(math.pi / 2, 20)), -20)
_PIO2_HI = tl.constexpr(_HI)
_PIO2_LO = tl.constexpr((math.pi / 2 - _HI) + 6.123233995736766e-17)
_TWO_OVER_PI = tl.constexpr(2.0 / math.pi)
# 2 pi split the same way (22 significant bits: n * _2PI_HI is exact for |n| < 2**31)
_2PI = math.ldexp(round(math.ldexp(2 * math.pi, 19)), -19)
_2PI_HI = tl.constexpr(_2PI)
_2PI_LO = tl.constexpr((2 * math.pi - _2PI) + 2.4492935982947064e-16)
_ONE_OVER_2PI = tl.constexpr(0.5 / math.pi)


@triton.jit
def _hw_cos_sin(r, SINCOS: tl.constexpr):
    """``(cos, sin)`` of float32 ``r`` in [-pi, pi] by the special-function unit
    (``cos.approx`` / ``sin.approx``: two instructions each, absolute error below 1e-6 on
    that range). SINCOS 2 is the interpreter's stand-in for the same step (it cannot run
    inline PTX): the same reduction, then numpy's cos/sin."""
    if SINCOS == 1:
        c = tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $1;", "=r,r", [r], dtype=tl.float32,
                                      is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.ftz.f32 $0, $1;", "=r,r", [r], dtype=tl.float32,
                                      is_pure=True, pack=1)
    else:
        c = tl.cos(r)
        s = tl.sin(r)
    return c, s


@triton.jit
def _cos_sin(pos, inv_freq, PRECISE: tl.constexpr, SINCOS: tl.constexpr):
    """float32 ``(cos, sin)`` of the angles ``pos * inv_freq``, ``[BLOCK_T, HALF_PAD]``;
    ``pos`` is int64 ``[BLOCK_T, 1]`` (one position per token) or ``[BLOCK_T, HALF_PAD]``
    (M-RoPE: one per token and frequency).

    The angle is formed in float64 (PRECISE: right to ~1e-7 rad at any int32 position) or
    as the float32 product a materialised cache would hold, and reduced exactly enough in
    float64 (Cody-Waite, a two-part constant) before anything is rounded to float32.

    SINCOS 0 (float32 outputs): reduced by a multiple ``n`` of pi/2 to ``r`` in [-pi/4,
    pi/4]; cos/sin come from short Taylor polynomials of ``r`` (truncation below 2e-9) and
    the quadrant ``n mod 4``. That is libdevice's fast path without its large-argument
    branch, whose code and stack frame would cost registers in every program.

    SINCOS 1 / 2 (16-bit outputs): reduced by a multiple of 2 pi to [-pi, pi], then the
    special-function unit (:func:`_hw_cos_sin`). Its error, below 1e-6, is 0.03% (bf16)
    to 0.2% (fp16) of a rounding step near 1 (3.9e-3 / 4.9e-4), and it takes about 10
    instructions per angle where the polynomials and quadrant take about 30: what decode
    launches, bound by instruction issue, wait for.
    """
    if PRECISE:
        a = pos.to(tl.float64) * inv_freq.to(tl.float64)[None, :]
    else:
        a = (pos.to(tl.float32) * inv_freq[None, :]).to(tl.float64)
    if SINCOS:
        n = tl.floor(a * _ONE_OVER_2PI + 0.5)
        r = ((a - n * _2PI_HI) - n * _2PI_LO).to(tl.float32)
        c, s = _hw_cos_sin(r, SINCOS)
    else:
        n = tl.floor(a * _TWO_OVER_PI + 0.5)
        r = ((a - n * _PIO2_HI) - n * _PIO2_LO).to(tl.float32)
        # Past |n| ~ 2**31 (int64 positions beyond the int32 range) the reduction is
        # inexact; clamping keeps (cos, sin) a unit vector there: a rotation, with no
        # accuracy promise.
        r = tl.minimum(tl.maximum(r, -0.7854), 0.7854)
        quadrant = n.to(tl.int64) & 3
        r2 = r * r
        sin_r = r + r * r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880))))
        cos_r = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800)))))
        # sin(r + n pi/2), cos(r + n pi/2) for n = 0, 1, 2, 3 (mod 4)
        odd = (quadrant & 1) == 1
        s = tl.where(odd, cos_r, sin_r)
        c = tl.where(odd, sin_r, cos_r)
        s = tl.where(quadrant >= 2, -s, s)
        c = tl.where((quadrant == 1) | (quadrant == 2), -c, c)
    return c, s


@triton.jit
def _idx(x, WIDE: tl.constexpr):
    """Element offsets in 64 bits only when a tensor spans 2**31 elements or more: 32-bit
    address arithmetic takes half the instructions, and decode launches are bound by the
    instructions that come before their first load."""
    if WIDE:
        return x.to(tl.int64)
    else:
        return x.to(tl.int32)


@triton.jit
def _mrope_positions(pos_ptr, row, stream_stride, tok_mask, HALF_PAD: tl.constexpr, MROPE: tl.constexpr,
                     SEC_T: tl.constexpr, SEC_H: tl.constexpr, SEC_W: tl.constexpr):
    """M-RoPE: ``[BLOCK_T, HALF_PAD]`` int64 positions, each frequency pair taking the
    time, height or width stream (``pos_ptr + row``, ``+ stream_stride``, ``+ 2 *
    stream_stride``). MROPE 1, sectioned (Qwen2-VL): the first SEC_T pairs use t, the next
    SEC_H h, the rest w. MROPE 2, interleaved (Qwen3-VL, Qwen3.5): pair i uses h when
    ``i % 3 == 1 and i < 3 * SEC_H``, w when ``i % 3 == 2 and i < 3 * SEC_W``, else t."""
    pt = tl.load(pos_ptr + row, mask=tok_mask, other=0).to(tl.int64)[:, None]
    ph = tl.load(pos_ptr + row + stream_stride, mask=tok_mask, other=0).to(tl.int64)[:, None]
    pw = tl.load(pos_ptr + row + 2 * stream_stride, mask=tok_mask, other=0).to(tl.int64)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    if MROPE == 1:
        use_h = (i >= SEC_T) & (i < SEC_T + SEC_H)
        use_w = i >= SEC_T + SEC_H
    else:
        use_h = (i % 3 == 1) & (i < 3 * SEC_H)
        use_w = (i % 3 == 2) & (i < 3 * SEC_W)
    return tl.where(use_h, ph, tl.where(use_w, pw, pt))


@triton.jit
def _find_sequence(cu_ptr, tok, n_seqs):
    """Largest ``i < n_seqs`` with ``cu[i] <= tok``, per token: a binary search over the
    packed batch's prefix sums, on the device (no host round trip, graph-capturable)."""
    lo = tl.zeros_like(tok)
    hi = lo + (n_seqs - 1)
    span = n_seqs
    while span > 0:  # floor(log2(n_seqs)) + 1 halvings leave one candidate
        mid = (lo + hi + 1) // 2
        ok = tl.load(cu_ptr + mid) <= tok
        active = lo < hi
        lo = tl.where(active & ok, mid, lo)
        hi = tl.where(active & ok, hi, tl.where(active, mid - 1, hi))
        span = span // 2
    return lo


@triton.jit
def _cp_index(local, n_local, cp_size, cp_rank):
    """The global index in its sequence (int64) of the token at index ``local`` of a
    context-parallel shard of ``n_local`` tokens: chunks ``cp_rank`` and ``2 * cp_size - 1 -
    cp_rank`` of the ``2 * cp_size`` equal chunks of the global sequence, each ``n_local //
    2`` long (the host, or ``check_cu_seqlens`` for packed sequences, makes ``n_local``
    even)."""
    chunk = n_local.to(tl.int64) // 2
    i = local.to(tl.int64)
    return i + chunk * tl.where(i < chunk, cp_rank, 2 * cp_size - 2 - cp_rank).to(tl.int64)


@triton.jit
def _probe():
    pass


# (INTERPRETED, below, as a constexpr the kernel's helpers can branch on)
_INTERPRETED = tl.constexpr(not isinstance(_probe, triton.runtime.JITFunction))


@triton.jit
def _round_to(x, out_ty: tl.constexpr):
    """fp32 -> storage dtype, rounded to nearest even: the GPU's cast. Triton's interpreter
    truncates float32 -> bfloat16 whatever rounding is asked for (outputs would then err
    twice a rounding step), so there the rounding is done on the bits first (NaN kept) and
    the cast that follows is exact."""
    if out_ty == tl.float32:
        return x
    else:
        if _INTERPRETED and out_ty == tl.bfloat16 and x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
        return x.to(out_ty, fp_downcast_rounding="rtne")


@triton.jit
def _quantize(x, out_ty: tl.constexpr, qscale, qinv):
    """float32 -> the stored value of dtype ``out_ty``. FP8: ``x / qscale`` correctly
    rounded to float32 (as torch divides), saturated to the format's finite range (448
    e4m3fn, 57344 e5m2; NaN stays NaN), rounded to nearest even: what vLLM's cache write
    stores. Other dtypes: rounded, the scales unused.

    The division: IEEE ``div.rn`` per element took a decode launch from 1.8 to 3.0 us on
    an H100. Instead ``y0 = x * qinv`` (``qinv``: the correctly rounded ``1 / qscale``,
    taken once per program) and one correction by the exact residual ``x - y0 * qscale``
    (an FMA) give the correctly rounded quotient (Markstein's theorem), in three
    instructions; a ``y0`` already past the range is kept (saturated below), where the
    residual would overflow."""
    if out_ty.is_fp8():
        FP8_MAX: tl.constexpr = 448.0 if out_ty == tl.float8e4nv else 57344.0
        x = x.to(tl.float32)
        if _INTERPRETED:  # (numpy's division is the IEEE one; the interpreter has no true FMA)
            y = tl.math.div_rn(x, qscale)
        else:
            y0 = x * qinv
            y = tl.where(tl.abs(y0) <= 2 * FP8_MAX, tl.fma(tl.fma(-y0, qscale, x), qinv, y0), y0)
        y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        if _INTERPRETED:
            # the interpreter's FP8 conversion carries no rounding into the exponent (0.496
            # becomes 0.25) and turns NaN into a number: round on the float32 grid first,
            # convert an exact value, and write NaN's bits (0x7F in both formats) directly
            y = _round_to_fp8_grid(y, 3 if out_ty == tl.float8e4nv else 2, -6 if out_ty == tl.float8e4nv else -14)
            v = y.to(out_ty, fp_downcast_rounding="rtne")
            v = tl.where(y != y, 0x7F, v.to(tl.uint8, bitcast=True)).to(tl.uint8).to(out_ty, bitcast=True)
        else:
            v = y.to(out_ty, fp_downcast_rounding="rtne")
        return v
    else:
        return _round_to(x, out_ty)


@triton.jit
def _round_to_fp8_grid(y, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """float32 ``y`` (finite values within the format's range, or NaN) rounded to nearest
    even on the grid of an FP8 format with ``MBITS`` mantissa bits and smallest normal
    exponent ``EMIN`` (subnormals below it), still float32: the step is ``2**(e - MBITS)``
    for ``y``'s exponent ``e`` (at least EMIN), and adding then subtracting 1.5 * 2**23
    rounds ``|y| / step`` (< 2**(MBITS + 1)) to an integer, to nearest even."""
    a = tl.abs(y)
    e = tl.maximum(((a.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127, EMIN)
    step = ((e - MBITS + 127) << 23).to(tl.uint32).to(tl.float32, bitcast=True)
    r = ((a / step + 12582912.0) - 12582912.0) * step
    return tl.where(y < 0, -r, r)


@triton.jit
def _scale_of(ptr, value, FROM_PTR: tl.constexpr):
    """A quantization scale: the float argument, or the one float32 element at ``ptr``."""
    if FROM_PTR:
        return tl.load(ptr).to(tl.float32)
    else:
        return tl.cast(value, tl.float32)  # (a float argument may come as float64, e.g. from Inductor)


@triton.jit
def _inverse(s):
    """The correctly rounded float32 ``1 / s`` (of a scalar scale, once per program)."""
    return tl.math.div_rn(tl.full([], 1.0, tl.float32), s)


@triton.jit
def _cache_rows(slot_ptr, slot_off, tok_mask, n_slots, block_size, WIDE: tl.constexpr):
    """Where each token's cache entry lies: ``(block, row in block, in_cache)`` from its slot
    ``s`` (``s // block_size``, ``s % block_size``). ``in_cache`` is false for tokens past
    the batch and for slots outside ``[0, n_slots)`` (-1 marks padding); their block and row
    are 0, and nothing of theirs is stored. Slots are divided in 32 bits unless WIDE (the
    host makes the cache's slot count fit it otherwise)."""
    slot = tl.load(slot_ptr + slot_off, mask=tok_mask, other=-1)
    in_cache = tok_mask & (slot >= 0) & (slot < n_slots)
    slot = _idx(tl.where(in_cache, slot, 0), WIDE)
    blk = slot // block_size
    return blk, slot - blk * block_size, in_cache


@triton.jit
def _tail_offset(tail, HALF: tl.constexpr, TAIL_FIRST: tl.constexpr):
    """Channel offset of a head's ``tail`` pass-through channels from the start of its
    rotary part: ``[tail | rotary part]`` (TAIL_FIRST) ends where the rotary part starts;
    ``[rotary part | tail]`` starts where it ends."""
    if TAIL_FIRST:
        return -tail
    else:
        return 2 * HALF


@triton.jit
def _copy_tile(h0, h_hi, mask, dim, DIM_PAD: tl.constexpr, BLOCK_H: tl.constexpr, WIDE: tl.constexpr):
    """Head offsets ``[BLOCK_H, 1, 1]``, channel offsets ``[1, 1, DIM_PAD]`` and the mask of
    one step of a copy: heads ``h0 ..`` below ``h_hi``, channels below ``dim``, the tokens
    of ``mask`` (``[1, BLOCK_T, 1]``)."""
    d = _idx(tl.arange(0, DIM_PAD), WIDE)[None, None, :]
    h = _idx(h0 + tl.arange(0, BLOCK_H), WIDE)[:, None, None]
    return h, d, mask & (h < h_hi) & (d < dim)


@triton.jit
def _copy_load(src_row, mask, h0, h_hi, in_sh, in_sd, dim, DIM_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
               WIDE: tl.constexpr):
    """The loads of one step of :func:`_copy_heads` (``src_row``: ``[1, BLOCK_T, 1]``
    pointers to each token's first head)."""
    h, d, m = _copy_tile(h0, h_hi, mask, dim, DIM_PAD, BLOCK_H, WIDE)
    return tl.load(src_row + h * in_sh + d * in_sd, mask=m, other=0.0)


@triton.jit
def _copy_store(dst_row, x, mask, h0, h_hi, out_sh, out_sd, qscale, qinv, dim, DIM_PAD: tl.constexpr,
                BLOCK_H: tl.constexpr, WIDE: tl.constexpr):
    """The stores of one step of :func:`_copy_heads`: ``x`` from :func:`_copy_load`,
    converted to the destination's dtype (:func:`_quantize`)."""
    h, d, m = _copy_tile(h0, h_hi, mask, dim, DIM_PAD, BLOCK_H, WIDE)
    tl.store(dst_row + h * out_sh + d * out_sd, _quantize(x, dst_row.dtype.element_ty, qscale, qinv), mask=m)


@triton.jit
def _copy_heads(src_row, dst_row, mask, h_lo, h_hi, in_sh, in_sd, out_sh, out_sd, qscale, qinv,
                dim, DIM_PAD: tl.constexpr, BLOCK_H: tl.constexpr, WIDE: tl.constexpr):
    """Copy heads ``h_lo .. h_hi`` (``dim`` channels) of ``BLOCK_T`` tokens from
    ``src_row`` to ``dst_row`` (``[1, BLOCK_T, 1]`` pointers to each token's first head),
    converted to the destination's dtype, ``BLOCK_H`` heads a step; ``mask``
    ``[1, BLOCK_T, 1]`` picks the tokens (loads and stores alike)."""
    for h0 in range(h_lo, h_hi, BLOCK_H):
        x = _copy_load(src_row, mask, h0, h_hi, in_sh, in_sd, dim, DIM_PAD, BLOCK_H, WIDE)
        _copy_store(dst_row, x, mask, h0, h_hi, out_sh, out_sd, qscale, qinv, dim, DIM_PAD, BLOCK_H, WIDE)


@triton.jit
def _query_scale(pos, beta, omax, out_ty: tl.constexpr):
    """Llama-4 query scale ``1 + beta * log(1 + floor(pos / omax))`` of int64 positions
    ``pos`` ``[BLOCK_T, 1]``, float32. The floor is an exact integer division at any
    position (on non-negative operands: Triton's integer division truncates); the rest
    is float32, as transformers' ``get_llama_4_attn_scale`` computes it, and the factor is
    rounded (to nearest even) to the storage dtype ``out_ty`` as transformers'
    ``.to(q.dtype)`` does."""
    n = tl.where(pos >= 0, pos, -1 - pos) // omax
    n = tl.where(pos >= 0, n, -1 - n)  # floor(p / m) = -1 - floor((-1 - p) / m) for p < 0
    f = 1.0 + beta * tl.log(1.0 + n.to(tl.float32))
    if out_ty == tl.float32:
        return f
    else:
        # round to nearest even on the float32 bits (the interpreter's .to() truncates), to
        # 7 (bf16) or 10 (fp16) mantissa bits; the cast after it is then exact
        DROP: tl.constexpr = 16 if out_ty == tl.bfloat16 else 13
        bits = f.to(tl.uint32, bitcast=True)
        bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & (0xFFFFFFFF - ((1 << DROP) - 1))
        return bits.to(tl.float32, bitcast=True).to(out_ty).to(tl.float32)


@triton.jit
def _load_heads(src_row, h0, h_hi, tok_mask, in_sh, in_sd,
                HALF: tl.constexpr, HALF_PAD: tl.constexpr, IN_PAIRS: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, WIDE: tl.constexpr):
    """``(x1, x2)`` ``[BLOCK_H, BLOCK_T, HALF_PAD]`` in the storage dtype (converted only
    when used, so prefetched heads hold half the registers): the rotation pairs of heads
    ``h0 .. h0+BLOCK_H`` (masked past ``h_hi``). ``src_row``: ``[1, BLOCK_T, 1]`` pointers
    to each token's first head."""
    h = _idx(h0 + tl.arange(0, BLOCK_H), WIDE)[:, None, None]
    th_mask = tok_mask[None, :, None] & (h < h_hi)
    src = src_row + h * in_sh
    # WIDE channel indices too: a head-dim stride can be large (e.g. a [D, T, H] tensor
    # viewed as [T, H, D]), and index * stride must not wrap
    if IN_PAIRS:
        d = _idx(tl.arange(0, 2 * HALF_PAD), WIDE)[None, None, :]
        x = tl.load(src + d * in_sd, mask=th_mask & (d < 2 * HALF), other=0.0)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_T, HALF_PAD, 2]))
    else:
        j = _idx(tl.arange(0, HALF_PAD), WIDE)[None, None, :]
        half_mask = th_mask & (j < HALF)
        x1 = tl.load(src + j * in_sd, mask=half_mask, other=0.0)
        x2 = tl.load(src + (j + HALF) * in_sd, mask=half_mask, other=0.0)
    return x1, x2


@triton.jit
def _norm_weights(w_ptr, tail, HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
                  IN_PAIRS: tl.constexpr, NORM: tl.constexpr, TAIL_FIRST: tl.constexpr):
    """The RMSNorm weight of each channel of a head, in the order the tiles hold them:
    ``[1, 1, HALF_PAD]`` for the pair members ``x1``/``x2`` and ``[1, 1, TAIL_PAD]`` for the
    pass-through channels. NORM == 2 is the ``(1 + weight)`` form (Gemma, Qwen3.5).
    TAIL_FIRST: the tail's weights are ``w[:tail]``, the rotary part's ``w[tail:]``."""
    if TAIL_FIRST:
        wt_ptr = w_ptr
        w_ptr = w_ptr + tail
    else:
        wt_ptr = w_ptr + 2 * HALF
    j = tl.arange(0, HALF_PAD)
    jm = j < HALF
    if IN_PAIRS:  # x1, x2 are channels 2j, 2j + 1
        w1 = tl.load(w_ptr + 2 * j, mask=jm, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + 2 * j + 1, mask=jm, other=0.0).to(tl.float32)
    else:  # channels j, j + HALF
        w1 = tl.load(w_ptr + j, mask=jm, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + j + HALF, mask=jm, other=0.0).to(tl.float32)
    t = tl.arange(0, TAIL_PAD if TAIL_PAD > 0 else 1)
    wt = tl.load(wt_ptr + t, mask=t < tail, other=0.0).to(tl.float32)
    if NORM == 2:
        w1 += 1.0
        w2 += 1.0
        wt += 1.0
    return w1[None, None, :], w2[None, None, :], wt[None, None, :]


@triton.jit
def _rotate_16bit(x1, x2, c, s):
    """``(x1 c - x2 s, x2 c + x1 s)`` in the 16-bit dtype of all four (LOW_ROT): two values
    an instruction on the GPU, each product rounded, as cos/sin-table kernels compute it.
    The interpreter's 16-bit arithmetic takes bf16 bits for integers, so there it is
    spelled out in float32 with the same roundings: each product, then the sum."""
    if _INTERPRETED:
        ty: tl.constexpr = x1.dtype
        a1 = x1.to(tl.float32)
        a2 = x2.to(tl.float32)
        cf = c.to(tl.float32)
        sf = s.to(tl.float32)
        p11 = _round_to(a1 * cf, ty).to(tl.float32)
        p22 = _round_to(a2 * sf, ty).to(tl.float32)
        p21 = _round_to(a2 * cf, ty).to(tl.float32)
        p12 = _round_to(a1 * sf, ty).to(tl.float32)
        return _round_to(p11 - p22, ty), _round_to(p21 + p12, ty)
    else:
        return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _rotate_step(
    src_row, dst_row, tmask, smask, h0, h_hi, x1, x2, in_sh, in_sd, out_sh, out_sd, c, s, tail,
    w1, w2, wt, inv_dim, eps, row_scale, quant, quant_inv,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr, OUT_PAIRS: tl.constexpr,
    INPLACE: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    WIDE: tl.constexpr, SCALED: tl.constexpr, TAIL_FIRST: tl.constexpr, LOW_ROT: tl.constexpr,
):
    """One step of :func:`_rotate_heads`: heads ``h0 .. h0+BLOCK_H`` (masked past ``h_hi``),
    whose rotation pairs ``(x1, x2)`` are already loaded: normalise, rotate, scale, store
    (and the pass-through channels where they are touched). ``tmask`` picks the tokens
    read, ``smask`` those written (the cache path skips tokens without a slot);
    ``quant`` is an FP8 output's scale (:func:`_quantize`)."""
    j = _idx(tl.arange(0, HALF_PAD), WIDE)[None, None, :]
    d = _idx(tl.arange(0, 2 * HALF_PAD), WIDE)[None, None, :]
    out_ty = dst_row.dtype.element_ty
    h = _idx(h0 + tl.arange(0, BLOCK_H), WIDE)[:, None, None]
    th_mask = tmask & (h < h_hi)
    st_mask = smask & (h < h_hi)
    dst = dst_row + h * out_sh
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    if TAIL_PAD > 0 and (NORM or SCALED or not INPLACE):  # pass-through channels of a partial rotary
        t = _idx(tl.arange(0, TAIL_PAD), WIDE)[None, None, :]
        tail_mask = th_mask & (t < tail)
        tc = t + _tail_offset(tail, HALF, TAIL_FIRST)
        tail_x = tl.load(src_row + h * in_sh + tc * in_sd, mask=tail_mask, other=0.0)
        if NORM or SCALED:
            tail_f = tail_x.to(tl.float32)
            if NORM:
                sq = tl.sum(a1 * a1 + a2 * a2, axis=2) + tl.sum(tail_f * tail_f, axis=2)
                r = tl.rsqrt(sq * inv_dim + eps)[:, :, None]
                tail_f = tail_f * r * wt
                a1 = a1 * r * w1
                a2 = a2 * r * w2
            if SCALED:
                tail_f = tail_f * row_scale[None, :, :]
            tail_x = _quantize(tail_f, out_ty, quant, quant_inv)
        elif out_ty.is_fp8():
            tail_x = _quantize(tail_x.to(tl.float32), out_ty, quant, quant_inv)
        tl.store(dst + tc * out_sd, tail_x, mask=st_mask & (t < tail))
    elif NORM:
        r = tl.rsqrt(tl.sum(a1 * a1 + a2 * a2, axis=2) * inv_dim + eps)[:, :, None]
        a1 = a1 * r * w1
        a2 = a2 * r * w2
    if LOW_ROT:  # c and s are 16-bit already: see _rotate_16bit
        y1, y2 = _rotate_16bit(x1, x2, c, s)
    else:
        y1 = a1 * c - a2 * s
        y2 = a2 * c + a1 * s
    if SCALED:
        y1 = y1 * row_scale[None, :, :]
        y2 = y2 * row_scale[None, :, :]
    if OUT_PAIRS:
        y = tl.reshape(tl.join(y1, y2), [BLOCK_H, BLOCK_T, 2 * HALF_PAD])
        tl.store(dst + d * out_sd, _quantize(y, out_ty, quant, quant_inv), mask=st_mask & (d < 2 * HALF))
    else:
        half_mask = st_mask & (j < HALF)
        tl.store(dst + j * out_sd, _quantize(y1, out_ty, quant, quant_inv), mask=half_mask)
        tl.store(dst + (j + HALF) * out_sd, _quantize(y2, out_ty, quant, quant_inv), mask=half_mask)


@triton.jit
def _rotate_heads(
    in_ptr, out_ptr, in_row, out_row, tok_mask, store_mask, h_lo, h_hi, x1, x2,
    in_sh, in_sd, out_sh, out_sd, cos, sin, tail, w_ptr, eps, row_scale, quant, quant_inv,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
    IN_PAIRS: tl.constexpr, OUT_PAIRS: tl.constexpr, INPLACE: tl.constexpr, NORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, WIDE: tl.constexpr, SCALED: tl.constexpr,
    TAIL_FIRST: tl.constexpr, ONE_STEP: tl.constexpr, LOW_ROT: tl.constexpr,
):
    """Rotate heads ``h_lo .. h_hi`` of ``BLOCK_T`` tokens, ``BLOCK_H`` at a time.

    ONE_STEP: the host knows that ``h_hi - h_lo <= BLOCK_H`` (one step covers the group):
    no loop and no prefetch of a next step, whose masked loads and address arithmetic
    would otherwise be a quarter of a decode program's instructions.

    ``(x1, x2)`` are the first step's heads, loaded by the caller before it computed the
    angles, so that their latency overlaps the trigonometry. Each step loads the next
    step's heads before it stores its own: two steps of loads are in flight per thread.

    Tiles are ``[BLOCK_H, BLOCK_T, channels]``, heads outermost: Triton hands threads to
    the channel and token axes first, so each thread keeps the same (token, channel) slots
    for every head it visits and reuses their cos/sin. Angles are therefore computed once
    per token and frequency in a program, not once per head. ``in_row`` / ``out_row`` are
    element offsets of each token's first head. A head's whole rope part is loaded
    before any of it is stored, which keeps the in-place permutation of the deepseek
    layout safe (the prefetched next heads are other heads).

    NORM: each head is first RMS-normalised over all its channels (rope part and the
    ``tail`` pass-through ones) in float32 and scaled by its weight, then rotated; the
    pass-through channels are written normalised, in place too.

    TAIL_FIRST: ``in_row``/``out_row`` address each head's rotary part, and its ``tail``
    pass-through channels sit just before it (channel offset ``-tail``); else they follow
    it (offset ``2 * HALF``).

    SCALED: every channel of each head (the pass-through ones too, in place as well) is
    multiplied by ``row_scale`` (float32 ``[BLOCK_T, 1]``, one factor per token) before it
    is rounded to the storage dtype: one rounding.
    """
    c = cos[None, :, :]
    s = sin[None, :, :]
    src_row = in_ptr + in_row[None, :, None]
    dst_row = out_ptr + out_row[None, :, None]
    tmask = tok_mask[None, :, None]
    smask = store_mask[None, :, None]
    if NORM:
        w1, w2, wt = _norm_weights(w_ptr, tail, HALF, HALF_PAD, TAIL_PAD, IN_PAIRS, NORM, TAIL_FIRST)
        inv_dim = 1.0 / (2 * HALF + tail)
    else:  # unused
        w1, w2, wt, inv_dim = 1.0, 1.0, 1.0, 1.0
    if ONE_STEP:
        _rotate_step(src_row, dst_row, tmask, smask, h_lo, h_hi, x1, x2, in_sh, in_sd, out_sh, out_sd, c, s, tail,
                     w1, w2, wt, inv_dim, eps, row_scale, quant, quant_inv, HALF, HALF_PAD, TAIL_PAD, OUT_PAIRS,
                     INPLACE, NORM, BLOCK_T, BLOCK_H, WIDE, SCALED, TAIL_FIRST, LOW_ROT)
    else:
        for h0 in range(h_lo, h_hi, BLOCK_H):
            n1, n2 = _load_heads(src_row, h0 + BLOCK_H, h_hi, tok_mask, in_sh, in_sd,
                                 HALF, HALF_PAD, IN_PAIRS, BLOCK_T, BLOCK_H, WIDE)
            _rotate_step(src_row, dst_row, tmask, smask, h0, h_hi, x1, x2, in_sh, in_sd, out_sh, out_sd, c, s,
                         tail, w1, w2, wt, inv_dim, eps, row_scale, quant, quant_inv, HALF, HALF_PAD, TAIL_PAD,
                         OUT_PAIRS, INPLACE, NORM, BLOCK_T, BLOCK_H, WIDE, SCALED, TAIL_FIRST, LOW_ROT)
            x1, x2 = n1, n2


@triton.jit(do_not_specialize=["pos_base", "n_tokens", "seq_len", "n_seqs", "tok_class", "qs_omax", "cp_size",
                                 "cp_rank"])
def rope_kernel(
    q_ptr, qo_ptr, k_ptr, ko_ptr, pos_ptr, cu_ptr, inv_freq_ptr, qw_ptr, kw_ptr,
    slot_ptr, v_ptr, vc_ptr, qq_ptr, kq_ptr, vq_ptr,
    scale, pos_base, eps,
    n_tokens, seq_len, n_seqs, tok_class,
    n_q_heads, n_k_heads, q_tail, k_tail,
    q_sb, q_ss, q_sh, q_sd, qo_sb, qo_ss, qo_sh, qo_sd,
    k_sb, k_ss, k_sh, k_sd, ko_sb, ko_ss, ko_sh, ko_sd,
    pos_sb, pos_ss, pos_s3, qs_beta, qs_omax,
    n_slots, block_size, n_v_heads, v_sb, v_ss, v_sh, v_sd, vc_sb, vc_ss, vc_sh, vc_sd, slot_sb, slot_ss,
    q_quant, k_quant, v_quant, cp_size, cp_rank,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    Q_TAIL_PAD: tl.constexpr, K_TAIL_PAD: tl.constexpr,
    IN_PAIRS: tl.constexpr, OUT_PAIRS: tl.constexpr,
    INVERSE: tl.constexpr, PRECISE: tl.constexpr, INPLACE: tl.constexpr,
    POS_MODE: tl.constexpr, HAS_OFFSETS: tl.constexpr, VARLEN: tl.constexpr, NORM: tl.constexpr,
    MROPE: tl.constexpr, SEC_T: tl.constexpr, SEC_H: tl.constexpr, SEC_W: tl.constexpr,
    WIDE: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_T: tl.constexpr, Q_BLOCK_H: tl.constexpr, K_BLOCK_H: tl.constexpr, HEAD_GROUPS: tl.constexpr,
    Q_SCALE: tl.constexpr, TAIL_FIRST: tl.constexpr, SINCOS: tl.constexpr,
    Q_ONE_STEP: tl.constexpr, K_ONE_STEP: tl.constexpr,
    CACHE: tl.constexpr, V_DIM: tl.constexpr, V_PAD: tl.constexpr, QUANT_PTRS: tl.constexpr,
    V_BLOCK_H: tl.constexpr, V_ONE_STEP: tl.constexpr, CP: tl.constexpr, LOW_ROT: tl.constexpr,
):
    """Grid: ``cdiv(n_tokens, BLOCK_T) * HEAD_GROUPS`` programs.

    Program ``i * HEAD_GROUPS + g`` owns tokens ``i*BLOCK_T ..`` and the g-th of ``HEAD_GROUPS`` equal
    slices of q's heads and of k's heads: it computes the angles of its tokens once and
    walks them ``Q_BLOCK_H`` / ``K_BLOCK_H`` at a time (the launch shape's heads per step,
    capped at the operand's heads per group, so GQA's few k heads waste no masked lanes). One group (prefill) makes each angle serve every
    head; more groups (decode) spread few tokens over more programs.

    Tokens are indexed ``t = b * seq_len + s``; every tensor is addressed through its own
    (batch, seq, head, dim) strides, so views of fused projections and transposed
    ``[B, H, S, D]`` tensors need no copy. Offsets are 32-bit unless WIDE (some tensor spans
    2**31 elements or more). ``tok_class`` is unused
    by the body: it is the tuner's bucket of ``n_tokens``.

    CACHE: ``ko_ptr`` is the paged k cache, its ``(ko_sb, ko_ss)`` the strides of a block
    and of a row in it, and ``vc_ptr`` the v cache likewise; ``slot_ptr`` holds each
    token's slot (addressed like the positions, by ``slot_sb``/``slot_ss``). v's
    ``n_v_heads`` heads are split over the head groups as k's are.

    CP: ``cp_size``/``cp_rank`` name the context-parallel shard that each sequence is (the
    positions POS_MODE 1 derives are then global ones); otherwise they are unused (1, 0).
    """
    # Head group fastest: the programs resident at one time then cover consecutive tokens'
    # whole rows of q and k (contiguous memory), not one group's slice of many tokens.
    pid = tl.program_id(0)
    pid_t = pid // HEAD_GROUPS
    pid_g = pid % HEAD_GROUPS

    tok = _idx(pid_t * BLOCK_T + tl.arange(0, BLOCK_T), WIDE)
    tok_mask = tok < n_tokens
    if VARLEN:
        # packed [T, H, D]: address by the flat token index, position within its sequence
        b = tl.zeros_like(tok)
        s = tok
        seq = _find_sequence(cu_ptr, tok, n_seqs)
        start = tl.load(cu_ptr + seq, mask=tok_mask, other=0)
        end = tl.load(cu_ptr + seq + 1, mask=tok_mask & (seq < n_seqs), other=0)
        tok_mask = tok_mask & (tok >= start) & (tok < end)  # padding past cu[-1] is left alone
        local = tok - start
        n_local = end - start
    else:
        if ROWS == 1:  # one row (batch 1): no division on the way to the first load
            b = tl.zeros_like(tok)
            s = tok
        elif ROWS == 2:  # one token per row (batched decode)
            b = tok
            s = tl.zeros_like(tok)
        else:
            # token counts fit 32 bits: a 32-bit division (64-bit division is a library call)
            b = _idx(tok.to(tl.int32) // seq_len, WIDE)
            s = tok - b * seq_len
        seq = b
        local = s
        n_local = seq_len

    if MROPE:
        pos = _mrope_positions(pos_ptr, b * pos_sb + s * pos_ss, pos_s3, tok_mask, HALF_PAD, MROPE,
                               SEC_T, SEC_H, SEC_W)
    elif POS_MODE == 0:
        pos = tl.load(pos_ptr + b * pos_sb + s * pos_ss, mask=tok_mask, other=0).to(tl.int64)[:, None]
    else:
        if CP:  # a head-tail shard: each of its two chunks at its place in the global sequence
            pos = _cp_index(local, n_local, cp_size, cp_rank) + pos_base
        else:
            pos = local.to(tl.int64) + pos_base
        if HAS_OFFSETS:
            pos += tl.load(pos_ptr + seq * pos_sb, mask=tok_mask, other=0).to(tl.int64)
        pos = pos[:, None]

    # Each operand's first heads are loaded before the angles are computed: their memory
    # latency then overlaps the position load and the trigonometry (decode is latency bound).
    q_per = tl.cdiv(n_q_heads, HEAD_GROUPS)
    q_lo = pid_g * q_per
    q_hi = tl.minimum(q_lo + q_per, n_q_heads)
    q_row = b * q_sb + s * q_ss
    qo_row = b * qo_sb + s * qo_ss
    k_row = b * k_sb + s * k_ss
    if CACHE:
        # the slot's load runs beside the first heads' loads: only the stores wait for it
        blk, blk_row, k_store = _cache_rows(slot_ptr, b * slot_sb + s * slot_ss, tok_mask, n_slots, block_size,
                                            WIDE)
        ko_row = blk * ko_sb + blk_row * ko_ss
    else:
        k_store = tok_mask
        ko_row = b * ko_sb + s * ko_ss
    # FP8 scales read from memory are loaded now, beside the first loads, not when the
    # stores need them (which would add a round trip to a decode program's critical path)
    q_qs = _scale_of(qq_ptr, q_quant, (QUANT_PTRS & 1) != 0)
    k_qs = _scale_of(kq_ptr, k_quant, (QUANT_PTRS & 2) != 0)
    v_qs = _scale_of(vq_ptr, v_quant, (QUANT_PTRS & 4) != 0)
    if TAIL_FIRST:  # each head is [tail | rotary part]: move to the rotary part
        q_row += _idx(q_tail, WIDE) * q_sd
        qo_row += _idx(q_tail, WIDE) * qo_sd
        k_row += _idx(k_tail, WIDE) * k_sd
        ko_row += _idx(k_tail, WIDE) * ko_sd
    qx1, qx2 = _load_heads(q_ptr + q_row[None, :, None], q_lo, q_hi, tok_mask, q_sh, q_sd,
                           HALF, HALF_PAD, IN_PAIRS, BLOCK_T, Q_BLOCK_H, WIDE)
    k_per = tl.cdiv(n_k_heads, HEAD_GROUPS)
    k_lo = pid_g * k_per
    k_hi = tl.minimum(k_lo + k_per, n_k_heads)
    kx1, kx2 = _load_heads(k_ptr + k_row[None, :, None], k_lo, k_hi, tok_mask, k_sh, k_sd,
                           HALF, HALF_PAD, IN_PAIRS, BLOCK_T, K_BLOCK_H, WIDE)

    # inv_freq too, before any store: a load issued after a store waits until that store's
    # data has arrived (one more round trip on a decode program's path)
    jf = tl.arange(0, HALF_PAD)
    inv_freq = tl.load(inv_freq_ptr + jf, mask=jf < HALF, other=0.0)

    # Copies that need no angle go before the trigonometry: v into its cache, and a
    # pass-through tail that is only copied or quantized (an out-of-place or FP8 q_out, a
    # cache's k; no norm, no query scale), e.g. the 512 q_nope channels of an MLA head in
    # a decode step's FP8 q. Where one step covers a group (decode), all their loads are
    # issued before any of their stores waits, so the round trips overlap one another
    # and the position load's, instead of one waiting for the angles (1 us of a 1-token
    # launch). Otherwise (many tokens, bandwidth bound) they copy step by step.
    K_INPLACE: tl.constexpr = INPLACE and CACHE == 0
    Q_TAIL_EARLY: tl.constexpr = Q_TAIL_PAD > 0 and not INPLACE and NORM == 0 and not Q_SCALE and Q_ONE_STEP
    K_TAIL_EARLY: tl.constexpr = K_TAIL_PAD > 0 and not K_INPLACE and NORM == 0 and K_ONE_STEP
    q_qinv = _inverse(q_qs)
    k_qinv = _inverse(k_qs)
    q_toff = _tail_offset(q_tail, HALF, TAIL_FIRST)
    k_toff = _tail_offset(k_tail, HALF, TAIL_FIRST)
    tmask3 = tok_mask[None, :, None]
    if Q_TAIL_EARLY:
        q_tsrc = q_ptr + (q_row + q_toff * q_sd)[None, :, None]
        q_tx = _copy_load(q_tsrc, tmask3, q_lo, q_hi, q_sh, q_sd, q_tail, Q_TAIL_PAD, Q_BLOCK_H, WIDE)
    if K_TAIL_EARLY:
        kmask3 = k_store[None, :, None]
        k_tsrc = k_ptr + (k_row + k_toff * k_sd)[None, :, None]
        k_tx = _copy_load(k_tsrc, kmask3, k_lo, k_hi, k_sh, k_sd, k_tail, K_TAIL_PAD, K_BLOCK_H, WIDE)
    if CACHE:
        # v goes to its cache untouched but for the dtype
        v_per = tl.cdiv(n_v_heads, HEAD_GROUPS)
        v_lo = pid_g * v_per
        v_hi = tl.minimum(v_lo + v_per, n_v_heads)
        v_src = v_ptr + (b * v_sb + s * v_ss)[None, :, None]
        v_dst = vc_ptr + (blk * vc_sb + blk_row * vc_ss)[None, :, None]
        vmask3 = k_store[None, :, None]
        v_qinv = _inverse(v_qs)
        if V_ONE_STEP:
            vx = _copy_load(v_src, vmask3, v_lo, v_hi, v_sh, v_sd, V_DIM, V_PAD, V_BLOCK_H, WIDE)
            _copy_store(v_dst, vx, vmask3, v_lo, v_hi, vc_sh, vc_sd, v_qs, v_qinv, V_DIM, V_PAD, V_BLOCK_H, WIDE)
        else:
            _copy_heads(v_src, v_dst, vmask3, v_lo, v_hi, v_sh, v_sd, vc_sh, vc_sd, v_qs, v_qinv, V_DIM, V_PAD,
                        V_BLOCK_H, WIDE)
    if Q_TAIL_EARLY:
        _copy_store(qo_ptr + (qo_row + q_toff * qo_sd)[None, :, None], q_tx, tmask3, q_lo, q_hi, qo_sh, qo_sd, q_qs,
                    q_qinv, q_tail, Q_TAIL_PAD, Q_BLOCK_H, WIDE)
    if K_TAIL_EARLY:
        _copy_store(ko_ptr + (ko_row + k_toff * ko_sd)[None, :, None], k_tx, kmask3, k_lo, k_hi, ko_sh, ko_sd, k_qs,
                    k_qinv, k_tail, K_TAIL_PAD, K_BLOCK_H, WIDE)
    # what is left of a tail for the rotation steps (theirs: normalised or scaled, or
    # looped over many heads)
    Q_TAIL_LEFT: tl.constexpr = 0 if Q_TAIL_EARLY else Q_TAIL_PAD
    K_TAIL_LEFT: tl.constexpr = 0 if K_TAIL_EARLY else K_TAIL_PAD

    cos, sin = _cos_sin(pos, inv_freq, PRECISE, SINCOS)
    # float arguments can arrive as float64 (Inductor's launches): the math stays float32
    scale = tl.cast(scale, tl.float32)
    eps = tl.cast(eps, tl.float32)
    cos = cos * scale
    sin = sin * scale
    if INVERSE:
        sin = -sin
    if LOW_ROT:
        # opt-in (the launcher's LOW_PRECISION_ROTATION; only where q and k are read and
        # written in one 16-bit dtype, with no norm, query scale or cache): the rotation in
        # that dtype, two values an instruction, as the cos/sin-table kernels do it
        cos = _round_to(cos, q_ptr.dtype.element_ty)
        sin = _round_to(sin, q_ptr.dtype.element_ty)
    # Q_SCALE (never with MROPE: the op refuses it): q's factor from the token's position
    if Q_SCALE:
        q_scale = _query_scale(pos, qs_beta, qs_omax, qo_ptr.dtype.element_ty)
    else:
        q_scale = scale

    # with CACHE, k is only read: its rotation goes to the cache (pass-through channels too)
    _rotate_heads(q_ptr, qo_ptr, q_row, qo_row, tok_mask, tok_mask, q_lo, q_hi, qx1, qx2,
                  q_sh, q_sd, qo_sh, qo_sd, cos, sin, q_tail, qw_ptr, eps, q_scale, q_qs, q_qinv,
                  HALF, HALF_PAD, Q_TAIL_LEFT, IN_PAIRS, OUT_PAIRS, INPLACE, NORM, BLOCK_T, Q_BLOCK_H, WIDE, Q_SCALE,
                  TAIL_FIRST, Q_ONE_STEP, LOW_ROT)
    _rotate_heads(k_ptr, ko_ptr, k_row, ko_row, tok_mask, k_store, k_lo, k_hi, kx1, kx2,
                  k_sh, k_sd, ko_sh, ko_sd, cos, sin, k_tail, kw_ptr, eps, scale, k_qs, k_qinv,
                  HALF, HALF_PAD, K_TAIL_LEFT, IN_PAIRS, OUT_PAIRS, K_INPLACE, NORM, BLOCK_T, K_BLOCK_H, WIDE, False,
                  TAIL_FIRST, K_ONE_STEP, LOW_ROT)


INTERPRETED = not isinstance(rope_kernel, triton.runtime.JITFunction)
