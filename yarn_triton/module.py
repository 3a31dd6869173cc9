"""``nn.Module`` front of the fused op, with the constructor of the source models' YaRN rope."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .op import apply_rope_
from .rope import RopeParams

__all__ = ["YarnRotaryEmbedding"]


class YarnRotaryEmbedding(nn.Module):
    """YaRN rotary embedding applied by the fused in-place kernel.

    Takes ``DeepseekV2YarnRotaryEmbedding``'s arguments; unlike it, holds no cos/sin cache:
    ``forward`` computes the angles from the positions, so memory does not grow with
    ``max_position_embeddings`` and positions past it just work.

    Attributes:
        params: the :class:`RopeParams`.
        inv_freq: float32 ``[dim // 2]`` buffer (non-persistent, follows ``.to(device)``).
        softmax_scale_factor: multiply the attention's ``1/sqrt(head_dim)`` by this.
    """

    def __init__(
        self,
        dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000,
        device: Optional[torch.device] = None,
        scaling_factor: float = 1.0,
        original_max_position_embeddings: int = 4096,
        beta_fast: float = 32,
        beta_slow: float = 1,
        mscale: float = 1,
        mscale_all_dim: float = 0,
        *,
        layout: str = "neox",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.layout = layout
        self.params = RopeParams.yarn(
            dim, base, scaling_factor, original_max_position_embeddings,
            beta_fast, beta_slow, mscale, mscale_all_dim,
        )
        self.register_buffer("inv_freq", self.params.inv_freq.to(device), persistent=False)

    @property
    def softmax_scale_factor(self) -> float:
        return self.params.softmax_scale_factor

    @property
    def cos_sin_scale(self) -> float:
        return self.params.cos_sin_scale

    def forward(
        self, q: torch.Tensor, k: Optional[torch.Tensor], position_ids: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rotate ``q`` ``[*T, Hq, D]`` and ``k`` ``[*T, Hk, D]`` in place at ``position_ids``
        (int, broadcastable to ``T``); returns them."""
        return apply_rope_(q, k, position_ids, self.params, layout=self.layout)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layout={self.layout!r}, {self.params!r}"
