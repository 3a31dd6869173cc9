"""``rotary_at="end"``: the rotary part is the last ``rotary_dim`` channels of each head and
the pass-through channels come first (Mistral-4's ``[q_nope | q_rope]`` query heads), the
kernel's TAIL_FIRST switch.

Kernel vs the float64 reference by relative error on fresh random inputs: with and without
the Llama-4 query scale (which scales the leading pass-through channels too), in place (on
views whose surroundings are NaN poison) and out of place (into NaN-filled outputs), the
three layouts, inverse, the fused RMSNorm (tail weights ``weight[:tail]``), gradients
against autograd of the float64 reference, launch plans that tell start and end apart,
torch.compile, and a bad ``rotary_at`` refused before anything is written.
"""

import pytest
import torch

import yarn_triton as yt
from yarn_triton import op
from yarn_triton.reference import qk_norm_rope_reference, rope_reference

from conftest import POISON, TOL, assert_compiles_like_eager, rel_err

LAYOUTS = ("neox", "interleaved", "deepseek")
DTYPES = (torch.float32, torch.bfloat16)
OMAX = 64
QS = yt.QueryScale(0.1, OMAX)
F64 = torch.float64
ROT = 16


def _params(rot=ROT):
    return yt.RopeParams.yarn(rot, 10000.0, 4.0, OMAX, mscale=0.707, mscale_all_dim=0.5)


def _randn(gen, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype)


def _positions(gen, shape, hi=1 << 20):
    """Random positions, several past OMAX (the scale is not 1 there), one at 0."""
    pos = torch.randint(0, hi, shape, generator=gen)
    pos.view(-1)[0] = 0
    return pos


def _truth(q, k, pos, p, layout="neox", qs=QS, inverse=False):
    return rope_reference(q.cpu().to(F64), None if k is None else k.cpu().to(F64), pos.cpu(), p, layout=layout,
                          compute_dtype=F64, inverse=inverse, q_scale=qs, q_scale_dtype=q.dtype, rotary_at="end")


def _check(name, out, ref, dtype):
    out = out.cpu()
    assert not torch.isnan(out).any(), f"{name} has NaN (unwritten or poisoned)"
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"{name} rel err {err:.3g} >= {TOL[dtype]}"


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Out-of-place results start as NaN: an element the kernel does not write fails."""
    real = torch.empty_like

    def nan_like(t, *a, **kw):
        out = real(t, *a, **kw)
        return out.fill_(POISON) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", nan_like)


def test_reference_end_is_start_on_rolled_heads(gen):
    """The reference's "end" is its "start" with the head's channels rolled: an oracle
    for the oracle."""
    p = _params()
    q = _randn(gen, 2, 5, 3, 40).double()
    k = _randn(gen, 2, 5, 1, 24).double()
    pos = _positions(gen, (2, 5))
    for layout in LAYOUTS:
        for qs in (None, QS):
            eq, ek = rope_reference(q, k, pos, p, layout=layout, compute_dtype=F64, q_scale=qs, rotary_at="end")
            sq, sk = rope_reference(q.roll(-24, -1), k.roll(-8, -1), pos, p, layout=layout, compute_dtype=F64,
                                    q_scale=qs)
            assert torch.equal(eq, sq.roll(24, -1)) and torch.equal(ek, sk.roll(8, -1))


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "qscale"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_float64_reference(dtype, layout, scaled, inplace, kdev, gen, poisoned_outputs):
    """q heads [24 pass-through | 16 rotary], k heads [8 | 16], views of one buffer whose
    other elements are NaN: in place nothing outside the views is written (and without
    a scale the pass-through channels are left bit for bit); out of place every element
    of the output is written and the inputs are untouched."""
    p = _params()
    qs = QS if scaled else None
    hq, hk, dq, dk = 4, 2, 40, 24
    B, S = 2, 7
    buf = _randn(gen, B, S, hq + hk + 1, dq + 3, dtype=dtype, device=kdev)
    buf[..., hq + hk:, :] = POISON
    q = buf[..., :hq, 1:1 + dq]
    k = buf[..., hq:hq + hk, 2:2 + dk]
    buf[..., :hq, 0] = POISON
    buf[..., :hq, 1 + dq:] = POISON
    buf[..., hq:hq + hk, :2] = POISON
    buf[..., hq:hq + hk, 2 + dk:] = POISON
    assert not torch.isnan(q).any() and not torch.isnan(k).any()
    n_poison = int(torch.isnan(buf).sum())
    pos = _positions(gen, (B, S))
    rq, rk = _truth(q, k, pos, p, layout, qs)
    q0, k0 = q.clone(), k.clone()
    if inplace:
        out_q, out_k = yt.apply_rope_(q, k, pos.to(kdev), p, layout=layout, q_scale=qs, rotary_at="end")
        assert out_q is q and out_k is k
        assert int(torch.isnan(buf).sum()) == n_poison
    else:
        out_q, out_k = yt.apply_rope(q, k, pos.to(kdev), p, layout=layout, q_scale=qs, rotary_at="end")
        assert torch.equal(q, q0) and torch.equal(k, k0)
    _check("q", out_q, rq, dtype)
    _check("k", out_k, rk, dtype)
    # k's leading pass-through channels are never scaled; q's only with the scale
    assert torch.equal(out_k[..., :8].cpu(), k0[..., :8].cpu())
    if not scaled:
        assert torch.equal(out_q[..., :24].cpu(), q0[..., :24].cpu())
    else:
        assert not torch.equal(out_q[..., :24].cpu(), q0[..., :24].cpu())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inverse(layout, kdev, gen, poisoned_outputs):
    p = _params()
    q = _randn(gen, 2, 5, 3, 40, device=kdev)
    k = _randn(gen, 2, 5, 1, 40, device=kdev)
    pos = _positions(gen, (2, 5))
    for qs in (None, QS):
        rq, rk = _truth(q, k, pos, p, layout, qs, inverse=True)
        out_q, out_k = yt.apply_rope(q, k, pos.to(kdev), p, layout=layout, inverse=True, q_scale=qs,
                                     rotary_at="end")
        _check("q", out_q, rq, torch.float32)
        _check("k", out_k, rk, torch.float32)


def test_full_rotary_and_bhsd_view_and_derived_positions(kdev, gen):
    """Heads with no pass-through channel (start == end), transposed [B, H, S, D] storage,
    and positions derived from offsets."""
    p = _params()
    q = _randn(gen, 2, 6, 3, 16, device=kdev)
    pos = _positions(gen, (2, 6))
    a, _ = yt.apply_rope(q, None, pos.to(kdev), p, q_scale=QS, rotary_at="end")
    b, _ = yt.apply_rope(q, None, pos.to(kdev), p, q_scale=QS)
    assert torch.equal(a, b)
    q = _randn(gen, 2, 3, 6, 40, device=kdev).transpose(1, 2)  # [B, S, H, D] view of [B, H, S, D]
    rq, _ = _truth(q, None, torch.arange(6)[None].expand(2, 6) + 1000, p)
    yt.apply_rope_(q, None, None, p, offsets=1000, q_scale=QS, rotary_at="end")
    _check("q", q, rq, torch.float32)


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qk_norm_with_rotary_at_end(layout, unit_offset, kdev, gen, poisoned_outputs):
    """RMSNorm over the whole head (tail weights weight[:tail], rotary part weight[tail:]),
    then the rotation of the trailing part and the scale, in place and out of place."""
    p = _params()
    q = _randn(gen, 2, 5, 3, 40, device=kdev, scale=4.0)
    k = _randn(gen, 2, 5, 2, 24, device=kdev, scale=0.2)
    qw = (torch.rand(40, generator=gen) + 0.5).to(kdev)
    kw = (torch.rand(24, generator=gen) + 0.5).to(kdev)
    pos = _positions(gen, (2, 5))
    rq, rk = qk_norm_rope_reference(q.cpu().to(F64), k.cpu().to(F64), pos, p, qw.cpu(), kw.cpu(), layout=layout,
                                    unit_offset=unit_offset, compute_dtype=F64, q_scale=QS, rotary_at="end")
    q2, k2 = yt.apply_qk_norm_rope(q, k, pos.to(kdev), p, qw, kw, unit_offset=unit_offset, layout=layout,
                                   q_scale=QS, rotary_at="end")
    _check("q", q2, rq, torch.float32)
    _check("k", k2, rk, torch.float32)
    yt.apply_qk_norm_rope_(q, k, pos.to(kdev), p, qw, kw, unit_offset=unit_offset, layout=layout, q_scale=QS,
                           rotary_at="end")
    _check("q", q, rq, torch.float32)
    _check("k", k, rk, torch.float32)


@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "qscale"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradients_match_autograd_of_the_reference(layout, scaled, kdev, gen):
    """The backward is the inverse rotation of the trailing part; the leading pass-through
    channels get s * grad with the scale, grad without."""
    p = _params()
    qs = QS if scaled else None
    q = _randn(gen, 2, 5, 3, 40, device=kdev)
    k = _randn(gen, 2, 5, 1, 24, device=kdev)
    pos = _positions(gen, (2, 5))
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    qo, ko = yt.apply_rope(ql, kl, pos.to(kdev), p, layout=layout, q_scale=qs, rotary_at="end")
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    qr, kr = q.cpu().to(F64).requires_grad_(), k.cpu().to(F64).requires_grad_()
    rq, rk = rope_reference(qr, kr, pos, p, layout=layout, compute_dtype=F64, q_scale=qs, rotary_at="end")
    torch.autograd.backward((rq, rk), (gq.cpu().to(F64), gk.cpu().to(F64)))
    assert rel_err(ql.grad, qr.grad) < 1e-5 and rel_err(kl.grad, kr.grad) < 1e-5
    if not scaled:  # pass-through gradient is the incoming gradient, exactly
        assert torch.equal(ql.grad[..., :24].cpu(), gq[..., :24].cpu())


def test_gradients_with_norm_and_of_inplace_under_autograd(kdev, gen):
    p = _params()
    q = _randn(gen, 2, 5, 3, 40, device=kdev, scale=3.0)
    k = _randn(gen, 2, 5, 1, 24, device=kdev)
    qw = (torch.rand(40, generator=gen) + 0.5).to(kdev)
    kw = (torch.rand(24, generator=gen) + 0.5).to(kdev)
    pos = _positions(gen, (2, 5))
    leaves = [t.clone().requires_grad_() for t in (q, k, qw, kw)]
    qo, ko = yt.apply_qk_norm_rope(*leaves[:2], pos.to(kdev), p, *leaves[2:], layout="deepseek", q_scale=QS,
                                   rotary_at="end")
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (gq, gk))
    ref = [t.detach().cpu().to(F64).requires_grad_() for t in (q, k, qw, kw)]
    rq, rk = qk_norm_rope_reference(*ref[:2], pos, p, *ref[2:], layout="deepseek", compute_dtype=F64, q_scale=QS,
                                    rotary_at="end")
    torch.autograd.backward((rq, rk), (gq.cpu().to(F64), gk.cpu().to(F64)))
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < 1e-5

    # apply_rope_ on a non-leaf under autograd records the rotation (a copy of apply_rope's)
    ql = q.clone().requires_grad_()
    qq = ql * 1.0
    yt.apply_rope_(qq, None, pos.to(kdev), p, q_scale=QS, rotary_at="end")
    qq.backward(gq)
    qr = q.cpu().to(F64).requires_grad_()
    rope_reference(qr, None, pos, p, compute_dtype=F64, q_scale=QS, rotary_at="end")[0].backward(gq.cpu().to(F64))
    assert rel_err(ql.grad, qr.grad) < 1e-5


def test_plans_tell_start_and_end_apart(kdev, gen):
    """Same shapes, start then end then start again: each call right (a plan of one is
    never replayed for the other), one plan each."""
    p = _params()
    op.plans._PLANS.clear()
    pos = _positions(gen, (2, 5))
    for at in ("start", "end", "start", "end", "end"):
        q = _randn(gen, 2, 5, 3, 40, device=kdev)
        want, _ = rope_reference(q.cpu().to(F64), None, pos, p, compute_dtype=F64, q_scale=QS, rotary_at=at)
        yt.apply_rope_(q, None, pos.to(kdev), p, q_scale=QS, rotary_at=at)
        assert rel_err(q, want) < TOL[torch.float32], at
        out, _ = yt.apply_rope(_randn(gen, 2, 5, 3, 40, device=kdev), None, pos.to(kdev), p, rotary_at=at)
        assert not torch.isnan(out).any()
    assert op.plan_cache_size() == 4  # (in place, copy) x (start, end)


@pytest.mark.parametrize("bad", ["END", "middle", "", None, 1, True, ("end",), ["end"]])
def test_bad_rotary_at_raises_before_writing(bad, kdev, gen):
    p = _params()
    q = _randn(gen, 2, 5, 3, 40, device=kdev)
    k = _randn(gen, 2, 5, 1, 40, device=kdev)
    pos = _positions(gen, (2, 5)).to(kdev)
    w = torch.ones(40, device=kdev)
    before = q.clone(), k.clone()
    for _ in range(2):  # the second round with plans of good signatures in place
        for fn in (lambda: yt.apply_rope_(q, k, pos, p, q_scale=QS, rotary_at=bad),
                   lambda: yt.apply_rope(q, k, pos, p, q_scale=QS, rotary_at=bad),
                   lambda: yt.apply_qk_norm_rope_(q, k, pos, p, w, w, rotary_at=bad),
                   lambda: yt.apply_qk_norm_rope(q, k, pos, p, w, w, rotary_at=bad)):
            with pytest.raises(ValueError, match=r"rotary_at must be one of \('start', 'end'\)"):
                fn()
        assert torch.equal(q, before[0]) and torch.equal(k, before[1])
        for at in ("start", "end"):
            qq, kk = q.clone(), k.clone()
            yt.apply_rope_(qq, kk, pos, p, q_scale=QS, rotary_at=at)
            yt.apply_rope(q, k, pos, p, q_scale=QS, rotary_at=at)
    with pytest.raises(ValueError, match="rotary_at must be one of"):
        rope_reference(q.cpu(), None, pos.cpu(), p, rotary_at=bad if isinstance(bad, str) else "x")


def test_cpu_reference_path(monkeypatch, gen):
    """CPU tensors outside the interpreter take the PyTorch reference with the same
    rotary_at (forced here)."""
    monkeypatch.setattr(op.launch, "uses_kernel", lambda t: False)
    p = _params()
    pos = _positions(gen, (2, 5))
    q = _randn(gen, 2, 5, 3, 40, dtype=torch.bfloat16)
    k = _randn(gen, 2, 5, 1, 24, dtype=torch.bfloat16)
    rq, rk = rope_reference(q, k, pos, p, q_scale=QS, rotary_at="end")
    q2, k2 = yt.apply_rope(q, k, pos, p, q_scale=QS, rotary_at="end")
    assert torch.equal(q2, rq) and torch.equal(k2, rk)
    qq, kk = q.clone(), k.clone()
    yt.apply_rope_(qq, kk, pos, p, q_scale=QS, rotary_at="end")
    assert torch.equal(qq, rq) and torch.equal(kk, rk)


def test_torch_compile_fullgraph(kdev, gen):
    """Both ops trace with rotary_at="end" (fullgraph), forward and backward."""
    p = _params()
    q = _randn(gen, 2, 6, 3, 40, device=kdev)
    k = _randn(gen, 2, 6, 1, 24, device=kdev)
    pos = _positions(gen, (2, 6)).to(kdev)

    def f(q, k, pos):
        q2, k2 = yt.apply_rope(q, k, pos, p, layout="deepseek", q_scale=QS, rotary_at="end")
        q3, k3 = q2.detach().clone(), k2.detach().clone()
        yt.apply_rope_(q3, k3, pos, p, q_scale=QS, rotary_at="end")
        return q2, k2, q3, k3

    assert_compiles_like_eager(f, q.clone().requires_grad_(), k, pos)
