"""Time a whole transformers forward pass with the model's own rope and with the fused
kernel (``yarn_triton.integrations.transformers.enable_fused_rope``).

Builds a randomly initialised model from a config (no download): by default a 4-layer
Llama-like model (hidden 2048, 16 heads of 128, 4 KV heads, YaRN factor 4) on 8192
tokens, in bfloat16 under ``torch.inference_mode``. Each forward is timed with
``triton.testing.do_bench`` (median of ``--rep`` ms of repeats), first with the model's own
rope, then switched, then switched back. Also times the rope step alone for one layer's
q/k (transformers: cos/sin tables from ``rotary_emb`` once per forward +
``apply_rotary_pos_emb`` per layer; fused: one in-place launch per layer on the same views).

    python bench/model_forward.py --out results/model_forward.json
    python bench/model_forward.py --family llama,deepseek_v3 --seq 8192 --batch 1

Without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Dict, List

DEVICE = "cuda"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="llama",
                   help="comma-separated: llama, qwen3, deepseek_v3 (default llama)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=50, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=300, help="do_bench repetition time, ms")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def make_config(family: str, a):
    import transformers

    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096, rope_theta=10000.0)
    common = dict(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads,
        max_position_embeddings=4 * 4096, tie_word_embeddings=False,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, num_key_value_heads=a.kv_heads, rope_parameters=yarn)
    if family == "qwen3":
        return transformers.Qwen3Config(
            **common, num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads, rope_parameters=yarn
        )
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **common, num_key_value_heads=a.heads,
            q_lora_rank=768, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
            first_k_dense_replace=a.layers,  # dense MLPs: the MoE is not what is measured
            moe_intermediate_size=a.intermediate // 4, n_routed_experts=8, num_experts_per_tok=2,
            n_group=1, topk_group=1, rope_interleave=True,
            rope_parameters=dict(yarn, mscale=1.0, mscale_all_dim=1.0),
        )
    raise SystemExit(f"unknown family {family!r} (llama, qwen3, deepseek_v3)")


def _bench_family(family: str, a, dtype) -> Dict:
    import torch
    import transformers
    from triton.testing import do_bench

    from yarn_triton.integrations.transformers import disable_fused_rope, enable_fused_rope

    cfg = make_config(family, a)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = model.to(device=DEVICE).eval()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=DEVICE)
    with torch.inference_mode():  # float32 truth: both bf16 runs are judged against it
        truth = model(ids, use_cache=False).logits.float()
    model = model.to(dtype=dtype)

    def forward():
        return model(ids, use_cache=False).logits

    def timed() -> float:
        return float(do_bench(forward, warmup=a.warmup, rep=a.rep, return_mode="median"))

    with torch.inference_mode():
        ref = forward().float()
        base_ms = timed()
        enable_fused_rope(model)
        out = forward().float()
        fused_ms = timed()
        disable_fused_rope(model)
        back_ms = timed()
        rel = ((out - ref).norm() / ref.norm()).item()
        base_vs_fp32 = ((ref - truth).norm() / truth.norm()).item()
        fused_vs_fp32 = ((out - truth).norm() / truth.norm()).item()
        rope = _bench_rope_step(model, family, a, dtype, do_bench)
    del model, ref, out, truth
    torch.cuda.empty_cache()
    return {
        "family": family,
        "tokens": a.batch * a.seq,
        "baseline_ms": base_ms,
        "fused_ms": fused_ms,
        "baseline_again_ms": back_ms,
        "speedup": base_ms / fused_ms,
        "saved_ms": base_ms - fused_ms,
        "logits_rel_err_vs_baseline": rel,
        "baseline_rel_err_vs_fp32": base_vs_fp32,
        "fused_rel_err_vs_fp32": fused_vs_fp32,
        **rope,
    }


def _bench_rope_step(model, family: str, a, dtype, do_bench) -> Dict:
    """One layer's rope step alone, on q/k views shaped as the attention passes them."""
    import torch

    from yarn_triton import RopeParams, apply_rope_

    mod = sys.modules[type(model.model).__module__]
    attn = model.model.layers[0].self_attn
    b, s = a.batch, a.seq
    if family == "deepseek_v3":
        d, hq, hk = attn.qk_rope_head_dim, a.heads, 1
        fn, layout = mod.apply_rotary_pos_emb_interleave, "deepseek"
    else:
        d, hq, hk = attn.head_dim, a.heads, a.kv_heads
        fn, layout = mod.apply_rotary_pos_emb, "neox"
    q_proj = torch.randn(b, s, hq, d, device=DEVICE, dtype=dtype)
    k_proj = torch.randn(b, s, hk, d, device=DEVICE, dtype=dtype)
    q, k = q_proj.transpose(1, 2), k_proj.transpose(1, 2)  # [B, H, S, D] views
    pos = torch.arange(s, device=DEVICE).unsqueeze(0).expand(b, -1)
    rotary = model.model.rotary_emb
    params = RopeParams.from_config(model.config)

    cos_sin = rotary(q_proj, pos)

    def their_tables():  # once per forward in the model
        return rotary(q_proj, pos)

    def their_apply():  # once per layer
        return fn(q, k, *cos_sin)

    def ours():  # once per layer; rotates the same buffers again and again (values are
        # irrelevant to the timing)
        return apply_rope_(q_proj, k_proj, pos, params, layout=layout)

    t_tables = float(do_bench(their_tables, warmup=a.warmup, rep=a.rep, return_mode="median"))
    t_apply = float(do_bench(their_apply, warmup=a.warmup, rep=a.rep, return_mode="median"))
    t_ours = float(do_bench(ours, warmup=a.warmup, rep=a.rep, return_mode="median"))
    per_fwd_theirs = t_tables + a.layers * t_apply
    per_fwd_ours = a.layers * t_ours
    return {
        "rope_tables_baseline_ms": t_tables,
        "rope_apply_per_layer_baseline_ms": t_apply,
        "rope_per_layer_fused_ms": t_ours,
        "rope_per_forward_baseline_ms": per_fwd_theirs,
        "rope_per_forward_fused_ms": per_fwd_ours,
        "layers": a.layers,
    }


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        import torch
    except ImportError:  # pragma: no cover
        print("torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("No CUDA GPU available: model_forward times GPU forwards only; nothing to do.")
        return 0
    import transformers
    import triton

    dtype = getattr(torch, a.dtype)
    results: List[Dict] = []
    for family in [f.strip() for f in a.family.split(",") if f.strip()]:
        print(f"[{family}] building {a.layers}-layer model, {a.batch}x{a.seq} tokens, {a.dtype} ...",
              flush=True)
        results.append(_bench_family(family, a, dtype))

    header = (f"{'family':<13}{'tokens':>8}{'baseline ms':>13}{'fused ms':>10}{'speedup':>9}"
              f"{'saved ms':>10}{'rope/fwd base':>15}{'rope/fwd fused':>16}{'err base|fused vs fp32':>24}")
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['family']:<13}{r['tokens']:>8}{r['baseline_ms']:>13.3f}{r['fused_ms']:>10.3f}"
              f"{r['speedup']:>8.3f}x{r['saved_ms']:>10.3f}{r['rope_per_forward_baseline_ms']:>15.4f}"
              f"{r['rope_per_forward_fused_ms']:>16.4f}"
              f"{r['baseline_rel_err_vs_fp32']:>12.2e}|{r['fused_rel_err_vs_fp32']:.2e}")
    print("median ms per forward (triton.testing.do_bench). 'rope/fwd': the rope steps of one forward "
          "timed alone -- baseline: cos/sin tables once + apply_rotary_pos_emb per layer; fused: one "
          "launch per layer. baseline_again_ms in the JSON re-times the model after switching back.")

    report = {
        "benchmark": "model_forward",
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "args": vars(a),
        "results": results,
    }
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
