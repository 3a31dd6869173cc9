"""The public functions: ``apply_rope_``, ``apply_rope``, ``apply_qk_norm_rope_``,
``apply_qk_norm_rope``.

Each call picks one of three routes: a known signature replays its plan (:mod:`.plans`);
under ``torch.compile`` the custom ops (:mod:`.library`); otherwise the full checks
(:mod:`.checks`), then the launch (:mod:`.launch`) or, when something needs a gradient,
the eager Function (:mod:`.eager`). Every route checks before it writes. DTensor
arguments (off the plan path, whose tensors are plain) are checked on their global
shapes, then run by the same routes on each rank's local shards (:mod:`.dtensor`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad

from ..kernels.configs import LaunchConfig
from ..rope import RopeParams
from . import dtensor as _dtensor
from . import native_node as _native_node
from . import plans as _plans
from .checks import Norm, Offsets, QueryScale, _check_call, _check_config, _check_cu, mrope_list, mrope_spec, split_offsets
from .eager import _EAGER_ROPE_APPLY, _EagerRope, _eager_copy, replay_with_node
from .launch import _execute
from .library import _cp_args, _q_scale_args
from .plans import _remember, _signature


def _needs_grad(q: torch.Tensor, k: Optional[torch.Tensor], norm: Optional[Norm] = None) -> bool:
    if not torch.is_grad_enabled():
        return False
    if q.requires_grad or (k is not None and k.requires_grad):
        return True
    return norm is not None and (norm.q_weight.requires_grad or
                                 (norm.k_weight is not None and norm.k_weight.requires_grad))


def _rope_inplace(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise, inverse,
                  check_cu, config, norm, q_scale=None, rotary_at="start", cp=None):
    """In-place rope (and norm, and query scale): the fast path for a known signature, else
    the full one."""
    compiling = torch.compiler.is_compiling()
    key = None
    if not compiling:
        key = _signature(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise,
                         inverse, config, True, norm, q_scale, rotary_at, cp)
        plan = _plans._PLANS.get(key) if key is not None else None
        if plan is not None and not _needs_grad(q, k, norm):
            _check_cu(cu_seqlens, check_cu, q, cp)
            _plans._PLANS.move_to_end(key)
            plan.run(q, k, positions, offsets if type(offsets) is torch.Tensor else None, cu_seqlens,
                     offsets if type(offsets) is int else 0, norm=norm)
            return q, k
    if key is None and _dtensor.involved(q, k, positions, offsets, cu_seqlens, norm):
        if config is not None:
            _check_config(config)
        if _needs_grad(q, k, norm):  # recorded as a copy of the out-of-place result, as below
            return _copy_into(q, k, _rope_copy(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens,
                                               precise, inverse, check_cu, norm, q_scale, rotary_at, cp))
        loc = _local_args(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, check_cu, norm,
                          q_scale, rotary_at, cp)
        _rope_inplace(loc.q, loc.k, loc.positions, params, layout, rotary_dim, loc.offsets, loc.cu_seqlens, precise,
                      inverse, loc.check_cu, config, loc.norm, q_scale, rotary_at)
        return q, k
    rot, q_scale = _check_call(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, norm, q_scale,
                               rotary_at, inplace=True, cp=cp)
    if config is not None:
        _check_config(config)
    _check_cu(cu_seqlens, check_cu, q, cp)
    if _needs_grad(q, k, norm):
        return _copy_into(q, k, _rope_copy(q, k, positions, params, layout, rot, offsets, cu_seqlens, precise,
                                           inverse, False, norm, q_scale, rotary_at, cp))
    off_t, pos_base = split_offsets(offsets)
    inv_freq = params.inv_freq_on(q.device)
    if compiling:
        args = (None, None, 0.0, 0) if norm is None else (norm.q_weight, norm.k_weight, float(norm.eps), norm.kind)
        torch.ops.yarn_triton.rope_(q, k, positions, off_t, cu_seqlens, inv_freq, params.cos_sin_scale,
                                    pos_base, rot, layout, inverse, precise, *args, mrope_list(params),
                                    *_q_scale_args(q_scale), rotary_at, *_cp_args(cp))
    else:  # eager: straight to the launch, no dispatcher round trip
        launch = _execute(q, q, k, k, positions, off_t, cu_seqlens, inv_freq, params.cos_sin_scale, pos_base,
                          rot, layout, inverse, precise, config, norm=norm, mrope=mrope_spec(params),
                          q_scale=q_scale, rotary_at=rotary_at, cp=cp)
        _remember(key, launch, params, inv_freq, q, k)
    return q, k


def _copy_into(q, k, out):
    q.copy_(out[0])
    if k is not None:
        k.copy_(out[1])
    return q, k


def _local_args(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, check_cu, norm, q_scale,
                rotary_at, cp) -> _dtensor.LocalArgs:
    """A call with DTensor arguments: every argument check on the global shapes, then the
    placement checks and the arguments on this rank's shards (:mod:`.dtensor`)."""
    if cp is not None:
        raise ValueError("cp names a head-tail context-parallel shard held as plain tensors; DTensor q and k carry "
                         "their shards in their placements: give one or the other")
    _check_call(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, norm, q_scale, rotary_at,
                inplace=False)
    return _dtensor.local_args(q, k, positions, offsets, cu_seqlens, check_cu, norm, bool(mrope_spec(params)[0]))


def _rope_copy_dtensor(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise, inverse, check_cu,
                       norm, q_scale, rotary_at, cp):
    """:func:`_rope_copy` of DTensors: run on each rank's shards, the results rewrapped."""
    loc = _local_args(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, check_cu, norm, q_scale,
                      rotary_at, cp)
    out = _rope_copy(loc.q, loc.k, loc.positions, params, layout, rotary_dim, loc.offsets, loc.cu_seqlens, precise,
                     inverse, loc.check_cu, loc.norm, q_scale, rotary_at)
    return _dtensor.rewrap(out, q, k, loc)


def _rope_copy(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise, inverse, check_cu, norm,
               q_scale=None, rotary_at="start", cp=None):
    """Out-of-place, differentiable rope (and norm, and query scale). Eager: a known signature skips the
    checks (they passed for it) and replays its plan with the C++ autograd node where it
    is built, else inside :class:`_EagerRope`, or without autograd when nothing needs a
    gradient; torch.compile: the custom op. DTensor
    arguments (never on the plan path) run on their local shards."""
    if torch.compiler.is_compiling():
        if _dtensor.involved(q, k, positions, offsets, cu_seqlens, norm):
            return _rope_copy_dtensor(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise,
                                      inverse, check_cu, norm, q_scale, rotary_at, cp)
        rot, q_scale = _check_call(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, norm, q_scale,
                                   rotary_at, inplace=False, cp=cp)
        off_t, pos_base = split_offsets(offsets)
        nargs = (None, None, 0.0, 0) if norm is None else (norm.q_weight, norm.k_weight, float(norm.eps), norm.kind)
        out = torch.ops.yarn_triton.rope(q, k, positions, off_t, cu_seqlens, params.inv_freq_on(q.device),
                                         params.cos_sin_scale, pos_base, rot, layout, bool(inverse), precise, *nargs,
                                         mrope_list(params), *_q_scale_args(q_scale), rotary_at, *_cp_args(cp))
        return out[0], (out[1] if k is not None else None)
    key = _signature(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise, inverse, None,
                     False, norm, q_scale, rotary_at, cp)
    plan = _plans._PLANS.get(key)  # (None when key is None)
    if plan is None:
        if key is None and _dtensor.involved(q, k, positions, offsets, cu_seqlens, norm):
            return _rope_copy_dtensor(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise,
                                      inverse, check_cu, norm, q_scale, rotary_at, cp)
        rot, q_scale = _check_call(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, norm, q_scale,
                                   rotary_at, inplace=False, cp=cp)
        inv_freq = params.inv_freq_on(q.device)
    else:  # the signature passed these checks before; the plan holds params' inv_freq on q's device
        rot = params.rope_dim
        inv_freq = plan.inv_freq
    if cu_seqlens is not None:
        _check_cu(cu_seqlens, check_cu, q, cp)
    off_t, pos_base = (None, 0) if offsets is None else split_offsets(offsets)
    args = (positions, off_t, cu_seqlens, inv_freq, params.cos_sin_scale, pos_base, rot, layout, bool(inverse),
            precise, params, q_scale, rotary_at, cp)
    # Outside functorch transforms and forward-mode AD (which the Function refuses, and
    # must keep refusing), Function.apply's Python wrapper adds nothing, and a call where
    # nothing needs a gradient gets the same result without the Function.
    plain = not torch._C._are_functorch_transforms_active() and _forward_ad._current_level < 0
    if plain and plan is not None:  # a replay: the C++ autograd node, once built (same results, less host time;
        node = _native_node.APPLY  # it also allocates the outputs of a call that needs no gradient, and adds no node)
        if node is not None:
            return replay_with_node(node, q, k, args, plan, key, norm)
        _native_node.request()
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
    cp: Optional[Tuple[int, int]] = None,
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
        cp: ``(cp_size, cp_rank)``, with ``positions=None``: q and k hold rank ``cp_rank``'s
            shard of a context-parallel split over ``cp_size`` ranks with head-tail load
            balancing (torch's ``context_parallel`` / ``_HeadTailLoadBalancer``,
            TransformerEngine's ``cp_size``/``cp_rank``): each global sequence was cut into
            ``2 * cp_size`` equal chunks and the rank holds chunks ``cp_rank`` and
            ``2 * cp_size - 1 - cp_rank``, one after the other. Every local sequence (each
            row of ``[B, S, H, D]`` / ``[S, H, D]``, or each ``cu_seqlens`` range of a packed
            ``[T, H, D]``, where ``cu_seqlens`` describes the local tokens: TransformerEngine's
            global ``cu_seqlens`` divided by ``cp_size``) is thus two chunks of ``L / 2``
            tokens, and its token ``i`` gets the global position ``offset + i + (L / 2) *
            cp_rank`` (first chunk) or ``offset + i + (L / 2) * (2 * cp_size - 2 - cp_rank)``
            (second): the rotation the unsharded sequence gives those tokens. The kernel
            derives it (no positions tensor). ``offsets`` (int or per sequence) is the global
            position of each sequence's first token. ``L`` must be even: ValueError for an
            odd ``S``; odd packed lengths are found by ``check_cu_seqlens`` (else their
            positions are unspecified). ``cp_size`` 1 is the unsharded call. TypeError unless
            a tuple of two ints, ValueError unless ``cp_size >= 1`` and ``0 <= cp_rank <
            cp_size``, or when ``positions`` is given (positions sharded with q already hold
            the global positions: pass them alone).

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
                         inverse, check_cu_seqlens, config, None, q_scale, rotary_at, cp)


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
    cp: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place, differentiable :func:`apply_rope_`: returns new rotated ``(q, k)``
    (``k`` None when not given), in one pass over the inputs (channels past the rotary
    dim are copied by the same kernel). Arguments as in :func:`apply_rope_`.

    The backward pass is the inverse rotation, by the same kernel, recomputing angles from
    the positions (and, with ``q_scale``, scaling q's gradient by the same factor: the
    gradient of a pass-through channel is ``s * grad`` with ``q_scale``, ``grad`` without,
    wherever ``rotary_at`` puts them; with ``cp``, the same shard's positions); nothing
    else is saved.
    """
    return _rope_copy(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise_angles, inverse,
                      check_cu_seqlens, None, q_scale, rotary_at, cp)


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
    cp: Optional[Tuple[int, int]] = None,
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
        cp: as in :func:`apply_rope_` (a context-parallel shard's global positions).
        Everything else: as in :func:`apply_rope_` (strides, fused-projection views, head
        counts, dtypes, layouts, partial rotary and the three position forms).

    Returns:
        ``(q, k)``, the same tensors, normalised and rotated.
    """
    return _rope_inplace(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise_angles,
                         False, check_cu_seqlens, config, _make_norm(q_weight, k_weight, eps, unit_offset), q_scale,
                         rotary_at, cp)


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
    cp: Optional[Tuple[int, int]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place, differentiable :func:`apply_qk_norm_rope_`: returns new ``(q, k)``.

    The backward rotates the incoming gradients back with the same kernel, then goes
    through the norm (float32), giving the gradients of q, k and of both weights.
    Arguments as in :func:`apply_qk_norm_rope_`.
    """
    return _rope_copy(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise_angles, False,
                      check_cu_seqlens, _make_norm(q_weight, k_weight, eps, unit_offset), q_scale, rotary_at, cp)
