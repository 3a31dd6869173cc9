"""The example attention layers (``yarn_triton.attention``) against a plain PyTorch
implementation: materialised cos/sin (``rope_reference`` in float64), explicit softmax
attention, float64 throughout.

Device: CUDA (native kernel) when a GPU is present; otherwise the CPU, where the op runs
the kernel under ``TRITON_INTERPRET=1`` and the PyTorch reference path without it.
"""

import pytest
import torch

from yarn_triton import RopeParams, rope_reference
from yarn_triton.attention import YarnGQAAttention, YarnMLAAttention, rope_qk
from yarn_triton.kernels.rope_kernel import INTERPRETED

from conftest import rel_err

DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRETED) else "cpu"
F64 = torch.float64
# Output vs the float64 truth: fp32 keeps ~1e-7 per op; bf16 is dominated by its 2**-8
# rounding of weights, activations and matmul results (not by the rope).
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def yarn_params(dim: int) -> RopeParams:
    # cos_sin_scale != 1 and softmax_scale_factor != 1, so both scale factors are exercised
    return RopeParams.yarn(dim, 10000.0, 4.0, 64, mscale=1.0, mscale_all_dim=0.8)


def positions_for(b: int, s: int) -> torch.Tensor:
    # rows at different offsets, one past a typical original context
    return (torch.arange(s) + torch.arange(b).unsqueeze(1) * 300).to(DEVICE)


def _w(linear):
    return linear.weight.to(F64)  # differentiable cast: the gradient test backprops through it


def _rms(x, norm):
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return x * norm.weight.to(F64)


def _attend(q, k, v, scale, mask=None, causal=True):
    """Plain softmax attention on ``[B, S, H, D]``; k/v heads repeated for GQA."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) * scale
    s, t = scores.shape[-2:]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:
        scores = scores.masked_fill(torch.ones(s, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)


def ref_gqa(m: YarnGQAAttention, x, pos, mask=None):
    b, s, _ = x.shape
    h, hk, d = m.num_heads, m.num_kv_heads, m.head_dim
    qkv = x.to(F64) @ _w(m.qkv_proj).T
    if m.qkv_proj.bias is not None:
        qkv = qkv + m.qkv_proj.bias.to(F64)
    q, k, v = qkv.view(b, s, h + 2 * hk, d).split((h, hk, hk), dim=2)
    q, k = rope_reference(q, k, pos, m.params, layout=m.layout, compute_dtype=F64)
    scale = d**-0.5 * m.params.softmax_scale_factor
    out = _attend(q, k, v, scale, mask)
    return out.reshape(b, s, h * d) @ _w(m.o_proj).T


def ref_mla(m: YarnMLAAttention, x, pos):
    b, s, _ = x.shape
    h, nope, rope, vd = m.num_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    x = x.to(F64)
    if m.q_lora_rank is None:
        q = x @ _w(m.q_proj).T
    else:
        q = _rms(x @ _w(m.q_a_proj).T, m.q_a_layernorm) @ _w(m.q_b_proj).T
    q_nope, q_pe = q.view(b, s, h, nope + rope).split((nope, rope), dim=-1)
    latent, k_pe = (x @ _w(m.kv_a_proj_with_mqa).T).split((m.kv_lora_rank, rope), dim=-1)
    q_pe, k_pe = rope_reference(q_pe, k_pe.unsqueeze(2), pos, m.params, layout=m.layout, compute_dtype=F64)
    kv = (_rms(latent, m.kv_a_layernorm) @ _w(m.kv_b_proj).T).view(b, s, h, nope + vd)
    k_nope, v = kv.split((nope, vd), dim=-1)
    q = torch.cat((q_nope, q_pe), dim=-1)
    k = torch.cat((k_nope, k_pe.expand(b, s, h, rope)), dim=-1)
    out = _attend(q, k, v, (nope + rope) ** -0.5 * m.params.softmax_scale_factor)
    return out.reshape(b, s, h * vd) @ _w(m.o_proj).T


def make_gqa(heads, kv_heads, head_dim, rope_dim, layout, dtype, bias=False, seed=0):
    torch.manual_seed(seed)
    m = YarnGQAAttention(64, heads, kv_heads, head_dim, params=yarn_params(rope_dim), layout=layout, bias=bias)
    return m.to(device=DEVICE, dtype=dtype).eval()


def make_mla(q_lora_rank, layout, dtype, seed=0):
    torch.manual_seed(seed)
    m = YarnMLAAttention(
        64, 4, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        params=yarn_params(8), q_lora_rank=q_lora_rank, layout=layout,
    )
    return m.to(device=DEVICE, dtype=dtype).eval()


# ------------------------------------------------------------------------------------
# Forward vs the plain implementation
# ------------------------------------------------------------------------------------
GQA_CASES = [
    # heads, kv_heads, head_dim, rope_dim, layout, bias, dtype
    (4, 4, 16, 16, "neox", False, torch.float32),  # MHA
    (4, 2, 16, 16, "neox", True, torch.float32),  # GQA, Qwen2-style bias
    (4, 1, 16, 16, "interleaved", False, torch.float32),  # MQA
    (4, 2, 16, 16, "deepseek", False, torch.float32),
    (4, 2, 16, 8, "neox", False, torch.float32),  # partial rotary
    (4, 2, 16, 16, "neox", False, torch.bfloat16),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,rope_dim,layout,bias,dtype", GQA_CASES)
def test_gqa_matches_plain_attention(heads, kv_heads, head_dim, rope_dim, layout, bias, dtype, gen):
    m = make_gqa(heads, kv_heads, head_dim, rope_dim, layout, dtype, bias)
    x = torch.randn(2, 8, 64, generator=gen).to(DEVICE, dtype)
    pos = positions_for(2, 8)
    with torch.no_grad():
        out = m(x, pos)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref_gqa(m, x, pos)) < TOL[dtype]


@pytest.mark.parametrize(
    "q_lora_rank,layout,dtype",
    [
        (None, "deepseek", torch.float32),
        (32, "deepseek", torch.float32),
        (None, "interleaved", torch.float32),
        (32, "neox", torch.float32),
        (32, "deepseek", torch.bfloat16),
    ],
)
def test_mla_matches_plain_attention(q_lora_rank, layout, dtype, gen):
    m = make_mla(q_lora_rank, layout, dtype)
    x = torch.randn(2, 8, 64, generator=gen).to(DEVICE, dtype)
    pos = positions_for(2, 8)
    with torch.no_grad():
        out = m(x, pos)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref_mla(m, x, pos)) < TOL[dtype]


def test_gqa_1d_positions_and_mask(gen):
    """``[S]`` positions broadcast over the batch; an explicit mask replaces causality."""
    m = make_gqa(4, 2, 16, 16, "neox", torch.float32)
    x = torch.randn(2, 6, 64, generator=gen).to(DEVICE)
    pos = (torch.arange(6) + 5).to(DEVICE)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=DEVICE)
    mask[0, ..., :2] = False  # row 0: the first two keys are padding
    with torch.no_grad():
        out = m(x, pos, attn_mask=mask)
    want = ref_gqa(m, x, pos.expand(2, 6), mask=mask)
    assert rel_err(out, want) < TOL[torch.float32]


# ------------------------------------------------------------------------------------
# The data path: rope runs in place on views of the projection outputs
# ------------------------------------------------------------------------------------
def _capture(linear):
    box = {}
    handle = linear.register_forward_hook(lambda mod, inp, out: box.__setitem__("out", out))
    return box, handle


def test_gqa_rotates_projection_in_place(gen):
    m = make_gqa(4, 2, 16, 16, "neox", torch.float32)
    x = torch.randn(1, 5, 64, generator=gen).to(DEVICE)
    pos = positions_for(1, 5)
    box, hook = _capture(m.qkv_proj)
    with torch.no_grad():
        raw = m.qkv_proj(x).view(1, 5, 8, 16).clone()
        m(x, pos)
    hook.remove()
    after = box["out"].view(1, 5, 8, 16)  # the projection's own output tensor
    q, k, v = raw.split((4, 2, 2), dim=2)
    want_q, want_k = rope_reference(q, k, pos, m.params, compute_dtype=F64)
    assert rel_err(after[:, :, :4], want_q) < 2e-6
    assert rel_err(after[:, :, 4:6], want_k) < 2e-6
    assert torch.equal(after[:, :, 6:], v)


def test_mla_rotates_projections_in_place(gen):
    m = make_mla(None, "deepseek", torch.float32)
    x = torch.randn(1, 5, 64, generator=gen).to(DEVICE)
    pos = positions_for(1, 5)
    qbox, qhook = _capture(m.q_proj)
    kbox, khook = _capture(m.kv_a_proj_with_mqa)
    with torch.no_grad():
        q_raw = m.q_proj(x).view(1, 5, 4, 24).clone()
        kv_raw = m.kv_a_proj_with_mqa(x).clone()
        m(x, pos)
    qhook.remove()
    khook.remove()
    q_after = qbox["out"].view(1, 5, 4, 24)
    kv_after = kbox["out"]
    want_q, want_k = rope_reference(
        q_raw[..., 16:], kv_raw[..., 24:].unsqueeze(2), pos, m.params, layout="deepseek", compute_dtype=F64
    )
    assert rel_err(q_after[..., 16:], want_q) < 2e-6
    assert rel_err(kv_after[..., 24:].unsqueeze(2), want_k) < 2e-6
    assert torch.equal(q_after[..., :16], q_raw[..., :16])  # nope channels untouched
    assert torch.equal(kv_after[..., :24], kv_raw[..., :24])  # latent untouched


# ------------------------------------------------------------------------------------
# Training: the differentiable out-of-place op
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_gradients_match_plain_attention(kind, gen):
    m = make_gqa(4, 2, 16, 16, "neox", torch.float32) if kind == "gqa" else make_mla(32, "deepseek", torch.float32)
    m.train()
    ref = ref_gqa if kind == "gqa" else ref_mla
    x = torch.randn(2, 6, 64, generator=gen).to(DEVICE)
    pos = positions_for(2, 6)
    w = torch.randn(2, 6, 64, generator=gen).to(DEVICE)

    xa = x.clone().requires_grad_()
    (m(xa, pos) * w).sum().backward()
    got = [xa.grad] + [p.grad.clone() for p in m.parameters()]

    # the same weights through the plain float64 implementation
    m.zero_grad(set_to_none=True)
    x64 = x.to(F64).requires_grad_()
    (ref(m, x64, pos) * w.to(F64)).sum().backward()
    want = [x64.grad] + [p.grad for p in m.parameters()]
    for g, wg in zip(got, want):
        assert rel_err(g, wg) < 1e-5


def test_rope_qk_in_place_unless_autograd_records(gen):
    params = yarn_params(8)
    q = torch.randn(1, 4, 2, 8, generator=gen).to(DEVICE)
    k = torch.randn(1, 4, 1, 8, generator=gen).to(DEVICE)
    pos = torch.arange(4, device=DEVICE)
    with torch.no_grad():
        qo, ko = rope_qk(q, k, pos, params)
    assert qo is q and ko is k
    qg = torch.randn(1, 4, 2, 8, generator=gen).to(DEVICE).requires_grad_()
    qo, ko = rope_qk(qg, k.clone(), pos, params)
    assert qo is not qg and qo.requires_grad
    want, _ = rope_reference(qg.detach(), None, pos, params, compute_dtype=F64)
    assert rel_err(qo.detach(), want) < 2e-6


def test_constructor_checks():
    with pytest.raises(ValueError, match="rope_dim"):
        YarnMLAAttention(64, 4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                         v_head_dim=16, params=yarn_params(16))
    with pytest.raises(ValueError, match="head_dim"):
        YarnGQAAttention(64, 4, 2, 16, params=yarn_params(32))
    with pytest.raises(ValueError, match="multiple"):
        YarnGQAAttention(64, 4, 3, 16, params=yarn_params(16))
    with pytest.raises(TypeError):
        YarnGQAAttention(64, 4, 2, 16, params=None)
