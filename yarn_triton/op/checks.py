"""Argument checks: everything a caller can get wrong, raised before any launch.

A bad call must raise a TypeError/ValueError naming the argument and leave q and k
untouched, so every check runs ahead of the kernel (on the full path; a replayed plan
skips those its signature already passed). Also the small value types the checks
normalise arguments into (:class:`Norm`, :class:`QueryScale`) and the M-RoPE switch of
a params object, which the later layers pass on without looking inside.
"""

from __future__ import annotations

import math
import os
from typing import List, NamedTuple, Optional, Tuple, Union

import torch

from ..kernels.configs import LaunchConfig
from ..reference import LAYOUTS
from ..rope import RopeParams
from .overlap import may_overlap, self_overlapping


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Values of ``rotary_at``: where a head's rotary part lies ("start": its first
#: ``rotary_dim`` channels; "end": its last ``rotary_dim`` channels).
ROTARY_AT = ("start", "end")
_INT_DTYPES = (torch.int32, torch.int64)
Offsets = Union[int, torch.Tensor, None]


def _check_tensor(name: str, t: torch.Tensor, inplace: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < 3:
        raise ValueError(
            f"{name} must have shape [*tokens, heads, head_dim] with at least one token dim, "
            f"got shape {tuple(t.shape)}"
        )
    if inplace and not torch.compiler.is_compiling() and self_overlapping(t):
        raise ValueError(
            f"{name} has overlapping elements (e.g. an expand()ed view); it cannot be written in place"
        )


def _check_index_tensor(name: str, t: torch.Tensor, device: torch.device, on: str = "q") -> None:
    """``t`` an int32/int64 tensor on ``device``, the device of the argument named ``on``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {on} is on {device}; they must share a device")


def mrope_spec(params: RopeParams) -> Tuple[int, int, int, int]:
    """``(kind, s_t, s_h, s_w)`` of the kernel's M-RoPE switch for ``params``: kind 0 when
    they carry no sections, 1 sectioned, 2 interleaved."""
    if params.mrope_section is None:
        return (0, 0, 0, 0)
    return (2 if params.mrope_interleaved else 1, *params.mrope_section)


def mrope_list(params: RopeParams) -> Optional[List[int]]:
    """:func:`mrope_spec` as the custom ops take it: a list, or None without sections."""
    spec = mrope_spec(params)
    return list(spec) if spec[0] else None


def split_offsets(offsets: Offsets) -> Tuple[Optional[torch.Tensor], int]:
    """``offsets`` as the kernel takes them: ``(per-sequence tensor or None, int base)``."""
    if isinstance(offsets, torch.Tensor):
        return offsets, 0
    return None, int(offsets or 0)


def check_rope_args(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    params: RopeParams,
    layout: str,
    rotary_dim: Optional[int],
    offsets: Offsets = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    inplace: bool = True,
) -> int:
    """Validate a rope call; returns the rotary dim. Raises TypeError/ValueError naming the
    offending argument. Memory overlap matters (and is checked) only for in-place calls;
    under torch.compile, functionalization owns aliasing, so it is not inspected there."""
    if not isinstance(params, RopeParams):
        raise TypeError(f"params must be a yarn_triton.RopeParams, got {type(params).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    _check_tensor("q", q, inplace)
    if k is not None:
        _check_tensor("k", k, inplace)
        if k.device != q.device:
            raise ValueError(f"k is on {k.device} but q is on {q.device}; they must share a device")
        if k.shape[:-2] != q.shape[:-2]:
            raise ValueError(
                f"k's token dims {tuple(k.shape[:-2])} must equal q's {tuple(q.shape[:-2])} "
                f"(shapes [*tokens, heads, head_dim])"
            )
        if inplace and not torch.compiler.is_compiling() and may_overlap(q, k):
            raise ValueError("q and k overlap in memory; in-place rope needs them disjoint")

    tokens = tuple(q.shape[:-2])
    if positions is not None:
        if offsets is not None or cu_seqlens is not None:
            raise ValueError("give either positions, or offsets/cu_seqlens to derive them, not both")
        _check_index_tensor("positions", positions, q.device)
        shape = tuple(positions.shape)
        if mrope_spec(params)[0] and len(shape) == len(tokens) + 1:  # [3, *T]: t, h, w streams
            if shape[0] != 3:
                raise ValueError(
                    f"M-RoPE positions must be [3, *tokens] (time, height, width), got leading dim {shape[0]} "
                    f"in shape {shape}"
                )
            shape = shape[1:]
        elif len(shape) == len(tokens) + 1 and shape[0] == 3:
            raise ValueError(
                f"positions of shape {tuple(positions.shape)} look like M-RoPE [3, *tokens] streams, but params "
                f"carry no mrope_section; build them from the model config or with mrope_section=..."
            )
        if not _broadcasts_to(shape, tokens):
            raise ValueError(
                f"positions of shape {tuple(positions.shape)} do not broadcast to q's token dims {tokens}"
            )
    elif cu_seqlens is not None:
        _check_index_tensor("cu_seqlens", cu_seqlens, q.device)
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must be 1-D [batch + 1] with batch >= 1, got shape {tuple(cu_seqlens.shape)}")
        if q.dim() != 3:
            raise ValueError(f"with cu_seqlens, q must be packed [total_tokens, heads, head_dim], got {tuple(q.shape)}")
        _check_offsets(offsets, cu_seqlens.shape[0] - 1, q.device)
    else:
        if q.dim() not in (3, 4):
            raise ValueError(
                "without positions, q must be [batch, seq, heads, head_dim] or [seq, heads, head_dim] "
                f"(position = offset + index in the sequence), got {tuple(q.shape)}"
            )
        _check_offsets(offsets, q.shape[0] if q.dim() == 4 else 1, q.device)

    rot = check_rotary_dim(rotary_dim, params)
    for name, t in (("q", q), ("k", k)):
        if t is not None and t.shape[-1] < rot:
            raise ValueError(f"{name}'s head dim (last dim) is {t.shape[-1]}, smaller than rotary_dim={rot}")
    return rot


def check_rotary_dim(rotary_dim, params: RopeParams) -> int:
    """The rotary dim of a call (``params.rope_dim`` when None): TypeError/ValueError naming
    the argument unless it is a positive even int equal to the params' dim."""
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
    return rot


def check_rotary_at(rotary_at) -> bool:
    """Whether the rotary part is at the end of each head (``rotary_at == "end"``);
    ValueError naming the argument unless it is one of :data:`ROTARY_AT`."""
    if type(rotary_at) is not str or rotary_at not in ROTARY_AT:
        raise ValueError(f"rotary_at must be one of {ROTARY_AT}, got {rotary_at!r}")
    return rotary_at == "end"


def _broadcasts_to(shape: Tuple[int, ...], target: Tuple[int, ...]) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (cheaper than torch.broadcast_shapes)."""
    if len(shape) > len(target):
        return False
    return all(n == 1 or n == t for n, t in zip(reversed(shape), reversed(target)))


def _check_config(config: LaunchConfig) -> None:
    if not isinstance(config, LaunchConfig):
        raise TypeError(f"config must be a LaunchConfig or None, got {type(config).__name__}")
    for name in ("block_t", "block_h", "num_warps"):
        v = getattr(config, name)
        if not isinstance(v, int) or v < 1 or v & (v - 1) or v > 1024:
            raise ValueError(f"config.{name} must be a power of two in [1, 1024], got {v!r}")
    if not isinstance(config.num_stages, int) or not 1 <= config.num_stages <= 8:
        raise ValueError(f"config.num_stages must be an int in [1, 8], got {config.num_stages!r}")
    g = config.head_groups
    if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= 65535:
        raise ValueError(f"config.head_groups must be an int in [1, 65535], got {g!r}")


def _check_offsets(offsets: Offsets, n_seqs: int, device: torch.device) -> None:
    if offsets is None or (isinstance(offsets, int) and not isinstance(offsets, bool)):
        return
    _check_index_tensor("offsets", offsets, device)
    if tuple(offsets.shape) != (n_seqs,):
        raise ValueError(f"offsets must have shape ({n_seqs},), one per sequence, got {tuple(offsets.shape)}")


class Norm(NamedTuple):
    """A per-head RMSNorm fused before the rotation: ``kind`` 1 multiplies by ``weight``,
    2 by ``1 + weight`` (Gemma, Qwen3.5)."""

    q_weight: torch.Tensor
    k_weight: Optional[torch.Tensor]
    eps: float
    kind: int


def check_norm_args(q: torch.Tensor, k: Optional[torch.Tensor], norm: Norm) -> None:
    """Raise TypeError/ValueError naming the argument unless each weight is a contiguous
    float ``[head_dim]`` tensor on q's device and ``eps`` a finite number > 0."""
    for name, w, x in (("q_weight", norm.q_weight, q), ("k_weight", norm.k_weight, k)):
        if x is None:
            if w is not None:
                raise ValueError(f"{name} was given but its tensor is None")
            continue
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape ({x.shape[-1]},), got {type(w).__name__}")
        if w.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device} but q is on {x.device}; they must share a device")
        if tuple(w.shape) != (x.shape[-1],):
            raise ValueError(f"{name} must have shape ({x.shape[-1]},) (the head dim), got {tuple(w.shape)}")
        if w.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous (stride 1), got stride {w.stride(0)}")
    eps = norm.eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < float("inf")):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")


class QueryScale(NamedTuple):
    """Llama-4 style query scaling (Ministral-3, Mistral-4's ``llama_4_scaling_beta``),
    fused into the rope pass: every channel of q (the pass-through channels of a partial
    rotary too; k is not scaled) is multiplied by

        ``1 + beta * log(1 + floor(position / original_max))``

    of its token's position, after the rotation. The floor is an exact integer division;
    the factor is computed in float32 and rounded to q's dtype, as transformers'
    ``get_llama_4_attn_scale(...).to(q.dtype)``; the product is rounded once.

    Attributes:
        beta: ``llama_4_scaling_beta``, a finite number.
        original_max: ``original_max_position_embeddings``, a positive int.
    """

    beta: float
    original_max: int


def check_q_scale(q_scale, params: Optional[RopeParams] = None) -> QueryScale:
    """The :class:`QueryScale` of a ``q_scale`` argument (a QueryScale or a ``(beta,
    original_max)`` tuple), or ValueError/TypeError naming what is wrong (also when
    ``params`` carry M-RoPE sections)."""
    if not isinstance(q_scale, tuple) or len(q_scale) != 2:
        raise TypeError(f"q_scale must be a QueryScale(beta, original_max) or a (beta, original_max) tuple, "
                        f"got {q_scale!r}")
    beta, omax = q_scale
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"q_scale.beta must be a finite number, got {beta!r}")
    if isinstance(omax, bool) or not isinstance(omax, int) or not 0 < omax < (1 << 63):
        raise ValueError(f"q_scale.original_max must be a positive int (original_max_position_embeddings), "
                         f"got {omax!r}")
    if params is not None and mrope_spec(params)[0]:
        raise ValueError("q_scale is not supported with M-RoPE params (mrope_section): which position stream "
                         "would scale q is not defined")
    return QueryScale(float(beta), int(omax))


# YARN_TRITON_CHECK_CU_SEQLENS=1 makes check_cu_seqlens=True the default.
CHECK_CU_SEQLENS = os.environ.get("YARN_TRITON_CHECK_CU_SEQLENS", "0") not in ("", "0")


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, n_tokens: int, cp: Optional[Tuple[int, int]] = None) -> None:
    """Raise ValueError unless ``cu_seqlens`` starts at 0, never decreases and ends at or
    before ``n_tokens`` (and, with a context-parallel ``cp`` of more than one rank, every
    sequence's length is even: two chunks). Reads the values: one device synchronisation."""
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0]={cu[0].item()}")
    steps = cu[1:] - cu[:-1]
    if (steps < 0).any():
        i = int(torch.nonzero(steps < 0)[0, 0])
        raise ValueError(f"cu_seqlens must not decrease: cu_seqlens[{i + 1}]={cu[i + 1].item()} "
                         f"< cu_seqlens[{i}]={cu[i].item()}")
    if cu[-1].item() > n_tokens:
        raise ValueError(f"cu_seqlens ends at {cu[-1].item()}, past the {n_tokens} tokens of q")
    if cp is not None and cp[0] > 1 and (steps % 2 != 0).any():
        i = int(torch.nonzero(steps % 2 != 0)[0, 0])
        raise ValueError(f"with cp={tuple(cp)}, every local sequence is two chunks of its global sequence "
                         f"and must have an even length; sequence {i} has {steps[i].item()} tokens "
                         f"(cu_seqlens[{i}]={cu[i].item()}, cu_seqlens[{i + 1}]={cu[i + 1].item()})")


def _check_cu(cu_seqlens, check, q, cp=None) -> None:
    if cu_seqlens is not None and (CHECK_CU_SEQLENS if check is None else check) \
            and not torch.compiler.is_compiling():
        check_cu_seqlens_values(cu_seqlens, q.shape[0], cp)


def check_cp(cp, q: torch.Tensor, positions: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor]) -> None:
    """Raise TypeError/ValueError naming the argument unless ``cp`` is None or a
    ``(cp_size, cp_rank)`` pair of ints with ``cp_size >= 1`` and ``0 <= cp_rank <
    cp_size``, given without ``positions``, and (contiguous sequences, more than one rank)
    q's sequence length is even. Packed sequences' lengths are values: checked by
    :func:`check_cu_seqlens_values` (``check_cu_seqlens``)."""
    if cp is None:
        return
    if not isinstance(cp, tuple) or len(cp) != 2 or \
            any(isinstance(v, bool) or not isinstance(v, int) for v in cp):
        raise TypeError(f"cp must be None or a (cp_size, cp_rank) tuple of two ints, got {cp!r}")
    size, rank = cp
    if size < 1:
        raise ValueError(f"cp: cp_size must be >= 1, got cp={cp!r}")
    if not 0 <= rank < size:
        raise ValueError(f"cp: cp_rank must be in [0, cp_size) = [0, {size}), got cp={cp!r}")
    if size >= 1 << 30:
        raise ValueError(f"cp: cp_size must be below 2**30, got cp={cp!r}")
    if positions is not None:
        raise ValueError("cp derives each token's global position from its index in a context-parallel shard; "
                         "it cannot be combined with positions (positions sharded with q already hold the "
                         "global positions: pass them alone)")
    if size > 1 and cu_seqlens is None and q.shape[-3] % 2:
        raise ValueError(f"with cp={cp!r}, q's local sequence (the head and tail chunks of the global one) must "
                         f"have an even length, got {q.shape[-3]} tokens in q of shape {tuple(q.shape)}")


def _check_call(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, norm, q_scale, rotary_at,
                inplace: bool, cp=None) -> Tuple[int, Optional[QueryScale]]:
    """Every argument check of a rope / norm + rope call that does not replay a known
    signature: ``(rotary dim, normalised q_scale)``, or a clear error before any launch."""
    check_rotary_at(rotary_at)
    rot = check_rope_args(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, inplace=inplace)
    check_cp(cp, q, positions, cu_seqlens)
    if norm is not None:
        check_norm_args(q, k, norm)
    if q_scale is not None:
        q_scale = check_q_scale(q_scale, params)
    return rot, q_scale
