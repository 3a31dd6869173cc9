"""The eager autograd Function: out-of-place rope without the dispatcher.

Same forward and backward as the ``yarn_triton::rope`` op (:mod:`.library`), but called
directly, since the dispatcher's round trips cost several times the kernel's own host
time; both directions replay launch plans (:mod:`.plans`). ``torch.compile`` uses the op
instead. A replayed call takes the C++ autograd node (:mod:`.native_node`) where it is
built (:func:`replay_with_node`), with the same backward (:func:`_rope_backward`).
"""

from __future__ import annotations

import torch

from . import plans as _plans
from .checks import mrope_spec
from .launch import _execute, out_like
from .library import _norm_rope_backward
from .plans import _remember, _signature


class _EagerRope(torch.autograd.Function):
    """The same forward/backward as the ``yarn_triton::rope`` op, without the dispatcher
    round trips, which cost several times the kernel's own host time in eager mode. Both
    directions replay a launch plan when the signature repeats. ``torch.compile`` uses
    the op.

    Arguments: ``meta = (args, plan, key, norm, has_k)`` (``args`` as for
    :func:`_eager_copy`; ``plan`` the forward's launch plan or None, then remembered under
    ``key``), then the tensors autograd tracks: q, k and, with the norm, its weights.
    Everything else travels inside ``meta``, since ``apply`` inspects each argument it
    is given (about 1 us per 10); positions and inv_freq take no gradient."""

    @staticmethod
    def forward(ctx, meta, q, k, *weights):
        args, plan, key, norm, _ = meta
        if plan is not None and args[2] is None:  # the usual call, inlined: a replay into fresh outputs
            qo = torch.empty_like(q)
            ko = None if k is None else torch.empty_like(k)
            plan.run(q, k, args[0], args[1], None, args[5], qo, ko, norm)
        else:
            qo, ko = _eager_copy(q, k, args, args[8], plan, key, norm)
        # The backward recomputes the angles from positions / offsets / cu_seqlens (``meta``
        # holds them, and they take no gradient): their versions are kept so that an
        # in-place change before the backward is an error, as autograd makes it for a saved
        # tensor, not wrong gradients. (Cheaper than save_for_backward, on every call.)
        ctx.meta = meta
        ctx.versions = _versions(args)
        if weights:
            ctx.save_for_backward(q, k, *weights)
        return qo, ko

    @staticmethod
    def backward(ctx, gq, gk):
        return (None, *_rope_backward(ctx.meta, ctx.versions, gq, gk, ctx.saved_tensors if ctx.meta[3] else None))


def _rope_backward(meta, versions, gq, gk, saved):
    """The gradients of (q, k), or with the norm of (q, k, q_weight, k_weight), for the
    forward of ``meta`` whose position tensors had ``versions``; ``saved``: the forward's
    (q, k, q_weight, k_weight) with the norm, else None. Both autograd nodes' backward."""
    args, _, _, norm, has_k = meta
    if _versions(args) != versions:
        raise RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                           "operation: the positions, offsets or cu_seqlens given to apply_rope changed before "
                           "its backward, which recomputes the angles from them")
    positions, offsets, cu_seqlens = args[0], args[1], args[2]
    _, _, _, _, _, _, rot, layout, inverse, precise, params, q_scale, rotary_at, cp = args
    gk = gk if has_k else None
    key = _signature(gq, gk, positions, params, layout, rot, offsets, cu_seqlens, precise, not inverse, None,
                     False, None, q_scale, rotary_at, cp)
    # q_out = s * R(x) per token: dx = R^T(s * g), the same kernel inverted, same scale
    dq, dk = _eager_copy(gq, gk, args, not inverse, _plans._PLANS.get(key), key)
    if norm is None:
        return dq, dk
    q, k, q_weight, k_weight = saved
    return _norm_rope_backward(q, k, q_weight, k_weight, norm.eps, norm.kind, dq, dk)


def _node_backward(state, gq, gk, saved):
    """The C++ node's backward (``native_node.cpp``): ``state`` is ``(meta, versions)``."""
    return _rope_backward(state[0], state[1], gq, gk, saved)


def replay_with_node(apply, q, k, args, plan, key, norm):
    """:class:`_EagerRope`'s forward for a replayed plan, with the C++ autograd node
    (:mod:`.native_node`, whose ``apply`` is given) in place of the Python Function: the
    node allocates the outputs and wires them into the graph, then the plan launches into
    them. Arguments as for the Function; returns ``(q_out, k_out)``."""
    meta = (args, plan, key, norm, k is not None)
    state = (meta, _versions(args))
    cu_seqlens = args[2]
    if norm is None:
        qo, ko = apply(_node_backward, state, q, k, None, None, cu_seqlens is not None)
    else:
        qo, ko = apply(_node_backward, state, q, k, norm.q_weight, norm.k_weight, cu_seqlens is not None)
    plan.run(q, k, args[0], args[1], cu_seqlens, args[5], qo, ko, norm)
    return qo, ko


def _versions(args) -> tuple:
    """Version counters of the position tensors in ``args`` (positions, offsets, cu_seqlens)."""
    p, o, c = args[0], args[1], args[2]
    return (None if p is None else p._version, None if o is None else o._version,
            None if c is None else c._version)


# The C++ apply under Function.apply's Python wrapper, which (with no functorch transform
# active) only passes each tensor argument through functorch's unwrap_if_dead, at about
# 1.5 us a call: a tensor that escaped a functorch transform fails in the forward's first
# op with or without it.
_EAGER_ROPE_APPLY = super(torch.autograd.Function, _EagerRope).apply


def _eager_copy(q, k, args, inverse, plan, key, norm=None):
    """Rotate ``q``/``k`` into fresh tensors, replaying ``plan`` when given, else by the full
    launch path, remembering its plan under ``key``. ``args = (positions, offsets,
    cu_seqlens, inv_freq, scale, pos_base, rot, layout, inverse, precise, params,
    q_scale, rotary_at, cp)``, the forward's; ``inverse`` is the direction of this call."""
    positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot, layout, _, precise, params, q_scale, \
        rotary_at, cp = args
    qo, ko = out_like(q, cu_seqlens), out_like(k, cu_seqlens)
    if plan is not None:
        plan.run(q, k, positions, offsets, cu_seqlens, pos_base, qo, ko, norm)
    else:
        launch = _execute(q, qo, k, ko, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
                          rot, layout, inverse, precise, norm=norm, mrope=mrope_spec(params), q_scale=q_scale,
                          rotary_at=rotary_at, cp=cp)
        _remember(key, launch, params, inv_freq, q, k)
    return qo, ko
