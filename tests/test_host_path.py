"""The eager host path: launch plans per call signature, bounded caches, the opt-in
cu_seqlens check, and torch.compile seeing the kernel itself.

Plans are host logic over the same kernel: under TRITON_INTERPRET=1 they replay through
Triton's own launcher, so CI covers them too; GPU-only checks are marked.
"""

import pytest
import torch

import yarn_triton as yt
from yarn_triton import op
from yarn_triton.kernels import launcher as kl
from yarn_triton.kernels.rope_kernel import rope_kernel
from yarn_triton.reference import qk_norm_rope_reference, rope_reference

from conftest import TOL, rel_err, requires_cuda

_OP_MODULES = (op.overlap, op.checks, op.launch, op.plans, op.library, op.eager, op.api)


def _params(dim=64):
    return yt.RopeParams.yarn(dim, 10000.0, 40.0, 4096, mscale=0.707, mscale_all_dim=0.707)


def test_repeated_signature_replays_a_plan_with_fresh_inputs(kdev, gen):
    """Same shapes, new values every call: each call is right, one plan serves them all."""
    p = _params()
    op.plans._PLANS.clear()
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
    monkeypatch.setattr(op.plans, "_PLANS_MAX", 16)
    p = _params()
    for t in range(1, 60):
        q = torch.randn(t, 1, 64, generator=gen).to(kdev)
        yt.apply_rope_(q, None, None, p, offsets=3)
    assert op.plan_cache_size() <= 16


def test_specialization_classes_do_not_grow_with_token_counts():
    """The compiled-kernel key specializes an integer as Triton does (is it 1, a multiple
    of 16, 64-bit wide?), and not at all for token counts and positions: 10,000 distinct
    token counts fall into a handful of classes."""
    n_tokens = rope_kernel.arg_names.index("n_tokens")
    q_ss = rope_kernel.arg_names.index("q_ss")
    assert len({kl._int_class(n_tokens, t) for t in range(1, 10_001)}) == 1
    assert len({kl._int_class(q_ss, t) for t in range(1, 10_001)}) == 3
    assert kl._int_class(n_tokens, 1 << 40) != kl._int_class(n_tokens, 5)  # width still counts


@requires_cuda
def test_compiled_cache_stays_small_over_10000_token_counts(gen):
    p = _params()
    q = torch.randn(10_000, 2, 64, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(10_000, 1, 64, generator=gen).to("cuda", torch.bfloat16)
    before = kl.compiled_cache_size()
    for t in range(1, 10_001):
        yt.apply_rope_(q[:t], k[:t], None, p, offsets=t)
    torch.cuda.synchronize()
    assert kl.compiled_cache_size() - before <= 24
    assert op.plan_cache_size() <= op.plans._PLANS_MAX
    assert len(kl.tuned_configs()) <= kl._TUNED_MAX


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
    monkeypatch.setattr(op.checks, "CHECK_CU_SEQLENS", True)  # what YARN_TRITON_CHECK_CU_SEQLENS=1 sets
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


# --------------------------------------------------------------------------------------
# The out-of-place, differentiable calls (apply_rope, apply_qk_norm_rope) on a known
# signature: checks skipped, plans replayed in both directions; nothing else may change.
# --------------------------------------------------------------------------------------
def _count_calls(monkeypatch, name):
    """Wrap the op layer's function ``name`` to count its calls: in every module of
    ``yarn_triton.op`` that holds it, since each caller looks it up in its own module."""
    calls = [0]
    real = next(vars(m)[name] for m in _OP_MODULES if name in vars(m))  # its owner's

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    holders = [m for m in _OP_MODULES if getattr(m, name, None) is real]
    assert holders, name
    for m in holders:
        monkeypatch.setattr(m, name, counted)
    return calls


@pytest.fixture(params=["cpp_node", "python_function"])
def eager_node(request, monkeypatch):
    """A replayed autograd call's node: the C++ one (``op/native_node.py``, built by
    conftest) or the Python ``autograd.Function`` it stands in for. Returns the name the
    outputs' ``grad_fn`` has."""
    if request.param == "python_function":
        monkeypatch.setattr(op.native_node, "APPLY", None)
        return "_EagerRopeBackward"
    if op.native_node.APPLY is None:
        pytest.skip(f"no C++ node: {op.native_node.unavailable_reason()}")
    return "YarnRopeBackward"


@pytest.mark.parametrize("layout", ["neox", "deepseek"])
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "qk_norm"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_replayed_autograd_call_matches_reference_with_fresh_data(kdev, gen, monkeypatch, layout, norm, inverse,
                                                                  eager_node):
    """Same signature, new values every call: outputs and every gradient (norm weights
    too) match autograd of the float64 reference, inputs stay untouched, and from the
    second call on neither direction re-validates or takes the full launch path; with
    either autograd node for the replays."""
    if norm and inverse:
        pytest.skip("the norm calls have no inverse")
    p = _params()
    op.plans._PLANS.clear()
    checks = _count_calls(monkeypatch, "check_rope_args")
    full = _count_calls(monkeypatch, "_execute")
    for i in range(3):
        q0 = torch.randn(2, 5, 4, 96, generator=gen) * 3  # partial rotary: 64 of 96
        k0 = torch.randn(2, 5, 2, 96, generator=gen)
        w0 = [torch.rand(96, generator=gen) + 0.5 for _ in range(2)]
        pos = torch.randint(0, 1 << 20, (2, 5), generator=gen)
        gq, gk = torch.randn_like(q0), torch.randn_like(k0)
        leaves = [t.to(kdev, copy=True).requires_grad_() for t in [q0, k0] + (w0 if norm else [])]
        before = [t.detach().clone() for t in leaves]
        if norm:
            qo, ko = yt.apply_qk_norm_rope(*leaves[:2], pos.to(kdev), p, *leaves[2:], layout=layout)
        else:
            qo, ko = yt.apply_rope(*leaves, pos.to(kdev), p, layout=layout, inverse=inverse)
        assert qo.grad_fn.name() == (eager_node if i else "_EagerRopeBackward") and ko.grad_fn is qo.grad_fn
        torch.autograd.backward((qo, ko), (gq.to(kdev), gk.to(kdev)))
        for t, b in zip(leaves, before):
            assert torch.equal(t.detach(), b)  # inputs not modified
        ref = [t.double().requires_grad_() for t in [q0, k0] + (w0 if norm else [])]
        if norm:
            rq, rk = qk_norm_rope_reference(*ref[:2], pos, p, *ref[2:], layout=layout, compute_dtype=torch.float64)
        else:
            rq, rk = rope_reference(*ref, pos, p, layout=layout, inverse=inverse, compute_dtype=torch.float64)
        torch.autograd.backward((rq, rk), (gq.double(), gk.double()))
        assert rel_err(qo.detach(), rq.detach()) < 1e-5 and rel_err(ko.detach(), rk.detach()) < 1e-5, i
        for got, want in zip(leaves, ref):
            assert rel_err(got.grad, want.grad) < 1e-5, i
        if i == 0:
            assert checks[0] == 1 and full[0] == 2  # first call: validated, forward and backward launched
    assert checks[0] == 1 and full[0] == 2  # later calls: plan replays only


def _bad_variants(kdev):
    """(description, call overrides, exception, message) for calls whose signature differs
    from the good one of ``test_bad_input_on_a_cached_signature_family_still_raises`` by
    one argument."""
    return [
        ("float positions", dict(positions=torch.zeros(2, 5, device=kdev)), TypeError, "positions must be int32"),
        ("positions shape", dict(positions=torch.zeros(2, 4, dtype=torch.long, device=kdev)), ValueError,
         "do not broadcast"),
        ("k token dims", dict(k=torch.randn(2, 4, 2, 64, device=kdev)), ValueError, "token dims"),
        ("rotary_dim", dict(rotary_dim=32), ValueError, "rotary_dim=32"),
        ("layout", dict(layout="gptj"), ValueError, "layout must be one of"),
        ("int q", dict(q=torch.ones(2, 5, 4, 64, dtype=torch.int32, device=kdev)), TypeError, "q must be float"),
        ("offsets and positions", dict(offsets=3), ValueError, "not both"),
        ("bool offsets", dict(positions=None, offsets=True), TypeError, "offsets must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_variants("cpu"))), ids=[c[0] for c in _bad_variants("cpu")])
def test_bad_input_on_a_cached_signature_family_still_raises(kdev, gen, case):
    """After good calls cached a signature, a call differing in one bad argument is
    refused before anything runs, on the first and the second try alike."""
    _, over, exc, match = _bad_variants(kdev)[case]
    p = _params()
    good = dict(q=torch.randn(2, 5, 4, 64, generator=gen).to(kdev).requires_grad_(),
                k=torch.randn(2, 5, 2, 64, generator=gen).to(kdev).requires_grad_(),
                positions=torch.randint(0, 100, (2, 5), generator=gen).to(kdev))
    for _ in range(2):
        yt.apply_rope(good["q"], good["k"], good["positions"], p)
    call = {**good, **over}
    rest = {n: v for n, v in call.items() if n not in ("q", "k", "positions")}
    before = [t.detach().clone() for t in (good["q"], good["k"])]
    for _ in range(2):
        with pytest.raises(exc, match=match):
            yt.apply_rope(call["q"], call["k"], call["positions"], p, **rest)
    assert all(torch.equal(t.detach(), b) for t, b in zip((good["q"], good["k"]), before))


def test_bad_values_on_a_cached_signature_still_raise(kdev, gen):
    """cu_seqlens values are not part of a signature: with the check on, a replay of a
    cached signature still reads and refuses them, for both out-of-place calls."""
    p = _params()
    q = torch.randn(8, 2, 64, generator=gen).to(kdev).requires_grad_()
    qw = torch.ones(64, device=kdev)
    good = torch.tensor([0, 3, 8], dtype=torch.int32).to(kdev)
    bad = torch.tensor([0, 5, 2], dtype=torch.int32).to(kdev)
    for _ in range(2):
        yt.apply_rope(q, None, None, p, cu_seqlens=good, check_cu_seqlens=True)
        yt.apply_qk_norm_rope(q, None, None, p, qw, None, cu_seqlens=good, check_cu_seqlens=True)
    for _ in range(2):
        with pytest.raises(ValueError, match="not decrease"):
            yt.apply_rope(q, None, None, p, cu_seqlens=bad, check_cu_seqlens=True)
        with pytest.raises(ValueError, match="not decrease"):
            yt.apply_qk_norm_rope(q, None, None, p, qw, None, cu_seqlens=bad, check_cu_seqlens=True)


def test_positions_changed_before_backward_is_an_error(kdev, gen):
    """The backward recomputes angles from the saved positions: changing them in place
    after the forward must raise, as autograd does for any saved tensor."""
    p = _params()
    q = torch.randn(1, 4, 2, 64, generator=gen).to(kdev).requires_grad_()
    pos = torch.randint(0, 100, (1, 4), generator=gen).to(kdev)
    for _ in range(2):  # the second forward replays the plan
        qo, _ = yt.apply_rope(q, None, pos, p)
    pos.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        qo.sum().backward()


def test_call_needing_no_gradient_matches_and_records_nothing(kdev, gen):
    """Inputs that need no gradient (or grad mode off) give the autograd call's values and
    outputs without a graph; forward-mode AD is still refused, not silently dropped."""
    p = _params()
    q = torch.randn(2, 3, 4, 64, generator=gen).to(kdev)
    k = torch.randn(2, 3, 2, 64, generator=gen).to(kdev)
    pos = torch.randint(0, 1000, (2, 3), generator=gen).to(kdev)
    qw = torch.rand(64, generator=gen).to(kdev) + 0.5
    want = yt.apply_rope(q.clone().requires_grad_(), k, pos, p)
    want_n = yt.apply_qk_norm_rope(q, k, pos, p, qw.clone().requires_grad_(), qw)
    for _ in range(2):
        for got in (yt.apply_rope(q, k, pos, p), yt.apply_qk_norm_rope(q, k, pos, p, qw, qw)):
            assert all(t.grad_fn is None and not t.requires_grad for t in got)
        with torch.no_grad():
            got = yt.apply_rope(q.clone().requires_grad_(), k, pos, p)
        assert got[0].grad_fn is None and torch.equal(got[0], want[0].detach()) and torch.equal(got[1], want[1])
        got = yt.apply_qk_norm_rope(q, k, pos, p, qw, qw)
        assert torch.equal(got[0], want_n[0].detach()) and torch.equal(got[1], want_n[1].detach())
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, torch.randn_like(q))
        with pytest.raises(NotImplementedError, match="jvp"):
            yt.apply_rope(dual, k, pos, p)


def test_functorch_transforms_are_refused_as_before(kdev, gen):
    """Under torch.func transforms the Function takes autograd.Function.apply's own path,
    which refuses it (no setup_context), whatever the plan cache holds."""
    p = _params()
    q = torch.randn(1, 3, 2, 64, generator=gen).to(kdev)
    pos = torch.randint(0, 100, (1, 3), generator=gen).to(kdev)
    yt.apply_rope(q, None, pos, p)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda x: yt.apply_rope(x, None, pos, p)[0].sum())(q)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.vmap(lambda x: yt.apply_rope(x, None, pos, p)[0])(q[None].repeat(2, 1, 1, 1, 1))


def test_backward_after_the_plan_cache_was_emptied(kdev, gen, monkeypatch):
    """A forward's plan evicted (or the cache cleared) before its backward: the backward
    still gives the right gradients, and the bounded cache stays bounded."""
    monkeypatch.setattr(op.plans, "_PLANS_MAX", 4)
    p = _params()
    pos = torch.randint(0, 1000, (1, 6), generator=gen).to(kdev)
    q0 = torch.randn(1, 6, 2, 64, generator=gen)
    outs = []
    for _ in range(2):
        q = q0.to(kdev, copy=True).requires_grad_()
        outs.append((q, yt.apply_rope(q, None, pos, p)[0]))
    for t in range(1, 8):  # other signatures push the first out
        yt.apply_rope(torch.randn(t, 1, 64).to(kdev).requires_grad_(), None, None, p, offsets=t)
    assert op.plan_cache_size() <= 4
    qr = q0.double().requires_grad_()
    g = torch.randn(1, 6, 2, 64, generator=gen)
    rope_reference(qr, None, pos.cpu(), p, compute_dtype=torch.float64)[0].backward(g.double())
    for i, (q, qo) in enumerate(outs):
        if i:
            op.plans._PLANS.clear()
        qo.backward(g.to(kdev))
        assert rel_err(q.grad, qr.grad) < 1e-5


def test_cached_plan_does_not_keep_tensors_alive(kdev, gen):
    """A plan is kept per signature for later calls; it must not hold the first call's
    q, k or positions (a prefill plan would pin hundreds of MB of GPU memory)."""
    import gc
    import weakref

    p = _params()
    q = torch.randn(1, 7, 4, 64, generator=gen).to(kdev)
    k = torch.randn(1, 7, 2, 64, generator=gen).to(kdev)
    pos = torch.randint(0, 1000, (1, 7), generator=gen).to(kdev)
    yt.apply_rope_(q, k, pos, p)
    out_q, out_k = yt.apply_rope(q, k, pos, p)  # an out-of-place plan too
    refs = [weakref.ref(t) for t in (q, k, pos, out_q, out_k)]
    del q, k, pos, out_q, out_k
    gc.collect()
    assert op.plan_cache_size() >= 2
    assert all(r() is None for r in refs)


@pytest.mark.parametrize("layout", ["neox", "interleaved", "deepseek"])
def test_64bit_offsets_switch(kdev, gen, monkeypatch, layout):
    """The kernel addresses in 32 bits unless some tensor spans 2**31 elements; the 64-bit
    variant (tested at full size on the GPU in test_training) runs here on small tensors
    by lowering the threshold, over strided views, partial rotary and packed sequences."""
    monkeypatch.setattr(kl, "_INT32_SPAN", 16)
    op.plans._PLANS.clear()
    p = _params(32)
    base = torch.randn(2, 9, 7, 48, generator=gen).to(kdev)
    q, k = base[:, :, :5], base[:, :, 5:]  # heads of one fused projection
    pos = torch.randint(0, 1 << 30, (2, 9), generator=gen).to(kdev)
    rq, rk_ = rope_reference(q.cpu(), k.cpu(), pos.cpu(), p, layout=layout, compute_dtype=torch.float64)
    yt.apply_rope_(q, k, pos, p, layout=layout)
    assert rel_err(q, rq) < TOL[torch.float32] and rel_err(k, rk_) < TOL[torch.float32]
    qp = torch.randn(11, 3, 32, generator=gen).to(kdev)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32).to(kdev)
    out, _ = yt.apply_rope(qp, None, None, p, cu_seqlens=cu, layout=layout)
    local = torch.cat([torch.arange(4), torch.arange(7)])
    ref, _ = rope_reference(qp.cpu(), None, local, p, layout=layout, compute_dtype=torch.float64)
    assert rel_err(out, ref) < TOL[torch.float32]
    # both launches took the 64-bit variant (the lowered threshold reached the launcher)
    assert [plan.launch.switches["WIDE"] for plan in op.plans._PLANS.values()] == [True, True]


class _Launcher36:
    """The shape of Triton 3.6's ``CudaLauncher``: a Python ``__call__`` that allocates the
    (here empty) scratch and passes everything to the compiled C ``launch``. Records what
    reaches ``launch``, and whether ``__call__`` ran."""

    global_scratch_size = 0
    profile_scratch_size = 0
    launch_cooperative_grid = False
    launch_pdl = True  # any value: it must be passed through as it is

    def __init__(self):
        self.c_calls = []
        self.py_calls = 0
        self.launch = lambda *a: self.c_calls.append(a)

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.py_calls += 1
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                    None, None, *args)


class _Compiled:
    def __init__(self, run):
        self.run, self.function, self.packed_metadata = run, 0xF00, (1, 1, 0)


def _uncompiled_plan_on_a_stubbed_launcher(monkeypatch, gen, kdev, with_k=True):
    """A real plan's launch, made as if it had not compiled yet (on a GPU the real one holds
    the real kernel and its launchers, which must never see made-up pointers), with the
    launch path outside Triton stubbed: stream 777, no hooks, and every compile giving a
    ``_Compiled`` around the returned ``_Launcher36`` (which records what reaches it)."""
    p = _params()
    q = torch.randn(1, 3, 4, 64, generator=gen).to(kdev)
    k = torch.randn(1, 3, 2, 64, generator=gen).to(kdev) if with_k else None
    pos = torch.randint(0, 1 << 20, (1, 3), generator=gen).to(kdev)
    op.plans._PLANS.clear()
    yt.apply_rope_(q, k, pos, p)
    plan = next(iter(op.plans._PLANS.values())).launch
    for name, value in (("_by_align", {}), ("_aligned", None), ("_direct", None), ("_packed", None)):
        monkeypatch.setattr(plan, name, value)
    launcher = _Launcher36()
    monkeypatch.setattr(kl, "INTERPRETED", False)
    monkeypatch.setattr(kl, "FAST_LAUNCH", True)
    monkeypatch.setattr(kl, "_RAW_STREAM", lambda device: 777)
    monkeypatch.setattr(kl, "_HOOKED", lambda: False)
    monkeypatch.setattr(kl, "_compile", lambda *a: _Compiled(launcher))
    return plan, launcher


def test_direct_launch_passes_what_tritons_launcher_would(kdev, gen, monkeypatch):
    """A replayed plan calls the C launch function itself (``_direct_launch``) with exactly
    the arguments Triton's own ``__call__`` gives it: same grid, stream, flags, metadata,
    pointers, ``pos_base`` and every other argument, constexprs included."""
    plan, launcher = _uncompiled_plan_on_a_stubbed_launcher(monkeypatch, gen, kdev)
    monkeypatch.setattr(kl.packed_launch, "ENABLED", False)  # Triton's launcher is what this test is about
    ptrs = [16 * (i + 1) for i in range(kl._N_PTRS)]
    plan(ptrs, 12345, ptrs)  # new specialization: Triton's own __call__
    plan(ptrs, 12345, ptrs)  # replay: the C function directly
    assert launcher.py_calls == 1 and len(launcher.c_calls) == 2
    via_triton, direct = launcher.c_calls
    assert direct == via_triton
    assert direct[:13] == (*plan.grid, 777, 0xF00, False, True, None, None, (1, 1, 0), None, None, None)
    assert list(direct[13:13 + kl._N_PTRS]) == ptrs and direct[13 + kl._N_PTRS + 1] == 12345
    plan(ptrs, 54321, ptrs)  # pos_base is per call
    assert launcher.c_calls[-1][13 + kl._N_PTRS + 1] == 54321


def test_replay_takes_the_packed_launcher_only_for_aligned_pointers_and_a_32bit_base(kdev, gen, monkeypatch):
    """Where a plan holds a packed spec, an aligned replay with a 32-bit ``pos_base`` goes
    to it with this call's pointers and base on the tensors' stream, and nothing reaches
    Triton's launcher; a misaligned pointer or a 64-bit ``pos_base`` does not go to it."""
    plan, launcher = _uncompiled_plan_on_a_stubbed_launcher(monkeypatch, gen, kdev, with_k=False)
    ptrs = tuple(16 * (i + 1) for i in range(kl._N_PTRS))
    plan(ptrs, 5, ptrs)  # new specialization: Triton's own __call__
    packed_calls = []
    monkeypatch.setattr(plan, "_packed", (lambda *a: packed_calls.append(a), b"spec"))
    plan(ptrs, 12345, ptrs)
    assert packed_calls == [(b"spec", 777, ptrs, 12345)] and len(launcher.c_calls) == 1
    odd = (ptrs[0] + 2,) + ptrs[1:]
    plan(odd, 7, odd)  # misaligned: a specialization of its own, through Triton
    plan(ptrs, 1 << 40, ptrs)  # 64-bit pos_base: likewise
    assert len(packed_calls) == 1 and launcher.py_calls == 3


def test_direct_launch_only_for_the_launcher_shape_it_knows():
    """Scratch to allocate, or another launcher signature (Triton 3.9 takes the metadata
    and hooks by name): Triton's own path."""
    assert kl._direct_launch(_Compiled(_Launcher36())) is not None
    with_scratch = _Launcher36()
    with_scratch.global_scratch_size = 256
    assert kl._direct_launch(_Compiled(with_scratch)) is None

    class Launcher39(_Launcher36):
        def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, launch_metadata,
                     launch_enter_hook, launch_exit_hook, *args):
            raise AssertionError

    assert kl._direct_launch(_Compiled(Launcher39())) is None
    assert kl._direct_launch(object()) is None
