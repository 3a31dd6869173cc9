"""The serving path of the transformers switch (``integrations/transformers/paged.py``):
under continuous batching (``generate_batch``) a switched model's full-attention layers
rotate q and write rope(k) and v into transformers' paged cache with one
``apply_rope_and_cache_`` call, transformers' own cache write does not run, and greedy
tokens are those of the unswitched model. Also: the attention code of the vetted model
types is what the deferral relies on, and keys that are not the rope call's raise.

Device: CUDA when a GPU is present, else the CPU (the op's PyTorch path, or the kernel
under ``TRITON_INTERPRET=1``).
"""

import dataclasses
import functools
import importlib
import inspect
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
cb = pytest.importorskip("transformers.generation.continuous_batching")

import yarn_triton.op as yt_op  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402
from yarn_triton.integrations.transformers import disable_fused_rope, enable_fused_rope  # noqa: E402
from yarn_triton.integrations.transformers import paged  # noqa: E402
from yarn_triton.kernels.rope_kernel import INTERPRETED  # noqa: E402

from conftest import assert_modeling_files_unpatched  # noqa: E402

DEVICE = "cuda" if (torch.cuda.is_available() and not INTERPRETED) else "cpu"
LAYERS = 2
PROMPTS = [[5, 17, 33, 2, 90, 61, 7, 12, 44], [3, 8, 120], [10, 11, 12, 13, 14, 15, 16]]
NEW_TOKENS = 6  # prompts of up to 9 tokens: positions up to 14, past the yarn model's original 8

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               initializer_range=0.2, tie_word_embeddings=False)
_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON),
    "qwen2_yarn": lambda: transformers.Qwen2Config(**_COMMON, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=8, rope_theta=10000.0)),
}


@pytest.fixture(autouse=True)
def _nothing_left_switched():
    yield
    assert_modeling_files_unpatched()
    assert not paged._HOOKS


def _model(name):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_CONFIGS[name](), attn_implementation="sdpa")
    return model.to(DEVICE).eval()


def _cb_config():
    """A small paged cache (pages of 4 tokens) sized by hand: no memory probing, no CUDA
    graphs, no decode fast path (``block_table``)."""
    page = "page_size" if "page_size" in {f.name for f in dataclasses.fields(ContinuousBatchingConfig)} \
        else "block_size"  # transformers 5.17
    return ContinuousBatchingConfig(**{page: 4}, num_blocks=32, max_batch_tokens=64, use_cuda_graph=False,
                                    use_async_batching=False, max_blocks_per_request=0)


def _transformers_write_owner():
    """The class whose ``update`` writes a full-attention layer's paged cache:
    ``FullAttentionCacheAllocator`` (transformers >= 5.2x), ``PagedAttentionCache`` (5.17)."""
    try:
        from transformers.generation.continuous_batching.cache_allocators import FullAttentionCacheAllocator
        return FullAttentionCacheAllocator
    except ImportError:
        return cb.PagedAttentionCache


@pytest.fixture
def counts(monkeypatch):
    """Counts the fused op's calls and transformers' own cache writes."""
    n = {"fused": 0, "transformers": 0}
    fused = yt_op.apply_rope_and_cache_

    def fused_spy(*args, **kwargs):
        n["fused"] += 1
        return fused(*args, **kwargs)

    owner = _transformers_write_owner()
    write = owner.update

    @functools.wraps(write)
    def write_spy(self, *args, **kwargs):
        n["transformers"] += 1
        return write(self, *args, **kwargs)

    monkeypatch.setattr(yt_op, "apply_rope_and_cache_", fused_spy)
    monkeypatch.setattr(owner, "update", write_spy)
    return n


def _generate(model, counts):
    """Greedy ``generate_batch`` of PROMPTS: (token lists, forwards run, fused calls,
    transformers' cache writes) of this run."""
    forwards = []
    hook = model.register_forward_hook(lambda *a: forwards.append(1))
    before = dict(counts)
    gc = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    try:
        with torch.no_grad():
            out = model.generate_batch(PROMPTS, generation_config=gc, continuous_batching_config=_cb_config(),
                                       progress_bar=False)
    finally:
        hook.remove()
    outs = [out[f"req_{i}"] for i in range(len(PROMPTS))]
    for o in outs:
        assert not getattr(o, "error", None), o.error
    tokens = [list(o.generated_tokens) for o in outs]
    return tokens, len(forwards), counts["fused"] - before["fused"], counts["transformers"] - before["transformers"]


@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_generate_batch_fuses_rope_and_cache_write(name, counts):
    model = _model(name)
    want, n_off, fused_off, writes_off = _generate(model, counts)
    enable_fused_rope(model)
    try:
        got, n_on, fused_on, writes_on = _generate(model, counts)
    finally:
        disable_fused_rope(model)
    again, _, fused_again, _ = _generate(model, counts)

    assert all(len(t) == NEW_TOKENS for t in want)
    assert got == want
    assert again == want
    # unswitched: transformers writes every layer's cache in every forward
    assert (fused_off, writes_off) == (0, LAYERS * n_off)
    # switched: the fused op does, every layer of every forward; transformers' write never runs
    assert n_on >= NEW_TOKENS and (fused_on, writes_on) == (LAYERS * n_on, 0)
    assert fused_again == 0
    ours = (paged._pre_hook, paged._post_hook)
    assert not any(h in ours for m in model.modules() for h in (*m._forward_pre_hooks.values(),
                                                                 *m._forward_hooks.values()))


def test_keys_other_than_the_rope_calls_raise(counts):
    """Attention code that hands the cache other keys than its rope call's (here: a copy)
    fails the request with an error; it never attends with an unrotated q."""
    model = _model("llama")
    modeling = importlib.import_module(type(model).__module__)
    gc = transformers.GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)
    enable_fused_rope(model)
    dispatch = modeling.apply_rotary_pos_emb

    def copying(*args, **kwargs):
        q, k = dispatch(*args, **kwargs)
        return q, k.clone()

    modeling.apply_rotary_pos_emb = copying
    try:
        with torch.no_grad():
            out = model.generate_batch(PROMPTS[:1], generation_config=gc, continuous_batching_config=_cb_config(),
                                       progress_bar=False)
    finally:
        modeling.apply_rotary_pos_emb = dispatch
        disable_fused_rope(model)
    assert "other keys than the rope call" in (out["req_0"].error or "")
    assert counts["fused"] == 0


_ROPE_LINE = "query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)"
_BETWEEN = re.compile(  # transformers >= 5.2x: `cache`; 5.17: `past_key_values` (None under continuous batching)
    r"if (cache|past_key_values) is not None:"
    r"|key_states, value_states = (cache|past_key_values)\.update\(key_states, value_states, self\.layer_idx[,)].*"
)


@pytest.mark.parametrize("model_type", sorted(paged.PAGED_MODEL_TYPES))
def test_vetted_attention_hands_rope_output_to_the_cache_write(model_type):
    """What the deferral relies on, in the installed transformers: the attention of each
    type in PAGED_MODEL_TYPES calls ``apply_rotary_pos_emb`` on ``query_states, key_states``
    and then, before its attention interface (which, in 5.17, writes the paged cache first
    thing), only the cache update of those same keys -- q and k are not touched in
    between."""
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    found = 0
    for cls in vars(modeling).values():
        if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module) and cls.__module__ == modeling.__name__):
            continue
        lines = [ln.strip() for ln in inspect.getsource(cls.forward).splitlines()]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        if _ROPE_LINE not in lines:
            continue
        found += 1
        start = lines.index(_ROPE_LINE) + 1
        end = next(i for i in range(start, len(lines)) if "attention_interface" in lines[i])
        assert all(_BETWEEN.fullmatch(ln) for ln in lines[start:end]), (cls.__name__, lines[start:end])
    assert found, f"no attention of {model_type} calls {_ROPE_LINE!r}"
