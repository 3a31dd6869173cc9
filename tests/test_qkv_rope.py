"""The fused QKV projection + rope experiment (``yarn_triton.op.qkv``, issue #26): the kernel
against the float64 composition of the matmul then the reference rope (and norm), its
gradients against float64 autograd of that composition, bad input, and the CPU reference
path. Small shapes: every case runs through the interpreter on CPU in CI (the whole file
within 30 s on two cores)."""

import pytest
import torch
import torch.nn.functional as F

import yarn_triton as yt
from yarn_triton.kernels.qkv_launcher import QkvConfig, launch_qkv
from yarn_triton.op import qkv as qkv_mod
from yarn_triton.op.qkv import qkv_rope
from yarn_triton.reference import qk_norm_rope_reference, rope_reference

from conftest import POISON, TOL, rel_err

# Outputs are rounded once from float32 (no rounding between the GEMM and the rotation), and
# the float64 truth takes the same 16-bit inputs, so the error is that rounding: RMS about
# 1.7e-3 of the values in bfloat16 (half an ulp is 2**-9 to 2**-8 of a value) and 2.1e-4 in
# float16; float32 accumulation over <= 64 products and the angles (< 1e-6) add nothing
# visible. The bounds leave 1.8x / 2.4x of margin for few-element draws.
OUT_TOL = {torch.float32: TOL[torch.float32], torch.float16: 5e-4, torch.bfloat16: 3e-3}


def _params(rot):
    # YaRN with cos_sin_scale = 0.1 ln 4 + 1 (mscale_all_dim 0): the scale is checked too
    return yt.RopeParams.yarn(rot, 1e6, 4.0, 4096, mscale=1.0, mscale_all_dim=0.0)


def _case(gen, dtype, tokens, hidden, hq, hk, d, bias, norm, dev="cpu", row_pad=0):
    n = (hq + 2 * hk) * d
    # row_pad: x is a slice of wider rows (a row stride past hidden, no copy made)
    x = torch.randn(*tokens, hidden + row_pad, generator=gen).to(dev, dtype)[..., :hidden]
    w = (torch.randn(n, hidden, generator=gen) / hidden ** 0.5).to(dev, dtype)
    b = torch.randn(n, generator=gen).to(dev, dtype) if bias else None
    qn = kn = None
    if norm:  # norm weights away from 1 so that a lost weight shows
        qn = (torch.rand(d, generator=gen) + 0.5).to(dev)
        kn = (torch.rand(d, generator=gen) + 0.5).to(dev)
    pos = torch.randint(0, 1 << 22, tokens, generator=gen).to(dev)
    return x, w, b, qn, kn, pos


def _truth(x, w, b, qn, kn, pos, p, hq, hk, d, layout, unit_offset=False):
    """float64: F.linear, then the reference norm + rope of q's and k's heads; computed on
    the CPU (as the reference's angles are) and returned on x's device, differentiably
    (the gradient test differentiates it)."""
    dev = x.device
    x, w, pos = x.cpu().double(), w.cpu().double(), pos.cpu()
    y = F.linear(x, w, None if b is None else b.cpu().double())
    q, k, v = y.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))
    if qn is not None:
        q, k = qk_norm_rope_reference(q, k, pos, p, qn.cpu().double(), kn.cpu().double(), eps=1e-6,
                                      unit_offset=unit_offset, layout=layout, compute_dtype=torch.float64)
    else:
        q, k = rope_reference(q, k, pos, p, layout=layout, compute_dtype=torch.float64)
    return q.to(dev), k.to(dev), v.to(dev)


# (layout, dtype, tokens, hidden, hq, hk, head dim, rotary dim, bias, norm: 0 / 1 / 2 unit
# offset, descriptors, one accumulator): every layout with full and partial rotary (rot 24 of
# 32 pads both the pairs (12 -> 16) and the tail (8)), token counts off the tile (16) and
# [B, S] inputs, hidden off the K step (32), both load paths, both accumulator forms (one
# applies to full-rotary heads only), GQA and MHA; 2 or 4 heads per tile where the last field
# says so (one cos/sin for them; 3 does not divide 5 heads: one per tile)
FORWARD_CASES = [
    ("neox", torch.float32, (33,), 64, 4, 2, 32, 32, False, 0, True, False, 4),
    ("neox", torch.bfloat16, (7,), 48, 2, 1, 32, 24, True, 1, False, False),
    ("neox", torch.float16, (2, 5), 40, 2, 2, 16, 8, True, 2, True, False),
    ("neox", torch.float32, (9,), 32, 2, 1, 16, 16, True, 1, False, True),
    ("interleaved", torch.float32, (1,), 48, 2, 1, 32, 24, True, 2, True, False),
    ("interleaved", torch.bfloat16, (33,), 32, 2, 1, 16, 16, False, 0, False, False),
    ("interleaved", torch.float32, (2, 3), 40, 2, 1, 32, 32, False, 2, True, True, 2),
    ("deepseek", torch.float32, (2, 7), 40, 3, 1, 16, 16, False, 1, True, False, 3),
    ("deepseek", torch.bfloat16, (17,), 48, 2, 1, 32, 24, True, 0, True, False),
    ("deepseek", torch.bfloat16, (5,), 32, 2, 1, 16, 16, True, 0, True, True),
]


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_forward_matches_float64_composition(kdev, gen, case):
    layout, dtype, tokens, hidden, hq, hk, d, rot, bias, norm, desc, one_acc, *heads = case
    p = _params(rot)
    # the [B, S] cases also take x as a slice of wider rows (a row stride of hidden + 8)
    x, w, b, qn, kn, pos = _case(gen, dtype, tokens, hidden, hq, hk, d, bias, norm, kdev, 8 * (len(tokens) > 1))
    cfg = QkvConfig(16, 32, 1, 1, 2, use_desc=desc, num_progs=3, one_acc=one_acc, heads=(heads or [1])[0])
    q, k, v = qkv_rope(x, w, pos, p, num_heads=hq, num_kv_heads=hk, head_dim=d, layout=layout, bias=b,
                       q_norm=qn, k_norm=kn, norm_unit_offset=norm == 2, config=cfg)
    assert q.shape == (*tokens, hq, d) and k.shape == v.shape == (*tokens, hk, d)
    assert q.dtype == k.dtype == v.dtype == dtype
    rq, rk, rv = _truth(x, w, b, qn, kn, pos, p, hq, hk, d, layout, unit_offset=norm == 2)
    tol = OUT_TOL[dtype]
    assert rel_err(q, rq) < tol and rel_err(k, rk) < tol and rel_err(v, rv) < tol


@pytest.mark.parametrize("layout", ["deepseek"])
def test_every_output_written_and_plain_gemm(kdev, gen, layout):
    """Into NaN-filled buffers: the fused kernel writes every element (padded pair and tail
    parts, v's heads in their own order), and EPILOGUE 0 is the plain GEMM + bias."""
    hq, hk, d, rot, T = 2, 1, 32, 24, 19
    p = _params(rot)
    x, w, b, qn, kn, pos = _case(gen, torch.float32, (T,), 48, hq, hk, d, True, 1, kdev)
    for epilogue, heads in ((1, 2), (0, 1)):  # the fused one with two heads per tile
        out = torch.full((T, w.shape[0]), POISON, device=kdev)
        launch_qkv(x, w, b, out, pos, p.inv_freq_on(x.device), p.cos_sin_scale, n_q_heads=hq, n_k_heads=hk,
                   head_dim=d, rot=rot, layout=layout, q_norm=qn, k_norm=kn, norm_kind=1, epilogue=epilogue,
                   config=QkvConfig(16, 32, 1, 1, 2, num_progs=3, heads=heads))
        if epilogue:
            want = torch.cat([t.flatten(1) for t in _truth(x, w, b, qn, kn, pos, p, hq, hk, d, layout)], dim=1)
        else:
            want = F.linear(x.double(), w.double(), b.double())
        assert rel_err(out, want) < TOL[torch.float32]


# The backward runs in the inputs' dtype, as a bf16 model's does: the incoming gradients,
# the norm's backward and the matmuls each round to bf16 (2**-9 relative, a few times over);
# 24 draws of the bf16 case stayed below 5.3e-3, the bound is conftest's bf16 tolerance.
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: TOL[torch.bfloat16]}


@pytest.mark.parametrize("layout,norm,bias,dtype", [("neox", 2, True, torch.float32),
                                                    ("deepseek", 0, False, torch.float32),
                                                    ("interleaved", 1, True, torch.bfloat16)])
def test_gradients_match_float64_autograd(kdev, gen, layout, norm, bias, dtype):
    """dx, dW, db and the norm weights' gradients: the backward rotates q's and k's
    gradients back (and through the norm) and runs torch's matmuls."""
    hq, hk, d, rot, hidden, T = 2, 1, 16, 8 if norm else 16, 32, 7
    p = _params(rot)
    x, w, b, qn, kn, pos = _case(gen, dtype, (T,), hidden, hq, hk, d, bias, norm, kdev)
    if norm:  # weights of the model's dtype, as Qwen3's bf16 checkpoints hold them
        qn, kn = qn.to(dtype), kn.to(dtype)
    leaves = [t for t in (x, w, b, qn, kn) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    outs = qkv_rope(x, w, pos, p, num_heads=hq, num_kv_heads=hk, head_dim=d, layout=layout, bias=b, q_norm=qn,
                    k_norm=kn, norm_unit_offset=norm == 2)
    grads = [torch.randn(o.shape, generator=gen).to(kdev, dtype) for o in outs]
    got = torch.autograd.grad(outs, leaves, grads)

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(leaves64)
    x64, w64 = next(it), next(it)
    b64 = next(it) if bias else None
    qn64, kn64 = (next(it), next(it)) if norm else (None, None)
    want_out = _truth(x64, w64, b64, qn64, kn64, pos, p, hq, hk, d, layout, unit_offset=norm == 2)
    want = torch.autograd.grad(want_out, leaves64, [g.double() for g in grads])
    for leaf, g, wnt in zip(leaves, got, want):
        assert g.dtype == leaf.dtype and rel_err(g, wnt) < GRAD_TOL[dtype]


BAD = [
    # (what to change, exception, words the message must hold)
    (dict(params="nope"), TypeError, "params"),
    (dict(params=yt.RopeParams(torch.ones(8), 16, mrope_section=(4, 2, 2))), ValueError, "M-RoPE"),
    (dict(layout="gptj"), ValueError, "layout"),
    (dict(num_heads=0), ValueError, "num_heads"),
    (dict(num_kv_heads=1.5), ValueError, "num_kv_heads"),
    (dict(head_dim=15), ValueError, "head_dim must be even"),
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.randn(32, dtype=torch.float64)), TypeError, "x must be float32"),
    (dict(x=torch.randn(32)), ValueError, "x must have shape"),
    (dict(x=torch.randn(32, 3).t()), ValueError, "x's last dim"),
    (dict(w_qkv=torch.randn(64, 31)), ValueError, "w_qkv must be"),
    (dict(w_qkv=torch.randn(32, 64).t()), ValueError, "w_qkv's last dim must be contiguous"),
    (dict(w_qkv=torch.randn(64, 32, dtype=torch.bfloat16)), TypeError, "w_qkv's dtype"),
    (dict(positions=torch.zeros(3)), TypeError, "positions must be int32 or int64"),
    (dict(positions=torch.zeros(4, dtype=torch.long)), ValueError, "one position per token"),
    (dict(positions=[0, 1, 2]), TypeError, "positions must be a torch.Tensor"),
    (dict(bias=torch.zeros(63)), ValueError, "bias must be [64]"),
    (dict(q_norm=torch.ones(16)), ValueError, "given together"),
    (dict(q_norm=torch.ones(8), k_norm=torch.ones(8)), ValueError, "q_norm must be a contiguous [16]"),
    (dict(q_norm=torch.ones(16), k_norm=torch.ones(16, dtype=torch.int32)), TypeError, "k_norm must be float"),
    (dict(q_norm=torch.ones(16), k_norm=torch.ones(16, dtype=torch.bfloat16)), TypeError, "share a dtype"),
    (dict(q_norm=torch.ones(16), k_norm=torch.ones(16), norm_eps=0.0), ValueError, "norm_eps"),
    (dict(rotary_dim=8), ValueError, "rotary_dim=8 but params"),
    (dict(rotary_dim=7), ValueError, "rotary_dim must be a positive even"),
    (dict(params=yt.RopeParams.yarn(32, 1e4, 4.0, 64), rotary_dim=None), ValueError, "larger than head_dim"),
]


@pytest.mark.parametrize("change,exc,words", BAD, ids=[f"{i}-{b[2][:20]}" for i, b in enumerate(BAD)])
def test_bad_input_raises_before_anything_runs(change, exc, words):
    """Each check, on CPU tensors (the checks run before the kernel or the reference)."""
    args = dict(x=torch.randn(3, 32), w_qkv=torch.randn(64, 32), positions=torch.arange(3),
                params=_params(16), num_heads=2, num_kv_heads=1, head_dim=16, rotary_dim=None)
    args.update(change)
    x, w, pos, p = args.pop("x"), args.pop("w_qkv"), args.pop("positions"), args.pop("params")
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        qkv_rope(x, w, pos, p, **args)


def test_cpu_reference_path(gen, monkeypatch):
    """Plain CPU tensors (no interpreter) take F.linear then the float32 reference rope:
    right to float32 angles' accuracy (positions below 1000), with gradients."""
    monkeypatch.setattr(qkv_mod, "uses_kernel", lambda t: False)
    hq, hk, d = 2, 1, 16
    p = _params(d)
    x, w, b, qn, kn, _ = _case(gen, torch.float32, (2, 3), 32, hq, hk, d, True, 1)
    pos = torch.randint(0, 1000, (2, 3), generator=gen)
    x.requires_grad_(True)
    q, k, v = qkv_rope(x, w, pos, p, num_heads=hq, num_kv_heads=hk, head_dim=d, bias=b, q_norm=qn, k_norm=kn)
    rq, rk, rv = _truth(x.detach(), w, b, qn, kn, pos, p, hq, hk, d, "neox")
    assert rel_err(q, rq) < 1e-4 and rel_err(k, rk) < 1e-4 and rel_err(v, rv) < 1e-6
    (q.sum() + k.sum() + v.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


_COMPILE_SM90 = r"""
import sys
sys.path.insert(0, ROOT)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from yarn_triton.kernels.qkv_kernel import qkv_rope_kernel as fn

ptrs = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16", "pos_ptr": "*i64",
        "inv_freq_ptr": "*fp32", "qw_ptr": "*fp32", "kw_ptr": "*fp32"}
base = dict(D=128, HALF=64, HALF_PAD=64, TAIL=0, TAIL_PAD=0, D_PAD=128, PAIRS=False, OUT_PAIRS=False, EPILOGUE=1,
            NORM=0, HAS_BIAS=False, PRECISE=True, SINCOS=1, IEEE=False, BLOCK_M=128, BLOCK_K=64, GROUP_M=8,
            NUM_STAGES=3, USE_DESC=True, FLATTEN=False, WARP_SPECIALIZE=False, ONE_ACC=False, HEADS=1)
idx = {p.name: i for i, p in enumerate(fn.params)}
for over in ({}, dict(NORM=2, HAS_BIAS=True, PAIRS=True, HEADS=2)):
    c = {**base, **over}
    sig = {p.name: "constexpr" if p.name in c else ptrs.get(p.name, "fp32" if p.name in ("scale", "eps") else "i32")
           for p in fn.params}
    attrs = {(idx[n],): [["tt.divisibility", 16]] for n in ("x_ptr", "w_ptr", "out_ptr", "K", "sx", "sw", "so")}
    k = triton.compile(ASTSource(fn, sig, c, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 8, "num_stages": 3})
    ptx = k.asm["ptx"]
    print("wgmma" in ptx, "cp.async.bulk.tensor" in ptx)
"""


def test_compiles_for_hopper_with_wgmma_and_tma():
    """The kernel as the device compiles it (sm_90), here without a GPU, in a process of its
    own (under TRITON_INTERPRET=1 nothing compiles): the default shape and one with the norm,
    bias, adjacent pairs and two heads per tile, each with tensor-core MMAs (wgmma) and TMA
    loads. The interpreter tests check the arithmetic; this checks that it compiles."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SM90.replace("ROOT", repr(root))], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["True", "True", "True", "True"], out.stdout
