"""Context parallelism: rank ``r`` of ``N`` holds chunks ``r`` and ``2N - 1 - r`` of each
sequence cut into ``2N`` (torch's head-tail load balancer, TransformerEngine's
``cp_size``/``cp_rank``), and its rotation must be the unsharded sequence's, row for row.

* Positions sharded by torch's own CP helper (``_context_parallel_buffers`` with
  ``_HeadTailLoadBalancer``, on a fake process group of N ranks) with q and k: the local
  call with those positions, and the call with ``cp=(N, r)`` and no positions, give the
  matching rows of the unsharded rotation.
* ``cp=(N, r)`` without positions, the positions derived in the kernel (interpreter/GPU)
  and by the CPU reference path: ``[B, S, H, D]`` with per-sequence offsets, ``[S, H, D]``
  with an int offset, packed ``cu_seqlens`` (local ranges), N = 2 and 3, every rank,
  forward and backward, against the float64 truth at the global positions; the custom
  op and its autograd; the serving op; launch plans keyed by cp; bad arguments.
"""

import pytest
import torch

import yarn_triton as yt
from yarn_triton import op
from yarn_triton.reference import rms_norm_reference, rope_reference

from conftest import TOL, rel_err

F64 = torch.float64
D, ROT = 40, 32  # a partial rotary: the pass-through channels are copied (and their gradients)


def _params():
    return yt.RopeParams.yarn(ROT, 10000.0, 8.0, 2048, mscale=0.9, mscale_all_dim=0.7)


def _head_tail(n: int, size: int, rank: int) -> torch.Tensor:
    """Indices of rank ``rank``'s tokens in a sequence of ``n``: chunks ``rank`` and
    ``2 * size - 1 - rank`` of ``2 * size``, written out here independently of the library."""
    c = n // (2 * size)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * size - 1 - rank) * c,
                                                                        (2 * size - rank) * c)])


@pytest.fixture(params=["kernel", "reference"])
def path(request, monkeypatch):
    """``(device, tolerance)``: the kernel (``kdev``: the interpreter on CPU tensors, or a
    GPU), or the PyTorch reference path of CPU tensors (float32 angles: positions here stay
    small enough for 2e-5)."""
    op.plans._PLANS.clear()
    if request.param == "kernel":
        return request.getfixturevalue("kdev"), TOL[torch.float32]
    monkeypatch.setattr(op.launch, "uses_kernel", lambda t: False)
    return "cpu", 2e-5


def _truth(q, k, pos, p, inverse=False):
    return rope_reference(q.double(), k.double(), pos, p, compute_dtype=F64, inverse=inverse)


def _check_ranks(p, dev, tol, q, k, gpos, shard, call, gq, gk):
    """For every rank: ``call(rank, q_local, k_local)`` (``apply_rope`` leaves) equals the
    rows ``shard(rank)`` of the unsharded float64 rotation of ``q``/``k`` at the global
    positions ``gpos``, and the gradients of ``sum(out * g)`` equal the rows of the inverse
    rotation of the unsharded ``gq``/``gk``."""
    rq, rk = _truth(q, k, gpos, p)
    dq, dk = _truth(gq, gk, gpos, p, inverse=True)
    for rank, rows in shard:
        ql = rows(q).to(dev).requires_grad_()
        kl = rows(k).to(dev).requires_grad_()
        oq, ok = call(rank, ql, kl)
        assert rel_err(oq.detach(), rows(rq)) < tol and rel_err(ok.detach(), rows(rk)) < tol, f"rank {rank}"
        ((oq * rows(gq).to(dev)).sum() + (ok * rows(gk).to(dev)).sum()).backward()
        assert rel_err(ql.grad, rows(dq)) < tol and rel_err(kl.grad, rows(dk)) < tol, f"rank {rank} grad"


# --------------------------------------------------------------------------------------
# Positions sharded by torch's own context-parallel helper
# --------------------------------------------------------------------------------------
def _torch_cp():
    """torch's CP sharding helper and head-tail balancer, and the fake process group
    backend (``FakeStore``), or a skip."""
    try:
        from torch.distributed.tensor.experimental._context_parallel._attention import _context_parallel_buffers
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer
    except ImportError:
        try:
            from torch.distributed.tensor.experimental._attention import (_context_parallel_buffers,
                                                                          _HeadTailLoadBalancer)
        except ImportError:
            pytest.skip("this torch has no context-parallel sharding helper with a head-tail load balancer")
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:
        pytest.skip("this torch has no fake process group")
    return _context_parallel_buffers, _HeadTailLoadBalancer, FakeStore


def _torch_shards(size, buffers, seq_dims):
    """``[(rank, [local shards of buffers])]`` as torch's ``context_parallel`` cuts them with
    its default head-tail load balancer, each rank in its own (fake) process group."""
    shard_buffers, balancer, store = _torch_cp()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    out = []
    for rank in range(size):
        dist.init_process_group("fake", store=store(), rank=rank, world_size=size)
        try:
            mesh = init_device_mesh("cpu", (size,))
            lb = balancer(buffers[0].shape[seq_dims[0]], size, "cpu")
            out.append((rank, [t.clone() for t in shard_buffers(mesh, buffers, seq_dims, lb)]))
        finally:
            dist.destroy_process_group()
    return out


@pytest.mark.parametrize("size", [2, 3])
def test_positions_sharded_by_torch_load_balancer(size, path, gen):
    """q, k, their positions (any values: a decode-like offset per row) and the unsharded
    float64 rotation, all sharded along the sequence by torch's CP helper: the local call
    with the sharded positions gives the sharded truth, and so does ``cp=(size, rank)``
    with the offsets instead of positions: the head-tail map is torch's."""
    dev, tol = path
    p = _params()
    B, S = 2, 4 * size
    q = torch.randn(B, S, 1, D, generator=gen)
    k = torch.randn(B, S, 1, D, generator=gen)
    off = torch.randint(0, 100, (B,), generator=gen)
    pos = off[:, None] + torch.arange(S)
    rq, rk = _truth(q, k, pos, p)
    for rank, (ql, kl, pl, tq, tk) in _torch_shards(size, [q, k, pos, rq, rk], [1, 1, 1, 1, 1]):
        assert pl.shape == (B, S // size)
        oq, ok = yt.apply_rope(ql.to(dev), kl.to(dev), pl.to(dev), p)
        assert rel_err(oq, tq) < tol and rel_err(ok, tk) < tol, f"rank {rank}"
        cq, ck = yt.apply_rope(ql.to(dev), kl.to(dev), None, p, offsets=off.to(dev), cp=(size, rank))
        assert rel_err(cq, tq) < tol and rel_err(ck, tk) < tol, f"rank {rank}, cp"


# --------------------------------------------------------------------------------------
# cp=(cp_size, cp_rank): positions derived from the shard
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [2, 3])
def test_batch_with_offsets_tensor(size, path, gen):
    """``[B, S_local, H, D]`` rows, each its sequence's shard, ``offsets[b]`` the global
    position of row b's first token: every rank's apply_rope and its gradients."""
    dev, tol = path
    p = _params()
    B, S = 2, 4 * size  # chunks of 2
    q = torch.randn(B, S, 1, D, generator=gen)
    k = torch.randn(B, S, 1, D, generator=gen)
    gq, gk = torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen)
    off = torch.randint(0, 100, (B,), generator=gen)
    gpos = off[:, None] + torch.arange(S)
    shard = [(r, lambda t, r=r: t[:, _head_tail(S, size, r)]) for r in range(size)]
    _check_ranks(p, dev, tol, q, k, gpos, shard,
                 lambda r, ql, kl: yt.apply_rope(ql, kl, None, p, offsets=off.to(dev), cp=(size, r)), gq, gk)


@pytest.mark.parametrize("size", [2, 3])
def test_single_sequence_with_int_offset(size, path, gen):
    """``[S_local, H, D]`` with an int offset; also in place (``apply_rope_``, twice: the
    second call replays the launch plan of the first) and with the fused norm."""
    dev, tol = path
    p = _params()
    S, off = 6 * size, 37  # chunks of 3
    q = torch.randn(S, 1, D, generator=gen)
    k = torch.randn(S, 1, D, generator=gen)
    gq, gk = torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen)
    gpos = off + torch.arange(S)
    shard = [(r, lambda t, r=r: t[_head_tail(S, size, r)]) for r in range(size)]
    _check_ranks(p, dev, tol, q, k, gpos, shard,
                 lambda r, ql, kl: yt.apply_rope(ql, kl, None, p, offsets=off, cp=(size, r)), gq, gk)
    rq, rk = _truth(q, k, gpos, p)
    for r, rows in shard:
        for _ in range(2):
            ql, kl = rows(q).to(dev), rows(k).to(dev)
            yt.apply_rope_(ql, kl, None, p, offsets=off, cp=(size, r))
            assert rel_err(ql, rows(rq)) < tol and rel_err(kl, rows(rk)) < tol, f"rank {r} in place"
    r = size - 1
    w = torch.rand(D, generator=gen) + 0.5
    rows = shard[r][1]
    ql, kl = rows(q).to(dev), rows(k).to(dev)
    yt.apply_qk_norm_rope_(ql, kl, None, p, w.to(dev), w.to(dev), offsets=off, cp=(size, r))
    normed = rms_norm_reference(q.double(), w.double(), 1e-6, compute_dtype=F64)
    nq = rope_reference(normed, None, gpos, p, compute_dtype=F64)[0]
    assert rel_err(ql, rows(nq)) < tol


@pytest.mark.parametrize("size", [2, 3])
def test_packed_sequences(size, path, gen):
    """Packed ``[T_local, H, D]``: ``cu_seqlens`` describes the local tokens (each local
    sequence is its two chunks), ``offsets`` per sequence; two padding tokens past
    ``cu_seqlens[-1]`` are left as they were (in place)."""
    dev, tol = path
    p = _params()
    glens = [2 * size * c for c in (1, 2, 1)]  # global lengths: chunks of 1, 2, 1 tokens
    offs = torch.randint(0, 100, (3,), generator=gen)
    n_glob = sum(glens)
    q = torch.randn(n_glob, 1, D, generator=gen)
    k = torch.randn(n_glob, 1, D, generator=gen)
    gq, gk = torch.randn(q.shape, generator=gen), torch.randn(k.shape, generator=gen)
    starts = [sum(glens[:i]) for i in range(3)]
    gpos = torch.cat([o + torch.arange(n) for o, n in zip(offs.tolist(), glens)])
    llens = [n // size for n in glens]
    cu = torch.tensor([0] + torch.tensor(llens).cumsum(0).tolist(), dtype=torch.int32).to(dev)

    def rows_of(r):
        idx = torch.cat([s + _head_tail(n, size, r) for s, n in zip(starts, glens)])
        return lambda t: t[idx]

    shard = [(r, rows_of(r)) for r in range(size)]

    def call(r, ql, kl):
        return yt.apply_rope(ql, kl, None, p, cu_seqlens=cu, offsets=offs.to(dev), cp=(size, r),
                             check_cu_seqlens=True)

    _check_ranks(p, dev, tol, q, k, gpos, shard, call, gq, gk)
    rq, rk = _truth(q, k, gpos, p)
    for r, rows in shard:  # in place, with padding past the sequences
        ql = torch.cat([rows(q), torch.randn(2, 1, D, generator=gen)]).to(dev)
        kl = torch.cat([rows(k), torch.randn(2, 1, D, generator=gen)]).to(dev)
        q0, k0 = ql.clone(), kl.clone()
        yt.apply_rope_(ql, kl, None, p, cu_seqlens=cu, offsets=offs.to(dev), cp=(size, r))
        n = ql.shape[0] - 2
        assert rel_err(ql[:n], rows(rq)) < tol and rel_err(kl[:n], rows(rk)) < tol, f"rank {r} in place"
        assert torch.equal(ql[n:], q0[n:]) and torch.equal(kl[n:], k0[n:])


def test_custom_op_and_its_autograd_take_the_shard(path, gen):
    """``torch.ops.yarn_triton.rope`` (what torch.compile traces) takes ``cp_size, cp_rank``
    and its registered backward passes them on: forward and gradient of rank 1 of 2."""
    dev, tol = path
    p = _params()
    S = 8
    q = torch.randn(S, 1, D, generator=gen)
    g = torch.randn(q.shape, generator=gen)
    idx = _head_tail(S, 2, 1)
    gpos = 5 + torch.arange(S)
    rq = _truth(q, q, gpos, p)[0][idx]
    dq = _truth(g, g, gpos, p, inverse=True)[0][idx]
    ql = q[idx].to(dev).requires_grad_()
    out = torch.ops.yarn_triton.rope(ql, None, None, None, None, p.inv_freq_on(dev), p.cos_sin_scale, 5, ROT,
                                     "neox", False, True, None, None, 0.0, 0, None, 0.0, 0, "start", 2, 1)[0]
    assert rel_err(out.detach(), rq) < tol
    (out * g[idx].to(dev)).sum().backward()
    assert rel_err(ql.grad, dq) < tol


def test_serving_op_takes_the_shard(path, gen):
    """``apply_rope_and_cache_`` with ``cp``: q and the k cache rows get the global
    positions' rotation (rank 1 of 2, contiguous sequence, int offset)."""
    dev, tol = path
    p = _params()
    S = 8
    q = torch.randn(S, 1, D, generator=gen)
    k = torch.randn(S, 1, D, generator=gen)
    v = torch.randn(S, 1, 16, generator=gen)
    idx = _head_tail(S, 2, 1)
    rq, rk = _truth(q, k, 3 + torch.arange(S), p)
    k_cache = torch.zeros(2, 4, 1, D).to(dev)
    v_cache = torch.zeros(2, 4, 1, 16).to(dev)
    slots = torch.arange(4).flip(0).to(dev)
    ql = q[idx].to(dev)
    yt.apply_rope_and_cache_(ql, k[idx].to(dev), v[idx].to(dev), None, p, k_cache, v_cache, slots, offsets=3,
                             cp=(2, 1))
    assert rel_err(ql, rq[idx]) < tol
    assert rel_err(k_cache.reshape(8, 1, D)[:4].flip(0), rk[idx]) < tol
    assert torch.equal(v_cache.reshape(8, 1, 16)[:4].flip(0).cpu(), v[idx])


def test_one_rank_is_the_unsharded_call_and_plans_are_keyed_by_cp(gen):
    """``cp=(1, 0)`` is the plain call (odd lengths too); the same shapes with another
    shard, or none, never replay a plan made for a different one (CPU, either path)."""
    p = _params()
    q = torch.randn(1, 4, 1, D, generator=gen)
    want = yt.apply_rope(q, None, None, p, offsets=4)[0]
    assert torch.equal(yt.apply_rope(q, None, None, p, offsets=4, cp=(1, 0))[0], want)
    assert torch.equal(yt.apply_rope(q[:, :3], None, None, p, cp=(1, 0))[0], yt.apply_rope(q[:, :3], None, None, p)[0])
    sig = [op.plans._signature(q, None, None, p, "neox", None, 4, None, True, False, None, True, cp=cp)
           for cp in (None, (2, 0), (2, 1), (3, 1))]
    assert len(set(sig)) == 4
    assert op.plans._signature(q, None, None, p, "neox", None, 4, None, True, False, None, True, cp=[2, 0]) is None
    outs = []
    for cp in ((2, 0), (2, 1), None, (2, 0)):
        qi = q.clone()
        yt.apply_rope_(qi, None, None, p, offsets=4, cp=cp)
        outs.append(qi)
    assert torch.equal(outs[2], want) and torch.equal(outs[0], outs[3]) and not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("fn", ["apply_rope_", "apply_rope", "apply_qk_norm_rope_", "apply_rope_and_cache_"])
def test_bad_arguments(fn, gen):
    """Clear errors, raised before anything is written."""
    p = _params()
    q = torch.randn(1, 6, 2, D, generator=gen)
    k = torch.randn(1, 6, 1, D, generator=gen)
    w = torch.ones(D)
    q0, k0 = q.clone(), k.clone()

    def call(q, positions=None, **kw):
        if fn == "apply_qk_norm_rope_":
            return yt.apply_qk_norm_rope_(q, k[:, :q.shape[1]], positions, p, w, w, **kw)
        if fn == "apply_rope_and_cache_":
            cache = torch.zeros(2, 4, 1, D)
            return yt.apply_rope_and_cache_(q, k[:, :q.shape[1]], k[:, :q.shape[1]], positions, p, cache,
                                            cache.clone(), torch.arange(q.shape[1]), **kw)
        return getattr(yt, fn)(q, k[:, :q.shape[1]], positions, p, **kw)

    cases = [
        (dict(cp=[2, 0]), TypeError, "tuple of two ints"),
        (dict(cp=(2,)), TypeError, "tuple of two ints"),
        (dict(cp=(2.0, 0)), TypeError, "tuple of two ints"),
        (dict(cp=(True, 0)), TypeError, "tuple of two ints"),
        (dict(cp=(0, 0)), ValueError, "cp_size must be >= 1"),
        (dict(cp=(2, 2)), ValueError, r"cp_rank must be in \[0, cp_size\)"),
        (dict(cp=(2, -1)), ValueError, r"cp_rank must be in \[0, cp_size\)"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            call(q, **kw)
    with pytest.raises(ValueError, match="cannot be combined with positions"):
        call(q, torch.arange(6), cp=(2, 0))
    with pytest.raises(ValueError, match="even length, got 5 tokens"):
        call(q[:, :5], cp=(2, 1))
    assert torch.equal(q, q0) and torch.equal(k, k0)
    if fn == "apply_rope_":  # packed: odd local lengths are found by the cu_seqlens check
        qp, kp = q[0].clone(), k[0].clone()
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        with pytest.raises(ValueError, match="sequence 1 has 3 tokens"):
            yt.apply_rope_(qp, kp, None, p, cu_seqlens=cu, cp=(2, 0), check_cu_seqlens=True)
        assert torch.equal(qp, q0[0]) and torch.equal(kp, k0[0])


def test_torch_compile_fullgraph(gen):
    """Under torch.compile (fullgraph) the shard reaches the custom ops, forward and
    backward, out of place and in place (CPU: the interpreter or the reference)."""
    from conftest import assert_compiles_like_eager

    p = _params()
    q = torch.randn(2, 6, 1, D, generator=gen)
    off = torch.tensor([3, 50])

    def f(q, off):
        q2 = yt.apply_rope(q, None, None, p, offsets=off, cp=(3, 1))[0]
        q3 = q2.detach().clone()
        yt.apply_rope_(q3, None, None, p, offsets=off, cp=(3, 2))
        return q2, q3

    assert_compiles_like_eager(f, q.clone().requires_grad_(), off)
    q2, q3 = f(q, off)
    idx1, idx2 = _head_tail(18, 3, 1), _head_tail(18, 3, 2)
    gpos = off[:, None] + torch.arange(18)
    assert rel_err(q2.detach(), _truth(q, q, gpos[:, idx1], p)[0]) < 2e-5
    assert rel_err(q3, _truth(q2.detach(), q2, gpos[:, idx2], p)[0]) < 2e-5


def test_cp_with_dtensor_arguments_is_refused(gen):
    """DTensor q and k name their shards by their placements: ``cp`` with them raises a
    ValueError naming it, before anything is written (a fake process group of 2 ranks)."""
    _, _, store = _torch_cp()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=store(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        q = DTensor.from_local(torch.randn(1, 4, 2, D, generator=gen), mesh, [Shard(2)], run_check=False)
        k = DTensor.from_local(torch.randn(1, 4, 1, D, generator=gen), mesh, [Shard(2)], run_check=False)
        q0, k0 = q.to_local().clone(), k.to_local().clone()
        for fn in (yt.apply_rope_, yt.apply_rope):
            with pytest.raises(ValueError, match="cp"):
                fn(q, k, None, _params(), offsets=3, cp=(2, 0))
            assert torch.equal(q.to_local(), q0) and torch.equal(k.to_local(), k0)
    finally:
        dist.destroy_process_group()
