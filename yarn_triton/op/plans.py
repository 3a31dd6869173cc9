"""Launch plans and their bounded cache: the eager fast path.

In eager mode the checks and the launch geometry cost more host time than the kernel
itself; they depend only on a call's signature (shapes, strides, dtypes, devices, params
object, options), so the first call of a signature keeps its prepared launch here and
later calls replay it, re-running only what the signature does not fix (q/k overlap).

The cache (``_PLANS``, bounded by ``_PLANS_MAX``) is module state: readers in other
modules look it up as ``plans._PLANS`` at call time, so that code (tests, benchmarks)
replacing it here is seen everywhere.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Tuple

import torch

from .checks import QueryScale
from .overlap import _extent, may_overlap

_Tensor = torch.Tensor


class PlanBase:
    """What every plan holds: the prepared kernel launch, and ``params`` with its
    ``inv_freq`` on the launch's device (held, so that the ``id(params)`` in the key cannot
    be reused while the plan lives)."""

    __slots__ = ("launch", "params", "inv_freq", "inv_ptr")

    def __init__(self, launch, params, inv_freq):
        self.launch = launch
        self.params = params
        self.inv_freq = inv_freq
        self.inv_ptr = inv_freq.data_ptr()


class _Plan(PlanBase):
    """What a validated rope-call signature needs to run again: the prepared launch and
    the per-call checks that depend on more than the signature (where q and k lie in
    memory)."""

    __slots__ = ("q_span", "k_span", "fused_ok")

    def __init__(self, launch, params, inv_freq, q, k):
        super().__init__(launch, params, inv_freq)
        self.q_span = _span(q)
        self.k_span = None if k is None else _span(k)
        self.fused_ok: set = set()  # pointer distances of q/k views checked disjoint

    def run(self, q, k, positions, offsets, cu_seqlens, pos_base, qo=None, ko=None, norm=None) -> None:
        """Checks what can differ for the same signature, then launches. (Each pointer is
        read once, and their alignment bits are OR-ed here over the distinct ones: this
        runs on every eager call.)"""
        qp = q.data_ptr()
        if k is None:
            kp = qp
            k = q
        else:
            kp = k.data_ptr()
            if qo is None:  # in place: q and k must not share elements
                self._check_disjoint(q, k, qp, kp)
        if qo is None:
            qo, ko, qop, kop = q, k, qp, kp
        else:
            qop = qo.data_ptr()
            if ko is None:
                ko, kop = k, qp
            else:
                kop = ko.data_ptr()
        inv = self.inv_freq
        ip = self.inv_ptr  # (also the cache write's six pointers: unused here)
        pos = positions if positions is not None else offsets
        if pos is None:
            pos, posp = inv, ip
        else:
            posp = pos.data_ptr()
        if cu_seqlens is None:
            cu, cup = inv, ip
        else:
            cu, cup = cu_seqlens, cu_seqlens.data_ptr()
        if norm is None:
            qw = kw = inv
            qwp = kwp = ip
        else:
            qw = norm.q_weight
            kw = qw if norm.k_weight is None else norm.k_weight
            qwp, kwp = qw.data_ptr(), kw.data_ptr()
        self.launch((qp, qop, kp, kop, posp, cup, ip, qwp, kwp, ip, ip, ip, ip, ip, ip), pos_base,
                    (q, qo, k, ko, pos, cu, inv, qw, kw, inv, inv, inv, inv, inv, inv),
                    qp | qop | kp | kop | posp | cup | ip | qwp | kwp)

    def _check_disjoint(self, q, k, qp, kp) -> None:
        (qlo, qhi), (klo, khi) = self.q_span, self.k_span
        if qp + qhi <= kp + klo or kp + khi <= qp + qlo:
            return
        diff = kp - qp
        if diff in self.fused_ok:
            return
        if may_overlap(q, k):
            raise ValueError("q and k overlap in memory; in-place rope needs them disjoint")
        if len(self.fused_ok) < 64:
            self.fused_ok.add(diff)


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """Byte range of ``t``'s elements relative to its data pointer."""
    lo, hi = _extent(t)
    return lo - t.data_ptr(), hi - t.data_ptr()


# Bounded: a server sees many token counts; the least recently used signature goes first.
_PLANS: "OrderedDict" = OrderedDict()
_PLANS_MAX = 512


def plan_cache_size() -> int:
    """Number of call signatures the eager fast path holds (bounded by ``_PLANS_MAX``)."""
    return len(_PLANS)


def _tsig(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.get_device())


def _offsets_sig(offsets):
    """``offsets``' part of a plan key: None; ``int`` for an int (its value is the launch's
    position base, passed on every call); a tensor's signature; False where the call is
    not eligible for a plan."""
    if offsets is None:
        return None
    if type(offsets) is int:
        return int
    return _tsig(offsets) if type(offsets) is _Tensor else False


def _signature(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, precise, inverse, config,
               inplace, norm=None, q_scale=None, rotary_at="start", cp=None):
    """Everything validation and the launch geometry depend on, or None when a call is not
    eligible for the fast path (then it takes the full path, which raises on bad input).
    (Written flat, without a helper per tensor: it runs on every eager call.)"""
    if type(q) is not _Tensor:
        return None
    if k is None:
        ks = None
    elif type(k) is _Tensor:
        ks = (k.shape, k.stride(), k.dtype, k.get_device())
    else:
        return None
    # positions, offsets and cu_seqlens: None, an exact tensor or (offsets) an int
    if (positions is not None and type(positions) is not _Tensor) or \
            (cu_seqlens is not None and type(cu_seqlens) is not _Tensor):
        return None
    ps = None if positions is None else (positions.shape, positions.stride(), positions.dtype,
                                         positions.get_device())
    off = _offsets_sig(offsets)
    if off is False:
        return None
    cs = None if cu_seqlens is None else _tsig(cu_seqlens)
    if norm is not None:
        if type(norm.q_weight) is not _Tensor or (
                norm.k_weight is not None and type(norm.k_weight) is not _Tensor) or type(norm.eps) is not float:
            return None
        norm = (norm.kind, norm.eps, _tsig(norm.q_weight), _tsig(norm.k_weight))
    if q_scale is not None:
        # only exact (float, int) pairs key a plan: a plan exists only for checked values
        if type(q_scale) not in (tuple, QueryScale) or len(q_scale) != 2 or type(q_scale[0]) is not float \
                or type(q_scale[1]) is not int:
            return None
        q_scale = (q_scale[0], q_scale[1])
    if type(rotary_at) is not str:  # (a plan exists only for checked values, which are str)
        return None
    if cp is not None and not exact_cp(cp):  # only an exact pair of ints keys a plan (the launch holds its values)
        return None
    return (id(params), layout, rotary_dim, precise, inverse, config, inplace, q.shape, q.stride(), q.dtype,
            q.get_device(), ks, ps, off, cs, norm, q_scale, rotary_at, cp)


def exact_cp(cp) -> bool:
    """``cp`` is an exact ``(int, int)`` pair, the only form that keys a plan."""
    return type(cp) is tuple and len(cp) == 2 and type(cp[0]) is int and type(cp[1]) is int


def keep(key, plan: PlanBase) -> None:
    """Store ``plan`` under ``key`` in the bounded cache, dropping the least recent ones."""
    _PLANS[key] = plan
    while len(_PLANS) > _PLANS_MAX:
        _PLANS.popitem(last=False)


def _remember(key, plan_launch, params, inv_freq, q, k) -> None:
    if key is None or plan_launch is None:
        return
    keep(key, _Plan(plan_launch, params, inv_freq, q, k))
