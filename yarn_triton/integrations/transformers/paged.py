"""The serving path: under transformers' continuous batching (``generate_batch``, the
``ContinuousBatchingManager``), the rope of a switched attention layer and the write of its
new keys and values into the paged KV cache run as one
:func:`yarn_triton.apply_rope_and_cache_` call, and transformers' own write is skipped.

How (one attention call at a time; nothing of transformers is copied beyond the three-line
read-back of its full-attention update):

1. a forward pre-hook on each attention module of a vetted model type
   (:data:`PAGED_MODEL_TYPES`) sees the call's ``cache`` keyword: a
   ``PagedAttentionCache`` on its index path (``block_table`` None), and a full-attention
   layer whose update is transformers' own (:func:`_writer`), arms the deferral and shadows,
   for this call only, the ``update`` method that writes the layer's cache: the layer's
   ``FullAttentionCacheAllocator`` (transformers >= 5.2x, called by the attention code) or
   the ``PagedAttentionCache`` itself (5.17, called by the ``paged|*`` attention
   interface). Both take ``(key_states, value_states, layer_idx, read_index,
   write_index)`` and write with ``index_copy_(0, write_index, ...)`` into one flat
   ``[slots, kv_heads, head_dim]`` tensor per layer: seen as ``[slots, 1, kv_heads,
   head_dim]`` it is the fused op's paged cache with blocks of one token, and
   ``write_index`` its ``slot_mapping``;
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
(``block_table``), torch.compile'd forwards, other caches -- keeps the switch's plain
path: rope in place, then transformers' write.
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
# pre-hook), and ``pending``, the rope deferred in that call.
_PAGED = threading.local()
# attention module -> its hook handles
_HOOKS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


class _Writer:
    """The cache write of one layer in one attention call: ``target`` (the object whose
    ``update`` writes it), the layer's flat caches, and whether ``update`` takes per-group
    lists of indices and ``[1, H, T, D]`` states (transformers 5.17's
    ``PagedAttentionCache.update``) or the layer's own ``[T, H, D]`` (the allocators')."""

    __slots__ = ("target", "layer_idx", "k_cache", "v_cache", "group", "original", "pending")

    def __init__(self, target, layer_idx: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 group: Optional[int]) -> None:
        self.target, self.layer_idx, self.group = target, layer_idx, group
        self.k_cache, self.v_cache = k_cache, v_cache
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
        q, k, positions, params, layout = pending
        if not (key_states.data_ptr() == k.data_ptr() and key_states.shape == k.shape[1:]
                and key_states.stride() == k.stride()[1:]):
            raise RuntimeError(
                "the paged cache write got other keys than the rope call of the same attention call; the "
                "attention code differs from what enable_fused_rope expects: switch the model back "
                "(disable_fused_rope)"
            )
        v = value_states.unsqueeze(0)
        k_cache, v_cache = self.k_cache.unsqueeze(1), self.v_cache.unsqueeze(1)  # blocks of one slot
        _op.apply_rope_and_cache_(q, _unit_strides_like(k, q), _unit_strides_like(v, q), positions, params,
                                  k_cache, v_cache, write_index, layout=layout)
        if read_index.numel() == 0:  # no cache read: the new tokens' keys, rotated, from their slots
            return self.k_cache.index_select(0, write_index), value_states
        return self.k_cache.index_select(0, read_index), self.v_cache.index_select(0, read_index)


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
    full-attention layer with transformers' own update, or ``update`` already shadowed."""
    try:
        from transformers.generation.continuous_batching import PagedAttentionCache
    except ImportError:  # pragma: no cover - transformers without continuous batching
        return None
    if (not isinstance(cache, PagedAttentionCache) or type(cache).update is not PagedAttentionCache.update
            or not isinstance(layer_idx, int)):
        return None
    allocators = getattr(cache, "layer_to_allocator", None)
    if allocators is not None:  # transformers >= 5.2x: one cache allocator per attention type
        try:
            from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator
        except ImportError:  # pragma: no cover
            return None
        target = allocators.get(layer_idx)
        views = getattr(target, "_kv_token_views", {}).get(layer_idx)
        if type(target).update is not FullAttentionCacheAllocator.update or views is None:
            return None  # sliding window (reads before it writes), MLA latents, ...
        k_cache, v_cache = views
        group = None
    else:  # transformers 5.17: per-layer-group caches, update(..., read_index=[...], write_index=[...])
        groups = getattr(cache, "layer_index_to_group_indices", {})
        if layer_idx not in groups or getattr(cache, "sliding_windows", {}).get(layer_idx) != 1:
            return None
        group, j = groups[layer_idx]
        k_cache, v_cache = cache.key_cache[j], cache.value_cache[j]
        target = cache
    if "update" in vars(target) or not _takes_update_args(type(target)):
        return None
    if k_cache.dim() != 3 or v_cache.dim() != 3:
        return None
    return _Writer(target, layer_idx, k_cache, v_cache, group)


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
            or kv.shape[-2:] != writer.k_cache.shape[-2:] or q.dtype != writer.k_cache.dtype
            or q.device != writer.k_cache.device):
        return False
    positions = handle.positions
    if positions.device != q.device:
        positions = positions.to(q.device)
    writer.pending = (qv, kv, positions, handle.params, layout)
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
