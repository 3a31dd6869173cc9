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
from . import cache_plans as _cache_plans
from .cache_checks import CacheCall, _check_slots, check_cache_call, mla_views, mla_whole_q
from .checks import Offsets, _check_config, _check_cu, check_cp, check_rope_args, mrope_list, mrope_spec, split_offsets
from .launch import CacheTarget, _execute
from .library import COMPILER_SEES_KERNEL, _cp_args, _cp_of, _define

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
         layout, precise, mrope, qq_t, qq_f, kq_t, kq_f, vq_t, vq_f, traced, rotary_at="start", cp_size=1,
         cp_rank=0) -> None:
    cache = CacheTarget(v, k_cache, v_cache, slots, _scale_of(qq_t, qq_f), _scale_of(kq_t, kq_f),
                        _scale_of(vq_t, vq_f))
    _execute(q, qo, k, None, positions, offsets, cu_seqlens, inv_freq, scale, pos_base, rot, layout, False,
             precise, traced=traced, mrope=mrope, cache=cache, rotary_at=rotary_at, cp=_cp_of(cp_size, cp_rank))


@torch.library.custom_op("yarn_triton::rope_and_cache_host_", mutates_args=("q", "q_out", "k_cache", "v_cache"))
def _host_op(
    q: torch.Tensor, q_out: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slots: torch.Tensor, positions: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor, scale: float, pos_base: int, rotary_dim: int,
    layout: str, precise: bool, mrope: Optional[List[int]], qq_t: Optional[torch.Tensor], qq_f: float,
    kq_t: Optional[torch.Tensor], kq_f: float, vq_t: Optional[torch.Tensor], vq_f: float, cp_size: int = 1,
    cp_rank: int = 0,
) -> None:
    """The cache write outside the compiler's view (CPU tensors, old torch)."""
    _run(q, q if q_out is None else q_out, k, v, k_cache, v_cache, slots, positions, offsets, cu_seqlens, inv_freq,
         scale, pos_base, rotary_dim, layout, precise, mrope, qq_t, qq_f, kq_t, kq_f, vq_t, vq_f, False,
         cp_size=cp_size, cp_rank=cp_rank)


def _rope_and_cache_impl(
    q: torch.Tensor, q_out: Optional[torch.Tensor], k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
    v_cache: torch.Tensor, slots: torch.Tensor, positions: Optional[torch.Tensor], offsets: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor, scale: float, pos_base: int, rotary_dim: int,
    layout: str, precise: bool, mrope: Optional[List[int]], qq_t: Optional[torch.Tensor], qq_f: float,
    kq_t: Optional[torch.Tensor], kq_f: float, vq_t: Optional[torch.Tensor], vq_f: float, cp_size: int = 1,
    cp_rank: int = 0,
) -> None:
    if COMPILER_SEES_KERNEL and q.device.type == "cuda":
        _run(q, q if q_out is None else q_out, k, v, k_cache, v_cache, slots, positions, offsets, cu_seqlens,
             inv_freq, scale, pos_base, rotary_dim, layout, precise, mrope, qq_t, qq_f, kq_t, kq_f, vq_t, vq_f, True,
             cp_size=cp_size, cp_rank=cp_rank)
    else:
        torch.ops.yarn_triton.rope_and_cache_host_(q, q_out, k, v, k_cache, v_cache, slots, positions, offsets,
                                                   cu_seqlens, inv_freq, scale, pos_base, rotary_dim, layout,
                                                   precise, mrope, qq_t, qq_f, kq_t, kq_f, vq_t, vq_f, cp_size, cp_rank)


def _run_mla(q_pe, q_nope, q_out, k_pe, kv_c, kv_cache, slots, positions, offsets, cu_seqlens, inv_freq, scale,
             pos_base, rot, layout, precise, mrope, qq_t, qq_f, sc_t, sc_f, traced, cp_size=1, cp_rank=0) -> None:
    """The MLA call as the GQA one: one-head k and v, the two halves of the cache as the k
    and v caches, and with ``q_nope`` the whole q (its rope part last) into ``q_out``."""
    k, v, k_cache, v_cache = mla_views(q_pe, k_pe, kv_c, kv_cache)
    q = q_pe if q_nope is None else mla_whole_q(q_pe, q_nope, q_out)
    _run(q, q if q_out is None else q_out, k, v, k_cache, v_cache, slots, positions, offsets, cu_seqlens, inv_freq,
         scale, pos_base, rot, layout, precise, mrope, qq_t, qq_f, sc_t, sc_f, sc_t, sc_f, traced,
         "start" if q_nope is None else "end", cp_size, cp_rank)


@torch.library.custom_op("yarn_triton::mla_rope_and_cache_host_", mutates_args=("q_pe", "q_out", "kv_cache"))
def _mla_host_op(
    q_pe: torch.Tensor, q_nope: Optional[torch.Tensor], q_out: Optional[torch.Tensor], k_pe: torch.Tensor,
    kv_c: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor, positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor, scale: float,
    pos_base: int, rotary_dim: int, layout: str, precise: bool, mrope: Optional[List[int]],
    qq_t: Optional[torch.Tensor], qq_f: float, sc_t: Optional[torch.Tensor], sc_f: float, cp_size: int = 1,
    cp_rank: int = 0,
) -> None:
    """The MLA cache write outside the compiler's view (CPU tensors, old torch)."""
    _run_mla(q_pe, q_nope, q_out, k_pe, kv_c, kv_cache, slots, positions, offsets, cu_seqlens, inv_freq, scale,
             pos_base, rotary_dim, layout, precise, mrope, qq_t, qq_f, sc_t, sc_f, False, cp_size, cp_rank)


def _mla_impl(
    q_pe: torch.Tensor, q_nope: Optional[torch.Tensor], q_out: Optional[torch.Tensor], k_pe: torch.Tensor,
    kv_c: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor, positions: Optional[torch.Tensor],
    offsets: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], inv_freq: torch.Tensor, scale: float,
    pos_base: int, rotary_dim: int, layout: str, precise: bool, mrope: Optional[List[int]],
    qq_t: Optional[torch.Tensor], qq_f: float, sc_t: Optional[torch.Tensor], sc_f: float, cp_size: int = 1,
    cp_rank: int = 0,
) -> None:
    if COMPILER_SEES_KERNEL and q_pe.device.type == "cuda":
        _run_mla(q_pe, q_nope, q_out, k_pe, kv_c, kv_cache, slots, positions, offsets, cu_seqlens, inv_freq, scale,
                 pos_base, rotary_dim, layout, precise, mrope, qq_t, qq_f, sc_t, sc_f, True, cp_size, cp_rank)
    else:
        torch.ops.yarn_triton.mla_rope_and_cache_host_(q_pe, q_nope, q_out, k_pe, kv_c, kv_cache, slots, positions,
                                                       offsets, cu_seqlens, inv_freq, scale, pos_base, rotary_dim,
                                                       layout, precise, mrope, qq_t, qq_f, sc_t, sc_f, cp_size,
                                                       cp_rank)


_rope_and_cache_op = _define("yarn_triton::rope_and_cache_", ("q", "q_out", "k_cache", "v_cache"),
                             _rope_and_cache_impl)
_mla_op = _define("yarn_triton::mla_rope_and_cache_", ("q_pe", "q_out", "kv_cache"), _mla_impl)


# --------------------------------------------------------------------------------------
# The public functions
# --------------------------------------------------------------------------------------


def _checked(q, k, v, k_cache, v_cache, slot_mapping, q_out, k_scale, v_scale, q_scale, positions, params, layout,
             rotary_dim, offsets, cu_seqlens, check_slots, check_cu, config, names=None,
             cp=None) -> Tuple[int, CacheCall]:
    """Every check of a serving call, in order (q, k and the positions; the context-parallel
    shard; the launch shape; the packed sequences; v, the caches, the slots, the scales and
    q_out; the slots' values): ``(rotary dim, the checked cache call)``, or a clear error
    before any launch."""
    rot = check_rope_args(q, k, positions, params, layout, rotary_dim, offsets, cu_seqlens, inplace=q_out is None)
    check_cp(cp, q, positions, cu_seqlens)
    if config is not None:
        _check_config(config)
    _check_cu(cu_seqlens, check_cu, q, cp)
    call = check_cache_call(q, k, v, k_cache, v_cache, slot_mapping, q_out, k_scale, v_scale, q_scale, names=names)
    _check_slots(call.slots, check_slots, k_cache.shape[0] * k_cache.shape[1])
    return rot, call


def _launch_eager(q, q_out, k, v, k_cache, v_cache, call: CacheCall, positions, offsets, cu_seqlens, params, rot,
                  layout, precise, config, rotary_at="start", cp=None, key=None) -> None:
    """The eager call: straight to the launch (no dispatcher round trip); its launch is
    kept under ``key`` (:mod:`.cache_plans`) for the next call of the same signature."""
    off_t, pos_base = split_offsets(offsets)
    target = CacheTarget(v, k_cache, v_cache, call.slots,
                         *(1.0 if s is None else s for s in (call.q_quant, call.k_quant, call.v_quant)))
    inv_freq = params.inv_freq_on(q.device)
    launch = _execute(q, q if q_out is None else q_out, k, None, positions, off_t, cu_seqlens, inv_freq,
                      params.cos_sin_scale, pos_base, rot, layout, False, precise, config, mrope=mrope_spec(params),
                      cache=target, rotary_at=rotary_at, cp=cp)
    _cache_plans.remember(key, launch, params, inv_freq, q, q_out, k, v, k_cache, v_cache)


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
    cp: Optional[Tuple[int, int]] = None,
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
            check_cu_seqlens, config, cp: as in :func:`apply_rope_` (every position form,
            a context-parallel shard's too; M-RoPE params too). With a partial rotary the
            pass-through channels are stored as they are (and copied to ``q_out``).
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
    compiling = torch.compiler.is_compiling()
    key = None
    if not compiling:  # a known signature replays its launch (cache_plans)
        key = _cache_plans.cache_signature("gqa", q, q_out, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
                                           q_scale, positions, params, layout, rotary_dim, offsets, cu_seqlens,
                                           precise_angles, check_slots, config, cp, "start")
        if _cache_plans.replay(key, q, q_out, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, q_scale,
                               positions, offsets, cu_seqlens, check_cu_seqlens, cp):
            return (q if q_out is None else q_out), k_cache, v_cache
    rot, call = _checked(q, k, v, k_cache, v_cache, slot_mapping, q_out, k_scale, v_scale, q_scale, positions, params,
                         layout, rotary_dim, offsets, cu_seqlens, check_slots, check_cu_seqlens, config, cp=cp)
    if compiling:
        off_t, pos_base = split_offsets(offsets)
        torch.ops.yarn_triton.rope_and_cache_(
            q, q_out, k, v, k_cache, v_cache, call.slots, positions, off_t, cu_seqlens, params.inv_freq_on(q.device),
            params.cos_sin_scale, pos_base, rot, layout, precise_angles, mrope_list(params),
            *_scale_args(call.q_quant), *_scale_args(call.k_quant), *_scale_args(call.v_quant), *_cp_args(cp))
    else:
        _launch_eager(q, q_out, k, v, k_cache, v_cache, call, positions, offsets, cu_seqlens, params, rot, layout,
                      precise_angles, config, cp=cp, key=key)
    return (q if q_out is None else q_out), k_cache, v_cache


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
    q_out: Optional[torch.Tensor] = None,
    q_scale: Scale = None,
    q_nope: Optional[torch.Tensor] = None,
    offsets: Offsets = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    precise_angles: bool = True,
    check_slots: Optional[bool] = None,
    check_cu_seqlens: Optional[bool] = None,
    config: Optional[LaunchConfig] = None,
    cp: Optional[Tuple[int, int]] = None,
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
        q_out: the rotated ``q_pe`` goes there instead (``[*T, H, R]``, q_pe's dtype or FP8
            with ``q_scale``) and q_pe is left as it was; with ``q_nope`` (``[*T, H, Nq]``,
            the no-rope part of the same q: ``q[..., :Nq]`` where ``q_pe`` is
            ``q[..., Nq:]``), ``q_out`` is ``[*T, H, Nq + R]`` and gets both, ``q_nope``'s
            channels copied (quantized) and the rotated ``q_pe`` after them: an FP8 q for
            FP8 attention, in the same launch.
        layout: ``"deepseek"`` (default: pairs in, halves out, as DeepSeek's
            checkpoints need), ``"neox"`` or ``"interleaved"``.
        positions, params, offsets, cu_seqlens, precise_angles, check_slots,
            check_cu_seqlens, config, cp: as in :func:`apply_rope_and_cache_`.

    Returns:
        ``(q_pe or q_out, kv_cache)``, the same tensors, written.
    """
    k, v, k_cache, v_cache = mla_views(q_pe, k_pe, kv_c, kv_cache)
    q = q_pe if q_nope is None else mla_whole_q(q_pe, q_nope, q_out)
    if q_nope is not None and q_out is not None and q_out.shape != q.shape:
        raise ValueError(f"q_out must be [*T, H, Nq + R] = {tuple(q.shape)} (q_nope's channels, then q_pe's), "
                         f"got {tuple(q_out.shape)}")
    rotary_at = "start" if q_nope is None else "end"
    compiling = torch.compiler.is_compiling()
    key = None
    if not compiling:  # a known signature replays its launch (cache_plans)
        key = _cache_plans.cache_signature("mla", q, q_out, k, v, k_cache, v_cache, slot_mapping, scale, scale,
                                           q_scale, positions, params, layout, None, offsets, cu_seqlens,
                                           precise_angles, check_slots, config, cp, rotary_at)
        if _cache_plans.replay(key, q, q_out, k, v, k_cache, v_cache, slot_mapping, scale, scale, q_scale,
                               positions, offsets, cu_seqlens, check_cu_seqlens, cp):
            return (q_pe if q_out is None else q_out), kv_cache
    # (the two halves of kv_cache are disjoint views: the check sees them as the two caches)
    names = {"k": "k_pe", "v": "kv_c", "k_cache": "kv_cache[..., L:]", "v_cache": "kv_cache[..., :L]",
             "k_scale": "scale", "v_scale": "scale"}
    rot, call = _checked(q, k, v, k_cache, v_cache, slot_mapping, q_out, scale, scale, q_scale, positions, params,
                         layout, None, offsets, cu_seqlens, check_slots, check_cu_seqlens, config, names, cp)
    if compiling:
        off_t, pos_base = split_offsets(offsets)
        torch.ops.yarn_triton.mla_rope_and_cache_(
            q_pe, q_nope, q_out, k_pe, kv_c, kv_cache, call.slots, positions, off_t, cu_seqlens,
            params.inv_freq_on(q.device), params.cos_sin_scale, pos_base, rot, layout, precise_angles,
            mrope_list(params), *_scale_args(call.q_quant), *_scale_args(call.k_quant), *_cp_args(cp))
    else:
        _launch_eager(q, q_out, k, v, k_cache, v_cache, call, positions, offsets, cu_seqlens, params, rot, layout,
                      precise_angles, config, rotary_at, cp, key)
    return (q_pe if q_out is None else q_out), kv_cache
