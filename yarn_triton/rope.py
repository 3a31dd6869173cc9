"""Host-side rope parameters: :class:`RopeParams`, the immutable bundle the kernel reads,
and :class:`RopeTracker`, transformers' sequence-length caching behaviour on top of it.

The math of each variant lives in :mod:`yarn_triton.variants` (one function per variant,
returning a :class:`~yarn_triton.variants.RopeSpec`) and the reading of model configs in
:mod:`yarn_triton.config_parsing`; the classmethods here (``RopeParams.yarn``, ...,
``RopeParams.from_config``) are one-line wrappers that turn their result into params.

Import graph of the host modules (each imports only modules listed above it; no cycles,
no imports inside functions)::

    _validate        argument checks
    variants         one *_spec function per variant       <- _validate
    config_parsing   model config -> RopeSpec              <- variants, _validate
    rope             RopeParams, RopeTracker               <- config_parsing, variants, _validate
    config           rope_params_from_config               <- rope, config_parsing

Everything runs once per model on the CPU, in the same float32 torch operations as the
reference implementations, so the numbers match theirs bit for bit. A :class:`RopeParams`
copies ``inv_freq`` once per device, on first use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from ._validate import check_number, check_rope_dim, check_seq_len
from .config_parsing import mrope_from_config, rope_spec_from_config
from .variants import (
    RopeSpec,
    default_spec,
    dynamic_spec,
    linear_spec,
    llama3_spec,
    longrope_attention_factor,
    longrope_spec,
    ntk_spec,
    proportional_spec,
    yarn_find_correction_dim,
    yarn_find_correction_range,
    yarn_get_mscale,
    yarn_hf_correction_range,
    yarn_hf_spec,
    yarn_linear_ramp_mask,
    yarn_spec,
)

__all__ = [
    "RopeParams",
    "RopeTracker",
    # re-exported from yarn_triton.variants, where they now live
    "longrope_attention_factor",
    "yarn_hf_correction_range",
    "yarn_find_correction_dim",
    "yarn_find_correction_range",
    "yarn_get_mscale",
    "yarn_linear_ramp_mask",
]

#: How many params of distinct sequence lengths one seq-len-dependent model keeps
#: (least recently used dropped first). Only dynamic NTK has more than one (longrope has
#: a single long set), and each entry is one ``[rope_dim // 2]`` float32 tensor plus its
#: device copies, so the bound is at most 16 small tensors per device per model. A
#: dropped entry is simply rebuilt (equal values, new object) when asked for again.
SEQ_LEN_CACHE_SIZE = 16


class _SeqLenFamily:
    """The params of one sequence-length dependent model at every length.

    Callable as ``family(seq_len) -> RopeParams``: the initial params up to the rule's
    threshold, and above it params built on demand from the rule and kept in an LRU
    cache of at most ``maxsize`` entries (thread-safe). The initial params and every
    derived one share this object, so asking any of them gives the same answers.
    """

    def __init__(self, cls: type, spec: RopeSpec, maxsize: int = SEQ_LEN_CACHE_SIZE) -> None:
        assert spec.seq_len_rule is not None
        self._cls = cls
        self._spec = spec
        self._rule = spec.seq_len_rule
        self._maxsize = maxsize
        self._cache: "OrderedDict[int, RopeParams]" = OrderedDict()  # bounded by maxsize
        self._lock = threading.Lock()
        self.initial: RopeParams = self._make(spec.inv_freq)

    def _make(self, inv_freq: torch.Tensor) -> "RopeParams":
        s = self._spec
        return self._cls(inv_freq, s.rope_dim, s.cos_sin_scale, s.softmax_scale_factor, s.rope_type,
                         self._rule.threshold, _seq_len_rule=self)

    def __len__(self) -> int:
        """Number of cached params (the initial ones not counted)."""
        return len(self._cache)

    def __call__(self, seq_len: int) -> "RopeParams":
        rule = self._rule
        if seq_len <= rule.threshold:
            return self.initial
        key = seq_len if rule.per_length else rule.threshold + 1
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        built = self._make(rule.inv_freq_at(key))  # outside the lock: it may take a while
        with self._lock:
            hit = self._cache.setdefault(key, built)  # another thread may have won the race
            self._cache.move_to_end(key)
            while len(self._cache) > self._maxsize:
                self._cache.popitem(last=False)
        return hit


def _check_mrope_section(section: Any, rope_dim: int) -> Tuple[int, int, int]:
    """``section`` as a tuple of three non-negative ints adding up to ``rope_dim // 2``."""
    if isinstance(section, (str, bytes)) or not isinstance(section, Sequence) or len(section) != 3:
        raise ValueError(f"mrope_section must be three ints (time, height, width pairs), got {section!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in section):
        raise ValueError(f"mrope_section must hold non-negative ints, got {list(section)!r}")
    if sum(section) != rope_dim // 2:
        raise ValueError(
            f"mrope_section {list(section)} adds up to {sum(section)}, but rope_dim={rope_dim} has "
            f"{rope_dim // 2} frequency pairs"
        )
    return tuple(int(n) for n in section)


# --------------------------------------------------------------------------------------
# The params object
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RopeParams:
    """Everything the kernel needs to know about a model's rope, computed once on the host.

    Build one with a classmethod per variant (:meth:`default`, :meth:`yarn`, :meth:`yarn_hf`,
    :meth:`linear`, :meth:`ntk`, :meth:`dynamic`, :meth:`llama3`, :meth:`longrope`,
    :meth:`proportional`), from a model config (:meth:`from_config`), from a
    :class:`~yarn_triton.variants.RopeSpec` (:meth:`from_spec`), or directly from the
    fields below.

    Attributes:
        inv_freq: float32 CPU tensor ``[rope_dim // 2]``; angle of pair ``i`` at position
            ``p`` is ``p * inv_freq[i]``.
        rope_dim: number of rotated channels per head (even).
        cos_sin_scale: factor applied to cos and sin (YaRN's mscale ratio; 1 for plain rope).
        softmax_scale_factor: factor an attention layer multiplies its ``1/sqrt(head_dim)`` by
            (DeepSeek's ``mscale_all_dim`` correction; 1 when there is none).
        rope_type: name of the method that produced the params (``"default"``, ``"yarn"``, ...).
        seq_len_threshold: for methods whose params depend on the current sequence length
            (``"dynamic"``, ``"longrope"``), the length above which they change; None for the
            others. Ask :meth:`for_seq_len` (stateless) or a :class:`RopeTracker`
            (transformers' caching behaviour) for the params of a longer sequence; the kernel
            call itself never changes.
    """

    inv_freq: torch.Tensor
    rope_dim: int
    cos_sin_scale: float = 1.0
    softmax_scale_factor: float = 1.0
    rope_type: str = "default"
    seq_len_threshold: Optional[int] = None
    mrope_section: Optional[Tuple[int, int, int]] = None
    mrope_interleaved: bool = False
    _seq_len_rule: Optional[Callable[[int], "RopeParams"]] = field(
        default=None, repr=False, compare=False
    )
    # One device copy of inv_freq per device it was asked for: bounded by the number of
    # devices in the process (CPU is served by inv_freq itself and never stored).
    _device_cache: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        inv = self.inv_freq
        if not isinstance(inv, torch.Tensor):
            raise TypeError(f"inv_freq must be a torch.Tensor, got {type(inv).__name__}")
        check_rope_dim("rope_dim", self.rope_dim)
        if inv.shape != (self.rope_dim // 2,):
            raise ValueError(
                f"inv_freq must have shape ({self.rope_dim // 2},) for rope_dim={self.rope_dim}, "
                f"got {tuple(inv.shape)}"
            )
        if inv.is_complex() or not torch.isfinite(inv).all():
            raise ValueError("inv_freq must be real and finite")
        for name in ("cos_sin_scale", "softmax_scale_factor"):
            object.__setattr__(self, name, check_number(name, getattr(self, name)))
        if not isinstance(self.rope_type, str):
            raise TypeError(f"rope_type must be a str, got {type(self.rope_type).__name__}")
        # Own a private float32 CPU copy so later edits to the caller's tensor change nothing.
        object.__setattr__(
            self, "inv_freq", inv.detach().to(device="cpu", dtype=torch.float32).clone()
        )
        object.__setattr__(self, "rope_dim", int(self.rope_dim))
        if self.seq_len_threshold is not None:
            object.__setattr__(
                self, "seq_len_threshold", check_seq_len("seq_len_threshold", self.seq_len_threshold)
            )
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", _check_mrope_section(self.mrope_section, self.rope_dim))
        if not isinstance(self.mrope_interleaved, bool):
            raise TypeError(f"mrope_interleaved must be a bool, got {type(self.mrope_interleaved).__name__}")

    # ---- constructors: one line each, the math is in yarn_triton.variants ---------------
    @classmethod
    def from_spec(cls, spec: RopeSpec) -> "RopeParams":
        """Params from a :class:`~yarn_triton.variants.RopeSpec` (what the ``*_spec``
        functions of :mod:`yarn_triton.variants` return)."""
        if not isinstance(spec, RopeSpec):
            raise TypeError(f"spec must be a RopeSpec, got {type(spec).__name__}")
        if spec.seq_len_rule is not None:
            return _SeqLenFamily(cls, spec).initial
        return cls(spec.inv_freq, spec.rope_dim, spec.cos_sin_scale, spec.softmax_scale_factor, spec.rope_type)

    @classmethod
    def default(cls, dim: int, base: float = 10000.0) -> "RopeParams":
        """Plain RoPE; see :func:`yarn_triton.variants.default_spec`."""
        return cls.from_spec(default_spec(dim, base))

    @classmethod
    def yarn(
        cls,
        dim: int,
        base: float = 10000.0,
        scaling_factor: float = 1.0,
        original_max_position_embeddings: int = 4096,
        beta_fast: float = 32,
        beta_slow: float = 1,
        mscale: float = 1,
        mscale_all_dim: float = 0,
    ) -> "RopeParams":
        """YaRN as DeepSeek-V2/V3 define it; see :func:`yarn_triton.variants.yarn_spec`."""
        return cls.from_spec(yarn_spec(dim, base, scaling_factor, original_max_position_embeddings,
                                       beta_fast, beta_slow, mscale, mscale_all_dim))

    @classmethod
    def linear(cls, dim: int, base: float = 10000.0, factor: float = 1.0) -> "RopeParams":
        """Linear scaling / position interpolation; see :func:`yarn_triton.variants.linear_spec`."""
        return cls.from_spec(linear_spec(dim, base, factor))

    @classmethod
    def ntk(cls, dim: int, base: float = 10000.0, factor: float = 1.0) -> "RopeParams":
        """Static NTK-aware scaling; see :func:`yarn_triton.variants.ntk_spec`."""
        return cls.from_spec(ntk_spec(dim, base, factor))

    @classmethod
    def dynamic(
        cls, dim: int, base: float = 10000.0, factor: float = 1.0, max_position_embeddings: int = 2048
    ) -> "RopeParams":
        """Dynamic NTK scaling (transformers' ``"dynamic"``); see
        :func:`yarn_triton.variants.dynamic_spec`. The params returned are those for
        sequences up to ``max_position_embeddings``; :meth:`for_seq_len` and
        :class:`RopeTracker` give the others."""
        return cls.from_spec(dynamic_spec(dim, base, factor, max_position_embeddings))

    @classmethod
    def yarn_hf(
        cls,
        dim: int,
        base: float = 10000.0,
        factor: Optional[float] = None,
        original_max_position_embeddings: Optional[int] = None,
        *,
        max_position_embeddings: Optional[int] = None,
        attention_factor: Optional[float] = None,
        beta_fast: Optional[float] = None,
        beta_slow: Optional[float] = None,
        mscale: Optional[float] = None,
        mscale_all_dim: Optional[float] = None,
        truncate: bool = True,
        softmax_mscale: bool = True,
    ) -> "RopeParams":
        """YaRN as transformers computes it; see :func:`yarn_triton.variants.yarn_hf_spec`."""
        return cls.from_spec(yarn_hf_spec(
            dim, base, factor, original_max_position_embeddings,
            max_position_embeddings=max_position_embeddings, attention_factor=attention_factor,
            beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim,
            truncate=truncate, softmax_mscale=softmax_mscale,
        ))

    @classmethod
    def llama3(
        cls,
        dim: int,
        base: float = 500000.0,
        factor: float = 8.0,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        original_max_position_embeddings: int = 8192,
    ) -> "RopeParams":
        """Llama 3.1's frequency-band scaling; see :func:`yarn_triton.variants.llama3_spec`."""
        return cls.from_spec(llama3_spec(dim, base, factor, low_freq_factor, high_freq_factor,
                                         original_max_position_embeddings))

    @classmethod
    def longrope(
        cls,
        dim: int,
        base: float = 10000.0,
        short_factor: Sequence[float] = (),
        long_factor: Sequence[float] = (),
        original_max_position_embeddings: int = 4096,
        *,
        factor: Optional[float] = None,
        max_position_embeddings: Optional[int] = None,
        attention_factor: Optional[float] = None,
    ) -> "RopeParams":
        """LongRoPE (Phi-3); see :func:`yarn_triton.variants.longrope_spec`. The params
        returned are the short set; :meth:`for_seq_len` and :class:`RopeTracker` switch."""
        return cls.from_spec(longrope_spec(
            dim, base, short_factor, long_factor, original_max_position_embeddings,
            factor=factor, max_position_embeddings=max_position_embeddings, attention_factor=attention_factor,
        ))

    @classmethod
    def proportional(
        cls, head_dim: int, base: float = 10000.0, factor: float = 1.0, partial_rotary_factor: float = 1.0
    ) -> "RopeParams":
        """Proportional RoPE (Gemma 4); see :func:`yarn_triton.variants.proportional_spec`."""
        return cls.from_spec(proportional_spec(head_dim, base, factor, partial_rotary_factor))

    @classmethod
    def from_config(cls, config: Any, *, layer_type: Optional[str] = None) -> "RopeParams":
        """Params for a model config, as the installed transformers would compute them.

        ``config`` is a transformers ``PretrainedConfig`` (anything with ``to_dict()``), a
        plain dict (a parsed config.json) or a path to a config.json (or its folder). See
        :func:`yarn_triton.config_parsing.rope_spec_from_config` for the rules and errors.
        """
        params = cls.from_spec(rope_spec_from_config(config, layer_type=layer_type))
        mrope = mrope_from_config(config)
        return params if mrope is None else params.with_mrope(*mrope)

    # ---- sequence-length dependence -----------------------------------------------------
    @property
    def is_seq_len_dependent(self) -> bool:
        """True for methods (dynamic, longrope) whose params change with the sequence length."""
        return self._seq_len_rule is not None

    def for_seq_len(self, seq_len: int) -> "RopeParams":
        """The params for a sequence ``seq_len`` long (``max position id + 1``).

        Stateless: dynamic NTK gives the params for exactly ``max(seq_len, max_pos)``;
        longrope the short set up to ``original_max_position_embeddings`` and the long set
        beyond. Every other method returns ``self``. Results are cached (the last
        :data:`SEQ_LEN_CACHE_SIZE` lengths per model), so asking again returns the same
        object and its device copy of ``inv_freq``; keep a reference to params whose device
        tensor must outlive that cache (e.g. one read by a captured CUDA graph).
        """
        n = check_seq_len("seq_len", seq_len)
        if self._seq_len_rule is None:
            return self
        return self._seq_len_rule(n)

    # ---- device copies ------------------------------------------------------------------
    def inv_freq_on(self, device: torch.device | str) -> torch.Tensor:
        """``inv_freq`` on ``device`` (float32, contiguous), copied once and then cached.

        The cached tensor stays alive as long as the params, so kernels (and captured CUDA
        graphs) can read it without a copy per call.
        """
        device = torch.device(device)
        if device.type == "cpu":
            return self.inv_freq
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        cached = self._device_cache.get(key)
        if cached is None and torch.compiler.is_compiling():
            # traced by torch.compile before any eager call on this device: the copy goes
            # into the graph (Dynamo cannot enter the lock, and the cache is not written)
            return self.inv_freq.to(device)
        if cached is None:
            with self._lock:
                cached = self._device_cache.get(key)
                if cached is None:
                    cached = self.inv_freq.to(device)
                    self._device_cache[key] = cached
        return cached

    def with_mrope(self, section: Sequence[int], interleaved: bool = False) -> "RopeParams":
        """The same params for multimodal positions: ``section`` ``(s_t, s_h, s_w)`` pairs
        take the time, height and width streams (see the class attributes), sectioned or
        ``interleaved``. Raises ValueError unless the three are non-negative ints adding
        up to ``rope_dim // 2``."""
        if self._seq_len_rule is not None:
            raise ValueError("M-RoPE sections on sequence-length dependent params are not supported")
        return replace(self, mrope_section=_check_mrope_section(section, self.rope_dim),
                       mrope_interleaved=interleaved, _device_cache={}, _lock=threading.Lock())

    def __repr__(self) -> str:
        mrope = ""
        if self.mrope_section is not None:
            kind = "interleaved" if self.mrope_interleaved else "sectioned"
            mrope = f", mrope_section={list(self.mrope_section)} ({kind})"
        return (
            f"RopeParams(rope_type={self.rope_type!r}, rope_dim={self.rope_dim}, "
            f"cos_sin_scale={self.cos_sin_scale:.6g}, "
            f"softmax_scale_factor={self.softmax_scale_factor:.6g}"
            + ("" if self.seq_len_threshold is None else f", seq_len_threshold={self.seq_len_threshold}")
            + mrope
            + ")"
        )


class RopeTracker:
    """Hands out the params transformers' ``dynamic_rope_update`` would use, call by call.

    transformers does not recompute dynamic NTK for every length: it recomputes only when a
    sequence grows past the longest one seen so far (so a shorter sequence that follows a
    long one keeps the long one's frequencies), and resets to the original frequencies
    when a sequence is back within ``max_position_embeddings``. LongRoPE has no memory: it
    picks the short or long set by the current length. This object keeps that state on the
    host; the kernel call is the same whatever it returns.

    Example::

        tracker = RopeTracker(RopeParams.from_config(cfg))
        params = tracker.update(int(positions.max()) + 1)
        apply_rope_(q, k, positions, params)
    """

    def __init__(self, params: RopeParams) -> None:
        """Args: params: the model's params as constructed (their initial state)."""
        if not isinstance(params, RopeParams):
            raise TypeError(f"params must be a RopeParams, got {type(params).__name__}")
        self.initial = params
        self.current = params
        self.original_max_seq_len = params.seq_len_threshold
        self.max_seq_len_cached = params.seq_len_threshold

    def update(self, seq_len: int) -> RopeParams:
        """The params for a forward pass whose largest position id is ``seq_len - 1``."""
        n = check_seq_len("seq_len", seq_len)
        params = self.initial
        if not params.is_seq_len_dependent:
            return params
        if params.rope_type != "dynamic":
            self.current = params.for_seq_len(n)
            return self.current
        if n > self.max_seq_len_cached:  # growth: recompute for this length
            self.current = params.for_seq_len(n)
            self.max_seq_len_cached = n
        if n < self.original_max_seq_len and self.max_seq_len_cached > self.original_max_seq_len:
            self.current = params  # back within the original length: reset
            self.max_seq_len_cached = self.original_max_seq_len
        return self.current
