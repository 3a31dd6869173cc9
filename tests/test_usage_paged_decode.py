"""The decode loop of ``docs/usage.md`` ("A decode loop over a paged cache") runs as written,
and each of its attention outputs equals one plain causal attention over its whole
sequence (no cache, no pages), rotated by ``yarn_triton.rope_reference``."""

import os
import re

import torch
import torch.nn.functional as F

import yarn_triton as yt

USAGE = os.path.join(os.path.dirname(__file__), "..", "docs", "usage.md")
HEADING = "### A decode loop over a paged cache"


def _snippet() -> str:
    with open(USAGE, encoding="utf-8") as f:
        doc = f.read()
    assert doc.count(HEADING) == 1, f"docs/usage.md has no single {HEADING!r} section"
    m = re.search(r"```python\n(.*?)```", doc[doc.index(HEADING):], re.S)
    assert m, f"no python block after {HEADING!r}"
    return m.group(1)


def test_usage_paged_decode_loop_matches_plain_attention():
    ns = {"__name__": "usage_paged_decode"}
    exec(compile(_snippet(), USAGE, "exec"), ns)
    inputs, outputs, params = ns["inputs"], ns["outputs"], ns["params"]
    Hq, Hk, D = ns["Hq"], ns["Hk"], ns["D"]
    k_cache, block_tables, seq_lens = ns["k_cache"], ns["block_tables"], ns["seq_lens"]
    assert len(outputs) == len(inputs) == 3
    assert max(seq_lens) > 16  # past the original context of the yarn params
    used = [b for t in block_tables for b in t]
    assert len(used) == len(set(used)) and len(used) < k_cache.shape[0]  # disjoint pages, cache not full
    for s, x in enumerate(inputs):
        n = x.shape[0]
        assert outputs[s].shape == (n, Hq, D) and seq_lens[s] == n
        q, k, v = (x @ ns[w] for w in ("wq", "wk", "wv"))
        q, k, v = q.view(n, Hq, D), k.view(n, Hk, D), v.view(n, Hk, D)
        q, k = yt.rope_reference(q, k, torch.arange(n, device=x.device), params)
        want = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1).repeat_interleave(Hq // Hk, 0),
            v.transpose(0, 1).repeat_interleave(Hq // Hk, 0),
            is_causal=True,
        ).transpose(0, 1)
        err = (outputs[s] - want).abs().max().item()
        assert err <= 1e-4 * max(1.0, want.abs().max().item()), f"sequence {s}: max error {err}"
