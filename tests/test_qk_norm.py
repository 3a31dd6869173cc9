"""QK-norm + rope in one pass (Qwen3 attention): against a float64 reference of norm then
rotation, against transformers' own Qwen3 q_norm/k_norm + apply_rotary_pos_emb, gradients
against autograd of the reference, bad input, and torch.compile."""

import pytest
import torch

import yarn_triton as yt
from yarn_triton.reference import qk_norm_rope_reference

from conftest import POISON, TOL, rel_err

LAYOUTS = ("neox", "interleaved", "deepseek")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _params(rot=64):
    return yt.RopeParams.yarn(rot, 1e6, 4.0, 4096, mscale=0.707, mscale_all_dim=0.707)


def _inputs(gen, kdev, dtype, tokens=(2, 7), hq=4, hk=2, dq=96, dk=96, fused=False):
    """q/k with magnitudes far from 1 (so the norm matters) and random weights."""
    if fused:  # head slices of one [*, (hq + hk), D] projection
        qk = (torch.randn(*tokens, hq + hk + 1, dq, generator=gen) * 5).to(kdev, dtype)
        q, k = qk[..., :hq, :], qk[..., hq + 1:, :]
    else:
        q = (torch.randn(*tokens, hq, dq, generator=gen) * 5).to(kdev, dtype)
        k = (torch.randn(*tokens, hk, dk, generator=gen) * 0.1).to(kdev, dtype)
    qw = (torch.rand(q.shape[-1], generator=gen) + 0.5).to(kdev)
    kw = (torch.rand(k.shape[-1], generator=gen) + 0.5).to(kdev)
    return q, k, qw, kw


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 96])  # full and partial rotary (rope on 64)
@pytest.mark.parametrize("unit_offset", [False, True])
def test_matches_float64_reference(kdev, gen, layout, dtype, head_dim, unit_offset):
    p = _params()
    q, k, qw, kw = _inputs(gen, kdev, dtype, dq=head_dim, dk=head_dim)
    pos = torch.randint(0, 1 << 22, q.shape[:2], generator=gen).to(kdev)
    rq, rk = qk_norm_rope_reference(q.cpu().double(), k.cpu().double(), pos.cpu(), p, qw.cpu(), kw.cpu(),
                                    eps=1e-6, unit_offset=unit_offset, layout=layout,
                                    compute_dtype=torch.float64)
    q2, k2 = yt.apply_qk_norm_rope(q, k, pos, p, qw, kw, unit_offset=unit_offset, layout=layout)
    assert rel_err(q2, rq) < TOL[dtype] and rel_err(k2, rk) < TOL[dtype]
    yt.apply_qk_norm_rope_(q, k, pos, p, qw, kw, unit_offset=unit_offset, layout=layout)
    assert rel_err(q, rq) < TOL[dtype] and rel_err(k, rk) < TOL[dtype]


@pytest.mark.parametrize("form", ["offsets_int", "offsets_tensor", "cu_seqlens", "fused_views", "bhsd_view"])
def test_position_forms_and_views(kdev, gen, form):
    p = _params()
    dtype = torch.float32
    q, k, qw, kw = _inputs(gen, kdev, dtype, fused=form == "fused_views")
    kwargs, pos_ref = {}, None
    if form == "offsets_int":
        kwargs["offsets"] = 1000
        pos_ref = torch.arange(7)[None].expand(2, 7) + 1000
    elif form == "offsets_tensor":
        off = torch.tensor([5, 70000])
        kwargs["offsets"] = off.to(kdev)
        pos_ref = torch.arange(7)[None] + off[:, None]
    elif form == "cu_seqlens":
        q, k = q.reshape(14, *q.shape[2:]), k.reshape(14, *k.shape[2:])
        cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
        kwargs["cu_seqlens"] = cu.to(kdev)
        pos_ref = torch.cat([torch.arange(3), torch.arange(7), torch.arange(2), torch.zeros(2, dtype=torch.long)])
    elif form == "bhsd_view":  # transformers' [B, H, S, D] storage seen as [B, S, H, D]
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    positions = None
    if pos_ref is None:
        pos_ref = torch.randint(0, 1 << 20, q.shape[:2], generator=gen)
        positions = pos_ref.to(kdev)
    rq, rk = qk_norm_rope_reference(q.cpu().double(), k.cpu().double(), pos_ref, p, qw.cpu(), kw.cpu(),
                                    compute_dtype=torch.float64)
    q_in = q.clone()
    yt.apply_qk_norm_rope_(q, k, positions, p, qw, kw, **kwargs)
    if form == "cu_seqlens":  # the two padding tokens past cu_seqlens[-1] are untouched
        assert torch.equal(q[12:], q_in[12:])
        q, rq, k, rk = q[:12], rq[:12], k[:12], rk[:12]
    assert rel_err(q, rq) < TOL[dtype] and rel_err(k, rk) < TOL[dtype]


def test_every_element_written_out_of_place(kdev, gen):
    """Poisoned outputs: the out-of-place call writes every element, tail channels too."""
    p = _params()
    q, k, qw, kw = _inputs(gen, kdev, torch.float32, dq=96, dk=80)
    pos = torch.randint(0, 1000, q.shape[:2], generator=gen).to(kdev)
    q2, k2 = yt.apply_qk_norm_rope(q, k, pos, p, qw, kw)
    assert not torch.isnan(q2).any() and not torch.isnan(k2).any()
    # with poisoned inputs beyond the tensors' views nothing leaks in
    big = torch.full((2, 7, 5, 96), POISON, device=kdev)
    big[..., :4, :] = q
    q3, _ = yt.apply_qk_norm_rope(big[..., :4, :], k, pos, p, qw, kw)
    assert torch.equal(q3, q2)


def test_gradients_match_autograd_of_the_reference(kdev, gen):
    p = _params()
    q, k, qw, kw = _inputs(gen, kdev, torch.float32, dq=96, dk=96)
    pos = torch.randint(0, 1 << 20, q.shape[:2], generator=gen).to(kdev)
    leaves = [t.clone().requires_grad_() for t in (q, k, qw, kw)]
    qo, ko = yt.apply_qk_norm_rope(*leaves[:2], pos, p, *leaves[2:], unit_offset=True)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    ref = [t.detach().cpu().double().requires_grad_() for t in (q, k, qw, kw)]
    rq, rk = qk_norm_rope_reference(*ref[:2], pos.cpu(), p, *ref[2:], unit_offset=True,
                                    compute_dtype=torch.float64)
    torch.autograd.backward((rq, rk), (gq.cpu().double(), gk.cpu().double()))
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < 1e-5


def test_bad_input_raises_before_writing(kdev, gen):
    p = _params()
    q, k, qw, kw = _inputs(gen, kdev, torch.float32)
    pos = torch.randint(0, 100, q.shape[:2], generator=gen).to(kdev)
    before = q.clone(), k.clone()
    bad = [
        (dict(q_weight=qw[:-1]), ValueError, "q_weight must have shape"),
        (dict(k_weight=torch.ones(96, dtype=torch.int32, device=kdev)), TypeError, "k_weight must be float"),
        (dict(k_weight=None), TypeError, "k_weight must be a torch.Tensor"),
        (dict(q_weight=torch.ones(192, device=kdev)[::2]), ValueError, "q_weight must be contiguous"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=-1e-6), ValueError, "eps must be"),
        (dict(eps=float("nan")), ValueError, "eps must be"),
    ]
    for over, exc, match in bad:
        kw_ = dict(q_weight=qw, k_weight=kw, eps=1e-6)
        kw_.update(over)
        w_q, w_k = kw_.pop("q_weight"), kw_.pop("k_weight")
        with pytest.raises(exc, match=match):
            yt.apply_qk_norm_rope_(q, k, pos, p, w_q, w_k, **kw_)
        with pytest.raises(exc, match=match):
            yt.apply_qk_norm_rope(q, k, pos, p, w_q, w_k, **kw_)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])


def test_matches_transformers_qwen3_norm_then_rope(kdev, gen):
    """transformers' Qwen3 attention path: q_norm / k_norm (Qwen3RMSNorm) on [B, S, H, D],
    then apply_rotary_pos_emb with its rotary embedding's cos/sin, all in bf16."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3 import modeling_qwen3 as mq

    cfg = transformers.Qwen3Config(
        vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                         "original_max_position_embeddings": 8192},
    )
    dtype = torch.bfloat16
    q_norm = mq.Qwen3RMSNorm(128, eps=cfg.rms_norm_eps)
    k_norm = mq.Qwen3RMSNorm(128, eps=cfg.rms_norm_eps)
    with torch.no_grad():
        q_norm.weight.copy_(torch.rand(128, generator=gen) + 0.5)
        k_norm.weight.copy_(torch.rand(128, generator=gen) + 0.5)
    q_norm, k_norm = q_norm.to(kdev, dtype), k_norm.to(kdev, dtype)
    rotary = mq.Qwen3RotaryEmbedding(cfg).to(kdev)
    q = (torch.randn(2, 9, 4, 128, generator=gen) * 4).to(kdev, dtype)
    k = torch.randn(2, 9, 2, 128, generator=gen).to(kdev, dtype)
    pos = torch.randint(8192, 30000, (2, 9), generator=gen).to(kdev)  # past the original context
    with torch.no_grad():
        cos, sin = rotary(q, pos)
        hq, hk = mq.apply_rotary_pos_emb(q_norm(q).transpose(1, 2), k_norm(k).transpose(1, 2), cos, sin)
    params = yt.rope_params_from_config(cfg)
    yt.apply_qk_norm_rope_(q, k, pos, params, q_norm.weight, k_norm.weight, eps=cfg.rms_norm_eps)
    # both in bf16; transformers rounds between norm, weight and rotation, we round once
    assert rel_err(q, hq.transpose(1, 2)) < 2 * TOL[dtype]
    assert rel_err(k, hk.transpose(1, 2)) < 2 * TOL[dtype]


def test_torch_compile_fullgraph(kdev, gen):
    p = _params()
    q, k, qw, kw = _inputs(gen, kdev, torch.float32)
    pos = torch.randint(0, 1 << 20, q.shape[:2], generator=gen).to(kdev)

    def f(q, k, pos):
        q2, k2 = yt.apply_qk_norm_rope(q, k, pos, p, qw, kw)
        yt.apply_qk_norm_rope_(q, k, pos, p, qw, kw)
        return q2 - q, k2 - k

    want = f(q.clone(), k.clone(), pos)
    backend = "aot_eager" if kdev == "cpu" else "inductor"
    got = torch.compile(f, fullgraph=True, backend=backend)(q.clone(), k.clone(), pos)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)
