"""Host side of the fused QKV projection + rope experiment (:mod:`.qkv_kernel`, issue #26):
launch shapes (:class:`QkvConfig`, the default, the benchmark's sweep) and the launch.

Arguments arrive checked (``yarn_triton.op.qkv``); this module only packs and launches.
Triton's autotuner is not used: the interpreter runs one small shape, and on a GPU the
benchmark's sweep (``bench/bench_qkv.py --sweep``) times :func:`candidate_configs` and
records them, so that the default can be chosen from measurements once there are some.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
import triton

from . import launcher as _rope_launcher
from .qkv_kernel import qkv_rope_kernel
from .rope_kernel import INTERPRETED

__all__ = ["QkvConfig", "default_config", "candidate_configs", "launch_qkv", "LAYOUT_SWITCHES"]

#: layout -> (PAIRS: the projection's rotation pairs are adjacent channels; OUT_PAIRS: they
#: are stored adjacent). deepseek reads pairs and writes halves (its de-interleave).
LAYOUT_SWITCHES = {"neox": (False, False), "interleaved": (True, True), "deepseek": (True, False)}


class QkvConfig(NamedTuple):
    """A launch shape. ``block_m`` tokens per tile (the N tile is always one head),
    ``block_k`` of the hidden dim per main-loop step, ``num_stages`` of that loop in
    flight, ``group_m`` token blocks per L2 swizzle group; ``flatten`` and
    ``warp_specialize`` go to the persistent tile loop's ``tl.range`` (untested on
    Hopper with triton 3.6: off by default); ``use_desc`` reads x and W through tensor
    descriptors (None: wherever the alignment allows it); ``num_progs`` persistent
    programs (None: the SM count); ``one_acc`` accumulates a head in one ``[BM, D]`` tile
    (one dot per step, as the plain GEMM) and splits the rotation partners out of it in the
    epilogue (reshape / permute / split), where the head is all rotary and ``D`` a power
    of two; elsewhere it is ignored (two accumulators). ``heads``: heads per tile, one
    after the other on the same tokens, which share one computation of the tile's cos/sin
    (the float64 angle reduction is the epilogue's largest cost); 1 where it does not
    divide the head count."""

    block_m: int = 128
    block_k: int = 64
    num_stages: int = 4
    num_warps: int = 8
    group_m: int = 8
    flatten: bool = False
    warp_specialize: bool = False
    use_desc: Optional[bool] = None
    num_progs: Optional[int] = None
    one_acc: bool = False
    heads: int = 1


# The interpreter runs programs one after another in Python: small tiles, a few programs
# (so that the persistent loop takes several tiles each), one stage.
_INTERPRETER_CONFIG = QkvConfig(block_m=16, block_k=32, num_stages=1, num_warps=1, group_m=2, num_progs=3)


def default_config() -> QkvConfig:
    """The shape a call without ``config`` gets. On a GPU: 128 tokens x one 128-wide head,
    64 of K per step, 4 stages (32 KiB of shared memory per stage for bf16): the shape of
    the tutorial's persistent Hopper GEMM, a starting point until the sweep has run."""
    return _INTERPRETER_CONFIG if INTERPRETED else QkvConfig()


def _flatten_compiles() -> bool:
    """Whether this Triton compiles the kernel with ``flatten``: triton 3.6 (the device's)
    fails in its TritonGPUFuseNestedLoops pass, 3.9 does not (both compiled for sm_90
    offline); versions between are untried and left out."""
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 9)


def candidate_configs() -> List[QkvConfig]:
    """The benchmark's sweep of the fused kernel (GPU only): each is timed and recorded."""
    out = []
    flattens = (False, True) if _flatten_compiles() else (False,)
    for bm, warps in ((64, 4), (128, 8)):  # one warpgroup per 64 rows of the tile
        for bk in (64, 128):
            for stages in (3, 4):
                if bm * bk > 128 * 64 and stages > 3:  # > 192 KiB of stages with the epilogue
                    continue
                for flatten in flattens:
                    for one_acc in (False, True):
                        out.append(QkvConfig(bm, bk, stages, warps, 8, flatten, False, one_acc=one_acc))
    for heads in (2, 4):  # cos/sin shared by several heads of a tile
        out.append(QkvConfig(128, 64, 3, 8, 8, False, False, heads=heads))
        out.append(QkvConfig(128, 64, 3, 8, 8, flattens[-1], False, heads=heads, one_acc=True))
    # warp specialization (compiles for sm_90 with triton 3.6 and 3.9; its speed is the question)
    out.append(QkvConfig(128, 64, 3, 8, 8, False, True))
    out.append(QkvConfig(128, 64, 3, 8, 8, False, True, one_acc=True))
    return out


_SM_COUNT = {}
_ALLOCATOR_SET = False


def _num_progs(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _ensure_allocator() -> None:
    """Descriptors made on the device (``tl.make_tensor_descriptor``) need global scratch
    memory, which Triton asks its allocator for at launch; torch's caching allocator serves
    it (also under CUDA graph capture, from the graph's pool). Set once, process-wide."""
    global _ALLOCATOR_SET
    if _ALLOCATOR_SET:
        return

    def _alloc(size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, device="cuda", dtype=torch.int8)

    triton.set_allocator(_alloc)
    _ALLOCATOR_SET = True


def _desc_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether tensor descriptors can address x and W: 16-byte aligned bases (W's odd rows
    too: the adjacent-pair layouts read them from ``w + row stride``) and row strides, and
    on a GPU a Hopper or newer (TMA)."""
    e = x.element_size()
    if x.data_ptr() % 16 or w.data_ptr() % 16 or (x.stride(0) * e) % 16 or (w.stride(0) * e) % 16:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device)[0] >= 9
    return True


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def launch_qkv(
    x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor, positions: torch.Tensor,
    inv_freq: torch.Tensor, scale: float, *, n_q_heads: int, n_k_heads: int, head_dim: int, rot: int,
    layout: str, q_norm: Optional[torch.Tensor] = None, k_norm: Optional[torch.Tensor] = None,
    eps: float = 1e-6, norm_kind: int = 0, precise: bool = True, epilogue: int = 1,
    config: Optional[QkvConfig] = None,
) -> None:
    """``out[T, N] = rope(x[T, K] @ w[N, K]^T + bias)`` for q's and k's heads (one launch).

    x: ``[T, K]``, last dim contiguous; w: ``[N, K]`` same dtype, last dim contiguous,
    ``N = (n_q_heads + 2 n_k_heads) * head_dim``; out: ``[T, N]`` of x's dtype, last dim
    contiguous; positions: int ``[T]`` (any stride); inv_freq: float32 ``[rot / 2]`` on the
    device; norm_kind 0 none, 1 ``w``, 2 ``1 + w`` (q_norm/k_norm ``[head_dim]``).
    ``epilogue`` 0: the plain GEMM (bias only; no rotation, no norm)."""
    cfg = config or default_config()
    T, K = x.shape
    n_heads = n_q_heads + 2 * n_k_heads
    if T == 0:
        return
    pairs, out_pairs = LAYOUT_SWITCHES[layout]
    half = rot // 2
    tail = head_dim - rot
    one_acc = cfg.one_acc and epilogue == 1 and tail == 0 and head_dim == _next_pow2(head_dim)
    use_desc = _desc_ok(x, w) if cfg.use_desc is None else (cfg.use_desc and _desc_ok(x, w))
    if use_desc and x.device.type == "cuda":
        _ensure_allocator()
    heads = cfg.heads if cfg.heads >= 1 and n_heads % cfg.heads == 0 else 1
    n_tiles = triton.cdiv(T, cfg.block_m) * (n_heads // heads)
    progs = cfg.num_progs or _num_progs(x.device)
    grid = (min(n_tiles, progs),)
    filler = inv_freq  # never read where the switch is off
    qkv_rope_kernel[grid](
        x, w, bias if bias is not None else filler, out, positions, inv_freq,
        q_norm if q_norm is not None else filler, k_norm if k_norm is not None else filler,
        T, K, n_q_heads, n_q_heads + n_k_heads, n_heads, grid[0],
        x.stride(0), w.stride(0), out.stride(0), positions.stride(0),
        float(scale), float(eps),
        D=head_dim, HALF=half, HALF_PAD=_next_pow2(half), TAIL=tail, TAIL_PAD=_next_pow2(tail) if tail else 0,
        D_PAD=_next_pow2(head_dim),
        PAIRS=pairs, OUT_PAIRS=out_pairs, EPILOGUE=epilogue, NORM=norm_kind if epilogue else 0,
        HAS_BIAS=bias is not None, PRECISE=precise, SINCOS=_rope_launcher._sincos(out.dtype),
        IEEE=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        NUM_STAGES=cfg.num_stages, USE_DESC=use_desc, FLATTEN=cfg.flatten, WARP_SPECIALIZE=cfg.warp_specialize,
        ONE_ACC=one_acc, HEADS=heads,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
