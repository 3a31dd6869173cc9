"""The op layer: argument checking, geometry, custom ops and autograd.

Data flows one way: the public functions check everything a caller can get wrong (before
any launch, so a bad call raises and leaves q and k untouched), then run either directly
(eager) or through the ``torch.library`` custom ops (under ``torch.compile``, and for
autograd), which end in :func:`_execute`: the kernel for CUDA tensors (and CPU tensors
under ``TRITON_INTERPRET=1``), the PyTorch reference for other CPU tensors.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as _forward_ad

from .reference import (LAYOUTS, apply_rope_reference_, packed_token_mask, positions_from_offsets,
                        rms_norm_reference)
from .rope import RopeParams
from .kernels.rope_kernel import INTERPRETED, LaunchConfig, Operand, launch_rope

__all__ = ["apply_rope_", "apply_rope", "apply_qk_norm_rope_", "apply_qk_norm_rope", "QueryScale", "LAYOUTS"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Values of ``rotary_at``: where a head's rotary part lies ("start": its first
#: ``rotary_dim`` channels; "end": its last ``rotary_dim`` channels).
ROTARY_AT = ("start", "end")
_INT_DTYPES = (torch.int32, torch.int64)
Offsets = Union[int, torch.Tensor, None]


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
    if inplace and not torch.compiler.is_compiling() and _self_overlapping(t):
        raise ValueError(
            f"{name} has overlapping elements (e.g. an expand()ed view); it cannot be written in place"
        )


def _self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory: torch's check, plus our stride test where
    torch answers "too hard" (e.g. as_strided views)."""
    verdict = torch._debug_has_internal_overlap(t)
    return verdict == 1 or (verdict == 2 and not _nested(t.shape, [abs(s) for s in t.stride()]))


def _check_index_tensor(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; they must share a device")


def _extent(t: torch.Tensor) -> Tuple[int, int]:
    """Byte range ``[lo, hi)`` that ``t``'s elements occupy."""
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        span = (size - 1) * stride * t.element_size()
        lo, hi = (lo + span, hi) if span < 0 else (lo, hi + span)
    return lo, hi + t.element_size()


def _nested(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """True when, in increasing stride order, each stride exceeds the span of all smaller
    ones (then an element offset has one decomposition into indices)."""
    span = 0
    for size, stride in sorted(zip(sizes, strides), key=lambda p: p[1]):
        if size == 1:  # a single index: its stride never matters
            continue
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
    """Whether two tensors might share an element. Exact for views with equal nested
    strides (q/k heads of one fused projection); conservative otherwise."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (alo, ahi), (blo, bhi) = _extent(a), _extent(b)
    if ahi <= blo or bhi <= alo:  # disjoint byte ranges (the common case, and cheapest)
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.element_size() != b.element_size() or a.dim() != b.dim():
        return True
    # A size-1 dim's stride never matters (views of one projection may differ there): use
    # the stride of the tensor that spans the dim; both spanning it must agree.
    strides = []
    for sa, sb, na, nb in zip(a.stride(), b.stride(), a.shape, b.shape):
        if na > 1 and nb > 1 and sa != sb:
            return True
        strides.append(sa if na > 1 else sb)
    sizes = [max(x, y) for x, y in zip(a.shape, b.shape)]
    if any(s < 0 for s in strides) or not _nested(sizes, strides):
        return True
    diff_bytes = b.data_ptr() - a.data_ptr()
    if diff_bytes % a.element_size():
        return True
    dims = sorted(
        ((s, na, nb) for s, na, nb in zip(strides, a.shape, b.shape) if na > 1 or nb > 1),
        key=lambda p: -p[0],
    )
    return _offsets_meet(diff_bytes // a.element_size(), dims)


def mrope_spec(params: RopeParams) -> Tuple[int, int, int, int]:
    """``(kind, s_t, s_h, s_w)`` of the kernel's M-RoPE switch for ``params``: kind 0 when
    they carry no sections, 1 sectioned, 2 interleaved."""
    if params.mrope_section is None:
        return (0, 0, 0, 0)
    return (2 if params.mrope_interleaved else 1, *params.mrope_section)


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
        if inplace and not torch.compiler.is_compiling() and _may_overlap(q, k):
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
            raise ValueError(f"{name}'s head dim (last dim) is {t.shape[-1]}, smaller than rotary_dim={rot}")
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


def _launch_kernel(q, qo, k, ko, positions, offsets, pos_base, cu_seqlens, inv_freq, scale,
                   rot, layout, inverse, precise, config, traced=False, norm=None, mrope=None, q_scale=None,
                   rotary_at="start"):
    """Fold the token dims and launch; returns the kernel's :class:`PreparedLaunch` (None
    when the call took several launches or cannot be replayed)."""
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
        kop = None if k is None else _operand(k, ko, (bs(k), bs(ko)))
        return launch_rope(qop, kop, inv_freq, scale, n_tokens=B * S, seq_len=S,
                           per_token_positions=None, pos_strides=(0, 0), **common)

    tokens = tuple(q.shape[:-2])
    if mrope is not None and positions.dim() == len(tokens) + 1:
        # M-RoPE [3, *T] streams: handled as [*T, 3], the stream stride passed apart
        pos = positions.expand((3,) + tokens).movedim(0, -1)
        common.update(mrope=mrope, pos_stream_stride=pos.stride(-1))
        first = pos[..., 0]
    else:
        pos = first = positions.expand(tokens)
    tensors = [q, qo, first] + ([] if k is None else [k, ko])
    sizes, strides = _fold_tokens(tokens, [t.stride()[: len(tokens)] for t in tensors])
    if len(sizes) > 2:
        # Three or more token dims that no stride folds together: peel the outermost.
        for i in range(q.shape[0]):
            pos_i = pos[i].movedim(-1, 0) if pos is not first else pos[i]
            _launch_kernel(q[i], qo[i], None if k is None else k[i], None if k is None else ko[i],
                           pos_i, offsets, pos_base, cu_seqlens, inv_freq, scale,
                           rot, layout, inverse, precise, config, traced, norm, mrope, q_scale, rotary_at)
        return None
    while len(sizes) < 2:
        sizes.insert(0, 1)
        strides = [[0] + st for st in strides]
    qop = _operand(q, qo, strides[0:2])
    kop = None if k is None else _operand(k, ko, strides[3:5])
    return launch_rope(qop, kop, inv_freq, scale, n_tokens=sizes[0] * sizes[1], seq_len=sizes[1],
                       per_token_positions=first, pos_strides=tuple(strides[2]), **common)


def uses_kernel(t: torch.Tensor) -> bool:
    """CUDA tensors always go through the kernel; CPU tensors only under TRITON_INTERPRET=1."""
    return t.device.type == "cuda" or (INTERPRETED and t.device.type == "cpu")


def _execute(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
             rot, layout, inverse, precise, config=None, traced=False, norm=None, mrope=None, q_scale=None,
             rotary_at="start"):
    """Rotate ``q``/``k`` (RMS-normalised first when ``norm``; q scaled after when
    ``q_scale``) into ``qo``/``ko`` (the same tensors for in place); the rotary part of
    each head is its first ``rot`` channels, or its last ones for ``rotary_at="end"``.
    Returns the launch's :class:`PreparedLaunch` when it can be replayed."""
    if uses_kernel(q):
        return _launch_kernel(q, qo, k, ko, positions, offsets, pos_base, cu_seqlens, inv_freq, scale,
                              rot, layout, inverse, precise, config, traced, norm,
                              mrope if mrope is not None and mrope[0] else None, q_scale, rotary_at)
    mask = None
    if positions is None:
        positions = positions_from_offsets(q, offsets if offsets is not None else pos_base, cu_seqlens)
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


# --------------------------------------------------------------------------------------
# Launch plans: the eager fast path
# --------------------------------------------------------------------------------------
class _Plan:
    """What a validated call signature needs to run again: the prepared kernel launch and
    the per-call checks that depend on more than the signature (where q and k lie in
    memory). Holds ``params`` so that its ``id`` in the key cannot be reused."""

    __slots__ = ("launch", "params", "inv_freq", "inv_ptr", "q_span", "k_span", "fused_ok")

    def __init__(self, launch, params, inv_freq, q, k):
        self.launch = launch
        self.params = params
        self.inv_freq = inv_freq
        self.inv_ptr = inv_freq.data_ptr()
        self.q_span = _span(q)
        self.k_span = None if k is None else _span(k)
        self.fused_ok: set = set()  # pointer distances of q/k views checked disjoint

    def run(self, q, k, positions, offsets, cu_seqlens, pos_base, qo=None, ko=None, norm=None) -> None:
        """Checks what can differ for the same signature, then launches."""
        qp = q.data_ptr()
        if k is None:
            kp = qp
            k = q
        else:
            kp = k.data_ptr()
            if qo is None:  # in place: q and k must not share elements
                self._check_disjoint(q, k, qp, kp)
        qop, kop = (qp, kp) if qo is None else (qo.data_ptr(), qp if ko is None else ko.data_ptr())
        qo = q if qo is None else qo
        ko = k if ko is None else ko
        inv = self.inv_freq
        pos = positions if positions is not None else offsets
        cu = cu_seqlens if cu_seqlens is not None else inv
        pos = pos if pos is not None else inv
        if norm is None:
            qw = kw = inv
        else:
            qw = norm.q_weight
            kw = qw if norm.k_weight is None else norm.k_weight
        self.launch((qp, qop, kp, kop, pos.data_ptr(), cu.data_ptr(), self.inv_ptr, qw.data_ptr(), kw.data_ptr()),
                    pos_base, (q, qo, k, ko, pos, cu, inv, qw, kw))

    def _check_disjoint(self, q, k, qp, kp) -> None:
        (qlo, qhi), (klo, khi) = self.q_span, self.k_span
        if qp + qhi <= kp + klo or kp + khi <= qp + qlo:
            return
        diff = kp - qp
        if diff in self.fused_ok:
            return
        if _may_overlap(q, k):
            raise ValueError("q and k overlap in memory; in-place rope needs them disjoint")
        if len(self.fused_ok) < 64:
            self.fused_ok.add(diff)


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """Byte range of ``t``'s elements relative to its data pointer."""
    lo, hi = _extent(t)
    return lo - t.data_ptr(), hi - t.data_ptr()


# Bounded: a server sees many token counts; the least recently used signature goes first.
_PLANS: "OrderedDict" = OrderedDict()
_PLANS_MAX = 512


def plan_cache_size() -> int:
    """Number of call signatures the eager fast path holds (bounded by ``_PLANS_MAX``)."""
    return len(_PLANS)


def _tsig(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


def _signature(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise, inverse, config,
               inplace, norm=None, q_scale=None, rotary_at="start"):
    """Everything validation and the launch geometry depend on, or None when a call is not
    eligible for the fast path (then it takes the full path, which raises on bad input)."""
    if type(q) is not torch.Tensor or (k is not None and type(k) is not torch.Tensor):
        return None
    if type(offsets) is int:
        off = int
    elif offsets is None or type(offsets) is torch.Tensor:
        off = _tsig(offsets)
    else:
        return None
    if (positions is not None and type(positions) is not torch.Tensor) or \
            (cu_seqlens is not None and type(cu_seqlens) is not torch.Tensor):
        return None
    if norm is not None:
        if type(norm.q_weight) is not torch.Tensor or (
                norm.k_weight is not None and type(norm.k_weight) is not torch.Tensor) or type(norm.eps) is not float:
            return None
        norm = (norm.kind, norm.eps, _tsig(norm.q_weight), _tsig(norm.k_weight))
    if q_scale is not None:
        # only exact (float, int) pairs key a plan: a plan exists only for checked values
        if type(q_scale) not in (tuple, QueryScale) or len(q_scale) != 2 or type(q_scale[0]) is not float \
                or type(q_scale[1]) is not int:
            return None
        q_scale = (q_scale[0], q_scale[1])
    if type(rotary_at) is not str:  # (a plan exists only for checked values, which are str)
        return None
    return (id(params), layout, rotary_dim, precise, inverse, config, inplace, _tsig(q), _tsig(k),
            _tsig(positions), off, _tsig(cu_seqlens), norm, q_scale, rotary_at)


def _remember(key, plan_launch, params, inv_freq, q, k) -> None:
    if key is None or plan_launch is None:
        return
    _PLANS[key] = _Plan(plan_launch, params, inv_freq, q, k)
    while len(_PLANS) > _PLANS_MAX:
        _PLANS.popitem(last=False)


# --------------------------------------------------------------------------------------
# Ops torch.compile sees, and autograd
#
# With torch.library.triton_op (torch >= 2.6) the compiler traces into the op and its
# generated code launches rope_kernel itself; CPU tensors inside it go through an opaque
# custom op (the reference, or the kernel under the interpreter). Older torch: the same
# bodies behind plain custom ops. ``norm`` 0 is plain rope; 1/2 fuse the RMSNorm.
# ``qs_omax`` 0 is no query scale; else ``(qs_beta, qs_omax)`` is the QueryScale.
# --------------------------------------------------------------------------------------
_triton_op = getattr(torch.library, "triton_op", None)
_wrap_triton = getattr(torch.library, "wrap_triton", None)
COMPILER_SEES_KERNEL = _triton_op is not None and _wrap_triton is not None and not INTERPRETED


def _norm_of(q_weight, k_weight, eps, norm) -> Optional[Norm]:
    return None if not norm else Norm(q_weight, k_weight, eps, norm)


def _q_scale_of(qs_beta, qs_omax) -> Optional[QueryScale]:
    return None if not qs_omax else QueryScale(qs_beta, qs_omax)


def _q_scale_args(q_scale: Optional[QueryScale]) -> Tuple[float, int]:
    return (0.0, 0) if q_scale is None else (q_scale.beta, q_scale.original_max)


@torch.library.custom_op("yarn_triton::rope_host_", mutates_args=("qo", "ko"))
def _rope_host_op(
    q: torch.Tensor, qo: torch.Tensor, k: Optional[torch.Tensor], ko: Optional[torch.Tensor],
    positions: Optional[torch.Tensor], offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    inv_freq: torch.Tensor, scale: float, pos_base: int, rotary_dim: int, layout: str, inverse: bool,
    precise: bool, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float, norm: int,
    mrope: Optional[List[int]], qs_beta: float, qs_omax: int, rotary_at: str,
) -> None:
    """Rotate q/k into qo/ko outside the compiler's view (CPU tensors, old torch)."""
    _execute(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
             rotary_dim, layout, inverse, precise, norm=_norm_of(q_weight, k_weight, eps, norm), mrope=mrope,
             q_scale=_q_scale_of(qs_beta, qs_omax), rotary_at=rotary_at)


def _dispatch(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot, layout, inverse,
              precise, q_weight, k_weight, eps, norm, mrope, qs_beta, qs_omax, rotary_at) -> None:
    if COMPILER_SEES_KERNEL and q.device.type == "cuda":
        _execute(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
                 rot, layout, inverse, precise, traced=True, norm=_norm_of(q_weight, k_weight, eps, norm),
                 mrope=mrope, q_scale=_q_scale_of(qs_beta, qs_omax), rotary_at=rotary_at)
    else:
        torch.ops.yarn_triton.rope_host_(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale,
                                         pos_base, rot, layout, inverse, precise, q_weight, k_weight, eps, norm,
                                         mrope, qs_beta, qs_omax, rotary_at)


def _define(name: str, mutates_args, fn):
    if COMPILER_SEES_KERNEL:
        return _triton_op(name, fn, mutates_args=mutates_args)
    return torch.library.custom_op(name, fn, mutates_args=mutates_args)


def _rope_inplace_impl(
    q: torch.Tensor, k: Optional[torch.Tensor], positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor,
    scale: float, pos_base: int, rotary_dim: int, layout: str, inverse: bool, precise: bool,
    q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float, norm: int,
    mrope: Optional[List[int]], qs_beta: float, qs_omax: int, rotary_at: str,
) -> None:
    _dispatch(q, q, k, k, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
              rotary_dim, layout, inverse, precise, q_weight, k_weight, eps, norm, mrope, qs_beta, qs_omax, rotary_at)


def _rope_impl(
    q: torch.Tensor, k: Optional[torch.Tensor], positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor,
    scale: float, pos_base: int, rotary_dim: int, layout: str, inverse: bool, precise: bool,
    q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float, norm: int,
    mrope: Optional[List[int]], qs_beta: float, qs_omax: int, rotary_at: str,
) -> List[torch.Tensor]:
    qo = torch.empty_like(q)
    ko = None if k is None else torch.empty_like(k)
    _dispatch(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
              rotary_dim, layout, inverse, precise, q_weight, k_weight, eps, norm, mrope, qs_beta, qs_omax, rotary_at)
    return [qo] if ko is None else [qo, ko]


_rope_inplace_op = _define("yarn_triton::rope_", ("q", "k"), _rope_inplace_impl)
_rope_op = _define("yarn_triton::rope", (), _rope_impl)

if not COMPILER_SEES_KERNEL:  # triton_op derives its fake from the body
    @_rope_op.register_fake
    def _rope_fake(q, k, *args):
        return [torch.empty_like(q)] + ([] if k is None else [torch.empty_like(k)])


def _rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool,
                       grad_normed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``y = x * rsqrt(mean(x^2) + eps) * w`` (per head, float32) w.r.t. ``x``
    and the weight, given ``dL/dy``; ``w = 1 + weight`` when ``unit_offset``."""
    xf = x.float()
    g = grad_normed.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * r
    w = weight.float() + 1.0 if unit_offset else weight.float()
    gxhat = g * w
    gx = r * (gxhat - xhat * (gxhat * xhat).mean(-1, keepdim=True))
    gw = (g * xhat).reshape(-1, x.shape[-1]).sum(0)
    return gx.to(x.dtype), gw.to(weight.dtype)


def _norm_rope_backward(q, k, q_weight, k_weight, eps, kind, gq_normed, gk_normed):
    """(dq, dk, dq_weight, dk_weight) from the gradients of the normalised, un-rotated heads."""
    dq, dqw = _rms_norm_backward(q, q_weight, eps, kind == 2, gq_normed)
    dk = dkw = None
    if k is not None:
        dk, dkw = _rms_norm_backward(k, k_weight, eps, kind == 2, gk_normed)
    return dq, dk, dqw, dkw


def _rope_setup_context(ctx, inputs, output) -> None:
    q, k, positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot, layout, inverse, precise, \
        q_weight, k_weight, eps, norm, mrope, qs_beta, qs_omax, rotary_at = inputs
    ctx.save_for_backward(positions, offsets, cu_seqlens, inv_freq, *((q, k, q_weight, k_weight) if norm else ()))
    ctx.scalars = (scale, pos_base, rot, layout, inverse, precise, eps, norm, mrope, qs_beta, qs_omax, rotary_at)
    ctx.has_k = k is not None


def _rope_backward(ctx, grads):
    """The inverse rotation of the incoming gradients (same kernel, INVERSE flipped),
    angles recomputed from the saved positions, scaled by the same query scale (a per-token
    factor commutes with the rotation); then, with the norm, its backward."""
    positions, offsets, cu_seqlens, inv_freq, *saved = ctx.saved_tensors
    scale, pos_base, rot, layout, inverse, precise, eps, norm, mrope, qs_beta, qs_omax, rotary_at = ctx.scalars
    gq = grads[0]
    gk = grads[1] if ctx.has_k else None
    outs = torch.ops.yarn_triton.rope(gq, gk, positions, offsets, cu_seqlens, inv_freq, scale,
                                      pos_base, rot, layout, not inverse, precise, None, None, 0.0, 0, mrope,
                                      qs_beta, qs_omax, rotary_at)
    dq, dk = outs[0], (outs[1] if ctx.has_k else None)
    dqw = dkw = None
    if norm:
        q, k, q_weight, k_weight = saved
        dq, dk, dqw, dkw = _norm_rope_backward(q, k, q_weight, k_weight, eps, norm, dq, dk)
    return (dq, dk) + (None,) * 10 + (dqw, dkw, None, None, None, None, None, None)


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)


class _EagerRope(torch.autograd.Function):
    """The same forward/backward as the ``yarn_triton::rope`` op, without the dispatcher
    round trips, which cost several times the kernel's own host time in eager mode. Both
    directions replay a launch plan when the signature repeats. ``torch.compile`` uses
    the op.

    Arguments: ``meta = (args, plan, key, norm, has_k)`` (``args`` as for
    :func:`_eager_copy`; ``plan`` the forward's launch plan or None, then remembered under
    ``key``), then the tensors autograd tracks: q, k and, with the norm, its weights.
    Everything else travels inside ``meta``, since ``apply`` inspects each argument it
    is given (about 1 us per 10); positions and inv_freq take no gradient."""

    @staticmethod
    def forward(ctx, meta, q, k, *weights):
        args, plan, key, norm, _ = meta
        qo, ko = _eager_copy(q, k, args, args[8], plan, key, norm)
        # Saved so that an in-place change of the positions (all the backward needs) before
        # the backward is an error, as for any autograd op, not wrong gradients.
        if weights:
            ctx.save_for_backward(args[0], args[1], args[2], q, k, *weights)
        else:
            ctx.save_for_backward(args[0], args[1], args[2])
        ctx.meta = meta
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):
        positions, offsets, cu_seqlens, *saved = ctx.saved_tensors
        args, _, _, norm, has_k = ctx.meta
        _, _, _, _, _, _, rot, layout, inverse, precise, params, q_scale, rotary_at = args
        gk = gk if has_k else None
        key = _signature(gq, gk, positions, params, layout, rot, offsets, cu_seqlens, precise, not inverse, None,
                         False, None, q_scale, rotary_at)
        # q_out = s * R(x) per token: dx = R^T(s * g), the same kernel inverted, same scale
        dq, dk = _eager_copy(gq, gk, args, not inverse, _PLANS.get(key), key)
        if norm is None:
            return None, dq, dk
        q, k, q_weight, k_weight = saved
        dq, dk, dqw, dkw = _norm_rope_backward(q, k, q_weight, k_weight, norm.eps, norm.kind, dq, dk)
        return None, dq, dk, dqw, dkw


# The C++ apply under Function.apply's Python wrapper, which (with no functorch transform
# active) only passes each tensor argument through functorch's unwrap_if_dead, at about
# 1.5 us a call: a tensor that escaped a functorch transform fails in the forward's first
# op with or without it.
_EAGER_ROPE_APPLY = super(torch.autograd.Function, _EagerRope).apply


def _eager_copy(q, k, args, inverse, plan, key, norm=None):
    """Rotate ``q``/``k`` into fresh tensors, replaying ``plan`` when given, else by the full
    launch path, remembering its plan under ``key``. ``args = (positions, offsets,
    cu_seqlens, inv_freq, scale, pos_base, rot, layout, inverse, precise, params,
    q_scale, rotary_at)``, the forward's; ``inverse`` is the direction of this call."""
    qo = torch.empty_like(q)
    ko = None if k is None else torch.empty_like(k)
    positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot, layout, _, precise, params, q_scale, \
        rotary_at = args
    if plan is not None:
        plan.run(q, k, positions, offsets, cu_seqlens, pos_base, qo, ko, norm)
    else:
        launch = _execute(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
                          rot, layout, inverse, precise, norm=norm, mrope=mrope_spec(params), q_scale=q_scale,
                          rotary_at=rotary_at)
        _remember(key, launch, params, inv_freq, q, k)
    return qo, ko


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------
def _split_offsets(offsets: Offsets) -> Tuple[Optional[torch.Tensor], int]:
    if isinstance(offsets, torch.Tensor):
        return offsets, 0
    return None, int(offsets or 0)


def _needs_grad(q: torch.Tensor, k: Optional[torch.Tensor], norm: Optional[Norm] = None) -> bool:
    if not torch.is_grad_enabled():
        return False
    if q.requires_grad or (k is not None and k.requires_grad):
        return True
    return norm is not None and (norm.q_weight.requires_grad or
                                 (norm.k_weight is not None and norm.k_weight.requires_grad))


# YARN_TRITON_CHECK_CU_SEQLENS=1 makes check_cu_seqlens=True the default.
CHECK_CU_SEQLENS = os.environ.get("YARN_TRITON_CHECK_CU_SEQLENS", "0") not in ("", "0")


def check_cu_seqlens_values(cu_seqlens: torch.Tensor, n_tokens: int) -> None:
    """Raise ValueError unless ``cu_seqlens`` starts at 0, never decreases and ends at or
    before ``n_tokens``. Reads the values: one device synchronisation."""
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


def _check_cu(cu_seqlens, check, q) -> None:
    if cu_seqlens is not None and (CHECK_CU_SEQLENS if check is None else check) \
            and not torch.compiler.is_compiling():
        check_cu_seqlens_values(cu_seqlens, q.shape[0])


def _mrope_arg(params) -> Optional[List[int]]:
    spec = mrope_spec(params)
    return list(spec) if spec[0] else None


def _check_call(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, norm, q_scale, rotary_at,
                inplace: bool) -> Tuple[int, Optional[QueryScale]]:
    """Every argument check of a rope / norm + rope call that does not replay a known
    signature: ``(rotary dim, normalised q_scale)``, or a clear error before any launch."""
    check_rotary_at(rotary_at)
    rot = check_rope_args(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, inplace=inplace)
    if norm is not None:
        check_norm_args(q, k, norm)
    if q_scale is not None:
        q_scale = check_q_scale(q_scale, params)
    return rot, q_scale


def _rope_inplace(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise, inverse,
                  check_cu, config, norm, q_scale=None, rotary_at="start"):
    """In-place rope (and norm, and query scale): the fast path for a known signature, else
    the full one."""
    compiling = torch.compiler.is_compiling()
    key = None
    if not compiling:
        key = _signature(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise,
                         inverse, config, True, norm, q_scale, rotary_at)
        plan = _PLANS.get(key) if key is not None else None
        if plan is not None and not _needs_grad(q, k, norm):
            _check_cu(cu_seqlens, check_cu, q)
            _PLANS.move_to_end(key)
            plan.run(q, k, positions, offsets if type(offsets) is torch.Tensor else None, cu_seqlens,
                     offsets if type(offsets) is int else 0, norm=norm)
            return q, k
    rot, q_scale = _check_call(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, norm, q_scale,
                               rotary_at, inplace=True)
    if config is not None:
        _check_config(config)
    _check_cu(cu_seqlens, check_cu, q)
    if _needs_grad(q, k, norm):
        out = _rope_copy(q, k, positions, params, layout, rot, offsets, cu_seqlens, precise, inverse, False, norm,
                         q_scale, rotary_at)
        q.copy_(out[0])
        if k is not None:
            k.copy_(out[1])
        return q, k
    off_t, pos_base = _split_offsets(offsets)
    inv_freq = params.inv_freq_on(q.device)
    if compiling:
        args = (None, None, 0.0, 0) if norm is None else (norm.q_weight, norm.k_weight, float(norm.eps), norm.kind)
        torch.ops.yarn_triton.rope_(q, k, positions, off_t, cu_seqlens, inv_freq, params.cos_sin_scale,
                                    pos_base, rot, layout, inverse, precise, *args, _mrope_arg(params),
                                    *_q_scale_args(q_scale), rotary_at)
    else:  # eager: straight to the launch, no dispatcher round trip
        launch = _execute(q, q, k, k, positions, off_t, cu_seqlens, inv_freq, params.cos_sin_scale, pos_base,
                          rot, layout, inverse, precise, config, norm=norm, mrope=mrope_spec(params),
                          q_scale=q_scale, rotary_at=rotary_at)
        _remember(key, launch, params, inv_freq, q, k)
    return q, k


def _rope_copy(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise, inverse, check_cu, norm,
               q_scale=None, rotary_at="start"):
    """Out-of-place, differentiable rope (and norm, and query scale). Eager: a known signature skips the
    checks (they passed for it) and replays its plan inside :class:`_EagerRope`, or
    without autograd when nothing needs a gradient; torch.compile: the custom op."""
    if torch.compiler.is_compiling():
        rot, q_scale = _check_call(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, norm, q_scale,
                                   rotary_at, inplace=False)
        off_t, pos_base = _split_offsets(offsets)
        nargs = (None, None, 0.0, 0) if norm is None else (norm.q_weight, norm.k_weight, float(norm.eps), norm.kind)
        out = torch.ops.yarn_triton.rope(q, k, positions, off_t, cu_seqlens, params.inv_freq_on(q.device),
                                         params.cos_sin_scale, pos_base, rot, layout, bool(inverse), precise, *nargs,
                                         _mrope_arg(params), *_q_scale_args(q_scale), rotary_at)
        return out[0], (out[1] if k is not None else None)
    key = _signature(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise, inverse, None,
                     False, norm, q_scale, rotary_at)
    plan = _PLANS.get(key)  # (None when key is None)
    if plan is None:
        rot, q_scale = _check_call(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, norm, q_scale,
                                   rotary_at, inplace=False)
        inv_freq = params.inv_freq_on(q.device)
    else:  # the signature passed these checks before; the plan holds params' inv_freq on q's device
        rot = params.rope_dim
        inv_freq = plan.inv_freq
    if cu_seqlens is not None:
        _check_cu(cu_seqlens, check_cu, q)
    off_t, pos_base = (None, 0) if offsets is None else _split_offsets(offsets)
    args = (positions, off_t, cu_seqlens, inv_freq, params.cos_sin_scale, pos_base, rot, layout, bool(inverse),
            precise, params, q_scale, rotary_at)
    # Outside functorch transforms and forward-mode AD (which the Function refuses, and
    # must keep refusing), Function.apply's Python wrapper adds nothing, and a call where
    # nothing needs a gradient gets the same result without the Function.
    plain = not torch._C._are_functorch_transforms_active() and _forward_ad._current_level < 0
    if plain and not _needs_grad(q, k, norm):
        return _eager_copy(q, k, args, args[8], plan, key, norm)
    apply = _EAGER_ROPE_APPLY if plain else _EagerRope.apply
    if norm is None:
        return apply((args, plan, key, None, k is not None), q, k)
    return apply((args, plan, key, norm, k is not None), q, k, norm.q_weight, norm.k_weight)


def apply_rope_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    params: RopeParams,
    *,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    offsets: Offsets = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    precise_angles: bool = True,
    inverse: bool = False,
    check_cu_seqlens: Optional[bool] = None,
    config: Optional[LaunchConfig] = None,
    q_scale: Optional[QueryScale] = None,
    rotary_at: str = "start",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate q and k in place with rotary position embeddings (one kernel launch).

    Args:
        q: ``[*T, Hq, Dq]`` float32/float16/bfloat16, any strides (views of a fused
            projection, or ``[B, H, S, D].transpose(1, 2)``), CUDA (or CPU).
        k: ``[*T, Hk, Dk]`` with the same token dims ``T`` and device as q (head counts
            may differ: MHA, GQA, MQA, MLA), or None to rotate q alone.
        positions: int32/int64 tensor of shape ``T`` or broadcastable to it; any values,
            also past the model's max_position_embeddings. None to derive positions in the
            kernel as ``offset + index in the sequence`` (see ``offsets``/``cu_seqlens``).
        params: :class:`RopeParams` (``inv_freq`` and cos/sin scale).
        layout: ``"neox"`` (rotate_half: Llama, Qwen), ``"interleaved"`` (GPT-J pairs) or
            ``"deepseek"`` (pairs de-interleaved, then rotate_half; output stays split).
        rotary_dim: channels rotated per head, default and only valid value
            ``params.rope_dim``; the other channels of each head (the pass-through ones)
            are left untouched (unless ``q_scale`` scales q's).
        offsets: with ``positions=None``: an int, or an int32/int64 tensor ``[B]``, the
            position of each sequence's first token (KV-cache decode: the cache length).
        cu_seqlens: with ``positions=None``: int32/int64 ``[B+1]`` prefix sums of a packed
            variable-length batch ``q [T, H, D]``; tokens past ``cu_seqlens[-1]`` are left
            untouched.
        precise_angles: form angles in float64 in the kernel (accurate
            at any position); False gives the float32 ``position * inv_freq`` of
            materialised caches.
        inverse: rotate by ``-angle`` instead (undoes a rotation: DeepSeek-V4 de-rotates
            its attention output's rope slice this way).
        check_cu_seqlens: read ``cu_seqlens`` (one device synchronisation) and raise
            ValueError unless it starts at 0, never decreases and ends within q's tokens.
            Off by default, where such values are not detected (the kernel stays in
            bounds, but the result is wrong); ``YARN_TRITON_CHECK_CU_SEQLENS=1`` turns it
            on for every call.
        config: explicit launch shape (benchmarks); default picks one.
        q_scale: :class:`QueryScale` ``(beta, original_max)`` (or that pair): after the
            rotation, multiply every channel of q's heads (``[*T, Hq, Dq]``, the channels
            past ``rotary_dim`` too; k is untouched by it) by the Llama-4 query scale
            ``1 + beta * log(1 + floor(position / original_max))`` of its token's position
            (Ministral-3, Mistral-4), in the same pass. The factor is float32, rounded to
            q's dtype as transformers rounds it; the product is rounded once. Works with
            every position form (the position the rotation uses); not with M-RoPE params.
        rotary_at: where the rotary part of each head lies: ``"start"`` (default), channels
            ``[0, rotary_dim)`` of q's ``[*T, Hq, Dq]`` and k's ``[*T, Hk, Dk]`` heads, the
            pass-through channels after it (Llama/Phi-3 partial rotary); ``"end"``, channels
            ``[D - rotary_dim, D)``, the pass-through channels ``[0, D - rotary_dim)`` before
            it (Mistral-4's ``[q_nope | q_rope]`` heads, so that one call with ``q_scale``
            rotates the rope part and scales the whole head). Applies to q and k alike (a
            head with ``D == rotary_dim`` is the same either way). ValueError for any other
            value, raised before anything is written.

    Returns:
        ``(q, k)``, the same tensors, rotated. Under autograd the rotation is recorded (as
        a copy of :func:`apply_rope`'s result), so gradients flow; a leaf that requires
        grad is refused, as by any in-place op. CPU tensors take the PyTorch reference
        path (float32 angles) unless ``TRITON_INTERPRET=1``, where they run the kernel.

    A repeated call signature (shapes, strides, dtypes, devices, params object, options)
    replays the launch plan of its first call: only the checks that can differ between
    such calls (q and k disjoint in memory; data alignment) run again.
    """
    return _rope_inplace(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise_angles,
                         inverse, check_cu_seqlens, config, None, q_scale, rotary_at)


def apply_rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    params: RopeParams,
    *,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    offsets: Offsets = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    precise_angles: bool = True,
    inverse: bool = False,
    check_cu_seqlens: Optional[bool] = None,
    q_scale: Optional[QueryScale] = None,
    rotary_at: str = "start",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place, differentiable :func:`apply_rope_`: returns new rotated ``(q, k)``
    (``k`` None when not given), in one pass over the inputs (channels past the rotary
    dim are copied by the same kernel). Arguments as in :func:`apply_rope_`.

    The backward pass is the inverse rotation, by the same kernel, recomputing angles from
    the positions (and, with ``q_scale``, scaling q's gradient by the same factor: the
    gradient of a pass-through channel is ``s * grad`` with ``q_scale``, ``grad`` without,
    wherever ``rotary_at`` puts them); nothing else is saved.
    """
    return _rope_copy(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise_angles, inverse,
                      check_cu_seqlens, None, q_scale, rotary_at)


def _make_norm(q_weight, k_weight, eps, unit_offset) -> Norm:
    if isinstance(eps, int) and not isinstance(eps, bool):
        eps = float(eps)
    return Norm(q_weight, k_weight, eps, 2 if unit_offset else 1)


def apply_qk_norm_rope_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    params: RopeParams,
    q_weight: torch.Tensor,
    k_weight: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    unit_offset: bool = False,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    offsets: Offsets = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    precise_angles: bool = True,
    check_cu_seqlens: Optional[bool] = None,
    config: Optional[LaunchConfig] = None,
    q_scale: Optional[QueryScale] = None,
    rotary_at: str = "start",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-head RMSNorm of q and k, then rope, in place and in one pass (Qwen3 attention).

    Each head ``x`` (all ``head_dim`` channels, the pass-through ones of a partial rotary
    too) becomes ``x * rsqrt(mean(x^2) + eps) * w`` computed in float32, as transformers'
    Qwen3 ``q_norm``/``k_norm`` do, and its rope part is then rotated exactly as by
    :func:`apply_rope_`. One read and one write of q and k, where norm and rope as two
    ops read and write them twice.

    Args:
        q_weight: ``[Dq]`` norm weight of q (float32/float16/bfloat16, contiguous, on q's
            device).
        k_weight: ``[Dk]`` norm weight of k; None only when ``k`` is None.
        eps: added to the mean square; a finite number > 0.
        unit_offset: scale by ``1 + weight`` (Gemma, Qwen3.5 norms) instead of ``weight``.
        q_scale: as in :func:`apply_rope_`, applied after norm and rotation.
        rotary_at: as in :func:`apply_rope_`. The norm always covers the whole head with
            the whole ``[D]`` weight: with ``"end"`` the pass-through channels take
            ``weight[:D - rotary_dim]`` and the rotary part ``weight[D - rotary_dim:]``.
        Everything else: as in :func:`apply_rope_` (strides, fused-projection views, head
        counts, dtypes, layouts, partial rotary and the three position forms).

    Returns:
        ``(q, k)``, the same tensors, normalised and rotated.
    """
    return _rope_inplace(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise_angles,
                         False, check_cu_seqlens, config, _make_norm(q_weight, k_weight, eps, unit_offset), q_scale,
                         rotary_at)


def apply_qk_norm_rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: Optional[torch.Tensor],
    params: RopeParams,
    q_weight: torch.Tensor,
    k_weight: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    unit_offset: bool = False,
    layout: str = "neox",
    rotary_dim: Optional[int] = None,
    offsets: Offsets = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    precise_angles: bool = True,
    check_cu_seqlens: Optional[bool] = None,
    q_scale: Optional[QueryScale] = None,
    rotary_at: str = "start",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place, differentiable :func:`apply_qk_norm_rope_`: returns new ``(q, k)``.

    The backward rotates the incoming gradients back with the same kernel, then goes
    through the norm (float32), giving the gradients of q, k and of both weights.
    Arguments as in :func:`apply_qk_norm_rope_`.
    """
    return _rope_copy(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise_angles, False,
                      check_cu_seqlens, _make_norm(q_weight, k_weight, eps, unit_offset), q_scale, rotary_at)
