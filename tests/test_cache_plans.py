"""The serving ops' eager fast path (``yarn_triton.op.cache_plans``): a second call of a
known signature skips the checks and replays the first call's launch.

The oracle is the full path itself on the same inputs (its own tests hold it to the float64
reference): a replayed call must write the same bits, everywhere, and must still refuse
what the full path refuses where the signature cannot tell (tensors that overlap in
memory, slot values under ``check_slots``)."""

from collections import OrderedDict

import pytest
import torch

import yarn_triton as yt
from yarn_triton.op import cache_api, plans
from yarn_triton.op.cache_plans import CachePlan

T, HQ, HK, D, NB, BS = 5, 4, 2, 32, 4, 4
E4M3 = torch.float8_e4m3fn


# one params object, as a model holds it (a plan is keyed by it)
P = yt.RopeParams.yarn(D, 10000.0, 4.0, 64, mscale=0.707, mscale_all_dim=0.5)


def _random_bits(gen, shape, dtype, device):
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).view(dtype).reshape(shape).to(device)


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.fixture
def counted(monkeypatch):
    """Fresh plans, and a count of the full path's checks (a replay skips them)."""
    monkeypatch.setattr(plans, "_PLANS", OrderedDict())
    calls = []
    real = cache_api._checked

    def checked(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(cache_api, "_checked", checked)
    return calls


def _inputs(gen, dev, cache_dtype, scale_kind, q_out_kind, positions_form, fused=False):
    dt = torch.bfloat16
    if fused:  # q, k, v: head slices of one projection
        qkv = torch.randn(T, HQ + 2 * HK, D, generator=gen).to(dev, dt)
        q, k, v = qkv[:, :HQ], qkv[:, HQ:HQ + HK], qkv[:, HQ + HK:]
    else:
        q = torch.randn(T, HQ, D, generator=gen).to(dev, dt)
        k = torch.randn(T, HK, D, generator=gen).to(dev, dt)
        v = torch.randn(T, HK, D, generator=gen).to(dev, dt)
    cdt = dt if cache_dtype == "same" else cache_dtype
    kc = _random_bits(gen, (NB, BS, HK, D), cdt, dev)
    vc = _random_bits(gen, (NB, BS, HK, D), cdt, dev)
    slots = torch.randperm(NB * BS, generator=gen)[:T]
    slots[1] = -1
    kw = {}
    if cdt == E4M3:
        s = [float(0.01 + torch.rand((), generator=gen)) for _ in range(2)]
        if scale_kind == "tensor":
            kw.update(k_scale=torch.tensor([s[0]], device=dev), v_scale=torch.tensor([s[1]], device=dev))
        else:
            kw.update(k_scale=0.25, v_scale=0.5)  # the same floats every call: one signature
    if q_out_kind == "fp8":
        kw.update(q_out=_random_bits(gen, (T, HQ, D), E4M3, dev),
                  q_scale=torch.tensor([float(0.01 + torch.rand((), generator=gen))], device=dev))
    if positions_form == "positions":
        pos = torch.randint(0, 1 << 20, (T,), generator=gen).to(dev)
    else:  # offsets=int: a new base every call
        pos = None
        kw["offsets"] = int(torch.randint(0, 1 << 20, (), generator=gen))
    return q, k, v, pos, kc, vc, slots.to(dev), kw


def _clone(x):
    q, k, v, pos, kc, vc, slots, kw = x
    if q.data_ptr() != k.data_ptr() and q._base is not None and q._base is k._base:
        base = q._base.clone()
        q, k, v = base[:, :HQ], base[:, HQ:HQ + HK], base[:, HQ + HK:]
    else:
        q, k, v = q.clone(), k.clone(), v.clone()
    kw = {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return q, k, v, pos, kc.clone(), vc.clone(), slots, kw


def _call(x, layout):
    q, k, v, pos, kc, vc, slots, kw = x
    yt.apply_rope_and_cache_(q, k, v, pos, P, kc, vc, slots, layout=layout, **kw)
    return [q, kc, vc] + ([kw["q_out"]] if "q_out" in kw else [])


CASES = [  # layout, cache dtype, scale kind, q_out, positions form
    ("neox", "same", None, None, "positions"),
    ("deepseek", E4M3, "tensor", "fp8", "positions"),
    ("interleaved", E4M3, "float", None, "offsets"),
]


@pytest.mark.parametrize("layout,cache_dtype,scale_kind,q_out_kind,form", CASES)
def test_replay_writes_what_the_full_path_writes(layout, cache_dtype, scale_kind, q_out_kind, form, kdev, gen,
                                                 counted, monkeypatch):
    first = _inputs(gen, kdev, cache_dtype, scale_kind, q_out_kind, form)
    _call(first, layout)
    assert len(counted) == 1 and any(isinstance(p, CachePlan) for p in plans._PLANS.values())
    second = _inputs(gen, kdev, cache_dtype, scale_kind, q_out_kind, form)  # new tensors, values, scales
    truth_in = _clone(second)
    got = _call(second, layout)
    assert len(counted) == 1, "the second call of the signature took the full path"
    monkeypatch.setattr(plans, "_PLANS", OrderedDict())  # the full path on the same inputs
    want = _call(truth_in, layout)
    assert len(counted) == 2
    for name, a, b in zip(("q", "k_cache", "v_cache", "q_out"), got, want):
        assert torch.equal(_bits(a), _bits(b)), f"{name} differs from the full path's"


def test_fused_qkv_views_replay(kdev, gen, counted, monkeypatch):
    """q, k and v as head slices of one buffer: their byte ranges intersect, at a distance
    the first call's exact check passed; a new buffer of the same shape replays."""
    _call(_inputs(gen, kdev, "same", None, None, "positions", fused=True), "neox")
    second = _inputs(gen, kdev, "same", None, None, "positions", fused=True)
    truth_in = _clone(second)
    got = _call(second, "neox")
    assert len(counted) == 1
    monkeypatch.setattr(plans, "_PLANS", OrderedDict())
    want = _call(truth_in, "neox")
    for a, b in zip(got, want):
        assert torch.equal(_bits(a), _bits(b))


def test_overlap_is_still_refused_on_a_known_signature(kdev, gen, counted):
    """Same shapes and strides as a planned call, but q_out now lies inside k_cache."""
    x = _inputs(gen, kdev, E4M3, "tensor", "fp8", "positions")
    _call(x, "neox")
    q, k, v, pos, kc, vc, slots, kw = _inputs(gen, kdev, E4M3, "tensor", "fp8", "positions")
    n_cache = kc.numel()
    buf = _random_bits(gen, (n_cache + T * HQ * D // 2,), E4M3, kdev)
    kc = buf[:n_cache].view(kc.shape)
    kw["q_out"] = buf[n_cache - T * HQ * D // 2:].view(T, HQ, D)  # its first half is k_cache's last
    snap = _bits(buf).clone()
    with pytest.raises(ValueError, match="overlaps"):
        yt.apply_rope_and_cache_(q, k, v, pos, P, kc, vc, slots, **kw)
    assert len(counted) == 2  # the replay handed it to the full path, which refused it
    assert torch.equal(_bits(buf), snap), "something was written before the error"


def test_check_slots_checks_every_call(kdev, gen, counted):
    x = _inputs(gen, kdev, "same", None, None, "positions")
    _call(x, "neox")
    q, k, v, pos, kc, vc, slots, kw = _inputs(gen, kdev, "same", None, None, "positions")
    slots[0] = -2
    with pytest.raises(ValueError, match="slot"):
        yt.apply_rope_and_cache_(q, k, v, pos, P, kc, vc, slots, check_slots=True)


def test_mla_replay(kdev, gen, counted, monkeypatch):
    """The two halves of one MLA cache row intersect in bytes: learned on the first call."""
    H, NOPE, R, L = 2, 16, 32, 32

    def inputs():
        q = torch.randn(T, H, NOPE + R, generator=gen).to(kdev, torch.bfloat16)
        kv_a = torch.randn(T, L + R, generator=gen).to(kdev, torch.bfloat16)
        kv_c = torch.randn(T, L, generator=gen).to(kdev, torch.bfloat16)
        cache = _random_bits(gen, (NB, BS, L + R), torch.bfloat16, kdev)
        pos = torch.randint(0, 1 << 20, (T,), generator=gen).to(kdev)
        return q, kv_a, kv_c, cache, pos, torch.randperm(NB * BS, generator=gen)[:T].to(kdev)

    def call(x):
        q, kv_a, kv_c, cache, pos, slots = x
        yt.apply_mla_rope_and_cache_(q[..., NOPE:], kv_a[..., L:], kv_c, pos, P, cache, slots)
        return q, cache

    call(inputs())
    second = inputs()
    truth_in = tuple(t.clone() for t in second)
    got = call(second)
    assert len(counted) == 1
    monkeypatch.setattr(plans, "_PLANS", OrderedDict())
    want = call(truth_in)
    for a, b in zip(got, want):
        assert torch.equal(_bits(a), _bits(b))
