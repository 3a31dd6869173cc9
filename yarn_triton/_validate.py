"""Argument checks shared by the rope constructors and the config reader.

Each check returns the value in the form the math uses (``float`` / ``int``) or raises
``TypeError`` (wrong kind of value) / ``ValueError`` (right kind, bad value) with a message
that starts with the argument's name and says what was expected. Nothing here imports
from the rest of the package.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

import torch

__all__ = [
    "FLOAT32_MAX",
    "MAX_ROPE_DIM",
    "check_base",
    "check_length",
    "check_nonnegative",
    "check_number",
    "check_positive",
    "check_rope_dim",
    "check_seq_len",
]


#: Largest rotary dimension accepted. Real heads are at most a few hundred channels wide;
#: the bound keeps a typo (or a huge int) from asking torch for an absurd ``arange``.
MAX_ROPE_DIM = 65536
#: Largest base the float32 math can hold (``base ** (2i/dim)`` runs in float32).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _real(name: str, value: Any) -> float:
    """``value`` as a float if it is a real number (Python, numpy or 0-dim tensor; not bool)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must be a finite number, got an integer too large for a float") from None


def check_number(name: str, value: Any) -> float:
    """A finite real number."""
    v = _real(name, value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


def check_positive(name: str, value: Any) -> float:
    """A finite real number > 0."""
    v = _real(name, value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


def check_nonnegative(name: str, value: Any) -> float:
    """A finite real number >= 0."""
    v = _real(name, value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")
    return v


def check_base(name: str, value: Any) -> float:
    """A rope base (theta): a finite real number > 1 that float32 can hold.

    ``base ** (2i / dim)`` must grow with ``i`` and ``log(base)`` is a divisor in YaRN's
    correction range, so 1 and anything below are refused; above float32's largest
    number the float32 powers would all be infinite.
    """
    v = _real(name, value)
    if not math.isfinite(v) or v <= 1:
        raise ValueError(f"{name} must be a finite number > 1, got {v}")
    if v > FLOAT32_MAX:
        raise ValueError(
            f"{name} must be a finite number > 1 that float32 can hold (<= {FLOAT32_MAX:.4g}), got {v}"
        )
    return v


def check_rope_dim(name: str, value: Any) -> int:
    """A rotary dimension: a positive even ``int`` up to :data:`MAX_ROPE_DIM`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    n = int(value)
    if n <= 0 or n % 2 or n > MAX_ROPE_DIM:
        raise ValueError(
            f"{name} (the rotary dimension) must be a positive even integer <= {MAX_ROPE_DIM}, got {n}"
        )
    return n


def check_seq_len(name: str, value: Any) -> int:
    """A sequence length: an integer >= 0 (Python int, numpy int or 0-dim integer tensor)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer scalar, got a tensor of shape {tuple(value.shape)}")
        value = int(value.item())
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return n


def check_length(name: str, value: Any) -> int:
    """A context length that must be an integer: like :func:`check_seq_len` but > 0."""
    n = check_seq_len(name, value)
    if n == 0:
        raise ValueError(f"{name} must be > 0, got 0")
    return n
