"""Experiment (issue #26), not public: the QKV projection with rope fused into its GEMM.

:func:`qkv_rope` computes ``x @ w_qkv^T (+ bias)`` and rotates (and, with ``q_norm`` /
``k_norm``, first RMS-normalises) q's and k's heads in the GEMM's epilogue
(:mod:`yarn_triton.kernels.qkv_kernel`), so rope costs no pass over q and k. It ships to
users only if the device benchmark (``bench/bench_qkv.py``) finds it faster than cuBLAS
followed by our standalone rope at 4K and 16K tokens; until that run it is reachable only
as ``yarn_triton.op.qkv.qkv_rope`` and is not exported by the package.

CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``) run the kernel; other CPU
tensors take the PyTorch reference composition (``F.linear`` then the reference rope, in
float32), like the rest of the package. The backward uses torch's matmuls (cuBLAS) with
the inverse rotation applied to the incoming gradients first.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ..kernels.qkv_launcher import QkvConfig, launch_qkv
from ..reference import LAYOUTS, qk_norm_rope_reference, rope_reference
from ..rope import RopeParams
from .api import apply_rope_
from .launch import uses_kernel
from .checks import _check_index_tensor, check_rotary_dim
from .library import _norm_rope_backward

__all__ = ["qkv_rope"]

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


class _Meta(NamedTuple):
    """Everything but the differentiable tensors, checked."""

    positions: torch.Tensor  # [T], on x's device
    params: RopeParams
    n_q: int
    n_k: int
    head_dim: int
    rot: int
    layout: str
    precise: bool
    eps: float
    norm_kind: int  # 0 none, 1 weight, 2 1 + weight
    config: Optional[QkvConfig]


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _check(x, w, positions, params, num_heads, num_kv_heads, head_dim, layout, bias, q_norm, k_norm, rotary_dim,
           norm_eps, norm_unit_offset) -> int:
    """Every argument check, before anything runs; returns the rotary dim. TypeError /
    ValueError naming the argument and what was expected."""
    if not isinstance(params, RopeParams):
        raise TypeError(f"params must be a yarn_triton.RopeParams, got {type(params).__name__}")
    if params.mrope_section is not None:
        raise ValueError("qkv_rope does not support M-RoPE params (mrope_section): one position per token only")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    hq = _positive_int("num_heads", num_heads)
    hk = _positive_int("num_kv_heads", num_kv_heads)
    d = _positive_int("head_dim", head_dim)
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}")
    for name, t in (("x", x), ("w_qkv", w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [*tokens, hidden] with at least one token dim, got {tuple(x.shape)}")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"x's last dim (hidden) must be contiguous (stride 1), got stride {x.stride(-1)}")
    n = (hq + 2 * hk) * d
    hidden = x.shape[-1]
    if w.dim() != 2 or tuple(w.shape) != (n, hidden):
        raise ValueError(f"w_qkv must be [(num_heads + 2 * num_kv_heads) * head_dim, hidden] = [{n}, {hidden}] "
                         f"(nn.Linear's [q; k; v] weight), got {tuple(w.shape)}")
    if w.stride(1) != 1:
        raise ValueError(f"w_qkv's last dim must be contiguous (stride 1), got strides {tuple(w.stride())}")
    if w.dtype != x.dtype:
        raise TypeError(f"w_qkv's dtype {w.dtype} must equal x's {x.dtype}")
    if w.device != x.device:
        raise ValueError(f"w_qkv is on {w.device} but x is on {x.device}; they must share a device")
    _check_index_tensor("positions", positions, x.device, on="x")
    tokens = math.prod(x.shape[:-1])
    if positions.numel() != tokens:
        raise ValueError(f"positions must hold one position per token ({tokens} for x of shape {tuple(x.shape)}), "
                         f"got {positions.numel()} (shape {tuple(positions.shape)})")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (n,) or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must be [{n}] of x's dtype {x.dtype} on {x.device}, got {tuple(bias.shape)} "
                             f"{bias.dtype} on {bias.device}")
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm must be given together (Qwen3's per-head RMSNorm), or neither")
    if q_norm is not None:
        for name, t in (("q_norm", q_norm), ("k_norm", k_norm)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of shape ({d},), got {type(t).__name__}")
            if t.dtype not in _FLOAT:
                raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
            if tuple(t.shape) != (d,) or t.stride(0) != 1:
                raise ValueError(f"{name} must be a contiguous [{d}] (head_dim) tensor, got shape {tuple(t.shape)}")
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}; they must share a device")
        if q_norm.dtype != k_norm.dtype:
            raise TypeError(f"q_norm ({q_norm.dtype}) and k_norm ({k_norm.dtype}) must share a dtype")
        eps = norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < float("inf")):
            raise ValueError(f"norm_eps must be a finite number > 0, got {eps!r}")
    if not isinstance(norm_unit_offset, bool):
        raise TypeError(f"norm_unit_offset must be a bool, got {type(norm_unit_offset).__name__}")
    rot = check_rotary_dim(rotary_dim, params)
    if rot > d:
        raise ValueError(f"rotary_dim={rot} is larger than head_dim={d}")
    return rot


def _views(out: torch.Tensor, lead: Tuple[int, ...], meta: _Meta) -> Tuple[torch.Tensor, ...]:
    """``(q, k, v)`` ``[*T, H, D]`` views of the ``[T, N]`` projection."""
    d = meta.head_dim
    qd, kd = meta.n_q * d, meta.n_k * d
    out = out.view(*lead, out.shape[-1])
    return (out[..., :qd].unflatten(-1, (meta.n_q, d)), out[..., qd:qd + kd].unflatten(-1, (meta.n_k, d)),
            out[..., qd + kd:].unflatten(-1, (meta.n_k, d)))


def _forward(meta: _Meta, x2: torch.Tensor, w: torch.Tensor, bias, q_norm, k_norm) -> torch.Tensor:
    """The ``[T, N]`` projection, q's and k's heads rotated (normalised first)."""
    T = x2.shape[0]
    n = w.shape[0]
    if uses_kernel(x2):
        out = torch.empty(T, n, device=x2.device, dtype=x2.dtype)
        launch_qkv(x2, w, bias, out, meta.positions, meta.params.inv_freq_on(x2.device), meta.params.cos_sin_scale,
                   n_q_heads=meta.n_q, n_k_heads=meta.n_k, head_dim=meta.head_dim, rot=meta.rot, layout=meta.layout,
                   q_norm=q_norm, k_norm=k_norm, eps=meta.eps, norm_kind=meta.norm_kind, precise=meta.precise,
                   config=meta.config)
        return out
    # the reference composition, float32 throughout, one rounding at the end
    y = F.linear(x2.float(), w.float(), None if bias is None else bias.float())
    q, k, v = _views(y, (T,), meta)
    if meta.norm_kind:
        qo, ko = qk_norm_rope_reference(q, k, meta.positions, meta.params, q_norm, k_norm, eps=meta.eps,
                                        unit_offset=meta.norm_kind == 2, layout=meta.layout, rotary_dim=meta.rot)
    else:
        qo, ko = rope_reference(q, k, meta.positions, meta.params, layout=meta.layout, rotary_dim=meta.rot)
    return torch.cat((qo.flatten(1), ko.flatten(1), v.flatten(1)), dim=1).to(x2.dtype)


class _QkvRope(torch.autograd.Function):
    """Forward: the fused kernel. Backward (torch matmuls): the incoming gradients of q's
    and k's heads rotated back (:func:`yarn_triton.apply_rope_` with ``inverse=True``; the
    adjoint of a scaled rotation is the scaled inverse rotation), through the norm's
    backward when there is one (the pre-norm projection recomputed by ``F.linear``), then
    ``dx = dY W``, ``dW = dY^T x``, ``db = sum dY``."""

    @staticmethod
    def forward(ctx, meta: _Meta, x2, w, bias, q_norm, k_norm):
        ctx.meta = meta
        ctx.save_for_backward(x2, w, bias, q_norm, k_norm, meta.positions)
        return _forward(meta, x2, w, bias, q_norm, k_norm)

    @staticmethod
    def backward(ctx, grad):
        meta = ctx.meta
        x2, w, bias, q_norm, k_norm, positions = ctx.saved_tensors
        T = x2.shape[0]
        dy = grad.clone(memory_format=torch.contiguous_format)  # rotated back in place: a copy of the gradient
        gq, gk, _ = _views(dy, (T,), meta)
        apply_rope_(gq, gk, positions, meta.params, layout=meta.layout, rotary_dim=meta.rot, inverse=True,
                    precise_angles=meta.precise)
        dqn = dkn = None
        if meta.norm_kind:
            qk = (meta.n_q + meta.n_k) * meta.head_dim
            pre = F.linear(x2, w[:qk], None if bias is None else bias[:qk])
            qd = meta.n_q * meta.head_dim
            q_pre = pre[:, :qd].unflatten(-1, (meta.n_q, meta.head_dim))
            k_pre = pre[:, qd:].unflatten(-1, (meta.n_k, meta.head_dim))
            dq, dk, dqn, dkn = _norm_rope_backward(q_pre, k_pre, q_norm, k_norm, meta.eps, meta.norm_kind, gq, gk)
            gq.copy_(dq)
            gk.copy_(dk)
        need = ctx.needs_input_grad
        dx = dy @ w if need[1] else None
        dw = dy.t() @ x2 if need[2] else None
        db = dy.sum(0) if bias is not None and need[3] else None
        return None, dx, dw, db, dqn if need[4] else None, dkn if need[5] else None


def qkv_rope(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    positions: torch.Tensor,
    params: RopeParams,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    layout: str = "neox",
    bias: Optional[torch.Tensor] = None,
    q_norm: Optional[torch.Tensor] = None,
    k_norm: Optional[torch.Tensor] = None,
    rotary_dim: Optional[int] = None,
    precise_angles: bool = True,
    norm_eps: float = 1e-6,
    norm_unit_offset: bool = False,
    config: Optional[QkvConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused QKV projection with rope in its epilogue (experiment, pending the device
    benchmark; not exported).

    Args:
        x: ``[*T, hidden]`` float32/float16/bfloat16, last dim contiguous.
        w_qkv: ``[(num_heads + 2 * num_kv_heads) * head_dim, hidden]``, x's dtype and
            device, last dim contiguous: ``nn.Linear``'s weight of the concatenated
            ``[q; k; v]`` projection.
        positions: int32/int64, one per token (``T.numel()`` elements, any shape), on x's
            device.
        params: :class:`~yarn_triton.RopeParams` without M-RoPE sections; angles
            ``position * inv_freq`` are formed in the kernel, cos and sin times
            ``params.cos_sin_scale``.
        num_heads, num_kv_heads, head_dim: q's heads, k's (= v's) heads, the head dim (even).
        layout: ``"neox"``, ``"interleaved"`` or ``"deepseek"`` (as :func:`~yarn_triton.apply_rope_`).
        bias: ``[(num_heads + 2 * num_kv_heads) * head_dim]`` of x's dtype, or None.
        q_norm, k_norm: ``[head_dim]`` RMSNorm weights of q's and k's heads (Qwen3), both or
            neither; applied to each whole head (bias included) before the rotation:
            ``y * rsqrt(mean(y^2) + norm_eps) * w`` (``1 + w`` with ``norm_unit_offset``).
        rotary_dim: rotated channels per head (the first ones); only ``params.rope_dim``.
        precise_angles: angles formed in float64 (as :func:`~yarn_triton.apply_rope_`).
        config: a :class:`~yarn_triton.kernels.qkv_launcher.QkvConfig` (benchmarks).

    Returns:
        ``(q, k, v)``: ``[*T, num_heads, head_dim]``, ``[*T, num_kv_heads, head_dim]`` twice,
        in x's dtype: views of one ``[*T, (num_heads + 2 * num_kv_heads) * head_dim]``
        buffer (what a fused projection produces). Differentiable in x, w_qkv, bias and the
        norm weights.
    """
    rot = _check(x, w_qkv, positions, params, num_heads, num_kv_heads, head_dim, layout, bias, q_norm, k_norm,
                 rotary_dim, norm_eps, norm_unit_offset)
    norm_kind = 0 if q_norm is None else (2 if norm_unit_offset else 1)
    meta = _Meta(positions.reshape(-1), params, num_heads, num_kv_heads, head_dim, rot, layout, bool(precise_angles),
                 float(norm_eps), norm_kind, config)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, x.shape[-1])
    tensors = (x2, w_qkv, bias, q_norm, k_norm)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out = _QkvRope.apply(meta, *tensors)
    else:
        out = _forward(meta, *tensors)
    return _views(out, lead, meta)
