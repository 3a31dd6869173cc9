"""Launch glue: turn checked arguments into one kernel launch, or the PyTorch reference.

Maps a layout onto the kernel's pair switches and folds any number of token dims of
every tensor into the kernel's (batch, seq) geometry. :func:`_execute` is the one place
every path ends (eager calls, replay misses, the custom ops): the kernel for CUDA
tensors (and CPU tensors under ``TRITON_INTERPRET=1``), the reference for other CPU
tensors. Nothing here validates: callers have run :mod:`.checks` first.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..kernels.launcher import CacheWrite, Operand, launch_rope
from ..kernels.rope_kernel import INTERPRETED
from ..reference import (LAYOUTS, apply_rope_reference_, packed_token_mask, positions_from_offsets,
                         rms_norm_reference)
from ..reference_cache import quantize_reference, write_cache_reference
from ..rope import RopeParams


class CacheTarget(NamedTuple):
    """The serving path's extra operands: v (``[*T, Hv, Dv]``, q's token dims), the two
    paged caches (``[num_blocks, block_size, heads, dim]``), the slots (q's token dims) and
    the FP8 scales of q's output and the caches (floats or one-element float32 tensors;
    1.0 where the output is not FP8). With it, k is only read: ``ko`` is unused."""

    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: torch.Tensor
    q_quant: Union[float, torch.Tensor] = 1.0
    k_quant: Union[float, torch.Tensor] = 1.0
    v_quant: Union[float, torch.Tensor] = 1.0


def layout_switches(layout: str, inverse: bool = False) -> Tuple[bool, bool]:
    """``(in_pairs, out_pairs)`` of the kernel for ``layout``; the inverse of deepseek reads
    halves and writes pairs, undoing its de-interleave."""
    if layout == "neox":
        return False, False
    if layout == "interleaved":
        return True, True
    if layout == "deepseek":
        return (False, True) if inverse else (True, False)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


# --------------------------------------------------------------------------------------
# Geometry: fold the token dims of all tensors into (batch, seq)
# --------------------------------------------------------------------------------------
def _fold_tokens(shape: Sequence[int], strides_list: Sequence[Sequence[int]]):
    """Merge adjacent token dims that are contiguous with each other in every tensor.

    Returns ``(sizes, [strides per tensor])`` with size-1 dims dropped."""
    dims = [(n, [st[i] for st in strides_list]) for i, n in enumerate(shape) if n != 1]
    merged: List[Tuple[int, List[int]]] = []
    for n, st in dims:
        if merged:
            pn, pst = merged[-1]
            if all(p == s * n for p, s in zip(pst, st)):
                merged[-1] = (pn * n, st)
                continue
        merged.append((n, st))
    return [n for n, _ in merged], [[st[i] for _, st in merged] for i in range(len(strides_list))]


def _operand(src, dst, token_strides):
    """Operand with (batch, seq, head, dim) strides from folded token strides."""
    (s_sb, s_ss), (d_sb, d_ss) = token_strides
    return Operand(src, (s_sb, s_ss, src.stride(-2), src.stride(-1)),
                   dst, (d_sb, d_ss, dst.stride(-2), dst.stride(-1)))


def _cache_write(cache: CacheTarget, v_tok: Sequence[int], slot_tok: Sequence[int]) -> CacheWrite:
    """The launcher's :class:`CacheWrite` of ``cache``, v's and the slots' (batch, seq)
    strides given."""
    v = cache.v
    kc = cache.k_cache
    return CacheWrite(Operand(v, (*v_tok, v.stride(-2), v.stride(-1)), cache.v_cache, cache.v_cache.stride()),
                      cache.slots, tuple(slot_tok), kc.shape[0] * kc.shape[1], kc.shape[1],
                      cache.q_quant, cache.k_quant, cache.v_quant)


def _launch_kernel(q, qo, k, ko, positions, offsets, pos_base, cu_seqlens, inv_freq, scale,
                   rot, layout, inverse, precise, config, traced=False, norm=None, mrope=None, q_scale=None,
                   rotary_at="start", cache=None, cp=None):
    """Fold the token dims and launch; returns the kernel's :class:`PreparedLaunch` (None
    when the call took several launches or cannot be replayed). With ``cache`` (a
    :class:`CacheTarget`), k's rotation goes to the k cache and v to the v cache. ``cp``
    (derived positions only): the context-parallel shard the sequences are."""
    in_pairs, out_pairs = layout_switches(layout, inverse)
    common = dict(half=rot // 2, in_pairs=in_pairs, out_pairs=out_pairs, inverse=inverse,
                  precise=precise, pos_base=pos_base, cu_seqlens=cu_seqlens, config=config,
                  offsets=offsets, offsets_stride=0 if offsets is None else offsets.stride(0),
                  traced=traced, q_scale=q_scale, tail_first=rotary_at == "end")
    if norm is not None:
        common.update(norm=norm.kind, q_weight=norm.q_weight, k_weight=norm.k_weight, eps=norm.eps)
    if positions is None:
        # implicit positions: [B, S, H, D], [S, H, D] or packed [T, H, D]
        def bs(t):
            return (t.stride(0), t.stride(1)) if t.dim() == 4 else (0, t.stride(0))
        B, S = (q.shape[0], q.shape[1]) if q.dim() == 4 else (1, q.shape[0])
        qop = _operand(q, qo, (bs(q), bs(qo)))
        if cache is None:
            kop = None if k is None else _operand(k, ko, (bs(k), bs(ko)))
        else:
            sl = cache.slots
            kop = Operand(k, (*bs(k), k.stride(-2), k.stride(-1)), cache.k_cache, cache.k_cache.stride())
            common["cache"] = _cache_write(cache, bs(cache.v), (sl.stride(0), sl.stride(1)) if sl.dim() == 2
                                           else (0, sl.stride(0)))
        return launch_rope(qop, kop, inv_freq, scale, n_tokens=B * S, seq_len=S,
                           per_token_positions=None, pos_strides=(0, 0), cp=cp, **common)

    tokens = tuple(q.shape[:-2])
    if mrope is not None and positions.dim() == len(tokens) + 1:
        # M-RoPE [3, *T] streams: handled as [*T, 3], the stream stride passed apart
        pos = positions.expand((3,) + tokens).movedim(0, -1)
        common.update(mrope=mrope, pos_stream_stride=pos.stride(-1))
        first = pos[..., 0]
    else:
        pos = first = positions.expand(tokens)
    # (with the cache write, k's output is the cache: k itself stands in for its token strides)
    tensors = [q, qo, first] + ([] if k is None else [k, k if cache is not None else ko])
    if cache is not None:
        tensors += [cache.v, cache.slots]
    sizes, strides = _fold_tokens(tokens, [t.stride()[: len(tokens)] for t in tensors])
    if len(sizes) > 2:
        # Three or more token dims that no stride folds together: peel the outermost.
        for i in range(q.shape[0]):
            pos_i = pos[i].movedim(-1, 0) if pos is not first else pos[i]
            _launch_kernel(q[i], qo[i], None if k is None else k[i], None if k is None else ko[i],
                           pos_i, offsets, pos_base, cu_seqlens, inv_freq, scale,
                           rot, layout, inverse, precise, config, traced, norm, mrope, q_scale, rotary_at,
                           None if cache is None else cache._replace(v=cache.v[i], slots=cache.slots[i]))
        return None
    while len(sizes) < 2:
        sizes.insert(0, 1)
        strides = [[0] + st for st in strides]
    qop = _operand(q, qo, strides[0:2])
    if cache is None:
        kop = None if k is None else _operand(k, ko, strides[3:5])
    else:
        kop = Operand(k, (*strides[3], k.stride(-2), k.stride(-1)), cache.k_cache, cache.k_cache.stride())
        common["cache"] = _cache_write(cache, strides[5], strides[6])
    return launch_rope(qop, kop, inv_freq, scale, n_tokens=sizes[0] * sizes[1], seq_len=sizes[1],
                       per_token_positions=first, pos_strides=tuple(strides[2]), **common)


def out_like(x: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The out-of-place output for ``x``: fresh memory, except that with ``cu_seqlens`` it
    starts as a copy of ``x``, because the kernel writes only the tokens of the packed
    sequences and those past ``cu_seqlens[-1]`` come out as they went in (as the reference's)."""
    if x is None:
        return None
    return torch.empty_like(x) if cu_seqlens is None else x.clone()


def uses_kernel(t: torch.Tensor) -> bool:
    """CUDA tensors always go through the kernel; CPU tensors only under TRITON_INTERPRET=1."""
    return t.device.type == "cuda" or (INTERPRETED and t.device.type == "cpu")


def _execute(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
             rot, layout, inverse, precise, config=None, traced=False, norm=None, mrope=None, q_scale=None,
             rotary_at="start", cache=None, cp=None):
    """Rotate ``q``/``k`` (RMS-normalised first when ``norm``; q scaled after when
    ``q_scale``) into ``qo``/``ko`` (the same tensors for in place); the rotary part of
    each head is its first ``rot`` channels, or its last ones for ``rotary_at="end"``.
    With ``cache`` (a :class:`CacheTarget`) k is only read: its rotation and v go to the
    caches at the slots, and ``qo`` (q, or an FP8 ``q_out``) gets q's.
    ``cp = (cp_size, cp_rank)`` (``positions`` None): the sequences are that rank's
    head-tail shards of a context-parallel split; their tokens take global positions.
    Returns the launch's :class:`PreparedLaunch` when it can be replayed."""
    if cp is not None and cp[0] == 1:  # one rank: the local sequence is the global one
        cp = None
    if uses_kernel(q):
        return _launch_kernel(q, qo, k, ko, positions, offsets, pos_base, cu_seqlens, inv_freq, scale,
                              rot, layout, inverse, precise, config, traced, norm,
                              mrope if mrope is not None and mrope[0] else None, q_scale, rotary_at, cache, cp)
    if cache is not None:
        _cache_reference(q, qo, k, positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot, layout,
                         precise, mrope, cache, rotary_at, cp)
        return None
    mask = None
    if positions is None:
        positions = positions_from_offsets(q, offsets if offsets is not None else pos_base, cu_seqlens, cp)
        if offsets is not None and pos_base:
            positions = positions + pos_base
        if cu_seqlens is not None:
            mask = packed_token_mask(q, cu_seqlens)
    has_mrope = mrope is not None and mrope[0]
    params = RopeParams(inv_freq.cpu(), rot, scale, mrope_section=tuple(mrope[1:]) if has_mrope else None,
                        mrope_interleaved=bool(has_mrope and mrope[0] == 2))
    src_q, src_k = q, k
    if norm is not None:
        unit = norm.kind == 2
        src_q = rms_norm_reference(q, norm.q_weight, norm.eps, unit_offset=unit)
        src_k = None if k is None else rms_norm_reference(k, norm.k_weight, norm.eps, unit_offset=unit)
        if mask is not None:  # tokens outside the packed sequences stay as they were
            m = mask.view(-1, *([1] * (q.dim() - 1)))
            src_q = torch.where(m, src_q, q.float())
            src_k = None if k is None else torch.where(m, src_k, k.float())
    new_q, new_k = apply_rope_reference_(src_q.clone(), None if src_k is None else src_k.clone(), positions,
                                         params, layout=layout, rotary_dim=rot, inverse=inverse, token_mask=mask,
                                         q_scale=q_scale, q_scale_dtype=q.dtype, rotary_at=rotary_at)
    qo.copy_(new_q)
    if ko is not None:
        ko.copy_(new_k)
    return None


def _cache_reference(q, qo, k, positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot, layout, precise,
                     mrope, cache: CacheTarget, rotary_at: str = "start", cp=None) -> None:
    """The cache write in PyTorch (CPU tensors): q and k rotated in float32 by the
    reference, then rounded or quantized once into ``qo`` and the caches."""
    q32 = torch.empty(q.shape, dtype=torch.float32)
    k32 = torch.empty(k.shape, dtype=torch.float32)
    _execute(q.float(), q32, k.float(), k32, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
             rot, layout, False, precise, mrope=mrope, rotary_at=rotary_at, cp=cp)
    mask = None if cu_seqlens is None or positions is not None else packed_token_mask(q, cu_seqlens)
    q_new = quantize_reference(q32, qo.dtype, cache.q_quant)
    if mask is None:
        qo.copy_(q_new)
    else:  # tokens past the packed sequences: neither q (q_out) nor the caches are written, as by the kernel
        qo[mask] = q_new[mask]
    slots = cache.slots.reshape(-1)
    write_cache_reference(cache.k_cache, k32.reshape(-1, *k.shape[-2:]), slots, cache.k_quant, mask)
    write_cache_reference(cache.v_cache, cache.v.reshape(-1, *cache.v.shape[-2:]), slots, cache.v_quant, mask)
