"""Core: host YaRN math vs independent evaluations, and the kernel vs the reference."""

import itertools
import math

import numpy as np
import pytest
import torch

import yarn_triton as yt
from yarn_triton.reference import rope_reference

from conftest import KERNEL_DEVICE, TOL, one_per_path, rel_err, requires_cuda

# ------------------------------------------------------------------------------------
# Host math
# ------------------------------------------------------------------------------------
YARN_CASES = [
    # dim, base, s, orig, beta_fast, beta_slow, mscale, mscale_all_dim
    (64, 10000, 40, 4096, 32, 1, 0.707, 0.707),  # DeepSeek-V2-Lite
    (64, 10000, 40, 4096, 32, 1, 1.0, 1.0),  # DeepSeek-V3
    (128, 1e6, 4, 32768, 32, 1, 1.0, 0),  # Qwen-style
    (128, 50000, 32, 4096, 1, 1, 1.0, 0),  # Kimi-K2-like, beta_fast == beta_slow
    (64, 10000, 1.0, 4096, 32, 1, 1.0, 0),  # no scaling
    (96, 10000, 8, 2048, 32, 1, 1.0, 0.5),
]


def _yarn_float64(dim, base, s, orig, beta_fast, beta_slow, mscale, mscale_all_dim):
    """The seed's formulas evaluated independently in float64 numpy."""

    def corr_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    i = np.arange(0, dim, 2, dtype=np.float64)
    extra = 1.0 / base ** (i / dim)
    inter = extra / s
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1.0 - ramp
    inv = inter * (1 - keep) + extra * keep

    def ms(scale, m):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    return inv, ms(s, mscale) / ms(s, mscale_all_dim), ms(s, mscale_all_dim) ** 2


@pytest.mark.parametrize("case", YARN_CASES, ids=lambda c: f"d{c[0]}-s{c[2]}-b{c[4]}/{c[5]}")
def test_yarn_params_match_float64_formulas(case):
    p = yt.RopeParams.yarn(*case)
    inv64, cs, sm = _yarn_float64(*case)
    assert p.inv_freq.dtype == torch.float32 and p.inv_freq.shape == (case[0] // 2,)
    assert np.abs(p.inv_freq.double().numpy() - inv64).max() / np.abs(inv64).max() < 1e-6
    assert np.all(np.abs(p.inv_freq.double().numpy() - inv64) / inv64 < 1e-6)
    assert p.cos_sin_scale == pytest.approx(cs, rel=1e-12)
    assert p.softmax_scale_factor == pytest.approx(sm, rel=1e-12)


def test_yarn_blends_between_interpolation_and_extrapolation():
    """High-frequency pairs keep base frequencies, low ones are divided by the factor."""
    p = yt.RopeParams.yarn(64, 10000, 40, 4096)
    base = yt.RopeParams.default(64, 10000).inv_freq
    assert torch.equal(p.inv_freq[:4], base[:4])
    torch.testing.assert_close(p.inv_freq[-4:], base[-4:] / 40, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", [c for c in YARN_CASES if c[2] > 1], ids=str)
def test_yarn_params_match_transformers(case):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim, base, s, orig, bf, bs, m, mad = case
    rp = {"rope_type": "yarn", "rope_theta": base, "factor": s, "original_max_position_embeddings": orig,
          "beta_fast": bf, "beta_slow": bs, "mscale": m, "mscale_all_dim": mad}
    cfg = transformers.PretrainedConfig(
        hidden_size=dim * 4, num_attention_heads=4, head_dim=dim,
        max_position_embeddings=int(orig * s), rope_parameters=rp,
    )
    inv_hf, attn_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    p = yt.RopeParams.yarn(*case)
    torch.testing.assert_close(p.inv_freq, inv_hf.float(), rtol=1e-6, atol=0)
    # transformers only applies the mscale ratio when both are non-zero; otherwise get_mscale(s),
    # which is the seed's value whenever mscale == 1.
    if (m and mad) or m == 1:
        assert p.cos_sin_scale == pytest.approx(attn_factor, rel=1e-9)


def test_default_params():
    p = yt.RopeParams.default(128, 500000.0)
    want = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    assert np.allclose(p.inv_freq.double().numpy(), want, rtol=1e-6, atol=0)
    assert p.cos_sin_scale == 1.0 and p.softmax_scale_factor == 1.0


def test_params_are_immutable_and_own_their_inv_freq():
    src = torch.rand(8) + 0.1
    p = yt.RopeParams(src, 16)
    src.fill_(7)
    assert not torch.equal(p.inv_freq, src)
    with pytest.raises(Exception):
        p.rope_dim = 32


@pytest.mark.parametrize("bad", [dict(dim=63), dict(dim=0), dict(scaling_factor=0.0), dict(base=-1.0),
                                 dict(beta_fast=float("nan"))])
def test_yarn_rejects_bad_arguments(bad):
    args = dict(dim=64)
    args.update(bad)
    name = next(iter(bad))
    with pytest.raises((ValueError, TypeError), match=name):
        yt.RopeParams.yarn(**args)


@requires_cuda
def test_inv_freq_copied_to_device_once():
    p = yt.RopeParams.yarn(64, 10000, 40)
    a = p.inv_freq_on("cuda")
    assert a is p.inv_freq_on(torch.device("cuda", torch.cuda.current_device()))
    assert a.is_cuda and a.dtype == torch.float32


# ------------------------------------------------------------------------------------
# Kernel vs reference
# ------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["neox", "interleaved", "deepseek"]
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1), "mla": (6, 1)}
VIEWS = ["contiguous", "fused_qkv", "bhsd_transposed"]
SCALES = [1.0, 4.0, 40.0]


def _make_qk(view, B, S, hq, hk, dq, dk, dtype, device, gen):
    """q ``[B, S, hq, dq]`` and k ``[B, S, hk, dk]`` as the given kind of view, plus the
    parent buffers (whose other elements are poisoned with NaN) to check nothing else is
    written."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    if view == "contiguous":
        q, k = randn(B, S, hq, dq), randn(B, S, hk, dk)
        return q, k, []
    if view == "fused_qkv":
        # One projection output [B, S, (hq + 2*hk), d] with q, k, v heads side by side;
        # the v heads (and any padding of the head dim) are poison.
        d = max(dq, dk) + 2
        buf = randn(B, S, hq + 2 * hk, d)
        buf[..., hq + hk:, :] = float("nan")
        buf[..., :hq, dq:] = float("nan")
        buf[..., hq:hq + hk, dk:] = float("nan")
        return buf[..., :hq, :dq], buf[..., hq:hq + hk, :dk], [buf]
    if view == "bhsd_transposed":
        qb, kb = randn(B, hq, S, dq), randn(B, hk, S, dk)
        return qb.transpose(1, 2), kb.transpose(1, 2), []
    raise AssertionError(view)


def _check_against_reference(q0, k0, q, k, pos, params, layout, rot, dtype):
    rq, rk = rope_reference(q0.cpu(), k0.cpu(), pos.cpu(), params, layout=layout,
                            compute_dtype=torch.float64)
    for name, out, ref, orig in (("q", q, rq, q0), ("k", k, rk, k0)):
        out = out.cpu()
        assert not torch.isnan(out).any(), f"{name} has NaN (unwritten or poisoned)"
        err = rel_err(out[..., :rot], ref[..., :rot])
        assert err < TOL[dtype], f"{name} rel err {err:.3g} >= {TOL[dtype]}"
        # every element: no single entry far off relative to the tensor's scale
        worst = (out[..., :rot].double() - ref[..., :rot]).abs().max().item()
        assert worst <= 8 * TOL[dtype] * ref[..., :rot].abs().max().item() + 1e-30, f"{name} worst {worst}"
        # channels past the rotary dim are bit-identical
        assert torch.equal(out[..., rot:].cpu(), orig[..., rot:].cpu()), f"{name} pass-through changed"


# Every combination on a GPU. Through the interpreter, one per kernel path: dtype, layout,
# partial and head counts select code, and so does a transposed [B, H, S, D] view (its
# batch and sequence do not fold into one row of tokens: the ROWS switch); the other views
# and the YaRN scales (host math) are taken in turn.
KERNEL_CASES = one_per_path(
    itertools.product(DTYPES, LAYOUTS, ["full", "partial"], HEADS, VIEWS, SCALES),
    path=lambda c: (*c[:4], c[4] == "bhsd_transposed"))


@pytest.mark.parametrize("dtype, layout, partial, heads, view, scale", KERNEL_CASES)
def test_kernel_matches_reference(dtype, layout, partial, heads, view, scale, kdev, gen):
    hq, hk = HEADS[heads]
    rot = 32 if heads != "mla" else 16
    dq = dk = rot + (16 if partial == "partial" else 0)
    if heads == "mla":  # MLA: q's head dim holds the rope part; single shared k_pe head
        dk = rot
    params = yt.RopeParams.yarn(rot, 10000.0, scale, 64, mscale=0.707, mscale_all_dim=0.5)
    B, S = 2, 7
    q, k, parents = _make_qk(view, B, S, hq, hk, dq, dk, dtype, kdev, gen)
    q0, k0 = q.clone(), k.clone()
    pos = torch.randint(0, int(64 * scale * 2), (B, S), generator=gen).to(kdev)
    out_q, out_k = yt.apply_rope_(q, k, pos, params, layout=layout)
    assert out_q is q and out_k is k
    _check_against_reference(q0, k0, q, k, pos, params, layout, rot, dtype)
    for buf in parents:  # poison around the views survived untouched
        assert torch.isnan(buf[..., hq + hk:, :]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_angle_mode_matches_float32_cache(layout, kdev, gen):
    """precise_angles=False rounds position*inv_freq to fp32 exactly like the materialised
    cache, so it tracks the float32 reference far more closely than the float64 truth."""
    params = yt.RopeParams.yarn(64, 10000.0, 4.0, 4096)
    q = torch.randn(3, 9, 4, 64, generator=gen).to(kdev)
    k = torch.randn(3, 9, 2, 64, generator=gen).to(kdev)
    pos = torch.randint(100_000, 200_000, (3, 9), generator=gen).to(kdev)
    r32 = rope_reference(q.cpu(), k.cpu(), pos.cpu(), params, layout=layout)
    r64 = rope_reference(q.cpu(), k.cpu(), pos.cpu(), params, layout=layout, compute_dtype=torch.float64)
    yt.apply_rope_(q, k, pos, params, layout=layout, precise_angles=False)
    assert rel_err(q, r32[0]) < 3e-6 and rel_err(k, r32[1]) < 3e-6
    # at these positions the fp32 angle itself is off by ~1e-2 rad: the truth is far away
    assert rel_err(r32[0], r64[0]) > 1e-4


@pytest.mark.parametrize("pos_shape", ["full", "seq_only", "scalar_per_batch"])
def test_positions_broadcast(pos_shape, kdev, gen):
    params = yt.RopeParams.yarn(32, 10000.0, 8.0, 512)
    B, S = 3, 5
    q = torch.randn(B, S, 4, 32, generator=gen).to(kdev)
    k = torch.randn(B, S, 2, 32, generator=gen).to(kdev)
    pos = {"full": torch.randint(0, 9999, (B, S), generator=gen),
           "seq_only": torch.randint(0, 9999, (S,), generator=gen),
           "scalar_per_batch": torch.randint(0, 9999, (B, 1), generator=gen)}[pos_shape].to(kdev)
    pos = pos.to(torch.int32)
    full_pos = pos.expand(B, S).to(torch.int64)
    q0, k0 = q.clone(), k.clone()
    yt.apply_rope_(q, k, pos, params)
    rq, rk = rope_reference(q0.cpu(), k0.cpu(), full_pos.cpu(), params, compute_dtype=torch.float64)
    assert rel_err(q, rq) < TOL[torch.float32] and rel_err(k, rk) < TOL[torch.float32]


@pytest.mark.parametrize("token_shape", [(11,), (2, 3, 4), (1, 1, 6)], ids=str)
def test_token_dims_of_any_rank(token_shape, kdev, gen):
    params = yt.RopeParams.default(16)
    q = torch.randn(*token_shape, 3, 16, generator=gen).to(kdev)
    # k as a non-foldable view: every token dim strided differently
    kbig = torch.randn(*[n + 1 for n in token_shape], 2, 16, generator=gen).to(kdev)
    k = kbig[tuple(slice(0, n) for n in token_shape)]
    pos = torch.randint(0, 5000, token_shape, generator=gen).to(kdev)
    q0, k0 = q.clone(), k.clone()
    yt.apply_rope_(q, k, pos, params, layout="interleaved")
    rq, rk = rope_reference(q0.cpu(), k0.cpu(), pos.cpu(), params, layout="interleaved",
                            compute_dtype=torch.float64)
    assert rel_err(q, rq) < TOL[torch.float32] and rel_err(k, rk) < TOL[torch.float32]


def test_q_only(kdev, gen):
    params = yt.RopeParams.default(32)
    q = torch.randn(2, 4, 3, 32, generator=gen).to(kdev)
    pos = torch.randint(0, 100, (2, 4), generator=gen).to(kdev)
    q0 = q.clone()
    out = yt.apply_rope_(q, None, pos, params)
    assert out[1] is None
    assert rel_err(q, rope_reference(q0.cpu(), None, pos.cpu(), params, compute_dtype=torch.float64)[0]) < 2e-6


def test_rotation_preserves_pair_norms_and_relative_positions(kdev, gen):
    """Properties independent of the reference: each rotated pair keeps its norm (times the
    cos/sin scale), and q.k depends on positions only through their difference."""
    params = yt.RopeParams.yarn(64, 10000.0, 16.0, 1024, mscale=1.0, mscale_all_dim=0.0)
    g = params.cos_sin_scale
    q = torch.randn(1, 1, 1, 64, generator=gen, dtype=torch.float64).float().to(kdev)
    k = torch.randn(1, 1, 1, 64, generator=gen, dtype=torch.float64).float().to(kdev)
    dots = []
    for shift in (0, 1000, 123457):
        qq, kk = q.clone(), k.clone()
        yt.apply_rope_(qq, kk, torch.tensor([[30 + shift]], device=kdev), params)
        # k at a different position: rotate it separately with its own position
        kk = k.clone()
        yt.apply_rope_(kk, None, torch.tensor([[7 + shift]], device=kdev), params)
        dots.append((qq * kk).sum().item())
        n_in = q[..., :32] ** 2 + q[..., 32:] ** 2
        n_out = qq[..., :32] ** 2 + qq[..., 32:] ** 2
        torch.testing.assert_close(n_out, n_in * g * g, rtol=1e-5, atol=1e-6)
    # bounded by the size of the terms of q.k, not by q.k itself, which can be near zero
    # (then any rounding is large relative to it)
    assert max(dots) - min(dots) < 1e-5 * (q.norm() * k.norm()).item() * g * g


def test_empty_inputs_are_noops(kdev):
    params = yt.RopeParams.default(16)
    q = torch.empty(0, 4, 16, device=kdev)
    k = torch.empty(0, 2, 16, device=kdev)
    yt.apply_rope_(q, k, torch.empty(0, dtype=torch.int64, device=kdev), params)
    q = torch.randn(3, 0, 16, device=kdev)
    yt.apply_rope_(q, None, torch.zeros(3, dtype=torch.int64, device=kdev), params)


def test_module_forward(kdev, gen):
    m = yt.YarnRotaryEmbedding(64, max_position_embeddings=1024, scaling_factor=8.0,
                               original_max_position_embeddings=128, mscale=0.707, mscale_all_dim=0.707,
                               layout="deepseek").to(kdev)
    assert m.inv_freq.device.type == torch.device(kdev).type
    assert m.softmax_scale_factor == pytest.approx((0.1 * 0.707 * math.log(8.0) + 1) ** 2)
    q = torch.randn(2, 5, 4, 64, generator=gen).to(kdev)
    k = torch.randn(2, 5, 1, 64, generator=gen).to(kdev)
    pos = torch.randint(0, 50_000, (2, 5), generator=gen).to(kdev)  # past max_position_embeddings
    q0, k0 = q.clone(), k.clone()
    m(q, k, pos)
    rq, rk = rope_reference(q0.cpu(), k0.cpu(), pos.cpu(), m.params, layout="deepseek",
                            compute_dtype=torch.float64)
    assert rel_err(q, rq) < 2e-6 and rel_err(k, rk) < 2e-6


def test_cpu_tensors_take_reference_or_interpreter(gen):
    """CPU tensors always work; the result matches the float32 reference either way."""
    params = yt.RopeParams.yarn(32, 10000.0, 4.0, 256)
    q = torch.randn(2, 3, 2, 32, generator=gen)
    k = torch.randn(2, 3, 2, 32, generator=gen)
    pos = torch.randint(0, 1000, (2, 3), generator=gen)
    rq, rk = rope_reference(q, k, pos, params, compute_dtype=torch.float64)
    yt.apply_rope_(q, k, pos, params)
    assert rel_err(q, rq) < 1e-5 and rel_err(k, rk) < 1e-5


@requires_cuda
def test_no_cache_memory_grows_with_positions(gen):
    """Nothing is allocated per call: no cos/sin cache, whatever the positions."""
    params = yt.RopeParams.yarn(128, 10000.0, 40.0, 4096)
    q = torch.randn(1, 4096, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16)
    for hi in (4096, 1 << 20, 1 << 30):
        pos = torch.randint(0, hi, (1, 4096), device="cuda")
        yt.apply_rope_(q, k, pos, params)  # warm (compile, inv_freq copy)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yt.apply_rope_(q, k, pos, params)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before == 0



# (block_t, block_h, head_groups) for 12 q / 3 k heads: one step covers every group of
# both operands; of k only (q loops over 3 steps of 2); of neither (q 6 steps, k 2 of 1).
ONE_STEP_CASES = {"both": ((2, 4, 3), True, True), "k only": ((4, 2, 2), False, True),
                  "neither": ((1, 1, 2), False, False)}


@pytest.mark.parametrize("case", list(ONE_STEP_CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_step_and_head_loop_agree(case, layout, kdev, gen):
    """The kernel's ONE_STEP switch (no head loop, no prefetch of a next step) and its
    head loop both give the reference's result: in place; out of place with pass-through
    channels (partial rotary, the tail copied by the same steps); with the fused norm."""
    from yarn_triton.kernels import configs
    from yarn_triton.kernels.launcher import Operand, launch_rope
    from yarn_triton.kernels.rope_kernel import rope_kernel
    from yarn_triton.op import layout_switches
    from yarn_triton.reference import qk_norm_rope_reference

    (bt, bh, g), q_one, k_one = ONE_STEP_CASES[case]
    cfg = configs.LaunchConfig(bt, bh, 1, 1, g)
    heads = [0] * len(rope_kernel.arg_names)
    heads[configs._NQ], heads[configs._NK] = 12, 3
    meta = configs._meta(cfg, heads)
    assert (meta["Q_ONE_STEP"], meta["K_ONE_STEP"]) == (q_one, k_one)

    p = yt.RopeParams.yarn(32, 10000.0, 8.0, 2048, mscale=0.9, mscale_all_dim=0.7)
    q = torch.randn(2, 5, 12, 48, generator=gen).to(kdev)
    k = torch.randn(2, 5, 3, 48, generator=gen).to(kdev)
    pos = torch.randint(0, 1 << 20, (2, 5), generator=gen).to(kdev)
    rq, rk_ = rope_reference(q.cpu(), k.cpu(), pos.cpu(), p, layout=layout, compute_dtype=torch.float64)

    qi, ki = q.clone(), k.clone()
    yt.apply_rope_(qi, ki, pos, p, layout=layout, config=cfg)
    assert rel_err(qi, rq) < TOL[torch.float32] and rel_err(ki, rk_) < TOL[torch.float32]

    oq, ok = torch.full_like(q, float("nan")), torch.full_like(k, float("nan"))  # poisoned outputs
    in_pairs, out_pairs = layout_switches(layout)
    launch_rope(Operand(q, q.stride(), oq, oq.stride()), Operand(k, k.stride(), ok, ok.stride()),
                p.inv_freq_on(kdev), p.cos_sin_scale, n_tokens=10, seq_len=5, half=16, in_pairs=in_pairs,
                out_pairs=out_pairs, inverse=False, precise=True, per_token_positions=pos,
                pos_strides=pos.stride(), offsets=None, offsets_stride=0, pos_base=0, cu_seqlens=None,
                config=cfg, autotune=False)
    assert rel_err(oq, rq) < TOL[torch.float32] and rel_err(ok, rk_) < TOL[torch.float32]

    wq, wk = torch.rand(48, generator=gen) + 0.5, torch.rand(48, generator=gen) + 0.5
    nq, nk = q.clone(), k.clone()
    yt.apply_qk_norm_rope_(nq, nk, pos, p, wq.to(kdev), wk.to(kdev), layout=layout, config=cfg)
    eq, ek = qk_norm_rope_reference(q.cpu().double(), k.cpu().double(), pos.cpu(), p, wq.double(), wk.double(),
                                    layout=layout, compute_dtype=torch.float64)
    assert rel_err(nq, eq) < TOL[torch.float32] and rel_err(nk, ek) < TOL[torch.float32]


@pytest.mark.parametrize("shape", [(1, 128, 1, 32), (8, 128, 1, 32), (1, 32, 8, 64), (256, 32, 8, 64),
                                   (16384, 32, 8, 64)], ids=str)
def test_tuner_times_the_untuned_shape_too(shape):
    """Tuning can only improve on the launch shape used without it: the heuristic's shape is
    always among the candidates, once (a 1-token MLA call's 128 heads get one group each,
    which the fixed list has too, among its MLA shapes)."""
    from yarn_triton.kernels import configs

    cands = configs.candidate_configs(*shape)
    default = configs.heuristic_config(*shape)
    assert cands.count(default) == 1 and len(set(cands)) == len(cands)
    if shape[:2] == (1, 128):
        assert max(c.head_groups for c in cands) == 128


def test_tuner_times_close_candidates_twice_and_ranks_by_the_mean():
    """The tuner's ranking (timings stubbed): a candidate that timed best once but slower on
    its second look loses to a steadier one; a failed candidate (inf) and one far behind
    are never timed again; one clear winner is not timed again; all failing gives None."""
    from yarn_triton.kernels import configs

    cands = ["lucky", "steady", "far", "broken"]
    times = {"lucky": [2.60, 3.10], "steady": [2.70, 2.70], "far": [4.00], "broken": [float("inf")]}
    calls = []

    def timer(cfg):
        calls.append(cfg)
        return times[cfg][sum(c == cfg for c in calls) - 1]

    lines = []
    assert configs.pick_fastest(cands, timer, log=lines.append) == "steady"  # means 2.85 vs 2.70
    assert calls == cands + ["steady", "lucky"]  # the finalists again, in reverse order of their first times
    assert len(lines) == 6 and "again" in lines[-1]

    calls.clear()
    times.update(lucky=[2.0])
    assert configs.pick_fastest(cands, timer) == "lucky" and calls == cands  # 2.70 > 2.0 * 1.15
    assert configs.pick_fastest(["broken"], lambda c: float("inf")) is None
