"""The host side of a launch: :func:`launch_rope` packs already-checked arguments and the
kernel's switches, takes the launch shape (given, the tuner's pick for the shape class, or
:func:`~.configs.heuristic_config`) and launches; the :class:`PreparedLaunch` it returns
replays the launch with new data pointers through the compiled-kernel fast path.

This module only launches; argument checking lives in ``yarn_triton.op``.

Module state lives here, where it is read, and is patched here: ``AUTOTUNE`` and the
tuner's picks ``_TUNED`` (keyed, read and filled by :func:`launch_rope`), the ``SINCOS``
choice (``HW_SINCOS``, ``_sincos``), ``FAST_LAUNCH`` and the compiled kernels
``_COMPILED``. The kernel is launched by its name in this module (and in ``configs``, whose
tuner times it).

Imports ``rope_kernel``, ``configs`` and ``packed_launch`` (the launcher a replay uses where
it can be built).
"""

from __future__ import annotations

import collections
import os
from functools import reduce as _reduce
from operator import or_ as _or
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton

from . import packed_launch
from .configs import LaunchConfig, _grid, _meta, _next_pow2, _tok_class, _tune, candidate_configs, heuristic_config
from .rope_kernel import INTERPRETED, rope_kernel

__all__ = ["launch_rope", "Operand", "CacheWrite", "PreparedLaunch", "compiled_cache_size"]

# shape class -> LaunchConfig picked by the tuner. Bounded: the key is a shape class
# (token bucket, head counts, head stride, layout switches, dtypes), a handful per model.
_TUNED: "collections.OrderedDict" = collections.OrderedDict()
_TUNED_MAX = 256


def tuned_configs() -> dict:
    """The tuner's picks so far, by shape class (for reports)."""
    return dict(_TUNED)


# YARN_TRITON_AUTOTUNE=0 uses the heuristic shape everywhere (e.g. test suites that would
# otherwise tune every shape they touch).
AUTOTUNE = os.environ.get("YARN_TRITON_AUTOTUNE", "1") != "0"


class Operand(NamedTuple):
    """One of q/k: input and output tensors with (batch, seq, head, dim) element strides."""

    src: torch.Tensor
    src_strides: Sequence[int]
    dst: torch.Tensor
    dst_strides: Sequence[int]


class CacheWrite(NamedTuple):
    """The serving path's cache write (the kernel's CACHE switch): k's :class:`Operand`
    then has the k cache as its output, with (block, row in block, head, dim) strides;
    ``v`` is v with the v cache likewise. ``slots`` holds each token's slot, addressed by
    ``slot_strides`` (batch, seq) as the positions are. ``n_slots`` (blocks x rows) bounds
    the slots written; ``block_size`` rows per block. ``q_quant``, ``k_quant``,
    ``v_quant``: the scales of FP8 outputs (q's output, the caches), each a float or a
    one-element float32 tensor on the device (1.0 where unused)."""

    v: Operand
    slots: torch.Tensor
    slot_strides: Sequence[int]
    n_slots: int
    block_size: int
    q_quant: object = 1.0
    k_quant: object = 1.0
    v_quant: object = 1.0


_INT32_SPAN = 1 << 31


def _extent(t: torch.Tensor) -> int:
    """The largest element offset from ``t``'s data pointer to one of its elements: the
    kernel only ever addresses elements of the tensors it is given."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 1)


def _tail(op: Optional[Operand], rot: int, touched: bool):
    """Pass-through channels of a partial rotary, and their padded width, when the kernel
    must touch them (out of place: copied; with the norm: normalised)."""
    if op is None or not touched:
        return 0, 0
    tail = op.src.shape[-1] - rot
    return tail, (_next_pow2(tail) if tail > 0 else 0)


class PreparedLaunch:
    """A launch with everything fixed but the data pointers and ``pos_base``.

    :func:`launch_rope` returns one for the call it just made; the op layer keeps it per
    call signature (shapes, strides, dtypes, switches), so a repeated call skips the
    geometry and goes straight to :meth:`__call__`. The compiled kernel is picked by the
    pointers' 16-byte alignment and ``pos_base``'s width, the only things a same-signature
    call can change that Triton specializes on. A replay launches through the packed
    launcher (:mod:`.packed_launch`: the arguments that never change packed once, per call
    only the pointers and ``pos_base``) where it could be built, else through Triton's C
    launch function.
    """

    __slots__ = ("args", "switches", "cfg", "grid", "device", "_constexprs", "_by_align", "_aligned", "_direct",
                 "_packed", "_tail")

    def __init__(self, args, switches, cfg, grid):
        # the pointer slots are left empty: a cached plan must not keep the first call's
        # tensors (and their GPU memory) alive; each call brings its own
        self.args = [None] * _N_PTRS + list(args[_N_PTRS:])
        self.switches = switches
        self.cfg = cfg
        self.grid = grid
        self.device = args[0].device.index
        # the compiled kernel's launcher takes the constexprs too (and skips them)
        meta = {**switches, **_meta(cfg, self.args)}
        self._constexprs = [meta[name] for name in rope_kernel.arg_names[len(args):]]
        self._by_align = {}
        self._aligned = None  # the common case: every pointer 16-byte aligned, 32-bit pos_base
        self._direct = None  # (C launch function, its arguments between stream and the kernel's)
        self._packed = None  # (packed_launch's C launch, the spec of this plan's aligned kernel)
        # the kernel's arguments after the pointers and pos_base, constexprs included
        self._tail = (*self.args[_N_PTRS + 2:], *self._constexprs)

    def _args(self, pointers: Sequence, pos_base: int) -> list:
        """The runtime arguments: ``pointers`` (tensors or their data pointers) first, then
        the fixed ones with this call's ``pos_base``."""
        args = [*pointers, *self.args[_N_PTRS:]]
        args[_N_PTRS + 1] = pos_base
        return args

    def __call__(self, ptrs: Sequence[int], pos_base: int, tensors: Sequence[torch.Tensor],
                 bits: Optional[int] = None) -> None:
        """Launch on the current stream of the tensors' device. ``ptrs``: data pointers of
        the ``_N_PTRS`` pointer arguments; ``tensors``: the same as tensors, used only when a new
        specialization must be compiled; ``bits``: the OR of the pointers, where the caller
        has it (their 16-byte alignment is all that is read of it)."""
        if INTERPRETED or not FAST_LAUNCH:  # Triton's own launcher (the interpreter's too)
            rope_kernel[self.grid](*self._args(tensors, pos_base), **self.switches, **_meta(self.cfg, self.args),
                                   num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)
            return
        if bits is None:
            bits = _reduce(_or, ptrs)
        narrow = -(1 << 31) <= pos_base < (1 << 31)
        common = not bits & 15 and narrow
        if common and (self._packed is not None or self._direct is not None) and not _HOOKED():
            if self._packed is not None:  # the packed launcher, where it could be built
                launch, spec = self._packed
                launch(spec, _RAW_STREAM(self.device), ptrs, pos_base)
            else:
                launch, head = self._direct
                launch(*self.grid, _RAW_STREAM(self.device), *head, *ptrs, self.args[_N_PTRS], pos_base, *self._tail)
            return
        compiled = self._aligned if common else None
        if compiled is None:
            key = (tuple(p & 15 == 0 for p in ptrs), not narrow)
            compiled = self._by_align.get(key)
            if compiled is None:
                compiled = _compile(self._args(tensors, pos_base), self.switches, self.cfg, self.grid)
                self._by_align[key] = compiled
                if common:
                    self._aligned = compiled
                    self._direct = _direct_launch(compiled)
                    self._packed = self._packed_launch(compiled, pos_base)
        args = (*ptrs, self.args[_N_PTRS], pos_base, *self._tail)
        g0, g1, g2 = self.grid
        if _HOOKED():
            compiled[self.grid](*args)  # profilers' hooks want Triton's full path
        else:
            compiled.run(g0, g1, g2, _RAW_STREAM(self.device), compiled.function, compiled.packed_metadata,
                         None, None, None, *args)

    def _packed_launch(self, compiled, pos_base: int) -> Optional[tuple]:
        """``(C launch, spec)`` of the packed launcher (:mod:`.packed_launch`) for
        ``compiled``, this plan's kernel for aligned pointers and a 32-bit ``pos_base``, or
        None where it cannot stand in for Triton's launcher."""
        values = [*self._args([0] * _N_PTRS, pos_base), *self._constexprs]
        spec = packed_launch.spec_for(compiled, rope_kernel.arg_names, values, self.grid, self.device, _N_PTRS,
                                      _N_PTRS + 1)
        return None if spec is None else (packed_launch.module().launch, spec)


def _direct_launch(compiled) -> Optional[tuple]:
    """``(C launch function, its arguments between the stream and the kernel's)`` for
    ``compiled``, or None to keep ``compiled.run``.

    Triton 3.6's ``CudaLauncher.__call__(gridX, gridY, gridZ, stream, function, *args)`` is
    a Python frame that allocates the global and profile scratch (none for this kernel) and
    passes everything on to its compiled C function ``launch(gridX, gridY, gridZ, stream,
    function, cooperative, pdl, global_scratch, profile_scratch, *args)``: about a tenth of
    a decode call's host time. Where the launcher has exactly that shape and this kernel no
    scratch, the plan calls the C function itself; any other Triton keeps its own path.
    """
    run = getattr(compiled, "run", None)
    launch = getattr(run, "launch", None)
    call = getattr(type(run), "__call__", None)
    code = getattr(call, "__code__", None)
    if launch is None or code is None or not callable(launch):
        return None
    if code.co_argcount != 6 or code.co_varnames[:6] != ("self", "gridX", "gridY", "gridZ", "stream", "function") \
            or not code.co_flags & 0x04:  # *args
        return None
    if getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1):
        return None
    head = (compiled.function, getattr(run, "launch_cooperative_grid", False), getattr(run, "launch_pdl", False),
            None, None, compiled.packed_metadata, None, None, None)
    return launch, head


def _cache_pointers(cache: Optional[CacheWrite], filler: torch.Tensor) -> tuple:
    """The kernel's pointer arguments of the cache write: slots, v, the v cache and the
    three scales (``filler``, never read, where there is no cache or the scale is a
    float)."""
    if cache is None:
        return (filler,) * 6
    return (cache.slots, cache.v.src, cache.v.dst,
            *(sc if isinstance(sc, torch.Tensor) else filler for sc in (cache.q_quant, cache.k_quant, cache.v_quant)))


def _cache_args(cache: Optional[CacheWrite], filler: torch.Tensor) -> tuple:
    """The kernel's scalar arguments of the cache write (zeros and ones without one)."""
    if cache is None:
        return (1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 1.0, 1.0)
    v = cache.v
    return (cache.n_slots, cache.block_size, v.src.shape[-2], *v.src_strides[:2], *v.src_strides[2:],
            *v.dst_strides, *cache.slot_strides,
            *(1.0 if isinstance(sc, torch.Tensor) else float(sc) for sc in (cache.q_quant, cache.k_quant,
                                                                             cache.v_quant)))


def launch_rope(
    q: Operand,
    k: Optional[Operand],
    inv_freq: torch.Tensor,
    scale: float,
    *,
    n_tokens: int,
    seq_len: int,
    half: int,
    in_pairs: bool,
    out_pairs: bool,
    inverse: bool,
    precise: bool,
    per_token_positions: Optional[torch.Tensor],
    pos_strides: Sequence[int],
    offsets: Optional[torch.Tensor],
    offsets_stride: int,
    pos_base: int,
    cu_seqlens: Optional[torch.Tensor],
    config: Optional[LaunchConfig] = None,
    autotune: bool = True,
    traced: bool = False,
    norm: int = 0,
    q_weight: Optional[torch.Tensor] = None,
    k_weight: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    mrope: Tuple[int, int, int, int] = (0, 0, 0, 0),
    pos_stream_stride: int = 0,
    q_scale: Optional[Tuple[float, int]] = None,
    tail_first: bool = False,
    cache: Optional[CacheWrite] = None,
    cp: Optional[Tuple[int, int]] = None,
) -> Optional[PreparedLaunch]:
    """Launch :func:`rope_kernel` on already-validated arguments.

    Positions come in one of three forms: ``per_token_positions`` addressed by
    ``pos_strides`` (batch, seq); or derived as ``pos_base + index within the sequence``
    plus ``offsets[seq]`` when ``offsets`` is given; sequences are the batch rows, or the
    ``cu_seqlens`` ranges of a packed batch (then ``seq_len`` is unused).

    The launch shape is ``config`` if given, else the tuner's pick for this shape class
    (timed on scratch copies on first sight, then cached; never inside a CUDA graph
    capture), else (``autotune=False``, the interpreter, or a capture before any eager
    call of the class) :func:`heuristic_config`.

    ``traced``: the call runs inside a ``torch.library.triton_op`` that torch.compile
    traces; the kernel goes through ``wrap_triton`` with a fixed launch shape (the tuned
    one if this shape class was tuned eagerly, else the heuristic's), so the compiled
    graph launches it directly.

    ``norm``: 0, or RMS-normalise each head first with ``q_weight``/``k_weight``
    (contiguous ``[head_dim]``) and ``eps``; 2 for the ``(1 + weight)`` form.

    ``mrope``: ``(kind, s_t, s_h, s_w)``: kind 0 (one position per token), or 1/2 for
    sectioned/interleaved M-RoPE with per-token positions of three streams, the stream
    ``i`` at ``per_token_positions + i * pos_stream_stride``.

    ``q_scale``: ``(beta, original_max)``: multiply q (all its channels) by the Llama-4
    query scale of each token's position (not with M-RoPE); None for none.

    ``tail_first``: the rotary part of each head is its last ``2 * half`` channels (the
    pass-through ones come first); the operands still address whole heads.

    ``cache``: the serving path (:class:`CacheWrite`): k's output operand is the k cache,
    written at each token's slot, and v is copied to the v cache at the same slots.

    ``cp``: ``(cp_size, cp_rank)`` with derived positions (no ``per_token_positions``):
    each sequence (a batch row of ``seq_len`` tokens, or a ``cu_seqlens`` range) is that
    rank's head-tail shard of a context-parallel split, and its tokens get their global
    positions (the kernel's CP switch); None for none.

    Returns the :class:`PreparedLaunch` of this call for the caller to replay, or None
    when the launch cannot be replayed that way (tracing, nothing to do).
    """
    n_q_heads = q.src.shape[-2]
    n_k_heads = 0 if k is None else k.src.shape[-2]
    if n_tokens == 0 or n_q_heads + n_k_heads == 0:
        return None
    inplace = q.dst is q.src
    rot = 2 * half
    q_tail, q_tail_pad = _tail(q, rot, norm or q_scale is not None or not inplace)
    k_tail, k_tail_pad = _tail(k, rot, norm or not inplace or cache is not None)
    if tail_first:
        # the kernel steps over the tail to the rotary part: it needs the tail's width even
        # where it does not touch those channels. No tail at all: the usual layout
        q_tail = q.src.shape[-1] - rot
        k_tail = 0 if k is None else k.src.shape[-1] - rot
        tail_first = q_tail > 0 or k_tail > 0
    if k is None:
        # no k heads: nothing of k is read or written. Traced for torch.compile, k must not
        # be q itself (the graph would see q mutated through two arguments)
        dummy = q.src.new_empty(1) if traced else None
        k = Operand(dummy if traced else q.src, (0, 0, 0, 0), dummy if traced else q.dst, (0, 0, 0, 0))
    sincos = _sincos(q.dst.dtype, k.dst.dtype)
    low_rot = _low_rotation(q, k, norm, q_scale, cache)
    v = None if cache is None else cache.v
    n_v_heads = 0 if v is None else v.src.shape[-2]
    v_dim = 0 if v is None else v.src.shape[-1]
    tune = config is None and autotune and AUTOTUNE and not INTERPRETED
    if tune or traced:
        # Tuning runs once per shape class; later calls launch its pick directly.
        tune_key = (_tok_class(n_tokens), n_q_heads, n_k_heads, q.src_strides[2], k.src_strides[2],
                    half, in_pairs, out_pairs, inplace, cu_seqlens is not None, norm, mrope[0],
                    q.src.dtype, q.dst.dtype, k.src.dtype, q_scale is not None, tail_first, sincos,
                    None if v is None else (n_v_heads, v_dim, k.dst.dtype, v.dst.dtype), cp is not None)
        config = config or _TUNED.get(tune_key)
        # never tune while tracing or inside a CUDA graph capture (the timing runs would be
        # captured): the heuristic's shape then
        tune = config is None and not traced and not torch.cuda.is_current_stream_capturing()
    cfg = config or heuristic_config(n_tokens, n_q_heads, n_k_heads, half)
    per_token = per_token_positions is not None
    pos_ptr = per_token_positions if per_token else offsets
    pos_sb, pos_ss = pos_strides if per_token else (offsets_stride, 0)
    varlen = cu_seqlens is not None
    n_seqs = cu_seqlens.shape[0] - 1 if varlen else 0
    args = (
        q.src, q.dst, k.src, k.dst,
        inv_freq if pos_ptr is None else pos_ptr,
        cu_seqlens if varlen else inv_freq,
        inv_freq,
        inv_freq if q_weight is None else q_weight,
        inv_freq if k_weight is None else k_weight,
        *_cache_pointers(cache, inv_freq),
        float(scale), int(pos_base), float(eps),
        n_tokens, seq_len, n_seqs, _tok_class(n_tokens),
        n_q_heads, n_k_heads, q_tail, k_tail,
        *q.src_strides, *q.dst_strides, *k.src_strides, *k.dst_strides,
        pos_sb, pos_ss, pos_stream_stride,
        *((0.0, 1) if q_scale is None else (float(q_scale[0]), int(q_scale[1]))),
        *_cache_args(cache, inv_freq),
        *((1, 0) if cp is None else (int(cp[0]), int(cp[1]))),
    )
    switches = dict(
        HALF=half, HALF_PAD=_next_pow2(half),
        Q_TAIL_PAD=q_tail_pad, K_TAIL_PAD=k_tail_pad,
        IN_PAIRS=in_pairs, OUT_PAIRS=out_pairs,
        INVERSE=inverse, PRECISE=precise, INPLACE=inplace,
        POS_MODE=0 if per_token else 1, HAS_OFFSETS=offsets is not None, VARLEN=varlen, NORM=norm,
        MROPE=mrope[0], SEC_T=mrope[1], SEC_H=mrope[2], SEC_W=mrope[3], Q_SCALE=q_scale is not None,
        TAIL_FIRST=tail_first, SINCOS=sincos,
        WIDE=max(_extent(t) for t in args[:_N_PTRS]) >= _INT32_SPAN,
        ROWS=0 if varlen else (1 if seq_len == n_tokens else (2 if seq_len == 1 else 0)),
        CACHE=cache is not None, V_DIM=v_dim, V_PAD=_next_pow2(v_dim) if v_dim else 1,
        QUANT_PTRS=0 if cache is None else sum(bit for bit, sc in ((1, cache.q_quant), (2, cache.k_quant),
                                                                   (4, cache.v_quant))
                                               if isinstance(sc, torch.Tensor)),
        CP=cp is not None, LOW_ROT=low_rot,
    )

    if traced:
        torch.library.wrap_triton(rope_kernel)[_grid(n_tokens, cfg)](
            *args, **switches, **_meta(cfg, args), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return None
    if tune:
        pick = _tune(args, switches, n_tokens, candidate_configs(n_tokens, n_q_heads, n_k_heads, _next_pow2(half)))
        cfg = pick or cfg
        _TUNED[tune_key] = cfg
        while len(_TUNED) > _TUNED_MAX:
            _TUNED.popitem(last=False)
    plan = PreparedLaunch(args, switches, cfg, _grid(n_tokens, cfg))
    plan([t.data_ptr() for t in args[:_N_PTRS]], int(pos_base), args[:_N_PTRS])
    return plan


# YARN_TRITON_HW_SINCOS=0 keeps the polynomials for 16-bit outputs too (to compare).
HW_SINCOS = os.environ.get("YARN_TRITON_HW_SINCOS", "1") != "0"
_SIXTEEN_BIT = (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def _sincos(*out_dtypes: torch.dtype) -> int:
    """The kernel's SINCOS switch for outputs of these dtypes: the special-function unit
    only where every output is 16-bit or narrower, whose rounding step near 1 is 500
    (fp16) to 4000 (bf16) times its error and more for FP8; float32 outputs keep the
    polynomials."""
    if not HW_SINCOS or any(d not in _SIXTEEN_BIT for d in out_dtypes):
        return 0
    return 2 if INTERPRETED else 1


# YARN_TRITON_LOW_PRECISION_ROTATION=1 (opt-in, process-wide, read at each launch
# preparation; an experiment for decode, docs/performance.md): the rotation's products in
# the 16-bit storage dtype, two values an instruction, as the cos/sin-table kernels do it
# (Liger's), instead of float32 with one rounding at the end. The angles keep their
# precision; each product is rounded to bf16/fp16, so the error grows to that of a
# table kernel (docs/accuracy.md).
LOW_PRECISION_ROTATION = os.environ.get("YARN_TRITON_LOW_PRECISION_ROTATION", "0") == "1"
_ROTATION_DTYPES = (torch.bfloat16, torch.float16)


def _low_rotation(q, k, norm, q_scale, cache) -> bool:
    """The kernel's LOW_ROT switch: only when opted in, and only where q and k are read and
    written in one 16-bit dtype with nothing else applied (norm, query scale, the cache
    write keep float32 arithmetic)."""
    if not LOW_PRECISION_ROTATION or norm or q_scale is not None or cache is not None:
        return False
    dt = q.src.dtype
    return dt in _ROTATION_DTYPES and q.dst.dtype == dt and k.src.dtype == dt and k.dst.dtype == dt


# --------------------------------------------------------------------------------------
# Host fast path: Triton's launcher re-derives the kernel's specialization from ~40
# arguments on every call, which costs more host time than this kernel takes on the GPU
# for decode shapes. Compiled kernels are kept under the key Triton itself specializes on
# (dtypes and 16-byte alignment of the pointers; for each integer argument whether it is
# 1, a multiple of 16, or needs 64 bits; the constexprs and launch shape), so the cache is
# bounded by the number of such classes, not by token counts, and a hit is launched
# through the compiled kernel's own launcher with no re-derivation.
# --------------------------------------------------------------------------------------
FAST_LAUNCH = os.environ.get("YARN_TRITON_FAST_LAUNCH", "1") != "0"
# q, qo, k, ko, pos, cu, inv_freq, qw, kw, slot, v, vc, qq, kq, vq come first in rope_kernel's signature
_N_PTRS = 15
# integer arguments Triton does not specialize on value (only on 32/64-bit width)
_UNSPECIALIZED = frozenset(rope_kernel.arg_names.index(n) for n in
                           ("scale", "pos_base", "eps", "n_tokens", "seq_len", "n_seqs", "tok_class", "qs_omax",
                            "cp_size", "cp_rank"))
_COMPILED: "collections.OrderedDict" = collections.OrderedDict()
_COMPILED_MAX = 128


def _int_class(i: int, v) -> object:
    if isinstance(v, float):
        return None
    wide = not -(1 << 31) <= v < (1 << 31)
    if i in _UNSPECIALIZED:
        return wide
    return (v == 1, v % 16 == 0, wide)


def _specialization_key(args, switches, cfg):
    ptrs = args[:_N_PTRS]
    return (
        ptrs[0].device.index,
        tuple(t.dtype for t in ptrs),
        tuple(t.data_ptr() % 16 == 0 for t in ptrs),
        tuple(_int_class(i, v) for i, v in enumerate(args) if i >= _N_PTRS),
        tuple(switches.values()),  # every constexpr switch (Q_SCALE, TAIL_FIRST, ...), in a fixed order
        cfg,
        tuple(_meta(cfg, args).values()),  # heads per step follow the head counts
    )


def compiled_cache_size() -> int:
    """Number of compiled specializations held by the fast path (bounded)."""
    return len(_COMPILED)


def _compile(args, switches, cfg: LaunchConfig, grid):
    """The compiled kernel for these arguments' specialization class, launching it once
    through Triton (which compiles on a miss) when it is new to us."""
    key = _specialization_key(args, switches, cfg)
    compiled = _COMPILED.get(key)
    if compiled is not None:
        _COMPILED.move_to_end(key)
        return compiled
    compiled = rope_kernel.warmup(*args, **switches, **_meta(cfg, args), num_warps=cfg.num_warps,
                                  num_stages=cfg.num_stages, grid=grid)
    compiled._init_handles()
    _COMPILED[key] = compiled
    while len(_COMPILED) > _COMPILED_MAX:
        _COMPILED.popitem(last=False)
    return compiled


_RAW_STREAM = torch._C._cuda_getCurrentRawStream if hasattr(torch._C, "_cuda_getCurrentRawStream") else None
_KNOBS = triton.knobs.runtime


def _HOOKED() -> bool:
    """Whether a profiler set Triton's launch hooks (then launches take Triton's own path).
    (Triton 3.6 keeps an always-present chain of hooks, empty unless a profiler added one;
    later versions keep None. Written out, without a helper per hook: every replay asks.)"""
    enter, leave = _KNOBS.launch_enter_hook, _KNOBS.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True)) or
                (leave is not None and getattr(leave, "calls", True))) or _RAW_STREAM is None
