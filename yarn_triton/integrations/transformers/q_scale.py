"""The Llama-4 query scale (Ministral-3, Mistral-4) moved into the rope call: the config's
scale (:func:`_q_scale_of`), the hand-over from the rope call that applied it to the
dispatcher that stands in for ``get_llama_4_attn_scale`` (:data:`_HANDOVER`,
:class:`_QScaleDispatch`, which then returns the neutral :data:`_UNIT`), and Mistral-4's
whole query heads (:func:`_whole_heads`)."""

from __future__ import annotations

import functools
import threading
from typing import Optional

import torch

from ... import op as _op
from .sites import plain_function


class _Unit:
    """The neutral factor handed to attention code whose query was already scaled:
    ``.to()`` returns itself and ``q * unit`` is ``q`` (no pass over q)."""

    __slots__ = ()

    def to(self, *args, **kwargs) -> "_Unit":
        return self

    def __rmul__(self, other):
        return other

    __mul__ = __rmul__

    def __repr__(self) -> str:
        return "<query already scaled>"


_UNIT = _Unit()
# One-shot hand-over from the rope dispatcher to the query-scale dispatcher of the same
# attention call: the positions tensor whose query the rope call just scaled. Per thread.
_HANDOVER = threading.local()


class _QScaleDispatch:
    """Stands in for ``get_llama_4_attn_scale``: neutral right after the rope call of the
    same attention call scaled the query in its pass (same positions object), else the
    original."""

    def __init__(self, original) -> None:
        functools.update_wrapper(self, plain_function(original))
        self.original = original

    def __call__(self, positions_ids, *args, **kwargs):
        pending = getattr(_HANDOVER, "positions", None)
        if pending is not None:
            _HANDOVER.positions = None
            if pending is positions_ids:
                if torch.compiler.is_compiling():
                    # graphs cannot hold the neutral object; x * 1 is exact and free once fused
                    return torch.ones((), dtype=torch.float32, device=positions_ids.device)
                return _UNIT
        return self.original(positions_ids, *args, **kwargs)


def _whole_heads(q_rot: torch.Tensor, lead: int) -> Optional[torch.Tensor]:
    """The view of whole query heads ``[lead channels | q_rot]`` when the ``lead``
    channels of each head lie right before ``q_rot``'s in memory (``q_rot`` being the
    trailing part of a split along the last dim, Mistral-4's ``q_pass, q_rot``), the
    view's elements within ``q_rot``'s storage and distinct; else None."""
    if lead <= 0 or q_rot.dim() < 2 or q_rot.stride(-1) != 1 or any(s < 0 for s in q_rot.stride()):
        return None
    offset = q_rot.storage_offset() - lead
    if offset < 0:
        return None
    shape = tuple(q_rot.shape[:-1]) + (lead + q_rot.shape[-1],)
    if any(n == 0 for n in shape):
        return None
    last = offset + sum((n - 1) * st for n, st in zip(shape, q_rot.stride()))
    if last >= q_rot.untyped_storage().nbytes() // q_rot.element_size():
        return None
    whole = q_rot.as_strided(shape, q_rot.stride(), offset)
    if _op.self_overlapping(whole):  # heads closer than a whole head apart
        return None
    return whole


def _q_scale_of(config) -> Optional[_op.QueryScale]:
    """The :class:`~yarn_triton.op.QueryScale` ``(beta, original_max_position_embeddings)``
    of a Llama-4 query scale, read where the attention code reads them; None when the
    config lacks one of them or holds values the fused op does not take (a non-finite
    beta, an original max that is not a positive integer): then the modeling file's own
    code runs, and does what it does."""
    rp = getattr(config, "rope_parameters", None) or {}
    beta, omax = rp.get("llama_4_scaling_beta"), rp.get("original_max_position_embeddings")
    if beta is None or omax is None:
        return None
    if isinstance(omax, float) and omax.is_integer():
        omax = int(omax)
    try:
        return _op.check_q_scale((beta, omax))
    except (TypeError, ValueError):
        return None
