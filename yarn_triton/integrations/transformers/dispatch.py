"""The dispatcher that stands in for a modeling file's rope function
(:class:`_RopeDispatch`): handed a :class:`FusedRopePositions`, it rotates with the fused
op (taking up a deferred q/k norm and the query scale), else it calls the original."""

from __future__ import annotations

import functools
import inspect

import torch

from ... import op as _op
from .handle import FusedRopePositions
from .paged import _defer
from .q_scale import _HANDOVER, _whole_heads
from .qk_norm import _take_qk_norm
from .sites import plain_function
from .support import RopeFunction


class _RopeDispatch:
    """Calls the fused op when handed a :class:`FusedRopePositions`, else the original
    (as the modeling file holds it: a hub-kernels wrapper stays in the path)."""

    def __init__(self, original, spec: RopeFunction) -> None:
        plain = plain_function(original)
        functools.update_wrapper(self, plain)
        self.original = original
        self.spec = spec
        self.layout = spec.layout
        self._sig = inspect.signature(plain)
        params = list(self._sig.parameters)
        need = 3 if spec.pair else 2
        if len(params) < need:
            name = getattr(plain, "__qualname__", type(plain).__name__)
            raise NotImplementedError(f"unexpected signature of {name}{self._sig}")
        if spec.pair:
            self._q, self._k = params[0], params[1]
        else:
            self._q, self._k = params[0], None
        # apply_rotary_pos_emb*(q, k, cos, sin, unsqueeze_dim=1): heads at unsqueeze_dim;
        # DeepSeek-V2's apply_rotary_emb(xq, xk, freqs_cis) unsqueezes dim 1 in its body.
        self._axis = "unsqueeze_dim" if "unsqueeze_dim" in self._sig.parameters else None

    def __call__(self, *args, **kwargs):
        if not any(isinstance(a, FusedRopePositions) for a in args) and not any(
            isinstance(a, FusedRopePositions) for a in kwargs.values()
        ):
            return self.original(*args, **kwargs)
        bound = self._sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        handles = [v for v in a.values() if isinstance(v, FusedRopePositions)]
        first, last = handles[0], handles[-1]
        for h in handles[1:]:
            if h.params is not first.params or h.positions is not first.positions:
                raise ValueError("the cos and sin handed to the rope function come from different rope calls")
        if len(handles) > 1 and first.inverse:
            raise NotImplementedError("a negated cos is not a rotation; only `cos, -sin` (the inverse) is")
        inverse = last.inverse  # `cos, -sin`
        axis = a[self._axis] if self._axis is not None else 1
        q = a[self._q]
        if not self.spec.pair:
            return self._rotate_one(q, first, axis, inverse)
        k = a[self._k]
        norm = _take_qk_norm(q, k)
        if _defer(q, k, first, self.layout, axis, inverse, norm):
            return q, k  # rotated by this attention call's paged cache write (paged.py)
        if first.q_scale is not None and first.q_lead:
            return self._rotate_scaling_whole_heads(q, k, first, axis, inverse, norm)
        # the query scale (Ministral-3) is applied by the same kernel pass
        q, k = first.rotate(q, k, self.layout, axis, inverse, norm, first.q_scale)
        if first.q_scale is not None:
            _HANDOVER.positions = first.positions
        return q, k

    def _rotate_scaling_whole_heads(self, q, k, handle: FusedRopePositions, axis: int, inverse: bool, norm):
        """Mistral-4: ``q`` is the rope part of query heads whose ``handle.q_lead``
        pass-through channels the query scale covers too. With nothing needing a gradient
        and those channels right before ``q`` in memory: one in-place call on the whole
        heads (``rotary_at="end"``) rotates and scales them, and transformers' multiply
        becomes neutral. Otherwise the rotation alone, and transformers scales (under
        autograd, scaling the other channels in place behind its back would be wrong)."""
        grad = torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad))
        whole = None
        if not grad and not inverse and norm is None and not torch.compiler.is_compiling():
            whole = _whole_heads(q, handle.q_lead)
            if whole is not None and k is not None and _op.may_overlap(whole, k):
                whole = None
        if whole is None:
            return handle.rotate(q, k, self.layout, axis, inverse, norm, None)
        handle.rotate(whole, k, self.layout, axis, False, None, handle.q_scale, rotary_at="end")
        _HANDOVER.positions = handle.positions
        return q, k

    def _rotate_one(self, x: torch.Tensor, handle: FusedRopePositions, axis: int, inverse: bool):
        rot = handle.params.rope_dim
        d = x.shape[-1]
        if d < rot:
            raise ValueError(f"the rope function got {d} channels per head, fewer than rope_dim={rot}")
        view = x[..., d - rot:] if self.spec.trailing else x[..., :rot]
        out, _ = handle.rotate(view, None, self.layout, axis, inverse)
        if out is view:
            return x
        if rot == d:
            return out
        return torch.cat((x[..., : d - rot], out) if self.spec.trailing else (out, x[..., rot:]), dim=-1)
