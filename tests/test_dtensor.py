"""DTensor q and k (issue #25): each public function runs on the local shards, forward and
backward, and equals the unsharded op on the full tensors; bad placements raise.

One 2-process gloo world on CPU (spawned once) runs every case and writes its failures to
a file per rank; the test asserts there are none. The workers take the PyTorch reference
path (the Triton interpreter would cost a quarter of a second a call). The one piece of
shard arithmetic that leans on how a path reads its arguments (a packed shard's clipped
``cu_seqlens``: empty sequences, tokens past the last one) is checked in process, on the
suite's path, by ``test_packed_shard_matches_the_whole``.
"""

import datetime
import json
import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2


# --------------------------------------------------------------------------------------
# The cases (run in each worker)
# --------------------------------------------------------------------------------------

def _cases(mesh):
    """``[(name, fn)]``: each fn raises on a mismatch."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.device_mesh import DeviceMesh

    import yarn_triton as yt
    from torch.testing import assert_close

    torch.manual_seed(0)  # the same full tensors on both ranks
    B, S, HQ, HK, D = 2, 5, 4, 2, 16  # S = 5: uneven sequence shards (3, 2)
    params = yt.RopeParams.yarn(8, scaling_factor=4.0, original_max_position_embeddings=16)
    mparams = yt.RopeParams.default(8).with_mrope((2, 1, 1))
    q0 = torch.randn(B, S, HQ, D)
    k0 = torch.randn(B, S, HK, D)
    gq0 = torch.randn(B, S, HQ, D)
    gk0 = torch.randn(B, S, HK, D)
    pos0 = torch.randint(0, 100, (B, S))
    mpos0 = torch.randint(0, 100, (3, B, S))
    qw0 = torch.randn(D)
    kw0 = torch.randn(D)
    placements = {"heads": Shard(2), "batch": Shard(0), "sequence": Shard(1), "replicate": Replicate()}

    def dist_(t, p, grad=False):
        d = distribute_tensor(t.clone(), mesh, [p])
        return d.requires_grad_() if grad else d

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    def loss(qo, ko, gk=gk0):
        return (full(qo) * gq0).sum() + (full(ko) * gk).sum()

    def same(got, want, what):
        assert isinstance(got, DTensor), f"{what}: {type(got).__name__}, not a DTensor"
        assert_close(full(got), want, msg=lambda m: f"{what}: {m}")

    def pos_placement(p, lead=0):  # positions sharded like the tokens they index
        return Replicate() if p.is_replicate() or p.dim >= 2 else Shard(p.dim + lead)

    cases = []

    def case(fn):
        cases.append((fn.__name__, fn))
        return fn

    def fwd_bwd_matches(p, pos, prm):
        """apply_rope of q/k placed as ``p`` against the unsharded op: outputs and gradients."""
        q, k = dist_(q0, p, True), dist_(k0, p, True)
        qo, ko = yt.apply_rope(q, k, pos, prm)
        loss(qo, ko).backward()
        qr, kr = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        rqo, rko = yt.apply_rope(qr, kr, full(pos), prm)
        loss(rqo, rko).backward()
        same(qo, rqo, "q out")
        same(ko, rko, "k out")
        same(q.grad, qr.grad, "q grad")
        same(k.grad, kr.grad, "k grad")
        return q, k, qo, ko

    for name, p in placements.items():
        def rope_fwd_bwd(p=p):
            for pos in (pos0, dist_(pos0, Replicate()), dist_(pos0, pos_placement(p)), pos0[0]):
                q, k, qo, ko = fwd_bwd_matches(p, pos, params)
                assert qo.placements == q.placements and ko.placements == k.placements
            qo, ko = yt.apply_rope(dist_(q0, p), None, pos0, params)  # k None
            assert ko is None
            same(qo, yt.apply_rope(q0, None, pos0, params)[0], "q alone")

        def rope_inplace(p=p):
            want = yt.apply_rope(q0, k0, pos0, params, inverse=True)
            q, k = dist_(q0, p), dist_(k0, p)
            out = yt.apply_rope_(q, k, pos0, params, inverse=True)
            assert out[0] is q and out[1] is k
            same(q, want[0], "q in place")
            same(k, want[1], "k in place")
            # under autograd: a non-leaf, recorded as a copy
            ql, kl = dist_(q0, p, True), dist_(k0, p, True)
            q, k = ql * 1, kl * 1
            yt.apply_rope_(q, k, pos0, params)
            loss(q, k).backward()
            qr, kr = q0.clone().requires_grad_(), k0.clone().requires_grad_()
            rq, rk = yt.apply_rope(qr, kr, pos0, params)
            loss(rq, rk).backward()
            same(q, rq, "q in place, autograd")
            same(ql.grad, qr.grad, "q grad, in place")
            same(kl.grad, kr.grad, "k grad, in place")

        def qk_norm_fwd_bwd(p=p):
            for dtensor_weights in (True, False):
                q, k = dist_(q0, p, True), dist_(k0, p, True)
                if dtensor_weights:
                    qw, kw = dist_(qw0, Replicate(), True), dist_(kw0, Replicate(), True)
                else:
                    qw, kw = qw0.clone().requires_grad_(), kw0.clone().requires_grad_()
                qo, ko = yt.apply_qk_norm_rope(q, k, pos0, params, qw, kw, eps=1e-5, unit_offset=dtensor_weights)
                loss(qo, ko).backward()
                qr, kr = q0.clone().requires_grad_(), k0.clone().requires_grad_()
                qwr, kwr = qw0.clone().requires_grad_(), kw0.clone().requires_grad_()
                rqo, rko = yt.apply_qk_norm_rope(qr, kr, pos0, params, qwr, kwr, eps=1e-5,
                                                 unit_offset=dtensor_weights)
                loss(rqo, rko).backward()
                same(qo, rqo, "q out")
                same(ko, rko, "k out")
                same(q.grad, qr.grad, "q grad")
                same(k.grad, kr.grad, "k grad")
                assert_close(full(qw.grad), qwr.grad, msg=lambda m: f"q_weight grad: {m}")
                assert_close(full(kw.grad), kwr.grad, msg=lambda m: f"k_weight grad: {m}")

        def qk_norm_inplace(p=p):
            want = yt.apply_qk_norm_rope(q0, k0, pos0, params, qw0, kw0)
            q, k = dist_(q0, p), dist_(k0, p)
            yt.apply_qk_norm_rope_(q, k, pos0, params, dist_(qw0, Replicate()), kw0)
            same(q, want[0], "q in place")
            same(k, want[1], "k in place")

        def mrope(p=p):
            for pos in (mpos0, dist_(mpos0, pos_placement(p, lead=1)), pos0):
                fwd_bwd_matches(p, pos, mparams)
            q, k = dist_(q0, p), dist_(k0, p)
            yt.apply_qk_norm_rope_(q, k, mpos0, mparams, qw0, kw0)
            want = yt.apply_qk_norm_rope(q0, k0, mpos0, mparams, qw0, kw0)
            same(q, want[0], "q norm in place")
            same(k, want[1], "k norm in place")

        def offsets(p=p):  # positions=None: offset + index in the sequence
            for off in (None, 7, torch.tensor([3, 11]), dist_(torch.tensor([3, 11]), Replicate())):
                q, k = dist_(q0, p, True), dist_(k0, p, True)
                qo, ko = yt.apply_rope(q, k, None, params, offsets=off)
                (full(qo) * gq0).sum().backward()
                qr = q0.clone().requires_grad_()
                rqo, rko = yt.apply_rope(qr, k0, None, params, offsets=full(off))
                (rqo * gq0).sum().backward()
                same(qo, rqo, f"q out, offsets {off}")
                same(ko, rko, f"k out, offsets {off}")
                same(q.grad, qr.grad, f"q grad, offsets {off}")
            if p.is_replicate() or p.dim != 0:  # [S, H, D]: the sequence is dim 0
                p3 = Shard(0) if p == Shard(1) else Shard(1) if p == Shard(2) else p
                q = dist_(q0[0], p3)
                # (an int: the reference path ignores a [1] offsets tensor of a [S, H, D] q)
                yt.apply_rope_(q, None, None, params, offsets=5)
                same(q, yt.apply_rope(q0[0], None, None, params, offsets=5)[0], "[S, H, D] offsets")

        def packed(p=p):  # cu_seqlens: q [T, H, D], tokens (or heads) sharded
            if not p.is_replicate() and p.dim == 0:
                return  # (a packed batch has no batch dim)
            p3 = Shard(0) if p == Shard(1) else Shard(1) if p == Shard(2) else p
            qp, kp = q0.reshape(B * S, HQ, D)[:9], k0.reshape(B * S, HK, D)[:9]
            gp = gq0.reshape(B * S, HQ, D)[:9]
            for cu, off in ((torch.tensor([0, 4, 4, 7]), None), (torch.tensor([0, 2, 6, 8]), torch.tensor([1, 20, 3])),
                            (torch.tensor([0, 5, 9], dtype=torch.int32), 4)):
                q, k = dist_(qp, p3, True), dist_(kp, p3)
                qo, ko = yt.apply_rope(q, k, None, params, cu_seqlens=cu, offsets=off, check_cu_seqlens=True)
                (full(qo) * gp).sum().backward()
                qr = qp.clone().requires_grad_()
                rqo, rko = yt.apply_rope(qr, kp, None, params, cu_seqlens=cu, offsets=off)
                (rqo * gp).sum().backward()
                same(qo, rqo, f"q out, cu_seqlens {cu}")
                same(ko, rko, f"k out, cu_seqlens {cu}")
                same(q.grad, qr.grad, f"q grad, cu_seqlens {cu}")
                q, k = dist_(qp, p3), dist_(kp, p3)
                yt.apply_qk_norm_rope_(q, k, None, params, qw0, kw0, cu_seqlens=dist_(cu, Replicate()), offsets=off)
                want = yt.apply_qk_norm_rope(qp, kp, None, params, qw0, kw0, cu_seqlens=cu, offsets=off)
                same(q, want[0], f"q norm in place, cu_seqlens {cu}")
                same(k, want[1], f"k norm in place, cu_seqlens {cu}")
            q = dist_(qp, p3)
            try:  # the global values are checked: ends past the 9 tokens
                yt.apply_rope_(q, None, None, params, cu_seqlens=torch.tensor([0, 4, 10]), check_cu_seqlens=True)
                raise AssertionError("cu_seqlens past q's tokens was not refused")
            except ValueError as e:
                assert "cu_seqlens" in str(e), e

        for fn in (rope_fwd_bwd, rope_inplace, qk_norm_fwd_bwd, qk_norm_inplace, mrope, offsets, packed):
            cases.append((f"{fn.__name__}[{name}]", fn))

    @case
    def mqa_heads_sharded_k_replicated():  # a single k head cannot be sharded over 2 ranks
        q, k = dist_(q0, Shard(2), True), dist_(k0[:, :, :1], Replicate(), True)
        qw = dist_(qw0, Replicate(), True)
        kw = kw0.clone().requires_grad_()
        qo, ko = yt.apply_qk_norm_rope(q, k, pos0, params, qw, kw)
        assert ko.placements == (Replicate(),)
        loss(qo, ko, gk0[:, :, :1]).backward()
        qr, kr = q0.clone().requires_grad_(), k0[:, :, :1].clone().requires_grad_()
        qwr, kwr = qw0.clone().requires_grad_(), kw0.clone().requires_grad_()
        rqo, rko = yt.apply_qk_norm_rope(qr, kr, pos0, params, qwr, kwr)
        loss(rqo, rko, gk0[:, :, :1]).backward()
        same(qo, rqo, "q out")
        same(ko, rko, "k out")
        same(q.grad, qr.grad, "q grad")
        same(k.grad, kr.grad, "k grad")
        assert_close(full(qw.grad), qwr.grad)
        assert_close(kw.grad, kwr.grad)

    @case
    def q_scale_and_rotary_at_end():
        q, k = dist_(q0, Shard(1)), dist_(k0, Shard(1))
        qo, ko = yt.apply_rope(q, k, pos0, params, q_scale=(0.1, 4), rotary_at="end")
        rqo, rko = yt.apply_rope(q0, k0, pos0, params, q_scale=(0.1, 4), rotary_at="end")
        same(qo, rqo, "q out")
        same(ko, rko, "k out")

    @case
    def compiled():  # torch.compile traces through the unwrapping (fullgraph: no graph break)
        def f(q, k, pos, qw):
            return yt.apply_qk_norm_rope(q, k, pos, params, qw, kw0)

        q, k = dist_(q0, Shard(1), True), dist_(k0, Shard(1), True)
        qw = dist_(qw0, Replicate(), True)
        qo, ko = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, dist_(pos0, Shard(1)), qw)
        loss(qo, ko).backward()
        qr, kr, qwr = q0.clone().requires_grad_(), k0.clone().requires_grad_(), qw0.clone().requires_grad_()
        rqo, rko = f(qr, kr, pos0, qwr)
        loss(rqo, rko).backward()
        same(qo, rqo, "q out")
        same(ko, rko, "k out")
        same(q.grad, qr.grad, "q grad")
        same(k.grad, kr.grad, "k grad")
        assert_close(full(qw.grad), qwr.grad)
        q, k = dist_(q0, Shard(2)), dist_(k0, Shard(2))
        torch.compile(lambda q, k: yt.apply_rope_(q, k, pos0, params), backend="aot_eager", fullgraph=True)(q, k)
        same(q, yt.apply_rope(q0, k0, pos0, params)[0], "q in place")

    def refused(match, fn, *untouched):
        before = [t.to_local().clone() for t in untouched]
        try:
            fn()
        except ValueError as e:
            assert all(m in str(e) for m in match), f"{match!r} not all in: {e}"
        else:
            raise AssertionError(f"no ValueError (expected one with {match!r})")
        for t, b in zip(untouched, before):
            assert torch.equal(t.to_local(), b), "written before the error"

    @case
    def errors():
        q, k = dist_(q0, Shard(1)), dist_(k0, Shard(1))
        qd, kd = dist_(q0, Shard(3)), dist_(k0, Shard(3))
        refused(["q", "head_dim", "Shard(dim=3)"], lambda: yt.apply_rope_(qd, kd, pos0, params), qd, kd)
        refused(["k", "head_dim"], lambda: yt.apply_rope_(q, kd, pos0, params), q, kd)
        refused(["q", "head_dim"], lambda: yt.apply_qk_norm_rope(qd, kd, pos0, params, qw0, kw0), qd)
        qpart = DTensor.from_local(q0.clone(), mesh, [Partial()], run_check=False)
        refused(["q", "Partial"], lambda: yt.apply_rope_(qpart, None, pos0, params), qpart)
        refused(["k", "Partial"], lambda: yt.apply_rope(dist_(q0, Replicate()), DTensor.from_local(
            k0.clone(), mesh, [Partial()], run_check=False), pos0, params))
        k0d = dist_(k0, Shard(0))
        refused(["k", "placements", "Shard(dim=0)", "same token dims"], lambda: yt.apply_rope_(q, k0d, pos0, params),
                q, k0d)
        kh = dist_(k0, Shard(2))  # q on the sequence, k on its heads
        refused(["k", "same token dims"], lambda: yt.apply_rope_(q, kh, pos0, params), q, kh)
        other = DeviceMesh("cpu", [1, 0])
        k_other = distribute_tensor(k0.clone(), other, [Shard(1)])
        refused(["k", "device mesh"], lambda: yt.apply_rope_(q, k_other, pos0, params), q)
        refused(["k", "DTensor"], lambda: yt.apply_rope_(q, k0.clone(), pos0, params), q)
        refused(["positions", "DTensor", "q"], lambda: yt.apply_rope_(q0.clone(), None, dist_(pos0, Replicate()),
                                                                        params))
        pos_wrong = dist_(pos0, Shard(0))  # q is sharded on the sequence
        refused(["positions", "Shard(dim=0)", "sharded like the tokens"],
                lambda: yt.apply_rope_(q, k, pos_wrong, params), q, k)
        qh = dist_(q0, Shard(2))
        refused(["positions", "Shard(dim=1)"], lambda: yt.apply_rope_(qh, None, dist_(pos0, Shard(1)), params), qh)
        refused(["positions"], lambda: yt.apply_rope_(q, k, DTensor.from_local(
            pos0.clone(), mesh, [Partial()], run_check=False), params), q, k)
        refused(["offsets", "replicated", "Shard(dim=0)"],
                lambda: yt.apply_rope_(q, k, None, params, offsets=dist_(torch.tensor([3, 11]), Shard(0))), q, k)
        cu = dist_(torch.tensor([0, 4, 8, 10]), Shard(0))
        qp = dist_(q0.reshape(10, HQ, D), Shard(0))
        refused(["cu_seqlens", "replicated"], lambda: yt.apply_rope_(qp, None, None, params, cu_seqlens=cu), qp)
        refused(["q_weight", "replicated"], lambda: yt.apply_qk_norm_rope_(
            q, k, pos0, params, dist_(qw0, Shard(0)), kw0), q, k)
        refused(["k_weight", "device mesh"], lambda: yt.apply_qk_norm_rope_(
            q, k, pos0, params, qw0, distribute_tensor(kw0.clone(), other, [Replicate()])), q, k)
        # the usual argument checks see the global shapes
        refused(["positions", "broadcast", "(2, 5)"], lambda: yt.apply_rope_(q, k, pos0[:, :4], params), q, k)

    return cases


def _worker(rank, out_dir, root):
    os.environ.pop("TRITON_INTERPRET", None)  # (before yarn_triton is imported here): the reference path
    sys.path.insert(0, root)  # the parent's yarn_triton
    torch.set_num_threads(1)
    # (a file store: no port to pick, none to collide with; a rank that fails a case before
    # a collective the other one waits in ends that wait within the timeout, not never)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    failures = []
    try:
        from torch.distributed.device_mesh import DeviceMesh
        mesh = DeviceMesh("cpu", list(range(WORLD)))
        cases = _cases(mesh)
        times = {}
        for name, fn in cases:
            t0 = time.perf_counter()
            try:
                fn()
            except Exception:  # noqa: BLE001 (reported to the parent)
                failures.append(f"{name}: {traceback.format_exc()}")
            times[name] = round(time.perf_counter() - t0, 3)
        names = [n for n, _ in cases]
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"cases": names, "failures": failures, "times": times}, f)


def test_dtensor_shards_match_the_unsharded_op(tmp_path):
    import torch.multiprocessing as mp

    import yarn_triton

    root = os.path.dirname(os.path.dirname(os.path.abspath(yarn_triton.__file__)))
    mp.start_processes(_worker, args=(str(tmp_path), root), nprocs=WORLD, join=True,
                       start_method="spawn")
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(f"rank {rank}: {sum(report['times'].values()):.1f} s in the cases; slowest:",
              sorted(report["times"].items(), key=lambda kv: -kv[1])[:5])
        assert len(report["cases"]) > 30
        assert not report["failures"], f"rank {rank}:\n" + "\n".join(report["failures"])


# --------------------------------------------------------------------------------------
# In process, on the suite's path (the kernel under TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cu,offsets", [([0, 4, 4, 7], None), ([0, 2, 6, 8], [1, 20, 3]), ([0, 5, 9], 4)])
def test_packed_shard_matches_the_whole(cu, offsets):
    """A token shard of a packed batch, given :func:`packed_shard`'s cu_seqlens and offsets,
    rotates exactly as those tokens do in the whole batch (also past its last sequence)."""
    import yarn_triton as yt
    from yarn_triton.op.dtensor import packed_shard

    torch.manual_seed(1)
    params = yt.RopeParams.default(8)
    q = torch.randn(9, 2, 8)
    cu = torch.tensor(cu, dtype=torch.int32)
    off = torch.tensor(offsets) if isinstance(offsets, list) else offsets
    # (in place: what tokens past the last sequence hold is defined there)
    whole = yt.apply_rope_(q.clone(), None, None, params, cu_seqlens=cu, offsets=off)[0]
    for start, length in ((0, 5), (5, 4), (3, 3)):
        cu_l, off_l = packed_shard(cu, off, start, length)
        part = yt.apply_rope_(q[start:start + length].clone(), None, None, params, cu_seqlens=cu_l, offsets=off_l,
                              check_cu_seqlens=True)[0]
        torch.testing.assert_close(part, whole[start:start + length], rtol=0, atol=0)

