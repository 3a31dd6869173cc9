"""Qwen3 / Qwen3-MoE: the switch moves the attention's per-head q/k RMSNorm into the rope call.

``enable_fused_rope`` replaces every attention's ``q_norm``/``k_norm`` by a module that hands
its input back and leaves the norm to the rope call of the same attention call, which runs
``apply_qk_norm_rope_`` (``apply_qk_norm_rope`` when autograd records). On tiny random models
with YaRN and random norm weights:

* logits and hidden states match the unswitched model (one row past
  ``original_max_position_embeddings``), while the attention norms' own forward and
  transformers' rope function raise (the model's other RMSNorms still run);
* switching back puts the original norm modules back, outputs bit for bit;
* greedy ``generate`` with a KV cache gives the same tokens;
* a ``torch.compile(fullgraph=True)`` forward has no graph break and the norm is inside the
  fused op of the graph;
* a training step gives the same loss and gradients, the norm weights' included;
* misuse (a norm called on its own, attention handed real cos/sin, attention code that does
  not hand the normed q/k to the rope call) gives the right result or raises.

Device: CUDA (native kernel) when a GPU is present, else the CPU under
``TRITON_INTERPRET=1``. Types the installed transformers lacks are skipped.
"""

import contextlib
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from yarn_triton.integrations.transformers import qk_norm as yti_qk_norm  # noqa: E402
import yarn_triton.op as yt_op  # noqa: E402
from yarn_triton.integrations.transformers import (  # noqa: E402
    MODEL_SUPPORT,
    disable_fused_rope,
    enable_fused_rope,
    supported_models_markdown,
)

from conftest import assert_modeling_files_unpatched, rel_err  # noqa: E402
from test_models_zoo import (  # noqa: E402
    DEVICE,
    FAR,
    OMAX,
    VOCAB,
    forward,
    inputs,
    make_model,
    transformers_rope_forbidden,
)

TYPES = ["qwen3", "qwen3_moe"]


def _attentions(model):
    return [m for m in model.modules() if m._modules.get("q_norm") is not None]


def norm_model(model_type, dtype=torch.float32):
    """The tiny model of the type, with norm weights far from 1 (so a skipped or doubled
    norm, or a q/k weight swap, moves the logits by O(1))."""
    model = make_model(model_type)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for a in _attentions(model):
            for n in (a.q_norm, a.k_norm):
                n.weight.copy_(1 + 0.5 * torch.randn(n.weight.shape, generator=g))
    return model.to(dtype)


@contextlib.contextmanager
def counting(name):
    """Count the calls of ``yarn_triton.op.<name>`` (the integration looks it up there)."""
    real, calls = getattr(yt_op, name), []

    def counted(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    setattr(yt_op, name, counted)
    try:
        yield calls
    finally:
        setattr(yt_op, name, real)


@contextlib.contextmanager
def attention_norms_forbidden(norms):
    """Inside: the RMSNorm forward raises for the given (the attentions' original q_norm /
    k_norm) modules and counts the calls of all others of their classes (the decoder
    layers' and the final norm)."""
    forbidden = {id(n) for n in norms}
    classes = {type(n): type(n).forward for n in norms}
    others = []
    for cls, fwd in classes.items():
        def guarded(self, x, _fwd=fwd):
            if id(self) in forbidden:
                raise AssertionError(f"{type(self).__name__}.forward of an attention norm ran while switched")
            others.append(1)
            return _fwd(self, x)

        cls.forward = guarded
    try:
        yield others
    finally:
        for cls, fwd in classes.items():
            cls.forward = fwd


@pytest.fixture(autouse=True)
def _clean():
    """Every test leaves the modeling files unpatched and no norm pending."""
    yield
    assert_modeling_files_unpatched()
    assert getattr(yti_qk_norm._QK_NORM, "attn", None) is None
    assert getattr(yti_qk_norm._QK_NORM, "q", None) is None and getattr(yti_qk_norm._QK_NORM, "k", None) is None


def test_table_and_docs_say_the_norm_is_fused():
    for t in TYPES:
        assert MODEL_SUPPORT[t].fuse_qk_norm and "`q_norm`" in MODEL_SUPPORT[t].fused
    # the others (Qwen3-VL, Qwen3.5: M-RoPE) are tested in test_models_mrope.py
    assert [t for t, s in MODEL_SUPPORT.items() if s.fuse_qk_norm and s.mrope is None] == TYPES
    assert "`q_norm`, `k_norm`" in supported_models_markdown()


@pytest.mark.parametrize("model_type", TYPES)
def test_norm_fused_outputs_match_and_switch_back(model_type):
    model = norm_model(model_type)
    layers = model.config.num_hidden_layers
    ids, pos = inputs(model_type)
    assert int(pos[1, 0]) == FAR > OMAX
    ref_logits, ref_hidden = forward(model, ids, pos)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    originals = [(a, a.q_norm, a.k_norm) for a in _attentions(model)]
    assert len(originals) == layers
    hooks = lambda a: (dict(a._forward_pre_hooks), dict(a._forward_hooks))  # noqa: E731  (transformers' own too)
    hooks_before = [hooks(a) for a, _, _ in originals]

    with transformers_rope_forbidden(model, MODEL_SUPPORT[model_type]):
        enable_fused_rope(model)
        assert model.state_dict().keys() == state.keys()  # same checkpoint keys while switched
        for a, q, k in originals:
            assert isinstance(a.q_norm, yti_qk_norm._DeferredQKNorm) and a.q_norm.weight is q.weight
            assert isinstance(a.k_norm, yti_qk_norm._DeferredQKNorm) and a.k_norm.weight is k.weight
        norms = [n for _, q, k in originals for n in (q, k)]
        with attention_norms_forbidden(norms) as others, counting("apply_qk_norm_rope_") as fused, \
                counting("apply_rope_") as plain:
            logits, hidden = forward(model, ids, pos)
        assert len(fused) == layers and not plain  # one norm+rope launch per layer, nothing else
        assert len(others) == 2 * layers + 1  # the other RMSNorms ran (their own forward)
        disable_fused_rope(model)

    assert rel_err(hidden, ref_hidden) < 1e-5, rel_err(hidden, ref_hidden)
    assert rel_err(logits, ref_logits) < 1e-5, rel_err(logits, ref_logits)
    # back: the same norm objects, no hooks left, same tensors, the same outputs bit for bit
    for (a, q, k), before in zip(originals, hooks_before):
        assert a.q_norm is q and a.k_norm is k
        assert hooks(a) == before
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    again_logits, again_hidden = forward(model, ids, pos)
    assert torch.equal(again_logits, ref_logits) and torch.equal(again_hidden, ref_hidden)


@pytest.mark.parametrize("model_type", TYPES)
def test_norm_fused_generate_same_tokens(model_type):
    model = norm_model(model_type)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding: per-row positions
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = model.generate(ids, **kw)
        enable_fused_rope(model)
        try:
            with counting("apply_qk_norm_rope_") as fused:
                got = model.generate(ids, **kw)
        finally:
            disable_fused_rope(model)
    assert len(fused) == 4 * model.config.num_hidden_layers  # prefill + 3 decode steps
    assert torch.equal(got, want)


def test_norm_fused_compile_fullgraph():
    """fullgraph=True raises on a graph break; the recorded graph holds one fused op per
    layer that reads the q_norm weight (the norm is in the op, not beside it)."""
    model = norm_model("qwen3")
    ids, pos = inputs("qwen3", batch=1)
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    enable_fused_rope(model)
    try:
        eager = forward(model, ids, pos)[0]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=recording)
        with torch.no_grad():
            out = compiled(ids, position_ids=pos).logits.float()
    finally:
        disable_fused_rope(model)
        torch._dynamo.reset()
    assert rel_err(out, eager) < 1e-5
    (gm,) = graphs
    fused = [n for n in gm.graph.nodes if "rope" in str(n.target)
             and any("q_norm" in str(a) for a in n.args)]
    assert len(fused) == model.config.num_hidden_layers


@pytest.mark.parametrize("model_type", TYPES)
def test_norm_fused_training_gradients(model_type):
    """Autograd recording: the differentiable op runs, and the loss and every gradient
    (q_norm / k_norm weights included) match the unswitched model."""
    model = norm_model(model_type)
    ids, _ = inputs(model_type)

    def loss_and_grads():
        model.train()
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = loss_and_grads()
    enable_fused_rope(model)
    try:
        with counting("apply_qk_norm_rope") as fused:
            got_loss, got = loss_and_grads()
    finally:
        disable_fused_rope(model)
        model.eval()
    assert len(fused) == model.config.num_hidden_layers
    assert got.keys() == want.keys()
    assert rel_err(got_loss, want_loss) < 1e-5
    norms = [n for n in want if ".q_norm." in n or ".k_norm." in n]
    assert len(norms) == 2 * model.config.num_hidden_layers
    for n in norms:
        assert rel_err(got[n], want[n]) < 1e-4, n
    flat = lambda g: torch.cat([g[n].flatten() for n in want])  # noqa: E731
    assert rel_err(flat(got), flat(want)) < 1e-4


def test_norm_fused_bf16_no_worse_than_transformers():
    """bf16: the fused norm (float32 over the head, one rounding) is no further from the
    float32 model than transformers' bf16 norm + rope."""
    ids, pos = inputs("qwen3")
    truth = forward(norm_model("qwen3"), ids, pos)[0]
    model = norm_model("qwen3", torch.bfloat16)
    ref = forward(model, ids, pos)[0]
    enable_fused_rope(model)
    try:
        out = forward(model, ids, pos)[0]
    finally:
        disable_fused_rope(model)
    e_ref, e_out = rel_err(ref, truth), rel_err(out, truth)
    assert e_out < 1.5 * e_ref + 1e-3, (e_out, e_ref)


def test_norm_outside_a_switched_call_is_the_norm():
    """A deferring norm called on its own, or by an attention handed real cos/sin, is the
    original norm; a switched forward after that is still fused and right."""
    model = norm_model("qwen3")
    attn = _attentions(model)[0]
    q_norm = attn.q_norm
    x = torch.randn(2, 3, 4, attn.head_dim, device=DEVICE)
    hidden = torch.randn(1, 5, model.config.hidden_size, device=DEVICE)
    pos = torch.arange(FAR, FAR + 5, device=DEVICE)[None]
    with torch.no_grad():
        want_norm = q_norm(x)
        cos_sin = model.model.rotary_emb(hidden, pos)
        want_attn = attn(hidden, position_embeddings=cos_sin, attention_mask=None)[0]
        enable_fused_rope(model)
        try:
            with counting("apply_qk_norm_rope_") as fused:
                assert torch.equal(attn.q_norm(x), want_norm)
                assert torch.equal(attn(hidden, position_embeddings=cos_sin, attention_mask=None)[0], want_attn)
                assert not fused
                handle = model.model.rotary_emb(hidden, pos)
                got = attn(hidden, position_embeddings=handle, attention_mask=None)[0]
                assert len(fused) == 1
        finally:
            disable_fused_rope(model)
    assert rel_err(got, want_attn) < 1e-5


def test_norm_not_handed_to_the_rope_call_raises():
    """Attention code that passes the rope call something else than the normed q, or
    skips the rope call, raises instead of running without the norm; the model is
    fine afterwards."""
    model = norm_model("qwen3")
    ids, pos = inputs("qwen3", batch=1)
    ref = forward(model, ids, pos)[0]
    mod = sys.modules[type(_attentions(model)[0]).__module__]
    enable_fused_rope(model)
    dispatch = mod.apply_rotary_pos_emb
    try:
        mod.apply_rotary_pos_emb = lambda q, k, cos, sin, **kw: dispatch(q.clone(), k, cos, sin, **kw)
        with pytest.raises(RuntimeError, match="did not get the q and k"):
            forward(model, ids, pos)
        mod.apply_rotary_pos_emb = lambda q, k, cos, sin, **kw: (q, k)
        with pytest.raises(RuntimeError, match="not consumed"):
            forward(model, ids, pos)
        mod.apply_rotary_pos_emb = dispatch
        assert rel_err(forward(model, ids, pos)[0], ref) < 1e-5
    finally:
        mod.apply_rotary_pos_emb = dispatch
        disable_fused_rope(model)


def test_weight_replaced_while_switched_carries_over():
    """``load_state_dict(assign=True)`` while switched replaces the deferring modules'
    Parameters; switching back hands them to the original modules."""
    model = norm_model("qwen3")
    attn = _attentions(model)[0]
    original = attn.q_norm
    enable_fused_rope(model)
    try:
        sd = {k: v.clone() * (2 if k.endswith("q_norm.weight") else 1) for k, v in model.state_dict().items()}
        model.load_state_dict(sd, assign=True)
        new = attn.q_norm.weight
        assert new is not original.weight
    finally:
        disable_fused_rope(model)
    assert attn.q_norm is original and original.weight is new
