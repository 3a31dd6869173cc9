"""Argument checks of the RopeParams constructors and the config reader, the bound on the
per-model sequence-length cache, and the shape of the host modules' import graph.

Every bad value must raise ``ValueError`` or ``TypeError`` naming the argument, before any
arithmetic can fail with a ZeroDivisionError / OverflowError or yield NaN / inf; every
valid edge value must still give finite params.
"""

from __future__ import annotations

import ast
import inspect
import math
import pathlib

import numpy as np
import pytest
import torch

from yarn_triton import RopeParams, RopeTracker, rope_params_from_config
from yarn_triton import variants
from yarn_triton._validate import FLOAT32_MAX, MAX_ROPE_DIM
from yarn_triton.rope import SEQ_LEN_CACHE_SIZE

NAN, INF = float("nan"), float("inf")
SHORT = [1.0] * 32
LONG = [2.0] * 32

# constructor -> keyword arguments of a valid call (dim 64)
VALID = {
    "default": dict(dim=64, base=1e4),
    "yarn": dict(dim=64, base=1e4, scaling_factor=4.0, original_max_position_embeddings=4096,
                 beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.5),
    "linear": dict(dim=64, base=1e4, factor=2.0),
    "ntk": dict(dim=64, base=1e4, factor=2.0),
    "dynamic": dict(dim=64, base=1e4, factor=2.0, max_position_embeddings=2048),
    "yarn_hf": dict(dim=64, base=1e4, factor=4.0, original_max_position_embeddings=4096,
                    max_position_embeddings=16384, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
                    mscale_all_dim=0.5),
    "llama3": dict(dim=64, base=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192),
    "longrope": dict(dim=64, base=1e4, short_factor=SHORT, long_factor=LONG,
                     original_max_position_embeddings=4096, factor=4.0, max_position_embeddings=16384),
    "proportional": dict(head_dim=64, base=1e4, factor=2.0, partial_rotary_factor=0.5),
}


def _all_finite(p: RopeParams) -> bool:
    ps = [p] + ([p.for_seq_len(n) for n in (1, 5000, 10**6)] if p.is_seq_len_dependent else [])
    return all(
        torch.isfinite(q.inv_freq).all() and math.isfinite(q.cos_sin_scale) and q.cos_sin_scale > 0
        and math.isfinite(q.softmax_scale_factor) and q.softmax_scale_factor > 0
        for q in ps
    )


def _bad(ctor: str, **patch):
    kw = dict(VALID[ctor])
    kw.update(patch)
    return getattr(RopeParams, ctor)(**kw)


@pytest.mark.parametrize("ctor", sorted(VALID))
def test_valid_calls_are_finite(ctor):
    assert _all_finite(_bad(ctor))


# --------------------------------------------------------------------------------------
# base / rope_theta
# --------------------------------------------------------------------------------------
def test_yarn_base_one_is_a_value_error_not_zero_division():
    with pytest.raises(ValueError, match=r"base must be a finite number > 1, got 1\.0"):
        RopeParams.yarn(64, base=1.0, scaling_factor=4, original_max_position_embeddings=4096)


@pytest.mark.parametrize("ctor", sorted(VALID))
@pytest.mark.parametrize("base", [1.0, 1, 0.5, 0.0, -10.0, NAN, INF, -INF, 1e39, 10**400])
def test_bad_base_is_refused_by_every_constructor(ctor, base):
    with pytest.raises(ValueError, match=r"\bbase\b"):
        _bad(ctor, base=base)


@pytest.mark.parametrize("ctor", sorted(VALID))
@pytest.mark.parametrize("base", ["1e4", None, True, [1e4], 1 + 2j])
def test_base_of_the_wrong_kind_is_a_type_error(ctor, base):
    with pytest.raises(TypeError, match=r"\bbase\b"):
        _bad(ctor, base=base)


@pytest.mark.parametrize("ctor", sorted(VALID))
@pytest.mark.parametrize("base", [1.0001, 2, 1e30, np.float32(5e5), np.int64(10000), torch.tensor(1e4)])
def test_edge_bases_still_work(ctor, base):
    assert _all_finite(_bad(ctor, base=base))


@pytest.mark.parametrize("theta", [1.0, 0.9, 0, -1e4, NAN, INF])
def test_config_rope_theta_is_named(theta):
    d = dict(model_type="llama", hidden_size=512, num_attention_heads=4, max_position_embeddings=4096,
             rope_theta=theta, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 1024})
    with pytest.raises(ValueError, match="rope_theta must be a finite number > 1"):
        RopeParams.from_config(d)
    with pytest.raises(ValueError, match="rope_theta"):
        rope_params_from_config(d)


# --------------------------------------------------------------------------------------
# the other arguments, constructor by constructor
# --------------------------------------------------------------------------------------
BAD_VALUES = [
    # (constructor, argument, bad value, error type)
    *[(c, a, v, ValueError) for c, a in [
        ("yarn", "scaling_factor"), ("linear", "factor"), ("ntk", "factor"), ("dynamic", "factor"),
        ("yarn_hf", "factor"), ("llama3", "factor"), ("longrope", "factor"), ("proportional", "factor"),
        ("yarn", "original_max_position_embeddings"), ("yarn_hf", "original_max_position_embeddings"),
        ("llama3", "original_max_position_embeddings"), ("longrope", "original_max_position_embeddings"),
        ("yarn", "beta_fast"), ("yarn", "beta_slow"),
        ("llama3", "low_freq_factor"), ("llama3", "high_freq_factor"),
        ("yarn_hf", "attention_factor"), ("longrope", "attention_factor"),
        ("yarn_hf", "max_position_embeddings"), ("longrope", "max_position_embeddings"),
    ] for v in (0, -1.0, NAN, INF, -INF)],
    *[(c, a, v, ValueError) for c, a in [
        ("yarn", "mscale"), ("yarn", "mscale_all_dim"), ("yarn_hf", "mscale"), ("yarn_hf", "mscale_all_dim"),
    ] for v in (-1.0, -1e-9, NAN, INF)],
    # values that once gave ZeroDivisionError / OverflowError / NaN
    ("yarn", "mscale_all_dim", -10 / math.log(4.0), ValueError),  # get_mscale(...) == 0
    ("yarn", "mscale_all_dim", 1e200, ValueError),  # get_mscale(...) ** 2 overflows
    ("yarn_hf", "mscale_all_dim", 1e200, ValueError),
    *[("yarn_hf", a, v, ValueError) for a in ("beta_fast", "beta_slow") for v in (-1.0, NAN, INF)],  # 0: default
    ("yarn", "beta_fast", 1e308, ValueError),  # log(0) in the correction range
    ("yarn_hf", "beta_slow", 1e308, ValueError),
    ("yarn", "scaling_factor", 1e-300, ValueError),  # float32 1 / 0
    ("linear", "factor", 1e-300, ValueError),
    ("ntk", "factor", 1e200, ValueError),  # factor ** (dim / (dim - 2)) overflows
    ("ntk", "factor", 1e-30, ValueError),  # scaled base <= 1
    ("llama3", "low_freq_factor", 0.0, ValueError),  # original_max / 0
    ("llama3", "high_freq_factor", 0.5, ValueError),  # high <= low
    ("dynamic", "max_position_embeddings", 0, ValueError),
    ("dynamic", "max_position_embeddings", -5, ValueError),
    ("dynamic", "max_position_embeddings", 2048.0, TypeError),
    ("proportional", "partial_rotary_factor", 1.5, ValueError),
    ("proportional", "partial_rotary_factor", -0.1, ValueError),
    ("proportional", "partial_rotary_factor", NAN, ValueError),
    ("yarn", "scaling_factor", 10**400, ValueError),  # an int beyond the float range
    ("yarn_hf", "factor", "4", TypeError),
    ("llama3", "factor", None, TypeError),
    ("linear", "factor", True, TypeError),
    ("longrope", "short_factor", [1.0] * 31, ValueError),
    ("longrope", "long_factor", [1.0] * 31 + [0.0], ValueError),
    ("longrope", "long_factor", [1.0] * 31 + [NAN], ValueError),
    ("longrope", "short_factor", "1.0", TypeError),
    ("longrope", "long_factor", [1e-300] * 32, ValueError),  # float32 1 / 0
]


@pytest.mark.parametrize("ctor, arg, value, error", BAD_VALUES,
                         ids=[f"{c}-{a}-{v!r:.12}" for c, a, v, _ in BAD_VALUES])
def test_bad_values_are_named(ctor, arg, value, error):
    with pytest.raises(error, match=arg):
        _bad(ctor, **{arg: value})


@pytest.mark.parametrize("ctor", sorted(VALID))
@pytest.mark.parametrize("dim, error", [(0, ValueError), (-2, ValueError), (63, ValueError),
                                        (MAX_ROPE_DIM + 2, ValueError), (2**64, ValueError),
                                        (64.0, TypeError), ("64", TypeError), (True, TypeError)])
def test_bad_dims_are_named(ctor, dim, error):
    name = "head_dim" if ctor == "proportional" else "dim"
    with pytest.raises(error, match=rf"\b{name}\b"):
        _bad(ctor, **{name: dim})


@pytest.mark.parametrize("ctor", ["ntk", "dynamic"])
def test_ntk_needs_dim_above_two(ctor):
    with pytest.raises(ValueError, match=r"\bdim\b.*> 2"):
        _bad(ctor, dim=2)


def test_longrope_default_attention_factor_needs_a_length_above_one():
    """sqrt(1 + ln(f) / ln(original_max)) divides by ln(1) = 0."""
    with pytest.raises(ValueError, match="original_max_position_embeddings must be > 1"):
        _bad("longrope", original_max_position_embeddings=1)
    with pytest.raises(ValueError, match="original_max_position_embeddings must be > 1"):
        _bad("longrope", original_max_position_embeddings=0.5)
    # an explicit attention factor needs no logarithm
    p = _bad("longrope", original_max_position_embeddings=1, attention_factor=1.2)
    assert p.cos_sin_scale == pytest.approx(1.2) and p.seq_len_threshold == 1


def test_dynamic_too_long_sequence_is_named():
    p = RopeParams.dynamic(64, 1e4, 64.0, 2048)
    with pytest.raises(ValueError, match="seq_len"):
        p.for_seq_len(10**400)
    with pytest.raises(ValueError, match="seq_len"):
        p.for_seq_len(-1)
    with pytest.raises(TypeError, match="seq_len"):
        p.for_seq_len(1.5)
    with pytest.raises(TypeError, match="seq_len"):
        RopeTracker(p).update("7")


@pytest.mark.parametrize("kwargs", [
    dict(dim=2), dict(dim=MAX_ROPE_DIM),                       # smallest / largest rotary dim
    dict(scaling_factor=1.0), dict(scaling_factor=0.5),        # no / shrinking extension
    dict(original_max_position_embeddings=1), dict(original_max_position_embeddings=1e9),
    dict(beta_fast=1.0, beta_slow=1.0), dict(beta_fast=0.5, beta_slow=2.0),  # equal / swapped
    dict(mscale=0, mscale_all_dim=0), dict(mscale=2.0, mscale_all_dim=2.0),
    dict(base=FLOAT32_MAX),
])
def test_yarn_edge_values_still_work(kwargs):
    assert _all_finite(_bad("yarn", **kwargs))


@pytest.mark.parametrize("ctor, kwargs", [
    ("default", dict(dim=2)),
    ("linear", dict(factor=1e-30)),
    ("linear", dict(factor=1e30)),
    ("ntk", dict(dim=4, factor=0.5)),
    ("dynamic", dict(factor=1e-3)),
    ("dynamic", dict(max_position_embeddings=1)),
    ("dynamic", dict(max_position_embeddings=np.int64(4096))),
    ("yarn_hf", dict(factor=None)),
    ("yarn_hf", dict(factor=1.0, attention_factor=1e-3)),
    ("yarn_hf", dict(beta_fast=0, beta_slow=None, truncate=False)),
    ("yarn_hf", dict(original_max_position_embeddings=None)),
    ("llama3", dict(low_freq_factor=1.0, high_freq_factor=1.0 + 1e-9)),
    ("llama3", dict(factor=1.0)),
    ("longrope", dict(factor=1.0, max_position_embeddings=None)),
    ("longrope", dict(factor=None, max_position_embeddings=4096)),
    ("longrope", dict(short_factor=torch.ones(32), long_factor=np.full(32, 3.0).tolist())),
    ("proportional", dict(partial_rotary_factor=0.0)),
    ("proportional", dict(partial_rotary_factor=1.0)),
    ("proportional", dict(head_dim=2)),
])
def test_other_edge_values_still_work(ctor, kwargs):
    assert _all_finite(_bad(ctor, **kwargs))


def test_direct_construction_checks():
    inv = torch.ones(4)
    with pytest.raises(ValueError, match="rope_dim"):
        RopeParams(inv, 7)
    with pytest.raises(TypeError, match="rope_dim"):
        RopeParams(inv, 8.0)
    with pytest.raises(ValueError, match="inv_freq"):
        RopeParams(inv, 16)
    with pytest.raises(ValueError, match="inv_freq"):
        RopeParams(torch.tensor([1.0, NAN, 1.0, 1.0]), 8)
    with pytest.raises(ValueError, match="cos_sin_scale"):
        RopeParams(inv, 8, INF)
    with pytest.raises(TypeError, match="softmax_scale_factor"):
        RopeParams(inv, 8, 1.0, "2")
    with pytest.raises(TypeError, match="rope_type"):
        RopeParams(inv, 8, 1.0, 1.0, None)
    with pytest.raises(ValueError, match="seq_len_threshold"):
        RopeParams(inv, 8, 1.0, 1.0, "x", -1)
    with pytest.raises(TypeError, match="spec"):
        RopeParams.from_spec({"inv_freq": inv})
    assert RopeParams(inv, np.int64(8)).rope_dim == 8


@pytest.mark.parametrize("patch, name", [
    ({"head_dim": 0}, "head_dim"),
    ({"head_dim": 10**20}, "head_dim"),
    ({"head_dim": "128"}, "head_dim"),
    ({"head_dim": None, "num_attention_heads": 0}, "num_attention_heads"),
    ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"partial_rotary_factor": "half"}, "partial_rotary_factor"),
    ({"partial_rotary_factor": 0.29}, "partial_rotary_factor"),  # int(128 * 0.29) = 37: odd
])
def test_config_sizes_are_named(patch, name):
    d = dict(model_type="llama", hidden_size=512, num_attention_heads=4, head_dim=128,
             max_position_embeddings=4096, rope_theta=1e4)
    d.update(patch)
    with pytest.raises((ValueError, TypeError), match=name):
        RopeParams.from_config(d)


# --------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------
def test_dynamic_seq_len_cache_stays_bounded():
    """Thousands of distinct lengths: the per-model cache keeps the last SEQ_LEN_CACHE_SIZE,
    recently used ones survive, evicted ones come back equal (a new object)."""
    p = RopeParams.dynamic(64, 1e4, 4.0, 128)
    family = p._seq_len_rule
    first = p.for_seq_len(129)
    for n in range(130, 130 + 2000):
        q = p.for_seq_len(n)
        assert len(family) <= SEQ_LEN_CACHE_SIZE
        assert q._seq_len_rule is family  # derived params share the one family (and its bound)
    assert len(family) == SEQ_LEN_CACHE_SIZE
    last = p.for_seq_len(130 + 1999)
    assert p.for_seq_len(130 + 1999) is last  # cached
    again = p.for_seq_len(129)  # long evicted: rebuilt, equal
    assert again is not first and torch.equal(again.inv_freq, first.inv_freq)
    assert len(family) == SEQ_LEN_CACHE_SIZE
    # asking a derived params object goes through the same bounded cache
    assert last.for_seq_len(100) is p and last.for_seq_len(129) is again


def test_dynamic_cache_keeps_recently_used():
    p = RopeParams.dynamic(32, 1e4, 2.0, 64)
    hot = p.for_seq_len(1000)
    for n in range(65, 65 + 10 * SEQ_LEN_CACHE_SIZE):
        p.for_seq_len(n)
        assert p.for_seq_len(1000) is hot  # touched every time: never the least recent


def test_longrope_cache_has_one_entry():
    p = RopeParams.longrope(8, 1e4, [1.0] * 4, [2.0] * 4, 16, factor=4.0)
    longs = {id(p.for_seq_len(n)) for n in range(17, 5000)}
    assert len(longs) == 1 and len(p._seq_len_rule) == 1
    assert p.for_seq_len(16) is p


def test_tracker_holds_no_history():
    p = RopeParams.dynamic(32, 1e4, 2.0, 64)
    t = RopeTracker(p)
    for n in range(1, 3000, 7):
        t.update(n)
    assert set(vars(t)) == {"initial", "current", "original_max_seq_len", "max_seq_len_cached"}
    assert len(p._seq_len_rule) <= SEQ_LEN_CACHE_SIZE


def test_device_cache_holds_one_copy_per_device():
    p = RopeParams.default(16)
    assert p.inv_freq_on("cpu") is p.inv_freq and not p._device_cache  # CPU is never stored
    a = p.inv_freq_on("meta")
    assert p.inv_freq_on(torch.device("meta")) is a and len(p._device_cache) == 1


# --------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------
PKG = pathlib.Path(__file__).resolve().parents[1] / "yarn_triton"
HOST_MODULES = ("_validate", "variants", "config_parsing", "rope", "config")


def _package_imports(module: str) -> set:
    """Sibling modules ``module`` imports anywhere in its source (top level or lazily)."""
    tree = ast.parse((PKG / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("yarn_triton."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("yarn_triton."))
    return found


def test_host_modules_import_graph_is_one_way():
    graph = {m: _package_imports(m) for m in HOST_MODULES}
    order = {m: i for i, m in enumerate(HOST_MODULES)}  # each may import only those before it
    for m, deps in graph.items():
        for d in deps:
            assert d in order and order[d] < order[m], f"{m} imports {d}"
    assert "config" not in graph["rope"] and "rope" not in graph["config_parsing"]


@pytest.mark.parametrize("name", ["default", "yarn", "linear", "ntk", "dynamic", "yarn_hf", "llama3",
                                  "longrope", "proportional"])
def test_classmethods_mirror_the_variant_functions(name):
    """Each RopeParams constructor is a delegate with exactly its variant function's
    parameters (names, kinds, defaults), and returns the same numbers."""
    method = inspect.signature(getattr(RopeParams, name)).parameters
    function = inspect.signature(getattr(variants, f"{name}_spec")).parameters
    assert [(p.name, p.kind, p.default) for p in method.values()] == \
           [(p.name, p.kind, p.default) for p in function.values()]
    spec = getattr(variants, f"{name}_spec")(**VALID[name])
    params = getattr(RopeParams, name)(**VALID[name])
    assert torch.equal(params.inv_freq, spec.inv_freq) and params.cos_sin_scale == spec.cos_sin_scale
    assert params.rope_type == spec.rope_type == ("yarn" if name == "yarn_hf" else name)
