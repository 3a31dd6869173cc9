"""Host-side rope math: turn a model's rope settings into ``inv_freq`` and scale factors.

Everything here runs once per model on the CPU, in the same float32 torch operations
as the reference implementations, so the numbers match theirs bit for bit. The result,
:class:`RopeParams`, is immutable; the only thing it ever copies is ``inv_freq``, once per
device, on first use.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch

__all__ = [
    "RopeParams",
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
    """

    inv_freq: torch.Tensor
    rope_dim: int
    cos_sin_scale: float = 1.0
    softmax_scale_factor: float = 1.0
    rope_type: str = "default"
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
            f"softmax_scale_factor={self.softmax_scale_factor:.6g})"
        )
