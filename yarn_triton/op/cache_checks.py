"""Argument checks of the serving ops (rope + KV-cache write), raised before any launch.

What :mod:`.checks` does for q, k and the positions, this module adds for v, the caches,
the slots, the FP8 scales and ``q_out``: a TypeError/ValueError naming the argument, and
nothing written. The MLA op checks its own shapes first (under its own argument names)
and then comes here with its views, named by ``names``.
"""

from __future__ import annotations

import math
import os
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch

from ..reference_cache import FP8_DTYPES
from .checks import _check_index_tensor
from .overlap import may_overlap, self_overlapping

Scale = Union[float, torch.Tensor, None]

# YARN_TRITON_CHECK_SLOTS=1 makes check_slots=True the default.
CHECK_SLOTS = os.environ.get("YARN_TRITON_CHECK_SLOTS", "0") not in ("", "0")

_NAMES = {"q": "q", "k": "k", "v": "v", "k_cache": "k_cache", "v_cache": "v_cache", "k_scale": "k_scale",
          "v_scale": "v_scale"}


class CacheCall(NamedTuple):
    """A checked cache write: the slots viewed with q's token dims, and the FP8 scales
    (None where the output is not FP8)."""

    slots: torch.Tensor
    q_quant: Scale
    k_quant: Scale
    v_quant: Scale


def _check_scale(name: str, scale: Scale, fp8: bool, what: str, device: torch.device) -> Scale:
    if not fp8:
        if scale is not None:
            raise ValueError(f"{name} applies to an FP8 {what} only; this {what} is not FP8, so pass {name}=None")
        return None
    if scale is None:
        raise ValueError(f"{name} is required: the {what} is FP8 (stored as x / {name})")
    if isinstance(scale, torch.Tensor):
        if scale.dtype != torch.float32 or scale.numel() != 1:
            raise TypeError(f"{name} must be a one-element float32 tensor or a float, got {scale.dtype} "
                            f"of shape {tuple(scale.shape)}")
        if scale.device != device:
            raise ValueError(f"{name} is on {scale.device} but q is on {device}; they must share a device")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
        raise ValueError(f"{name} must be a finite number > 0 or a one-element float32 tensor, got {scale!r}")
    return float(scale)


def _check_cache(name: str, cache, src: torch.Tensor, src_name: str, q: torch.Tensor) -> None:
    if not isinstance(cache, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cache).__name__}")
    if cache.dim() != 4:
        raise ValueError(f"{name} must be [num_blocks, block_size, heads, head_dim], got shape {tuple(cache.shape)}")
    if cache.device != q.device:
        raise ValueError(f"{name} is on {cache.device} but q is on {q.device}; they must share a device")
    if tuple(cache.shape[2:]) != tuple(src.shape[-2:]):
        raise ValueError(f"{name}'s (heads, head_dim) {tuple(cache.shape[2:])} must equal {src_name}'s "
                         f"{tuple(src.shape[-2:])}")
    if cache.dtype != q.dtype and cache.dtype not in FP8_DTYPES:
        raise TypeError(f"{name} must have q's dtype {q.dtype} or be float8_e4m3fn/float8_e5m2, got {cache.dtype}")
    if not torch.compiler.is_compiling() and self_overlapping(cache):
        raise ValueError(f"{name} has overlapping elements (e.g. an expand()ed view); it cannot be written")


def _check_disjoint(written: Dict[str, torch.Tensor], read: Dict[str, torch.Tensor]) -> None:
    """Each written tensor must share no element with any other tensor of the call."""
    if torch.compiler.is_compiling():  # functionalization owns aliasing there
        return
    names = list(written)
    for i, a in enumerate(names):
        for b, t in [(n, written[n]) for n in names[i + 1:]] + list(read.items()):
            if may_overlap(written[a], t):
                raise ValueError(f"{a} overlaps {b} in memory; the cache write needs them disjoint")


def check_cache_call(q: torch.Tensor, k: torch.Tensor, v, k_cache, v_cache, slot_mapping, q_out, k_scale: Scale,
                     v_scale: Scale, q_scale: Scale, names: Optional[Dict[str, str]] = None) -> CacheCall:
    """Check what the cache write adds to a rope call whose q, k and positions
    :func:`.checks.check_rope_args` already passed; returns the :class:`CacheCall`."""
    n = _NAMES if names is None else {**_NAMES, **names}
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{n['v']} must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype != k.dtype or q.dtype != k.dtype:
        raise TypeError(f"q, {n['k']} and {n['v']} must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if v.dim() != k.dim() or v.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"{n['v']} must be [*tokens, heads, head_dim] with the token dims {tuple(k.shape[:-2])} "
                         f"of q and {n['k']}, got shape {tuple(v.shape)}")
    if v.device != q.device:
        raise ValueError(f"{n['v']} is on {v.device} but q is on {q.device}; they must share a device")
    _check_cache(n["k_cache"], k_cache, k, n["k"], q)
    _check_cache(n["v_cache"], v_cache, v, n["v"], q)
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"{n['k_cache']} and {n['v_cache']} must share a dtype, got {k_cache.dtype} and "
                        f"{v_cache.dtype}")
    if tuple(k_cache.shape[:2]) != tuple(v_cache.shape[:2]):
        raise ValueError(f"{n['k_cache']} and {n['v_cache']} must have the same (num_blocks, block_size), got "
                         f"{tuple(k_cache.shape[:2])} and {tuple(v_cache.shape[:2])}")

    tokens = tuple(q.shape[:-2])
    _check_index_tensor("slot_mapping", slot_mapping, q.device)
    if tuple(slot_mapping.shape) == tokens:
        slots = slot_mapping
    elif slot_mapping.dim() == 1 and slot_mapping.numel() == math.prod(tokens):
        slots = slot_mapping.view(tokens)
    else:
        raise ValueError(f"slot_mapping must have q's token dims {tokens} or be 1-D with {math.prod(tokens)} "
                         f"entries (one slot per token), got shape {tuple(slot_mapping.shape)}")

    fp8 = k_cache.dtype in FP8_DTYPES
    k_quant = _check_scale(n["k_scale"], k_scale, fp8, "cache", q.device)
    v_quant = _check_scale(n["v_scale"], v_scale, fp8, "cache", q.device)
    written = {n["k_cache"]: k_cache, n["v_cache"]: v_cache}
    read = {"q": q, n["k"]: k, n["v"]: v}
    if q_out is None:
        if q_scale is not None:
            raise ValueError("q_scale is the FP8 scale of q_out; without q_out, pass q_scale=None")
        q_quant = None
        written["q"] = read.pop("q")
    else:
        if not isinstance(q_out, torch.Tensor):
            raise TypeError(f"q_out must be a torch.Tensor, got {type(q_out).__name__}")
        if q_out.shape != q.shape:
            raise ValueError(f"q_out must have q's shape {tuple(q.shape)}, got {tuple(q_out.shape)}")
        if q_out.device != q.device:
            raise ValueError(f"q_out is on {q_out.device} but q is on {q.device}; they must share a device")
        if q_out.dtype != q.dtype and q_out.dtype not in FP8_DTYPES:
            raise TypeError(f"q_out must have q's dtype {q.dtype} or be float8_e4m3fn/float8_e5m2, got {q_out.dtype}")
        if not torch.compiler.is_compiling() and self_overlapping(q_out):
            raise ValueError("q_out has overlapping elements (e.g. an expand()ed view); it cannot be written")
        q_quant = _check_scale("q_scale", q_scale, q_out.dtype in FP8_DTYPES, "q_out", q.device)
        written = {"q_out": q_out, **written}
    _check_disjoint(written, read)
    return CacheCall(slots, q_quant, k_quant, v_quant)


def check_slot_values(slots: torch.Tensor, n_slots: int) -> None:
    """Raise ValueError unless every slot is -1 (padding) or in ``[0, n_slots)``. Reads the
    slots: one device synchronisation."""
    s = slots.detach().reshape(-1).to("cpu", torch.int64)
    bad = (s < -1) | (s >= n_slots)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        raise ValueError(f"slot_mapping[{i}] = {int(s[i])} is outside the cache: slots must be -1 (padding) or in "
                         f"[0, {n_slots}) (num_blocks x block_size)")


def _check_slots(slots: torch.Tensor, check: Optional[bool], n_slots: int) -> None:
    if (CHECK_SLOTS if check is None else check) and not torch.compiler.is_compiling():
        check_slot_values(slots, n_slots)


def mla_whole_q(q_pe: torch.Tensor, q_nope: torch.Tensor, q_out) -> torch.Tensor:
    """The whole q ``[*T, H, Nq + R]`` of which ``q_nope`` (``[*T, H, Nq]``) and ``q_pe`` are the
    two parts, as one view (``q_nope``'s channels, then ``q_pe``'s), for a call that
    writes both to ``q_out``; ValueError unless ``q_nope`` lies right before ``q_pe`` in
    each head (``q[..., :Nq]`` and ``q[..., Nq:]`` of one q) and ``q_out`` is given."""
    if not isinstance(q_nope, torch.Tensor):
        raise TypeError(f"q_nope must be a torch.Tensor, got {type(q_nope).__name__}")
    if q_out is None:
        raise ValueError("q_nope is written to q_out (with the rotated q_pe after it): give q_out too")
    if q_nope.dtype != q_pe.dtype or q_nope.device != q_pe.device:
        raise ValueError(f"q_nope must have q_pe's dtype and device ({q_pe.dtype}, {q_pe.device}), "
                         f"got {q_nope.dtype}, {q_nope.device}")
    if q_nope.shape[:-1] != q_pe.shape[:-1] or q_nope.stride() != q_pe.stride():
        raise ValueError(f"q_nope {tuple(q_nope.shape)} must be q[..., :Nq] of the q whose q[..., Nq:] is q_pe "
                         f"{tuple(q_pe.shape)} (same leading dims and strides)")
    n = q_nope.shape[-1]
    if q_nope.untyped_storage().data_ptr() != q_pe.untyped_storage().data_ptr() or \
            q_pe.storage_offset() != q_nope.storage_offset() + n * q_nope.stride(-1):
        raise ValueError("q_nope must lie right before q_pe in each head (q_nope = q[..., :Nq], q_pe = q[..., Nq:] of "
                         "one q): the kernel reads both as one head")
    return q_nope.as_strided((*q_pe.shape[:-1], n + q_pe.shape[-1]), q_pe.stride(), q_nope.storage_offset())


def mla_views(q_pe, k_pe, kv_c, kv_cache) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k, v, k_cache, v_cache)`` of an MLA call: ``k_pe`` and ``kv_c`` as one-head
    ``[*T, 1, R]`` / ``[*T, 1, L]`` tensors and the two parts of ``kv_cache`` ``[num_blocks,
    block_size, L + R]`` as one-head caches (views, nothing copied); ValueError/TypeError
    naming the MLA argument for shapes that do not fit."""
    for name, t in (("q_pe", q_pe), ("k_pe", k_pe), ("kv_c", kv_c), ("kv_cache", kv_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q_pe.dim() < 3:
        raise ValueError(f"q_pe must be [*tokens, heads, rope_dim], got shape {tuple(q_pe.shape)}")
    tokens = tuple(q_pe.shape[:-2])

    def one_head(name, t):
        if tuple(t.shape[:-1]) == tokens:
            return t.unsqueeze(-2)
        if t.dim() == len(tokens) + 2 and tuple(t.shape[:-2]) == tokens and t.shape[-2] == 1:
            return t
        raise ValueError(f"{name} must be [*tokens, dim] or [*tokens, 1, dim] with q_pe's token dims {tokens}, "
                         f"got shape {tuple(t.shape)}")

    k, v = one_head("k_pe", k_pe), one_head("kv_c", kv_c)
    if k.shape[-1] != q_pe.shape[-1]:
        raise ValueError(f"k_pe's rope dim {k.shape[-1]} must equal q_pe's {q_pe.shape[-1]}")
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != v.shape[-1] + k.shape[-1]:
        raise ValueError(f"kv_cache must be [num_blocks, block_size, {v.shape[-1]} + {k.shape[-1]}] (kv_c then k_pe), "
                         f"got shape {tuple(kv_cache.shape)}")
    lora = v.shape[-1]
    return k, v, kv_cache[..., lora:].unsqueeze(2), kv_cache[..., :lora].unsqueeze(2)


__all__ = ["CacheCall", "check_cache_call", "check_slot_values", "mla_views", "mla_whole_q", "CHECK_SLOTS"]
