"""Llama-4 query scaling fused into the rope pass (``q_scale=QueryScale(beta, original_max)``,
Ministral-3 / Mistral-4's ``llama_4_scaling_beta``): q is multiplied, every channel of its
heads, by ``1 + beta * log(1 + floor(position / original_max))`` after the rotation; k is not.

Kernel vs the float64 reference (layouts, dtypes, full and partial rotary, in place and out
of place with poisoned outputs, the three position forms, positions far past
``original_max``), the factor against transformers' ``get_llama_4_attn_scale``, gradients
against autograd of the reference, launch plans, bad input, torch.compile, and the CPU
reference path.
"""

import math

import pytest
import torch

import yarn_triton as yt
from yarn_triton import op
from yarn_triton.reference import llama4_query_scale, qk_norm_rope_reference, rope_reference

from conftest import POISON, TOL, assert_compiles_like_eager, rel_err, requires_cuda

LAYOUTS = ("neox", "interleaved", "deepseek")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OMAX = 64
QS = yt.QueryScale(0.1, OMAX)
F64 = torch.float64


def _params(rot=32):
    return yt.RopeParams.yarn(rot, 10000.0, 4.0, OMAX, mscale=0.707, mscale_all_dim=0.5)


def _randn(gen, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


def _positions(gen, shape, hi=1 << 31):
    """Random int64 positions in [0, hi), the first few at and around multiples of OMAX."""
    pos = torch.randint(0, hi, shape, generator=gen)
    flat = pos.view(-1)
    edge = torch.tensor([0, OMAX - 1, OMAX, 2 * OMAX - 1, 2 * OMAX, 7 * OMAX + 3])
    n = min(flat.numel(), edge.numel())
    flat[:n] = edge[:n]
    return pos


def _truth(q, k, pos, p, layout="neox", qs=QS, inverse=False):
    """float64 rope of q and k, q scaled (factor rounded to q's dtype, as the op does)."""
    return rope_reference(q.cpu().to(F64), None if k is None else k.cpu().to(F64), pos.cpu(), p, layout=layout,
                          compute_dtype=F64, inverse=inverse, q_scale=qs, q_scale_dtype=q.dtype)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Out-of-place results start as NaN (torch.empty_like -> NaN-filled): an element the
    kernel does not write fails the comparison."""
    real = torch.empty_like

    def nan_like(t, *a, **kw):
        out = real(t, *a, **kw)
        return out.fill_(POISON) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", nan_like)


# ------------------------------------------------------------------------------------
# The factor
# ------------------------------------------------------------------------------------
def test_reference_factor_is_transformers_bit_for_bit():
    """Where transformers' float32 division is exact (positions < 2**24), our factor is its
    factor, in float32 and rounded to bf16 / fp16."""
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.models.ministral3 import modeling_ministral3 as mm

    pos = torch.tensor([[0, 1, 63, 64, 65, 127, 128, 5000, 1 << 20, (1 << 24) - 1]])
    for beta, omax in ((0.1, OMAX), (0.3, 4096), (-0.05, 3)):
        theirs = mm.get_llama_4_attn_scale(pos, beta, omax)[:, 0, :, 0]
        ours = llama4_query_scale(pos, beta, omax)
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
        for dt in (torch.bfloat16, torch.float16):
            assert torch.equal(ours.to(dt), theirs.to(dt))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_kernel_factor_equals_the_reference_factor(kdev, dtype):
    """Pass-through channels of ones come out as the factor itself: in bf16/fp16 it is the
    reference (= transformers') factor rounded to nearest even, bit for bit; in float32
    within 2 ulp (log implementations differ)."""
    p = _params(16)
    pos = torch.tensor([[0, 63, 64, 65, 128, 1000, 99999, (1 << 24) - 1, 123456789, (1 << 31) - 1]])
    q = torch.ones(1, pos.shape[1], 2, 24, dtype=dtype, device=kdev)
    out, _ = yt.apply_rope(q, None, pos.to(kdev), p, q_scale=QS)
    want = llama4_query_scale(pos, QS.beta, QS.original_max).to(dtype)[0]
    got = out[0, :, :, 16:].cpu()
    if dtype == torch.float32:
        # a few ulp (log implementations differ); a floor off by one would be ~6e-6 here
        assert torch.allclose(got, want[:, None, None].expand_as(got), rtol=1e-6, atol=0)
    else:
        assert torch.equal(got, want[:, None, None].expand_as(got))


def test_floor_is_exact_at_large_positions(kdev):
    """floor(pos / original_max) is an integer division: right where a float32 (and, past
    2**53, a float64) division rounds up across a multiple; int64 positions far past the
    int32 range included. The pass-through channels carry the factor alone."""
    p = _params(16)
    omax = 4096
    pos = torch.tensor([[(1 << 25) - 1, (1 << 25), 3 * (1 << 30) - 1, (1 << 40) - 1, (1 << 40),
                         (1 << 62) - 1, (1 << 62), (1 << 63) - 1]])
    n = torch.div(pos, omax, rounding_mode="floor")
    exact = 1 + 0.1 * torch.log1p(n.to(F64))
    # the test bites: float32 division gets the first position's floor wrong
    f32_floor = torch.floor(pos.float() / omax).to(torch.int64)
    assert f32_floor[0, 0] != n[0, 0]
    q = torch.ones(1, pos.shape[1], 1, 20, device=kdev)
    yt.apply_rope_(q, None, pos.to(kdev), p, q_scale=(0.1, omax))
    got = q[0, :, 0, 16:].cpu().double()
    assert torch.allclose(got, exact[0, :, None].expand_as(got), rtol=1e-6, atol=0)
    # off by one in the floor at the first position would move the factor by ~6e-6
    assert abs(got[0, 0].item() - (1 + 0.1 * math.log1p(8192))) > 1e-6


# ------------------------------------------------------------------------------------
# Kernel vs the float64 reference
# ------------------------------------------------------------------------------------
def _check(name, out, ref, dtype):
    out = out.cpu()
    assert not torch.isnan(out).any(), f"{name} has NaN (unwritten or poisoned)"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{name} rel err {err:.3g} >= {TOL[dtype]}"
    worst = (out.double() - ref).abs().max().item()
    assert worst <= 8 * TOL[dtype] * ref.abs().max().item(), f"{name} worst {worst}"


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_float64_reference(dtype, layout, partial, inplace, kdev, gen, poisoned_outputs):
    """q scaled on every channel (pass-through ones of a partial rotary included), k only
    rotated. In place on views of one fused projection whose other elements are NaN
    poison (nothing outside the views is written); out of place into NaN-filled outputs
    (every element is written)."""
    p = _params(32)
    hq, hk, d = 4, 2, 32 + (16 if partial else 0)
    B, S = 2, 7
    buf = _randn(gen, B, S, hq + 2 * hk, d + 2, dtype=dtype, device=kdev)
    buf[..., hq + hk:, :] = POISON
    buf[..., d:] = POISON
    q, k = buf[..., :hq, :d], buf[..., hq:hq + hk, :d]
    pos = _positions(gen, (B, S))
    rq, rk = _truth(q, k, pos, p, layout)
    if inplace:
        out_q, out_k = yt.apply_rope_(q, k, pos.to(kdev), p, layout=layout, q_scale=QS)
        assert out_q is q and out_k is k
        assert torch.isnan(buf[..., hq + hk:, :]).all() and torch.isnan(buf[..., d:]).all()
    else:
        q0, k0 = q.clone(), k.clone()
        out_q, out_k = yt.apply_rope(q, k, pos.to(kdev), p, layout=layout, q_scale=QS)
        assert torch.equal(q, q0) and torch.equal(k, k0)  # inputs untouched
    _check("q", out_q, rq, dtype)
    _check("k", out_k, rk, dtype)
    if partial:  # k's pass-through channels are not scaled (nor touched in place)
        assert torch.equal(out_k[..., 32:].cpu(), rk[..., 32:].to(dtype))


def _packed(gen, kdev, dtype, hq=3, hk=1, d=40):
    q = _randn(gen, 14, hq, d, dtype=dtype, device=kdev)
    k = _randn(gen, 14, hk, d, dtype=dtype, device=kdev)
    return q, k


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
@pytest.mark.parametrize("form", ["positions", "broadcast", "offsets_int", "offsets_big", "offsets_tensor",
                                  "cu_seqlens", "cu_seqlens_offsets", "bhsd_view"])
def test_position_forms(form, inplace, kdev, gen, poisoned_outputs):
    """The factor uses the position the rotation uses, in every form (derived positions
    included), on partial-rotary heads."""
    p = _params(32)
    dtype = torch.float32
    B, S = 2, 7
    q = _randn(gen, B, S, 3, 40, device=kdev)
    k = _randn(gen, B, S, 1, 40, device=kdev)
    kwargs, positions = {}, None
    if form == "positions":
        pos_ref = _positions(gen, (B, S))
        positions = pos_ref.to(kdev)
    elif form == "broadcast":
        pos_ref = _positions(gen, (S,))
        positions = pos_ref.to(kdev)
        pos_ref = pos_ref.expand(B, S)
    elif form in ("offsets_int", "offsets_big"):
        off = 1000 if form == "offsets_int" else (1 << 30) + 17
        kwargs["offsets"] = off
        pos_ref = torch.arange(S)[None].expand(B, S) + off
    elif form == "offsets_tensor":
        off = torch.tensor([5, 70000])
        kwargs["offsets"] = off.to(kdev)
        pos_ref = torch.arange(S)[None] + off[:, None]
    elif form in ("cu_seqlens", "cu_seqlens_offsets"):
        q, k = q.reshape(B * S, 3, 40), k.reshape(B * S, 1, 40)
        cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
        kwargs["cu_seqlens"] = cu.to(kdev)
        starts = torch.tensor([0, 0, 0]) if form == "cu_seqlens" else torch.tensor([60, 4000, 1 << 20])
        if form == "cu_seqlens_offsets":
            kwargs["offsets"] = starts.to(kdev)
        pos_ref = torch.cat([torch.arange(3) + starts[0], torch.arange(7) + starts[1], torch.arange(2) + starts[2],
                             torch.zeros(2, dtype=torch.long)])
    elif form == "bhsd_view":  # transformers' [B, H, S, D] storage seen as [B, S, H, D]
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        pos_ref = _positions(gen, (B, S))
        positions = pos_ref.to(kdev)
    rq, rk = _truth(q, k, pos_ref, p)
    q_in = q.clone()
    fn = yt.apply_rope_ if inplace else yt.apply_rope
    out_q, out_k = fn(q, k, positions, p, q_scale=QS, **kwargs)
    if form.startswith("cu_seqlens"):  # the two padding tokens past cu_seqlens[-1]
        if inplace:
            assert torch.equal(out_q[12:], q_in[12:])
        out_q, rq, out_k, rk = out_q[:12], rq[:12], out_k[:12], rk[:12]
    _check("q", out_q, rq, dtype)
    _check("k", out_k, rk, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inverse_rotation_is_scaled_too(layout, kdev, gen):
    """With inverse=True, q_out = factor * R(-angle) q."""
    p = _params(32)
    q = _randn(gen, 2, 5, 2, 48, device=kdev)
    pos = _positions(gen, (2, 5))
    rq, _ = _truth(q, None, pos, p, layout, inverse=True)
    out, _ = yt.apply_rope(q, None, pos.to(kdev), p, layout=layout, inverse=True, q_scale=QS)
    _check("q", out, rq, torch.float32)


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_qk_norm_variants_take_q_scale(dtype, unit_offset, kdev, gen):
    """RMSNorm, rotation, then the query scale, in the same pass (partial rotary)."""
    p = _params(32)
    q = _randn(gen, 2, 7, 4, 48, dtype=dtype, device=kdev, scale=5.0)
    k = _randn(gen, 2, 7, 2, 48, dtype=dtype, device=kdev, scale=0.1)
    qw = (torch.rand(48, generator=gen) + 0.5).to(kdev)
    kw = (torch.rand(48, generator=gen) + 0.5).to(kdev)
    pos = _positions(gen, (2, 7))
    rq, rk = qk_norm_rope_reference(q.cpu().to(F64), k.cpu().to(F64), pos, p, qw.cpu(), kw.cpu(),
                                    unit_offset=unit_offset, compute_dtype=F64, q_scale=QS)
    if dtype != torch.float32:  # the op rounds the factor to q's dtype
        rq, rk = qk_norm_rope_reference(q.cpu().to(F64), k.cpu().to(F64), pos, p, qw.cpu(), kw.cpu(),
                                        unit_offset=unit_offset, compute_dtype=F64, q_scale=None)
        rq = rq * llama4_query_scale(pos, QS.beta, QS.original_max, F64).to(dtype).to(F64)[..., None, None]
    q2, k2 = yt.apply_qk_norm_rope(q, k, pos.to(kdev), p, qw, kw, unit_offset=unit_offset, q_scale=QS)
    _check("q", q2, rq, dtype)
    _check("k", k2, rk, dtype)
    yt.apply_qk_norm_rope_(q, k, pos.to(kdev), p, qw, kw, unit_offset=unit_offset, q_scale=QS)
    _check("q", q, rq, dtype)
    _check("k", k, rk, dtype)


# ------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("partial", [False, True], ids=["full", "partial"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_autograd_of_the_reference(layout, partial, kdev, gen):
    """d/dq of factor * R(q) is R^T(factor * g): the backward kernel scales the gradient of
    every channel of q (pass-through ones too) and leaves k's alone."""
    p = _params(32)
    d = 48 if partial else 32
    q = _randn(gen, 2, 5, 3, d, device=kdev)
    k = _randn(gen, 2, 5, 1, d, device=kdev)
    pos = _positions(gen, (2, 5))
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = yt.apply_rope(ql, kl, pos.to(kdev), p, layout=layout, q_scale=QS)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    qr, kr = q.cpu().to(F64).requires_grad_(), k.cpu().to(F64).requires_grad_()
    rq, rk = rope_reference(qr, kr, pos, p, layout=layout, compute_dtype=F64, q_scale=QS)
    torch.autograd.backward((rq, rk), (gq.cpu().to(F64), gk.cpu().to(F64)))
    assert rel_err(ql.grad, qr.grad) < 1e-5 and rel_err(kl.grad, kr.grad) < 1e-5


def test_gradients_of_norm_and_scale_and_of_inplace_under_autograd(kdev, gen):
    """QK-norm + rope + query scale: gradients of q, k and both weights; and apply_rope_ on
    a non-leaf under autograd records the scaled rotation."""
    p = _params(32)
    q = _randn(gen, 2, 5, 3, 48, device=kdev, scale=3.0)
    k = _randn(gen, 2, 5, 1, 48, device=kdev)
    qw = (torch.rand(48, generator=gen) + 0.5).to(kdev)
    kw = (torch.rand(48, generator=gen) + 0.5).to(kdev)
    pos = _positions(gen, (2, 5))
    leaves = [t.clone().requires_grad_() for t in (q, k, qw, kw)]
    qo, ko = yt.apply_qk_norm_rope(*leaves[:2], pos.to(kdev), p, *leaves[2:], q_scale=QS)
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    ref = [t.detach().cpu().to(F64).requires_grad_() for t in (q, k, qw, kw)]
    rq, rk = qk_norm_rope_reference(*ref[:2], pos, p, *ref[2:], compute_dtype=F64, q_scale=QS)
    torch.autograd.backward((rq, rk), (gq.cpu().to(F64), gk.cpu().to(F64)))
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < 1e-5

    ql = q.clone().requires_grad_()
    qq = ql * 1.0
    yt.apply_rope_(qq, None, pos.to(kdev), p, q_scale=QS)
    qq.backward(gq)
    qr = q.cpu().to(F64).requires_grad_()
    rope_reference(qr, None, pos, p, compute_dtype=F64, q_scale=QS)[0].backward(gq.cpu().to(F64))
    assert rel_err(ql.grad, qr.grad) < 1e-5


# ------------------------------------------------------------------------------------
# Host path: plans, checks
# ------------------------------------------------------------------------------------
def test_plans_tell_query_scales_apart(kdev, gen):
    """Same shapes with no scale, one scale, another: each call right, one plan each (the
    scale's values are fixed in a plan), and the backward plans apart too."""
    p = _params(32)
    op.plans._PLANS.clear()
    pos = _positions(gen, (2, 5))
    for qs in (None, QS, yt.QueryScale(0.2, 100), None, QS, (0.1, OMAX)):
        for _ in range(2):
            q = _randn(gen, 2, 5, 3, 40, device=kdev)
            rq, _ = _truth(q, None, pos, p, qs=qs)
            yt.apply_rope_(q, None, pos.to(kdev), p, q_scale=qs)
            assert rel_err(q, rq) < TOL[torch.float32], qs
    assert op.plan_cache_size() == 3
    for qs in (None, QS, None, QS):
        ql = _randn(gen, 2, 5, 3, 40, device=kdev).requires_grad_()
        g = _randn(gen, 2, 5, 3, 40, device=kdev)
        yt.apply_rope(ql, None, pos.to(kdev), p, q_scale=qs)[0].backward(g)
        qr = ql.detach().cpu().to(F64).requires_grad_()
        rope_reference(qr, None, pos, p, compute_dtype=F64, q_scale=qs)[0].backward(g.cpu().to(F64))
        assert rel_err(ql.grad, qr.grad) < 1e-5, qs


def test_bad_input_raises_before_writing(kdev, gen):
    p = _params(32)
    q = _randn(gen, 2, 5, 3, 40, device=kdev)
    k = _randn(gen, 2, 5, 1, 40, device=kdev)
    pos = _positions(gen, (2, 5)).to(kdev)
    before = q.clone(), k.clone()
    bad = [
        ((float("nan"), 64), ValueError, "q_scale.beta must be a finite number"),
        ((float("inf"), 64), ValueError, "q_scale.beta must be a finite number"),
        (("0.1", 64), ValueError, "q_scale.beta must be a finite number"),
        ((True, 64), ValueError, "q_scale.beta must be a finite number"),
        ((0.1, 0), ValueError, "q_scale.original_max must be a positive int"),
        ((0.1, -64), ValueError, "q_scale.original_max must be a positive int"),
        ((0.1, 64.0), ValueError, "q_scale.original_max must be a positive int"),
        ((0.1, True), ValueError, "q_scale.original_max must be a positive int"),
        ((0.1, 1 << 63), ValueError, "q_scale.original_max must be a positive int"),
        ((0.1,), TypeError, "q_scale must be a QueryScale"),
        (0.1, TypeError, "q_scale must be a QueryScale"),
        ([0.1, 64], TypeError, "q_scale must be a QueryScale"),
    ]
    for _ in range(2):  # the second round with plans of the good signature in place
        for qs, exc, match in bad:
            with pytest.raises(exc, match=match):
                yt.apply_rope_(q, k, pos, p, q_scale=qs)
            with pytest.raises(exc, match=match):
                yt.apply_rope(q, k, pos, p, q_scale=qs)
            with pytest.raises(exc, match=match):
                yt.apply_qk_norm_rope_(q, k, pos, p, torch.ones(40, device=kdev), torch.ones(40, device=kdev),
                                       q_scale=qs)
        assert torch.equal(q, before[0]) and torch.equal(k, before[1])
        yt.apply_rope(q, k, pos, p, q_scale=QS)
        qq, kk = q.clone(), k.clone()
        yt.apply_rope_(qq, kk, pos, p, q_scale=QS)
    # M-RoPE params: which stream's position would scale q is not defined
    pm = p.with_mrope([8, 4, 4])
    pos3 = pos.expand(3, *pos.shape)
    for positions in (pos3, pos):
        with pytest.raises(ValueError, match="q_scale is not supported with M-RoPE"):
            yt.apply_rope_(q, k, positions, pm, q_scale=QS)
        with pytest.raises(ValueError, match="q_scale is not supported with M-RoPE"):
            yt.apply_rope(q, k, positions, pm, q_scale=QS)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])
    with pytest.raises(ValueError, match="M-RoPE"):
        rope_reference(q.cpu(), None, pos3.cpu(), pm, q_scale=QS)


def test_cpu_reference_path(monkeypatch, gen):
    """CPU tensors outside the interpreter take the PyTorch reference (float32 angles):
    forced here by pretending the kernel does not take CPU tensors, it gives the float32
    reference's result bit for bit, norm and bf16 included (the factor rounded to q's
    dtype there too, not to the float32 of the normalised heads)."""
    monkeypatch.setattr(op.launch, "uses_kernel", lambda t: False)
    p = _params(32)
    pos = _positions(gen, (2, 5), hi=1 << 20)
    for dtype in (torch.float32, torch.bfloat16):
        q = _randn(gen, 2, 5, 3, 40, dtype=dtype)
        k = _randn(gen, 2, 5, 1, 40, dtype=dtype)
        rq, rk = rope_reference(q, k, pos, p, q_scale=QS)
        q2, k2 = yt.apply_rope(q, k, pos, p, q_scale=QS)
        assert torch.equal(q2, rq) and torch.equal(k2, rk)
        qw = torch.rand(40, generator=gen) + 0.5
        rq, rk = qk_norm_rope_reference(q, k, pos, p, qw, qw, q_scale=QS)
        qq, kk = q.clone(), k.clone()
        yt.apply_qk_norm_rope_(qq, kk, pos, p, qw, qw, q_scale=QS)
        assert torch.equal(qq, rq) and torch.equal(kk, rk)
        if dtype == torch.bfloat16:  # and the float64 truth within tolerance
            tq, _ = _truth(q, k, pos, p)
            assert rel_err(q2, tq) < TOL[dtype]


# ------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------
def test_torch_compile_fullgraph(kdev, gen):
    """Both ops trace with the scale (fullgraph), forward and backward."""
    p = _params(32)
    q = _randn(gen, 2, 6, 3, 48, device=kdev)
    k = _randn(gen, 2, 6, 1, 48, device=kdev)
    pos = _positions(gen, (2, 6)).to(kdev)

    def f(q, k, pos):
        q2, k2 = yt.apply_rope(q, k, pos, p, layout="deepseek", q_scale=QS)
        q3, k3 = q2.detach().clone(), k2.detach().clone()
        yt.apply_rope_(q3, k3, pos, p, q_scale=QS)
        return q2, k2, q3, k3

    assert_compiles_like_eager(f, q.clone().requires_grad_(), k, pos)


# ------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------
@requires_cuda
def test_fast_launch_matches_triton_launch_with_q_scale(monkeypatch, gen):
    """The cached-compiled-kernel launch carries the scale's arguments like Triton's own
    launcher does (bit-identical), for several original_max values (no recompile per value
    class needed to be right)."""
    from yarn_triton.kernels import launcher

    p = _params(32)
    q = _randn(gen, 3, 9, 6, 40, dtype=torch.bfloat16, device="cuda")
    pos = _positions(gen, (3, 9)).to("cuda")
    for qs in (QS, (0.1, 1), (0.25, 8192), (0.1, 12345)):
        outs = []
        for fast in (False, True, True):
            monkeypatch.setattr(launcher, "FAST_LAUNCH", fast)
            qq = q.clone()
            yt.apply_rope_(qq, None, pos, p, q_scale=qs)
            yt.apply_rope_(qq, None, None, p, offsets=(1 << 31) + 5, q_scale=qs)  # int64-wide pos_base
            outs.append(qq)
        for qq in outs[1:]:
            assert torch.equal(qq, outs[0])


@requires_cuda
def test_compiled_graph_launches_the_kernel_with_q_scale(gen):
    """With torch.library.triton_op, inductor's code launches rope_kernel with the scale."""
    if not op.COMPILER_SEES_KERNEL:
        pytest.skip("this torch has no torch.library.triton_op")
    from torch._inductor.utils import run_and_get_code

    p = _params(32)

    def f(q, pos):
        return yt.apply_rope(q, None, pos, p, q_scale=QS)[0]

    q = _randn(gen, 2, 16, 4, 48, device="cuda")
    pos = _positions(gen, (2, 16)).to("cuda")
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(f, fullgraph=True), q, pos)
    assert "rope_kernel" in "\n".join(code)
    rq, _ = _truth(q, None, pos, p)
    assert rel_err(got, rq) < TOL[torch.float32]


@requires_cuda
def test_large_bf16_batch_matches_reference(gen):
    """A prefill-sized bf16 batch through the native kernel (many programs, head loop)."""
    p = _params(64)
    q = _randn(gen, 1, 4096, 32, 128, dtype=torch.bfloat16, device="cuda")
    k = _randn(gen, 1, 4096, 8, 128, dtype=torch.bfloat16, device="cuda")
    pos = torch.arange(4096)[None] * 37
    rq, rk = _truth(q, k, pos, p)
    yt.apply_rope_(q, k, pos.to("cuda"), p, q_scale=QS)
    _check("q", q, rq, torch.bfloat16)
    _check("k", k, rk, torch.bfloat16)
