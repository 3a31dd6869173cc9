"""Accuracy of the kernel's angles at long context (issue 8).

Contract checked here: with ``precise_angles=True`` (the default) the cos and sin the kernel
applies agree with the float64 truth -- the same float32 ``inv_freq``, the integer position,
``cos``/``sin`` in float64 -- to 2e-6 absolute (times ``cos_sin_scale`` when that exceeds 1)
at every position with ``|position| <= 2**31``.

The kernel's cos/sin are read back directly: a float32 "probe" q has ``x1 = 1, x2 = 0`` in
every rotation pair of head 0 (so the pair comes out as ``(scale*cos, scale*sin)`` exactly:
multiplying by 1 and 0 adds no rounding) and ``x1 = 0, x2 = 1`` in head 1 (``(-sin, cos)``).

The same harness applied to ``precise_angles=False`` (float32 ``position * inv_freq``, the
materialised-cache way) must miss the bound by orders of magnitude from 1M positions on:
this is what makes a regression of the precise path to float32 angles fail these tests.
"""

import math

import pytest
import torch

from conftest import TOL, rel_err
from yarn_triton import RopeParams, apply_rope_
from yarn_triton import op
from yarn_triton.kernels import launcher
from yarn_triton.kernels.configs import LaunchConfig
from yarn_triton.kernels.rope_kernel import INTERPRETED
from yarn_triton.reference import cos_sin_cache, rope_reference

BOUND = 2e-6  # absolute, on cos and sin (scaled by max(1, cos_sin_scale))
I32_MAX = 2**31 - 1
I32_MIN = -(2**31)

PARAMS = {
    "default-d128": lambda: RopeParams.default(128),
    "default-d64-theta5e5": lambda: RopeParams.default(64, base=500000.0),
    "default-d96": lambda: RopeParams.default(96),  # 48 frequencies: not a power of two
    "yarn-d64-deepseek": lambda: RopeParams.yarn(
        64, base=10000.0, scaling_factor=40.0, original_max_position_embeddings=4096,
        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
    ),
    "yarn-d128-mscale": lambda: RopeParams.yarn(  # cos_sin_scale = 1 + 0.1 ln 16 ~ 1.28
        128, base=1000000.0, scaling_factor=16.0, original_max_position_embeddings=8192,
        mscale=1.0, mscale_all_dim=0.0,
    ),
    "yarn-d48": lambda: RopeParams.yarn(48, scaling_factor=4.0, original_max_position_embeddings=2048),
}

# Big programs under the interpreter, whose cost is per program (the result does not depend
# on the launch shape: each token's angles are computed independently). On a GPU such a
# tile would spill for minutes: there the default launch shape is used.
_CFG = LaunchConfig(block_t=512, block_h=2, num_warps=4) if INTERPRETED else None


def _positions(gen: torch.Generator, n_random: int = 1500) -> torch.Tensor:
    """Int64 positions covering [-2**31, 2**31 - 1]: the extremes, neighbourhoods of 2**24
    (where float32 stops representing every integer) and of 2**31 - 1, every power of two,
    log-uniform and uniform random samples, and the negatives of all of them."""
    fixed = [0, 1, 2, 3, 4095, 4096, 32768, 131072, 1 << 20, 1_000_000, 16_777_216, 1 << 30]
    fixed += [(1 << k) + d for k in range(1, 31) for d in (-1, 0, 1)]
    fixed += [(1 << 24) + d for d in range(-40, 41)]
    fixed += [I32_MAX - d for d in range(64)]
    logu = torch.exp(torch.rand(n_random // 2, generator=gen, dtype=torch.float64) * math.log(I32_MAX))
    unif = torch.randint(0, I32_MAX, (n_random - n_random // 2,), generator=gen, dtype=torch.int64)
    pos = torch.cat((torch.tensor(fixed, dtype=torch.int64), logu.floor().long(), unif))
    pos = pos.clamp(0, I32_MAX)
    pos = torch.cat((pos, -pos, torch.tensor([I32_MIN, I32_MIN + 1], dtype=torch.int64)))
    return torch.unique(pos)


def _probe(n: int, rope_dim: int, layout: str, device) -> torch.Tensor:
    """float32 q ``[n, 2, rope_dim]``: head 0 has pairs (1, 0), head 1 pairs (0, 1)."""
    half = rope_dim // 2
    q = torch.zeros(n, 2, rope_dim, dtype=torch.float32, device=device)
    if layout == "interleaved" or layout == "deepseek":  # pairs are adjacent channels on input
        q[:, 0, 0::2] = 1.0
        q[:, 1, 1::2] = 1.0
    else:
        q[:, 0, :half] = 1.0
        q[:, 1, half:] = 1.0
    return q


def kernel_cos_sin(q_out: torch.Tensor, layout: str):
    """Read ``(cos, sin)`` ``[n, half]`` (both scaled) back out of the rotated probe, twice:
    from head 0 (x1=1, x2=0 -> (cos, sin)) and head 1 (x1=0, x2=1 -> (-sin, cos))."""
    if layout == "interleaved":
        y1, y2 = q_out[..., 0::2], q_out[..., 1::2]
    else:  # neox, and deepseek (whose output is split in halves)
        y1, y2 = q_out.chunk(2, dim=-1)
    return (y1[:, 0], y2[:, 0]), (y2[:, 1], -y1[:, 1])


def run_probe(params: RopeParams, positions: torch.Tensor, device, layout="neox", precise=True):
    q = _probe(positions.numel(), params.rope_dim, layout, device)
    apply_rope_(q, None, positions.to(device), params, layout=layout, precise_angles=precise, config=_CFG)
    return kernel_cos_sin(q.double().cpu(), layout)


def truth_cos_sin(params: RopeParams, positions: torch.Tensor):
    """float64 ``(scale*cos, scale*sin)`` ``[n, half]`` for the same float32 inv_freq."""
    half = params.rope_dim // 2
    c, s = cos_sin_cache(params, positions.cpu().long(), torch.float64)
    return c[:, :half], s[:, :half]


def max_err(params, positions, got):
    c_ref, s_ref = truth_cos_sin(params, positions)
    out = []
    for c, s in got:
        out.append(max((c - c_ref).abs().max().item(), (s - s_ref).abs().max().item()))
    return max(out)


# --------------------------------------------------------------------------------------
# The bound
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PARAMS))
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64])
def test_precise_cos_sin_within_bound_at_every_int32_position(kdev, gen, name, pos_dtype):
    params = PARAMS[name]()
    pos = _positions(gen)
    got = run_probe(params, pos.to(pos_dtype), kdev)
    bound = BOUND * max(1.0, params.cos_sin_scale)
    c_ref, s_ref = truth_cos_sin(params, pos)
    for c, s in got:
        err_c = (c - c_ref).abs()
        err_s = (s - s_ref).abs()
        worst = torch.maximum(err_c, err_s).amax(dim=1)
        i = int(worst.argmax())
        assert worst[i] <= bound, (
            f"{name}: |cos/sin error| {worst[i].item():.3g} > {bound:.3g} at position {pos[i].item()}"
        )


@pytest.mark.parametrize("layout", ["interleaved", "deepseek"])
def test_precise_bound_holds_for_every_layout(kdev, gen, layout):
    params = PARAMS["yarn-d64-deepseek"]()
    pos = _positions(gen, n_random=400)
    err = max_err(params, pos, run_probe(params, pos, kdev, layout=layout))
    assert err <= BOUND, f"{layout}: max |cos/sin error| {err:.3g}"


def test_positions_broadcast_over_batch_keep_the_bound(kdev, gen):
    """[B, S] tokens with positions [S] (stride-0 batch) at the top of the int32 range."""
    params = PARAMS["default-d128"]()
    S = 64
    pos = torch.arange(I32_MAX - S + 1, I32_MAX + 1, dtype=torch.int64)
    q = _probe(2 * S, params.rope_dim, "neox", kdev).view(2, S, 2, params.rope_dim)
    apply_rope_(q, None, pos.to(kdev).to(torch.int32), params)
    c_ref, s_ref = truth_cos_sin(params, pos)
    for b in range(2):
        for c, s in kernel_cos_sin(q[b].double().cpu(), "neox"):
            assert (c - c_ref).abs().max() <= BOUND and (s - s_ref).abs().max() <= BOUND


@pytest.mark.parametrize("name,layout", [("default-d128", "neox"), ("yarn-d128-mscale", "interleaved"),
                                         ("yarn-d64-deepseek", "deepseek")])
@pytest.mark.parametrize("precise", [True, False])
def test_special_function_unit_path_keeps_the_bound(kdev, gen, monkeypatch, name, layout, precise):
    """The cos/sin that 16-bit outputs get (reduction by 2 pi, then ``cos.approx`` /
    ``sin.approx``; the interpreter's stand-in under TRITON_INTERPRET), forced onto the
    float32 probe so that errors far below a bf16 step are visible: the same bound as the
    polynomials', at every int32 position. With float32 angles (``precise=False``) the
    truth is the float32-angle cache's, as for that path's own test below."""
    monkeypatch.setattr(launcher, "_sincos", lambda *dtypes: 2 if INTERPRETED else 1)
    monkeypatch.setattr(op.plans, "_PLANS", type(op.plans._PLANS)())  # no plan built with the polynomials
    params = PARAMS[name]()
    pos = _positions(gen, n_random=400)
    got = run_probe(params, pos, kdev, layout=layout, precise=precise)
    switches = {plan.launch.switches["SINCOS"] for plan in op.plans._PLANS.values()}
    assert switches == {2 if INTERPRETED else 1}, switches  # the forced path is what ran
    if precise:
        err = max_err(params, pos, got)
    else:  # the same float32 angles, cos/sin of them in float32 by torch
        c_ref, s_ref = cos_sin_cache(params, pos, torch.float32)
        half = params.rope_dim // 2
        c_ref, s_ref = c_ref[:, :half].double(), s_ref[:, :half].double()
        err = max(max((c - c_ref).abs().max().item(), (s - s_ref).abs().max().item()) for c, s in got)
    bound = BOUND * max(1.0, params.cos_sin_scale)
    assert err <= bound, f"{name} {layout} precise={precise}: max |cos/sin error| {err:.3g} > {bound:.3g}"


# --------------------------------------------------------------------------------------
# The harness can fail: float32 angles miss the bound by orders of magnitude at 1M+
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["default-d128", "yarn-d64-deepseek"])
def test_fp32_angles_are_much_worse_from_1M_on(kdev, gen, name):
    params = PARAMS[name]()
    for lo in (1 << 20, 1 << 24, 1 << 28):
        pos = torch.randint(lo, 2 * lo, (256,), generator=gen, dtype=torch.int64)
        pos = torch.cat((pos, -pos))
        precise = max_err(params, pos, run_probe(params, pos, kdev, precise=True))
        fp32 = max_err(params, pos, run_probe(params, pos, kdev, precise=False))
        assert precise <= BOUND
        # float32 position*inv_freq: the angle (up to |p| rad) is rounded to 2**-24 relative,
        # i.e. ~0.03 rad at 1M and O(1) at 256M.
        assert fp32 > 1e-3, f"{name} at [{lo}, {2 * lo}): fp32 angles error only {fp32:.3g}?"
        assert fp32 > 500 * precise


def test_fp32_angle_path_reproduces_the_materialised_fp32_cache(kdev, gen):
    """``precise_angles=False`` is the transformers-style float32 cache, bit for bit in the
    angle (only the float32 cos/sin implementation may differ by an ulp or two)."""
    params = PARAMS["yarn-d128-mscale"]()
    pos = _positions(gen, n_random=600)
    (c, s), _ = run_probe(params, pos, kdev, precise=False)
    c32, s32 = cos_sin_cache(params, pos, torch.float32)
    half = params.rope_dim // 2
    assert (c - c32[:, :half].double()).abs().max() <= 4e-7
    assert (s - s32[:, :half].double()).abs().max() <= 4e-7


def test_precise_equals_fp32_angles_where_fp32_is_exact(kdev):
    """At small positions the float32 product is exact for the first frequency (1.0):
    both paths must agree to float32 rounding there."""
    params = PARAMS["default-d128"]()
    pos = torch.arange(-512, 512, dtype=torch.int64)
    a = run_probe(params, pos, kdev, precise=True)
    b = run_probe(params, pos, kdev, precise=False)
    assert (a[0][0][:, 0] - b[0][0][:, 0]).abs().max() <= 2.5e-7


# --------------------------------------------------------------------------------------
# Rotated q (not just the probe), fp32, at the extremes
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["neox", "interleaved", "deepseek"])
def test_rotated_q_relative_error_at_extreme_positions(kdev, gen, layout):
    params = PARAMS["yarn-d64-deepseek"]()
    pos = torch.tensor([I32_MIN, I32_MIN + 1, -(1 << 24) - 1, -1, 0, 1, (1 << 24) + 1,
                        1_000_003, I32_MAX - 1, I32_MAX], dtype=torch.int64)
    q = torch.randn(pos.numel(), 4, 64, generator=gen)
    k = torch.randn(pos.numel(), 1, 64, generator=gen)
    q_ref, k_ref = rope_reference(q.double(), k.double(), pos, params, layout=layout,
                                  compute_dtype=torch.float64)
    qd, kd = q.to(kdev), k.to(kdev)
    apply_rope_(qd, kd, pos.to(kdev), params, layout=layout)
    assert rel_err(qd, q_ref) <= TOL[torch.float32]
    assert rel_err(kd, k_ref) <= TOL[torch.float32]
    # element-wise: error below 2e-6 times the norm of the element's rotation pair
    for out, ref in ((qd.double().cpu(), q_ref), (kd.double().cpu(), k_ref)):
        if layout == "interleaved":
            pn = ref.view(*ref.shape[:-1], -1, 2).norm(dim=-1).repeat_interleave(2, dim=-1)
        else:
            a, b = ref.chunk(2, dim=-1)
            pn = torch.cat([torch.sqrt(a * a + b * b)] * 2, dim=-1)
        assert ((out - ref).abs() <= 2e-6 * pn + 1e-30).all()


# --------------------------------------------------------------------------------------
# The float64 reference is the truth: check it (and the kernel) against exact arithmetic
# --------------------------------------------------------------------------------------
def test_float64_reference_and_kernel_against_exact_arithmetic(kdev):
    mpmath = pytest.importorskip("mpmath")
    params = PARAMS["default-d128"]()
    pos = torch.tensor([I32_MAX, I32_MIN, (1 << 24) + 1, 1_999_999_999, -123_456_789, 7], dtype=torch.int64)
    c_ref, s_ref = truth_cos_sin(params, pos)
    (c_k, s_k), _ = run_probe(params, pos, kdev)
    inv = params.inv_freq.double().tolist()
    with mpmath.workdps(60):
        for i, p in enumerate(pos.tolist()):
            for j in range(0, len(inv), 7):
                a = mpmath.mpf(p) * mpmath.mpf(inv[j])  # exact: 31 + 24 bits < 60 digits
                c, s = float(mpmath.cos(a)), float(mpmath.sin(a))
                # float64 rounding of p * inv_freq (<= |a| * 2**-53) is all the reference errs by
                slack = abs(float(a)) * 2.0**-53 + 1e-15
                assert abs(c_ref[i, j].item() - c) <= slack and abs(s_ref[i, j].item() - s) <= slack
                assert abs(c_k[i, j].item() - c) <= BOUND and abs(s_k[i, j].item() - s) <= BOUND


# --------------------------------------------------------------------------------------
# Positions derived in the kernel (offset + index in the sequence): same bound
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset_kind", ["tensor", "int"])
def test_derived_positions_keep_the_bound(kdev, offset_kind):
    params = PARAMS["yarn-d128-mscale"]()
    S = 64
    starts = [I32_MAX - S + 1, I32_MIN, (1 << 24) - S // 2] if offset_kind == "tensor" else [I32_MAX - S + 1]
    B = len(starts)
    q = _probe(B * S, params.rope_dim, "neox", kdev).view(B, S, 2, params.rope_dim)
    offsets = torch.tensor(starts, dtype=torch.int64, device=kdev) if offset_kind == "tensor" else starts[0]
    apply_rope_(q, None, None, params, offsets=offsets)
    pos = (torch.tensor(starts, dtype=torch.int64)[:, None] + torch.arange(S)).reshape(-1)
    c_ref, s_ref = truth_cos_sin(params, pos)
    bound = BOUND * max(1.0, params.cos_sin_scale)
    for c, s in kernel_cos_sin(q.reshape(B * S, 2, -1).double().cpu(), "neox"):
        assert (c - c_ref).abs().max() <= bound and (s - s_ref).abs().max() <= bound
