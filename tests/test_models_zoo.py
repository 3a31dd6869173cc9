"""Every supported model type of the transformers switch, end to end, on tiny random models.

The supported types are the rows of ``MODEL_SUPPORT`` in
``yarn_triton.integrations.transformers``; every test here iterates over that table, and
``RECIPES`` must hold a tiny config for each row (a type added to the table without a
recipe fails ``test_every_supported_type_has_a_recipe``). Per type:

* logits and hidden states match the unswitched model, with one row at positions past
  ``original_max_position_embeddings``, and none of transformers' rope functions (nor its
  rotary embeddings) runs while the model is switched;
* switching back restores the model bit for bit;
* greedy ``generate`` with a KV cache gives the same tokens;
* one ``torch.compile(fullgraph=True)`` forward per family has no graph break.

Types the installed transformers lacks are skipped. The multimodal-rope rows (``mrope`` set:
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) take 3-D position ids and are tested in
``test_models_mrope.py``, which holds their recipes. Device: CUDA (native kernel) when a GPU
is present; otherwise the CPU, where the kernel runs under ``TRITON_INTERPRET=1``.
"""

import contextlib
import functools
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch

transformers = pytest.importorskip("transformers")

from yarn_triton.integrations.transformers import (  # noqa: E402
    MODEL_SUPPORT,
    ROPE_FUNCTIONS,
    SUPPORTED_MODEL_TYPES,
    FusedRotaryEmbedding,
    disable_fused_rope,
    enable_fused_rope,
    is_fused_rope_enabled,
    supported_models_markdown,
)
from yarn_triton.kernels.rope_kernel import INTERPRETED  # noqa: E402

from conftest import assert_modeling_files_unpatched, rel_err  # noqa: E402

DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRETED) else "cpu"
VOCAB = 128
OMAX = 64  # original_max_position_embeddings of every tiny config
FAR = 100  # offset of the second row's positions: past OMAX

# ------------------------------------------------------------------------------------
# Tiny configs, one per supported type
# ------------------------------------------------------------------------------------
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    # Larger than the default 0.02 so the logits depend strongly on the rope.
    initializer_range=0.2,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=OMAX, rope_theta=10000.0)
_LLAMA4_SCALE = dict(beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)
_MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    moe_intermediate_size=32,
    n_shared_experts=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
)
_INDEXER = dict(index_topk=4, index_head_dim=16, index_n_heads=2)


@dataclass(frozen=True)
class Recipe:
    """A tiny model of one type: its config class, model class and config arguments."""

    config_cls: str
    model_cls: str  # a *ForCausalLM (or *ForConditionalGeneration), None-able lm
    kwargs: Callable[[], dict]
    seq: int = 12  # tokens per row in the logits test
    setup: Optional[Callable[[torch.nn.Module], None]] = None  # after init, before use


def _old(family):
    """A type also covered in depth by test_integrations.py: same tiny config."""
    from test_integrations import make_config

    return lambda: make_config(family).to_dict()


def _randomise_alpha(model):
    """Mistral-Large-4 learns a per-frequency log scale ``alpha`` (zero at init); give it
    values so the test sees whether the fused rope follows it."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        a = getattr(m, "alpha", None)
        if isinstance(a, torch.nn.Parameter):
            with torch.no_grad():
                a.copy_(0.3 * torch.randn(a.shape, generator=g))


def _v4_kwargs():
    return dict(
        _COMMON,
        num_hidden_layers=3,
        num_key_value_heads=1,
        head_dim=32,
        partial_rotary_factor=0.5,
        q_lora_rank=32,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        o_groups=2,
        o_lora_rank=16,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=4,
        sliding_window=8,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        rope_parameters=dict(_YARN),
        rope_theta=10000.0,
        compress_rope_theta=160000.0,
    )


def _ml4_text_kwargs():
    return dict(
        _COMMON, **_MLA, **_INDEXER,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        kv_source_layers=[0, 0, 2],  # layer 1 reuses layer 0's rotated latent KV: q alone rotates
        no_rope_layers=[1, 1, 0],  # layer 2 is NoPE
        indexer_types=["full", "shared", "full"],
        rope_parameters=dict(_YARN, beta_fast=32.0, beta_slow=1.0, attention_factor=1.0),
    )


def _ml4_kwargs():
    return dict(
        text_config=_ml4_text_kwargs(),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, patch_size=8, image_size=16),
        tie_word_embeddings=False,
    )


RECIPES: Dict[str, Recipe] = {
    "llama": Recipe("LlamaConfig", "LlamaForCausalLM", _old("llama")),
    "mistral": Recipe("MistralConfig", "MistralForCausalLM", _old("mistral")),
    "qwen2": Recipe("Qwen2Config", "Qwen2ForCausalLM", _old("qwen2")),
    "qwen3": Recipe("Qwen3Config", "Qwen3ForCausalLM", _old("qwen3")),
    "deepseek_v2": Recipe("DeepseekV2Config", "DeepseekV2ForCausalLM", _old("deepseek_v2")),
    "deepseek_v3": Recipe("DeepseekV3Config", "DeepseekV3ForCausalLM", _old("deepseek_v3")),
    "ministral3": Recipe(
        "Ministral3Config", "Ministral3ForCausalLM",
        lambda: dict(_COMMON, head_dim=16, rope_parameters=dict(_YARN, **_LLAMA4_SCALE)),
    ),
    "phi3": Recipe(
        "Phi3Config", "Phi3ForCausalLM",
        lambda: dict(
            _COMMON, original_max_position_embeddings=OMAX,
            rope_parameters=dict(
                rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                short_factor=[1.0 + 0.1 * i for i in range(6)], long_factor=[1.5 + 0.5 * i for i in range(6)],
            ),
        ),
    ),
    "qwen3_moe": Recipe(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        lambda: dict(_COMMON, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                     rope_parameters=dict(_YARN)),
    ),
    "gpt_oss": Recipe(
        "GptOssConfig", "GptOssForCausalLM",
        lambda: dict(
            _COMMON, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
            max_position_embeddings=32 * OMAX,
            rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                 original_max_position_embeddings=OMAX, rope_theta=150000.0),
        ),
    ),
    "minimax_m2": Recipe(
        "MiniMaxM2Config", "MiniMaxM2ForCausalLM",
        # rotary_dim (the released checkpoints' field) and the factor transformers < 5.2x reads
        lambda: dict(_COMMON, head_dim=16, rotary_dim=8, num_local_experts=4, num_experts_per_tok=2,
                     rope_parameters=dict(_YARN, partial_rotary_factor=0.5)),
    ),
    "glm4_moe_lite": Recipe(
        "Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
        lambda: dict(_COMMON, **_MLA, q_lora_rank=32, first_k_dense_replace=1,
                     rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8)),
    ),
    "deepseek_v32": Recipe(
        "DeepseekV32Config", "DeepseekV32ForCausalLM",
        lambda: dict(_COMMON, **_MLA, **_INDEXER, q_lora_rank=32, first_k_dense_replace=1,
                     rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=0.8)),
    ),
    "mistral_large4_text": Recipe(
        "MistralLarge4Config", "MistralLarge4ForConditionalGeneration", _ml4_kwargs, setup=_randomise_alpha,
    ),
    "mistral4": Recipe(
        "Mistral4Config", "Mistral4ForCausalLM",
        lambda: dict(_COMMON, **_MLA, q_lora_rank=32, first_k_dense_replace=1,
                     rope_parameters=dict(_YARN, **_LLAMA4_SCALE)),
    ),
    # 16 tokens: both compressors (rates 4 and 8) emit entries, and the indexer scores them.
    "deepseek_v4": Recipe("DeepseekV4Config", "DeepseekV4ForCausalLM", _v4_kwargs, seq=16),
}

#: The rows tested here; the M-RoPE rows have their own file (test_models_mrope.py).
ZOO_TYPES = tuple(t for t, s in MODEL_SUPPORT.items() if s.mrope is None)

# One type per family for the torch.compile test.
COMPILE_REPRESENTATIVE = {"dense": "ministral3", "moe": "qwen3_moe", "mla": "deepseek_v32",
                          "deepseek_v4": "deepseek_v4"}


def make_model(model_type: str, dtype=torch.float32, seed: int = 0):
    """The tiny model of ``model_type`` (skips when the installed transformers lacks it)."""
    recipe = RECIPES[model_type]
    config_cls = getattr(transformers, recipe.config_cls, None)
    model_cls = getattr(transformers, recipe.model_cls, None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {recipe.config_cls} / {recipe.model_cls}")
    kwargs = recipe.kwargs()
    for k in ("model_type", "transformers_version", "architectures"):
        kwargs.pop(k, None)
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    if hasattr(config, "get_text_config"):
        config.get_text_config()._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    if recipe.setup is not None:
        recipe.setup(model)
    return model.to(device=DEVICE, dtype=dtype).eval()


def inputs(model_type: str, batch: int = 2):
    """Token ids and positions: row 0 from 0, the others from FAR (past OMAX)."""
    s = RECIPES[model_type].seq
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (batch, s), generator=g)
    pos = torch.arange(s) + torch.tensor([0] + [FAR] * (batch - 1))[:, None]
    return ids.to(DEVICE), pos.to(DEVICE)


def forward(model, ids, pos):
    """(logits, last hidden state), float32."""
    with torch.no_grad():
        out = model(ids, position_ids=pos, output_hidden_states=True)
    return out.logits.float(), out.hidden_states[-1].float()


def _patched_functions(model, support):
    """``(module, name)`` of every function the switch stands in for in ``model``'s
    modeling files."""
    names = set(ROPE_FUNCTIONS) | set(support.functions)
    if support.fuse_q_scale:
        names.add("get_llama_4_attn_scale")
    found = {}
    for m in model.modules():
        fwd = inspect.unwrap(type(m).forward)
        code, g = getattr(fwd, "__code__", None), getattr(fwd, "__globals__", None)
        if code is None or g is None or "__name__" not in g:
            continue
        for n in names & set(code.co_names):
            if callable(g.get(n)):
                found[(g["__name__"], n)] = sys.modules[g["__name__"]]
    return found


@contextlib.contextmanager
def transformers_rope_forbidden(model, support):
    """Inside: transformers' rope functions (and ``get_llama_4_attn_scale`` where the
    switch takes the query scale over) and rotary-embedding forwards raise. Enable the
    switch inside it to prove a switched model never reaches them."""
    saved, classes = [], {}
    for (modname, name), mod in _patched_functions(model, support).items():
        original = getattr(mod, name)

        @functools.wraps(original)
        def forbidden(*a, _where=f"{modname}.{name}", **k):
            raise AssertionError(f"{_where} ran while the model was switched")

        saved.append((mod, name, original, forbidden))
        setattr(mod, name, forbidden)
    for m in model.modules():
        if m._modules.get("rotary_emb") is not None:
            cls = type(m.rotary_emb)
            classes.setdefault(cls, cls.forward)

    def rotary_forbidden(self, *a, **k):
        raise AssertionError(f"{type(self).__name__}.forward ran while the model was switched")

    for cls in classes:
        cls.forward = rotary_forbidden
    try:
        yield [(mod, name, forbidden) for mod, name, _, forbidden in saved]
    finally:
        for cls, fwd in classes.items():
            cls.forward = fwd
        for mod, name, original, _ in saved:
            setattr(mod, name, original)


@pytest.fixture(autouse=True)
def _nothing_left_switched():
    """Every test must leave transformers' modeling files as it found them."""
    yield
    assert_modeling_files_unpatched()


def _support(model_type):
    return MODEL_SUPPORT[model_type]


def _xfail_while_the_parser_misreads(model_type, model):
    """Mistral-4's config sets partial_rotary_factor = qk_rope_head_dim / head_dim with
    head_dim = qk_nope_head_dim + qk_rope_head_dim; a config parser that multiplies the
    factor by qk_rope_head_dim gets too few frequencies, and the switch (rightly) refuses.
    Expected to fail only while ``RopeParams.from_config`` still does that."""
    if model_type != "mistral4":
        return
    from yarn_triton import RopeParams

    ours = RopeParams.from_config(model.config).inv_freq.shape
    theirs = model.model.rotary_emb.inv_freq.shape
    if ours != theirs:
        pytest.xfail(f"RopeParams.from_config reads mistral4's rope dim wrong ({ours} vs the model's {theirs})")


# ------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------
def test_every_supported_type_has_a_recipe():
    assert SUPPORTED_MODEL_TYPES == tuple(MODEL_SUPPORT)
    assert set(RECIPES) == set(ZOO_TYPES)
    assert set(COMPILE_REPRESENTATIVE) == {s.family for s in MODEL_SUPPORT.values()}
    for family, t in COMPILE_REPRESENTATIVE.items():
        assert MODEL_SUPPORT[t].family == family


def test_docs_table_is_generated_from_the_table():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "models.md")
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    assert supported_models_markdown() in doc, "docs/models.md is stale: paste supported_models_markdown()"


# ------------------------------------------------------------------------------------
# End to end, per type
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ZOO_TYPES)
def test_outputs_match_and_switch_back(model_type):
    model = make_model(model_type)
    _xfail_while_the_parser_misreads(model_type, model)
    support = _support(model_type)
    ids, pos = inputs(model_type)
    ref_logits, ref_hidden = forward(model, ids, pos)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rotaries = {id(m): m.rotary_emb for m in model.modules() if m._modules.get("rotary_emb") is not None}
    assert rotaries

    with transformers_rope_forbidden(model, support) as forbidden:
        enable_fused_rope(model)  # strict
        assert is_fused_rope_enabled(model)
        switched = [m.rotary_emb for m in model.modules() if m._modules.get("rotary_emb") is not None]
        assert len(switched) == len(rotaries) and all(isinstance(r, FusedRotaryEmbedding) for r in switched)
        logits, hidden = forward(model, ids, pos)
        disable_fused_rope(model)
        for mod, name, fn in forbidden:  # the switch put back what it found
            assert getattr(mod, name) is fn, f"{mod.__name__}.{name} not restored"
    assert rel_err(hidden, ref_hidden) < 1e-5, rel_err(hidden, ref_hidden)
    assert rel_err(logits, ref_logits) < 1e-5, rel_err(logits, ref_logits)
    # far row really is far, and differs from the near one
    assert int(pos[1, 0]) > OMAX

    # back, bit for bit: same modules, same tensors, same outputs
    assert not is_fused_rope_enabled(model)
    assert {id(m): m.rotary_emb for m in model.modules() if m._modules.get("rotary_emb") is not None} == rotaries
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    again_logits, again_hidden = forward(model, ids, pos)
    assert torch.equal(again_logits, ref_logits) and torch.equal(again_hidden, ref_hidden)


@pytest.mark.parametrize("model_type", ZOO_TYPES)
def test_generate_greedy_same_tokens(model_type):
    model = make_model(model_type)
    _xfail_while_the_parser_misreads(model_type, model)
    n = 13 if model_type == "deepseek_v4" else 6  # V4: a compressor window closes while decoding
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, n), generator=g)
    mask = torch.ones_like(ids)
    if model_type != "deepseek_v4":  # V4's compressors ignore the padding mask
        ids[1, :2], mask[1, :2] = 0, 0  # left padding: per-row positions
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        enable_fused_rope(model)
        try:
            got = model.generate(ids, **kw)
        finally:
            disable_fused_rope(model)
    assert got.shape == want.shape == (2, n + 4)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", sorted(COMPILE_REPRESENTATIVE))
def test_compile_fullgraph_no_graph_break(family):
    """One compiled forward per family: fullgraph=True raises on any graph break. The
    aot_eager backend traces and functionalizes (the in-place rope custom op included)
    without code generation, which keeps this test fast on the CPU."""
    model_type = COMPILE_REPRESENTATIVE[family]
    model = make_model(model_type)
    ids, pos = inputs(model_type, batch=1)
    pos = pos + FAR  # past OMAX: the query scale of Ministral-3 is not 1 there
    enable_fused_rope(model)
    try:
        eager = forward(model, ids, pos)[0]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            out = compiled(ids, position_ids=pos).logits.float()
    finally:
        disable_fused_rope(model)
        torch._dynamo.reset()
    assert rel_err(out, eager) < 1e-5


# ------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------
def test_unsupported_type_is_refused_with_the_list():
    if not hasattr(transformers, "Olmo2ForCausalLM"):
        pytest.skip("needs transformers' Olmo2")
    cfg = transformers.Olmo2Config(**{k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"})
    model = transformers.Olmo2ForCausalLM(cfg).eval()
    with pytest.raises(NotImplementedError) as err:
        enable_fused_rope(model)
    msg = str(err.value)
    assert "model_type='olmo2'" in msg and "strict=False" in msg and "docs/models.md" in msg
    for t in SUPPORTED_MODEL_TYPES:
        assert t in msg
    assert not is_fused_rope_enabled(model)
    # same structure as Llama: strict=False switches it, and it matches
    ids, pos = inputs("llama")
    ref = forward(model, ids.cpu(), pos.cpu())[0]
    model.to(DEVICE)
    with torch.no_grad():
        enable_fused_rope(model, strict=False)
        try:
            out = forward(model, ids, pos)[0]
        finally:
            disable_fused_rope(model)
    assert rel_err(out, ref) < 1e-5


def test_mismatching_params_still_refused():
    from yarn_triton import RopeParams

    model = make_model("qwen3_moe")
    with pytest.raises(ValueError, match="inv_freq"):
        enable_fused_rope(model, RopeParams.default(16))
    assert not is_fused_rope_enabled(model)
    v4 = make_model("deepseek_v4")
    with pytest.raises(ValueError, match="per label"):
        enable_fused_rope(v4, RopeParams.default(16))
    assert not is_fused_rope_enabled(v4)


# ------------------------------------------------------------------------------------
# Learned frequency scale (Mistral-Large-4's alpha)
# ------------------------------------------------------------------------------------
def test_learned_alpha_is_followed():
    model = make_model("mistral_large4_text")
    ids, pos = inputs("mistral_large4_text", batch=1)
    enable_fused_rope(model)
    try:
        rotary = model.model.language_model.rotary_emb.original
        with torch.no_grad():
            rotary.alpha.mul_(-1.0)  # after switching: the next forward must see it
        got = forward(model, ids, pos)[0]
        model.train()
        with pytest.raises(RuntimeError, match="alpha"):
            model(ids, position_ids=pos)
        model.eval()
    finally:
        disable_fused_rope(model)
    assert rel_err(got, forward(model, ids, pos)[0]) < 1e-5


# ------------------------------------------------------------------------------------
# Llama-4 query scaling (Ministral-3): fused into the rope pass
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_query_scale_matches_transformers_rope_then_multiply(dtype):
    """The op's q_scale on transformers' [B, H, S, D] views against Ministral-3's
    apply_rotary_pos_emb followed by ``q * get_llama_4_attn_scale(...).to(q.dtype)``.

    Whole path: within the rope's own float32/bf16 differences (transformers forms float32
    angles and, in bf16, bf16 cos/sin and products). The scale alone, against our rotation
    followed by transformers' multiply: the factor is the same (rounded to q's dtype in
    both), but transformers rounds the rotated q and then the product, we round once, so
    the two are at most an ulp or two apart per element, not bit for bit."""
    from transformers.models.ministral3 import modeling_ministral3 as mm

    from yarn_triton import QueryScale, RopeParams, apply_rope_

    model = make_model("ministral3")
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 7, 16, generator=g).to(DEVICE, dtype)  # [B, H, S, D]
    k = torch.randn(2, 2, 7, 16, generator=g).to(DEVICE, dtype)
    pos = (torch.tensor([[0, 1, 63, 64, 65, 127, 128]]) + torch.tensor([[0], [5000]])).to(DEVICE)
    factor = mm.get_llama_4_attn_scale(pos, 0.1, OMAX).to(dtype)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(q, pos)
        want_q, want_k = mm.apply_rotary_pos_emb(q, k, cos, sin)
        want_q = want_q * factor
    p = RopeParams.from_config(model.config)
    got_q, got_k = q.clone(), k.clone()
    apply_rope_(got_q.transpose(1, 2), got_k.transpose(1, 2), pos, p, q_scale=QueryScale(0.1, OMAX))
    tol = 5e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got_q, want_q) < tol and rel_err(got_k, want_k) < tol, (rel_err(got_q, want_q),
                                                                          rel_err(got_k, want_k))
    # the scale alone: one rounding of the product instead of two
    rot_q = q.clone()
    apply_rope_(rot_q.transpose(1, 2), None, pos, p)
    two_roundings = rot_q * factor
    ulps = 2.0 ** (-22 if dtype == torch.float32 else -6)  # 2 ulp (the interpreter truncates bf16)
    size = two_roundings.float().abs()
    if dtype == torch.float32:
        # in fp32 the rotation's own rounding shows: on the GPU the scale is fused into the
        # rotation's products, and where a1*cos - a2*sin cancels, the two results differ by
        # ulps of the head's magnitude, not of the (small) element
        size = size.amax(-1, keepdim=True)
    assert ((got_q.float() - two_roundings.float()).abs() <= ulps * size).all()
    assert not torch.equal(factor, torch.ones_like(factor))  # positions past OMAX: the scale is not 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_scale_moves_into_the_rope_call(monkeypatch, dtype):
    """Switched: the rope call carries the query scale (one kernel pass scales q), the
    separate multiply helper is gone, transformers' ``get_llama_4_attn_scale`` never runs
    (the modeling file's multiply gets the neutral factor); an unswitched Ministral-3
    beside it still scales by itself. Logits match: float32 to 1e-5; bf16 no further from
    the float32 model than transformers' own bf16 path (one rounding instead of two)."""
    import yarn_triton.integrations.transformers as yt
    from yarn_triton.integrations.transformers import q_scale as yt_q_scale
    import yarn_triton.integrations.transformers.handle as yt_handle  # owns _rope (FusedRopePositions.rotate)
    from yarn_triton import QueryScale

    assert not hasattr(yt, "_scale_q_after_rope") and not hasattr(yt, "_llama4_query_factor")
    switched, plain = make_model("ministral3", dtype), make_model("ministral3", dtype)
    ids, pos = inputs("ministral3")
    ref = forward(plain, ids, pos)[0]
    calls = []
    real = yt_handle._rope
    monkeypatch.setattr(yt_handle, "_rope", lambda *a: calls.append(a[7]) or real(*a))
    with transformers_rope_forbidden(switched, _support("ministral3")):
        enable_fused_rope(switched)
        try:
            out = forward(switched, ids, pos)[0]
            assert calls == [QueryScale(0.1, OMAX)] * 2  # once per layer, in the rope call
            assert yt_q_scale._HANDOVER.positions is None  # handed over and consumed
        finally:
            disable_fused_rope(switched)
    assert torch.equal(forward(plain, ids, pos)[0], ref)
    if dtype == torch.float32:
        assert rel_err(out, ref) < 1e-5
    else:
        truth = forward(make_model("ministral3"), ids, pos)[0]
        e_ref, e_out = rel_err(ref, truth), rel_err(out, truth)
        assert e_out < 1.5 * e_ref + 1e-3, (e_out, e_ref)
        assert rel_err(out, ref) < 5e-2


def test_query_scale_under_autograd():
    """Training through the switch: the out-of-place op scales q and its gradient; the
    gradients of the projections match the unswitched model's."""
    switched, plain = make_model("ministral3"), make_model("ministral3")
    switched.train(), plain.train()
    ids, pos = inputs("ministral3")
    plain(ids, position_ids=pos).logits.float().pow(2).mean().backward()
    enable_fused_rope(switched)
    try:
        switched(ids, position_ids=pos).logits.float().pow(2).mean().backward()
    finally:
        disable_fused_rope(switched)
    for (name, a), (_, b) in zip(switched.named_parameters(), plain.named_parameters()):
        if b.grad is not None:
            assert rel_err(a.grad, b.grad) < 1e-4, name


def test_query_scale_config_the_op_cannot_take_stays_transformers():
    """A config whose scale the fused op does not take (original max not an integer) is
    switched without moving the scale: transformers' own multiply runs, results match."""
    from yarn_triton.integrations.transformers.q_scale import _q_scale_of

    model = make_model("ministral3")
    rp = dict(model.config.rope_parameters)
    assert _q_scale_of(model.config) == (0.1, OMAX)
    for omax, want in ((float(OMAX), (0.1, OMAX)), (64.5, None), (0, None)):
        model.config.rope_parameters = dict(rp, original_max_position_embeddings=omax)
        assert _q_scale_of(model.config) == want
    model.config.rope_parameters = dict(rp, llama_4_scaling_beta=float("nan"))
    assert _q_scale_of(model.config) is None
    model.config.rope_parameters = rp


# ------------------------------------------------------------------------------------
# Llama-4 query scaling (Mistral-4): whole query heads [q_nope | q_rope], one in-place call
# ------------------------------------------------------------------------------------
def _spy_calls(monkeypatch, module, name):
    """Record every call of ``module.name`` (the function the dispatchers wrap, when
    patched before the switch), still running it."""
    calls = []
    real = getattr(module, name)

    @functools.wraps(real)
    def spy(*a, **k):
        calls.append((a, k))
        return real(*a, **k)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("interleave", [False, True], ids=["neox", "deepseek"])
def test_mistral4_query_scale_fused_without_grad(monkeypatch, interleave):
    """No grad: each attention's rope call is one in-place kernel call on the whole query
    heads (rotary_at="end", with the query scale), so q_nope is scaled in memory too; the
    modeling file's get_llama_4_attn_scale and rope functions never run; logits match the
    unswitched model at positions past original_max_position_embeddings."""
    from yarn_triton.integrations.transformers import q_scale as yt_q_scale
    import yarn_triton.op as yt_op  # the integration calls the op through this module object
    from yarn_triton import QueryScale

    model = make_model("mistral4")
    model.config.rope_interleave = interleave
    plain = make_model("mistral4")
    plain.config.rope_interleave = interleave
    ids, pos = inputs("mistral4")
    ref = forward(plain, ids, pos)[0]
    calls = []
    real = yt_op.apply_rope_
    monkeypatch.setattr(yt_op, "apply_rope_",
                        lambda q, k, *a, **kw: calls.append((q.shape, k.shape, kw)) or real(q, k, *a, **kw))
    with transformers_rope_forbidden(model, _support("mistral4")):  # these raise if they run
        enable_fused_rope(model)
        try:
            out = forward(model, ids, pos)[0]
            assert yt_q_scale._HANDOVER.positions is None  # handed over and consumed
        finally:
            disable_fused_rope(model)
    cfg = model.config
    assert len(calls) == cfg.num_hidden_layers
    for q_shape, k_shape, kw in calls:
        assert q_shape[-1] == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim and k_shape[-1] == cfg.qk_rope_head_dim
        assert kw["rotary_at"] == "end" and kw["q_scale"] == QueryScale(0.1, OMAX)
        assert kw["layout"] == ("deepseek" if interleave else "neox")
    assert int(pos[1, 0]) > OMAX
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)


def test_mistral4_query_scale_with_grad_stays_unfused_and_gradients_match(monkeypatch):
    """With gradients: the rope of q_rot / k_rot is fused (out of place, differentiable)
    but transformers' own get_llama_4_attn_scale multiplies the whole query; logits and
    the gradients of every parameter match the unswitched model's."""
    from transformers.models.mistral4 import modeling_mistral4 as mm

    switched, plain = make_model("mistral4"), make_model("mistral4")
    switched.train(), plain.train()
    ids, pos = inputs("mistral4")
    ref = plain(ids, position_ids=pos).logits.float()
    ref.pow(2).mean().backward()
    scale_calls = _spy_calls(monkeypatch, mm, "get_llama_4_attn_scale")
    rope_calls = [_spy_calls(monkeypatch, mm, n) for n in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave")]
    enable_fused_rope(switched)
    try:
        out = switched(ids, position_ids=pos).logits.float()
        out.pow(2).mean().backward()
    finally:
        disable_fused_rope(switched)
    assert len(scale_calls) == switched.config.num_hidden_layers and not any(rope_calls)
    assert rel_err(out, ref.detach()) < 1e-5
    n = 0
    for (name, a), (_, b) in zip(switched.named_parameters(), plain.named_parameters()):
        if b.grad is not None:
            assert a.grad is not None and rel_err(a.grad, b.grad) < 1e-4, name
            n += 1
    assert n > 0


def test_mistral4_query_scale_no_grad_inputs_under_grad_mode_are_fused():
    """Grad mode on, but nothing requires a gradient (frozen model): still the fused path."""
    model, plain = make_model("mistral4"), make_model("mistral4")
    model.requires_grad_(False)
    ids, pos = inputs("mistral4")
    ref = forward(plain, ids, pos)[0]
    with transformers_rope_forbidden(model, _support("mistral4")):
        enable_fused_rope(model)
        try:
            out = model(ids, position_ids=pos).logits.float()
        finally:
            disable_fused_rope(model)
    assert rel_err(out, ref) < 1e-5


def test_mistral4_whole_heads_view_only_for_the_split_layout():
    """The dispatcher's whole-head view: for q_rot split off [B, H, S, nope + rope] heads
    it is those heads; for a q_rot with nothing (or something else) before it, None (then
    the unfused path runs)."""
    from yarn_triton.integrations.transformers.q_scale import _whole_heads

    nope, rope = 16, 8
    q_states = torch.randn(2, 7, 4, nope + rope).transpose(1, 2)  # [B, H, S, D] view, as Mistral-4
    q_pass, q_rot = torch.split(q_states, [nope, rope], dim=-1)
    whole = _whole_heads(q_rot, nope)
    assert whole is not None and whole.shape == q_states.shape and torch.equal(whole, q_states)
    assert whole.data_ptr() == q_states.data_ptr()
    assert _whole_heads(q_rot.contiguous(), nope) is None  # storage offset 0: nothing before it
    assert _whole_heads(q_rot, nope + 1) is None  # would reach before the storage
    packed = torch.randn(2, 7, 4, rope + 4)[..., 4:]  # only 4 channels before each head's rope part
    assert _whole_heads(packed, nope) is None  # the whole-head view would overlap itself
    assert _whole_heads(torch.randn(2, 4, 7, 64)[..., 40:48], nope) is not None  # fits, distinct
    tail = torch.randn(1, 1, 1, nope + rope)[..., nope:]
    assert _whole_heads(tail, nope) is not None and _whole_heads(tail[..., :4], nope) is not None
    assert _whole_heads(q_states.flip(-1)[..., :rope], nope) is None  # negative strides
