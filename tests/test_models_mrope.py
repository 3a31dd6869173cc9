"""The transformers switch on the multimodal-rope (M-RoPE) models, end to end, on tiny random
models: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE.

The rows of ``MODEL_SUPPORT`` with ``mrope`` set are tested here (``test_models_zoo.py``
tests the others); ``RECIPES`` must hold a tiny wrapper (``...ForConditionalGeneration``,
text model plus a one-block vision tower) for each. Per type:

* logits and hidden states match the unswitched model for 3-D position ids whose time,
  height and width streams differ, with one row past ``original_max_position_embeddings``
  (YaRN); transformers' rope function and text rotary never run while switched, and the
  fused op gets the ``[3, B, S]`` ids themselves; switching back restores the model bit
  for bit;
* greedy ``generate`` with a KV cache on prompts holding an image (one left-padded) gives
  the same tokens and step logits, and the decode steps' positions carry the rope delta (negative here: an image of 2 x 4 merged
  patches advances the positions by 4 for its 8 tokens);
* Qwen3-VL's and Qwen3.5's per-head q/k norms (random weights, so the norm shows in the
  outputs) run in the rope pass when their row has ``fuse_qk_norm`` (the table leaves it
  off for now; the tests here turn it on for their row): the form (Qwen3.5's
  ``(1 + weight)``) is detected, the norms' own forward never runs, outputs, generate,
  compile and a training step's gradients match;
* one ``torch.compile(fullgraph=True)`` forward per stream choice has no graph break;
* the text models alone (``Qwen3_5ForCausalLM``, a bare ``Qwen2VLTextModel``) switch too;
  params without the model's sections are refused.

Types the installed transformers lacks are skipped. Device: CUDA (native kernel) when a GPU
is present; otherwise the CPU, where the kernel runs under ``TRITON_INTERPRET=1``.
"""

import contextlib
import dataclasses
import functools
import inspect
import sys
from dataclasses import dataclass
from typing import Dict

import pytest
import torch

transformers = pytest.importorskip("transformers")

from yarn_triton.integrations.transformers import qk_norm as yti_qk_norm, sites as yti_sites  # noqa: E402
import yarn_triton.integrations.transformers.handle as yti_handle  # noqa: E402
from yarn_triton import RopeParams  # noqa: E402
from yarn_triton.integrations.transformers import (  # noqa: E402
    MODEL_SUPPORT,
    ROPE_FUNCTIONS,
    FusedRopePositions,
    FusedRotaryEmbedding,
    disable_fused_rope,
    enable_fused_rope,
    is_fused_rope_enabled,
)
from yarn_triton.kernels.rope_kernel import INTERPRETED  # noqa: E402

from conftest import assert_modeling_files_unpatched, rel_err  # noqa: E402

DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRETED) else "cpu"
VOCAB = 128
OMAX = 64  # original_max_position_embeddings of every tiny config
FAR = 100  # offset of the second row's positions: past OMAX
SEQ = 12
TOKENS = dict(image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
IMAGE, V_START, V_END = 5, 3, 4
FIRST_TEXT = 7  # text token ids are drawn from [FIRST_TEXT, VOCAB)

# ------------------------------------------------------------------------------------
# Tiny configs
# ------------------------------------------------------------------------------------
_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.2,  # the logits depend strongly on the rope
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=OMAX, rope_theta=10000.0)
_MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
# Qwen3.5: one Gated DeltaNet layer (no rope) and one attention layer; 16 of 64 channels
# rotate (the released 64 of 256), interleaved sections over 8 pairs.
_Q35 = dict(head_dim=64, layer_types=["linear_attention", "full_attention"],
            rope_parameters=dict(_YARN, mrope_section=[3, 3, 2], partial_rotary_factor=0.25))
# vision towers: one block, patch 2, 2 x 2 merge -> an image of 4 x 8 patches is 8 tokens
_VISION = dict(depth=1, hidden_size=32, num_heads=2, in_channels=3, patch_size=2, spatial_merge_size=2,
               temporal_patch_size=2)
_VISION3 = dict(_VISION, intermediate_size=48, out_hidden_size=64, num_position_embeddings=16)


@dataclass(frozen=True)
class Recipe:
    config_cls: str
    model_cls: str  # the ...ForConditionalGeneration wrapper
    text: dict
    vision: dict
    interleaved: bool
    qk_norm: str = ""  # the per-head q/k norm's scale: "" (none), "weight" or "1 + weight"


RECIPES: Dict[str, Recipe] = {
    "qwen2_vl_text": Recipe(
        "Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
        dict(_TEXT, rope_parameters=dict(_YARN, mrope_section=[2, 3, 3])),
        dict(_VISION, embed_dim=32, hidden_size=64, mlp_ratio=2), False),
    "qwen2_5_vl_text": Recipe(
        "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
        dict(_TEXT, rope_parameters=dict(_YARN, mrope_section=[2, 3, 3])),
        dict(_VISION, intermediate_size=48, out_hidden_size=64, window_size=8, fullatt_block_indexes=[0]), False),
    "qwen3_vl_text": Recipe(
        "Qwen3VLConfig", "Qwen3VLForConditionalGeneration",
        dict(_TEXT, head_dim=16, rope_parameters=dict(_YARN, mrope_section=[4, 2, 2])),
        dict(_VISION3, deepstack_visual_indexes=[0]), True, "weight"),
    "qwen3_vl_moe_text": Recipe(
        "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration",
        dict(_TEXT, **_MOE, head_dim=16, rope_parameters=dict(_YARN, mrope_section=[4, 2, 2])),
        dict(_VISION3, deepstack_visual_indexes=[0]), True, "weight"),
    "qwen3_5_text": Recipe(
        "Qwen3_5Config", "Qwen3_5ForConditionalGeneration", dict(_TEXT, **_Q35), _VISION3, True, "1 + weight"),
    "qwen3_5_moe_text": Recipe(
        "Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration",
        dict(_TEXT, **_MOE, **_Q35, shared_expert_intermediate_size=32), _VISION3, True, "1 + weight"),
}
MROPE_TYPES = tuple(RECIPES)
NORM_TYPES = tuple(t for t, r in RECIPES.items() if r.qk_norm)
# One per stream choice: sectioned; interleaved with the fused (1 + weight) norm and partial rotary.
COMPILE_TYPES = (("qwen2_vl_text", False), ("qwen3_5_text", True))


def fuse_norms(monkeypatch, model_type):
    """Turn ``fuse_qk_norm`` on in ``model_type``'s row for this test (no change where the
    table already has it)."""
    row = MODEL_SUPPORT[model_type]
    monkeypatch.setitem(MODEL_SUPPORT, model_type, dataclasses.replace(row, fuse_qk_norm=True))


def _classes(model_type, *names):
    found = [getattr(transformers, n, None) for n in names]
    if any(c is None for c in found):
        pytest.skip(f"transformers {transformers.__version__} has no {' / '.join(names)}")
    return found


def _randomise_norms(model, seed=3):
    """Random q/k norm weights (Qwen3.5's start at zero, the others at one)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        for name in ("q_norm", "k_norm"):
            n = m._modules.get(name)
            if n is not None:
                with torch.no_grad():
                    n.weight.add_(0.3 * torch.randn(n.weight.shape, generator=g).to(n.weight.device))


def _eager(config):
    config._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = "eager"
    return config


def make_model(model_type, seed=0):
    """The tiny wrapper model of ``model_type`` (skips when transformers lacks it)."""
    r = RECIPES[model_type]
    config_cls, model_cls = _classes(model_type, r.config_cls, r.model_cls)
    config = _eager(config_cls(text_config=dict(r.text), vision_config=dict(r.vision), **TOKENS))
    torch.manual_seed(seed)
    model = model_cls(config)
    _randomise_norms(model)
    return model.to(DEVICE).eval()


def text_model_of(model):
    """The text model (the module holding ``rotary_emb``)."""
    (parent,) = [m for m in model.modules() if m._modules.get("rotary_emb") is not None]
    return parent


def mrope_inputs(batch=2, seq=SEQ):
    """Token ids and 3-D position ids with distinct streams: t runs on, h and w walk a
    3 x 4 grid; row 0 from 0, the others from FAR (past OMAX)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(FIRST_TEXT, VOCAB, (batch, seq), generator=g)
    i = torch.arange(seq)
    streams = torch.stack([2 * i, i // 4, i % 4])  # [3, S]
    start = torch.tensor([0] + [FAR] * (batch - 1))
    pos = streams[:, None, :] + start[None, :, None]  # [3, B, S]
    return ids.to(DEVICE), pos.to(DEVICE)


def forward(model, ids, pos, **kw):
    """(logits, last hidden state), float32."""
    with torch.no_grad():
        out = model(ids, position_ids=pos, output_hidden_states=True, **kw)
    return out.logits.float(), out.hidden_states[-1].float()


@contextlib.contextmanager
def transformers_rope_forbidden(model):
    """Inside: the modeling files' rope functions and the text rotary's forward raise
    (the vision tower's own rope stays allowed)."""
    saved = []
    for m in model.modules():
        fwd = inspect.unwrap(type(m).forward)
        g = getattr(fwd, "__globals__", {})
        for name in set(ROPE_FUNCTIONS) & set(getattr(getattr(fwd, "__code__", None), "co_names", ())):
            mod = sys.modules[g["__name__"]]
            if any(s[0] is mod and s[1] == name for s in saved):
                continue
            original = getattr(mod, name)

            @functools.wraps(original)
            def forbidden(*a, _where=f"{mod.__name__}.{name}", **k):
                raise AssertionError(f"{_where} ran while the model was switched")

            saved.append((mod, name, original, forbidden))
            setattr(mod, name, forbidden)
    rotary_cls = type(text_model_of(model).rotary_emb)
    rotary_forward = rotary_cls.forward

    def rotary_forbidden(self, *a, **k):
        raise AssertionError(f"{type(self).__name__}.forward ran while the model was switched")

    rotary_cls.forward = rotary_forbidden
    try:
        yield [(mod, name, forbidden) for mod, name, _, forbidden in saved]
    finally:
        rotary_cls.forward = rotary_forward
        for mod, name, original, _ in saved:
            setattr(mod, name, original)


@contextlib.contextmanager
def attention_norms_forbidden(norms):
    """Inside: the forward of the given modules (the attentions' own q_norm/k_norm, taken
    before switching) raises; the other modules of their classes, e.g. the layer norms,
    still run. Enter it after switching (switching probes the norm class once)."""
    ids = {id(n) for n in norms}
    classes = {type(n): type(n).forward for n in norms}
    for cls, fwd in classes.items():
        def guarded(self, *a, _fwd=fwd, **k):
            if id(self) in ids:
                raise AssertionError(f"{type(self).__name__}.forward of an attention norm ran while switched")
            return _fwd(self, *a, **k)

        cls.forward = guarded
    try:
        yield
    finally:
        for cls, fwd in classes.items():
            cls.forward = fwd


@contextlib.contextmanager
def recorded_rope_calls(monkeypatch):
    """Records ``(positions, norm)`` of every fused op call the dispatcher makes."""
    calls = []
    real = yti_handle._rope  # patched where FusedRopePositions.rotate reads it

    def spy(q, k, positions, params, layout, inverse, *rest, **kw):
        norm = rest[0] if rest else kw.get("norm")
        calls.append((positions, params, norm))
        return real(q, k, positions, params, layout, inverse, *rest, **kw)

    monkeypatch.setattr(yti_handle, "_rope", spy)
    yield calls


@pytest.fixture(autouse=True)
def _nothing_left_switched():
    """Every test must leave transformers' modeling files as it found them."""
    yield
    assert_modeling_files_unpatched()


# ------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------
def test_every_mrope_row_has_a_recipe():
    rows = {t for t, s in MODEL_SUPPORT.items() if s.mrope is not None}
    assert rows == set(RECIPES)
    for t, r in RECIPES.items():
        s = MODEL_SUPPORT[t]
        assert s.mrope == ("interleaved" if r.interleaved else "sectioned")
        assert r.qk_norm or not s.fuse_qk_norm  # a fused norm is tested in its form
    assert {t for t, _ in COMPILE_TYPES} <= set(RECIPES)


# ------------------------------------------------------------------------------------
# End to end, per type
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MROPE_TYPES)
def test_3d_positions_match_and_switch_back(model_type, monkeypatch):
    model = make_model(model_type)
    recipe = RECIPES[model_type]
    text = text_model_of(model)
    ids, pos = mrope_inputs()
    ref_logits, ref_hidden = forward(model, ids, pos)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rotary = text.rotary_emb
    norms = {id(m): (m.q_norm, m.k_norm) for m in model.modules() if m._modules.get("q_norm") is not None}

    with transformers_rope_forbidden(model) as forbidden, recorded_rope_calls(monkeypatch) as calls:
        enable_fused_rope(model)  # strict: the wrapper is found through its text model's type
        assert is_fused_rope_enabled(model)
        switched = text.rotary_emb
        assert isinstance(switched, FusedRotaryEmbedding) and switched.params.mrope_section is not None
        assert switched.params.mrope_interleaved == recipe.interleaved
        fused_norm = MODEL_SUPPORT[model_type].fuse_qk_norm
        for m in model.modules():  # the q/k norms wait for the rope call, as the table says
            if m._modules.get("q_norm") is not None:
                assert isinstance(m.q_norm, yti_qk_norm._DeferredQKNorm) == fused_norm
        logits, hidden = forward(model, ids, pos)
        disable_fused_rope(model)
        for mod, name, fn in forbidden:  # the switch put back what it found
            assert getattr(mod, name) is fn, f"{mod.__name__}.{name} not restored"

    attention_layers = sum(1 for m in model.modules() if m._modules.get("q_proj") is not None
                           and m._modules.get("o_proj") is not None and "Vision" not in type(m).__name__)
    assert len(calls) == attention_layers == (1 if "qwen3_5" in model_type else 2)
    for positions, params, norm in calls:  # the [3, B, S] ids themselves reach the op
        assert positions.shape == pos.shape and torch.equal(positions, pos)
        assert (norm is not None) == fused_norm
    assert rel_err(hidden, ref_hidden) < 1e-5, rel_err(hidden, ref_hidden)
    assert rel_err(logits, ref_logits) < 1e-5, rel_err(logits, ref_logits)

    # the streams matter: text positions (t on all three) give other outputs
    assert rel_err(forward(model, ids, pos[0])[0], ref_logits) > 1e-3

    # back, bit for bit: same modules, same tensors, same outputs
    assert not is_fused_rope_enabled(model) and text.rotary_emb is rotary
    assert {id(m): (m.q_norm, m.k_norm) for m in model.modules() if m._modules.get("q_norm") is not None} == norms
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    again_logits, again_hidden = forward(model, ids, pos)
    assert torch.equal(again_logits, ref_logits) and torch.equal(again_hidden, ref_hidden)


@pytest.mark.parametrize("model_type", NORM_TYPES)
def test_qk_norm_in_the_rope_pass(model_type, monkeypatch):
    """With ``fuse_qk_norm`` on the row: the norm's form is found by probing its class, the
    attentions' q_norm/k_norm hand their input on and the rope call norms and rotates in
    one pass; the norms' own forward never runs; outputs match; switching back puts the
    same norm modules back."""
    fuse_norms(monkeypatch, model_type)
    unit = RECIPES[model_type].qk_norm == "1 + weight"
    model = make_model(model_type)
    sites = yti_qk_norm._qk_norm_sites(model)
    assert sites and all(u == unit for _, u in sites)
    ids, pos = mrope_inputs()
    ref_logits, ref_hidden = forward(model, ids, pos)
    norms = {id(m): (m.q_norm, m.k_norm) for m in model.modules() if m._modules.get("q_norm") is not None}
    enable_fused_rope(model)
    try:
        for m in model.modules():
            if m._modules.get("q_norm") is not None:
                assert isinstance(m.q_norm, yti_qk_norm._DeferredQKNorm) and m.q_norm.weight is norms[id(m)][0].weight
                assert m.q_norm.unit_offset == m.k_norm.unit_offset == unit
        originals = [n for pair in norms.values() for n in pair]
        with attention_norms_forbidden(originals), recorded_rope_calls(monkeypatch) as calls:
            logits, hidden = forward(model, ids, pos)
    finally:
        disable_fused_rope(model)
    assert calls and all(norm is not None and norm[3] == unit and torch.equal(p, pos) for p, _, norm in calls)
    assert rel_err(hidden, ref_hidden) < 1e-5, rel_err(hidden, ref_hidden)
    assert rel_err(logits, ref_logits) < 1e-5, rel_err(logits, ref_logits)
    assert {id(m): (m.q_norm, m.k_norm) for m in model.modules() if m._modules.get("q_norm") is not None} == norms
    assert torch.equal(forward(model, ids, pos)[0], ref_logits)


def image_prompt(model):
    """Two prompts with one 4 x 8-patch image each (8 tokens after the 2 x 2 merge), the
    second left-padded by 2; the generate kwargs for them."""
    g = torch.Generator().manual_seed(1)

    def text(n):
        return torch.randint(FIRST_TEXT, VOCAB, (n,), generator=g).tolist()

    rows = [text(2) + [V_START] + [IMAGE] * 8 + [V_END] + text(3),
            [0, 0] + text(1) + [V_START] + [IMAGE] * 8 + [V_END] + text(2)]
    ids = torch.tensor(rows)
    mask = (ids != 0).long()
    grid = torch.tensor([[1, 4, 8], [1, 4, 8]])
    channels = model.config.vision_config.in_channels * model.config.vision_config.temporal_patch_size
    pixels = torch.randn(2 * 32, channels * 2 * 2, generator=g)
    kw = dict(attention_mask=mask.to(DEVICE), pixel_values=pixels.to(DEVICE), image_grid_thw=grid.to(DEVICE))
    if "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters:
        kw["mm_token_type_ids"] = (ids == IMAGE).int().to(DEVICE)
    return ids.to(DEVICE), kw


@pytest.mark.parametrize("model_type, fused_norm", [(t, False) for t in MROPE_TYPES] + [("qwen3_5_text", True)])
def test_generate_with_an_image_same_tokens(model_type, fused_norm, monkeypatch):
    if fused_norm:
        fuse_norms(monkeypatch, model_type)
    model = make_model(model_type)
    text = text_model_of(model)
    ids, kw = image_prompt(model)
    kw.update(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
              return_dict_in_generate=True)

    def run():
        seen = []
        def record(module, args, kwargs):
            seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone())

        hook = text.rotary_emb.register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad():
                return model.generate(ids, **kw), seen
        finally:
            hook.remove()

    want, want_pos = run()
    delta = model.model.rope_deltas.flatten().tolist()
    with transformers_rope_forbidden(model):
        enable_fused_rope(model)
        try:
            got, got_pos = run()
        finally:
            disable_fused_rope(model)
    assert got.sequences.shape == want.sequences.shape == (2, ids.shape[1] + 3)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):  # prefill (image inside) and decode steps
        assert rel_err(a, b) < 1e-5, rel_err(a, b)
    # the rotary got the same ids in every step, 3-D, with distinct streams on the image
    assert len(got_pos) == len(want_pos) == 3
    for a, b in zip(got_pos, want_pos):
        assert a.shape[0] == 3 and torch.equal(a, b)
    assert not torch.equal(got_pos[0][1], got_pos[0][2])
    # decode steps: the rope delta of the image (8 tokens, positions advanced by 4)
    n = ids.shape[1]
    assert delta == [-4, -4]
    for step, p in enumerate(got_pos[1:], start=0):
        assert p.shape == (3, 2, 1)
        assert p[:, 0, 0].tolist() == [n + step + delta[0]] * 3  # row 0 has no padding


@pytest.mark.parametrize("model_type, fused_norm", COMPILE_TYPES)
def test_compile_fullgraph_no_graph_break(model_type, fused_norm, monkeypatch):
    """fullgraph=True raises on any graph break; aot_eager traces and functionalizes the
    in-place rope custom op (and the fused norm) without code generation."""
    if fused_norm:
        fuse_norms(monkeypatch, model_type)
    model = make_model(model_type)
    ids, pos = mrope_inputs(batch=1)
    pos = pos + FAR
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
# The text models alone
# ------------------------------------------------------------------------------------
def _text_only(model_type, config_cls, model_cls):
    c, m = (getattr(transformers, n, None) for n in (config_cls, model_cls))
    if c is None or m is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls} / {model_cls}")
    torch.manual_seed(0)
    model = m(_eager(c(**RECIPES[model_type].text))).to(DEVICE).eval()
    _randomise_norms(model)
    return model


@pytest.mark.parametrize("model_type, config_cls, model_cls, streams", [
    ("qwen3_5_text", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM", True),  # type qwen3_5_text itself
    ("qwen2_vl_text", "Qwen2VLTextConfig", "Qwen2VLTextModel", False),  # a bare text model, [B, S] ids
])
def test_text_only_models(model_type, config_cls, model_cls, streams):
    model = _text_only(model_type, config_cls, model_cls)
    ids, pos = mrope_inputs()
    if not streams:
        pos = pos[0]  # text: the same position on all three streams

    def run():
        with torch.no_grad():
            out = model(ids, position_ids=pos)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state

    ref = run()
    enable_fused_rope(model)
    try:
        out = run()
    finally:
        disable_fused_rope(model)
    assert rel_err(out, ref) < 1e-5


def test_qwen3_5_training_step_gradients(monkeypatch):
    """A training step through the fused ``(1 + weight)`` norm and M-RoPE (out of place,
    differentiable): loss and gradients, the q/k norm weights' included, match."""
    fuse_norms(monkeypatch, "qwen3_5_text")
    model = _text_only("qwen3_5_text", "Qwen3_5TextConfig", "Qwen3_5ForCausalLM").train()
    ids, pos = mrope_inputs()

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, position_ids=pos, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    ref_loss, ref_grads = step()
    enable_fused_rope(model)
    try:
        assert all(isinstance(m.q_norm, yti_qk_norm._DeferredQKNorm) for m in model.modules()
                   if m._modules.get("q_norm") is not None)
        loss, grads = step()
    finally:
        disable_fused_rope(model)
    assert rel_err(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and any("q_norm" in n for n in grads)
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) < 1e-4, n


# ------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------
def test_params_without_or_with_other_sections_are_refused():
    model = make_model("qwen3_vl_text")
    ours = RopeParams.from_config(model.config)
    plain = RopeParams(ours.inv_freq, ours.rope_dim, ours.cos_sin_scale, rope_type=ours.rope_type)
    with pytest.raises(ValueError, match="no sections"):
        enable_fused_rope(model, plain)
    with pytest.raises(ValueError, match="does not match"):
        enable_fused_rope(model, plain.with_mrope((4, 2, 2), interleaved=False))  # sectioned
    with pytest.raises(ValueError, match="does not match"):
        enable_fused_rope(model, plain.with_mrope((2, 3, 3), interleaved=True))
    assert not is_fused_rope_enabled(model)
    assert yti_sites._row("qwen3_vl") is MODEL_SUPPORT["qwen3_vl_text"]  # a flat (text settings on top) config
    enable_fused_rope(model, ours.with_mrope((4, 2, 2), interleaved=True))  # the same as the model's
    try:
        x = torch.zeros(1, 2, 8, device=DEVICE)
        with pytest.raises(ValueError, match=r"\[3, batch, seq\]"):
            text_model_of(model).rotary_emb(x, torch.zeros(2, 1, 2, dtype=torch.long, device=DEVICE))
        handle = text_model_of(model).rotary_emb(x, torch.zeros(1, 1, 2, dtype=torch.long, device=DEVICE))
        assert isinstance(handle, FusedRopePositions) and handle.positions.shape == (1, 2)  # text
    finally:
        disable_fused_rope(model)
