"""One function per rope variant: the host math that turns a model's rope settings into
``inv_freq`` and scale factors.

Each ``*_spec`` function checks its arguments (``TypeError`` / ``ValueError`` naming the
argument, before any arithmetic) and returns a :class:`RopeSpec`: the numbers
:class:`~yarn_triton.rope.RopeParams` is built from. ``RopeParams.yarn(...)`` and its
siblings are one-line wrappers around these functions; use them unless you want the raw
numbers.

The math runs in the same float32 torch operations, in the same order, as the reference
implementations (DeepSeek's modules, transformers' ``ROPE_INIT_FUNCTIONS``), so the results
match theirs bit for bit. This module sits below :mod:`yarn_triton.rope` and
:mod:`yarn_triton.config_parsing` in the import graph and imports neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ._validate import (
    FLOAT32_MAX,
    check_base,
    check_length,
    check_nonnegative,
    check_number,
    check_positive,
    check_rope_dim,
)

__all__ = [
    "RopeSpec",
    "SeqLenRule",
    "default_spec",
    "dynamic_spec",
    "linear_spec",
    "llama3_spec",
    "longrope_attention_factor",
    "longrope_spec",
    "ntk_spec",
    "proportional_spec",
    "yarn_find_correction_dim",
    "yarn_find_correction_range",
    "yarn_get_mscale",
    "yarn_hf_correction_range",
    "yarn_hf_spec",
    "yarn_linear_ramp_mask",
    "yarn_spec",
]


# --------------------------------------------------------------------------------------
# What a variant returns
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SeqLenRule:
    """How a variant's ``inv_freq`` changes with the current sequence length.

    Attributes:
        threshold: up to this length (inclusive) the initial ``inv_freq`` holds.
        inv_freq_at: ``inv_freq`` for a length above ``threshold``.
        per_length: True when every length above the threshold has its own ``inv_freq``
            (dynamic NTK); False when they all share one (LongRoPE's long set).
    """

    threshold: int
    inv_freq_at: Callable[[int], torch.Tensor]
    per_length: bool


@dataclass(frozen=True, eq=False)
class RopeSpec:
    """The numbers one variant computes, in :class:`~yarn_triton.rope.RopeParams`' terms.

    Attributes:
        inv_freq: float32 ``[rope_dim // 2]``.
        rope_dim: rotated channels per head (even).
        cos_sin_scale: factor on cos and sin.
        softmax_scale_factor: factor on the attention's ``1/sqrt(head_dim)``.
        rope_type: the variant's name.
        seq_len_rule: for sequence-length dependent variants, how ``inv_freq`` changes.
    """

    inv_freq: torch.Tensor
    rope_dim: int
    cos_sin_scale: float = 1.0
    softmax_scale_factor: float = 1.0
    rope_type: str = "default"
    seq_len_rule: Optional[SeqLenRule] = None


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


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    """float32 ``1 / base**(2i/dim)``, ``[dim // 2]``, computed as the references do."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def _pos_freqs(dim: int, base: float) -> torch.Tensor:
    """float32 ``base**(2i/dim)``, ``[dim // 2]`` (the wavelength / 2pi of each pair)."""
    return base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def _scale(what: str, inputs: str, compute: Callable[[], float]) -> float:
    """Evaluate a cos/sin or softmax factor; one that overflows or is not > 0 is an error
    naming the arguments it came from."""
    try:
        value = compute()
    except (OverflowError, ZeroDivisionError):
        value = math.inf
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{inputs} give a {what} of {value}; it must be a finite number > 0")
    return value


def _finite(inv_freq: torch.Tensor, inputs: str) -> torch.Tensor:
    """``inv_freq`` if every entry is finite; else an error naming the arguments it came
    from (e.g. a factor so small that float32 overflows when dividing by it)."""
    if not torch.isfinite(inv_freq).all():
        raise ValueError(f"{inputs} give a non-finite inv_freq in float32; use values of a sensible size")
    return inv_freq


def _correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, omax: float, truncate: Optional[bool]
) -> Tuple[float, float]:
    """YaRN's ramp bounds (DeepSeek's when ``truncate`` is None, else transformers'); values
    that make a logarithm's argument 0 or infinite are an error naming them."""
    try:
        if truncate is None:
            return yarn_find_correction_range(beta_fast, beta_slow, dim, base, omax)
        return yarn_hf_correction_range(beta_fast, beta_slow, dim, base, omax, truncate)
    except (ValueError, OverflowError, ZeroDivisionError):
        raise ValueError(
            f"beta_fast={beta_fast}, beta_slow={beta_slow}, original_max_position_embeddings={omax} are "
            "too far apart for YaRN's correction range (a logarithm's argument under- or overflows)"
        ) from None


def _ntk_base(base: float, ratio: float, dim: int) -> float:
    """``base * ratio ** (dim / (dim - 2))``, the NTK-scaled base; ``inf`` if it overflows,
    ``nan`` if it is not a real number (negative ratio)."""
    try:
        scaled = base * ratio ** (dim / (dim - 2))
    except (OverflowError, ZeroDivisionError):
        return math.inf
    return math.nan if isinstance(scaled, complex) else scaled


# --------------------------------------------------------------------------------------
# The variants
# --------------------------------------------------------------------------------------
def default_spec(dim: int, base: float = 10000.0) -> RopeSpec:
    """Plain RoPE: ``inv_freq[i] = 1 / base**(2i/dim)``, no scaling.

    Args:
        dim: rotary dimension (even).
        base: rope theta (> 1).
    """
    dim = check_rope_dim("dim", dim)
    base = check_base("base", base)
    return RopeSpec(_finite(_base_inv_freq(dim, base), f"base={base}"), dim, 1.0, 1.0, "default")


def yarn_spec(
    dim: int,
    base: float = 10000.0,
    scaling_factor: float = 1.0,
    original_max_position_embeddings: int = 4096,
    beta_fast: float = 32,
    beta_slow: float = 1,
    mscale: float = 1,
    mscale_all_dim: float = 0,
) -> RopeSpec:
    """YaRN as DeepSeek-V2/V3 define it (``DeepseekV2YarnRotaryEmbedding``).

    ``inv_freq`` blends the interpolated ``freq_extra / scaling_factor`` and the
    extrapolated ``freq_extra`` with a linear ramp over the correction range of
    ``beta_fast``/``beta_slow``. cos/sin are scaled by
    ``get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)`` and the attention softmax
    scale by ``get_mscale(s, mscale_all_dim) ** 2``.

    Args:
        dim: rotary dimension (even).
        base: rope theta (> 1).
        scaling_factor: context extension factor ``s`` (> 0).
        original_max_position_embeddings: pre-training context length (> 0).
        beta_fast, beta_slow: ramp bounds in rotations (> 0).
        mscale, mscale_all_dim: DeepSeek's magnitude coefficients (>= 0).
    """
    dim = check_rope_dim("dim", dim)
    base = check_base("base", base)
    s = check_positive("scaling_factor", scaling_factor)
    omax = check_positive("original_max_position_embeddings", original_max_position_embeddings)
    beta_fast = check_positive("beta_fast", beta_fast)
    beta_slow = check_positive("beta_slow", beta_slow)
    check_nonnegative("mscale", mscale)
    check_nonnegative("mscale_all_dim", mscale_all_dim)

    freq_extra = _base_inv_freq(dim, base)
    freq_inter = 1.0 / (s * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low, high = _correction_range(beta_fast, beta_slow, dim, base, omax, None)
    extra_mask = 1.0 - yarn_linear_ramp_mask(low, high, dim // 2)
    inv_freq = _finite(freq_inter * (1 - extra_mask) + freq_extra * extra_mask, f"base={base}, scaling_factor={s}")
    inputs = f"scaling_factor={s}, mscale={mscale}, mscale_all_dim={mscale_all_dim}"
    cos_sin_scale = _scale(
        "cos/sin scale", inputs, lambda: yarn_get_mscale(s, mscale) / yarn_get_mscale(s, mscale_all_dim)
    )
    softmax_factor = _scale("softmax scale factor", inputs, lambda: yarn_get_mscale(s, mscale_all_dim) ** 2)
    return RopeSpec(inv_freq, dim, cos_sin_scale, softmax_factor, "yarn")


def linear_spec(dim: int, base: float = 10000.0, factor: float = 1.0) -> RopeSpec:
    """Linear scaling / position interpolation: ``inv_freq[i] = 1 / (base**(2i/dim)) / factor``.

    Equivalent to dividing every position by ``factor``. No cos/sin or softmax change.

    Args:
        dim: rotary dimension (even).
        base: rope theta (> 1).
        factor: interpolation factor (new context / trained context; > 0).
    """
    dim = check_rope_dim("dim", dim)
    base = check_base("base", base)
    factor = check_positive("factor", factor)
    inv_freq = _finite(_base_inv_freq(dim, base) / factor, f"base={base}, factor={factor}")
    return RopeSpec(inv_freq, dim, 1.0, 1.0, "linear")


def ntk_spec(dim: int, base: float = 10000.0, factor: float = 1.0) -> RopeSpec:
    """Static NTK-aware scaling: plain RoPE with ``base * factor**(dim / (dim - 2))``.

    The lowest frequency is stretched by exactly ``factor`` while the highest is kept.
    (transformers has no static ``"ntk"`` type; this is the fixed-length form of
    :func:`dynamic_spec`, which equals ``ntk_spec(dim, base, a)`` once
    ``factor * seq_len / max_position_embeddings - (factor - 1) == a``.)

    Args:
        dim: rotary dimension (even, > 2).
        base: rope theta (> 1).
        factor: context extension factor (> 0; the scaled base must stay a finite number > 1).
    """
    dim = check_rope_dim("dim", dim)
    if dim == 2:
        raise ValueError("dim must be > 2 for NTK scaling (its exponent is dim / (dim - 2)), got 2")
    base = check_base("base", base)
    factor = check_positive("factor", factor)
    scaled = _ntk_base(base, factor, dim)
    if not 1 < scaled <= FLOAT32_MAX:
        raise ValueError(
            f"factor={factor} gives an NTK base of {scaled} (base={base}, dim={dim}); "
            f"it must be a finite number > 1 that float32 can hold (<= {FLOAT32_MAX:.4g})"
        )
    return RopeSpec(_base_inv_freq(dim, scaled), dim, 1.0, 1.0, "ntk")


def dynamic_spec(
    dim: int, base: float = 10000.0, factor: float = 1.0, max_position_embeddings: int = 2048
) -> RopeSpec:
    """Dynamic NTK scaling (transformers' ``"dynamic"``): the base grows with the sequence.

    For a current length ``L`` the base is
    ``base * (factor * L' / max_pos - (factor - 1)) ** (dim / (dim - 2))`` with
    ``L' = max(L, max_pos)``, so up to ``max_position_embeddings`` it is plain RoPE. The
    spec's ``inv_freq`` is the one for ``L <= max_position_embeddings`` (what a model starts
    with); its :class:`SeqLenRule` gives those of longer sequences.

    Args:
        dim: rotary dimension (even, > 2).
        base: rope theta (> 1).
        factor: scaling factor (> 0).
        max_position_embeddings: the length up to which nothing is scaled (an integer > 0).
    """
    dim = check_rope_dim("dim", dim)
    if dim == 2:
        raise ValueError("dim must be > 2 for dynamic NTK scaling (its exponent is dim / (dim - 2)), got 2")
    base = check_base("base", base)
    factor = check_positive("factor", factor)
    max_pos = check_length("max_position_embeddings", max_position_embeddings)

    def at(seq_len: Optional[int]) -> torch.Tensor:
        length = max_pos if seq_len is None else max(seq_len, max_pos)
        try:
            ratio = (factor * length / max_pos) - (factor - 1)
        except OverflowError:  # an int length too large for a float
            ratio = math.inf
        new_base = _ntk_base(base, ratio, dim)
        if not 1 < new_base <= FLOAT32_MAX:
            raise ValueError(
                f"seq_len={length} gives a dynamic NTK base of {new_base} (base={base}, factor={factor}, "
                f"max_position_embeddings={max_pos}); it must be a finite number > 1 that float32 "
                f"can hold (<= {FLOAT32_MAX:.4g})"
            )
        return _base_inv_freq(dim, new_base)

    rule = SeqLenRule(threshold=max_pos, inv_freq_at=at, per_length=True)
    return RopeSpec(at(None), dim, 1.0, 1.0, "dynamic", rule)


def yarn_hf_spec(
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
) -> RopeSpec:
    """YaRN as transformers computes it (``_compute_yarn_parameters``, v5).

    Differences from the DeepSeek flavour (:func:`yarn_spec`):

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
        base: rope theta (> 1).
        factor: scaling factor (> 0), or None to derive it from the two lengths.
        original_max_position_embeddings: pre-training context length (> 0).
        max_position_embeddings: extended context length (needed only when ``factor`` or
            ``original_max_position_embeddings`` is None).
        attention_factor: explicit cos/sin factor (> 0).
        beta_fast, beta_slow: ramp bounds in rotations (defaults 32 / 1).
        mscale, mscale_all_dim: DeepSeek's magnitude coefficients (>= 0).
        truncate: floor/ceil the ramp bounds (default True).
        softmax_mscale: whether the attention applies DeepSeek's ``mscale_all_dim``
            softmax correction (True for DeepSeek-style MLA attention).
    """
    dim = check_rope_dim("dim", dim)
    base = check_base("base", base)
    if max_position_embeddings is not None:
        check_positive("max_position_embeddings", max_position_embeddings)
    if original_max_position_embeddings is None:
        if max_position_embeddings is None:
            raise ValueError(
                "yarn needs original_max_position_embeddings (or max_position_embeddings to fall back to)"
            )
        original_max_position_embeddings = max_position_embeddings
    omax = check_positive("original_max_position_embeddings", original_max_position_embeddings)
    if factor is None:
        if max_position_embeddings is None:
            raise ValueError("yarn needs factor (or max_position_embeddings to derive it from)")
        factor = check_positive("max_position_embeddings", max_position_embeddings) / omax
    factor = check_positive("factor", factor)
    beta_fast = check_positive("beta_fast", beta_fast or 32)
    beta_slow = check_positive("beta_slow", beta_slow or 1)
    mscale = None if mscale is None else check_nonnegative("mscale", mscale)
    mscale_all_dim = None if mscale_all_dim is None else check_nonnegative("mscale_all_dim", mscale_all_dim)

    inputs = f"factor={factor}, mscale={mscale}, mscale_all_dim={mscale_all_dim}"
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _scale(
                "cos/sin scale", inputs,
                lambda: yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim),
            )
        else:
            attention_factor = yarn_get_mscale(factor)
    attention_factor = check_positive("attention_factor", attention_factor)
    use_softmax = bool(softmax_mscale and mscale_all_dim)
    softmax_factor = (
        _scale("softmax scale factor", inputs, lambda: yarn_get_mscale(factor, mscale_all_dim) ** 2)
        if use_softmax else 1.0
    )

    pos_freqs = _pos_freqs(dim, base)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    low, high = _correction_range(beta_fast, beta_slow, dim, base, omax, bool(truncate))
    keep = 1 - yarn_linear_ramp_mask(low, high, dim // 2)
    inv_freq = _finite(interpolation * (1 - keep) + extrapolation * keep, f"base={base}, factor={factor}")
    return RopeSpec(inv_freq, dim, attention_factor, softmax_factor, "yarn")


def llama3_spec(
    dim: int,
    base: float = 500000.0,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> RopeSpec:
    """Llama 3.1's frequency-band scaling.

    With ``wavelen = 2pi / inv_freq``: wavelengths below
    ``original_max / high_freq_factor`` are kept, those above
    ``original_max / low_freq_factor`` are divided by ``factor``, and in between
    ``inv_freq * ((1 - s) / factor + s)`` with
    ``s = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)``.

    Args:
        dim: rotary dimension (even).
        base: rope theta (> 1).
        factor: scaling of the low-frequency band (> 0).
        low_freq_factor, high_freq_factor: band edges (``0 < low < high``).
        original_max_position_embeddings: pre-training context length (> 0).
    """
    dim = check_rope_dim("dim", dim)
    base = check_base("base", base)
    factor = check_positive("factor", factor)
    low_ff = check_positive("low_freq_factor", low_freq_factor)
    high_ff = check_positive("high_freq_factor", high_freq_factor)
    if not high_ff > low_ff:
        raise ValueError(
            f"llama3 needs high_freq_factor > low_freq_factor, got {high_ff} and {low_ff}"
        )
    omax = check_positive("original_max_position_embeddings", original_max_position_embeddings)

    inv_freq = _base_inv_freq(dim, base)
    wavelen = 2 * math.pi / inv_freq
    long_cut = omax / low_ff  # wavelengths above this are fully interpolated
    short_cut = omax / high_ff  # wavelengths below this are untouched
    scaled = torch.where(wavelen > long_cut, inv_freq / factor, inv_freq)
    s = (omax / wavelen - low_ff) / (high_ff - low_ff)
    blended = (1 - s) * scaled / factor + s * scaled
    between = (wavelen >= short_cut) & (wavelen <= long_cut)
    inputs = (f"base={base}, factor={factor}, low_freq_factor={low_ff}, high_freq_factor={high_ff}, "
              f"original_max_position_embeddings={omax}")
    return RopeSpec(_finite(torch.where(between, blended, scaled), inputs), dim, 1.0, 1.0, "llama3")


def _factor_list(name: str, values: Any, n: int) -> List[float]:
    """``n`` positive finite numbers from a sequence (or 1-d tensor)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, torch.Tensor)):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    vals = [check_positive(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if len(vals) != n:
        raise ValueError(f"{name} must have dim // 2 = {n} entries, got {len(vals)}")
    return vals


def longrope_spec(
    dim: int,
    base: float = 10000.0,
    short_factor: Sequence[float] = (),
    long_factor: Sequence[float] = (),
    original_max_position_embeddings: int = 4096,
    *,
    factor: Optional[float] = None,
    max_position_embeddings: Optional[int] = None,
    attention_factor: Optional[float] = None,
) -> RopeSpec:
    """LongRoPE (Phi-3): a rescale factor per frequency, short or long set by length.

    ``inv_freq[i] = 1 / (ext[i] * base**(2i/dim))`` with ``ext = short_factor`` while the
    sequence is at most ``original_max_position_embeddings`` long and ``long_factor``
    beyond. The spec's ``inv_freq`` is the short one (what a model starts with); its
    :class:`SeqLenRule` gives the long one. cos/sin are scaled by ``attention_factor``,
    default ``sqrt(1 + ln(f) / ln(original_max))`` (1 if ``f <= 1``) with ``f = factor``
    or, when None, ``max_pos / original_max``.

    Args:
        dim: rotary dimension (even).
        base: rope theta (> 1).
        short_factor, long_factor: ``dim // 2`` positive numbers each.
        original_max_position_embeddings: the switch length (> 0; > 1 when the default
            attention factor is computed, whose divisor is its logarithm).
        factor: extension factor (> 0; only feeds the default attention factor).
        max_position_embeddings: extended length (> 0; used when ``factor`` is None).
        attention_factor: explicit cos/sin factor (> 0).
    """
    dim = check_rope_dim("dim", dim)
    base = check_base("base", base)
    omax_f = check_positive("original_max_position_embeddings", original_max_position_embeddings)
    omax = int(omax_f)
    short = _factor_list("short_factor", short_factor, dim // 2)
    long = _factor_list("long_factor", long_factor, dim // 2)
    if factor is not None:
        factor = check_positive("factor", factor)
    if max_position_embeddings is not None:
        check_positive("max_position_embeddings", max_position_embeddings)
    if factor is None:
        if max_position_embeddings is None and attention_factor is None:
            raise ValueError("longrope needs factor, max_position_embeddings or attention_factor")
        if max_position_embeddings is not None:
            factor = check_positive("max_position_embeddings", max_position_embeddings) / omax_f
    if attention_factor is None:
        if factor > 1.0 and omax_f <= 1.0:
            raise ValueError(
                "original_max_position_embeddings must be > 1 for LongRoPE's default attention factor "
                f"(it divides by its logarithm), got {omax_f}; or pass attention_factor"
            )
        attention_factor = longrope_attention_factor(factor, omax_f)
    attention_factor = check_positive("attention_factor", attention_factor)

    shape = _pos_freqs(dim, base)

    def make(ext: Sequence[float], name: str) -> torch.Tensor:
        return _finite(1.0 / (torch.tensor(ext, dtype=torch.float32) * shape), f"base={base} and {name}")

    long_inv_freq = make(long, "long_factor")
    rule = SeqLenRule(threshold=omax, inv_freq_at=lambda seq_len: long_inv_freq, per_length=False)
    return RopeSpec(make(short, "short_factor"), dim, attention_factor, 1.0, "longrope", rule)


def proportional_spec(
    head_dim: int, base: float = 10000.0, factor: float = 1.0, partial_rotary_factor: float = 1.0
) -> RopeSpec:
    """Proportional RoPE (transformers' ``"proportional"``, Gemma 4): the first
    ``int(partial_rotary_factor * head_dim // 2)`` pairs get ``1 / base**(2i/head_dim)``
    (exponent over the *whole* head), the remaining pairs frequency 0 (left unrotated);
    everything divided by ``factor``. ``rope_dim`` is ``head_dim``.

    Args:
        head_dim: the attention head size (even).
        base: rope theta (> 1).
        factor: divisor of every frequency (> 0).
        partial_rotary_factor: fraction of the head that rotates, in ``[0, 1]``.
    """
    head_dim = check_rope_dim("head_dim", head_dim)
    base = check_base("base", base)
    factor = check_positive("factor", factor)
    prf = check_number("partial_rotary_factor", partial_rotary_factor)
    if not 0.0 <= prf <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in [0, 1], got {prf}")
    angles = int(prf * head_dim // 2)
    rotated = 1.0 / (base ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / head_dim))
    inv_freq = torch.cat((rotated, torch.zeros(head_dim // 2 - angles, dtype=torch.float32)))
    inv_freq = _finite(inv_freq / factor, f"base={base}, factor={factor}")
    return RopeSpec(inv_freq, head_dim, 1.0, 1.0, "proportional")
