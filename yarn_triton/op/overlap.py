"""Memory-overlap geometry: may two strided views share an element, may one view
overlap itself?

In-place rope writes q and k in one launch, so they must be disjoint; fused-projection
views (q and k heads sliced from one buffer) are the common case and must not be
refused, so the test is exact for equal nested strides and conservative otherwise. Kept
apart from the argument checks because the launch plans re-run it on every replay
(where q and k lie is not part of a call signature) and the transformers integration
uses it for its own view decisions.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share memory: torch's check, plus our stride test where
    torch answers "too hard" (e.g. as_strided views)."""
    verdict = torch._debug_has_internal_overlap(t)
    return verdict == 1 or (verdict == 2 and not _nested(t.shape, [abs(s) for s in t.stride()]))


def _extent(t: torch.Tensor) -> Tuple[int, int]:
    """Byte range ``[lo, hi)`` that ``t``'s elements occupy."""
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        span = (size - 1) * stride * t.element_size()
        lo, hi = (lo + span, hi) if span < 0 else (lo, hi + span)
    return lo, hi + t.element_size()


def _nested(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """True when, in increasing stride order, each stride exceeds the span of all smaller
    ones (then an element offset has one decomposition into indices)."""
    span = 0
    for size, stride in sorted(zip(sizes, strides), key=lambda p: p[1]):
        if size == 1:  # a single index: its stride never matters
            continue
        if stride <= span:
            return False
        span += (size - 1) * stride
    return True


def _offsets_meet(diff: int, dims: List[Tuple[int, int, int]]) -> bool:
    """Is ``diff == sum(c_d * stride_d)`` with ``-(nb_d-1) <= c_d <= na_d-1``? ``dims`` are
    ``(stride, na, nb)`` in decreasing stride order, strides nested."""
    if not dims:
        return diff == 0
    (stride, na, nb), rest = dims[0], dims[1:]
    c = diff // stride
    return any(
        -(nb - 1) <= cc <= na - 1 and _offsets_meet(diff - cc * stride, rest) for cc in (c, c + 1)
    )


def _rows_apart(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` (``[*tokens, heads, dim]``) are provably disjoint as
    column ranges of the rows of one buffer: their token dims share strides, each a
    multiple of the row (the smallest of them), and each token's ``(heads, dim)`` block
    lies within a row, in column windows that do not meet. Fused projections whose v
    head dim differs from q's (``q``, ``k``, ``v`` sliced from one ``[T, width]``) are
    such views, which the stride test below cannot decide."""
    if a.dim() < 3 or a.dim() != b.dim() or a.element_size() != b.element_size():
        return False
    outer = []
    for sa, sb, na, nb in zip(a.stride()[:-2], b.stride()[:-2], a.shape[:-2], b.shape[:-2]):
        if na > 1 or nb > 1:
            if sa != sb or sa <= 0:
                return False
            outer.append(sa)
    if not outer:
        return False
    row = min(outer)
    if any(s % row for s in outer):
        return False

    def window(t):  # elements from a token's first element to its last, or None
        if any(s < 0 for s in t.stride()[-2:]):
            return None
        return sum((n - 1) * s for n, s in zip(t.shape[-2:], t.stride()[-2:])) + 1

    wa, wb = window(a), window(b)
    diff_bytes = b.data_ptr() - a.data_ptr()
    if wa is None or wb is None or diff_bytes % a.element_size():
        return False
    shift = (diff_bytes // a.element_size()) % row  # where b's window starts in a's row
    return (wa <= shift and shift + wb <= row) or (wb <= row - shift and row - shift + wa <= row)


def may_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors might share an element. Exact for views with equal nested
    strides (q/k heads of one fused projection) and for column ranges of one buffer's
    rows (:func:`_rows_apart`); conservative otherwise."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (alo, ahi), (blo, bhi) = _extent(a), _extent(b)
    if ahi <= blo or bhi <= alo:  # disjoint byte ranges (the common case, and cheapest)
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if _rows_apart(a, b):
        return False
    if a.element_size() != b.element_size() or a.dim() != b.dim():
        return True
    # A size-1 dim's stride never matters (views of one projection may differ there): use
    # the stride of the tensor that spans the dim; both spanning it must agree.
    strides = []
    for sa, sb, na, nb in zip(a.stride(), b.stride(), a.shape, b.shape):
        if na > 1 and nb > 1 and sa != sb:
            return True
        strides.append(sa if na > 1 else sb)
    sizes = [max(x, y) for x, y in zip(a.shape, b.shape)]
    if any(s < 0 for s in strides) or not _nested(sizes, strides):
        return True
    diff_bytes = b.data_ptr() - a.data_ptr()
    if diff_bytes % a.element_size():
        return True
    dims = sorted(
        ((s, na, nb) for s, na, nb in zip(strides, a.shape, b.shape) if na > 1 or nb > 1),
        key=lambda p: -p[0],
    )
    return _offsets_meet(diff_bytes // a.element_size(), dims)
