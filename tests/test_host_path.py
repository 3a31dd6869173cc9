"""The eager host path: launch plans per call signature, bounded caches, the opt-in
cu_seqlens check, and torch.compile seeing the kernel itself.

Plans are host logic over the same kernel: under TRITON_INTERPRET=1 they replay through
Triton's own launcher, so CI covers them too; GPU-only checks are marked.
"""

import pytest
import torch

import yarn_triton as yt
from yarn_triton import op
from yarn_triton.kernels import rope_kernel as rk
from yarn_triton.reference import rope_reference

from conftest import TOL, rel_err, requires_cuda


def _params(dim=64):
    return yt.RopeParams.yarn(dim, 10000.0, 40.0, 4096, mscale=0.707, mscale_all_dim=0.707)


def test_repeated_signature_replays_a_plan_with_fresh_inputs(kdev, gen):
    """Same shapes, new values every call: each call is right, one plan serves them all."""
    p = _params()
    op._PLANS.clear()
    for layout in ("neox", "interleaved", "deepseek"):
        for _ in range(3):
            q = torch.randn(2, 5, 4, 96, generator=gen).to(kdev)
            k = torch.randn(2, 5, 1, 64, generator=gen).to(kdev)
            pos = torch.randint(0, 1 << 24, (2, 5), generator=gen).to(kdev)
            rq, rk_ = rope_reference(q.cpu(), k.cpu(), pos.cpu(), p, layout=layout, compute_dtype=torch.float64)
            yt.apply_rope_(q, k, pos, p, layout=layout)
            assert rel_err(q, rq) < TOL[torch.float32] and rel_err(k, rk_) < TOL[torch.float32]
    assert op.plan_cache_size() == 3  # one per layout


def test_offsets_value_changes_on_a_replayed_plan(kdev, gen):
    """``offsets=int`` is not part of the signature: a replay must use the new value."""
    p = _params()
    q = torch.randn(1, 3, 2, 64, generator=gen).to(kdev)
    for off in (0, 7, 1 << 20, (1 << 31) + 5):  # the last needs 64-bit positions
        qq = q.clone()
        yt.apply_rope_(qq, None, None, p, offsets=off)
        pos = torch.arange(3, dtype=torch.int64)[None] + off
        rq, _ = rope_reference(q.cpu(), None, pos, p, compute_dtype=torch.float64)
        assert rel_err(qq, rq) < 1e-5, off


def test_plan_hit_still_refuses_overlapping_q_and_k(kdev, gen):
    """Two views with the same shapes and strides share a signature; whether they overlap
    depends on where they lie, so a replay must check it again."""
    p = _params()
    a = torch.randn(2, 5, 5, 64, generator=gen).to(kdev)
    b = torch.randn(2, 5, 5, 64, generator=gen).to(kdev)
    pos = torch.randint(0, 1000, (2, 5), generator=gen).to(kdev)
    yt.apply_rope_(a[:, :, :4], b[:, :, 4:], pos, p)  # disjoint: builds the plan
    yt.apply_rope_(a[:, :, :4], a[:, :, 4:], pos, p)  # fused-qkv-style head slices: fine
    plans = op.plan_cache_size()
    before = a.clone()
    with pytest.raises(ValueError, match="overlap"):
        yt.apply_rope_(a[:, :, :4], a[:, :, 3:4], pos, p)  # same signature, k is q's last head
    assert torch.equal(a, before)  # nothing written
    assert op.plan_cache_size() == plans  # it was a replay of the same plan


def test_plan_does_not_bypass_autograd(kdev, gen):
    """A cached signature called with a tensor that requires grad still records the op."""
    p = _params()
    q = torch.randn(1, 4, 2, 64, generator=gen).to(kdev)
    pos = torch.randint(0, 1000, (1, 4), generator=gen).to(kdev)
    yt.apply_rope_(q.clone(), None, pos, p)  # plan for this signature
    leaf = q.clone().requires_grad_()
    x = leaf * 1.0
    yt.apply_rope_(x, None, pos, p)
    x.sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_plan_cache_is_bounded(kdev, gen, monkeypatch):
    monkeypatch.setattr(op, "_PLANS_MAX", 16)
    p = _params()
    for t in range(1, 60):
        q = torch.randn(t, 1, 64, generator=gen).to(kdev)
        yt.apply_rope_(q, None, None, p, offsets=3)
    assert op.plan_cache_size() <= 16


def test_specialization_classes_do_not_grow_with_token_counts():
    """The compiled-kernel key specializes an integer as Triton does (is it 1, a multiple
    of 16, 64-bit wide?), and not at all for token counts and positions: 10,000 distinct
    token counts fall into a handful of classes."""
    n_tokens = rk.rope_kernel.arg_names.index("n_tokens")
    q_ss = rk.rope_kernel.arg_names.index("q_ss")
    assert len({rk._int_class(n_tokens, t) for t in range(1, 10_001)}) == 1
    assert len({rk._int_class(q_ss, t) for t in range(1, 10_001)}) == 3
    assert rk._int_class(n_tokens, 1 << 40) != rk._int_class(n_tokens, 5)  # width still counts


@requires_cuda
def test_compiled_cache_stays_small_over_10000_token_counts(gen):
    p = _params()
    q = torch.randn(10_000, 2, 64, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(10_000, 1, 64, generator=gen).to("cuda", torch.bfloat16)
    before = rk.compiled_cache_size()
    for t in range(1, 10_001):
        yt.apply_rope_(q[:t], k[:t], None, p, offsets=t)
    torch.cuda.synchronize()
    assert rk.compiled_cache_size() - before <= 24
    assert op.plan_cache_size() <= op._PLANS_MAX
    assert len(rk.tuned_configs()) <= rk._TUNED_MAX


@pytest.mark.parametrize("bad, match", [
    ([1, 3, 5], "start at 0"),
    ([0, 4, 2, 6], "not decrease"),
    ([0, 3, 9], "past the 8 tokens"),
])
def test_cu_seqlens_check_is_opt_in(kdev, bad, match, monkeypatch):
    p = _params()
    q = torch.randn(8, 2, 64).to(kdev)
    cu = torch.tensor(bad, dtype=torch.int32).to(kdev)
    before = q.clone()
    with pytest.raises(ValueError, match=match):
        yt.apply_rope_(q, None, None, p, cu_seqlens=cu, check_cu_seqlens=True)
    with pytest.raises(ValueError, match=match):
        yt.apply_rope(q, None, None, p, cu_seqlens=cu, check_cu_seqlens=True)
    assert torch.equal(q, before)
    monkeypatch.setattr(op, "CHECK_CU_SEQLENS", True)  # what YARN_TRITON_CHECK_CU_SEQLENS=1 sets
    with pytest.raises(ValueError, match=match):
        yt.apply_rope_(q, None, None, p, cu_seqlens=cu)
    good = torch.tensor([0, 3, 8], dtype=torch.int32).to(kdev)
    yt.apply_rope_(q, None, None, p, cu_seqlens=good)  # valid values pass the check


@requires_cuda
def test_compiled_graph_launches_the_kernel_itself(gen):
    """With torch.library.triton_op, inductor's generated code launches rope_kernel
    directly instead of calling back into our Python op."""
    if not op.COMPILER_SEES_KERNEL:
        pytest.skip("this torch has no torch.library.triton_op")
    from torch._inductor.utils import run_and_get_code

    p = _params()

    def f(q, k, pos):
        q2, k2 = yt.apply_rope(q, k, pos, p)
        yt.apply_rope_(q, k, pos, p)
        return q2 + q, k2 + k

    q = torch.randn(2, 16, 4, 64, generator=gen).to("cuda")
    k = torch.randn(2, 16, 1, 64, generator=gen).to("cuda")
    pos = torch.randint(0, 1 << 20, (2, 16), generator=gen).to("cuda")
    q_eager, k_eager = q.clone(), k.clone()
    want = f(q_eager, k_eager, pos)
    compiled = torch.compile(f, fullgraph=True)
    got, code = run_and_get_code(compiled, q, k, pos)
    src = "\n".join(code)
    assert "rope_kernel" in src
    assert "yarn_triton.rope" not in src and "yarn_triton::rope" not in src
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-6
    assert rel_err(q, q_eager) < 1e-6 and rel_err(k, k_eager) < 1e-6  # in place under compile too
