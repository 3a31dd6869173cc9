"""Plot the scaled wavelength ``2*pi / inv_freq`` of every rotary pair, per RoPE variant.

Run from the repository root (needs matplotlib):

    python bench/plot_wavelengths.py           # writes docs/rope_wavelengths.png

Every variant is built through ``RopeParams.from_config`` from a real model configuration
(or, for the variants no flagship model uses, a Llama-2-style one: head_dim 128, theta 1e4,
4096 positions, factor 4), so the curves are exactly what the kernel would use.
"""

from __future__ import annotations

import ast
import math
import os
import sys
from typing import List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from yarn_triton import RopeParams  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "rope_wavelengths.png")

_LLAMA2 = dict(hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096, rope_theta=10000.0)


def _phi3_factors() -> Tuple[List[float], List[float]]:
    """Phi-3-mini-128k's LongRoPE lists, read (not imported) from the test-suite copy."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "test_variants.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            name = getattr(node.targets[0], "id", None)
            if name in ("PHI3_SHORT", "PHI3_LONG"):
                found[name] = ast.literal_eval(node.value)
    return found["PHI3_SHORT"], found["PHI3_LONG"]


def variants() -> List[Tuple[str, RopeParams, int]]:
    """``(label, params, original context length)`` for every variant plotted."""
    short, long = _phi3_factors()
    phi3 = RopeParams.from_config(dict(
        hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long}))
    return [
        ("default (Llama-2, θ=1e4)", RopeParams.from_config(_LLAMA2), 4096),
        ("linear ×4", RopeParams.from_config({**_LLAMA2, "rope_scaling": {"type": "linear", "factor": 4.0}}), 4096),
        ("ntk ×4 (static)", RopeParams.from_config({**_LLAMA2, "rope_scaling": {"type": "ntk", "factor": 4.0}}), 4096),
        ("dynamic ×4 @ 16k tokens",
         RopeParams.from_config({**_LLAMA2, "rope_scaling": {"type": "dynamic", "factor": 4.0}}).for_seq_len(16384),
         4096),
        ("yarn ×4 (transformers, on Llama-2)", RopeParams.from_config(
            {**_LLAMA2, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}}),
         4096),
        ("yarn ×40 (DeepSeek-V3, dim 64)", RopeParams.yarn(64, 10000.0, 40, 4096, 32, 1, 1.0, 1.0), 4096),
        ("yarn ×32, truncate=false (gpt-oss)", RopeParams.from_config(dict(
            head_dim=64, hidden_size=2880, num_attention_heads=64, max_position_embeddings=131072,
            rope_theta=150000, rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                             "beta_slow": 1.0, "original_max_position_embeddings": 4096,
                                             "truncate": False})), 4096),
        ("llama3 ×8 (Llama-3.1, θ=5e5)", RopeParams.from_config(dict(
            hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})), 8192),
        ("longrope short (Phi-3-mini-128k)", phi3, 4096),
        ("longrope long (Phi-3-mini-128k)", phi3.for_seq_len(4097), 4096),
    ]


def main(out: str = OUT) -> str:
    """Draw the figure and write it to ``out``; returns the path."""
    items = variants()
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.2))
    styles = ["-", "--", "-.", ":"]
    for n, (label, p, _) in enumerate(items):
        idx = [2 * i / p.rope_dim for i in range(p.rope_dim // 2)]  # relative position 2i/d
        wl = (2 * math.pi / p.inv_freq.double()).tolist()
        plain = RopeParams.default(p.rope_dim, _base_of(label)).inv_freq.double()
        ratio = (plain / p.inv_freq.double()).tolist()
        kw = dict(label=label, linestyle=styles[n % len(styles)], linewidth=1.6)
        axes[0].plot(idx, wl, **kw)
        axes[1].plot(idx, ratio, **kw)
    for ctx, style in ((4096, (0, (1, 3))), (8192, (0, (4, 4)))):
        axes[0].axhline(ctx, color="grey", linestyle=style, linewidth=0.9)
        axes[0].text(0.005, ctx * 1.15, f"{ctx} tokens", color="grey", fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("rotary pair  2i / rope_dim")
    axes[0].set_ylabel("wavelength 2π / inv_freq  (tokens, log)")
    axes[0].set_title("Scaled wavelength per dimension")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("rotary pair  2i / rope_dim")
    axes[1].set_ylabel("stretch vs plain RoPE of the same θ  (log)")
    axes[1].set_title("How much each variant stretches each pair")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.25)
    axes[1].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def _base_of(label: str) -> float:
    if "Llama-3.1" in label:
        return 500000.0
    if "gpt-oss" in label:
        return 150000.0
    return 10000.0


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else OUT))
