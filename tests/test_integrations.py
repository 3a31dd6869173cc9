"""End-to-end tests of ``yarn_triton.integrations.transformers`` against the installed
transformers: tiny randomly initialised models of each supported family give the same
logits and the same greedy generations with and without the switch, and switching back
restores the original behaviour exactly.

Device: CUDA (native kernel) when a GPU is present; otherwise the CPU, where the op runs
the kernel under ``TRITON_INTERPRET=1`` and the PyTorch reference path without it.
"""

import inspect
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import yarn_triton.op as yt_op  # noqa: E402
from yarn_triton import RopeParams  # noqa: E402
from yarn_triton.integrations.transformers import (  # noqa: E402
    ROPE_FUNCTIONS,
    SUPPORTED_MODEL_TYPES,
    FusedRopePositions,
    FusedRotaryEmbedding,
    disable_fused_rope,
    enable_fused_rope,
    fused_rope,
    is_fused_rope_enabled,
    plain_function,
)
from yarn_triton.kernels.rope_kernel import INTERPRETED  # noqa: E402

from conftest import assert_modeling_files_unpatched, rel_err  # noqa: E402

DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRETED) else "cpu"
VOCAB = 128

# ------------------------------------------------------------------------------------
# Tiny models
# ------------------------------------------------------------------------------------
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # Larger than the default 0.02 so the logits depend strongly on the rope: a wrong
    # pairing of channels moves them by O(1), not O(1e-2).
    initializer_range=0.2,
    tie_word_embeddings=False,
)
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, rope_theta=10000.0)
_MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    moe_intermediate_size=32,
    n_shared_experts=1,
    num_experts_per_tok=2,
    # Dense layers only: MoE routing is a discontinuous function of the activations, and
    # has nothing to do with rope.
    first_k_dense_replace=2,
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3", "deepseek_v3_neox"]

# Which rope function of its modeling file each family's attention calls, and our layout.
USED_FUNCTION = {
    "llama": "apply_rotary_pos_emb",
    "mistral": "apply_rotary_pos_emb",
    "qwen2": "apply_rotary_pos_emb",
    "qwen3": "apply_rotary_pos_emb",
    "deepseek_v2": "apply_rotary_emb",
    "deepseek_v3": "apply_rotary_pos_emb_interleave",
    "deepseek_v3_neox": "apply_rotary_pos_emb",
}
EXPECTED_LAYOUT = {
    "apply_rotary_pos_emb": "neox",
    "apply_rotary_pos_emb_interleave": "deepseek",
    "apply_rotary_emb": "interleaved",
}


def make_config(family: str, **overrides):
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        kw = dict(_COMMON, rope_parameters=dict(_YARN))
        if family == "qwen3":
            kw["head_dim"] = 24  # differs from hidden_size // heads, as Qwen3 allows
        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config,
        }[family]
    elif family == "deepseek_v2":
        kw = dict(
            _COMMON, **_MLA,
            q_lora_rank=None,
            n_routed_experts=4,
            rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8),
        )
        cls = transformers.DeepseekV2Config
    elif family in ("deepseek_v3", "deepseek_v3_neox"):
        kw = dict(
            _COMMON, **_MLA,
            q_lora_rank=32,
            n_routed_experts=4,
            n_group=1,
            topk_group=1,
            rope_interleave=family == "deepseek_v3",
            rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8),
        )
        cls = transformers.DeepseekV3Config
    else:  # pragma: no cover
        raise ValueError(family)
    kw.update(overrides)
    return cls(**kw)


def make_model(family: str, dtype=torch.float32, seed: int = 0, attn="sdpa", **overrides):
    cfg = make_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.to(device=DEVICE, dtype=dtype).eval()


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits.float()


def modeling_module(model):
    return sys.modules[type(model.model).__module__]


@pytest.fixture(autouse=True)
def _nothing_left_switched():
    """Every test must leave transformers' modeling functions as it found them."""
    yield
    assert_modeling_files_unpatched()


# ------------------------------------------------------------------------------------
# The private details the switch relies on, checked against the installed transformers
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_structure_is_as_expected(family):
    """If this fails, transformers changed a detail the switch relies on (see the module
    docstring of yarn_triton.integrations.transformers)."""
    model = make_model(family)
    base = model.model
    assert model.config.model_type in SUPPORTED_MODEL_TYPES
    # 1. one model-level rotary embedding, called as rotary_emb(hidden_states, position_ids)
    assert isinstance(base._modules.get("rotary_emb"), torch.nn.Module)
    assert "rotary_emb" in inspect.unwrap(type(base).forward).__code__.co_names
    # 2. the attention forward calls the module-level rope function by name
    mod = modeling_module(model)
    attn = base.layers[0].self_attn
    attn_names = set(inspect.unwrap(type(attn).forward).__code__.co_names) & set(ROPE_FUNCTIONS)
    assert USED_FUNCTION[family] in attn_names
    for name in attn_names:
        fn = plain_function(getattr(mod, name))  # (through a hub-kernels wrapper, transformers >= 5.25)
        assert inspect.isfunction(fn), f"{name}: {type(fn)} hides its function"
        params = list(inspect.signature(fn).parameters)
        assert len(params) >= 3  # (q, k, cos[, sin, ...]) or (xq, xk, freqs_cis)
        assert ROPE_FUNCTIONS[name] == EXPECTED_LAYOUT[name]
    # 3. the model's softmax scale is head_dim**-0.5 times our softmax_scale_factor
    params = RopeParams.from_config(model.config)
    head_dim = getattr(attn, "qk_head_dim", None) or attn.head_dim
    assert attn.scaling == pytest.approx(head_dim**-0.5 * params.softmax_scale_factor, rel=1e-12)
    # 4. our params reproduce the model's own inv_freq and attention_scaling
    rot = base.rotary_emb
    torch.testing.assert_close(params.inv_freq, rot.inv_freq.float().cpu(), rtol=1e-6, atol=0)
    assert params.cos_sin_scale == pytest.approx(rot.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_function_matches_transformers(family, gen):
    """The dispatcher gives, channel for channel, what the modeling file's own function
    gives (logits alone cannot see a consistent permutation of q and k channels), and
    rotates the projection views in place."""
    model = make_model(family)
    mod = modeling_module(model)
    name = USED_FUNCTION[family]
    original = getattr(mod, name)
    attn = model.model.layers[0].self_attn
    heads = model.config.num_attention_heads
    if family.startswith("deepseek"):
        d, k_heads = attn.qk_rope_head_dim, 1
    else:
        d, k_heads = attn.head_dim, model.config.num_key_value_heads
    b, s = 2, 6
    pos = (torch.arange(s) + torch.tensor([[0], [37]])).to(DEVICE)  # per-row offsets
    q_proj = torch.randn(b, s, heads, d + 6, generator=gen).to(DEVICE)
    k_proj = torch.randn(b, s, k_heads, d + 4, generator=gen).to(DEVICE)

    def views(qp, kp):  # what attention passes: [B, H, S, D] transposed slices of projections
        # (even widths and offsets: DeepSeek-V2's view_as_complex needs even strides)
        return qp[..., :d].transpose(1, 2), kp[..., 4:].transpose(1, 2)

    x = torch.zeros(b, s, 8, device=DEVICE)
    pe = model.model.rotary_emb(x, pos)
    args = (pe,) if name == "apply_rotary_emb" else tuple(pe)
    want_q, want_k = original(*views(q_proj, k_proj), *args)

    enable_fused_rope(model)
    try:
        handle = model.model.rotary_emb(x, pos)
        assert isinstance(handle, FusedRopePositions)
        fn = getattr(mod, name)
        assert fn is not original and fn.original is original and fn.layout == EXPECTED_LAYOUT[name]
        hargs = (handle,) if name == "apply_rotary_emb" else tuple(handle)
        qp, kp = q_proj.clone(), k_proj.clone()
        qv, kv = views(qp, kp)
        with torch.no_grad():
            got_q, got_k = fn(qv, kv, *hargs)
        assert got_q is qv and got_k is kv  # in place, on the views
        assert rel_err(got_q, want_q) < 1e-5 and rel_err(got_k, want_k) < 1e-5
        # channels outside the views are untouched
        assert torch.equal(qp[..., d:], q_proj[..., d:]) and torch.equal(kp[..., :4], k_proj[..., :4])
        # and the dispatcher leaves calls with real cos/sin to the original
        fall_q, fall_k = fn(*views(q_proj, k_proj), *args)
        assert torch.equal(fall_q, want_q) and torch.equal(fall_k, want_k)
    finally:
        disable_fused_rope(model)


# ------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_fp32_and_switch_back(family, gen, monkeypatch):
    model = make_model(family)
    # Row 1 runs at positions past max_position_embeddings (256). Few tokens: under
    # TRITON_INTERPRET=1 every token costs a few ms of interpreted kernel.
    ids = torch.randint(0, VOCAB, (2, 8), generator=gen).to(DEVICE)
    pos = (torch.arange(8) + torch.tensor([[0], [250]])).to(DEVICE)
    ref = logits(model, ids, position_ids=pos)
    state = model.state_dict()
    rotary = model.model.rotary_emb
    originals = {n: getattr(modeling_module(model), n) for n in ROPE_FUNCTIONS if hasattr(modeling_module(model), n)}

    calls = []
    real = yt_op.apply_rope_

    def counting(*a, **k):
        calls.append(k.get("layout"))
        return real(*a, **k)

    monkeypatch.setattr(yt_op, "apply_rope_", counting)
    real_norm = yt_op.apply_qk_norm_rope_  # Qwen3: q/k norm and rope in one launch

    def counting_norm(*a, **k):
        calls.append(k.get("layout"))
        return real_norm(*a, **k)

    monkeypatch.setattr(yt_op, "apply_qk_norm_rope_", counting_norm)
    enable_fused_rope(model)
    try:
        assert is_fused_rope_enabled(model)
        assert isinstance(model.model.rotary_emb, FusedRotaryEmbedding)
        assert model.state_dict().keys() == state.keys()
        out = logits(model, ids, position_ids=pos)
        assert calls == [EXPECTED_LAYOUT[USED_FUNCTION[family]]] * 2  # one launch per layer
        assert rel_err(out, ref) < 1e-5
        assert enable_fused_rope(model) is model  # idempotent
    finally:  # a failure must not leave the modeling file switched for later tests
        disable_fused_rope(model)
    assert not is_fused_rope_enabled(model)
    assert model.model.rotary_emb is rotary
    for n, fn in originals.items():
        assert getattr(modeling_module(model), n) is fn
    assert torch.equal(logits(model, ids, position_ids=pos), ref)
    assert disable_fused_rope(model) is model  # idempotent


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_bf16(family, gen):
    """bf16: the fused path (float32 math, one rounding) is no further from the float32
    model than transformers' own bf16 rope (bf16 cos/sin and products) is."""
    ids = torch.randint(0, VOCAB, (2, 8), generator=gen).to(DEVICE)
    truth = logits(make_model(family), ids)
    model = make_model(family, dtype=torch.bfloat16)
    ref = logits(model, ids)
    with fused_rope(model):
        out = logits(model, ids)
    assert not is_fused_rope_enabled(model)
    e_ref, e_out = rel_err(ref, truth), rel_err(out, truth)
    assert e_out < 1.5 * e_ref + 1e-3, (e_out, e_ref)
    assert rel_err(out, ref) < 5e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_greedy_same_tokens(family):
    model = make_model(family)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding: per-row positions
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        enable_fused_rope(model)
        try:
            got = model.generate(ids, **kw)
        finally:
            disable_fused_rope(model)
        again = model.generate(ids, **kw)
    assert got.shape == want.shape == (2, 10)
    assert torch.equal(got, want)
    assert torch.equal(again, want)


@pytest.mark.parametrize("family", ["llama", "deepseek_v2", "deepseek_v3"])
def test_training_path_gradients(family, gen):
    """With autograd recording, the differentiable out-of-place op runs; loss and
    gradients match the model's own rope."""
    ids = torch.randint(0, VOCAB, (2, 6), generator=gen).to(DEVICE)

    def loss_and_grads(model):
        model.train()
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    model = make_model(family)
    want_loss, want = loss_and_grads(model)
    enable_fused_rope(model)
    try:
        got_loss, got = loss_and_grads(model)
    finally:
        disable_fused_rope(model)
    assert got.keys() == want.keys()
    assert rel_err(got_loss, want_loss) < 1e-5
    flat_got = torch.cat([got[n].flatten() for n in want])
    flat_want = torch.cat([want[n].flatten() for n in want])
    assert rel_err(flat_got, flat_want) < 1e-4


def test_dynamic_ntk_follows_transformers_rule(gen):
    """Sequence-length dependent rope (dynamic NTK): the params follow transformers'
    grow-then-reset rule call by call, also through generate with a cache."""
    rp = dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0)
    model = make_model("llama", max_position_embeddings=8, rope_parameters=rp)
    twin = make_model("llama", max_position_embeddings=8, rope_parameters=rp)  # same weights
    enable_fused_rope(twin)
    try:
        for n in (12, 10, 4, 14):  # grow, shorter-but-long (keeps), short (resets), grow
            ids = torch.randint(0, VOCAB, (1, n), generator=gen).to(DEVICE)
            assert rel_err(logits(twin, ids), logits(model, ids)) < 1e-5, n
        ids = torch.randint(1, VOCAB, (1, 6), generator=gen).to(DEVICE)
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)  # crosses 8
        with torch.no_grad():
            assert torch.equal(twin.generate(ids, **kw), model.generate(ids, **kw))
    finally:
        disable_fused_rope(twin)


def test_two_models_and_unswitched_neighbours(gen):
    """The function swap is process-wide but only switched models see a change; it is
    undone when the last switched model is switched back."""
    a, b, c = make_model("llama"), make_model("llama"), make_model("llama", seed=1)
    ids = torch.randint(0, VOCAB, (1, 6), generator=gen).to(DEVICE)
    ref_a, ref_c = logits(a, ids), logits(c, ids)
    mod = modeling_module(a)
    original = mod.apply_rotary_pos_emb
    enable_fused_rope(a)
    enable_fused_rope(b)
    assert torch.equal(logits(c, ids), ref_c)  # not switched: the original function runs
    disable_fused_rope(a)
    assert mod.apply_rotary_pos_emb is not original  # b still switched
    assert rel_err(logits(b, ids), ref_a) < 1e-5
    disable_fused_rope(b)
    assert mod.apply_rotary_pos_emb is original


def test_refusals():
    model = make_model("llama")
    # params that do not reproduce the model's rope
    with pytest.raises(ValueError, match="inv_freq"):
        enable_fused_rope(model, RopeParams.default(16, 500.0))
    with pytest.raises(ValueError, match="inv_freq"):
        enable_fused_rope(model, RopeParams.default(16))  # yarn model, plain params
    assert not is_fused_rope_enabled(model)
    assert not hasattr(modeling_module(model).apply_rotary_pos_emb, "original")
    with pytest.raises(TypeError):
        enable_fused_rope("not a model")
    # a family without rotary_emb / outside the tested list
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32)
    )
    with pytest.raises(NotImplementedError, match="model_type"):
        enable_fused_rope(gpt2)
    with pytest.raises(NotImplementedError, match="rotary_emb"):
        enable_fused_rope(gpt2, strict=False)


def test_default_rope_eager_attention_and_model_to_after_switch(gen):
    """Plain (unscaled) rope, the eager attention backend, and moving/casting the model
    after switching."""
    model = make_model("qwen2", attn="eager", rope_parameters=dict(rope_type="default", rope_theta=1e6))
    ids = torch.randint(0, VOCAB, (1, 8), generator=gen).to(DEVICE)
    ref = logits(model, ids)
    enable_fused_rope(model)
    try:
        model.to(torch.float64).to(torch.float32)
        assert rel_err(logits(model, ids), ref) < 1e-5
    finally:
        disable_fused_rope(model)


def test_import_does_not_pull_transformers():
    code = (
        "import sys, yarn_triton, yarn_triton.integrations, yarn_triton.attention\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
