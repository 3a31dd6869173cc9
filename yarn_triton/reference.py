"""Pure-PyTorch reference: the materialised cos/sin-cache way of the source models.

This is the oracle of the tests and the path taken for CPU tensors. It builds the cos/sin
cache (``emb = cat(freqs, freqs)``, times ``cos_sin_scale``) for the positions it is given,
indexes it by position id, and applies ``x * cos + rotate_half(x) * sin`` -- after the
DeepSeek pair permutation for ``layout="deepseek"``. ``compute_dtype=torch.float64`` turns
it into the float64 truth for the same float32 ``inv_freq``. ``rotary_at="end"`` rotates
the last ``rotary_dim`` channels of each head instead of the first. ``q_scale`` multiplies q by
the Llama-4 query scale of its positions (:func:`llama4_query_scale`) after the rotation.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .rope import RopeParams

__all__ = [
    "rope_reference", "apply_rope_reference_", "positions_from_offsets", "cp_global_index", "rotate_half",
    "cos_sin_cache", "LAYOUTS",
    "rms_norm_reference", "qk_norm_rope_reference", "mrope_stream_of_pairs", "mrope_cos_sin_cache",
    "llama4_query_scale",
]

LAYOUTS = ("neox", "interleaved", "deepseek")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves along the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def cos_sin_cache(
    params: RopeParams, positions: torch.Tensor, dtype: torch.dtype = torch.float32
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Materialised ``cos, sin`` of shape ``positions.shape + (rope_dim,)``, scaled by
    ``params.cos_sin_scale``, in ``dtype`` (angles are computed in ``dtype`` too).

    The cache rows are built once per distinct position and gathered by position id, so
    arbitrary (also negative or very large) positions work; each row equals the row
    ``arange(max_position)`` would give for that position.
    """
    uniq, inverse = torch.unique(positions.reshape(-1), return_inverse=True)
    inv_freq = params.inv_freq.to(device=positions.device, dtype=dtype)
    freqs = torch.outer(uniq.to(dtype), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * params.cos_sin_scale
    sin = emb.sin() * params.cos_sin_scale
    shape = tuple(positions.shape) + (params.rope_dim,)
    return cos[inverse].reshape(shape), sin[inverse].reshape(shape)


def mrope_stream_of_pairs(half: int, section: Tuple[int, int, int], interleaved: bool) -> torch.Tensor:
    """``[half]`` int64: which position stream (0 t, 1 h, 2 w) each frequency pair takes,
    the way transformers decides it: sectioned (Qwen2-VL) or interleaved (Qwen3-VL)."""
    s_t, s_h, s_w = section
    i = torch.arange(half)
    if interleaved:
        stream = torch.zeros(half, dtype=torch.int64)
        stream[(i % 3 == 1) & (i < 3 * s_h)] = 1
        stream[(i % 3 == 2) & (i < 3 * s_w)] = 2
        return stream
    return (i >= s_t).long() + (i >= s_t + s_h).long()


def mrope_cos_sin_cache(
    params: RopeParams, positions: torch.Tensor, section: Tuple[int, int, int], interleaved: bool,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE ``cos, sin`` of shape ``positions.shape[1:] + (rope_dim,)`` from ``[3, *T]``
    (t, h, w) positions: each frequency pair's angle uses its stream's position."""
    half = params.rope_dim // 2
    stream = mrope_stream_of_pairs(half, section, interleaved).to(positions.device)
    pos = positions.to(dtype)  # [3, *T]
    inv_freq = params.inv_freq.to(device=positions.device, dtype=dtype)
    freqs = pos.movedim(0, -1)[..., stream] * inv_freq  # [*T, half]: pair i at its stream
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * params.cos_sin_scale, emb.sin() * params.cos_sin_scale


def llama4_query_scale(
    positions: torch.Tensor, beta: float, original_max: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``1 + beta * log(1 + floor(positions / original_max))`` of integer ``positions``, in
    ``dtype`` (float32 as transformers' ``get_llama_4_attn_scale`` computes it; float64 for
    the truth), same shape. The floor is an exact integer division at any position (where
    transformers' float32 division rounds past 2**24); negative positions give
    ``log(<= 0)`` (-inf or NaN), as in transformers."""
    n = torch.div(positions.to(torch.int64), int(original_max), rounding_mode="floor")
    return 1 + beta * torch.log(1 + n.to(dtype))


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """DeepSeek's ``[x0, x1, x2, x3, ...] -> [x0, x2, ..., x1, x3, ...]`` on the last dim."""
    *lead, d = x.shape
    return x.reshape(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


def _reinterleave(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_deinterleave`."""
    *lead, d = x.shape
    return x.reshape(*lead, 2, d // 2).transpose(-1, -2).reshape(*lead, d)


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, inverse: bool = False
) -> torch.Tensor:
    if inverse:
        # R(-angle), and for deepseek the de-interleave undone after it: the adjoint of the
        # forward map, i.e. its backward.
        y = _rotate(x, cos, -sin, "neox" if layout == "deepseek" else layout)
        return _reinterleave(y) if layout == "deepseek" else y
    if layout == "deepseek":
        x = _deinterleave(x)
    if layout == "interleaved":
        # GPT-J pairs (x[2i], x[2i+1]) rotate by angle i; cos/sin halves are identical.
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        xe, xo = x[..., 0::2], x[..., 1::2]
        return torch.stack((xe * c - xo * s, xo * c + xe * s), dim=-1).flatten(-2)
    return x * cos + rotate_half(x) * sin


def rope_reference(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: torch.Tensor,
    params: RopeParams,
    *,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    compute_dtype: torch.dtype = torch.float32,
    inverse: bool = False,
    q_scale: Optional[Sequence] = None,
    q_scale_dtype: Optional[torch.dtype] = None,
    rotary_at: str = "start",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place reference rope; same conventions as :func:`yarn_triton.apply_rope_`.

    Args:
        q: ``[*T, Hq, Dq]``; heads at dim -2, head dim last.
        k: ``[*T, Hk, Dk]`` or None.
        positions: integer tensor broadcastable to ``T``; or, for params with M-RoPE
            sections, ``[3, *T]`` (time, height, width streams).
        params: the rope parameters; ``rotary_dim`` (default ``params.rope_dim``) leading
            channels of each head are rotated, the rest copied.
        layout: ``"neox"``, ``"interleaved"`` or ``"deepseek"``.
        compute_dtype: dtype of the cache and of the arithmetic (float32 like the source
            models; float64 for the truth).
        inverse: apply the inverse rotation (the backward of the forward map).
        q_scale: ``(beta, original_max)``: after the rotation, every channel of q (not k)
            is multiplied by :func:`llama4_query_scale` of its token's position, computed
            in ``compute_dtype`` and rounded to ``q_scale_dtype`` (default q's dtype, as
            transformers rounds it); one rounding of the product at the end. Not with
            M-RoPE positions.
        q_scale_dtype: see ``q_scale``.
        rotary_at: ``"start"``: the rotary part of each head is its first ``rotary_dim``
            channels; ``"end"``: its last ``rotary_dim`` channels (the pass-through
            channels come first, as in Mistral-4's ``[q_nope | q_rope]`` heads).

    Returns:
        New ``(q_out, k_out)`` in the input dtypes (``k_out`` is None when ``k`` is).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if rotary_at not in ("start", "end"):
        raise ValueError(f"rotary_at must be one of ('start', 'end'), got {rotary_at!r}")
    rot = params.rope_dim if rotary_dim is None else rotary_dim
    section = params.mrope_section
    mrope = section is not None and positions.dim() == q.dim() - 1  # [3, *T]: t, h, w streams
    if mrope:
        cos, sin = mrope_cos_sin_cache(params, positions, section, params.mrope_interleaved, compute_dtype)
    else:
        cos, sin = cos_sin_cache(params, positions, compute_dtype)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    factor = None
    if q_scale is not None:
        if mrope:
            raise ValueError("q_scale with M-RoPE [3, *T] positions is not defined")
        beta, original_max = q_scale
        factor = llama4_query_scale(positions, beta, original_max, compute_dtype)
        factor = factor.to(q_scale_dtype or q.dtype).to(compute_dtype)[..., None, None]

    def one(x: Optional[torch.Tensor], f: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if x is None:
            return None
        xc = x.to(compute_dtype)
        if rotary_at == "end":
            tail = x.shape[-1] - rot
            out = torch.cat((xc[..., :tail], _rotate(xc[..., tail:], cos, sin, layout, inverse)), dim=-1)
        else:
            out = torch.cat((_rotate(xc[..., :rot], cos, sin, layout, inverse), xc[..., rot:]), dim=-1)
        return (out if f is None else out * f).to(x.dtype)

    return one(q, factor), one(k)


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    unit_offset: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-head RMSNorm over the last dim, as transformers' Qwen3 ``q_norm``/``k_norm``
    computes it but without rounding in between: ``x * rsqrt(mean(x^2) + eps) * w`` with
    ``w = weight`` (or ``1 + weight`` when ``unit_offset``, Gemma-style), in
    ``compute_dtype``. ``x``: ``[..., D]``, ``weight``: ``[D]``. Returns ``compute_dtype``."""
    xc = x.to(compute_dtype)
    w = weight.to(compute_dtype)
    if unit_offset:
        w = 1.0 + w
    return xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps) * w


def qk_norm_rope_reference(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: torch.Tensor,
    params: RopeParams,
    q_weight: torch.Tensor,
    k_weight: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    unit_offset: bool = False,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    compute_dtype: torch.dtype = torch.float32,
    q_scale: Optional[Sequence] = None,
    rotary_at: str = "start",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place reference of :func:`yarn_triton.apply_qk_norm_rope_`: per-head RMSNorm
    of q and k (:func:`rms_norm_reference`), then the rotation of the rope part (and
    ``q_scale``, as in :func:`rope_reference`, its factor rounded to q's dtype; ``rotary_at``
    as there: the norm covers the whole head either way), all in ``compute_dtype``.
    Returns new ``(q_out, k_out)`` in the input dtypes."""
    qn = rms_norm_reference(q, q_weight, eps, unit_offset=unit_offset, compute_dtype=compute_dtype)
    kn = None if k is None else rms_norm_reference(k, k_weight, eps, unit_offset=unit_offset,
                                                   compute_dtype=compute_dtype)
    qo, ko = rope_reference(qn, kn, positions, params, layout=layout, rotary_dim=rotary_dim,
                            compute_dtype=compute_dtype, q_scale=q_scale, q_scale_dtype=q.dtype, rotary_at=rotary_at)
    return qo.to(q.dtype), (None if k is None else ko.to(k.dtype))


def positions_from_offsets(
    q: torch.Tensor,
    offsets: Union[int, torch.Tensor, None] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    cp: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Explicit int64 positions for the implicit forms (reference path only; the kernel
    derives them itself).

    * ``cu_seqlens`` ``[B+1]`` with packed ``q`` ``[T, H, D]``: position of token ``t`` of
      sequence ``i`` is ``t - cu_seqlens[i] (+ offsets[i])``; tokens outside
      ``[cu_seqlens[0], cu_seqlens[-1])`` get position -1 (the kernel leaves them untouched).
    * otherwise ``q`` ``[B, S, H, D]`` (or ``[S, H, D]``): ``s (+ offsets[b])``.

    ``cp = (cp_size, cp_rank)``: each sequence is that rank's head-tail shard of a
    context-parallel split (chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of
    ``2 * cp_size``): the index in it is replaced by the global one (:func:`cp_global_index`).
    """
    dev = q.device
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=dev, dtype=torch.int64)
        t = torch.arange(q.shape[0], device=dev)
        seq = (torch.searchsorted(cu, t, right=True) - 1).clamp(0, max(cu.numel() - 2, 0))
        pos = t - cu[seq]
        if cp is not None:
            pos = cp_global_index(pos, cu[seq + 1] - cu[seq], cp)
        if isinstance(offsets, torch.Tensor):
            pos = pos + offsets.to(device=dev, dtype=torch.int64)[seq]
        elif offsets:
            pos = pos + int(offsets)
        return pos
    S = q.shape[-3]
    pos = torch.arange(S, device=dev, dtype=torch.int64)
    if cp is not None:
        pos = cp_global_index(pos, S, cp)
    if q.dim() == 4:
        pos = pos.expand(q.shape[0], S)
    if isinstance(offsets, torch.Tensor):  # one per sequence: [B] of [B, S, H, D], [1] of [S, H, D]
        off = offsets.to(device=dev, dtype=torch.int64)
        pos = pos + (off[:, None] if q.dim() == 4 else off[0])
    elif offsets:
        pos = pos + int(offsets)
    return pos


def cp_global_index(local: torch.Tensor, n_local: Union[int, torch.Tensor], cp: Tuple[int, int]) -> torch.Tensor:
    """Global indices in their sequences of the tokens at indices ``local`` of context-parallel
    shards of ``n_local`` tokens (an int, or one per token), for ``cp = (cp_size, cp_rank)``:
    a head-tail shard is chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank`` of the
    ``2 * cp_size`` equal chunks of its global sequence (torch's ``_HeadTailLoadBalancer``,
    TransformerEngine's ``cp_size``/``cp_rank``), so ``n_local`` is two chunks."""
    size, rank = cp
    chunk = torch.as_tensor(n_local, dtype=torch.int64, device=local.device) // 2
    local = local.to(torch.int64)
    return local + chunk * torch.where(local < chunk, rank, 2 * size - 2 - rank)


def packed_token_mask(q: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[T]`` bool: which tokens of a packed batch belong to a sequence."""
    t = torch.arange(q.shape[0], device=q.device)
    cu = cu_seqlens.to(q.device)
    return (t >= cu[0]) & (t < cu[-1])


def apply_rope_reference_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: torch.Tensor,
    params: RopeParams,
    *,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    inverse: bool = False,
    token_mask: Optional[torch.Tensor] = None,
    out: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
    q_scale: Optional[Sequence] = None,
    q_scale_dtype: Optional[torch.dtype] = None,
    rotary_at: str = "start",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """In-place (or into ``out``) form of :func:`rope_reference` with float32 math, used
    for CPU tensors. Tokens where ``token_mask`` is False are copied unchanged."""
    q_new, k_new = rope_reference(q, k, positions, params, layout=layout, rotary_dim=rotary_dim,
                                  inverse=inverse, q_scale=q_scale, q_scale_dtype=q_scale_dtype,
                                  rotary_at=rotary_at)
    dst_q, dst_k = (q, k) if out is None else out
    for dst, src, new in ((dst_q, q, q_new), (dst_k, k, k_new)):
        if dst is None:
            continue
        if token_mask is not None:
            new = torch.where(token_mask.view(-1, *([1] * (src.dim() - 1))), new, src)
        dst.copy_(new)
    return dst_q, dst_k
