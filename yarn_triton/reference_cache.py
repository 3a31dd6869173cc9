"""The KV-cache write in plain PyTorch: what the kernel's cache path stores, spelled out.

Used for CPU tensors (outside the interpreter) and as the definition the kernel is tested
against. A paged cache is ``[num_blocks, block_size, heads, head_dim]`` with any strides;
token ``t`` goes to block ``s // block_size``, row ``s % block_size`` of its slot
``s = slots[t]`` (vLLM's convention), and tokens whose slot is negative or past the cache
write nothing.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["FP8_DTYPES", "fp8_max", "quantize_reference", "write_cache_reference"]

#: The cache dtypes stored as ``x / scale``, saturated to the format's finite range.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

Scale = Union[float, torch.Tensor, None]


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def quantize_reference(x: torch.Tensor, dtype: torch.dtype, scale: Scale = None) -> torch.Tensor:
    """``x`` stored as ``dtype``: for an FP8 dtype ``x / scale`` in float32, saturated to
    ``±fp8_max(dtype)`` (NaN stays NaN), rounded to nearest even, as vLLM's cache write
    stores it; for other dtypes ``x`` rounded to ``dtype`` (no scale)."""
    if dtype in FP8_DTYPES:
        s = scale.to(device=x.device, dtype=torch.float32) if isinstance(scale, torch.Tensor) else float(scale)
        m = fp8_max(dtype)
        return (x.float() / s).clamp(-m, m).to(dtype)
    return x.to(dtype)


def write_cache_reference(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, scale: Scale = None,
                          token_mask: Optional[torch.Tensor] = None) -> None:
    """Store ``values`` ``[T, heads, dim]`` (any float dtype; rounded or quantized once, by
    :func:`quantize_reference`) into ``cache`` ``[num_blocks, block_size, heads, dim]`` at
    the slots ``slots`` ``[T]``. Tokens with a slot outside ``[0, num_blocks *
    block_size)``, or where ``token_mask`` is False, write nothing; no other entry changes."""
    n_blocks, block_size = cache.shape[0], cache.shape[1]
    slots = slots.reshape(-1).to(torch.int64)
    keep = (slots >= 0) & (slots < n_blocks * block_size)
    if token_mask is not None:
        keep &= token_mask.reshape(-1).to(keep.device)
    s = slots[keep]
    if s.numel() == 0:
        return
    cache[s // block_size, s % block_size] = quantize_reference(values[keep], cache.dtype, scale)
