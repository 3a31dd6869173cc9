"""The opt-in low-precision rotation (``YARN_TRITON_LOW_PRECISION_ROTATION=1``, the
launcher's ``LOW_PRECISION_ROTATION``): for 16-bit q and k with nothing else applied, the
rotation's products are computed in that dtype, as the cos/sin-table kernels do. Checked
against the float64 reference: bounded by the roundings it adds, visibly different from
the float32 rotation (the switch took effect), and ignored where it does not apply."""

from collections import OrderedDict

import pytest
import torch

import yarn_triton as yt
from yarn_triton.kernels import launcher
from yarn_triton.op import plans
from yarn_triton.reference import rope_reference

from conftest import POISON, rel_err


def _params(rot=64):
    return yt.RopeParams.yarn(rot, 500000.0, 8.0, 8192, mscale=0.707, mscale_all_dim=0.707)


def _run(flag, monkeypatch, fn):
    """``fn()`` with the switch set to ``flag`` and no launch plan kept from another setting
    (plans are keyed by the call, not by this process-wide switch)."""
    monkeypatch.setattr(launcher, "LOW_PRECISION_ROTATION", flag)
    monkeypatch.setattr(plans, "_PLANS", OrderedDict())
    return fn()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["neox", "interleaved", "deepseek"])
def test_bounded_and_in_effect(kdev, gen, monkeypatch, dtype, layout):
    p = _params()
    q = torch.randn(2, 9, 4, 80, generator=gen).to(kdev, dtype)  # partial rotary: 64 of 80
    k = torch.randn(2, 9, 2, 80, generator=gen).to(kdev, dtype)
    pos = torch.randint(0, 200000, (2, 9), generator=gen).to(kdev)
    rq, rk = rope_reference(q.double(), k.double(), pos, p, layout=layout, compute_dtype=torch.float64)
    out = {}
    for flag in (False, True):
        qa, ka = q.clone(), k.clone()
        _run(flag, monkeypatch, lambda: yt.apply_rope_(qa, ka, pos, p, layout=layout))
        assert torch.isfinite(qa).all() and torch.isfinite(ka).all()
        out[flag] = (rel_err(qa, rq), rel_err(ka, rk), qa, ka)
    eps = torch.finfo(dtype).eps  # 2**-7 bf16, 2**-10 fp16: twice the unit roundoff
    for i in (0, 1):
        # default: the store's one rounding; low: a few more (cos/sin, two products, the sum)
        assert out[False][i] < 1.0 * eps
        assert out[False][i] < out[True][i] < 1.5 * eps
    assert not torch.equal(out[False][2], out[True][2])
    # the pass-through channels are copied untouched either way
    assert torch.equal(out[True][2][..., 64:], q[..., 64:])


def test_out_of_place_and_backward_take_it_too(kdev, gen, monkeypatch):
    """apply_rope (autograd) forward and its backward (the inverse rotation, same kernel)."""
    p = _params()
    q = torch.randn(1, 7, 4, 64, generator=gen).to(kdev, torch.bfloat16).requires_grad_()
    pos = torch.randint(0, 200000, (1, 7), generator=gen).to(kdev)
    g = torch.randn(1, 7, 4, 64, generator=gen).to(kdev, torch.bfloat16)
    qd = q.detach().double().requires_grad_()
    rq, _ = rope_reference(qd, None, pos, p, compute_dtype=torch.float64)
    (rg,) = torch.autograd.grad(rq, qd, g.double())
    res = {}
    for flag in (False, True):
        def call():
            qo, _ = yt.apply_rope(q, None, pos, p)
            (dq,) = torch.autograd.grad(qo, q, g)
            return qo, dq
        res[flag] = _run(flag, monkeypatch, call)
    eps = torch.finfo(torch.bfloat16).eps
    for j, ref in ((0, rq), (1, rg)):
        assert rel_err(res[False][j], ref) < rel_err(res[True][j], ref) < 1.5 * eps
        assert not torch.equal(res[False][j], res[True][j])


@pytest.mark.parametrize("case", ["float32", "cache", "norm", "q_scale"])
def test_ignored_where_it_does_not_apply(kdev, gen, monkeypatch, case):
    """float32 tensors, the rope-and-cache op, the fused norm and the query scale keep
    float32 arithmetic: bit-equal results with the switch on and off."""
    p = _params()
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    q = torch.randn(1, 5, 4, 64, generator=gen).to(kdev, dtype)
    k = torch.randn(1, 5, 2, 64, generator=gen).to(kdev, dtype)
    pos = torch.randint(0, 200000, (1, 5), generator=gen).to(kdev)
    w = (torch.rand(64, generator=gen) + 0.5).to(kdev)
    outs = []
    for flag in (False, True):
        qa, ka = q.clone(), k.clone()
        if case == "cache":
            kc = torch.full((4, 4, 2, 64), POISON, device=kdev, dtype=dtype)
            vc = torch.full_like(kc, POISON)
            slots = torch.arange(5, device=kdev).view(1, 5)
            _run(flag, monkeypatch, lambda: yt.apply_rope_and_cache_(qa, ka, ka.clone(), pos, p, kc, vc, slots))
            outs.append(kc[0, :, :, :].reshape(-1))  # the rotated k in the cache too (the written rows)
        elif case == "norm":
            _run(flag, monkeypatch, lambda: yt.apply_qk_norm_rope_(qa, ka, pos, p, w, w))
        elif case == "q_scale":
            _run(flag, monkeypatch, lambda: yt.apply_rope_(qa, ka, pos, p, q_scale=(0.1, 8192)))
        else:
            _run(flag, monkeypatch, lambda: yt.apply_rope_(qa, ka, pos, p))
        outs.append(qa.reshape(-1))
    off, on = torch.cat(outs[:len(outs) // 2]), torch.cat(outs[len(outs) // 2:])
    assert torch.isfinite(off).all()
    assert torch.equal(off, on)


def test_compiles_to_packed_16bit_arithmetic_for_hopper(tmp_path):
    """sm_90 SASS, compiled without a GPU (bench/inspect_kernel.py, in a process of its own:
    under TRITON_INTERPRET=1 nothing compiles): with the switch the rotation is packed bf16
    FMAs, and the decode shape's thread runs fewer instructions."""
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")):
        pytest.skip("this triton has no nvdisasm to read SASS with")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shape = ["--block-t", "1", "--block-h", "32", "--k-block-h", "8", "--warps", "4", "--rows", "2", "--one-step"]
    script = (f"import sys; sys.path.insert(0, {os.path.join(root, 'bench')!r}); import inspect_kernel as ik\n"
              f"ik.main({shape!r} + ['--dump', {str(tmp_path / 'low0.sass')!r}])\n"
              f"ik.main({shape!r} + ['--low-rot', '--dump', {str(tmp_path / 'low1.sass')!r}])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    totals = [int(part.split()[0]) for part in out.stdout.split("total:")[1:]]
    sass = [(tmp_path / f"low{i}.sass").read_text() for i in (0, 1)]
    # packed bf16 arithmetic (HFMA2.BF16_V2 / HMUL2.BF16_V2) only with the switch
    assert sass[1].count("BF16_V2") >= 16
    assert "BF16_V2" not in sass[0]
    assert len(totals) == 2 and totals[1] < 0.85 * totals[0]
