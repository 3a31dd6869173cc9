"""Example attention layers that call the fused rope op inside their forward.

Two layers, both a plain ``nn.Module`` around ``torch.nn.functional.scaled_dot_product_attention``:

* :class:`YarnGQAAttention` -- grouped-query attention (MHA/GQA/MQA) with one fused
  ``qkv`` projection, as in Llama, Mistral and Qwen.
* :class:`YarnMLAAttention` -- DeepSeek-V2/V3 multi-head latent attention: each query head
  is split into ``qk_nope_head_dim`` channels without position and ``qk_rope_head_dim``
  rotated channels; the key's rotated part ``k_pe`` is one head shared by all heads.

The point of both is the data path: rope runs on *views* of the projection outputs (heads
at dim -2, head dim last, whatever the strides), with no ``.contiguous()``, no ``cat`` of
rotated and unrotated halves, and no cos/sin cache. At inference (no autograd recording)
the op rotates those views in place, so e.g. MLA's query is ready for attention as it
comes out of its projection. When autograd records, the differentiable out-of-place
:func:`yarn_triton.apply_rope` is used instead (see :func:`rope_qk`).

Neither layer keeps a KV cache; they are examples of the fused call, not a serving stack.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .op import apply_rope, apply_rope_
from .rope import RopeParams

__all__ = ["rope_qk", "YarnGQAAttention", "YarnMLAAttention"]

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2] if p.isdigit()) >= (2, 5)


def rope_qk(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    positions: torch.Tensor,
    params: RopeParams,
    *,
    layout: str = "neox",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate ``q`` ``[*T, Hq, D]`` and ``k`` ``[*T, Hk, D]`` at ``positions``, in place when
    possible.

    In place (:func:`yarn_triton.apply_rope_`, the same tensors are returned) unless
    autograd is recording and ``q`` or ``k`` requires grad; then the out-of-place,
    differentiable :func:`yarn_triton.apply_rope` runs and new tensors are returned. Callers
    must use the returned tensors.
    """
    if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
        return apply_rope(q, k, positions, params, layout=layout)
    return apply_rope_(q, k, positions, params, layout=layout)


def _sdpa(q, k, v, attn_mask, is_causal, scale, dropout_p):
    """SDPA on ``[B, S, H, D]`` views (transposed to ``[B, H, S, D]``, no copy)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    kwargs = {}
    if gqa:
        if _SDPA_HAS_GQA:
            kwargs["enable_gqa"] = True
        else:  # pragma: no cover - torch < 2.5
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal and attn_mask is None,
        scale=scale,
        **kwargs,
    )
    return out.transpose(1, 2)  # [B, S, H, Dv]


def _positions(positions: torch.Tensor) -> torch.Tensor:
    """``[S]`` -> ``[1, S]`` so it broadcasts over the batch; the op checks the rest."""
    if isinstance(positions, torch.Tensor) and positions.dim() == 1:
        return positions.unsqueeze(0)
    return positions


class YarnGQAAttention(nn.Module):
    """Grouped-query attention with YaRN rope from the fused kernel.

    Args:
        hidden_size: model width ``E``.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads (divides ``num_heads``); default ``num_heads``.
        head_dim: per-head width ``D``; default ``hidden_size // num_heads``.
        params: the :class:`RopeParams` (``params.rope_dim <= head_dim``; with fewer rotated
            channels than ``head_dim`` the leading ``rope_dim`` channels are rotated, the
            rest pass through -- partial rotary).
        layout: rope layout of the q/k channels (``"neox"``, ``"interleaved"`` or
            ``"deepseek"``).
        bias: bias on the qkv projection (Qwen2 style).
        attention_dropout: dropout probability of the attention weights while training.

    The softmax scale is ``head_dim ** -0.5 * params.softmax_scale_factor``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        *,
        params: RopeParams,
        layout: str = "neox",
        bias: bool = False,
        attention_dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if not isinstance(params, RopeParams):
            raise TypeError(f"params must be a yarn_triton.RopeParams, got {type(params).__name__}")
        if params.rope_dim > head_dim:
            raise ValueError(f"params.rope_dim={params.rope_dim} exceeds head_dim={head_dim}")
        self.hidden_size, self.head_dim = hidden_size, head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.params, self.layout = params, layout
        self.attention_dropout = attention_dropout
        self.scaling = head_dim**-0.5 * params.softmax_scale_factor
        fk = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **fk)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, **fk)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """``hidden_states`` ``[B, S, E]``; ``positions`` int ``[B, S]`` or ``[S]``;
        ``attn_mask`` bool (True = attend) or additive float, broadcastable to
        ``[B, H, S, S]`` (replaces the causal mask when given). Returns ``[B, S, E]``."""
        b, s, _ = hidden_states.shape
        h, hk = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(hidden_states).view(b, s, h + 2 * hk, self.head_dim)
        q, k, v = qkv.split((h, hk, hk), dim=2)  # views [B, S, heads, D]
        q, k = rope_qk(q, k, _positions(positions), self.params, layout=self.layout)
        out = _sdpa(
            q, k, v, attn_mask, is_causal, self.scaling,
            self.attention_dropout if self.training else 0.0,
        )
        return self.o_proj(out.reshape(b, s, h * self.head_dim))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"layout={self.layout!r}, {self.params!r}"
        )


class YarnMLAAttention(nn.Module):
    """DeepSeek-style multi-head latent attention with YaRN rope from the fused kernel.

    Query head ``i`` is ``[q_nope_i (qk_nope_head_dim) | q_pe_i (qk_rope_head_dim)]``; the
    key is ``[k_nope_i | k_pe]`` with ``k_nope_i`` from the compressed latent and ``k_pe``
    one rotated head shared by every head (it comes out of ``kv_a_proj_with_mqa`` next to
    the latent). Rope rotates ``q_pe`` and ``k_pe`` as views of their projections in one
    launch; at inference the rotated query needs no re-assembly.

    Args:
        hidden_size: model width.
        num_heads: attention heads.
        kv_lora_rank: width of the compressed KV latent.
        qk_nope_head_dim / qk_rope_head_dim / v_head_dim: per-head widths.
        params: :class:`RopeParams` with ``rope_dim == qk_rope_head_dim`` (e.g. from
            ``RopeParams.from_config`` of a DeepSeek config).
        q_lora_rank: width of the low-rank query path (None: one dense ``q_proj``).
        layout: ``"deepseek"`` (DeepSeek-V3 checkpoints, ``rope_interleave=True``),
            ``"interleaved"`` (DeepSeek-V2's complex-number rope) or ``"neox"``.

    The softmax scale is ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5 *
    params.softmax_scale_factor`` (DeepSeek's ``mscale_all_dim`` correction).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        params: RopeParams,
        q_lora_rank: Optional[int] = None,
        layout: str = "deepseek",
        eps: float = 1e-6,
        attention_dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(params, RopeParams):
            raise TypeError(f"params must be a yarn_triton.RopeParams, got {type(params).__name__}")
        if params.rope_dim != qk_rope_head_dim:
            raise ValueError(
                f"params.rope_dim={params.rope_dim} must equal qk_rope_head_dim={qk_rope_head_dim}"
            )
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.params, self.layout = params, layout
        self.attention_dropout = attention_dropout
        self.scaling = self.qk_head_dim**-0.5 * params.softmax_scale_factor
        fk = {"device": device, "dtype": dtype}
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, num_heads * self.qk_head_dim, bias=False, **fk)
        else:
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=False, **fk)
            self.q_a_layernorm = nn.RMSNorm(q_lora_rank, eps=eps, **fk)
            self.q_b_proj = nn.Linear(q_lora_rank, num_heads * self.qk_head_dim, bias=False, **fk)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=False, **fk)
        self.kv_a_layernorm = nn.RMSNorm(kv_lora_rank, eps=eps, **fk)
        self.kv_b_proj = nn.Linear(
            kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False, **fk
        )
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=False, **fk)

    def forward(
        self,
        hidden_states: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = True,
    ) -> torch.Tensor:
        """Same conventions as :meth:`YarnGQAAttention.forward`."""
        b, s, _ = hidden_states.shape
        h, nope, rope = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(b, s, h, self.qk_head_dim)
        compressed = self.kv_a_proj_with_mqa(hidden_states)  # [B, S, kv_lora_rank + rope]
        latent = compressed[..., : self.kv_lora_rank]
        k_pe = compressed[..., self.kv_lora_rank :].unsqueeze(2)  # [B, S, 1, rope] view

        q_pe_view = q[..., nope:]
        q_pe, k_pe = rope_qk(q_pe_view, k_pe, _positions(positions), self.params, layout=self.layout)
        if q_pe is not q_pe_view:
            # Out-of-place (autograd) path: re-assemble the query from its two parts.
            q = torch.cat((q[..., :nope], q_pe), dim=-1)

        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(b, s, h, nope + self.v_head_dim)
        k_nope, v = kv.split((nope, self.v_head_dim), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(b, s, h, rope)), dim=-1)
        out = _sdpa(
            q, k, v, attn_mask, is_causal, self.scaling,
            self.attention_dropout if self.training else 0.0,
        )
        return self.o_proj(out.reshape(b, s, h * self.v_head_dim))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
            f"qk_nope_head_dim={self.qk_nope_head_dim}, qk_rope_head_dim={self.qk_rope_head_dim}, "
            f"v_head_dim={self.v_head_dim}, layout={self.layout!r}, {self.params!r}"
        )
