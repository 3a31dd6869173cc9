"""Multimodal rope (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): [3, *T] positions, each
frequency pair taking the time, height or width stream; sectioned or interleaved. Against
a float64 reference, against transformers' own rotary modules, gradients, bad input,
torch.compile, QK-norm in the same pass."""

import pytest
import torch

import yarn_triton as yt
from yarn_triton.kernels.rope_kernel import INTERPRETED
from yarn_triton.reference import mrope_cos_sin_cache, qk_norm_rope_reference, rope_reference

from conftest import TOL, rel_err, requires_cuda

LAYOUTS = ("neox", "interleaved", "deepseek")
KINDS = {  # name: (rope dim, section, interleaved)
    "qwen2-vl": (128, (16, 24, 24), False),
    "qwen3-vl": (128, (24, 20, 20), True),
    "qwen3.5": (64, (11, 11, 10), True),
}


def _params(kind):
    rot, section, interleaved = KINDS[kind]
    return yt.RopeParams.yarn(rot, 1e7, 4.0, 262144, mscale=1.0, mscale_all_dim=0.0).with_mrope(section, interleaved)


def _positions(gen, B, S, distinct=True):
    """t, h, w streams: distinct (an image grid) or all equal (text)."""
    t = torch.randint(0, 1 << 20, (B, S), generator=gen)
    if not distinct:
        return t.expand(3, B, S)
    return torch.stack([t, torch.randint(0, 4096, (B, S), generator=gen), torch.randint(0, 4096, (B, S), generator=gen)])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(kdev, gen, kind, layout, dtype):
    p = _params(kind)
    head = 256 if kind == "qwen3.5" else 128  # Qwen3.5 rotates 64 of 256 channels
    q = torch.randn(2, 6, 4, head, generator=gen).to(kdev, dtype)
    k = torch.randn(2, 6, 2, head, generator=gen).to(kdev, dtype)
    pos = _positions(gen, 2, 6)
    pos_d = pos.to(kdev, torch.int32 if dtype == torch.float32 else torch.int64)
    rq, rk = rope_reference(q.cpu().double(), k.cpu().double(), pos, p, layout=layout, compute_dtype=torch.float64)
    q2, k2 = yt.apply_rope(q, k, pos_d, p, layout=layout)
    assert rel_err(q2, rq) < TOL[dtype] and rel_err(k2, rk) < TOL[dtype]
    yt.apply_rope_(q, k, pos_d, p, layout=layout)
    assert rel_err(q, rq) < TOL[dtype] and rel_err(k, rk) < TOL[dtype]


def test_text_positions_mean_the_same_position_on_all_streams(kdev, gen):
    p = _params("qwen3-vl")
    q = torch.randn(2, 5, 4, 128, generator=gen).to(kdev)
    t = torch.randint(0, 1 << 20, (2, 5), generator=gen)
    q3 = q.clone()
    yt.apply_rope_(q, None, t.to(kdev), p)
    yt.apply_rope_(q3, None, t.expand(3, 2, 5).to(kdev), p)
    assert torch.equal(q, q3)
    plain = yt.RopeParams(p.inv_freq, p.rope_dim, p.cos_sin_scale)  # no sections: plain rope
    q4 = torch.randn(2, 5, 4, 128, generator=gen).to(kdev)
    q5 = q4.clone()
    yt.apply_rope_(q4, None, t.to(kdev), p)
    yt.apply_rope_(q5, None, t.to(kdev), plain)
    assert torch.equal(q4, q5)


def test_views_of_a_fused_projection_and_bhsd(kdev, gen):
    p = _params("qwen3.5")
    qkv = torch.randn(2, 7, 6, 256, generator=gen).to(kdev)
    q, k = qkv[:, :, :4], qkv[:, :, 4:5]  # head slices of one projection
    bhsd = torch.randn(2, 4, 7, 256, generator=gen).to(kdev).transpose(1, 2)
    pos = _positions(gen, 2, 7)
    for qq, kk in ((q, k), (bhsd, None)):
        rq, rk = rope_reference(qq.cpu().double(), None if kk is None else kk.cpu().double(), pos, p,
                                compute_dtype=torch.float64)
        yt.apply_rope_(qq, kk, pos.to(kdev), p)
        assert rel_err(qq, rq) < TOL[torch.float32]
        if kk is not None:
            assert rel_err(kk, rk) < TOL[torch.float32]


@pytest.mark.parametrize("kind", list(KINDS))
def test_stream_choice_matches_transformers_rotary(kind, gen):
    """Our per-pair stream choice against transformers' own rotary modules' cos/sin."""
    transformers = pytest.importorskip("transformers")
    rot, section, interleaved = KINDS[kind]
    common = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20)
    rope = {"rope_type": "yarn", "rope_theta": 1e7, "factor": 4.0, "original_max_position_embeddings": 262144,
            "mrope_section": list(section)}
    if kind == "qwen2-vl":
        from transformers.models.qwen2_vl import modeling_qwen2_vl as m
        cfg = transformers.Qwen2VLTextConfig(head_dim=rot, rope_parameters=rope, **common)
        rotary = m.Qwen2VLRotaryEmbedding(cfg)
    elif kind == "qwen3-vl":
        from transformers.models.qwen3_vl import modeling_qwen3_vl as m
        cfg = transformers.Qwen3VLTextConfig(head_dim=rot, rope_parameters=rope, **common)
        rotary = m.Qwen3VLTextRotaryEmbedding(cfg)
    else:
        from transformers.models.qwen3_5 import modeling_qwen3_5 as m
        cfg = transformers.Qwen3_5TextConfig(head_dim=256, rope_parameters=dict(rope, partial_rotary_factor=0.25),
                                             **common)
        rotary = m.Qwen3_5TextRotaryEmbedding(cfg)
    params = yt.rope_params_from_config(cfg)
    assert params.mrope_section == section and params.mrope_interleaved == interleaved
    assert params.rope_dim == rot and torch.equal(params.inv_freq, rotary.inv_freq)
    pos = _positions(gen, 2, 9)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, pos)
    # transformers forms float32 angles: compare in the same arithmetic
    ours_cos, ours_sin = mrope_cos_sin_cache(params, pos, section, interleaved, torch.float32)
    assert rel_err(cos, ours_cos) < 1e-6 and rel_err(sin, ours_sin) < 1e-6
    # and the kernel path end to end, against transformers' apply_rotary_pos_emb
    q = torch.randn(2, 4, 9, cos.shape[-1] if kind != "qwen3.5" else 256, generator=gen)
    k = torch.randn(2, 2, 9, q.shape[-1], generator=gen)
    hq, hk = m.apply_rotary_pos_emb(q, k, cos, sin)
    dev = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
    qq, kk = q.transpose(1, 2).to(dev), k.transpose(1, 2).to(dev)
    yt.apply_rope_(qq, kk, pos.to(dev), params, precise_angles=False)  # float32 angles, as transformers
    assert rel_err(qq, hq.transpose(1, 2)) < 1e-5 and rel_err(kk, hk.transpose(1, 2)) < 1e-5


def test_gradients_match_autograd_of_the_reference(kdev, gen):
    p = _params("qwen3.5")
    q = torch.randn(2, 5, 3, 256, generator=gen).to(kdev)
    k = torch.randn(2, 5, 1, 256, generator=gen).to(kdev)
    pos = _positions(gen, 2, 5)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = yt.apply_rope(qg, kg, pos.to(kdev), p)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    rq_in, rk_in = q.cpu().double().requires_grad_(), k.cpu().double().requires_grad_()
    rq, rk = rope_reference(rq_in, rk_in, pos, p, compute_dtype=torch.float64)
    torch.autograd.backward((rq, rk), (gq.cpu().double(), gk.cpu().double()))
    assert rel_err(qg.grad, rq_in.grad) < 1e-5 and rel_err(kg.grad, rk_in.grad) < 1e-5


def test_unit_offset_qk_norm_and_mrope_in_one_pass(kdev, gen):
    """Qwen3.5: (1 + weight) q/k norm, then interleaved M-RoPE on 64 of 256 channels."""
    p = _params("qwen3.5")
    q = (torch.randn(1, 6, 4, 256, generator=gen) * 3).to(kdev, torch.bfloat16)
    k = torch.randn(1, 6, 2, 256, generator=gen).to(kdev, torch.bfloat16)
    qw, kw = (torch.randn(256, generator=gen) * 0.1).to(kdev), (torch.randn(256, generator=gen) * 0.1).to(kdev)
    pos = _positions(gen, 1, 6)
    rq, rk = qk_norm_rope_reference(q.cpu().double(), k.cpu().double(), pos, p, qw.cpu(), kw.cpu(),
                                    unit_offset=True, compute_dtype=torch.float64)
    yt.apply_qk_norm_rope_(q, k, pos.to(kdev), p, qw, kw, unit_offset=True)
    assert rel_err(q, rq) < TOL[torch.bfloat16] and rel_err(k, rk) < TOL[torch.bfloat16]


def test_bad_positions_raise_before_writing(kdev, gen):
    p = _params("qwen3-vl")
    plain = yt.RopeParams.yarn(128, 1e7, 4.0, 262144)
    q = torch.randn(2, 5, 4, 128, generator=gen).to(kdev)
    before = q.clone()
    with pytest.raises(ValueError, match="leading dim 4"):
        yt.apply_rope_(q, None, torch.zeros(4, 2, 5, dtype=torch.long, device=kdev), p)
    with pytest.raises(ValueError, match="no mrope_section"):
        yt.apply_rope_(q, None, torch.zeros(3, 2, 5, dtype=torch.long, device=kdev), plain)
    with pytest.raises(ValueError, match="do not broadcast"):
        yt.apply_rope_(q, None, torch.zeros(3, 2, 4, dtype=torch.long, device=kdev), p)
    assert torch.equal(q, before)


def test_sections_are_validated_when_params_are_built():
    base = yt.RopeParams.yarn(64, 1e7, 4.0, 262144)
    for bad in [(11, 11, 11), (11, 11), (-1, 22, 11), (11.0, 11, 10), "abc"]:
        with pytest.raises(ValueError, match="mrope_section"):
            base.with_mrope(bad)
    with pytest.raises(ValueError, match="mrope_section"):
        yt.RopeParams(base.inv_freq, 64, mrope_section=(10, 10, 10))
    assert "mrope_section=[11, 11, 10] (interleaved)" in repr(base.with_mrope((11, 11, 10), True))


def test_torch_compile_fullgraph(kdev, gen):
    p = _params("qwen3-vl")
    q = torch.randn(2, 5, 4, 128, generator=gen).to(kdev)
    k = torch.randn(2, 5, 2, 128, generator=gen).to(kdev)
    pos = _positions(gen, 2, 5).to(kdev)

    def f(q, k, pos):
        q2, k2 = yt.apply_rope(q, k, pos, p)
        return q2 * 2, k2

    want = f(q, k, pos)
    got = torch.compile(f, fullgraph=True, backend="aot_eager" if kdev == "cpu" else "inductor")(q, k, pos)
    assert rel_err(got[0], want[0]) < 1e-6 and rel_err(got[1], want[1]) < 1e-6


@requires_cuda
def test_cuda_graph_replay_with_new_positions(gen):
    p = _params("qwen3.5")
    q = torch.randn(1, 8, 4, 256, generator=gen).to("cuda")
    pos = torch.zeros(3, 1, 8, dtype=torch.long, device="cuda")
    src = q.clone()
    yt.apply_rope_(q, None, pos, p)  # warm: compile, plan
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yt.apply_rope_(q, None, pos, p)
    for _ in range(2):
        new = _positions(gen, 1, 8)
        pos.copy_(new)
        q.copy_(src)
        g.replay()
        torch.cuda.synchronize()
        rq, _ = rope_reference(src.cpu().double(), None, new, p, compute_dtype=torch.float64)
        assert rel_err(q, rq) < TOL[torch.float32]
