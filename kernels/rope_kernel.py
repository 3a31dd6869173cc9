"""The one Triton kernel of yarn-triton: rotary embedding, applied in place to q and k.

Each program owns ``BLOCK_T`` tokens x ``BLOCK_H`` heads of either q or k (grid axis 1 runs
over q's head blocks, then k's), so q and k are rotated in a single launch whatever their
head counts. Per token it loads the position, forms ``angle = position * inv_freq`` and
takes cos/sin in registers; nothing is read but q, k, the positions and ``inv_freq``.

Compile-time switches select the variant, not copies of the kernel:

* ``IN_PAIRS`` / ``OUT_PAIRS``: whether rotation pairs are read/written as adjacent
  channels ``(x[2i], x[2i+1])`` or as halves ``(x[i], x[i + R/2])``. neox is halves/halves,
  interleaved pairs/pairs, deepseek pairs/halves (its de-interleave happens on the way
  through registers) and deepseek's inverse halves/pairs.
* ``INVERSE``: rotate by ``-angle`` (the backward pass, or undoing a rotation).
* ``PRECISE``: form the angle in float64 and reduce it by 2*pi before the float32 cos/sin,
  so it is right to ~1e-7 rad at any int32 position instead of ``angle * 6e-8``.

This module only launches; argument checking lives in ``yarn_triton.op``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

__all__ = ["rope_kernel", "launch_rope", "LaunchConfig", "heuristic_config", "INTERPRETED"]

# 2*pi split for Cody-Waite reduction: _TWO_PI_HI has 22 significant bits, so n * _TWO_PI_HI
# is exact in float64 for |n| < 2**31; _TWO_PI_LO is the rest of 2*pi (beyond math.tau too).
_HI = math.ldexp(round(math.ldexp(math.tau, 19)), -19)
_TWO_PI_HI = tl.constexpr(_HI)
_TWO_PI_LO = tl.constexpr((math.tau - _HI) + 2.4492935982947064e-16)
_INV_TWO_PI = tl.constexpr(1.0 / math.tau)


@triton.jit
def _angles(pos, inv_freq, PRECISE: tl.constexpr):
    """``[BLOCK_T, HALF_PAD]`` float32 angles ``pos * inv_freq`` (reduced to about [-pi, pi]
    when PRECISE)."""
    if PRECISE:
        a = pos.to(tl.float64)[:, None] * inv_freq.to(tl.float64)[None, :]
        n = tl.floor(a * _INV_TWO_PI + 0.5)
        r = (a - n * _TWO_PI_HI) - n * _TWO_PI_LO
        return r.to(tl.float32)
    else:
        return pos.to(tl.float32)[:, None] * inv_freq[None, :]


@triton.jit
def _rotate_tile(
    ptr, row_off, tok_mask, h0, n_heads, stride_h, stride_d, cos, sin,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    IN_PAIRS: tl.constexpr, OUT_PAIRS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Rotate heads ``h0 .. h0+BLOCK_H`` of ``BLOCK_T`` tokens in place.

    ``row_off`` is the int64 element offset of each token's first head. The whole rope part
    of a head is loaded before any of it is stored, which is what makes the in-place
    permutation of the deepseek layout safe.
    """
    h = h0 + tl.arange(0, BLOCK_H)
    head_off = row_off[:, None, None] + h.to(tl.int64)[None, :, None] * stride_h
    th_mask = tok_mask[:, None, None] & (h < n_heads)[None, :, None]
    j = tl.arange(0, HALF_PAD)[None, None, :]
    half_mask = th_mask & (j < HALF)
    d = tl.arange(0, 2 * HALF_PAD)[None, None, :]
    pair_mask = th_mask & (d < 2 * HALF)

    if IN_PAIRS:
        x = tl.load(ptr + head_off + d * stride_d, mask=pair_mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_H, HALF_PAD, 2]))
    else:
        x1 = tl.load(ptr + head_off + j * stride_d, mask=half_mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + head_off + (j + HALF) * stride_d, mask=half_mask, other=0.0).to(tl.float32)

    c = cos[:, None, :]
    s = sin[:, None, :]
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s

    out_ty = ptr.dtype.element_ty
    if OUT_PAIRS:
        y = tl.reshape(tl.join(y1, y2), [BLOCK_T, BLOCK_H, 2 * HALF_PAD])
        tl.store(ptr + head_off + d * stride_d, y.to(out_ty), mask=pair_mask)
    else:
        tl.store(ptr + head_off + j * stride_d, y1.to(out_ty), mask=half_mask)
        tl.store(ptr + head_off + (j + HALF) * stride_d, y2.to(out_ty), mask=half_mask)


@triton.jit
def rope_kernel(
    q_ptr, k_ptr, pos_ptr, inv_freq_ptr,
    scale,
    n_tokens, seq_len,
    n_q_heads, n_k_heads,
    q_sb, q_ss, q_sh, q_sd,
    k_sb, k_ss, k_sh, k_sd,
    pos_sb, pos_ss,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    IN_PAIRS: tl.constexpr, OUT_PAIRS: tl.constexpr,
    INVERSE: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid: ``(cdiv(n_tokens, BLOCK_T), cdiv(n_q_heads, BLOCK_H) + cdiv(n_k_heads, BLOCK_H))``.

    Tokens are indexed ``t = b * seq_len + s``; every tensor is addressed through its own
    (batch, seq, head, dim) strides, so views of fused projections and transposed
    ``[B, H, S, D]`` tensors need no copy. Offsets are int64.
    """
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)

    tok = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < n_tokens
    b = tok // seq_len
    s = tok - b * seq_len
    pos = tl.load(pos_ptr + b * pos_sb + s * pos_ss, mask=tok_mask, other=0)

    jf = tl.arange(0, HALF_PAD)
    inv_freq = tl.load(inv_freq_ptr + jf, mask=jf < HALF, other=0.0)
    angle = _angles(pos, inv_freq, PRECISE)
    cos = tl.cos(angle) * scale
    sin = tl.sin(angle) * scale
    if INVERSE:
        sin = -sin

    n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if pid_h < n_q_blocks:
        _rotate_tile(q_ptr, b * q_sb + s * q_ss, tok_mask, pid_h * BLOCK_H, n_q_heads, q_sh, q_sd,
                     cos, sin, HALF, HALF_PAD, IN_PAIRS, OUT_PAIRS, BLOCK_T, BLOCK_H)
    else:
        _rotate_tile(k_ptr, b * k_sb + s * k_ss, tok_mask, (pid_h - n_q_blocks) * BLOCK_H, n_k_heads,
                     k_sh, k_sd, cos, sin, HALF, HALF_PAD, IN_PAIRS, OUT_PAIRS, BLOCK_T, BLOCK_H)


INTERPRETED = not isinstance(rope_kernel, triton.runtime.JITFunction)


class LaunchConfig(NamedTuple):
    block_t: int
    block_h: int
    num_warps: int
    num_stages: int = 1


def heuristic_config(n_tokens: int, n_q_heads: int, n_k_heads: int, half: int) -> LaunchConfig:
    """A launch shape that needs no tuning: about 4K elements per program when there are
    enough tokens to fill the GPU, one token per program (more, smaller programs) when not."""
    half_pad = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(n_q_heads, n_k_heads, 1)), max(1, 4096 // (2 * half_pad)))
    per_token = block_h * 2 * half_pad
    block_t = 1
    while block_t * per_token < 4096 and n_tokens >= block_t * 2 * 1024:
        block_t *= 2
    elems = block_t * per_token
    num_warps = 8 if elems >= 8192 else 4 if elems >= 2048 else 2 if elems >= 512 else 1
    return LaunchConfig(block_t, block_h, num_warps)


def launch_rope(
    q: torch.Tensor, q_strides: tuple,
    k: Optional[torch.Tensor], k_strides: tuple,
    positions: torch.Tensor, pos_strides: tuple,
    inv_freq: torch.Tensor, scale: float,
    n_tokens: int, seq_len: int,
    half: int, in_pairs: bool, out_pairs: bool, inverse: bool, precise: bool,
    config: Optional[LaunchConfig] = None,
) -> None:
    """Launch :func:`rope_kernel` on already-validated arguments.

    ``*_strides`` are ``(batch, seq, head, dim)`` element strides for q and k and
    ``(batch, seq)`` for positions. ``k`` may be None (q only).
    """
    n_q_heads = q.shape[-2]
    n_k_heads = 0 if k is None else k.shape[-2]
    if n_tokens == 0 or n_q_heads + n_k_heads == 0:
        return
    if k is None:
        k, k_strides = q, (0, 0, 0, 0)
    cfg = config or heuristic_config(n_tokens, n_q_heads, n_k_heads, half)
    grid = (
        triton.cdiv(n_tokens, cfg.block_t),
        triton.cdiv(n_q_heads, cfg.block_h) + triton.cdiv(n_k_heads, cfg.block_h),
    )
    rope_kernel[grid](
        q, k, positions, inv_freq, float(scale),
        n_tokens, seq_len, n_q_heads, n_k_heads,
        *q_strides, *k_strides, *pos_strides,
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        IN_PAIRS=in_pairs, OUT_PAIRS=out_pairs, INVERSE=inverse, PRECISE=precise,
        BLOCK_T=cfg.block_t, BLOCK_H=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
