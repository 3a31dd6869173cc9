"""Host-side rope math: turn a model's rope settings into ``inv_freq`` and scale factors.

Everything here runs once per model on the CPU, in the same float32 torch operations
as the reference implementations, so the numbers match theirs bit for bit. The result,
:class:`RopeParams`, is immutable; the only thing it ever copies is ``inv_freq``, once per
device, on first use.
"""

from __future__ import annotations

import functools
import math
import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = [
    "RopeParams",
    "RopeTracker",
    "longrope_attention_factor",
    "yarn_hf_correction_range",
    "yarn_find_correction_dim",
    "yarn_find_correction_range",
    "yarn_get_mscale",
    "yarn_linear_ramp_mask",
]


# --------------------------------------------------------------------------------------
# YaRN helpers, as the DeepSeek-V2 module defines them (float64 Python scalars for the
# range and mscale; float32 torch for the ramp, as in the source).
# --------------------------------------------------------------------------------------
def yarn_find_correction_dim(
    num_rotations: float, dim: int, base: float = 10000, max_position_embeddings: int = 2048
) -> float:
    """Dimension index (fractional) whose wavelength makes ``num_rotations`` turns over
    ``max_position_embeddings`` positions."""
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (
        2 * math.log(base)
    )


def yarn_find_correction_range(
    low_rot: float, high_rot: float, dim: int, base: float = 10000, max_position_embeddings: int = 2048
) -> Tuple[int, int]:
    """``(low, high)`` dimension indices of the ramp, floored/ceiled and clamped to ``[0, dim-1]``."""
    low = math.floor(yarn_find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(yarn_find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's magnitude factor ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_linear_ramp_mask(low: float, high: float, dim: int) -> torch.Tensor:
    """float32 ``[dim]`` ramp: 0 up to ``low``, 1 from ``high``, linear between.
    ``high`` is nudged by 0.001 when equal to ``low`` so the ramp stays finite."""
    if low == high:
        high += 0.001
    linear = (torch.arange(dim, dtype=torch.float32) - low) / (high - low)
    return torch.clamp(linear, 0, 1)


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    """float32 ``1 / base**(2i/dim)``, ``[dim // 2]``, computed as the references do."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _check_rope_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim (the rotary dimension) must be a positive even integer, got {dim}")
    return dim


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _check_number(name: str, value: Any) -> float:
    """A finite real number (``bool`` refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_seq_len(seq_len: Any) -> int:
    """A sequence length: a non-negative integer (Python int, numpy int or 0-dim int tensor)."""
    if isinstance(seq_len, bool):
        raise TypeError("seq_len must be an integer, got bool")
    if isinstance(seq_len, torch.Tensor):
        if seq_len.numel() != 1 or seq_len.is_floating_point() or seq_len.is_complex():
            raise TypeError(f"seq_len must be an integer scalar, got a tensor of shape {tuple(seq_len.shape)}")
        seq_len = int(seq_len.item())
    try:
        n = operator.index(seq_len)
    except TypeError:
        raise TypeError(f"seq_len must be an integer, got {type(seq_len).__name__}") from None
    if n < 0:
        raise ValueError(f"seq_len must be >= 0, got {n}")
    return n


def _pos_freqs(dim: int, base: float) -> torch.Tensor:
    """float32 ``base**(2i/dim)``, ``[dim // 2]`` (the wavelength / 2pi of each pair)."""
    return base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def yarn_hf_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_max_position_embeddings: float,
    truncate: bool = True,
) -> Tuple[float, float]:
    """YaRN ramp bounds as transformers computes them: like :func:`yarn_find_correction_range`
    but the floor/ceil is skipped when ``truncate`` is False (gpt-oss), leaving fractional
    bounds. Both are clamped to ``[0, dim - 1]``."""
    low = yarn_find_correction_dim(beta_fast, dim, base, original_max_position_embeddings)
    high = yarn_find_correction_dim(beta_slow, dim, base, original_max_position_embeddings)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def longrope_attention_factor(factor: float, original_max_position_embeddings: float) -> float:
    """LongRoPE's default cos/sin factor ``sqrt(1 + ln(factor) / ln(original_max))``
    (1 when ``factor <= 1``)."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))


# --------------------------------------------------------------------------------------
# The params object
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RopeParams:
    """Everything the kernel needs to know about a model's rope, computed once on the host.

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
    _seq_len_rule: Optional[Callable[[int], "RopeParams"]] = field(
        default=None, repr=False, compare=False
    )
    _device_cache: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        inv = self.inv_freq
        if not isinstance(inv, torch.Tensor):
            raise TypeError(f"inv_freq must be a torch.Tensor, got {type(inv).__name__}")
        _check_rope_dim(self.rope_dim)
        if inv.shape != (self.rope_dim // 2,):
            raise ValueError(
                f"inv_freq must have shape ({self.rope_dim // 2},) for rope_dim={self.rope_dim}, "
                f"got {tuple(inv.shape)}"
            )
        if not torch.isfinite(inv).all():
            raise ValueError("inv_freq must be finite")
        for name in ("cos_sin_scale", "softmax_scale_factor"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
        # Own a private float32 CPU copy so later edits to the caller's tensor change nothing.
        object.__setattr__(
            self, "inv_freq", inv.detach().to(device="cpu", dtype=torch.float32).clone()
        )
        if self.seq_len_threshold is not None:
            object.__setattr__(self, "seq_len_threshold", _check_seq_len(self.seq_len_threshold))
        object.__setattr__(self, "cos_sin_scale", float(self.cos_sin_scale))
        object.__setattr__(self, "softmax_scale_factor", float(self.softmax_scale_factor))

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def default(cls, dim: int, base: float = 10000.0) -> "RopeParams":
        """Plain RoPE: ``inv_freq[i] = 1 / base**(2i/dim)``, no scaling.

        Args:
            dim: rotary dimension (even).
            base: rope theta.
        """
        _check_rope_dim(dim)
        base = _check_positive("base", base)
        return cls(_base_inv_freq(dim, base), dim, 1.0, 1.0, "default")

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
        """YaRN as DeepSeek-V2/V3 define it (``DeepseekV2YarnRotaryEmbedding``).

        ``inv_freq`` blends the interpolated ``freq_extra / scaling_factor`` and the
        extrapolated ``freq_extra`` with a linear ramp over the correction range of
        ``beta_fast``/``beta_slow``. cos/sin are scaled by
        ``get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)`` and the attention softmax
        scale by ``get_mscale(s, mscale_all_dim) ** 2``.
        """
        _check_rope_dim(dim)
        base = _check_positive("base", base)
        s = _check_positive("scaling_factor", scaling_factor)
        omax = _check_positive("original_max_position_embeddings", original_max_position_embeddings)
        beta_fast = _check_positive("beta_fast", beta_fast)
        beta_slow = _check_positive("beta_slow", beta_slow)
        for name, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError(f"{name} must be a finite number, got {v!r}")

        freq_extra = _base_inv_freq(dim, base)
        freq_inter = 1.0 / (s * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        low, high = yarn_find_correction_range(beta_fast, beta_slow, dim, base, omax)
        extra_mask = 1.0 - yarn_linear_ramp_mask(low, high, dim // 2)
        inv_freq = freq_inter * (1 - extra_mask) + freq_extra * extra_mask
        cos_sin_scale = yarn_get_mscale(s, mscale) / yarn_get_mscale(s, mscale_all_dim)
        softmax_factor = yarn_get_mscale(s, mscale_all_dim) ** 2
        return cls(inv_freq, dim, cos_sin_scale, softmax_factor, "yarn")

    # ---- transformers' variants ---------------------------------------------------------
    @classmethod
    def linear(cls, dim: int, base: float = 10000.0, factor: float = 1.0) -> "RopeParams":
        """Linear scaling / position interpolation: ``inv_freq[i] = 1 / (base**(2i/dim)) / factor``.

        Equivalent to dividing every position by ``factor``. No cos/sin or softmax change.

        Args:
            dim: rotary dimension (even).
            base: rope theta.
            factor: interpolation factor (new context / trained context).
        """
        _check_rope_dim(dim)
        base = _check_positive("base", base)
        factor = _check_positive("factor", factor)
        return cls(_base_inv_freq(dim, base) / factor, dim, 1.0, 1.0, "linear")

    @classmethod
    def ntk(cls, dim: int, base: float = 10000.0, factor: float = 1.0) -> "RopeParams":
        """Static NTK-aware scaling: plain RoPE with ``base * factor**(dim / (dim - 2))``.

        The lowest frequency is stretched by exactly ``factor`` while the highest is kept.
        (transformers has no static ``"ntk"`` type; this is the fixed-length form of
        :meth:`dynamic`, which equals ``ntk(dim, base, a)`` once
        ``factor * seq_len / max_position_embeddings - (factor - 1) == a``.)

        Args:
            dim: rotary dimension (even, > 2).
            base: rope theta.
            factor: context extension factor.
        """
        _check_rope_dim(dim)
        if dim == 2:
            raise ValueError("NTK scaling needs dim > 2 (its exponent is dim / (dim - 2))")
        base = _check_positive("base", base)
        factor = _check_positive("factor", factor)
        scaled = base * factor ** (dim / (dim - 2))
        return cls(_base_inv_freq(dim, scaled), dim, 1.0, 1.0, "ntk")

    @classmethod
    def dynamic(
        cls, dim: int, base: float = 10000.0, factor: float = 1.0, max_position_embeddings: int = 2048
    ) -> "RopeParams":
        """Dynamic NTK scaling (transformers' ``"dynamic"``): the base grows with the sequence.

        For a current length ``L`` the base is
        ``base * (factor * L' / max_pos - (factor - 1)) ** (dim / (dim - 2))`` with
        ``L' = max(L, max_pos)``, so up to ``max_position_embeddings`` it is plain RoPE.
        The params returned are those for ``L <= max_position_embeddings`` (what a model
        starts with); :meth:`for_seq_len` gives the params for a longer sequence and
        :class:`RopeTracker` reproduces transformers' grow-and-reset caching of them.

        Args:
            dim: rotary dimension (even, > 2).
            base: rope theta.
            factor: scaling factor.
            max_position_embeddings: the length up to which nothing is scaled.
        """
        _check_rope_dim(dim)
        if dim == 2:
            raise ValueError("dynamic NTK scaling needs dim > 2 (its exponent is dim / (dim - 2))")
        base = _check_positive("base", base)
        factor = _check_number("factor", factor)
        max_pos = _check_seq_len(max_position_embeddings)
        if max_pos == 0:
            raise ValueError("max_position_embeddings must be > 0")

        def at(seq_len: Optional[int]) -> torch.Tensor:
            length = max_pos if seq_len is None else max(seq_len, max_pos)
            new_base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            if isinstance(new_base, complex) or not math.isfinite(new_base) or new_base <= 0:
                raise ValueError(
                    f"dynamic NTK base is not a positive number for factor={factor} at seq_len={length}"
                )
            return _base_inv_freq(dim, new_base)

        @functools.lru_cache(maxsize=16)
        def rule(seq_len: int) -> "RopeParams":
            if seq_len <= max_pos:
                return params
            return cls(at(seq_len), dim, 1.0, 1.0, "dynamic", max_pos, rule)

        params = cls(at(None), dim, 1.0, 1.0, "dynamic", max_pos, rule)
        return params

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
        """YaRN as transformers computes it (``_compute_yarn_parameters``, v5).

        Differences from the DeepSeek flavour (:meth:`yarn`):

        * ``factor=None`` means ``max_position_embeddings / original_max_position_embeddings``;
          a given ``factor`` is used as is (transformers 4.4x-4.5x instead *replaced* it by
          that ratio whenever ``original_max_position_embeddings`` was in the config).
        * ``original_max_position_embeddings=None`` falls back to ``max_position_embeddings``.
        * ``beta_fast``/``beta_slow`` that are None *or 0* become 32 / 1.
        * cos/sin factor: ``attention_factor`` if given; else
          ``get_mscale(f, mscale) / get_mscale(f, mscale_all_dim)`` when *both* are non-zero;
          else ``get_mscale(f)`` (``mscale`` alone is ignored).
        * ``truncate=False`` keeps the ramp bounds fractional (gpt-oss).

        ``softmax_scale_factor`` is ``get_mscale(f, mscale_all_dim) ** 2`` when
        ``mscale_all_dim`` is non-zero and ``softmax_mscale`` is True -- what DeepSeek-V2/V3
        (and the other MLA models of transformers) multiply their softmax scale by -- and 1
        otherwise (a Llama/Qwen attention never changes its softmax scale).

        Args:
            dim: rotary dimension (``int(head_dim * partial_rotary_factor)``; even).
            base: rope theta.
            factor: scaling factor, or None to derive it from the two lengths.
            original_max_position_embeddings: pre-training context length.
            max_position_embeddings: extended context length (needed only when ``factor`` or
                ``original_max_position_embeddings`` is None).
            attention_factor: explicit cos/sin factor.
            beta_fast, beta_slow: ramp bounds in rotations (defaults 32 / 1).
            mscale, mscale_all_dim: DeepSeek's magnitude coefficients.
            truncate: floor/ceil the ramp bounds (default True).
            softmax_mscale: whether the attention applies DeepSeek's ``mscale_all_dim``
                softmax correction (True for DeepSeek-style MLA attention).
        """
        _check_rope_dim(dim)
        base = _check_positive("base", base)
        if original_max_position_embeddings is None:
            if max_position_embeddings is None:
                raise ValueError(
                    "yarn needs original_max_position_embeddings (or max_position_embeddings to fall back to)"
                )
            original_max_position_embeddings = max_position_embeddings
        omax = _check_positive("original_max_position_embeddings", original_max_position_embeddings)
        if factor is None:
            if max_position_embeddings is None:
                raise ValueError("yarn needs factor (or max_position_embeddings to derive it from)")
            factor = _check_positive("max_position_embeddings", max_position_embeddings) / omax
        factor = _check_positive("factor", factor)
        beta_fast = _check_positive("beta_fast", beta_fast or 32)
        beta_slow = _check_positive("beta_slow", beta_slow or 1)
        mscale = None if mscale is None else _check_number("mscale", mscale)
        mscale_all_dim = None if mscale_all_dim is None else _check_number("mscale_all_dim", mscale_all_dim)

        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
            else:
                attention_factor = yarn_get_mscale(factor)
        attention_factor = _check_number("attention_factor", attention_factor)
        use_softmax = bool(softmax_mscale and mscale_all_dim)
        softmax_factor = yarn_get_mscale(factor, mscale_all_dim) ** 2 if use_softmax else 1.0

        pos_freqs = _pos_freqs(dim, base)
        extrapolation = 1.0 / pos_freqs
        interpolation = 1.0 / (factor * pos_freqs)
        low, high = yarn_hf_correction_range(beta_fast, beta_slow, dim, base, omax, bool(truncate))
        keep = 1 - yarn_linear_ramp_mask(low, high, dim // 2)
        inv_freq = interpolation * (1 - keep) + extrapolation * keep
        return cls(inv_freq, dim, attention_factor, softmax_factor, "yarn")

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
        """Llama 3.1's frequency-band scaling.

        With ``wavelen = 2pi / inv_freq``: wavelengths below
        ``original_max / high_freq_factor`` are kept, those above
        ``original_max / low_freq_factor`` are divided by ``factor``, and in between
        ``inv_freq * ((1 - s) / factor + s)`` with
        ``s = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)``.

        Args:
            dim: rotary dimension (even).
            base: rope theta.
            factor: scaling of the low-frequency band.
            low_freq_factor, high_freq_factor: band edges (``high > low``).
            original_max_position_embeddings: pre-training context length.
        """
        _check_rope_dim(dim)
        base = _check_positive("base", base)
        factor = _check_positive("factor", factor)
        low_ff = _check_number("low_freq_factor", low_freq_factor)
        high_ff = _check_number("high_freq_factor", high_freq_factor)
        if not high_ff > low_ff:
            raise ValueError(
                f"llama3 needs high_freq_factor > low_freq_factor, got {high_ff} and {low_ff}"
            )
        omax = _check_positive("original_max_position_embeddings", original_max_position_embeddings)

        inv_freq = _base_inv_freq(dim, base)
        wavelen = 2 * math.pi / inv_freq
        long_cut = omax / low_ff  # wavelengths above this are fully interpolated
        short_cut = omax / high_ff  # wavelengths below this are untouched
        scaled = torch.where(wavelen > long_cut, inv_freq / factor, inv_freq)
        s = (omax / wavelen - low_ff) / (high_ff - low_ff)
        blended = (1 - s) * scaled / factor + s * scaled
        between = (wavelen >= short_cut) & (wavelen <= long_cut)
        return cls(torch.where(between, blended, scaled), dim, 1.0, 1.0, "llama3")

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
        """LongRoPE (Phi-3): a rescale factor per frequency, short or long set by length.

        ``inv_freq[i] = 1 / (ext[i] * base**(2i/dim))`` with ``ext = short_factor`` while the
        sequence is at most ``original_max_position_embeddings`` long and ``long_factor``
        beyond. The params returned are the short ones (what a model starts with);
        :meth:`for_seq_len` (or a :class:`RopeTracker`) switches. cos/sin are scaled by
        ``attention_factor``, default ``sqrt(1 + ln(f) / ln(original_max))`` (1 if
        ``f <= 1``) with ``f = factor`` or, when None, ``max_pos / original_max``.

        Args:
            dim: rotary dimension (even).
            base: rope theta.
            short_factor, long_factor: ``dim // 2`` positive numbers each.
            original_max_position_embeddings: the switch length.
            factor: extension factor (only feeds the default attention factor).
            max_position_embeddings: extended length (used when ``factor`` is None).
            attention_factor: explicit cos/sin factor.
        """
        _check_rope_dim(dim)
        base = _check_positive("base", base)
        omax_f = _check_positive("original_max_position_embeddings", original_max_position_embeddings)
        omax = int(omax_f)
        lists = {}
        for name, values in (("short_factor", short_factor), ("long_factor", long_factor)):
            if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, torch.Tensor)):
                raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
            vals = [_check_positive(f"{name}[{i}]", float(v) if isinstance(v, torch.Tensor) else v)
                    for i, v in enumerate(values)]
            if len(vals) != dim // 2:
                raise ValueError(f"{name} must have dim // 2 = {dim // 2} entries, got {len(vals)}")
            lists[name] = vals
        if factor is None:
            if max_position_embeddings is None and attention_factor is None:
                raise ValueError("longrope needs factor, max_position_embeddings or attention_factor")
            if max_position_embeddings is not None:
                factor = _check_positive("max_position_embeddings", max_position_embeddings) / omax_f
        if attention_factor is None:
            attention_factor = longrope_attention_factor(_check_positive("factor", factor), omax_f)
        attention_factor = _check_number("attention_factor", attention_factor)

        shape = _pos_freqs(dim, base)

        def make(ext: Sequence[float]) -> torch.Tensor:
            return 1.0 / (torch.tensor(ext, dtype=torch.float32) * shape)

        long_params: Dict[str, RopeParams] = {}

        def rule(seq_len: int) -> "RopeParams":
            if seq_len <= omax:
                return short
            if "p" not in long_params:
                long_params["p"] = cls(
                    make(lists["long_factor"]), dim, attention_factor, 1.0, "longrope", omax, rule
                )
            return long_params["p"]

        short = cls(make(lists["short_factor"]), dim, attention_factor, 1.0, "longrope", omax, rule)
        return short

    @classmethod
    def proportional(
        cls, head_dim: int, base: float = 10000.0, factor: float = 1.0, partial_rotary_factor: float = 1.0
    ) -> "RopeParams":
        """Proportional RoPE (transformers' ``"proportional"``, Gemma 4): the first
        ``int(partial_rotary_factor * head_dim // 2)`` pairs get ``1 / base**(2i/head_dim)``
        (exponent over the *whole* head), the remaining pairs frequency 0 (left unrotated);
        everything divided by ``factor``. ``rope_dim`` is ``head_dim``.
        """
        _check_rope_dim(head_dim)
        base = _check_positive("base", base)
        factor = _check_positive("factor", factor)
        prf = _check_number("partial_rotary_factor", partial_rotary_factor)
        if not 0.0 <= prf <= 1.0:
            raise ValueError(f"partial_rotary_factor must be in [0, 1], got {prf}")
        angles = int(prf * head_dim // 2)
        rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / head_dim))
        inv_freq = torch.cat((rotated, torch.zeros(head_dim // 2 - angles, dtype=torch.float32)))
        return cls(inv_freq / factor, head_dim, 1.0, 1.0, "proportional")

    @classmethod
    def from_config(cls, config: Any, *, layer_type: Optional[str] = None) -> "RopeParams":
        """Params for a model config, as the installed transformers would compute them.

        ``config`` is a transformers ``PretrainedConfig`` (anything with ``to_dict()``), a
        plain dict (a parsed config.json) or a path to a config.json (or its folder). Reads
        the newer ``rope_parameters`` or the older ``rope_scaling`` + ``rope_theta``. See
        :func:`yarn_triton.config.rope_params_from_config` for the details and errors.
        """
        from .config import rope_params_from_config

        return rope_params_from_config(config, layer_type=layer_type)

    # ---- sequence-length dependence -----------------------------------------------------
    @property
    def is_seq_len_dependent(self) -> bool:
        """True for methods (dynamic, longrope) whose params change with the sequence length."""
        return self._seq_len_rule is not None

    def for_seq_len(self, seq_len: int) -> "RopeParams":
        """The params for a sequence ``seq_len`` long (``max position id + 1``).

        Stateless: dynamic NTK gives the params for exactly ``max(seq_len, max_pos)``;
        longrope the short set up to ``original_max_position_embeddings`` and the long set
        beyond. Every other method returns ``self``. Results are cached, so asking again
        returns the same object (and its device copy of ``inv_freq``).
        """
        n = _check_seq_len(seq_len)
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
        if cached is None:
            with self._lock:
                cached = self._device_cache.get(key)
                if cached is None:
                    cached = self.inv_freq.to(device)
                    self._device_cache[key] = cached
        return cached

    def __repr__(self) -> str:
        return (
            f"RopeParams(rope_type={self.rope_type!r}, rope_dim={self.rope_dim}, "
            f"cos_sin_scale={self.cos_sin_scale:.6g}, "
            f"softmax_scale_factor={self.softmax_scale_factor:.6g}"
            + ("" if self.seq_len_threshold is None else f", seq_len_threshold={self.seq_len_threshold}")
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
        n = _check_seq_len(seq_len)
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
