"""The serving path: under transformers' continuous batching (``generate_batch``, the
``ContinuousBatchingManager``), the rope of a switched attention layer and the write of its
new keys and values into the paged KV cache run as one
:func:`yarn_triton.apply_rope_and_cache_` call, and transformers' own write is skipped.

How (one attention call at a time; of transformers' code only the read-back of its
full-attention update, two ``index_select`` calls, is repeated here):

1. a forward pre-hook on each attention module of a vetted model type
   (:data:`PAGED_MODEL_TYPES`) sees the call's ``cache`` keyword: a
   ``PagedAttentionCache`` on its index path (``block_table`` None), and a full-attention
   layer whose update is transformers' own (:func:`_writer`), arms the deferral and shadows,
   for this call only, the ``update`` method that writes the layer's cache: the layer's
   ``FullAttentionCacheAllocator`` (transformers 5.25, called by the attention code) or
   the ``PagedAttentionCache`` itself (5.17, called by the ``paged|*`` attention
   interface). Both take ``(key_states, value_states, layer_idx, read_index,
   write_index)`` and write with ``index_copy_(0, write_index, ...)`` into a flat
   ``[slots, kv_heads, head_dim]`` tensor per layer for keys and one for values. 5.17's
   are two tensors: seen as ``[slots, 1, kv_heads, head_dim]`` they are the fused op's
   caches (blocks of one slot) and ``write_index`` its ``slot_mapping``. 5.25's are views
   of one buffer whose blocks hold each layer's key page then its value page: the op gets
   ``[blocks, page_size, kv_heads, head_dim]`` views of the layer's pages
   (:func:`_page_views`) and the write index mapped onto them (:func:`_page_slots`, once
   per forward);
2. the rope dispatcher of that call hands its q and k to :func:`_defer` instead of rotating
   them (plain rope only: no deferred q/k norm, query scale, inverse rotation, M-RoPE, or
   autograd), and the attention code goes on with them unrotated;
3. the shadowing ``update`` gets that same k (checked: same memory) with v: one
   :func:`yarn_triton.apply_rope_and_cache_` rotates q in place and writes rope(k) and v
   into the cache; then it reads the keys and values back as transformers' update does
   (``index_select`` by ``read_index``; with no cache read, the new keys from their slots);
4. the forward post-hook puts the ``update`` method back and raises if a deferred rope was
   not taken up (attention code other than expected): never a silent unrotated q or k.

Everything else -- sliding-window layers, MLA caches, the flash decode fast path
(``block_table``), torch.compile'd forwards, other caches, cache layouts other than these
two -- keeps the switch's plain path: rope in place, then transformers' write.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from typing import Optional

import torch
from torch import nn

from ... import op as _op
from .handle import FusedRopePositions, _unit_strides_like


#: Model types whose attention code hands the rope function's q and k straight on to the
#: paged cache write (nothing touches q or k in between), checked against the installed
#: transformers by ``tests/test_paged_serving.py``. Types whose rope call also takes a
#: q/k norm or a query scale (Qwen3, Ministral-3) would not defer anyway; MLA types write
#: latents, not rope(k).
PAGED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "phi3", "gpt_oss", "minimax_m2"})

_UPDATE_ARGS = ("key_states", "value_states", "layer_idx", "read_index", "write_index")

# Per thread: ``writer``, the :class:`_Writer` of the attention call now running (set by its
# pre-hook); ``slots``, the last write index mapped by :func:`_page_slots`.
_PAGED = threading.local()
# attention module -> its hook handles
_HOOKS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


class _Writer:
    """The cache write of one layer in one attention call.

    ``target``: the object whose ``update`` writes the layer's cache; ``k_flat``/``v_flat``:
    the flat ``[slots, H, D]`` tensors that update indexes with ``write_index`` and
    ``read_index``; ``k_cache``/``v_cache``: the same slots as the fused op's
    ``[blocks, block_size, H, D]`` caches; ``page``: None when ``write_index`` is their
    slot mapping as it is, else ``(rows, page_size)`` (:func:`_page_views`); ``group``:
    None when ``update`` gets the layer's ``[T, H, D]`` states and index tensors (the
    allocators'), else the layer group whose entry of per-group index lists it takes, with
    ``[1, H, T, D]`` states (transformers 5.17's ``PagedAttentionCache.update``);
    ``pending``: the rope deferred to this write, ``(q, k, handle, layout)``."""

    __slots__ = ("target", "layer_idx", "k_flat", "v_flat", "k_cache", "v_cache", "page", "group", "original",
                 "pending")

    def __init__(self, target, layer_idx, k_flat, v_flat, k_cache, v_cache, page, group) -> None:
        self.target, self.layer_idx, self.page, self.group = target, layer_idx, page, group
        self.k_flat, self.v_flat, self.k_cache, self.v_cache = k_flat, v_flat, k_cache, v_cache
        self.original = target.update
        self.pending = None

    def update(self, key_states, value_states, layer_idx, read_index, write_index):
        pending, self.pending = self.pending, None
        if pending is None or layer_idx != self.layer_idx:
            self.pending = pending
            return self.original(key_states=key_states, value_states=value_states, layer_idx=layer_idx,
                                 read_index=read_index, write_index=write_index)
        if self.group is not None:  # 5.17: [1, H, T, D] states, one index tensor per layer group
            key_states, value_states = (x.transpose(1, 2).squeeze(0) for x in (key_states, value_states))
            read_index, write_index = read_index[self.group], write_index[self.group]
        q, k, handle, layout = pending
        if not (key_states.data_ptr() == k.data_ptr() and key_states.shape == k.shape[1:]
                and key_states.stride() == k.stride()[1:]):
            raise RuntimeError(
                "the paged cache write got other keys than the rope call of the same attention call; the "
                "attention code differs from what enable_fused_rope expects: switch the model back "
                "(disable_fused_rope)"
            )
        v = value_states.unsqueeze(0)
        slots = write_index if self.page is None else _page_slots(handle, write_index, *self.page)
        positions = handle.positions if handle.positions.device == q.device else handle.positions.to(q.device)
        _op.apply_rope_and_cache_(q, _unit_strides_like(k, q), _unit_strides_like(v, q), positions, handle.params,
                                  self.k_cache, self.v_cache, slots, layout=layout)
        # transformers' read-back: each sequence's whole cache by read_index. With no cache
        # read transformers hands on the new keys and values as they came; here the keys
        # come, rotated, from their slots.
        if read_index.numel() == 0:
            return self.k_flat.index_select(0, write_index), value_states
        return self.k_flat.index_select(0, read_index), self.v_flat.index_select(0, read_index)


def _page_views(k_flat: torch.Tensor, v_flat: torch.Tensor, rows: int, page: int):
    """The fused op's caches over transformers 5.25's full-attention layout, or None when
    the tensors are not laid out so.

    There each block of the cache holds, for every layer of the group, a page of ``page``
    keys then a page of ``page`` values: ``rows`` slots in all. A layer's ``k_flat`` /
    ``v_flat`` start at its key / value page of block 0, so flat slot ``s`` lies in block
    ``s // rows`` at ``s % rows`` (``< page``). As flat tensors the keys and values
    interleave; as ``[blocks, page, H, D]`` views with blocks ``rows`` slots apart (the last
    block's pages included, past the flat views' ends) they are disjoint."""
    if k_flat.shape[1:] != v_flat.shape[1:] or page < 1 or rows < 2 * page:
        return None
    h, d = k_flat.shape[1:]
    unit = (h * d, d, 1)
    if (k_flat.stride() != unit or v_flat.stride() != unit
            or v_flat.storage_offset() - k_flat.storage_offset() != page * h * d):
        return None
    blocks = -(-k_flat.shape[0] // rows)
    size = k_flat.untyped_storage().nbytes() // k_flat.element_size()
    if blocks < 1 or v_flat.storage_offset() + ((blocks - 1) * rows + page) * h * d > size:
        return None
    shape, strides = (blocks, page, h, d), (rows * h * d, h * d, d, 1)
    return k_flat.as_strided(shape, strides), v_flat.as_strided(shape, strides)


def _page_slots(handle: FusedRopePositions, write_index: torch.Tensor, rows: int, page: int) -> torch.Tensor:
    """``write_index`` (flat slots, ``rows`` to a block) as slots of the ``page``-slot blocks
    of :func:`_page_views`: ``s - (s // rows) * (rows - page)``. Mapped once per forward:
    all layers of a forward get the same rope handle and the same write index tensor."""
    memo = getattr(_PAGED, "slots", None)
    if memo is not None and memo[0] is handle and memo[1] is write_index and memo[2] == (rows, page):
        return memo[3]
    slots = write_index - torch.div(write_index, rows, rounding_mode="floor") * (rows - page)
    _PAGED.slots = (handle, write_index, (rows, page), slots)
    return slots


_SIGNATURES: dict = {}


def _takes_update_args(cls) -> bool:
    """``cls.update(self, key_states, value_states, layer_idx, read_index, write_index)``."""
    fn = getattr(cls, "update", None)
    ok = _SIGNATURES.get(fn)
    if ok is None:
        try:
            ok = tuple(inspect.signature(fn).parameters)[1:6] == _UPDATE_ARGS
        except (TypeError, ValueError):
            ok = False
        _SIGNATURES[fn] = ok
    return ok


def _writer(cache, layer_idx) -> Optional[_Writer]:
    """The :class:`_Writer` of layer ``layer_idx`` of ``cache``, or None where the fused write
    does not apply: not a ``PagedAttentionCache`` with transformers' own ``update``, not a
    full-attention layer with transformers' own update, a layout other than 5.17's or 5.25's,
    or ``update`` already shadowed."""
    try:
        from transformers.generation.continuous_batching import PagedAttentionCache
    except ImportError:  # pragma: no cover - transformers without continuous batching
        return None
    if (not isinstance(cache, PagedAttentionCache) or type(cache).update is not PagedAttentionCache.update
            or not isinstance(layer_idx, int)):
        return None
    allocators = getattr(cache, "layer_to_allocator", None)
    if allocators is not None:  # transformers 5.25: one cache allocator per attention type
        try:
            from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator
        except ImportError:  # pragma: no cover
            return None
        target = allocators.get(layer_idx)
        views = getattr(target, "_kv_token_views", {}).get(layer_idx)
        if type(target).update is not FullAttentionCacheAllocator.update or views is None:
            return None  # sliding window (reads before it writes), MLA latents, ...
        k_flat, v_flat = views
        page = (getattr(target, "block_physical_stride", 0), getattr(target, "tokens_per_page", 0))
        group = None
    else:  # transformers 5.17: per-layer-group caches, update(..., read_index=[...], write_index=[...])
        groups = getattr(cache, "layer_index_to_group_indices", {})
        if layer_idx not in groups or getattr(cache, "sliding_windows", {}).get(layer_idx) != 1:
            return None
        group, j = groups[layer_idx]
        k_flat, v_flat = cache.key_cache[j], cache.value_cache[j]
        target, page = cache, None
    if "update" in vars(target) or not _takes_update_args(type(target)):
        return None
    if not (isinstance(k_flat, torch.Tensor) and isinstance(v_flat, torch.Tensor)
            and k_flat.dim() == 3 and v_flat.dim() == 3):
        return None
    caches = (k_flat.unsqueeze(1), v_flat.unsqueeze(1)) if page is None else _page_views(k_flat, v_flat, *page)
    if caches is None:
        return None
    return _Writer(target, layer_idx, k_flat, v_flat, *caches, page, group)


def _defer(q: torch.Tensor, k: Optional[torch.Tensor], handle: FusedRopePositions, layout: str, head_axis: int,
           inverse: bool, norm) -> bool:
    """Called by the rope dispatcher: inside an armed attention call (paged cache write
    ahead), record the rotation of ``q`` and ``k`` for the cache write and return True (the
    dispatcher then returns them unrotated); else False (rotate now)."""
    writer = getattr(_PAGED, "writer", None)
    if (writer is None or writer.pending is not None or k is None or inverse or norm is not None
            or handle.q_scale is not None or handle.params.mrope_section is not None
            or torch.compiler.is_compiling()):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return False
    qv, kv = q.movedim(head_axis, -2), k.movedim(head_axis, -2)
    if (qv.dim() != 4 or qv.shape[0] != 1 or kv.shape[:-2] != qv.shape[:-2]  # continuous batching packs [1, T]
            or kv.shape[-2:] != writer.k_flat.shape[-2:] or q.dtype != writer.k_flat.dtype
            or q.device != writer.k_flat.device):
        return False
    writer.pending = (qv, kv, handle, layout)
    return True


def _pre_hook(attn: nn.Module, args, kwargs) -> None:
    _disarm()
    if kwargs.get("block_table") is not None or torch.compiler.is_compiling():
        return  # the flash decode fast path writes the cache inside its kernel
    if not any(isinstance(v, FusedRopePositions) for v in (*args, *kwargs.values())):
        return
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    writer = _writer(cache, getattr(attn, "layer_idx", None))
    if writer is None:
        return
    writer.target.update = functools.partial(_Writer.update, writer)  # this call only
    _PAGED.writer = writer


def _disarm() -> Optional[_Writer]:
    writer = getattr(_PAGED, "writer", None)
    _PAGED.writer = None
    if writer is not None:
        shadow = vars(writer.target).get("update")
        if isinstance(shadow, functools.partial) and shadow.args == (writer,):
            del writer.target.update
    return writer


def _post_hook(attn: nn.Module, args, output) -> None:
    # always_call=True: also puts ``update`` back when the forward raised.
    writer = _disarm()
    if writer is not None and writer.pending is not None:
        writer.pending = None
        raise RuntimeError(
            f"{type(attn).__name__}: a rope deferred to the paged cache write was not taken up by it; this "
            "attention's q and k were not rotated. The attention code differs from what enable_fused_rope "
            "expects: switch the model back (disable_fused_rope)"
        )


def _install_paged_hooks(model: nn.Module, model_type: Optional[str], function_names) -> None:
    """Hooks the attention modules of ``model`` (a vetted type) that call one of the rope
    functions ``function_names`` by name and have an integer ``layer_idx``."""
    if model_type not in PAGED_MODEL_TYPES:
        return
    names = set(function_names)
    for m in model.modules():
        code = getattr(inspect.unwrap(type(m).forward), "__code__", None)
        if (m in _HOOKS or not isinstance(getattr(m, "layer_idx", None), int) or code is None
                or not names & set(code.co_names)):
            continue
        _HOOKS[m] = [m.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                     m.register_forward_hook(_post_hook, always_call=True)]


def _remove_paged_hooks(model: nn.Module) -> None:
    for m in model.modules():
        for h in _HOOKS.pop(m, ()):
            h.remove()
