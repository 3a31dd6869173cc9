"""The op layer: argument checking, geometry, and dispatch to the kernel or the reference.

Everything a caller can get wrong is checked here, before any launch, so a bad call raises
and leaves q and k untouched.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .reference import LAYOUTS, apply_rope_reference_
from .rope import RopeParams
from .kernels.rope_kernel import INTERPRETED, LaunchConfig, launch_rope

__all__ = ["apply_rope_", "LAYOUTS"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_POS_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------
# Layout -> kernel switches
# --------------------------------------------------------------------------------------
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
# Checks
# --------------------------------------------------------------------------------------
def _check_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 3:
        raise ValueError(
            f"{name} must have shape [*tokens, heads, head_dim] with at least one token dim, "
            f"got shape {tuple(t.shape)}"
        )
    if torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"{name} has overlapping elements (e.g. an expand()ed view); it cannot be written in place")


def _extent(t: torch.Tensor) -> Tuple[int, int]:
    """Byte range ``[lo, hi)`` that ``t``'s elements occupy."""
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return lo, lo
        span = (size - 1) * stride * t.element_size()
        lo, hi = (lo + span, hi) if span < 0 else (lo, hi + span)
    return lo, hi + t.element_size()


def _nested(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """True when, in decreasing stride order, each stride exceeds the span of all smaller ones
    (then an element offset has one decomposition into indices)."""
    span = 0
    for size, stride in sorted(zip(sizes, strides), key=lambda p: p[1]):
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True


def _offsets_meet(diff: int, dims: List[Tuple[int, int, int]]) -> bool:
    """Is ``diff == sum(c_d * stride_d)`` with ``-(nb_d-1) <= c_d <= na_d-1``? ``dims`` are
    ``(stride, na, nb)`` in decreasing stride order, strides nested."""
    if not dims:
        return diff == 0
    (stride, na, nb), rest = dims[0], dims[1:]
    c = diff // stride
    return any(
        -(nb - 1) <= cc <= na - 1 and _offsets_meet(diff - cc * stride, rest) for cc in (c, c + 1)
    )


def _may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors might share an element. Exact for views with equal nested strides
    (q/k heads of one fused projection); conservative otherwise."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (alo, ahi), (blo, bhi) = _extent(a), _extent(b)
    if ahi <= blo or bhi <= alo:
        return False
    if a.element_size() != b.element_size() or a.stride() != b.stride() or a.dim() != b.dim():
        return True
    sizes = [max(x, y) for x, y in zip(a.shape, b.shape)]
    if not _nested(sizes, a.stride()) or any(s < 0 for s in a.stride()):
        return True
    diff_bytes = b.data_ptr() - a.data_ptr()
    if diff_bytes % a.element_size():
        return True
    dims = sorted(
        ((s, na, nb) for s, na, nb in zip(a.stride(), a.shape, b.shape) if na > 1 or nb > 1),
        key=lambda p: -p[0],
    )
    return _offsets_meet(diff_bytes // a.element_size(), dims)


def check_rope_args(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: torch.Tensor,
    params: RopeParams,
    layout: str,
    rotary_dim: Optional[int],
) -> int:
    """Validate a rope call; returns the rotary dim. Raises TypeError/ValueError naming the
    offending argument."""
    if not isinstance(params, RopeParams):
        raise TypeError(f"params must be a yarn_triton.RopeParams, got {type(params).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_tensor("q", q)
    if k is not None:
        _check_tensor("k", k)
        if k.device != q.device:
            raise ValueError(f"k is on {k.device} but q is on {q.device}; they must share a device")
        if k.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"k's token dims {tuple(k.shape[:-2])} must equal q's {tuple(q.shape[:-2])} "
                f"(shapes [*tokens, heads, head_dim])"
            )
        if _may_overlap(q, k):
            raise ValueError("q and k overlap in memory; in-place rope needs them disjoint")

    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if positions.dtype not in _POS_DTYPES:
        raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
    if positions.device != q.device:
        raise ValueError(f"positions is on {positions.device} but q is on {q.device}")
    tokens = tuple(q.shape[:-2])
    try:
        shape = torch.broadcast_shapes(tuple(positions.shape), tokens)
    except RuntimeError:
        shape = None
    if shape != tokens:
        raise ValueError(
            f"positions of shape {tuple(positions.shape)} do not broadcast to q's token dims {tokens}"
        )

    rot = params.rope_dim if rotary_dim is None else rotary_dim
    if isinstance(rot, bool) or not isinstance(rot, int):
        raise TypeError(f"rotary_dim must be an int or None, got {type(rotary_dim).__name__}")
    if rot <= 0 or rot % 2:
        raise ValueError(f"rotary_dim must be a positive even integer, got {rot}")
    if rot != params.rope_dim:
        raise ValueError(
            f"rotary_dim={rot} but params were built for rope_dim={params.rope_dim} "
            f"({params.rope_dim // 2} frequencies); build the params with dim={rot}"
        )
    for name, t in (("q", q), ("k", k)):
        if t is not None and t.shape[-1] < rot:
            raise ValueError(
                f"{name}'s head dim (last dim) is {t.shape[-1]}, smaller than rotary_dim={rot}"
            )
    return rot


# --------------------------------------------------------------------------------------
# Geometry: fold the token dims of q, k and positions into (batch, seq)
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


def _launch(q, k, pos, params, rot, layout, inverse, precise, config) -> None:
    tokens = tuple(q.shape[:-2])
    pos = pos.expand(tokens)
    tensors = [q, pos] if k is None else [q, pos, k]
    sizes, strides = _fold_tokens(tokens, [t.stride()[: len(tokens)] for t in tensors])
    if len(sizes) > 2:
        # Three or more token dims that no stride folds together: peel the outermost.
        for i in range(q.shape[0]):
            _launch(q[i], None if k is None else k[i], pos[i], params, rot, layout, inverse, precise, config)
        return
    while len(sizes) < 2:
        sizes.insert(0, 1)
        strides = [[0] + st for st in strides]
    (q_sb, q_ss), (p_sb, p_ss) = strides[0], strides[1]
    k_strides = None if k is None else (*strides[2], k.stride(-2), k.stride(-1))
    in_pairs, out_pairs = layout_switches(layout, inverse)
    launch_rope(
        q, (q_sb, q_ss, q.stride(-2), q.stride(-1)),
        k, k_strides,
        pos, (p_sb, p_ss),
        params.inv_freq_on(q.device), params.cos_sin_scale,
        sizes[0] * sizes[1], sizes[1],
        rot // 2, in_pairs, out_pairs, inverse, precise, config,
    )


def uses_kernel(t: torch.Tensor) -> bool:
    """CUDA tensors always go through the kernel; CPU tensors only under TRITON_INTERPRET=1."""
    return t.device.type == "cuda" or (INTERPRETED and t.device.type == "cpu")


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------
def apply_rope_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: torch.Tensor,
    params: RopeParams,
    *,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    precise_angles: bool = True,
    config: Optional[LaunchConfig] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate q and k in place with rotary position embeddings (one kernel launch).

    Args:
        q: ``[*T, Hq, Dq]`` float32/float16/bfloat16, any strides (views of a fused
            projection, or ``[B, H, S, D].transpose(1, 2)``), CUDA (or CPU).
        k: ``[*T, Hk, Dk]`` with the same token dims ``T`` and device as q (head counts
            may differ: MHA, GQA, MQA, MLA), or None to rotate q alone.
        positions: int32/int64 tensor of shape ``T`` or broadcastable to it; any values,
            also past the model's max_position_embeddings.
        params: :class:`RopeParams` (``inv_freq`` and cos/sin scale).
        layout: ``"neox"`` (rotate_half: Llama, Qwen), ``"interleaved"`` (GPT-J pairs) or
            ``"deepseek"`` (pairs de-interleaved, then rotate_half; output stays split).
        rotary_dim: channels rotated per head, default and only valid value
            ``params.rope_dim``; channels ``rotary_dim:`` of each head are left untouched.
        precise_angles: form angles in float64 and reduce by 2*pi in the kernel (accurate
            at any position); False gives the float32 ``position * inv_freq`` of
            materialised caches.
        config: explicit launch shape (benchmarks); default picks one.

    Returns:
        ``(q, k)``, the same tensors, rotated. CPU tensors take the PyTorch reference path
        (float32 angles) unless ``TRITON_INTERPRET=1``, where they run the kernel.
    """
    rot = check_rope_args(q, k, positions, params, layout, rotary_dim)
    if not uses_kernel(q):
        return apply_rope_reference_(q, k, positions, params, layout=layout, rotary_dim=rot)
    if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
        raise RuntimeError(
            "apply_rope_ on tensors that require grad is not supported by the in-place kernel; "
            "use yarn_triton.apply_rope (out of place, differentiable)"
        )
    _launch(q, k, positions, params, rot, layout, False, precise_angles, config)
    return q, k
