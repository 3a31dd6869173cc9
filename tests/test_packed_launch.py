"""The packed launcher (``kernels/packed_launch``): a replayed plan's fixed arguments packed
once, each call writing only its pointers and ``pos_base``.

On the CPU: the C module is built with the machine's compiler and its packing is checked
byte by byte against the layout it was given (no driver is needed for ``pack``). On the
GPU: every kind of plan launches through it, with results bit for bit those of Triton's
own launcher.
"""

import random
import struct

import pytest
import torch

import yarn_triton as yt
from yarn_triton import native, op
from yarn_triton.kernels import launcher as kl
from yarn_triton.kernels import packed_launch as pl

from conftest import requires_cuda

_SIZES = {"*bf16": 8, "*fp32": 8, "*i64": 8, "i32": 4, "i64": 8, "fp32": 4, "i1": 1, "u64": 8}


def _abi_layout(types):
    """(offset, size) per non-constexpr argument as the CUDA ABI lays them out (natural
    alignment), then Triton's two trailing scratch pointers."""
    layout, off = [], 0
    for ty in [t for t in types if t != "constexpr"] + ["*i8", "*i8"]:
        size = 8 if ty.startswith("*") else _SIZES[ty]
        off = -(-off // size) * size
        layout.append((off, size))
        off += size
    return layout


@pytest.fixture(scope="module")
def cmod(tmp_path_factory):
    """The C module built into a fresh cache folder (skipped where no compiler exists)."""
    if native.compiler() is None:
        pytest.skip("no C compiler")
    mp = pytest.MonkeyPatch()
    mp.setenv("YARN_TRITON_CACHE_DIR", str(tmp_path_factory.mktemp("launch-cache")))
    try:
        path = pl._build()
    finally:
        mp.undo()
    mod = native.load(pl._MODULE_NAME, path)
    assert mod.HEADER_SIZE == pl._HEADER.size
    return mod


# a kernel signature in the shape of rope_kernel's: call pointers first, pos_base after one
# scalar, constexprs and mixed widths in between (so that padding matters)
_TYPES = ["*bf16", "*bf16", "*fp32", "fp32", "i32", "constexpr", "i64", "i32", "i1", "fp32", "u64", "constexpr"]
_N_PTRS, _BASE = 3, 4


def _values(rng):
    return [None, None, None, rng.uniform(-2, 2), None, 7, rng.randrange(1 << 40), -rng.randrange(1 << 30), 1,
            rng.uniform(0, 1), rng.randrange(1 << 63), 3]


def test_pack_writes_fixed_arguments_once_and_pointers_per_call(cmod):
    """Every parameter lands at the offset the layout gives, in its own width: the fixed
    ones from the spec, the pointers and pos_base from the call; the trailing scratch
    pointers are null."""
    rng = random.Random(7)
    layout = _abi_layout(_TYPES)
    for _ in range(20):
        values = _values(rng)
        spec = pl.build_spec(0xABC, (5, 1, 1), 64, 0, 0, _TYPES, values, layout, _N_PTRS, _BASE)
        ptrs = tuple(rng.randrange(1 << 48) * 16 for _ in range(_N_PTRS))
        base = rng.randrange(-(1 << 31), 1 << 31)
        buf = cmod.pack(spec, ptrs, base)
        assert len(buf) == max(o + s for o, s in layout)
        got = [struct.unpack_from("<" + {8: "Q", 4: "I", 1: "B"}[s], buf, o)[0] for o, s in layout]
        want_fixed = {3: struct.unpack("<I", struct.pack("<f", values[3]))[0], 6: values[6],
                      7: values[7] & 0xFFFFFFFF, 8: 1, 9: struct.unpack("<I", struct.pack("<f", values[9]))[0],
                      10: values[10]}
        runtime = [i for i, t in enumerate(_TYPES) if t != "constexpr"]
        for (idx, value) in zip(runtime + ["scratch", "scratch"], got):
            if idx == "scratch":
                assert value == 0
            elif idx < _N_PTRS:
                assert value == ptrs[idx]
            elif idx == _BASE:
                assert value == base & 0xFFFFFFFF
            else:
                assert value == want_fixed[idx], idx
        assert cmod.pack(spec, list(ptrs), base) == buf  # a list of pointers does as well


def test_pack_refuses_bad_calls(cmod):
    """Wrong pointer count, a pos_base too wide for the compiled int32, a malformed spec:
    clear exceptions, nothing packed."""
    layout = _abi_layout(_TYPES)
    spec = pl.build_spec(1, (1, 1, 1), 32, 0, 0, _TYPES, _values(random.Random(1)), layout, _N_PTRS, _BASE)
    with pytest.raises(TypeError, match="3 pointers"):
        cmod.pack(spec, (16, 32), 0)
    with pytest.raises(TypeError, match="tuple or list"):
        cmod.pack(spec, 16, 0)
    with pytest.raises(OverflowError, match="int32"):
        cmod.pack(spec, (16, 32, 48), 1 << 31)
    with pytest.raises(ValueError, match="malformed"):
        cmod.pack(spec[:-1], (16, 32, 48), 0)
    with pytest.raises(TypeError, match="bytes"):
        cmod.pack(bytearray(spec), (16, 32, 48), 0)


def test_spec_refuses_a_layout_that_disagrees_with_the_signature():
    """Where the driver's layout and Triton's signature disagree, no spec: the plan keeps
    Triton's launcher."""
    values = _values(random.Random(2))
    good = _abi_layout(_TYPES)
    pl.build_spec(1, (1, 1, 1), 32, 0, 0, _TYPES, values, good, _N_PTRS, _BASE)
    bad_width = list(good)
    bad_width[3] = (bad_width[3][0], 8)  # the fp32 argument given an 8-byte parameter
    with pytest.raises(ValueError, match="does not fit"):
        pl.build_spec(1, (1, 1, 1), 32, 0, 0, _TYPES, values, bad_width, _N_PTRS, _BASE)
    with pytest.raises(ValueError, match="parameters in the compiled function"):
        pl.build_spec(1, (1, 1, 1), 32, 0, 0, _TYPES, values, good[:5], _N_PTRS, _BASE)
    with pytest.raises(ValueError, match="parameters in the compiled function"):  # a third trailing int
        pl.build_spec(1, (1, 1, 1), 32, 0, 0, _TYPES, values, good + [(good[-1][0] + 8, 4)], _N_PTRS, _BASE)
    with pytest.raises(ValueError, match="parameters in the compiled function"):  # three trailing pointers
        pl.build_spec(1, (1, 1, 1), 32, 0, 0, _TYPES, values, good + [(good[-1][0] + 8, 8)], _N_PTRS, _BASE)
    folded = list(_TYPES)
    folded[1] = "constexpr"  # a call pointer compiled in (None)
    with pytest.raises(ValueError, match="compiled in"):
        pl.build_spec(1, (1, 1, 1), 32, 0, 0, folded, values, _abi_layout(folded), _N_PTRS, _BASE)
    as_float = list(_TYPES)
    as_float[_BASE] = "fp32"
    with pytest.raises(ValueError, match="pos_base"):
        pl.build_spec(1, (1, 1, 1), 32, 0, 0, as_float, values, _abi_layout(as_float), _N_PTRS, _BASE)
    with pytest.raises(ValueError, match="does not fit"):
        pl.build_spec(1, (1, 1, 1), 32, 0, 0, _TYPES[:-2] + ["bf16", "constexpr"], values,
                      _abi_layout(_TYPES[:-2] + ["i1", "constexpr"]), _N_PTRS, _BASE)


class _Metadata:
    num_ctas, launch_pdl, launch_cooperative_grid = 1, False, False
    global_scratch_size = profile_scratch_size = 0
    num_warps, shared = 1, 0


class _Source:
    signature = dict(zip("abcdefghijkl", _TYPES))


def _ptx(n_params):
    """A PTX entry as Triton's compiler writes it, with ``n_params`` parameters."""
    params = ",\n".join(f"\t.param .u64 .ptr .global .align 1 k_param_{i}" if i % 3 == 0 else
                        f"\t.param .u32 k_param_{i}" for i in range(n_params))
    return f"//\n.version 8.7\n.target sm_90a\n.visible .entry k(\n{params}\n)\n.reqntid 32\n{{\n\tret;\n}}\n"


class _Compiled:
    metadata, src, function = _Metadata(), _Source(), 0x10
    asm = {"ptx": _ptx(len([t for t in _TYPES if t != "constexpr"]) + 2)}


def test_ptx_parameter_count():
    """The parameter count comes from the PTX entry (asking the driver past the last one
    is an API error); no PTX, no count."""
    for n in (0, 1, 12, 70):
        c = _Compiled()
        c.asm = {"ptx": _ptx(n)}
        assert pl._ptx_param_count(c) == n
    c = _Compiled()
    c.asm = {"cubin": b"..."}
    assert pl._ptx_param_count(c) is None
    assert pl._ptx_param_count(object()) is None


def test_no_compiler_keeps_tritons_launcher(monkeypatch, tmp_path):
    """No C compiler: no spec, the reason kept, no exception."""
    monkeypatch.setenv("YARN_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(pl, "_state", {"module": None, "tried": False, "error": None})
    monkeypatch.setattr(pl, "ENABLED", True)
    assert pl.spec_for(_Compiled(), list("abcdefghijkl"), _values(random.Random(3)), (1, 1, 1), 0, _N_PTRS,
                       _BASE) is None
    assert "no-such-cc" in pl.unavailable_reason()
    monkeypatch.setattr(pl, "ENABLED", False)
    assert pl.unavailable_reason() == "YARN_TRITON_PACKED_LAUNCH=0"


def test_spec_for_only_where_tritons_launch_has_nothing_more(cmod, monkeypatch):
    """Scratch buffers, clusters, a signature that does not name the kernel's arguments:
    Triton's launcher. (The driver's layout is stubbed: no GPU here.)"""
    monkeypatch.setattr(pl, "_state", {"module": cmod, "tried": True, "error": None})
    monkeypatch.setattr(pl, "ENABLED", True)

    class Mod:
        launch = cmod.launch

        @staticmethod
        def load_driver():
            return None

        @staticmethod
        def param_layout(function, count):
            assert function == 0x10
            return _abi_layout(_TYPES)[:count]

    monkeypatch.setattr(pl, "_state", {"module": Mod, "tried": True, "error": None})
    names = list("abcdefghijkl")
    vals = _values(random.Random(4))
    assert pl.spec_for(_Compiled(), names, vals, (2, 1, 1), 0, _N_PTRS, _BASE) is not None
    assert pl.spec_for(_Compiled(), names[::-1], vals, (2, 1, 1), 0, _N_PTRS, _BASE) is None
    for field, value in (("global_scratch_size", 64), ("num_ctas", 2), ("launch_pdl", True)):
        c = _Compiled()
        c.metadata = type("M", (_Metadata,), {field: value})()
        assert pl.spec_for(c, names, vals, (2, 1, 1), 0, _N_PTRS, _BASE) is None, field
    # a PTX entry with one parameter fewer than the signature has arguments: refused
    c = _Compiled()
    c.asm = {"ptx": _ptx(len([t for t in _TYPES if t != "constexpr"]) - 1)}
    assert pl.spec_for(c, names, vals, (2, 1, 1), 0, _N_PTRS, _BASE) is None
    assert "parameters in the compiled function" in pl.unavailable_reason()
    c.asm = {}
    assert pl.spec_for(c, names, vals, (2, 1, 1), 0, _N_PTRS, _BASE) is None


def _serving_calls(dev, gen):
    """One call of each kind of plan, on fresh random inputs each time it is called."""
    bf = torch.bfloat16
    p = yt.RopeParams.yarn(128, 500000.0, 8.0, 8192)
    pm = yt.RopeParams.yarn(64, 10000.0, 40.0, 4096, mscale=0.707, mscale_all_dim=0.707)

    def fresh(*shape, dtype=bf):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    def calls():
        q, k, v = fresh(3, 5, 8, 128), fresh(3, 5, 2, 128), fresh(3, 5, 2, 128)
        pos = torch.randint(0, 1 << 20, (3, 5), generator=gen).to(dev)
        qkv = fresh(4, 16, 192)  # MLA-style views: rope part of each head at its end
        qm, km = qkv[..., 128:], fresh(4, 1, 64)
        qn = fresh(2, 3, 4, 128).requires_grad_()
        kn = fresh(2, 3, 2, 128).requires_grad_()
        w = fresh(128)
        kc = torch.zeros(16, 16, 2, 128, device=dev, dtype=bf)
        vc = torch.zeros_like(kc)
        kf = torch.zeros(16, 16, 2, 128, device=dev, dtype=torch.float8_e4m3fn)
        vf = torch.zeros_like(kf)
        slots = torch.randperm(256, generator=gen)[:15].view(3, 5).to(dev)
        sc = torch.full((1,), 0.5, device=dev)
        out = {}
        yt.apply_rope_(q, k, pos, p)
        out["in place"] = (q, k)
        qo = fresh(3, 5, 8, 128)
        yt.apply_rope_(qo, None, None, p, offsets=123457)
        out["offsets"] = (qo,)
        yt.apply_rope_(qm, km, torch.arange(4, device=dev) + 77, pm, layout="deepseek")
        out["mla"] = (qm, km)
        a, b = yt.apply_qk_norm_rope(qn, kn, None, p, w, w, offsets=9)
        (a.float().square().sum() + b.float().sum()).backward()
        out["norm autograd"] = (a, b, qn.grad, kn.grad)
        qc = q.clone()
        yt.apply_rope_and_cache_(qc, k, v, pos, p, kc, vc, slots)
        out["cache"] = (qc, kc, vc)
        yt.apply_rope_and_cache_(q.clone(), k, v, pos, p, kf, vf, slots, k_scale=sc, v_scale=sc)
        out["fp8 cache"] = (kf.view(torch.uint8), vf.view(torch.uint8))
        return out

    return calls


@requires_cuda
def test_packed_launch_matches_tritons_launcher_bit_for_bit(monkeypatch):
    """Each kind of plan (in place, offsets, MLA views, QK-norm autograd forward and
    backward, the bf16 and FP8 cache writes), replayed on fresh inputs through the packed
    launcher, gives exactly what Triton's launcher gives on the same inputs."""
    dev = torch.device("cuda")
    results = {}
    for packed in (True, False):
        monkeypatch.setattr(pl, "ENABLED", packed)
        op.plans._PLANS.clear()  # (the cache writes' plans too)
        gen = torch.Generator().manual_seed(11)
        calls = _serving_calls(dev, gen)
        runs = [calls() for _ in range(3)]  # builds the plans, then replays them
        torch.cuda.synchronize()
        launches = [plan.launch for plan in op.plans._PLANS.values()]
        assert launches and all((lp._packed is not None) == packed for lp in launches), pl.unavailable_reason()
        results[packed] = runs
    for run_packed, run_triton in zip(results[True], results[False]):
        for name in run_packed:
            for x, y in zip(run_packed[name], run_triton[name]):
                assert torch.equal(x, y), name
