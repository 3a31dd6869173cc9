"""The torchtitan switch (``yarn_triton.integrations.torchtitan``) against torchtitan's own
rope: the params' tables bit for bit, and logits and gradients of the llama3, qwen3 and
deepseek_v3 debug models, eager and compiled per block as ``--compile.enable`` does.

Skipped unless torchtitan is installed. Importing torchtitan's model packages pulls in its
data and metrics modules, which import ``datasets`` and ``torch.utils.tensorboard`` (large,
compiled wheels) at module level; where those are not installed (CI installs only
torchtitan, tyro and torchdata: see ``.ci/install``), :func:`_import_models` puts stand-ins
in ``sys.modules`` for the duration of that import only. Nothing here touches them.

The models are the debug flavors with fewer layers and short sequences (through Triton's
interpreter a rope launch costs ~80 ms per token); deepseek_v3 gets ``original_seq_len``
below ``max_seq_len`` so that its YaRN branch (and mscale) is what runs.
"""

import copy
import importlib
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("torchtitan")

from conftest import rel_err  # noqa: E402


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


def _import_models():
    """torchtitan's llama3, qwen3 and deepseek_v3 packages, with stand-ins for ``datasets``
    and ``torch.utils.tensorboard`` during the import where those are missing."""
    class _Missing:  # what torchtitan's data/metrics modules import by name; never called here
        def __init__(self, *a, **k):
            raise RuntimeError("stand-in of a package not installed for this test")

    stubs = {}
    if "datasets" not in sys.modules and importlib.util.find_spec("datasets") is None:
        stubs["datasets"] = _stub("datasets", Dataset=_Missing, load_dataset=_Missing)
        stubs["datasets.distributed"] = _stub("datasets.distributed", split_dataset_by_node=_Missing)
    if "torch.utils.tensorboard" not in sys.modules and importlib.util.find_spec("tensorboard") is None:
        stubs["torch.utils.tensorboard"] = _stub("torch.utils.tensorboard", SummaryWriter=_Missing)
    sys.modules.update(stubs)
    try:
        return tuple(importlib.import_module(f"torchtitan.models.{m}") for m in ("llama3", "qwen3", "deepseek_v3"))
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


_llama3, _qwen3, _deepseek_v3 = _import_models()

import yarn_triton.integrations.torchtitan as tt  # noqa: E402  (switches on import)

FAMILIES = ("llama3", "qwen3", "deepseek_v3")


@pytest.fixture(autouse=True)
def switched():
    """Every test starts switched on with a clean record, and leaves it so."""
    tt.disable()
    tt.enable()
    yield
    tt.disable()
    tt.enable()


def _module(family):
    return importlib.import_module(f"torchtitan.models.{family}.model.model")


def _args(family, n_layers=1):
    if family == "llama3":
        a = copy.deepcopy(_llama3.llama3_args["debugmodel"])
        a.max_seq_len = 64
    elif family == "qwen3":
        a = copy.deepcopy(_qwen3.qwen3_args["debugmodel"])
        a.max_seq_len, a.hidden_dim = 64, 256
    else:
        a = copy.deepcopy(_deepseek_v3.deepseekv3_args["debugmodel"])
        a.max_seq_len, a.original_seq_len = 64, 16  # YaRN on: factor 40, mscale 0.7
        a.moe_args.use_grouped_mm = False
        a.n_dense_layers = min(a.n_dense_layers, n_layers)
    a.n_layers = n_layers
    return a


def _model_cls(family):
    classes = {"llama3": _llama3.Transformer, "qwen3": _qwen3.Qwen3Model, "deepseek_v3": _deepseek_v3.DeepSeekV3Model}
    return classes[family]


def _build(family, n_layers=1, seed=0):
    """As torchtitan's trainer builds a model: on the meta device, then ``to_empty`` and
    ``init_weights`` (which recomputes the rope table)."""
    with torch.device("meta"):
        model = _model_cls(family)(_args(family, n_layers))
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights()
    return model


def _table(model):
    return model.rope_cache if hasattr(model, "rope_cache") else model.freqs_cis


@pytest.fixture
def rope_calls(monkeypatch):
    """Counts the switch's calls into the fused op (so an equality can't pass unswitched)."""
    calls = []
    real = tt.apply_rope

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(tt, "apply_rope", counting)
    return calls


@contextmanager
def torchtitans_rope(family):
    """torchtitan's own rotate function in place of the switch's (the record is kept)."""
    mod = _module(family)
    ours = mod.apply_rotary_emb
    mod.apply_rotary_emb = ours.__wrapped__
    try:
        yield
    finally:
        mod.apply_rotary_emb = ours


def _run(model, tokens, positions=None):
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions=positions)
    (logits.float().square().mean()).backward()
    return logits.detach(), {n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()
                             if p.grad is not None}


def _assert_same(got, want, tol=2e-5):
    (lg, gg), (lw, gw) = got, want
    assert rel_err(lg, lw) < tol
    assert gg.keys() == gw.keys() and gg
    for name in gw:
        assert rel_err(gg[name], gw[name]) < tol, name


# --------------------------------------------------------------------------------------
# Params: the tables of torchtitan's precompute functions, bit for bit
# --------------------------------------------------------------------------------------
def _our_table(family, params, rows):
    t = torch.arange(rows, dtype=torch.float32)
    angles = torch.outer(t, params.inv_freq).float()
    if family == "qwen3":
        angles = torch.cat([angles, angles], dim=-1)
        return torch.cat([angles.cos(), angles.sin()], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


@pytest.mark.parametrize("family,case", [
    ("llama3", dict()),
    ("llama3", dict(rope_theta=10000, rope_scaling_args=dict(scaling_factor=32, original_max_position_embeddings=64))),
    ("qwen3", dict()),
    ("qwen3", dict(head_dim=64, rope_theta=10000)),
    ("deepseek_v3", dict()),  # YaRN, factor 40, mscale 0.7
    ("deepseek_v3", dict(max_seq_len=16384, original_seq_len=4096)),
    ("deepseek_v3", dict(max_seq_len=512, original_seq_len=4096)),  # no YaRN
    ("deepseek_v3", dict(qk_rope_head_dim=32, rope_factor=4, mscale=1.0, beta_fast=16, beta_slow=2)),
])
def test_params_reproduce_torchtitans_table(family, case):
    from torchtitan.models.llama3.model.args import RoPEScalingArgs

    args = _args(family)
    for k, v in case.items():
        setattr(args, k, RoPEScalingArgs(**v) if k == "rope_scaling_args" else v)
    mod = _module(family)
    # as the trainer builds with --training.dtype bfloat16; the params are host math all the same
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = _model_cls(family)(args)
    finally:
        torch.set_default_dtype(dtype)
    table = _table(model)
    params = tt.params_for(family, table)
    assert params is not None and params.inv_freq.device.type == "cpu"
    if family == "qwen3":
        want = mod.precompute_rope_cache.__wrapped__(args.head_dim, args.max_seq_len, args.rope_theta)
    elif family == "llama3":
        want = mod.precompute_freqs_cis.__wrapped__(args.dim // args.n_heads, args.max_seq_len, args.rope_theta,
                                                    args.rope_scaling_args)
    else:
        want = mod.precompute_freqs_cis.__wrapped__(args)
    assert table.shape == want.shape
    assert torch.equal(_our_table(family, params, want.shape[0]), want)
    assert params.cos_sin_scale == 1.0
    if family == "deepseek_v3":
        # torchtitan folds YaRN's mscale**2 into the attention's softmax scale
        attn = model.layers["0"].attention
        assert attn.softmax_scale == pytest.approx(attn.qk_head_dim ** -0.5 * params.softmax_scale_factor, rel=1e-12)
        assert params.rope_type == ("yarn" if args.max_seq_len > args.original_seq_len else "default")


# --------------------------------------------------------------------------------------
# Models: logits and gradients equal torchtitan's own rope
# --------------------------------------------------------------------------------------
# Positions as torchtitan hands them under context parallelism: each rank's shard, one row
# for the whole batch (int32, as torchtitan makes them), or one row per sequence.
CP_POSITIONS = torch.tensor([[0, 1, 62, 63]], dtype=torch.int32)
CASES = {
    "llama3": ("llama3", (1, 4), None),
    "llama3-positions": ("llama3", (2, 2), torch.tensor([[3, 4], [62, 7]])),
    "qwen3": ("qwen3", (1, 4), None),
    "deepseek_v3": ("deepseek_v3", (1, 4), None),  # with positions: compiled, below
}


@pytest.mark.parametrize("case", CASES)
def test_model_matches_torchtitan(case, rope_calls):
    family, shape, positions = CASES[case]
    model = _build(family)
    tokens = torch.randint(0, model.model_args.vocab_size, shape, generator=torch.Generator().manual_seed(1))
    got = _run(model, tokens, positions)
    assert len(rope_calls) == (2 if family == "deepseek_v3" else 1)  # deepseek: q_pe and k_pe apart
    with torchtitans_rope(family):
        want = _run(model, tokens, positions)
    assert len(rope_calls) == (2 if family == "deepseek_v3" else 1)
    _assert_same(got, want)


@pytest.mark.parametrize("family,positions", [("llama3", None), ("deepseek_v3", CP_POSITIONS)],
                         ids=["llama3", "deepseek_v3-positions"])
def test_compiled_blocks_match_torchtitan(family, positions, rope_calls):
    """``--compile.enable``: torchtitan compiles each block, ``fullgraph=True`` (Inductor
    on a GPU; ``aot_eager`` here, where Inductor would need a C++ compiler)."""
    model = _build(family)
    tokens = torch.randint(0, model.model_args.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    with torchtitans_rope(family):
        want = _run(model, tokens, positions)
    backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    torch._dynamo.reset()
    try:
        for name, block in list(model.layers.named_children()):
            model.layers.register_module(name, torch.compile(block, backend=backend, fullgraph=True))
        got = _run(model, tokens, positions)
    finally:
        torch._dynamo.reset()
    assert rope_calls  # traced through the switch
    _assert_same(got, want)


def test_compiled_checkpointed_blocks_with_verify_on():
    """torchtitan's debug runs: activation checkpointing around each compiled block, with
    step 1's verification on. A compiled call must not touch the switch's Python state
    (dynamo refuses a side effect inside the checkpoint HOP: seen on the device). The op
    must be in the compiled graphs (a recording backend; a counting spy would itself be
    such a side effect), and no compiled call is checked or counted."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = _build("llama3")
    tokens = torch.randint(0, model.model_args.vocab_size, (1, 4), generator=torch.Generator().manual_seed(4))
    with torchtitans_rope("llama3"):
        want = _run(model, tokens, None)
    code = []

    def recording(gm, example_inputs):
        code.extend(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    tt.verify(True)
    try:
        for name, block in list(model.layers.named_children()):
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
            model.layers.register_module(name, torch.compile(wrapped, backend=recording, fullgraph=True))
        got = _run(model, tokens, None)
    finally:
        report = tt.verify(False)
        torch._dynamo.reset()
    assert any("yarn_triton.rope" in c for c in code)  # traced through the switch
    assert report["calls"] == 0
    _assert_same(got, want)


# --------------------------------------------------------------------------------------
# The switch itself
# --------------------------------------------------------------------------------------
def test_enable_disable_restore_torchtitans_functions():
    mods = [_module(f) for f in FAMILIES]
    assert tt.is_enabled()
    switched = [(m.precompute_freqs_cis if hasattr(m, "precompute_freqs_cis") else m.precompute_rope_cache,
                 m.apply_rotary_emb) for m in mods]
    assert all(hasattr(f, "__wrapped__") for pair in switched for f in pair)
    tt.disable()
    assert not tt.is_enabled()
    for m, pair in zip(mods, switched):
        assert m.apply_rotary_emb is pair[1].__wrapped__
        pre = m.precompute_freqs_cis if hasattr(m, "precompute_freqs_cis") else m.precompute_rope_cache
        assert pre is pair[0].__wrapped__
    tt.disable()  # twice is fine
    tt.enable()
    tt.enable(precise_angles=False)  # again: only the option changes
    assert tt._OPTIONS["precise_angles"] is False and len(tt._INSTALLED) == 2 * len(FAMILIES)
    with pytest.raises(TypeError):
        tt.enable(precise_angles=1)


def test_other_torchtitan_version_is_refused(monkeypatch):
    tt.disable()
    mod = _module("qwen3")
    monkeypatch.setattr(mod, "apply_rotary_emb", lambda xq, xk, rope_cache: (xq, xk))
    with pytest.raises(RuntimeError, match="qwen3.*apply_rotary_emb takes"):
        tt.enable()
    assert not tt.is_enabled()
    assert not hasattr(_module("llama3").apply_rotary_emb, "__wrapped__")  # nothing half switched
    monkeypatch.delattr(mod, "apply_rotary_emb")
    with pytest.raises(RuntimeError, match="has no function apply_rotary_emb"):
        tt.enable()
    monkeypatch.setitem(sys.modules, "torchtitan.models.qwen3.model.model", None)  # a torchtitan without it
    with pytest.raises(ImportError, match="needs torchtitan 0.2.2.*importing torchtitan.models.qwen3.model.model"):
        tt.enable()
    assert not tt.is_enabled()


def test_model_built_before_enable_runs_torchtitans_rope(rope_calls):
    tt.disable()
    model = _build("llama3")
    tt.enable()
    tokens = torch.randint(0, 2048, (1, 4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model(tokens)
    assert not rope_calls
    assert any("torchtitan's own rope runs" in str(w.message) for w in seen)


def test_two_models_one_shape_different_params_are_refused():
    a = _args("llama3")
    b = copy.deepcopy(a)
    b.rope_theta = 10000
    with torch.device("meta"):
        m1 = _llama3.Transformer(a)
        _llama3.Transformer(copy.deepcopy(a))  # equal params: fine
        assert tt.params_for("llama3", m1.freqs_cis) is not None
        _llama3.Transformer(b)
    with pytest.raises(RuntimeError, match="cannot tell them apart"):
        tt.params_for("llama3", m1.freqs_cis)


@pytest.mark.parametrize("family,positions", [("llama3", torch.tensor([[3, 4, 5, 6], [62, 7, 0, 1]])),
                                              ("deepseek_v3", None)], ids=["llama3-positions", "deepseek_v3"])
def test_verify_checks_every_call_against_torchtitans(family, positions, rope_calls):
    """What the device's loss-curve runs do on step 1: each switched call also runs
    torchtitan's own function and compares (the positions the kernel derives included)."""
    model = _build(family)
    tokens = torch.randint(0, model.model_args.vocab_size, (2, 4), generator=torch.Generator().manual_seed(5))
    tt.verify(True)
    try:
        model(tokens, positions=positions)
    finally:
        report = tt.verify(False)
    assert report["calls"] == len(rope_calls) == (2 if family == "deepseek_v3" else 1)
    # float32 rounding apart at most (the kernel under the interpreter differs in the last
    # bits; the PyTorch path of CPU tensors may match torchtitan's complex product exactly)
    assert 0 <= report["max_rel_err"] < 1e-5
    model(tokens, positions=positions)  # off again: nothing more counted
    assert tt.verify(False)["calls"] == report["calls"]


def test_verify_raises_on_a_wrong_rotation(monkeypatch):
    """A switch that rotated wrongly (here: positions shifted by one) is caught."""
    model = _build("llama3")
    real = tt.apply_rope
    monkeypatch.setattr(tt, "apply_rope", lambda q, k, pos, *a, **kw: real(
        q, k, torch.arange(1, q.shape[1] + 1).expand(q.shape[0], -1) if pos is None else pos + 1, *a, **kw))
    tt.verify(True)
    try:
        with pytest.raises(RuntimeError, match="differs from torchtitan's apply_rotary_emb: relative error"):
            model(torch.randint(0, 2048, (1, 4)))
    finally:
        tt.verify(False)
