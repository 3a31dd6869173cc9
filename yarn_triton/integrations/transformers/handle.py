"""What flows from the rotary embedding to the attention layers: the
:class:`FusedRopePositions` handle that stands in for cos/sin, the M-RoPE position ids it
carries (:func:`_mrope_positions`), and its call into the fused op (:func:`_rope`, through
the ``yarn_triton.op`` module object, looked up at call time)."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ... import op as _op
from ...rope import RopeParams


class FusedRopePositions:
    """Stands in for the ``(cos, sin)`` pair (or ``freqs_cis``) of a switched model.

    Holds the position ids and the params; unpacks as ``cos, sin`` (both itself),
    ``.to(...)`` returns itself, and ``-handle`` is the same handle marked for the inverse
    rotation (what ``cos, -sin`` means), so attention code passes it to its rope function
    untouched. ``q_scale`` is the :class:`~yarn_triton.op.QueryScale` ``(beta,
    original_max_position_embeddings)`` of a Llama-4 query scale that the rope call applies
    to q in the same pass, or None. ``q_lead``: the number of query channels before the
    rope part of each head that the rope function is not handed but the scale covers
    (Mistral-4's ``qk_nope_head_dim``), 0 when it sees whole heads.
    """

    __slots__ = ("positions", "params", "inverse", "q_scale", "q_lead")

    def __init__(
        self,
        positions: torch.Tensor,
        params: RopeParams,
        inverse: bool = False,
        q_scale: Optional[_op.QueryScale] = None,
        q_lead: int = 0,
    ) -> None:
        self.positions = positions
        self.params = params
        self.inverse = inverse
        self.q_scale = q_scale
        self.q_lead = q_lead

    def __iter__(self) -> Iterator["FusedRopePositions"]:
        return iter((self, self))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> "FusedRopePositions":
        return (self, self)[i]

    def __neg__(self) -> "FusedRopePositions":
        return FusedRopePositions(self.positions, self.params, not self.inverse, self.q_scale, self.q_lead)

    def to(self, *args, **kwargs) -> "FusedRopePositions":
        return self

    def rotate(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor],
        layout: str,
        head_axis: int = 1,
        inverse: bool = False,
        norm: Optional[Tuple[torch.Tensor, torch.Tensor, float, bool]] = None,
        q_scale: Optional[_op.QueryScale] = None,
        rotary_at: str = "start",
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rotate ``q`` (and ``k`` unless None) whose heads are at ``head_axis``
        (``[B, H, S, D]`` for 1), on their first ``params.rope_dim`` channels (their last
        ones for ``rotary_at="end"``); with
        ``norm = (q_weight, k_weight, eps, unit_offset)``, RMSNorm every head first (same
        pass); with ``q_scale``, scale every channel of q by its Llama-4 query scale after
        (same pass).

        In place on the given views under no-grad (returns the same tensors), out of place
        when autograd records."""
        pos = self.positions
        if pos.device != q.device:
            pos = pos.to(q.device)
        qv = q.movedim(head_axis, -2)
        kv = None if k is None else k.movedim(head_axis, -2)
        qo, ko = _rope(qv, kv, pos, self.params, layout, inverse, norm, q_scale, rotary_at)
        if qo is qv and ko is kv:
            return q, k
        return qo.movedim(-2, head_axis), (None if ko is None else ko.movedim(-2, head_axis))

    def __repr__(self) -> str:
        inv = ", inverse" if self.inverse else ""
        return f"FusedRopePositions(positions={tuple(self.positions.shape)}, {self.params!r}{inv})"


def _rope(q, k, positions, params, layout, inverse, norm=None, q_scale=None, rotary_at="start"):
    """The fused op on ``[*T, H, D]`` views: in place (:func:`yarn_triton.apply_rope_`,
    the same tensors come back) unless autograd records for q or k, then the
    differentiable out-of-place :func:`yarn_triton.apply_rope`. With ``norm``, the same
    through :func:`yarn_triton.apply_qk_norm_rope_` / :func:`yarn_triton.apply_qk_norm_rope`
    (autograd also records for the norm weights); ``norm = (q_weight, k_weight, eps,
    unit_offset)``. ``q_scale`` and ``rotary_at`` go to the op as they are (the Llama-4 query
    scale, same pass; where each head's rotary part lies)."""
    if norm is not None:
        qw, kw, eps, unit = norm
        if inverse:
            raise NotImplementedError("a deferred q/k norm before an inverse rotation")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, qw, kw)):
            return _op.apply_qk_norm_rope(q, k, positions, params, qw, kw, eps=eps, unit_offset=unit,
                                          layout=layout, q_scale=q_scale, rotary_at=rotary_at)
        _op.apply_qk_norm_rope_(q, _unit_strides_like(k, q), positions, params, qw, kw, eps=eps, unit_offset=unit,
                                layout=layout, q_scale=q_scale, rotary_at=rotary_at)
        return q, k
    if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
        return _op.apply_rope(q, k, positions, params, layout=layout, inverse=inverse, q_scale=q_scale,
                              rotary_at=rotary_at)
    _op.apply_rope_(q, _unit_strides_like(k, q), positions, params, layout=layout, inverse=inverse,
                    q_scale=q_scale, rotary_at=rotary_at)
    return q, k


def _unit_strides_like(k: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    """``k``, with the strides of its size-1 dims set to ``q``'s (the same elements).

    Views of one fused projection (Phi-3's ``qkv``) at one token per sequence (decode)
    differ only there, and the op's q/k overlap check treats any stride difference as a
    possible overlap."""
    if k is None or k.stride() == q.stride() or k.dim() != q.dim() or torch.compiler.is_compiling():
        return k
    strides = [qs if n == 1 and m == 1 else ks for n, m, ks, qs in zip(k.shape, q.shape, k.stride(), q.stride())]
    if strides == list(k.stride()):
        return k
    return k.as_strided(k.shape, strides, k.storage_offset())


def _mrope_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """The position ids an M-RoPE rotary was handed, as the fused op takes them:
    ``[3, B, S]`` (t, h, w) as they are; ``[1, B, S]`` and ``[B, S]`` (the rotary's
    ``expand(3, -1, -1)`` repeats them on all streams) as text ``[B, S]``."""
    if position_ids.dim() == 3 and position_ids.shape[0] == 1:
        return position_ids[0]
    if position_ids.dim() == 2 or (position_ids.dim() == 3 and position_ids.shape[0] == 3):
        return position_ids
    raise ValueError(
        f"M-RoPE position ids must be [3, batch, seq] (time, height, width) or [batch, seq] (text), got "
        f"shape {tuple(position_ids.shape)}"
    )
