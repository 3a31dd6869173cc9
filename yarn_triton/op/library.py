"""The ``torch.library`` custom ops (``yarn_triton::rope_``, ``yarn_triton::rope``,
``yarn_triton::rope_host_``), their fake and autograd registrations.

These are what ``torch.compile`` traces, and what autograd records outside the eager
Function; registering them is a side effect of importing this module. Their arguments
are flat (no Norm/QueryScale objects) because a custom op's schema takes only tensors
and scalars. The norm backward lives here since both this op's autograd and the eager
Function (:mod:`.eager`) use it.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..kernels.rope_kernel import INTERPRETED
from .checks import Norm, QueryScale
from .launch import _execute, out_like


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


def _cp_of(cp_size: int, cp_rank: int) -> Optional[Tuple[int, int]]:
    return None if cp_size == 1 else (cp_size, cp_rank)


def _cp_args(cp: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """A context-parallel shard as the ops take it: ``(cp_size, cp_rank)``, ``(1, 0)`` for none."""
    return (1, 0) if cp is None else (int(cp[0]), int(cp[1]))


@torch.library.custom_op("yarn_triton::rope_host_", mutates_args=("qo", "ko"))
def _rope_host_op(
    q: torch.Tensor, qo: torch.Tensor, k: Optional[torch.Tensor], ko: Optional[torch.Tensor],
    positions: Optional[torch.Tensor], offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    inv_freq: torch.Tensor, scale: float, pos_base: int, rotary_dim: int, layout: str, inverse: bool,
    precise: bool, q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float, norm: int,
    mrope: Optional[List[int]], qs_beta: float, qs_omax: int, rotary_at: str, cp_size: int = 1, cp_rank: int = 0,
) -> None:
    """Rotate q/k into qo/ko outside the compiler's view (CPU tensors, old torch)."""
    _execute(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
             rotary_dim, layout, inverse, precise, norm=_norm_of(q_weight, k_weight, eps, norm), mrope=mrope,
             q_scale=_q_scale_of(qs_beta, qs_omax), rotary_at=rotary_at, cp=_cp_of(cp_size, cp_rank))


def _dispatch(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot, layout, inverse,
              precise, q_weight, k_weight, eps, norm, mrope, qs_beta, qs_omax, rotary_at, cp_size, cp_rank) -> None:
    if COMPILER_SEES_KERNEL and q.device.type == "cuda":
        _execute(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
                 rot, layout, inverse, precise, traced=True, norm=_norm_of(q_weight, k_weight, eps, norm),
                 mrope=mrope, q_scale=_q_scale_of(qs_beta, qs_omax), rotary_at=rotary_at,
                 cp=_cp_of(cp_size, cp_rank))
    else:
        torch.ops.yarn_triton.rope_host_(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale,
                                         pos_base, rot, layout, inverse, precise, q_weight, k_weight, eps, norm,
                                         mrope, qs_beta, qs_omax, rotary_at, cp_size, cp_rank)


def _define(name: str, mutates_args, fn):
    if COMPILER_SEES_KERNEL:
        return _triton_op(name, fn, mutates_args=mutates_args)
    return torch.library.custom_op(name, fn, mutates_args=mutates_args)


def _rope_inplace_impl(
    q: torch.Tensor, k: Optional[torch.Tensor], positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor,
    scale: float, pos_base: int, rotary_dim: int, layout: str, inverse: bool, precise: bool,
    q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float, norm: int,
    mrope: Optional[List[int]], qs_beta: float, qs_omax: int, rotary_at: str, cp_size: int = 1, cp_rank: int = 0,
) -> None:
    _dispatch(q, q, k, k, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
              rotary_dim, layout, inverse, precise, q_weight, k_weight, eps, norm, mrope, qs_beta, qs_omax, rotary_at,
              cp_size, cp_rank)


def _rope_impl(
    q: torch.Tensor, k: Optional[torch.Tensor], positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor,
    scale: float, pos_base: int, rotary_dim: int, layout: str, inverse: bool, precise: bool,
    q_weight: Optional[torch.Tensor], k_weight: Optional[torch.Tensor], eps: float, norm: int,
    mrope: Optional[List[int]], qs_beta: float, qs_omax: int, rotary_at: str, cp_size: int = 1, cp_rank: int = 0,
) -> List[torch.Tensor]:
    qo, ko = out_like(q, cu_seqlens), out_like(k, cu_seqlens)
    _dispatch(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
              rotary_dim, layout, inverse, precise, q_weight, k_weight, eps, norm, mrope, qs_beta, qs_omax, rotary_at,
              cp_size, cp_rank)
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
        q_weight, k_weight, eps, norm, mrope, qs_beta, qs_omax, rotary_at, cp_size, cp_rank = inputs
    ctx.save_for_backward(positions, offsets, cu_seqlens, inv_freq, *((q, k, q_weight, k_weight) if norm else ()))
    ctx.scalars = (scale, pos_base, rot, layout, inverse, precise, eps, norm, mrope, qs_beta, qs_omax, rotary_at,
                   cp_size, cp_rank)
    ctx.has_k = k is not None


def _rope_backward(ctx, grads):
    """The inverse rotation of the incoming gradients (same kernel, INVERSE flipped),
    angles recomputed from the saved positions, scaled by the same query scale (a per-token
    factor commutes with the rotation; so does the context-parallel shard's position map);
    then, with the norm, its backward."""
    positions, offsets, cu_seqlens, inv_freq, *saved = ctx.saved_tensors
    scale, pos_base, rot, layout, inverse, precise, eps, norm, mrope, qs_beta, qs_omax, rotary_at, cp_size, \
        cp_rank = ctx.scalars
    gq = grads[0]
    gk = grads[1] if ctx.has_k else None
    outs = torch.ops.yarn_triton.rope(gq, gk, positions, offsets, cu_seqlens, inv_freq, scale,
                                      pos_base, rot, layout, not inverse, precise, None, None, 0.0, 0, mrope,
                                      qs_beta, qs_omax, rotary_at, cp_size, cp_rank)
    dq, dk = outs[0], (outs[1] if ctx.has_k else None)
    dqw = dkw = None
    if norm:
        q, k, q_weight, k_weight = saved
        dq, dk, dqw, dkw = _norm_rope_backward(q, k, q_weight, k_weight, eps, norm, dq, dk)
    grads = (dq, dk) + (None,) * 10 + (dqw, dkw) + (None,) * 8
    # one per argument the op was called with: the dispatcher drops trailing arguments equal
    # to their defaults (cp_size 1, cp_rank 0) before autograd sees the call
    return grads[:len(ctx.needs_input_grad)]


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup_context)
