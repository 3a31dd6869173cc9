"""DTensor q and k: placement checks, the local shards, and the results rewrapped.

Rope (and the fused per-head RMSNorm) treats every head of every token on its own, so a
``torch.distributed.tensor.DTensor`` q/k sharded on its heads (dim -2) or on a token dim
(batch, sequence), or replicated, is rotated by running the op on each rank's local shard,
with no communication: :func:`local_args` unwraps q and k with ``to_local`` and works out
what the shard needs of the other arguments, :func:`rewrap` wraps the results with
``DTensor.from_local`` on q's (k's) mesh and placements. Both are differentiable, so
gradients reach the DTensor inputs with their placements.

What a shard needs of the other arguments:

* ``positions``, replicated (a plain tensor or a Replicate DTensor): its slice of each
  sharded token dim (a broadcast dim of size 1 stays whole); or a DTensor already sharded
  like the tokens it indexes (on the positions dim that lines up with q's sharded dim).
* no positions: ``offsets``/``cu_seqlens`` (replicated only). A sequence shard adds its
  first token's index to the offsets; a batch shard takes its sequences' offsets; a shard
  of a packed batch's tokens clips ``cu_seqlens`` to its own tokens and moves the cut
  sequences' starts into the offsets (so ``check_cu_seqlens`` reads the global values).
* norm weights, replicated: a rank's weight gradient sums over its own tokens and heads
  only, so a Replicate DTensor weight gets a ``Partial`` gradient on the mesh dims where q
  (k) is sharded, and a plain-tensor weight the summed one (one all-reduce of ``[D]`` in
  the backward).

Anything else (head_dim sharded, Partial, q and k on different meshes or sharded on
different token dims, positions sharded otherwise than the tokens, sharded offsets or
cu_seqlens or weights) raises a ValueError naming the argument and placement, before
anything is written.

The DTensor type is looked up in ``sys.modules``: no argument can be a DTensor before
``torch.distributed.tensor`` is imported, and importing it here would cost every
``import yarn_triton``. The public functions come here only off their plan fast path
(a call whose tensors are all plain ``torch.Tensor`` never does).
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch

from .checks import Norm, _check_cu


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")
    return None if mod is None else getattr(mod, "DTensor", None)


def involved(q, k, positions, offsets, cu_seqlens, norm: Optional[Norm]) -> bool:
    """Whether any tensor argument of a rope call is a DTensor."""
    dt = _dtensor_type()
    if dt is None:
        return False
    return (isinstance(q, dt) or isinstance(k, dt) or isinstance(positions, dt) or isinstance(offsets, dt)
            or isinstance(cu_seqlens, dt)
            or (norm is not None and (isinstance(norm.q_weight, dt) or isinstance(norm.k_weight, dt))))


class LocalArgs(NamedTuple):
    """A rope call's arguments on this rank's shards (plain tensors)."""

    q: torch.Tensor
    k: Optional[torch.Tensor]
    positions: Optional[torch.Tensor]
    offsets: object
    cu_seqlens: Optional[torch.Tensor]
    check_cu: Optional[bool]
    norm: Optional[Norm]


def _placement_types():
    from torch.distributed.tensor import Partial, Replicate, Shard
    return Shard, Replicate, Partial


def _local_extent(t):
    """``(shape, start)``: the shape of this rank's shard of DTensor ``t`` and where it
    starts in each dim. DTensor's ``Shard`` splits a dim as ``torch.chunk`` does (chunks
    of ``ceil(n / ranks)``, the last ones shorter or empty), mesh dim by mesh dim.
    (``torch.distributed.tensor._utils.compute_local_shape_and_global_offset`` computes
    the same, privately and with a graph break under torch.compile.)"""
    shape, start = list(t.shape), [0] * t.dim()
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError(f"this rank is not in the device mesh {mesh} of the DTensor arguments")
    for i, p in enumerate(t.placements):
        d = _shard_dim(p, t.dim())
        if d is not None:
            n = shape[d]
            chunk = -(-n // mesh.size(i))
            lo = min(coord[i] * chunk, n)
            start[d] += lo
            shape[d] = min(chunk, n - lo)
    return shape, start


def _shard_dim(p, ndim: int) -> Optional[int]:
    """The tensor dim of a plain ``Shard`` placement (non-negative), None for Replicate."""
    if p.is_replicate():
        return None
    return p.dim + ndim if p.dim < 0 else p.dim


def _check_qk(name: str, t) -> None:
    Shard, _, _ = _placement_types()
    for i, p in enumerate(t.placements):
        if p.is_replicate():
            continue
        if type(p) is not Shard:
            raise ValueError(
                f"{name} has placement {p!r} on mesh dim {i}: rope runs on each rank's local shard only for "
                f"Shard (of the heads, dim -2, or of a token dim) and Replicate placements; redistribute {name} first")
        if _shard_dim(p, t.dim()) == t.dim() - 1:
            raise ValueError(
                f"{name} is sharded on its head_dim (placement {p!r} on mesh dim {i}); rope and the norm mix the "
                f"channels of a head: shard the heads (dim -2) or a token dim, or replicate {name}")


def _token_dims(t):
    """Per mesh dim: the token dim ``t`` is sharded on there, or None (heads or Replicate)."""
    nt = t.dim() - 2
    return tuple(d if d is not None and d < nt else None for d in (_shard_dim(p, t.dim()) for p in t.placements))


def _local(name: str, t):
    """``t``'s local tensor and ``(shape, start)`` of :func:`_local_extent`, which it must match."""
    local = t.to_local()
    extent = _local_extent(t)
    if tuple(local.shape) != tuple(extent[0]):
        raise ValueError(
            f"{name}'s local shard has shape {tuple(local.shape)}, but its global shape {tuple(t.shape)} and "
            f"placements {tuple(t.placements)} give {tuple(extent[0])} on this rank (DTensor.from_local of uneven "
            f"shards needs shape= and stride=)")
    return local, extent


def _check_mesh(name: str, t, mesh) -> None:
    if t.device_mesh != mesh:
        raise ValueError(f"{name} is on device mesh {t.device_mesh} but q on {mesh}; they must share one")


def _replicated(name: str, t, mesh, dt):
    """The local tensor of a replicated argument (a plain tensor, or a Replicate DTensor)."""
    if not isinstance(t, dt):
        return t
    _check_mesh(name, t, mesh)
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(f"{name} must be replicated (a plain tensor or a Replicate DTensor), got placements "
                         f"{tuple(t.placements)}")
    return t.to_local()


def _local_positions(positions, q, mesh, token_dims, shape, start, lead: int, dt):
    """``positions`` for this rank's tokens (``shape``/``start``: q's local shape and its
    global offset)."""
    Shard, Replicate, _ = _placement_types()
    nt, npos = q.dim() - 2, positions.dim()

    def pos_dim(d):  # the positions dim that lines up with q's token dim d (right-aligned), or None
        pd = d + npos - nt
        return pd if pd >= lead and positions.shape[pd] != 1 else None

    if isinstance(positions, dt):
        _check_mesh("positions", positions, mesh)
        if not all(p.is_replicate() for p in positions.placements):
            # per mesh dim, the positions dim that must be sharded there (None: replicated),
            # compared as ints: placement objects built here and compared under torch.compile
            # (torch 2.11's Dynamo) did not compare equal to equal ones
            want = tuple(None if d is None else pos_dim(d) for d in token_dims)
            given = tuple(positions.placements)
            if any(not (a.is_replicate() or type(a) is Shard) or _shard_dim(a, npos) != w
                   for a, w in zip(given, want)):
                target = tuple(Replicate() if w is None else Shard(w) for w in want)
                raise ValueError(
                    f"positions has placements {given} but q has {tuple(q.placements)}: give positions replicated, "
                    f"or sharded like the tokens they index, {target}")
            return positions.to_local()
        positions = positions.to_local()
    for d in sorted({d for d in token_dims if d is not None}):
        pd = pos_dim(d)
        if pd is not None:
            positions = positions.narrow(pd, start[d], shape[d])
    return positions


def packed_shard(cu_seqlens: torch.Tensor, offsets, start: int, length: int):
    """``(cu_seqlens, offsets)`` of the tokens ``[start, start + length)`` of a packed batch
    as a packed batch of their own, giving each token the position it has in the whole:
    every sequence clipped to those tokens (the ones outside become empty, and tokens
    past the last sequence stay past it), a sequence cut at ``start`` starting at its
    offset plus the tokens cut off. Device tensor arithmetic: no synchronisation."""
    cut = (start - cu_seqlens[:-1]).clamp(min=0)
    offsets = cut + (offsets if isinstance(offsets, torch.Tensor) else int(offsets or 0))
    return (cu_seqlens - start).clamp(0, length), offsets


def _local_weight(name: str, w, x, mesh, dt):
    """A norm weight's local tensor, whose gradient sums over this rank's tokens and heads
    of ``x`` only: Partial where ``x`` is sharded."""
    _, Replicate, Partial = _placement_types()
    grad = tuple(Replicate() if p.is_replicate() else Partial() for p in x.placements)
    if isinstance(w, dt):
        _check_mesh(name, w, mesh)
        if not all(p.is_replicate() for p in w.placements):
            raise ValueError(f"{name} must be replicated (a plain tensor or a Replicate DTensor), got placements "
                             f"{tuple(w.placements)}")
        return w.to_local(grad_placements=grad)
    if torch.is_grad_enabled() and w.requires_grad and not all(p.is_replicate() for p in grad):
        # through a Replicate DTensor, whose from_local sums the Partial gradient back
        return dt.from_local(w, mesh, [Replicate()] * mesh.ndim, run_check=False).to_local(grad_placements=grad)
    return w


def local_args(q, k, positions, offsets, cu_seqlens, check_cu, norm: Optional[Norm], mrope: bool) -> LocalArgs:
    """Check the placements of a rope call with DTensor arguments (ValueError naming the
    argument) and return its arguments on this rank's shards. The call's other checks ran
    on the global shapes before; ``mrope``: params carry M-RoPE sections (positions may be
    ``[3, *T]``)."""
    dt = _dtensor_type()
    if not isinstance(q, dt):
        for name, t in (("k", k), ("positions", positions), ("offsets", offsets), ("cu_seqlens", cu_seqlens),
                        ("q_weight", norm and norm.q_weight), ("k_weight", norm and norm.k_weight)):
            if isinstance(t, dt):
                raise ValueError(f"{name} is a DTensor but q is a {type(q).__name__}: give q (and k) as DTensors "
                                 f"to run on their local shards")
        raise ValueError(f"q must be a DTensor when any other argument is one, got {type(q).__name__}")
    mesh = q.device_mesh
    _check_qk("q", q)
    token_dims = _token_dims(q)
    if k is not None:
        if not isinstance(k, dt):
            raise ValueError(f"q is a DTensor but k is a {type(k).__name__}; give k as a DTensor on q's mesh")
        _check_mesh("k", k, mesh)
        _check_qk("k", k)
        if _token_dims(k) != token_dims:
            raise ValueError(
                f"k has placements {tuple(k.placements)} but q has {tuple(q.placements)}: q and k must be sharded "
                f"on the same token dims (each may shard its heads or be replicated on its own)")
    ql, (shape, start) = _local("q", q)
    kl = None if k is None else _local("k", k)[0]
    offsets = _replicated("offsets", offsets, mesh, dt)
    cu_seqlens = _replicated("cu_seqlens", cu_seqlens, mesh, dt)
    sharded = {d for d in token_dims if d is not None}
    if positions is not None:
        lead = 1 if mrope and positions.dim() == q.dim() - 1 else 0
        positions = _local_positions(positions, q, mesh, token_dims, shape, start, lead, dt)
    elif sharded and cu_seqlens is not None:  # packed [T, H, D], its tokens sharded
        _check_cu(cu_seqlens, check_cu, q)  # (the global values, against q's global tokens)
        check_cu = False
        cu_seqlens, offsets = packed_shard(cu_seqlens, offsets, start[0], shape[0])
    elif sharded:  # [B, S, H, D] or [S, H, D]: position = offset + index in the sequence
        if q.dim() == 4 and 0 in sharded and isinstance(offsets, torch.Tensor):
            offsets = offsets.narrow(0, start[0], shape[0])
        seq = q.dim() - 3
        if seq in sharded:
            offsets = (offsets if offsets is not None else 0) + start[seq]
    if norm is not None:
        norm = norm._replace(q_weight=_local_weight("q_weight", norm.q_weight, q, mesh, dt),
                             k_weight=None if norm.k_weight is None or k is None
                             else _local_weight("k_weight", norm.k_weight, k, mesh, dt))
    return LocalArgs(ql, kl, positions, offsets, cu_seqlens, check_cu, norm)


def _wrap(out: torch.Tensor, x, local: torch.Tensor):
    dt = _dtensor_type()
    # the output's global strides: q's (k's) where the shard's layout is q's, else contiguous
    stride = x.stride() if out.stride() == local.stride() else _contiguous_strides(x.shape)
    return dt.from_local(out, x.device_mesh, x.placements, run_check=False, shape=x.shape, stride=stride)


def _contiguous_strides(shape):
    strides, n = [], 1
    for size in reversed(shape):
        strides.append(n)
        n *= max(size, 1)
    return tuple(reversed(strides))


def rewrap(out, q, k, local: LocalArgs):
    """The out-of-place results on the shards, as DTensors on q's (k's) mesh and placements."""
    return _wrap(out[0], q, local.q), (None if k is None else _wrap(out[1], k, local.k))
