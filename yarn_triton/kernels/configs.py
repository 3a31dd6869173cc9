"""Launch shapes of :func:`~.rope_kernel.rope_kernel`: tokens per program, heads per step,
head groups and warps (:class:`LaunchConfig`), and how one is chosen.

The launch shape (tokens per program, heads per step, head groups, warps) is picked per
shape class by timing candidates on scratch copies (``_tune``). Here: the shape that needs
no tuning (:func:`heuristic_config`), the candidates worth timing (:func:`candidate_configs`)
and their timing (``_tune``), the grid (``_grid``) and each operand's heads per step
(``_meta``). Which shape a call gets, and the tuner's picks per shape class, are the
launcher's (``launcher.AUTOTUNE``, ``launcher._TUNED``): it keys, reads and fills them.

Imports only ``rope_kernel`` (the kernel the tuner times, ``INTERPRETED``). The tuner
launches the kernel by its name in this module.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
import triton

from .rope_kernel import INTERPRETED, rope_kernel

__all__ = ["LaunchConfig", "candidate_configs", "heuristic_config"]


# --------------------------------------------------------------------------------------
# Launch shapes: a heuristic default, or the tuner's pick among candidates
# --------------------------------------------------------------------------------------
def _tok_class(n_tokens: int) -> int:
    """Autotune bucket: powers of two up to 64K tokens (beyond, the best shape is stable)."""
    return min(_next_pow2(max(n_tokens, 1)), 1 << 16)


# (tokens per program, heads per step, head groups, warps). A short list, so a new shape
# class tunes in a few seconds (most of it compiling). One token and several heads per
# step streams whole rows of q and k (the best prefill shapes on an H100); wide head steps
# with few programs serve decode, where one round trip to memory is the whole cost.
_CANDIDATES = [
    # many tokens: one or a few groups, so each angle serves many heads
    (1, 4, 8, 1), (1, 2, 16, 1), (1, 8, 4, 2), (2, 4, 8, 1), (4, 1, 8, 1), (4, 2, 2, 1), (8, 1, 8, 2),
    (8, 4, 1, 4), (16, 1, 8, 2), (16, 2, 1, 4), (16, 4, 1, 8), (32, 1, 8, 4), (4, 1, 16, 1),
    # few tokens (decode): many small programs, or one wide program per token
    (1, 1, 32, 1), (1, 1, 16, 1), (2, 1, 16, 1), (4, 1, 32, 1), (1, 8, 4, 1), (1, 16, 2, 2), (1, 32, 1, 4),
    (1, 32, 1, 2),
    (2, 16, 1, 4), (2, 8, 4, 1), (2, 16, 2, 2), (4, 8, 4, 2),
    # MLA's 128 heads at a few tokens: a group per head or two (576-channel rows). The
    # fastest shapes of DeepSeek-V3's FP8 serving call on an H100 (2026-12-06, graph time
    # per shape, bench/ncu_cache_case.py --shapes): 1 token at 4 warps (2.42 us at 1
    # token), 4 tokens at 4 warps (2.63 us at 8 tokens, where the list's pick took 2.95)
    (1, 1, 128, 1), (1, 1, 128, 4), (2, 1, 128, 2), (4, 1, 128, 4), (1, 1, 64, 1),
]
# Tuning times candidates on scratch copies of q and k (the user's tensors are never
# touched, and no restore copy pollutes the timing); past this size it is not worth it.
_TUNE_SCRATCH_MAX_BYTES = 1 << 30


def candidate_configs(n_tokens: int, n_q_heads: int, n_k_heads: int, half_pad: int) -> list:
    """The launch shapes worth timing for a shape: no more tokens per program or head
    groups than there are tokens or heads, and at most 64 fp32 values per thread per step
    (more spill); and always the untuned :func:`heuristic_config`, so that tuning can only
    improve on it. (Before the list had shapes of 64 and 128 head groups, for a few tokens of
    MLA's 128 heads the heuristic's one group per head was the widest shape on offer: on an
    H100 the tuner's pick among the list took a 1-token DeepSeek-V3 FP8 serving call to
    3.50 us, where one plain store launch of the same bytes takes 2.09.)"""
    heads = _next_pow2(max(n_q_heads, n_k_heads, 1))
    toks = _tok_class(n_tokens)
    keep = [LaunchConfig(bt, bh, w, 1, g) for bt, bh, g, w in _CANDIDATES
            if g <= heads and bh <= heads and bt <= toks and bt * bh * 2 * half_pad <= 64 * 32 * w]
    default = heuristic_config(n_tokens, n_q_heads, n_k_heads, half_pad)
    return keep + [default] if default not in keep else keep


def _scratch(t: torch.Tensor) -> torch.Tensor:
    """Random data in a tensor of ``t``'s sizes and strides: the same access pattern."""
    s = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    if t.dtype.itemsize == 1:  # FP8 outputs (no normal_ kernel): random values converted
        return s.copy_(torch.randn(t.size(), device=t.device))
    return s.normal_()


def _grid(n_tokens: int, cfg: "LaunchConfig") -> Tuple[int, int, int]:
    return (_cdiv(n_tokens, cfg.block_t) * cfg.head_groups, 1, 1)


def _tune(args: tuple, switches: dict, n_tokens: int, configs: list) -> Optional["LaunchConfig"]:
    """The fastest of ``configs`` for this launch, timed on scratch copies of the q/k
    operands (positions, weights and ``inv_freq`` are only read, so the real ones serve).
    Every candidate is timed as a CUDA graph of back-to-back launches: host noise would
    decide an eager timing of a decode launch, and single launches after an L2 flush (what
    ``do_bench`` times) miss the steady state of an in-place pass, whose dirty lines are
    written back while the next launch runs. On an H100 that once ranked the Qwen3.5 M-RoPE
    prefill's candidates so that the pick took 32.1 us back to back where the best took
    29.7. None when the scratch would be too large.

    The candidates within ``_FINALIST_MARGIN`` of the best are timed again, in reverse
    order, and ranked by the mean of their two times (:func:`pick_fastest`). At decode
    sizes the shapes lie a few percent apart, and picks have differed between processes:
    for DeepSeek-V3's 8-token FP8 serving call on an H100 (2026-12-06), one benchmark
    process picked a shape whose graph time is 3.04 us where another's is 2.69 (the next
    process picked the 2.69 one, and there each finalist's second time was within 0.02 us
    of its first: that flip was not one noisy timing, and its cause is not known). The
    second look costs a few graph timings and guards against drift within a tuning run.
    ``YARN_TRITON_TUNE_LOG=1`` prints every timing to stderr."""
    # With the cache write, k's output is the cache: it is not copied (the whole cache
    # could be large); the candidates write the scratch k's rotation into the caller's
    # slots, which the real launch then overwrites, and v's, which it writes again.
    operands = args[:3] if switches.get("CACHE") else args[:4]
    if sum(t.numel() * t.element_size() for t in operands) > _TUNE_SCRATCH_MAX_BYTES:
        return None
    copies: dict = {}  # one scratch per distinct tensor (in place: input is output)
    for t in operands:
        if t.numel() and id(t) not in copies:
            copies[id(t)] = _scratch(t)
    targs = (*[copies.get(id(t), t) for t in operands], *args[len(operands):])

    def time_ms(cfg) -> float:
        def run():
            rope_kernel[_grid(n_tokens, cfg)](*targs, **switches, **_meta(cfg, targs), num_warps=cfg.num_warps,
                                              num_stages=cfg.num_stages)
        try:
            run()  # compiles
            return triton.testing.do_bench_cudagraph(run, rep=10, return_mode="median")
        except Exception:  # noqa: BLE001  (a shape the compiler rejects, e.g. out of resources)
            return float("inf")

    return pick_fastest(configs, time_ms, log=_tune_log(n_tokens, switches))


# Finalists: candidates whose first time is within this fraction of the best one's.
_FINALIST_MARGIN = 0.15
_FINALISTS_MAX = 4


def pick_fastest(configs: Sequence, time_ms, log=None):
    """The config of ``configs`` with the lowest ``time_ms(config)`` (inf: it failed), or
    None if every one failed. The best few (within ``_FINALIST_MARGIN`` of the first pass's
    best, at most ``_FINALISTS_MAX``) are timed once more in reverse order, and each is
    ranked by the mean of its two times: a second look at the close ones, in the other
    order, so that a drift in clocks or one noisy timing (low or high) does not decide
    between them alone."""
    first = [(time_ms(cfg), i) for i, cfg in enumerate(configs)]
    ok = sorted(t for t in first if t[0] != float("inf"))
    if log:
        for ms, i in first:
            log(f"  {configs[i]}: {ms * 1e3:.2f} us")
    if not ok:
        return None
    finalists = [i for ms, i in ok[:_FINALISTS_MAX] if ms <= ok[0][0] * (1 + _FINALIST_MARGIN)]
    if len(finalists) == 1:
        return configs[finalists[0]]
    best = {i: ms for ms, i in first}
    for i in reversed(finalists):
        again = time_ms(configs[i])
        if log:
            log(f"  again {configs[i]}: {again * 1e3:.2f} us")
        best[i] = (best[i] + again) / 2
    return configs[min(finalists, key=lambda i: (best[i], i))]


def _tune_log(n_tokens: int, switches: dict):
    """A printer to stderr under ``YARN_TRITON_TUNE_LOG=1`` (headed by the shape being
    tuned), else None."""
    if os.environ.get("YARN_TRITON_TUNE_LOG", "0") != "1":
        return None
    print(f"yarn_triton tuning: {n_tokens} tokens, CACHE={switches.get('CACHE')}, "
          f"QUANT_PTRS={switches.get('QUANT_PTRS')}, HALF={switches.get('HALF')}", file=sys.stderr, flush=True)
    return lambda m: print(m, file=sys.stderr, flush=True)


def _next_pow2(n: int) -> int:
    # plain Python: triton.next_power_of_2 / triton.cdiv are jit-callable and cost
    # microseconds each on the host
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class LaunchConfig(NamedTuple):
    """Launch shape: tokens per program, heads per step, warps, pipelining stages, and the
    number of programs that share one block of tokens (each takes a slice of the heads)."""

    block_t: int
    block_h: int
    num_warps: int
    num_stages: int = 1
    head_groups: int = 1


# Few tokens: enough one-warp programs to cover the machine (132 SMs on an H100).
_PROGRAMS_WANTED = 512


@functools.lru_cache(maxsize=1024)
def heuristic_config(n_tokens: int, n_q_heads: int, n_k_heads: int, half: int) -> LaunchConfig:
    """A launch shape that needs no tuning. Many tokens on a GPU: one token and 4 heads per
    step in one-warp programs, the heads split over up to 8 groups, which streams whole
    rows of q and k (the tuner's usual pick on an H100). Under the interpreter, whose cost
    grows with the number of programs: 16 tokens x all heads per program (32 when the rope
    part is 64 wide or less). Few tokens (decode): one warp per program, up to 4 tokens
    each, and the heads split into groups until there are enough programs: latency, not
    bandwidth, decides there."""
    half_pad = _next_pow2(half)
    heads = _next_pow2(max(n_q_heads, n_k_heads, 1))
    block_t = 16 if half_pad >= 64 else 32
    if n_tokens >= block_t * _PROGRAMS_WANTED // 4:
        if INTERPRETED:
            return LaunchConfig(block_t, 1, 4, 1, 1)
        return LaunchConfig(1, min(4, heads), 1, 1, max(1, min(8, heads // 4)))
    block_t = min(_next_pow2(max(n_tokens, 1)), 4)
    groups = min(heads, _next_pow2(max(1, _PROGRAMS_WANTED // _cdiv(max(n_tokens, 1), block_t))))
    return LaunchConfig(block_t, 1, 1, 1, groups)


_NQ = rope_kernel.arg_names.index("n_q_heads")
_NK = rope_kernel.arg_names.index("n_k_heads")
_NV = rope_kernel.arg_names.index("n_v_heads")


def _meta(cfg: LaunchConfig, args: Sequence) -> dict:
    """The launch shape's constexprs for the kernel arguments ``args``: each operand's heads
    per step is the shape's, capped at its heads per group (power of two), and whether
    one step covers a group (then the kernel has no head loop)."""
    per_q = _cdiv(max(args[_NQ], 1), cfg.head_groups)
    per_k = _cdiv(max(args[_NK], 1), cfg.head_groups)
    per_v = _cdiv(max(args[_NV], 1), cfg.head_groups)
    q_step = min(cfg.block_h, _next_pow2(per_q))
    k_step = min(cfg.block_h, _next_pow2(per_k))
    v_step = min(cfg.block_h, _next_pow2(per_v))
    return {"BLOCK_T": cfg.block_t, "Q_BLOCK_H": q_step, "K_BLOCK_H": k_step, "HEAD_GROUPS": cfg.head_groups,
            "Q_ONE_STEP": per_q <= q_step, "K_ONE_STEP": per_k <= k_step,
            "V_BLOCK_H": v_step, "V_ONE_STEP": per_v <= v_step}
