"""The serving ops: rope and the paged KV-cache write in one launch.

``apply_rope_and_cache_`` (GQA/MHA: q rotated in place or into an FP8 ``q_out``; rope(k)
and v stored at each token's slot) and ``apply_mla_rope_and_cache_`` (DeepSeek MLA:
``q_pe`` rotated in place; ``[kv_c, rope(k_pe)]`` stored in one cache). Both check
everything first (:mod:`.cache_checks`), then launch the kernel's CACHE variant eagerly
through :func:`.launch._execute`, or, under ``torch.compile``, through the custom ops
defined here, which the compiler sees as mutating q (or ``q_out``) and the caches.
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from ..kernels.configs import LaunchConfig
from ..rope import RopeParams
from .cache_checks import CacheCall, _check_slots, check_cache_call, mla_views
from .checks import Offsets, _check_config, _check_cu, check_rope_args, mrope_spec
from .launch import CacheTarget, _execute
from .library import COMPILER_SEES_KERNEL, _define

Scale = Union[float, torch.Tensor, None]


def _scale_args(scale: Scale) -> Tuple[Optional[torch.Tensor], float]:
    """A scale as a custom op takes it: ``(tensor or None, float)``."""
    if isinstance(scale, torch.Tensor):
        return scale, 1.0
    return None, 1.0 if scale is None else float(scale)


def _scale_of(t: Optional[torch.Tensor], f: float) -> Union[float, torch.Tensor]:
    return f if t is None else t


# --------------------------------------------------------------------------------------
# Custom ops (what torch.compile traces). CUDA tensors: the compiler sees the kernel
# (triton_op); CPU tensors, and torch without triton_op: an opaque host op, whose body is
# the reference (or the interpreter).
# --------------------------------------------------------------------------------------
def _run(q, qo, k, v, k_cache, v_cache, slots, positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot,
         layout, precise, mrope, qq_t, qq_f, kq_t, kq_f, vq_t, vq_f, traced) -> None:
    cache = CacheTarget(v, k_cache, v_cache, slots, _scale_of(qq_t, qq_f), _scale_of(kq_t, kq_f),
                        _scale_of(vq_t, vq_f))
    _execute(q, qo, k, None, positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot, layout, False,
             precise, traced=traced, mrope=mrope, cache=cache)


@torch.library.custom_op("yarn_triton::rope_and_cache_host_", mutates_args=("q", "q_out", "k_cache", "v_cache"))
def _host_op(
    q: torch.Tensor, q_out: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slots: torch.Tensor, positions: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor, scale: float, pos_base: int, rotary_dim: int,
    layout: str, precise: bool, mrope: Optional[List[int]], qq_t: Optional[torch.Tensor], qq_f: float,
    kq_t: Optional[torch.Tensor], kq_f: float, vq_t: Optional[torch.Tensor], vq_f: float,
) -> None:
    """The cache write outside the compiler's view (CPU tensors, old torch)."""
    _run(q, q if q_out is None else q_out, k, v, k_cache, v_cache, slots, positions, offsets, cu_seqlens, inv_freq,
         scale, pos_base, rotary_dim, layout, precise, mrope, qq_t, qq_f, kq_t, kq_f, vq_t, vq_f, False)


def _rope_and_cache_impl(
    q: torch.Tensor, q_out: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slots: torch.Tensor, positions: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor, scale: float, pos_base: int, rotary_dim: int,
    layout: str, precise: bool, mrope: Optional[List[int]], qq_t: Optional[torch.Tensor], qq_f: float,
    kq_t: Optional[torch.Tensor], kq_f: float, vq_t: Optional[torch.Tensor], vq_f: float,
) -> None:
    if COMPILER_SEES_KERNEL and q.device.type == "cuda":
        _run(q, q if q_out is None else q_out, k, v, k_cache, v_cache, slots, positions, offsets, cu_seqlens,
             inv_freq, scale, pos_base, rotary_dim, layout, precise, mrope, qq_t, qq_f, kq_t, kq_f, vq_t, vq_f, True)
    else:
        torch.ops.yarn_triton.rope_and_cache_host_(q, q_out, k, v, k_cache, v_cache, slots, positions, offsets,
                                                   cu_seqlens, inv_freq, scale, pos_base, rotary_dim, layout,
                                                   precise, mrope, qq_t, qq_f, kq_t, kq_f, vq_t, vq_f)


@torch.library.custom_op("yarn_triton::mla_rope_and_cache_host_", mutates_args=("q_pe", "kv_cache"))
def _mla_host_op(
    q_pe: torch.Tensor, k_pe: torch.Tensor, kv_c: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
    positions: Optional[torch.Tensor], offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    inv_freq: torch.Tensor, scale: float, pos_base: int, rotary_dim: int, layout: str, precise: bool,
    mrope: Optional[List[int]], sc_t: Optional[torch.Tensor], sc_f: float,
) -> None:
    """The MLA cache write outside the compiler's view (CPU tensors, old torch)."""
    k, v, k_cache, v_cache = mla_views(q_pe, k_pe, kv_c, kv_cache)
    _run(q_pe, q_pe, k, v, k_cache, v_cache, slots, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
         rotary_dim, layout, precise, mrope, None, 1.0, sc_t, sc_f, sc_t, sc_f, False)


def _mla_impl(
    q_pe: torch.Tensor, k_pe: torch.Tensor, kv_c: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor,
    positions: Optional[torch.Tensor], offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    inv_freq: torch.Tensor, scale: float, pos_base: int, rotary_dim: int, layout: str, precise: bool,
    mrope: Optional[List[int]], sc_t: Optional[torch.Tensor], sc_f: float,
) -> None:
    if COMPILER_SEES_KERNEL and q_pe.device.type == "cuda":
        k, v, k_cache, v_cache = mla_views(q_pe, k_pe, kv_c, kv_cache)
        _run(q_pe, q_pe, k, v, k_cache, v_cache, slots, positions, offsets, cu_seqlens, inv_freq, scale, pos_base,
             rotary_dim, layout, precise, mrope, None, 1.0, sc_t, sc_f, sc_t, sc_f, True)
    else:
        torch.ops.yarn_triton.mla_rope_and_cache_host_(q_pe, k_pe, kv_c, kv_cache, slots, positions, offsets,
                                                       cu_seqlens, inv_freq, scale, pos_base, rotary_dim, layout,
                                                       precise, mrope, sc_t, sc_f)


_rope_and_cache_op = _define("yarn_triton::rope_and_cache_", ("q", "q_out", "k_cache", "v_cache"),
                             _rope_and_cache_impl)
_mla_op = _define("yarn_triton::mla_rope_and_cache_", ("q_pe", "kv_cache"), _mla_impl)


# --------------------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------------------
def _split_offsets(offsets: Offsets) -> Tuple[Optional[torch.Tensor], int]:
    if isinstance(offsets, torch.Tensor):
        return offsets, 0
    return None, int(offsets or 0)


def _mrope_list(params: RopeParams) -> Optional[List[int]]:
    spec = mrope_spec(params)
    return list(spec) if spec[0] else None


def _prepare(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, inplace, check_cu, config):
    rot = check_rope_args(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, inplace=inplace)
    if config is not None:
        _check_config(config)
    _check_cu(cu_seqlens, check_cu, q)
    return rot


def apply_rope_and_cache_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: Optional[torch.Tensor],
    params: RopeParams,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    layout: str = "neox",
    k_scale: Scale = None,
    v_scale: Scale = None,
    q_out: Optional[torch.Tensor] = None,
    q_scale: Scale = None,
    rotary_dim: Optional[int] = None,
    offsets: Offsets = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    precise_angles: bool = True,
    check_slots: Optional[bool] = None,
    check_cu_seqlens: Optional[bool] = None,
    config: Optional[LaunchConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rope of q and k and the paged KV-cache write of k and v, in one kernel launch.

    q is rotated in place (or into ``q_out``); for each token ``t`` whose slot
    ``s = slot_mapping[t]`` lies in the cache, ``k_cache[s // bs, s % bs] = rope(k[t])``
    and ``v_cache[s // bs, s % bs] = v[t]`` (``bs = k_cache.shape[1]``, vLLM's
    convention), each stored as the cache's dtype. k and v are only read; no other cache
    entry is written. Angles are computed on the fly, as by :func:`apply_rope_`.

    Args:
        q: ``[*T, Hq, D]`` float32/float16/bfloat16, any strides, CUDA (or CPU).
        k: ``[*T, Hk, D]``, q's token dims and dtype. v: ``[*T, Hk, Dv]``, the same.
        positions, params, layout, rotary_dim, offsets, cu_seqlens, precise_angles,
            check_cu_seqlens, config: as in :func:`apply_rope_` (every position form;
            M-RoPE params too). With a partial rotary the pass-through channels are stored
            as they are (and copied to ``q_out``).
        k_cache: ``[num_blocks, block_size, Hk, D]``, any strides: ``kv_cache.unbind(0)``
            of vLLM's cache, an HND cache ``[num_blocks, Hk, block_size, D]`` passed as
            ``.transpose(1, 2)``, or a per-sequence ``[B, L, Hk, D]`` cache (blocks of L).
            dtype: q's, or ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``.
        v_cache: ``[num_blocks, block_size, Hk, Dv]``, k_cache's dtype.
        slot_mapping: int32/int64, q's token dims or 1-D with one slot per token. Negative
            slots (-1: padding) and slots at or past ``num_blocks * block_size`` write
            nothing (the kernel skips them; nothing past the cache is ever written).
        k_scale, v_scale: with an FP8 cache (required there, refused otherwise): the
            stored value is ``x / scale`` in float32, saturated to the format's finite
            range (448 e4m3fn, 57344 e5m2), rounded to nearest even, as vLLM stores it.
            A Python float, or a one-element float32 tensor on q's device (read by the
            kernel: a CUDA graph replays new values).
        q_out: ``[*T, Hq, D]`` of q's dtype or FP8: the rotated q goes there (every
            channel) and q is left as it was. q_scale: q_out's FP8 scale, as k_scale.
        check_slots: read the slots (one device synchronisation) and raise ValueError on
            a slot below -1 or past the cache. Off by default;
            ``YARN_TRITON_CHECK_SLOTS=1`` turns it on for every call.

    Returns:
        ``(q or q_out, k_cache, v_cache)``, the same tensors, written.

    Bad input (shapes, dtypes, devices, missing or extra scales, tensors that overlap)
    raises TypeError/ValueError naming the argument before anything is written. A slot
    given to two tokens gets one of them. CUDA-graph safe without ``check_slots``.
    """
    inplace = q_out is None
    rot = _prepare(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, inplace, check_cu_seqlens,
                   config)
    call = check_cache_call(q, k, v, k_cache, v_cache, slot_mapping, q_out, k_scale, v_scale, q_scale)
    _check_slots(call.slots, check_slots, k_cache.shape[0] * k_cache.shape[1])
    off_t, pos_base = _split_offsets(offsets)
    inv_freq = params.inv_freq_on(q.device)
    if torch.compiler.is_compiling():
        torch.ops.yarn_triton.rope_and_cache_(
            q, q_out, k, v, k_cache, v_cache, call.slots, positions, off_t, cu_seqlens, inv_freq,
            params.cos_sin_scale, pos_base, rot, layout, precise_angles, _mrope_list(params),
            *_scale_args(call.q_quant), *_scale_args(call.k_quant), *_scale_args(call.v_quant))
    else:
        _execute(q, q if inplace else q_out, k, None, positions, off_t, cu_seqlens, inv_freq, params.cos_sin_scale,
                 pos_base, rot, layout, False, precise_angles, config, mrope=mrope_spec(params),
                 cache=_target(call, v, k_cache, v_cache))
    return (q if inplace else q_out), k_cache, v_cache


def _target(call: CacheCall, v, k_cache, v_cache) -> CacheTarget:
    return CacheTarget(v, k_cache, v_cache, call.slots, *(1.0 if s is None else s
                                                          for s in (call.q_quant, call.k_quant, call.v_quant)))


def apply_mla_rope_and_cache_(
    q_pe: torch.Tensor,
    k_pe: torch.Tensor,
    kv_c: torch.Tensor,
    positions: Optional[torch.Tensor],
    params: RopeParams,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    layout: str = "deepseek",
    scale: Scale = None,
    offsets: Offsets = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    precise_angles: bool = True,
    check_slots: Optional[bool] = None,
    check_cu_seqlens: Optional[bool] = None,
    config: Optional[LaunchConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek MLA's rope and cache write in one launch: ``q_pe`` rotated in place, and
    for each token with a slot in the cache ``kv_cache[s // bs, s % bs] = [kv_c[t],
    rope(k_pe[t])]`` (vLLM's MLA cache), in the cache's dtype.

    Args:
        q_pe: ``[*T, H, R]``, the rope slice of q (e.g. ``q[..., 128:]`` of ``[*T, H, 192]``:
            a strided view, rotated where it lies). R = ``params.rope_dim``.
        k_pe: ``[*T, R]`` or ``[*T, 1, R]``, q_pe's dtype; only read.
        kv_c: ``[*T, L]`` or ``[*T, 1, L]`` (the compressed latent, e.g. L = 512); only read.
        kv_cache: ``[num_blocks, block_size, L + R]``, q_pe's dtype or FP8, any strides.
        scale: with an FP8 cache (required there, refused otherwise): both parts stored as
            ``x / scale`` saturated, as in :func:`apply_rope_and_cache_`.
        layout: ``"deepseek"`` (default: pairs in, halves out, as DeepSeek's
            checkpoints need), ``"neox"`` or ``"interleaved"``.
        positions, params, offsets, cu_seqlens, precise_angles, check_slots,
            check_cu_seqlens, config: as in :func:`apply_rope_and_cache_`.

    Returns:
        ``(q_pe, kv_cache)``, the same tensors, written.
    """
    k, v, k_cache, v_cache = mla_views(q_pe, k_pe, kv_c, kv_cache)
    rot = _prepare(q_pe, k, positions, params, layout, None, offsets, cu_seqlens, True, check_cu_seqlens, config)
    names = {"k": "k_pe", "v": "kv_c", "k_cache": "kv_cache[..., L:]", "v_cache": "kv_cache[..., :L]",
             "k_scale": "scale", "v_scale": "scale"}
    # (the two halves of kv_cache are disjoint views: only the rest is checked for overlap)
    call = check_cache_call(q_pe, k, v, k_cache, v_cache, slot_mapping, None, scale, scale, None, names=names)
    _check_slots(call.slots, check_slots, kv_cache.shape[0] * kv_cache.shape[1])
    off_t, pos_base = _split_offsets(offsets)
    inv_freq = params.inv_freq_on(q_pe.device)
    if torch.compiler.is_compiling():
        torch.ops.yarn_triton.mla_rope_and_cache_(
            q_pe, k_pe, kv_c, kv_cache, call.slots, positions, off_t, cu_seqlens, inv_freq, params.cos_sin_scale,
            pos_base, rot, layout, precise_angles, _mrope_list(params), *_scale_args(call.k_quant))
    else:
        _execute(q_pe, q_pe, k, None, positions, off_t, cu_seqlens, inv_freq, params.cos_sin_scale, pos_base, rot,
                 layout, False, precise_angles, config, mrope=mrope_spec(params),
                 cache=_target(call, v, k_cache, v_cache))
    return q_pe, kv_cache
