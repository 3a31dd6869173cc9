"""The replacement rotary embedding: :class:`FusedRotaryEmbedding`, which returns a
:class:`FusedRopePositions` (position ids and params, picked per forward for sequence-length
dependent rope types and per rope label) instead of cos/sin."""

from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

import torch
from torch import nn

from ... import op as _op
from ...rope import RopeParams, RopeTracker
from .handle import FusedRopePositions, _mrope_positions
from .params import _LearnedFreqScale


class FusedRotaryEmbedding(nn.Module):
    """Replaces a switched model's ``rotary_emb``: returns :class:`FusedRopePositions`
    instead of cos/sin. Keeps the original as ``.original`` (a submodule, so it follows
    ``.to()``) for :func:`disable_fused_rope`.

    For rope types whose frequencies depend on the sequence length (dynamic NTK,
    longrope) a :class:`~yarn_triton.RopeTracker` picks the params per forward from
    ``max(position_ids) + 1``, as transformers' ``dynamic_rope_update`` does (this reads
    one number back from the device, as transformers does too); for all others nothing is
    read and the params are fixed. A rotary with rope labels (``layer_type=``, DeepSeek-V4)
    keeps one set per label in ``by_label``.

    With M-RoPE params the handle carries ``[3, B, S]`` position ids (time, height, width)
    as the text model passes them; ``[B, S]`` or ``[1, B, S]`` ids (text: one position on
    all three streams, which the model's rotary broadcasts) are handed on as ``[B, S]``.
    """

    def __init__(
        self,
        original: nn.Module,
        params: Optional[RopeParams],
        hooks: List[Tuple[str, str]],
        tracker: Optional[RopeTracker] = None,
        *,
        by_label: Optional[Mapping[str, Tuple[RopeParams, Optional[RopeTracker]]]] = None,
        q_scale: Optional[_op.QueryScale] = None,
        freq_scale: Optional[_LearnedFreqScale] = None,
        q_lead: int = 0,
    ) -> None:
        super().__init__()
        self.original = original
        self.params = params
        self.tracker = tracker
        self.by_label = dict(by_label or {})
        self.q_scale = q_scale
        self.q_lead = q_lead
        self._freq_scale = freq_scale
        self._hooks = list(hooks)

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None, *args, **kwargs):
        if position_ids is None:
            raise ValueError("the fused rope needs position_ids")
        label = kwargs.get("layer_type", args[0] if args else None)
        if self.by_label:
            if label not in self.by_label:
                raise ValueError(f"rope label {label!r} is not one of {sorted(self.by_label)}")
            params, tracker = self.by_label[label]
        elif label is not None:
            # A rope per layer type (Gemma 3 style) would need params per type.
            raise NotImplementedError("rotary embeddings with per-layer-type rope are not supported")
        else:
            params, tracker = self.params, self.tracker
        if tracker is not None:
            params = tracker.update(int(position_ids.max()) + 1)
        elif self._freq_scale is not None:
            fs = self._freq_scale
            if torch.is_grad_enabled() and fs.param.requires_grad and self.training:
                raise RuntimeError(
                    f"the fused rope does not train the rotary's `{fs.name}`; freeze it "
                    f"(requires_grad_(False)) or switch the model back for training"
                )
            params = fs.params if torch.compiler.is_compiling() else fs.refresh()
        if params.mrope_section is not None:
            position_ids = _mrope_positions(position_ids)
        return FusedRopePositions(position_ids, params, False, self.q_scale, self.q_lead)

    def extra_repr(self) -> str:
        fns = ", ".join(sorted({f"{m.rsplit('.', 1)[-1]}.{n}" for m, n in self._hooks}))
        if self.by_label:
            ps = ", ".join(f"{k}={p!r}" for k, (p, _) in self.by_label.items())
        else:
            ps = repr(self.params)
        return f"{ps}, hooks=[{fns}]" + (f", q_scale={self.q_scale}" if self.q_scale else "")
