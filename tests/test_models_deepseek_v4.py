"""DeepSeek-V4 under the transformers switch: one rope per label, every rope site fused.

V4 asks its rotary for a rope label (``main`` on sliding layers: plain rope; ``compress`` on
compressed layers: YaRN at another theta), rotates the trailing ``rope_dim`` channels of each
head with GPT-J pairs, rotates its compressors' and indexer's entries at their own positions,
and de-rotates the attention output's rope slice (``cos, -sin``). The tiny model of
``test_models_zoo`` has one layer of each kind (sliding, CSA with indexer, HCA).
"""

import pytest
import torch

pytest.importorskip("transformers")

import yarn_triton.op as yt_op  # noqa: E402
from yarn_triton.integrations.transformers import (  # noqa: E402
    FusedRopePositions,
    FusedRotaryEmbedding,
    disable_fused_rope,
    enable_fused_rope,
)

from conftest import rel_err  # noqa: E402
from test_models_zoo import DEVICE, OMAX, VOCAB, forward, make_model  # noqa: E402


@pytest.fixture
def v4():
    return make_model("deepseek_v4")


def _modeling(model):
    import sys

    return sys.modules[type(model.model).__module__]


def test_params_per_label(v4):
    rotary = v4.model.rotary_emb
    enable_fused_rope(v4)
    try:
        sites = [m.rotary_emb for m in v4.modules() if isinstance(m._modules.get("rotary_emb"), FusedRotaryEmbedding)]
        assert len(sites) == 4  # model, CSA compressor, its indexer, HCA compressor
        fused = v4.model.rotary_emb
        assert set(fused.by_label) == {"main", "compress"}
        head, prf = v4.config.head_dim, v4.config.partial_rotary_factor
        for label, (params, tracker) in fused.by_label.items():
            assert tracker is None
            assert params.rope_dim == int(head * prf)  # head_dim x partial_rotary_factor, not qk_rope_head_dim
            torch.testing.assert_close(params.inv_freq, getattr(rotary, f"{label}_inv_freq").float().cpu(),
                                       rtol=1e-6, atol=0)
            assert params.cos_sin_scale == pytest.approx(getattr(rotary, f"{label}_attention_scaling"))
        assert fused.by_label["main"][0].rope_type == "default"
        assert fused.by_label["compress"][0].rope_type == "yarn"
        x = torch.zeros(1, 3, 8, device=DEVICE)
        pos = torch.arange(3, device=DEVICE)[None]
        assert fused(x, pos, layer_type="compress").params is fused.by_label["compress"][0]
        with pytest.raises(ValueError, match="label"):
            fused(x, pos, layer_type="sliding_attention")
    finally:
        disable_fused_rope(v4)
    assert v4.model.rotary_emb is rotary


def test_every_rope_site_goes_through_the_fused_op(v4, monkeypatch):
    s = 16
    ids = torch.randint(3, VOCAB, (1, s), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    pos = torch.arange(s, device=DEVICE)[None]
    calls = []
    real = yt_op.apply_rope_

    def spy(q, k, positions, params, **kw):
        calls.append((params, kw.get("inverse", False), kw.get("layout"), tuple(q.shape), positions.flatten().tolist()))
        return real(q, k, positions, params, **kw)

    monkeypatch.setattr(yt_op, "apply_rope_", spy)
    enable_fused_rope(v4)
    try:
        forward(v4, ids, pos)
        main, compress = (v4.model.rotary_emb.by_label[k][0] for k in ("main", "compress"))
    finally:
        disable_fused_rope(v4)
    label = {id(main): "main", id(compress): "compress"}
    got = [(label[id(p)], inv) for p, inv, *_ in calls]
    assert got == [
        ("main", False), ("main", False), ("main", True),  # sliding: q, kv, output de-rotation
        # CSA: q, kv, compressor entries, indexer entries, indexer q, output de-rotation
        ("compress", False), ("compress", False), ("compress", False), ("compress", False),
        ("compress", False), ("compress", True),
        ("compress", False), ("compress", False), ("compress", False), ("compress", True),  # HCA
    ]
    assert {lay for _, _, lay, _, _ in calls} == {"interleaved"}
    # q, kv: [B, S, H, rope]; compressor entries at window positions i * rate
    rope = main.rope_dim
    assert calls[0][3] == (1, s, v4.config.num_attention_heads, rope)
    assert calls[3][4] == list(range(s)) and calls[4][4] == list(range(s))  # CSA q, kv
    assert calls[5][4] == [0, 4, 8, 12] and calls[6][4] == [0, 4, 8, 12]  # compressor, indexer entries (rate 4)
    assert calls[7][4] == list(range(s))  # indexer q, at the tokens' positions
    assert calls[11][4] == [0, 8]  # HCA compressor entries (rate 8)
    assert calls[6][3] == (1, s // 4, 1, rope)
    assert calls[7][3] == (1, s, v4.config.index_n_heads, rope)


def test_output_derotation_matches_transformers(v4):
    """The dispatcher, handed ``cos, -sin``, rotates back the trailing rope slice in place
    as transformers' function does; the leading channels stay."""
    mod = _modeling(v4)
    original = mod.apply_rotary_pos_emb
    rotary = v4.model.rotary_emb
    b, h, s, d = 2, 3, 5, v4.config.head_dim
    g = torch.Generator().manual_seed(4)
    x = torch.randn(b, h, s, d, generator=g).to(DEVICE)
    pos = (torch.arange(s) + torch.tensor([[0], [OMAX + 37]])).to(DEVICE)
    cos, sin = rotary(x, pos, layer_type="compress")
    want_fwd, want_inv = original(x, cos, sin), original(x, cos, -sin)
    enable_fused_rope(v4)
    try:
        fn = mod.apply_rotary_pos_emb
        assert fn.original is original
        handle = v4.model.rotary_emb(x, pos, layer_type="compress")
        assert isinstance(handle, FusedRopePositions) and (-handle).inverse and not (-(-handle)).inverse
        with torch.no_grad():
            y = x.clone()
            assert fn(y, handle, -handle) is y  # in place
            assert rel_err(y, want_inv) < 1e-6
            assert torch.equal(y[..., : d - handle.params.rope_dim], x[..., : d - handle.params.rope_dim])
            y = x.clone()
            assert rel_err(fn(y, handle, handle), want_fwd) < 1e-6
            # [B, S, H, D] with unsqueeze_dim=2, and forward-then-inverse is the identity
            z = x.transpose(1, 2).clone()
            fn(fn(z, handle, handle, unsqueeze_dim=2), handle, -handle, unsqueeze_dim=2)
            assert rel_err(z, x.transpose(1, 2)) < 1e-6
        with pytest.raises(NotImplementedError, match="cos"):
            fn(x.clone(), -handle, handle)
        # real cos/sin still go to transformers' function
        assert torch.equal(fn(x, cos, -sin), want_inv)
    finally:
        disable_fused_rope(v4)


def test_compressed_entries_past_the_original_context(v4):
    """A prompt longer than original_max_position_embeddings: compressor entries (and
    queries) sit past it, in one forward and across a cache."""
    s = OMAX + 12
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, VOCAB, (1, s), generator=g).to(DEVICE)
    pos = torch.arange(s, device=DEVICE)[None]
    ref_logits, ref_hidden = forward(v4, ids, pos)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = v4.generate(ids[:, : OMAX + 2], **kw)  # a CSA window closes at OMAX + 4
    enable_fused_rope(v4)
    try:
        logits, hidden = forward(v4, ids, pos)
        with torch.no_grad():
            got = v4.generate(ids[:, : OMAX + 2], **kw)
    finally:
        disable_fused_rope(v4)
    assert rel_err(hidden, ref_hidden) < 1e-5 and rel_err(logits, ref_logits) < 1e-5
    assert torch.equal(got, want)


def test_training_gradients(v4):
    """With autograd recording, every site (the inverse rotation included) takes the
    differentiable out-of-place op; loss and gradients match."""
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(8)).to(DEVICE)

    def loss_and_grads():
        v4.train()
        v4.zero_grad()
        loss = v4(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in v4.named_parameters() if p.grad is not None}

    want_loss, want = loss_and_grads()
    enable_fused_rope(v4)
    try:
        got_loss, got = loss_and_grads()
    finally:
        disable_fused_rope(v4)
        v4.eval()
    assert got.keys() == want.keys()
    assert rel_err(got_loss, want_loss) < 1e-5
    flat_got = torch.cat([got[n].flatten() for n in want])
    flat_want = torch.cat([want[n].flatten() for n in want])
    assert rel_err(flat_got, flat_want) < 1e-4
