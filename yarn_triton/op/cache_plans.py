"""Launch plans of the serving ops (rope + KV-cache write): their eager fast path.

A serving step calls the op once per layer with fresh q, k and v of a shape that repeats
step after step, against the same caches. The checks (shapes, dtypes, devices, scales,
overlaps) and the launch geometry then cost several times the kernel's own host time;
they depend only on the call's signature, except where the tensors lie in memory. So the
first call of a signature keeps its prepared launch (in the same bounded cache as
:mod:`.plans`), and a later call re-checks only what its signature does not fix, the
overlaps of the written tensors with the others, and replays the launch.

The overlap re-check is by byte ranges: two tensors whose ranges do not intersect share
no element. Ranges that do intersect (the two halves of one MLA cache, q and k as views
of one fused projection) are accepted only at a pointer distance that the exact check of
the full path has passed for this plan; any other call takes the full path again, which
raises on a real overlap.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import plans as _plans
from .cache_checks import CHECK_SLOTS
from .checks import _check_cu
from .plans import _offsets_sig, _span, _tsig, exact_cp

_Tensor = torch.Tensor


def _scale_sig(s):
    """A scale's part of the key: a float's value (the launch holds it), a tensor's
    signature (the kernel reads it), or False where the call must take the full path
    (ints, bools and anything else the checks convert or refuse)."""
    if s is None:
        return None
    if type(s) is float:
        return ("f", s)
    if type(s) is _Tensor:
        return ("t", _tsig(s))
    return False


def cache_signature(tag, q, q_out, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q_scale, positions,
                    params, layout, rotary_dim, offsets, cu_seqlens, precise, check_slots, config, cp,
                    rotary_at) -> Optional[tuple]:
    """Everything the checks and the launch of a serving call depend on, or None when the
    call is not eligible for the fast path (the full path then checks it, and raises on
    bad input). ``tag`` tells the two ops apart (their checks name arguments differently)."""
    for t in (q, k, v, k_cache, v_cache, slot_mapping):
        if type(t) is not _Tensor:
            return None
    if (q_out is not None and type(q_out) is not _Tensor) or \
            (positions is not None and type(positions) is not _Tensor) or \
            (cu_seqlens is not None and type(cu_seqlens) is not _Tensor):
        return None
    if CHECK_SLOTS if check_slots is None else check_slots:  # a value check: the full path, every call
        return None
    off = _offsets_sig(offsets)
    if off is False:
        return None
    scales = (_scale_sig(k_scale), _scale_sig(v_scale), _scale_sig(q_scale))
    if False in scales:
        return None
    if type(precise) is not bool or type(layout) is not str or type(rotary_at) is not str or \
            (rotary_dim is not None and type(rotary_dim) is not int):
        return None
    if cp is not None and not exact_cp(cp):
        return None
    return (tag, id(params), layout, rotary_dim, precise, config, cp, rotary_at, _tsig(q), _tsig(q_out), _tsig(k),
            _tsig(v), _tsig(k_cache), _tsig(v_cache), _tsig(slot_mapping), _tsig(positions), off, _tsig(cu_seqlens),
            scales)


def _written_and_read(q, q_out, k, v, k_cache, v_cache) -> Tuple[tuple, tuple]:
    """The tensors the cache check keeps disjoint: each written one from every other."""
    if q_out is None:
        return (k_cache, v_cache, q), (k, v)
    return (k_cache, v_cache, q_out), (q, k, v)


def _pairs(written, read):
    """``(i, j)`` index pairs (into ``written + read``) that must share no element."""
    n = len(written)
    return tuple((i, j) for i in range(n) for j in range(i + 1, n + len(read)))


class CachePlan(_plans.PlanBase):
    """What a checked serving-call signature needs to run again: the prepared launch, the
    byte spans of its tensors (relative to their data pointers) and the pointer distances
    at which intersecting spans were checked disjoint."""

    __slots__ = ("spans", "pairs", "checked")

    def __init__(self, launch, params, inv_freq, tensors, n_written):
        super().__init__(launch, params, inv_freq)
        self.spans = tuple(_span(t) for t in tensors)
        self.pairs = _pairs(tensors[:n_written], tensors[n_written:])
        self.checked: set = set()  # (pair, pointer distance) found disjoint by the exact check

    def learn(self, tensors) -> None:
        """Record the distances of this call's intersecting pairs (its exact check passed)."""
        ptrs = [t.data_ptr() for t in tensors]
        for pair in self._intersecting(ptrs):
            if len(self.checked) < 64:
                self.checked.add((pair, ptrs[pair[1]] - ptrs[pair[0]]))

    def _intersecting(self, ptrs):
        spans = self.spans
        for i, j in self.pairs:
            (alo, ahi), (blo, bhi) = spans[i], spans[j]
            if ptrs[i] + alo < ptrs[j] + bhi and ptrs[j] + blo < ptrs[i] + ahi:
                yield (i, j)

    def try_run(self, q, q_out, k, v, k_cache, v_cache, slots, positions, offsets, cu_seqlens, q_quant, k_quant,
                v_quant) -> bool:
        """Launch if this call's tensors lie as checked before; False (nothing launched)
        when the full path must check them."""
        written, read = _written_and_read(q, q_out, k, v, k_cache, v_cache)
        tensors = written + read
        ptrs = [t.data_ptr() for t in tensors]
        for pair in self._intersecting(ptrs):
            if (pair, ptrs[pair[1]] - ptrs[pair[0]]) not in self.checked:
                return False
        # (the pointers of written + read, in _written_and_read's order, reused: each is read once)
        if q_out is None:
            kcp, vcp, qp, kp, vp = ptrs
            qo, qop = q, qp
        else:
            kcp, vcp, qop, qp, kp, vp = ptrs
            qo = q_out
        inv = self.inv_freq
        ip = self.inv_ptr
        if type(offsets) is _Tensor:
            pos, pos_base = offsets if positions is None else positions, 0
        else:
            pos, pos_base = positions, (offsets or 0)
        pos = inv if pos is None else pos
        cu = inv if cu_seqlens is None else cu_seqlens
        qq = q_quant if type(q_quant) is _Tensor else inv
        kq = k_quant if type(k_quant) is _Tensor else inv
        vq = v_quant if type(v_quant) is _Tensor else inv
        posp, cup, sp, qqp, kqp, vqp = (pos.data_ptr(), cu.data_ptr(), slots.data_ptr(), qq.data_ptr(),
                                        kq.data_ptr(), vq.data_ptr())
        self.launch((qp, qop, kp, kcp, posp, cup, ip, ip, ip, sp, vp, vcp, qqp, kqp, vqp), pos_base,
                    (q, qo, k, k_cache, pos, cu, inv, inv, inv, slots, v, v_cache, qq, kq, vq),
                    qp | qop | kp | kcp | posp | cup | ip | sp | vp | vcp | qqp | kqp | vqp)
        return True


def replay(key, q, q_out, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q_scale, positions, offsets,
           cu_seqlens, check_cu, cp) -> bool:
    """Run a known signature's plan: True when it launched, False when the call must take
    the full path (unknown signature, or tensors lying where the plan has not checked)."""
    plan = _plans._PLANS.get(key) if key is not None else None
    if plan is None:
        return False
    if cu_seqlens is not None:
        _check_cu(cu_seqlens, check_cu, q, cp)
    # (the launch holds the slots' strides: only their data pointer changes)
    if not plan.try_run(q, q_out, k, v, k_cache, v_cache, slot_mapping, positions, offsets, cu_seqlens,
                        q_scale if q_out is not None else None, k_scale, v_scale):
        return False
    _plans._PLANS.move_to_end(key)
    return True


def remember(key, launch, params, inv_freq, q, q_out, k, v, k_cache, v_cache) -> None:
    """Keep (or teach) the plan of a call that passed the full path's checks."""
    if key is None or launch is None:
        return
    written, read = _written_and_read(q, q_out, k, v, k_cache, v_cache)
    plan = _plans._PLANS.get(key)
    if plan is None:  # (a known signature keeps its plan, and what it learned: this call only teaches it)
        plan = CachePlan(launch, params, inv_freq, written + read, len(written))
        _plans.keep(key, plan)
    plan.learn(written + read)
