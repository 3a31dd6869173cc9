"""Training and serving: autograd, torch.compile, position forms, CUDA graphs, large
tensors, determinism."""

import pytest
import torch

import yarn_triton as yt
from yarn_triton.reference import rope_reference

from conftest import TOL, rel_err, requires_cuda

LAYOUTS = ["neox", "interleaved", "deepseek"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _params():
    return yt.RopeParams.yarn(32, 10000.0, 8.0, 256, mscale=0.8, mscale_all_dim=0.5)


# ------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_gradcheck_float64(layout, gen):
    """The reference's own autograd is a true derivative (float64 gradcheck)."""
    p = _params()
    q = torch.randn(1, 3, 2, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 5000, (1, 3), generator=gen)
    f = lambda q, k: rope_reference(q, k, pos, p, layout=layout, rotary_dim=32, compute_dtype=torch.float64)
    assert torch.autograd.gradcheck(f, (q, k))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_kernel_grads_match_reference_grads(layout, dtype, kdev, gen):
    p = _params()
    q0 = torch.randn(2, 5, 4, 48, generator=gen)  # partial rotary: 32 of 48
    k0 = torch.randn(2, 5, 2, 48, generator=gen)
    pos = torch.randint(0, 9000, (2, 5), generator=gen)
    gq = torch.randn(2, 5, 4, 48, generator=gen)
    gk = torch.randn(2, 5, 2, 48, generator=gen)

    q = q0.to(kdev, dtype, copy=True).requires_grad_()
    k = k0.to(kdev, dtype, copy=True).requires_grad_()
    qo, ko = yt.apply_rope(q, k, pos.to(kdev), p, layout=layout)
    assert not qo._is_view() and qo.data_ptr() != q.data_ptr()
    torch.autograd.backward((qo, ko), (gq.to(kdev, dtype), gk.to(kdev, dtype)))

    qr = q0.double().requires_grad_()
    kr = k0.double().requires_grad_()
    rq, rk = rope_reference(qr, kr, pos, p, layout=layout, compute_dtype=torch.float64)
    torch.autograd.backward((rq, rk), (gq.double(), gk.double()))
    assert rel_err(qo.detach(), rq.detach()) < TOL[dtype]
    assert rel_err(ko.detach(), rk.detach()) < TOL[dtype]
    assert rel_err(q.grad, qr.grad) < TOL[dtype]
    assert rel_err(k.grad, kr.grad) < TOL[dtype]


def test_backward_of_position_forms(kdev, gen):
    """Grads with derived positions (packed cu_seqlens + start offsets)."""
    p = _params()
    cu = torch.tensor([0, 3, 7, 12], dtype=torch.int32)
    starts = torch.tensor([5, 0, 100], dtype=torch.int64)
    q0 = torch.randn(12, 3, 32, generator=gen)
    q = q0.to(kdev, copy=True).requires_grad_()
    (qo,) = [yt.apply_rope(q, None, None, p, cu_seqlens=cu.to(kdev), offsets=starts.to(kdev))[0]]
    g = torch.randn(12, 3, 32, generator=gen)
    qo.backward(g.to(kdev))
    pos = torch.cat([torch.arange(3) + 5, torch.arange(4), torch.arange(5) + 100])
    qr = q0.double().requires_grad_()
    rope_reference(qr, None, pos, p, compute_dtype=torch.float64)[0].backward(g.double())
    assert rel_err(q.grad, qr.grad) < 2e-6


def test_inplace_under_autograd_records_the_rotation(kdev, gen):
    p = _params()
    w = torch.randn(2, 4, 3 * 32, generator=gen).to(kdev).requires_grad_()
    x = w * 1.0  # non-leaf
    q, k = x[..., :64].unflatten(-1, (2, 32)), x[..., 64:].unflatten(-1, (1, 32))
    pos = torch.randint(0, 100, (2, 4), generator=gen).to(kdev)
    v0 = x._version
    yt.apply_rope_(q, k, pos, p)
    assert x._version > v0
    g = torch.randn(2, 4, 96, generator=gen)
    x.backward(g.to(kdev))

    wr = w.detach().cpu().double().requires_grad_()
    xr = wr * 1.0
    rq, rk = rope_reference(xr[..., :64].unflatten(-1, (2, 32)), xr[..., 64:].unflatten(-1, (1, 32)),
                            pos.cpu(), p, compute_dtype=torch.float64)
    torch.cat([rq.flatten(-2), rk.flatten(-2)], -1).backward(g.double())
    assert rel_err(w.grad, wr.grad) < 2e-6


def test_inplace_on_leaf_requiring_grad_is_refused(kdev):
    q = torch.randn(1, 2, 2, 32, device=kdev, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        yt.apply_rope_(q, None, torch.zeros(1, 2, dtype=torch.long, device=kdev), _params())


# ------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, params, layout):
        super().__init__()
        self.proj = torch.nn.Linear(64, 3 * 64)
        self.params, self.layout = params, layout

    def forward(self, x, pos, inplace: bool):
        B, S, _ = x.shape
        qkv = self.proj(x).view(B, S, 3, 2, 32)
        q, k, v = qkv.unbind(2)
        if inplace:
            q, k = q.clone(), k.clone()
            yt.apply_rope_(q, k, pos, self.params, layout=self.layout)
        else:
            q, k = yt.apply_rope(q, k, pos, self.params, layout=self.layout)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return o.transpose(1, 2).reshape(B, S, 64)


@pytest.mark.parametrize("inplace", [False, True], ids=["apply_rope", "apply_rope_"])
def test_torch_compile_fullgraph(inplace, gen):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    blk = _Block(_params(), "deepseek").to(dev)
    x = torch.randn(2, 6, 64, generator=gen).to(dev)
    pos = torch.randint(0, 5000, (2, 6), generator=gen).to(dev)
    eager = blk(x, pos, inplace)
    torch._dynamo.reset()
    compiled = torch.compile(blk, fullgraph=True, backend="aot_eager" if dev == "cpu" else "inductor")
    out = compiled(x, pos, inplace)
    assert rel_err(out, eager) < 1e-5
    if not inplace:  # gradients through the compiled graph too
        out.sum().backward()
        g_c = blk.proj.weight.grad.clone()
        blk.zero_grad()
        blk(x, pos, inplace).sum().backward()
        assert rel_err(g_c, blk.proj.weight.grad) < 1e-5


# ------------------------------------------------------------------------------------
# Position forms
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_starts", [False, True])
def test_packed_varlen_matches_explicit_positions(layout, with_starts, kdev, gen):
    p = _params()
    lens = torch.randint(1, 9, (5,), generator=gen)
    lens[2] = 0  # an empty sequence in the middle
    cu = torch.zeros(6, dtype=torch.int32)
    cu[1:] = lens.cumsum(0)
    T = int(cu[-1]) + 3  # 3 padding tokens past the last sequence: untouched
    starts = torch.randint(0, 10_000, (5,), generator=gen)
    q = torch.randn(T, 4, 32, generator=gen).to(kdev)
    k = torch.randn(T, 2, 32, generator=gen).to(kdev)
    q0, k0 = q.clone(), k.clone()
    yt.apply_rope_(q, k, None, p, layout=layout, cu_seqlens=cu.to(kdev),
                   offsets=starts.to(kdev) if with_starts else None)
    pos = torch.cat([torch.arange(int(n)) + (int(s) if with_starts else 0) for n, s in zip(lens, starts)])
    n = int(cu[-1])
    rq, rk = rope_reference(q0[:n].cpu(), k0[:n].cpu(), pos, p, layout=layout, compute_dtype=torch.float64)
    assert rel_err(q[:n], rq) < 2e-6 and rel_err(k[:n], rk) < 2e-6
    assert torch.equal(q[n:], q0[n:]) and torch.equal(k[n:], k0[n:])


@pytest.mark.parametrize("offsets_kind", ["tensor_int32", "tensor_int64", "python_int", "none"])
def test_batch_offsets_match_explicit_positions(offsets_kind, kdev, gen):
    """KV-cache decode: q [B, S, H, D], position = offsets[b] + s."""
    p = _params()
    B, S = 3, 4
    offs = torch.randint(0, 50_000, (B,), generator=gen)
    offsets = {"tensor_int32": offs.to(torch.int32).to(kdev), "tensor_int64": offs.to(kdev),
               "python_int": 777, "none": None}[offsets_kind]
    base = {"python_int": torch.full((B,), 777), "none": torch.zeros(B, dtype=torch.long)}.get(offsets_kind, offs)
    q = torch.randn(B, 4, S, 32, generator=gen).to(kdev).transpose(1, 2)  # [B, S, H, D] view
    k = torch.randn(B, S, 1, 32, generator=gen).to(kdev)
    q0, k0 = q.clone(), k.clone()
    yt.apply_rope_(q, k, None, p, offsets=offsets)
    pos = base[:, None] + torch.arange(S)
    rq, rk = rope_reference(q0.cpu(), k0.cpu(), pos, p, compute_dtype=torch.float64)
    assert rel_err(q, rq) < 2e-6 and rel_err(k, rk) < 2e-6


# ------------------------------------------------------------------------------------
# Determinism, empty inputs
# ------------------------------------------------------------------------------------
def test_bitwise_deterministic(kdev, gen):
    p = _params()
    q = torch.randn(3, 17, 8, 32, generator=gen).to(kdev, torch.bfloat16)
    pos = torch.randint(0, 1 << 30, (3, 17), generator=gen).to(kdev)
    outs = [yt.apply_rope(q, None, pos, p)[0] for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_empty_batch_of_packed_sequences(kdev):
    p = _params()
    q = torch.empty(0, 2, 32, device=kdev)
    yt.apply_rope_(q, None, None, p, cu_seqlens=torch.zeros(2, dtype=torch.int32, device=kdev))
    out = yt.apply_rope(q, None, None, p, cu_seqlens=torch.zeros(2, dtype=torch.int32, device=kdev))[0]
    assert out.shape == (0, 2, 32)


# ------------------------------------------------------------------------------------
# GPU only: CUDA graphs, streams, > 2**31 elements
# ------------------------------------------------------------------------------------
@requires_cuda
def test_cuda_graph_replay_with_changing_positions(gen):
    p = _params()
    q = torch.randn(4, 1, 8, 32, device="cuda")
    k = torch.randn(4, 1, 2, 32, device="cuda")
    pos = torch.zeros(4, 1, dtype=torch.long, device="cuda")
    offsets = torch.zeros(4, dtype=torch.int32, device="cuda")
    q_in, k_in = q.clone(), k.clone()

    def step():
        q.copy_(q_in)
        k.copy_(k_in)
        yt.apply_rope_(q, k, pos, p)
        yt.apply_rope_(q, k, None, p, offsets=offsets)  # decode form, on top

    step()  # warm-up: compile, inv_freq on device
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        new_pos = torch.randint(0, 1 << 20, (4, 1), generator=gen)
        new_off = torch.randint(0, 1 << 20, (4,), generator=gen)
        q_in.copy_(torch.randn(4, 1, 8, 32, generator=gen))
        k_in.copy_(torch.randn(4, 1, 2, 32, generator=gen))
        pos.copy_(new_pos)
        offsets.copy_(new_off)
        graph.replay()
        torch.cuda.synchronize()
        rq, rk = rope_reference(q_in.cpu(), k_in.cpu(), new_pos, p, compute_dtype=torch.float64)
        rq, rk = rope_reference(rq, rk, new_off[:, None].long(), p, compute_dtype=torch.float64)
        assert rel_err(q, rq) < 4e-6 and rel_err(k, rk) < 4e-6


@requires_cuda
def test_two_streams_do_not_interfere(gen):
    p = _params()
    qs = [torch.randn(64, 128, 8, 32, device="cuda") for _ in range(2)]
    pos = [torch.randint(0, 1 << 20, (64, 128), device="cuda") for _ in range(2)]
    want = [yt.apply_rope(q, None, ps, p)[0] for q, ps in zip(qs, pos)]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    for _ in range(5):
        for s, q, ps in zip(streams, qs, pos):
            with torch.cuda.stream(s):
                s_out = yt.apply_rope(q, None, ps, p)[0]
                s_out.record_stream(s)
                s.out = s_out
        torch.cuda.synchronize()
        for s, w in zip(streams, want):
            assert torch.equal(s.out, w)


@requires_cuda
def test_more_than_2pow31_elements():
    """int64 offsets: the last tokens of a q with > 2**31 elements are rotated correctly."""
    free, _ = torch.cuda.mem_get_info()
    H, D = 32, 128
    T = (1 << 31) // (H * D) + 4096
    if free < T * H * D * 2 * 1.3:
        pytest.skip("not enough GPU memory")
    p = yt.RopeParams.yarn(D, 10000.0, 40.0, 4096)
    q = torch.empty(T, H, D, dtype=torch.bfloat16, device="cuda")
    tail = torch.randn(4096, H, D, device="cuda", dtype=torch.bfloat16)
    q[-4096:] = tail
    q[:16] = 1.0
    pos = torch.arange(T, device="cuda", dtype=torch.int64)
    yt.apply_rope_(q, None, pos, p)
    rq, _ = rope_reference(tail.cpu(), None, pos[-4096:].cpu(), p, compute_dtype=torch.float64)
    assert q.numel() > 2 ** 31
    assert rel_err(q[-4096:], rq) < TOL[torch.bfloat16]
    head, _ = rope_reference(torch.ones(16, H, D, dtype=torch.bfloat16), None, pos[:16].cpu(), p,
                             compute_dtype=torch.float64)
    assert rel_err(q[:16], head) < TOL[torch.bfloat16]


@requires_cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [3000, 37])  # a many-token and a decode-sized shape class
def test_autotuned_launch_is_correct(layout, n, monkeypatch, gen):
    """The tuner times candidate shapes on scratch copies: the user's tensors see exactly
    one rotation (in place) or none (out of place), and every candidate config is right."""
    from yarn_triton.kernels import configs, launcher

    monkeypatch.setattr(launcher, "AUTOTUNE", True)
    monkeypatch.setattr(launcher, "_TUNED", type(launcher._TUNED)())  # tune afresh
    p = _params()
    q = torch.randn(1, n, 16, 40, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(1, n, 4, 40, generator=gen).to("cuda", torch.bfloat16)
    pos = torch.randint(0, 1 << 20, (1, n), generator=gen).to("cuda")
    q0, k0 = q.clone(), k.clone()
    rq, rk_ = rope_reference(q0.cpu(), k0.cpu(), pos.cpu(), p, layout=layout, compute_dtype=torch.float64)
    oq, ok = yt.apply_rope(q, k, pos, p, layout=layout)  # tunes the out-of-place class
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert rel_err(oq, rq) < TOL[torch.bfloat16] and rel_err(ok, rk_) < TOL[torch.bfloat16]
    yt.apply_rope_(q, k, pos, p, layout=layout)  # tunes the in-place class
    assert len(launcher.tuned_configs()) == 2
    assert rel_err(q, rq) < TOL[torch.bfloat16] and rel_err(k, rk_) < TOL[torch.bfloat16]
    for cfg in configs.candidate_configs(n, 16, 4, 16):
        qq, kk = q0.clone(), k0.clone()
        yt.apply_rope_(qq, kk, pos, p, layout=layout, config=cfg)
        assert rel_err(qq, rq) < TOL[torch.bfloat16], str(cfg)


@requires_cuda
def test_fast_launch_matches_triton_launch(monkeypatch, gen):
    """The cached-compiled-kernel launch gives bit-identical results to Triton's own
    launcher, across alignments, strides and dtypes that select different specializations."""
    from yarn_triton.kernels import launcher

    p = _params()
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(3, 7, 9 * 40 + 8, generator=gen).to("cuda", dtype)
        for off in (0, 1, 8):  # 16-byte aligned and not
            qk = base[..., off:off + 9 * 40].unflatten(-1, (9, 40))
            cases.append((qk[..., :6, :], qk[..., 6:, :]))
    for q, k in cases:
        pos = torch.randint(0, 1 << 24, q.shape[:2], generator=gen).to("cuda")
        outs = []
        for fast in (False, True, True):  # slow; fast (compiles, caches); fast (cache hit)
            monkeypatch.setattr(launcher, "FAST_LAUNCH", fast)
            qq, kk = q.clone(), k.clone()
            yt.apply_rope_(qq, kk, pos, p, layout="deepseek")
            yt.apply_rope_(qq, kk, None, p, offsets=(1 << 31) + 5)  # int64-wide pos_base
            outs.append((qq, kk))
        for qq, kk in outs[1:]:
            assert torch.equal(qq, outs[0][0]) and torch.equal(kk, outs[0][1])


@requires_cuda
def test_heads_per_step_follow_head_counts(gen):
    """One launch shape, two GQA head counts of the same integer class: each operand's
    heads per step is capped by its heads per group, so the compiled kernels differ and
    the fast path must not hand one's kernel to the other."""
    from yarn_triton.kernels.configs import LaunchConfig

    p = _params()
    cfg = LaunchConfig(2, 8, 1, 1, 2)
    for hk in (6, 2, 6):
        q = torch.randn(1, 33, 12, 40, generator=gen).to("cuda", torch.bfloat16)
        k = torch.randn(1, 33, hk, 40, generator=gen).to("cuda", torch.bfloat16)
        pos = torch.randint(0, 1 << 20, (1, 33), generator=gen).to("cuda")
        rq, rk_ = rope_reference(q.cpu(), k.cpu(), pos.cpu(), p, compute_dtype=torch.float64)
        yt.apply_rope_(q, k, pos, p, config=cfg)
        assert rel_err(q, rq) < TOL[torch.bfloat16] and rel_err(k, rk_) < TOL[torch.bfloat16], hk
