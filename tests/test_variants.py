"""Every RoPE variant a model config can name, checked against transformers' own numbers.

The oracle is the installed transformers: ``ROPE_INIT_FUNCTIONS`` (and the model classes'
``compute_default_rope_parameters`` for plain rope) for ``inv_freq`` and the cos/sin
factor, DeepSeek's ``yarn_apply_mscale`` for the softmax factor, and the rotary modules
themselves (``dynamic_rope_update``) for the sequence-length dependent methods. Real
configurations are typed in below as their config.json dicts (no downloads); random ones
are drawn fresh on every run (hypothesis).

The seed's DeepSeek ``RopeParams.yarn`` against an independent float64 evaluation lives
elsewhere; here it only appears where it and transformers disagree.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from transformers import AutoConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from yarn_triton import RopeParams, RopeTracker, SUPPORTED_ROPE_TYPES  # noqa: E402
from yarn_triton.config import rope_params_from_config  # noqa: E402

transformers.logging.set_verbosity_error()

REL = 1e-6  # bound on the relative error of every number against transformers


# --------------------------------------------------------------------------------------
# Real configurations, as their config.json files spell them (rope-relevant fields only)
# --------------------------------------------------------------------------------------
# Phi-3 128k's LongRoPE lists as published in the first Phi-3-*-128k-instruct configs
# (rope_scaling.type "su"; Phi-3-mini-128k-instruct and Phi-3-vision-128k-instruct).
PHI3_LONG = [
    1.0299999713897705, 1.0499999523162842, 1.0499999523162842, 1.0799999237060547,
    1.2299998998641968, 1.2299998998641968, 1.2999999523162842, 1.4499999284744263,
    1.5999999046325684, 1.6499998569488525, 1.8999998569488525, 2.859999895095825,
    3.68999981880188, 5.419999599456787, 5.489999771118164, 5.489999771118164,
    9.09000015258789, 11.579999923706055, 15.65999984741211, 15.769999504089355,
    15.789999961853027, 18.360000610351562, 21.989999771118164, 23.079999923706055,
    30.009998321533203, 32.35000228881836, 32.590003967285156, 35.56000518798828,
    39.95000457763672, 53.840003967285156, 56.20000457763672, 57.95000457763672,
    59.29000473022461, 59.77000427246094, 59.920005798339844, 61.190006256103516,
    61.96000671386719, 62.50000762939453, 63.3700065612793, 63.48000717163086,
    63.48000717163086, 63.66000747680664, 63.850006103515625, 64.08000946044922,
    64.760009765625, 64.80001068115234, 64.81001281738281, 64.81001281738281,
]
PHI3_SHORT = [
    1.05, 1.05, 1.05, 1.1, 1.1, 1.1, 1.2500000000000002, 1.2500000000000002,
    1.4000000000000004, 1.4500000000000004, 1.5500000000000005, 1.8500000000000008,
    1.9000000000000008, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.1000000000000005, 2.1000000000000005, 2.2, 2.3499999999999996, 2.3499999999999996,
    2.3499999999999996, 2.3499999999999996, 2.3999999999999995, 2.3999999999999995,
    2.6499999999999986, 2.6999999999999984, 2.8999999999999977, 2.9499999999999975,
    3.049999999999997, 3.049999999999997, 3.049999999999997,
]

_DEEPSEEK_V2_ROPE = {
    "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096, "type": "yarn",
}
_QWEN_YARN = {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"}

REAL_CONFIGS = {
    "Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    ),
    # Qwen2.5 / Qwen3 with the YaRN block their model cards tell users to add.
    "Qwen2.5-7B": dict(
        model_type="qwen2", hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=32768, rope_theta=1000000.0, rope_scaling=dict(_QWEN_YARN),
    ),
    "Qwen3-8B": dict(
        model_type="qwen3", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    ),
    "Qwen3-32B": dict(
        model_type="qwen3", hidden_size=5120, num_attention_heads=64, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    ),
    "DeepSeek-V2-Lite": dict(
        model_type="deepseek_v2", hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, rope_theta=10000,
        rope_scaling=dict(_DEEPSEEK_V2_ROPE),
    ),
    "DeepSeek-V2": dict(
        model_type="deepseek_v2", hidden_size=5120, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, rope_theta=10000,
        rope_scaling=dict(_DEEPSEEK_V2_ROPE),
    ),
    "DeepSeek-V3": dict(
        model_type="deepseek_v3", hidden_size=7168, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, rope_theta=10000,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    ),
    # Kimi K2 ships a DeepSeek-V3 architecture (its own model_type "kimi_k2" needs remote code).
    "Kimi-K2": dict(
        model_type="deepseek_v3", hidden_size=7168, num_attention_heads=64, num_key_value_heads=64,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=131072, rope_theta=50000.0,
        rope_scaling={"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
                      "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    ),
    "gpt-oss-20b": dict(
        model_type="gpt_oss", hidden_size=2880, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, max_position_embeddings=131072, rope_theta=150000,
        rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                      "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    ),
    "Phi-3-mini-128k": dict(
        model_type="phi3", hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=131072, original_max_position_embeddings=4096, rope_theta=10000.0,
        rope_scaling={"long_factor": PHI3_LONG, "short_factor": PHI3_SHORT, "type": "longrope"},
    ),
}


# --------------------------------------------------------------------------------------
# The transformers side
# --------------------------------------------------------------------------------------
def hf_config(d: dict):
    """A transformers config object from a config.json-style dict (deep-copied)."""
    d = copy.deepcopy(d)
    return AutoConfig.for_model(d.pop("model_type", "llama"), **d)


def hf_params(cfg, seq_len=None):
    """``(inv_freq, attention_factor)`` as transformers computes them for ``cfg``."""
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=seq_len)


def hf_softmax_factor(cfg) -> float:
    """What the model's attention multiplies ``1/sqrt(head_dim)`` by: DeepSeek-V2/V3's
    ``yarn_apply_mscale``; 1 for every other architecture."""
    if cfg.model_type == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
    elif cfg.model_type == "deepseek_v2":
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale
    else:
        return 1.0
    return yarn_apply_mscale(cfg.rope_parameters, 1.0)


def rel(a, b) -> float:
    if isinstance(a, torch.Tensor):
        a64, b64 = a.double(), b.double()
        return ((a64 - b64).abs() / b64.abs().clamp_min(1e-300)).max().item()
    return abs(a - b) / abs(b)


def assert_matches_hf(ours: RopeParams, cfg, seq_len=None, check_softmax=True) -> None:
    inv, att = hf_params(cfg, seq_len)
    assert ours.inv_freq.shape == inv.shape
    assert ours.rope_dim == 2 * inv.numel()
    assert rel(ours.inv_freq, inv) <= REL, (ours.inv_freq, inv)
    assert rel(ours.cos_sin_scale, float(att)) <= REL, (ours.cos_sin_scale, att)
    if check_softmax:
        assert rel(ours.softmax_scale_factor, hf_softmax_factor(cfg)) <= REL


# --------------------------------------------------------------------------------------
# Real configs
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_config_matches_transformers(name, tmp_path):
    """inv_freq, cos/sin factor and softmax factor of each real model agree with
    transformers, whether the config comes as a PretrainedConfig, a dict or a file -- and
    in fact bit for bit, since the same float32 operations run in the same order."""
    d = REAL_CONFIGS[name]
    cfg = hf_config(d)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    results = [
        RopeParams.from_config(cfg),
        RopeParams.from_config(copy.deepcopy(d)),
        RopeParams.from_config(str(path)),
        RopeParams.from_config(tmp_path),
        rope_params_from_config(cfg),
    ]
    for ours in results:
        assert_matches_hf(ours, cfg)
        inv, _ = hf_params(cfg)
        assert torch.equal(ours.inv_freq, inv.float()), name
        assert ours.rope_type == cfg.rope_parameters["rope_type"]


EXPECTED_SCALES = {
    # name: (rope_dim, cos_sin_scale, softmax_scale_factor) -- independent arithmetic
    "Llama-3.1-8B": (128, 1.0, 1.0),
    "Qwen2.5-7B": (128, 0.1 * math.log(4) + 1, 1.0),
    "Qwen3-8B": (128, 0.1 * math.log(4) + 1, 1.0),
    "Qwen3-32B": (128, 0.1 * math.log(4) + 1, 1.0),
    "DeepSeek-V2-Lite": (64, 1.0, (0.0707 * math.log(40) + 1) ** 2),
    "DeepSeek-V2": (64, 1.0, (0.0707 * math.log(40) + 1) ** 2),
    "DeepSeek-V3": (64, 1.0, (0.1 * math.log(40) + 1) ** 2),
    "Kimi-K2": (64, 1.0, (0.1 * math.log(32) + 1) ** 2),
    "gpt-oss-20b": (64, 0.1 * math.log(32) + 1, 1.0),
    "Phi-3-mini-128k": (96, math.sqrt(1 + math.log(32) / math.log(4096)), 1.0),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_config_scale_values(name):
    """The scale factors written out by hand, so a shared mistake with transformers would show."""
    ours = RopeParams.from_config(REAL_CONFIGS[name])
    dim, cs, sm = EXPECTED_SCALES[name]
    assert ours.rope_dim == dim
    assert rel(ours.cos_sin_scale, cs) <= 1e-12
    assert rel(ours.softmax_scale_factor, sm) <= 1e-12


@pytest.mark.parametrize("name", ["DeepSeek-V2-Lite", "DeepSeek-V2", "DeepSeek-V3", "Kimi-K2"])
def test_deepseek_from_config_equals_seed_yarn(name):
    """For the real DeepSeek-family configs the two YaRN flavours agree exactly: both mscales
    are given and non-zero, the betas are set, the ramp is truncated."""
    d = REAL_CONFIGS[name]
    rs = d["rope_scaling"]
    seed = RopeParams.yarn(
        d["qk_rope_head_dim"], d["rope_theta"], rs["factor"], rs["original_max_position_embeddings"],
        rs["beta_fast"], rs["beta_slow"], rs["mscale"], rs["mscale_all_dim"],
    )
    ours = RopeParams.from_config(d)
    assert torch.equal(seed.inv_freq, ours.inv_freq)
    assert seed.cos_sin_scale == ours.cos_sin_scale
    assert seed.softmax_scale_factor == ours.softmax_scale_factor


def test_phi3_su_is_longrope():
    """The first Phi-3 128k configs say ``"type": "su"``; transformers 5's Phi3Config renames
    it to longrope only after its standardisation step, which then misses the top-level
    original_max_position_embeddings and raises. We read "su" as longrope directly."""
    d = copy.deepcopy(REAL_CONFIGS["Phi-3-mini-128k"])
    d["rope_scaling"]["type"] = "su"
    su = RopeParams.from_config(d)
    lr = RopeParams.from_config(REAL_CONFIGS["Phi-3-mini-128k"])
    assert su.rope_type == "longrope"
    assert torch.equal(su.inv_freq, lr.inv_freq) and su.cos_sin_scale == lr.cos_sin_scale
    assert torch.equal(su.for_seq_len(5000).inv_freq, lr.for_seq_len(5000).inv_freq)


def test_phi3_long_factors_match_transformers():
    """The long set (sequence past 4096) against transformers with seq_len > original."""
    cfg = hf_config(REAL_CONFIGS["Phi-3-mini-128k"])
    ours = RopeParams.from_config(cfg)
    for n in (1, 4096, 4097, 131072, 500000):
        assert_matches_hf(ours.for_seq_len(n), cfg, seq_len=n)
    assert ours.for_seq_len(4096) is ours
    assert ours.for_seq_len(4097) is ours.for_seq_len(10**6)


# --------------------------------------------------------------------------------------
# Random configs, fresh every run
# --------------------------------------------------------------------------------------
_thetas = st.sampled_from([10000.0, 50000.0, 500000.0, 1e6, 5e6]) | st.floats(100.0, 1e7)
_head_dims = st.sampled_from([32, 64, 80, 96, 128, 256]) | st.integers(4, 160).map(lambda x: 2 * x)
_factors = st.floats(1.0, 64.0) | st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 40.0])
_lengths = st.sampled_from([2048, 4096, 8192, 32768]) | st.integers(256, 200000)
_random = settings(  # YARN_TRITON_EXAMPLES=1000 for a longer soak
    max_examples=int(os.environ.get("YARN_TRITON_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def _base(head_dim, theta, max_pos, **extra):
    heads = 8
    return dict(model_type="llama", hidden_size=head_dim * heads, num_attention_heads=heads,
                head_dim=head_dim, max_position_embeddings=max_pos, rope_theta=theta, **extra)


@_random
@given(head_dim=_head_dims, theta=_thetas, factor=_factors, max_pos=_lengths,
       kind=st.sampled_from(["default", "linear", "dynamic"]))
def test_random_simple(head_dim, theta, factor, max_pos, kind):
    """default / linear / dynamic (at its initial length) on random configs."""
    rs = {"rope_type": kind} if kind == "default" else {"rope_type": kind, "factor": factor}
    d = _base(head_dim, theta, max_pos, rope_scaling=rs)
    cfg = hf_config(d)
    assert_matches_hf(RopeParams.from_config(d), cfg)
    assert_matches_hf(RopeParams.from_config(cfg), cfg)


@_random
@given(head_dim=_head_dims, theta=_thetas, factor=_factors, max_pos=_lengths,
       grow=st.floats(1.0, 64.0), prf=st.sampled_from([None, 0.5, 0.25, 1.0]))
def test_random_dynamic_lengths(head_dim, theta, factor, max_pos, grow, prf):
    """dynamic NTK for sequence lengths past max_position_embeddings (transformers with an
    integer seq_len) -- including a partial rotary factor."""
    extra = {} if prf is None else {"partial_rotary_factor": prf}
    d = _base(head_dim, theta, max_pos, rope_scaling={"rope_type": "dynamic", "factor": factor}, **extra)
    if int(head_dim * (prf or 1.0)) % 2 or int(head_dim * (prf or 1.0)) <= 2:
        return
    cfg = hf_config(d)
    ours = RopeParams.from_config(d)
    for n in (1, max_pos, max_pos + 1, int(max_pos * grow) + 1):
        assert_matches_hf(ours.for_seq_len(n), cfg, seq_len=n)


@_random
@given(head_dim=_head_dims, theta=_thetas, factor=_factors, omax=_lengths,
       beta_fast=st.none() | st.just(0) | st.floats(2.0, 128.0),
       beta_slow=st.none() | st.just(0) | st.floats(0.25, 2.0),
       mscale=st.none() | st.just(0) | st.floats(0.1, 2.0),
       mscale_all_dim=st.none() | st.just(0) | st.floats(0.1, 2.0),
       attention_factor=st.none() | st.floats(0.5, 2.0),
       truncate=st.none() | st.booleans(),
       with_omax=st.booleans(), ratio=st.floats(1.0, 64.0),
       prf=st.sampled_from([None, 0.5, 1.0]), deepseek=st.booleans())
def test_random_yarn(head_dim, theta, factor, omax, beta_fast, beta_slow, mscale, mscale_all_dim,
                     attention_factor, truncate, with_omax, ratio, prf, deepseek):
    """YaRN with every optional key present, absent, null or 0, as llama-style and as
    DeepSeek-style (qk_rope_head_dim, softmax factor) configs."""
    rs = {"rope_type": "yarn", "factor": factor}
    for k, v in (("beta_fast", beta_fast), ("beta_slow", beta_slow), ("mscale", mscale),
                 ("mscale_all_dim", mscale_all_dim), ("attention_factor", attention_factor),
                 ("truncate", truncate)):
        if v is not None or k in ("beta_fast", "mscale"):  # also a literal null for some
            rs[k] = v
    if with_omax:
        rs["original_max_position_embeddings"] = omax
    max_pos = int(omax * ratio)
    if deepseek:
        if prf is not None:
            return
        d = dict(model_type="deepseek_v3", hidden_size=1024, num_attention_heads=8,
                 qk_rope_head_dim=head_dim, qk_nope_head_dim=64, v_head_dim=64,
                 max_position_embeddings=max_pos, rope_theta=theta, rope_scaling=rs)
    else:
        extra = {} if prf is None else {"partial_rotary_factor": prf}
        d = _base(head_dim, theta, max_pos, rope_scaling=rs, **extra)
        if int(head_dim * (prf or 1.0)) % 2:
            return
    cfg = hf_config(d)
    assert_matches_hf(RopeParams.from_config(d), cfg)
    assert_matches_hf(RopeParams.from_config(cfg), cfg)


@_random
@given(head_dim=_head_dims, theta=_thetas, factor=st.floats(1.0, 32.0),
       low=st.floats(0.25, 4.0), gap=st.floats(0.1, 16.0), omax=_lengths)
def test_random_llama3(head_dim, theta, factor, low, gap, omax):
    d = _base(head_dim, theta, omax * 16, rope_scaling={
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
        "high_freq_factor": low + gap, "original_max_position_embeddings": omax})
    cfg = hf_config(d)
    assert_matches_hf(RopeParams.from_config(d), cfg)


@_random
@given(data=st.data(), head_dim=_head_dims, theta=_thetas, omax=_lengths, ratio=st.floats(1.0, 64.0),
       factor=st.none() | st.floats(1.0, 64.0), attention_factor=st.none() | st.floats(0.5, 2.0),
       top_level_omax=st.booleans())
def test_random_longrope(data, head_dim, theta, omax, ratio, factor, attention_factor, top_level_omax):
    """LongRoPE with random factor lists, short and long, factor / attention_factor given or
    not, the original length in the rope dict or at the top level (Phi-3 style)."""
    n = head_dim // 2
    lists = st.lists(st.floats(1.0, 100.0), min_size=n, max_size=n)
    rs = {"rope_type": "longrope", "short_factor": data.draw(lists), "long_factor": data.draw(lists)}
    if factor is not None:
        rs["factor"] = factor
    if attention_factor is not None:
        rs["attention_factor"] = attention_factor
    extra = {}
    if top_level_omax:
        extra["original_max_position_embeddings"] = omax
    else:
        rs["original_max_position_embeddings"] = omax
    d = _base(head_dim, theta, int(omax * ratio), rope_scaling=rs, **extra)
    cfg = hf_config(d)
    ours = RopeParams.from_config(d)
    for seq_len in (None, omax, omax + 1, 4 * omax):
        mine = ours if seq_len is None else ours.for_seq_len(seq_len)
        assert_matches_hf(mine, cfg, seq_len=seq_len)


@_random
@given(head_dim=st.sampled_from([64, 128, 256, 512]), theta=_thetas, factor=_factors,
       prf=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
def test_random_proportional(head_dim, theta, factor, prf):
    """Gemma 4's proportional rope: exponent over the whole head, zero frequencies after."""
    d = _base(head_dim, theta, 8192, rope_parameters={
        "rope_type": "proportional", "rope_theta": theta, "factor": factor, "partial_rotary_factor": prf})
    d.pop("rope_theta")
    cfg = hf_config(d)
    assert_matches_hf(RopeParams.from_config(d), cfg)


# --------------------------------------------------------------------------------------
# Sequence-length dependent methods: against transformers' rotary modules
# --------------------------------------------------------------------------------------
def _module_inv_freq(module, seq_len):
    """Run a transformers rotary module on positions 0..seq_len-1; return its inv_freq and
    attention scaling as dynamic_rope_update left them."""
    pos = torch.arange(seq_len)[None]
    module(torch.zeros(1, 1, 1), pos)
    return module.inv_freq.clone(), float(module.attention_scaling)


def test_dynamic_tracker_follows_transformers_module():
    """RopeTracker hands out the frequencies LlamaRotaryEmbedding's dynamic_rope_update uses:
    recomputed only when a sequence is longer than any before, kept for a shorter one that is
    still past max_position_embeddings, reset once back within it. (The module computes the
    new base from an int64 tensor, i.e. in float32 -- we use float64 -- hence <= 1e-6.)"""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d = _base(64, 10000.0, 256, rope_scaling={"rope_type": "dynamic", "factor": 3.0})
    module = LlamaRotaryEmbedding(hf_config(d))
    tracker = RopeTracker(RopeParams.from_config(d))
    for n in (100, 256, 300, 900, 500, 257, 1000, 100, 400, 50, 256, 2000):
        inv, att = _module_inv_freq(module, n)
        ours = tracker.update(n)
        assert rel(ours.inv_freq, inv) <= REL, n
        assert ours.cos_sin_scale == att
    # the kept-after-growth rule is real: after 900, a 500-long sequence keeps 900's base
    tracker = RopeTracker(RopeParams.from_config(d))
    tracker.update(900)
    assert tracker.update(500) is tracker.initial.for_seq_len(900)
    assert tracker.update(500) is not tracker.initial.for_seq_len(500)


def test_longrope_tracker_follows_transformers_module():
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    d = copy.deepcopy(REAL_CONFIGS["Phi-3-mini-128k"])
    d.update(max_position_embeddings=512, original_max_position_embeddings=128)
    module = Phi3RotaryEmbedding(hf_config(d))
    tracker = RopeTracker(RopeParams.from_config(d))
    for n in (10, 128, 129, 50, 512, 128, 600):
        inv, att = _module_inv_freq(module, n)
        ours = tracker.update(n)
        assert torch.equal(ours.inv_freq, inv), n
        assert rel(ours.cos_sin_scale, att) <= REL


def test_for_seq_len_is_identity_for_fixed_methods():
    for name in REAL_CONFIGS:
        p = RopeParams.from_config(REAL_CONFIGS[name])
        if p.rope_type == "longrope":
            assert p.is_seq_len_dependent and p.seq_len_threshold == 4096
            continue
        assert not p.is_seq_len_dependent and p.seq_len_threshold is None
        assert p.for_seq_len(10**7) is p and RopeTracker(p).update(10**7) is p


def test_ntk_static_equals_dynamic_at_matching_length():
    """Static NTK with factor a equals dynamic NTK at the length where
    factor * L / max_pos - (factor - 1) == a (here L = 2 max_pos, a = factor + 1)."""
    for dim, base, f, max_pos in ((128, 10000.0, 2.0, 4096), (64, 5e5, 7.0, 8192), (96, 1e6, 3.0, 2048)):
        dyn = RopeParams.dynamic(dim, base, f, max_pos).for_seq_len(2 * max_pos)
        ntk = RopeParams.ntk(dim, base, f + 1)
        assert torch.equal(dyn.inv_freq, ntk.inv_freq)
        # and the definition: lowest frequency stretched by exactly the factor
        plain = RopeParams.default(dim, base)
        lo = (plain.inv_freq[-1].double() / ntk.inv_freq[-1].double()).item()
        assert abs(lo - (f + 1)) / (f + 1) < 1e-5
        assert torch.equal(ntk.inv_freq[0], plain.inv_freq[0])
    assert RopeParams.from_config(_base(128, 1e4, 4096, rope_scaling={"type": "ntk", "factor": 4.0})).rope_type == "ntk"


def test_per_layer_rope_parameters():
    """Gemma-3-style rope dicts per layer type: pick one with layer_type=."""
    d = dict(model_type="llama", hidden_size=512, num_attention_heads=4, head_dim=128,
             max_position_embeddings=8192, layer_types=["sliding_attention", "full_attention"],
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    full = RopeParams.from_config(d, layer_type="full_attention")
    local = RopeParams.from_config(d, layer_type="sliding_attention")
    assert full.rope_type == "linear" and local.rope_type == "default"
    assert torch.equal(full.inv_freq, RopeParams.linear(128, 1e6, 8.0).inv_freq)
    with pytest.raises(ValueError, match="layer_type"):
        RopeParams.from_config(d)
    with pytest.raises(ValueError, match="chunked"):
        RopeParams.from_config(d, layer_type="chunked")


def test_text_config_is_read_for_multimodal_configs():
    inner = copy.deepcopy(REAL_CONFIGS["Qwen3-8B"])
    outer = {"model_type": "some_vlm", "text_config": inner, "vision_config": {"hidden_size": 3}}
    assert torch.equal(RopeParams.from_config(outer).inv_freq, RopeParams.from_config(inner).inv_freq)


def test_package_does_not_import_transformers():
    code = (
        "import sys, yarn_triton\n"
        "p = yarn_triton.RopeParams.from_config(" + repr(REAL_CONFIGS["Qwen3-8B"]) + ")\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_from_config_params_rotate_like_transformers(kdev):
    """End to end: our op with from_config params against transformers' own rotary module
    and apply_rotary_pos_emb (neox layout, float32, short positions)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    from yarn_triton import apply_rope_

    for name in ("Qwen3-8B", "Llama-3.1-8B", "gpt-oss-20b"):
        d = REAL_CONFIGS[name]
        cfg = hf_config(d)
        params = RopeParams.from_config(d)
        g = torch.Generator().manual_seed(0)
        S, H, D = 40, 2, params.rope_dim
        q = torch.randn(1, S, H, D, generator=g)
        k = torch.randn(1, S, H, D, generator=g)
        pos = torch.arange(S)[None] * 97
        cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)
        q_ref, k_ref = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        qd, kd = q.to(kdev).clone(), k.to(kdev).clone()
        apply_rope_(qd, kd, pos.to(kdev), params)
        for out, ref in ((qd, q_ref), (kd, k_ref)):
            err = ((out.cpu().transpose(1, 2).double() - ref.double()).norm() / ref.double().norm()).item()
            assert err < 2e-5, (name, err)


# --------------------------------------------------------------------------------------
# Edge cases where the references disagree
# --------------------------------------------------------------------------------------
def _deepseek(**rope):
    rs = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
          "beta_fast": 32, "beta_slow": 1}
    rs.update(rope)
    rs = {k: v for k, v in rs.items() if v is not None}
    return dict(model_type="deepseek_v3", hidden_size=7168, num_attention_heads=128,
                qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                max_position_embeddings=163840, rope_theta=10000, rope_scaling=rs)


def test_edge_mscale_without_mscale_all_dim():
    """``mscale`` given, ``mscale_all_dim`` absent.

    * DeepSeek (seed, ``RopeParams.yarn``): mscale_all_dim defaults to 0, so cos/sin get
      ``get_mscale(f, mscale)`` -- here 0.1*0.707*ln 40 + 1.
    * transformers: uses the ratio only when *both* are non-zero, else ``get_mscale(f)``
      with coefficient 1 -- ``mscale`` is ignored.
    * Both: no softmax change (mscale_all_dim is 0/absent).

    from_config follows transformers (the library that will run such a config);
    RopeParams.yarn keeps the seed's behaviour.
    """
    d = _deepseek(mscale=0.707)
    ours = RopeParams.from_config(d)
    assert_matches_hf(ours, hf_config(d))
    assert ours.cos_sin_scale == pytest.approx(0.1 * math.log(40) + 1, rel=1e-12)
    assert ours.softmax_scale_factor == 1.0
    seed = RopeParams.yarn(64, 10000, 40, 4096, 32, 1, mscale=0.707)
    assert seed.cos_sin_scale == pytest.approx(0.1 * 0.707 * math.log(40) + 1, rel=1e-12)
    assert seed.softmax_scale_factor == 1.0
    assert torch.equal(seed.inv_freq, ours.inv_freq)


def test_edge_mscale_all_dim_without_mscale():
    """``mscale_all_dim`` given, ``mscale`` absent.

    * DeepSeek (seed): mscale defaults to 1, cos/sin get
      ``get_mscale(f, 1) / get_mscale(f, mscale_all_dim)``; softmax
      ``get_mscale(f, mscale_all_dim)**2``.
    * transformers: ``mscale`` is missing so no ratio: cos/sin ``get_mscale(f)``; its
      DeepSeek attention still applies the softmax factor ``get_mscale(f, mscale_all_dim)**2``.

    So the two disagree on cos/sin by ``get_mscale(f, mscale_all_dim)``. from_config follows
    transformers; RopeParams.yarn the seed. (Every published DeepSeek config sets both.)
    """
    d = _deepseek(mscale_all_dim=0.707)
    ours = RopeParams.from_config(d)
    cfg = hf_config(d)
    assert_matches_hf(ours, cfg)
    g1, g707 = 0.1 * math.log(40) + 1, 0.0707 * math.log(40) + 1
    assert ours.cos_sin_scale == pytest.approx(g1, rel=1e-12)
    assert ours.softmax_scale_factor == pytest.approx(g707**2, rel=1e-12)
    seed = RopeParams.yarn(64, 10000, 40, 4096, 32, 1, mscale_all_dim=0.707)
    assert seed.cos_sin_scale == pytest.approx(g1 / g707, rel=1e-12)
    assert seed.softmax_scale_factor == pytest.approx(g707**2, rel=1e-12)


def test_edge_explicit_attention_factor():
    """An explicit ``attention_factor`` (transformers only; the seed has no such argument)
    replaces the computed cos/sin factor entirely, mscale ratio included. The softmax
    factor is untouched: DeepSeek attention derives it from mscale_all_dim alone."""
    d = _deepseek(mscale=1.0, mscale_all_dim=1.0, attention_factor=1.25)
    ours = RopeParams.from_config(d)
    assert_matches_hf(ours, hf_config(d))
    assert ours.cos_sin_scale == 1.25
    assert ours.softmax_scale_factor == pytest.approx((0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    q = copy.deepcopy(REAL_CONFIGS["Qwen3-8B"])
    q["rope_scaling"]["attention_factor"] = 1.0
    ours = RopeParams.from_config(q)
    assert_matches_hf(ours, hf_config(q))
    assert ours.cos_sin_scale == 1.0


def test_edge_truncate_false():
    """``truncate: false`` (gpt-oss; transformers only): the ramp bounds stay fractional
    instead of floor/ceil. The seed always truncates. The frequencies differ inside the
    ramp and agree outside it; we follow transformers for configs, the seed in
    RopeParams.yarn."""
    d = REAL_CONFIGS["gpt-oss-20b"]
    ours = RopeParams.from_config(d)
    assert_matches_hf(ours, hf_config(d))
    t = copy.deepcopy(d)
    t["rope_scaling"]["truncate"] = True
    truncated = RopeParams.from_config(t)
    assert_matches_hf(truncated, hf_config(t))
    seed = RopeParams.yarn(64, 150000, 32, 4096, 32, 1)
    assert torch.equal(seed.inv_freq, truncated.inv_freq)
    differ = ours.inv_freq != truncated.inv_freq
    assert differ.any()
    assert (ours.inv_freq[0] == truncated.inv_freq[0]) and (ours.inv_freq[-1] == truncated.inv_freq[-1])


def test_edge_no_original_max_position_embeddings():
    """YaRN without ``original_max_position_embeddings``: transformers' standardisation
    falls back to ``max_position_embeddings`` (the ramp is then placed for the *extended*
    length); the seed's default is 4096. from_config follows transformers. A top-level
    ``original_max_position_embeddings`` (Phi-3 style) is read too."""
    d = copy.deepcopy(REAL_CONFIGS["Qwen3-8B"])
    del d["rope_scaling"]["original_max_position_embeddings"]
    ours = RopeParams.from_config(d)
    assert_matches_hf(ours, hf_config(d))
    assert torch.equal(ours.inv_freq, RopeParams.yarn_hf(128, 1e6, 4.0, 40960).inv_freq)
    assert not torch.equal(ours.inv_freq, RopeParams.from_config(REAL_CONFIGS["Qwen3-8B"]).inv_freq)
    d["original_max_position_embeddings"] = 32768  # at the top level instead
    top = RopeParams.from_config(d)
    assert_matches_hf(top, hf_config(d))
    assert torch.equal(top.inv_freq, RopeParams.from_config(REAL_CONFIGS["Qwen3-8B"]).inv_freq)


def test_edge_factor_not_replaced_by_length_ratio():
    """Transformers 4.4x-4.5x replaced a given ``factor`` by
    ``max_position_embeddings / original_max_position_embeddings`` whenever the latter was
    in the rope dict; the installed transformers (5.x) uses that ratio only when ``factor``
    is null. For Qwen3 (40960 / 32768 = 1.25 vs factor 4) this changes everything; we follow
    the installed version: factor 4. A null factor takes the ratio."""
    d = REAL_CONFIGS["Qwen3-8B"]
    ours = RopeParams.from_config(d)
    assert ours.cos_sin_scale == pytest.approx(0.1 * math.log(4) + 1, rel=1e-12)
    n = copy.deepcopy(d)
    n["rope_scaling"]["factor"] = None
    ratio = RopeParams.from_config(n)
    assert_matches_hf(ratio, hf_config(n))
    assert ratio.cos_sin_scale == pytest.approx(0.1 * math.log(1.25) + 1, rel=1e-12)
    assert torch.equal(ratio.inv_freq, RopeParams.yarn_hf(128, 1e6, 1.25, 32768).inv_freq)


@pytest.mark.parametrize("value", [None, 0])
def test_edge_beta_null_or_zero(value):
    """``beta_fast`` / ``beta_slow`` null or 0: transformers reads them with ``or``, so
    both mean the defaults 32 / 1. DeepSeek's code would divide by zero (0) or fail on
    None; the seed flavour refuses them with a ValueError/TypeError. from_config follows
    transformers."""
    d = _deepseek(mscale=1.0, mscale_all_dim=1.0)
    d["rope_scaling"].update(beta_fast=value, beta_slow=value)
    ours = RopeParams.from_config(d)
    assert_matches_hf(ours, hf_config(d))
    assert torch.equal(ours.inv_freq, RopeParams.from_config(REAL_CONFIGS["DeepSeek-V3"]).inv_freq)
    with pytest.raises((ValueError, TypeError), match="beta_fast"):
        RopeParams.yarn(64, 10000, 40, 4096, value, value)


def test_edge_beta_fast_equals_beta_slow():
    """``beta_fast == beta_slow`` (Kimi K2: 1 / 1). Both references compute the same: the
    correction dim of 1 rotation, floored and ceiled, gives a one-dimension-wide ramp; if
    that dim is an integer (or ``truncate`` is false) the bounds coincide and both nudge the
    upper one by 0.001 -- a step. We match both."""
    d = REAL_CONFIGS["Kimi-K2"]
    ours = RopeParams.from_config(d)
    assert_matches_hf(ours, hf_config(d))
    seed = RopeParams.yarn(64, 50000.0, 32, 4096, 1, 1, 1.0, 1.0)
    assert torch.equal(seed.inv_freq, ours.inv_freq)
    # truncate false: low == high exactly -> the 0.001 nudge, a hard step
    t = copy.deepcopy(d)
    t["rope_scaling"]["truncate"] = False
    step = RopeParams.from_config(t)
    assert_matches_hf(step, hf_config(t))
    plain = RopeParams.default(64, 50000.0).inv_freq
    kept = step.inv_freq == plain
    assert kept.any() and (~kept).any()
    assert torch.allclose(step.inv_freq[~kept], plain[~kept] / 32, rtol=1e-6, atol=0)
    # beta equal and the correction dim an integer: base chosen so cd(1) == 10 exactly-ish
    base = (4096 / (2 * math.pi)) ** (64 / 20)
    for trunc in (True, False):
        e = _deepseek(beta_fast=2.0, beta_slow=2.0, truncate=trunc)
        e["rope_theta"] = base
        assert_matches_hf(RopeParams.from_config(e), hf_config(e))


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
def test_unknown_type_lists_supported():
    d = _base(128, 1e4, 4096, rope_scaling={"type": "xpos", "factor": 2.0})
    with pytest.raises(ValueError) as e:
        RopeParams.from_config(d)
    msg = str(e.value)
    assert "'xpos'" in msg
    for t in SUPPORTED_ROPE_TYPES:
        assert t in msg


@pytest.mark.parametrize(
    "rope, missing",
    [
        ({"rope_type": "linear"}, "factor"),
        ({"rope_type": "dynamic"}, "factor"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 4096}, "factor"),
        ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
          "high_freq_factor": 4.0}, "low_freq_factor"),
        ({"rope_type": "llama3", "factor": 8.0}, "'low_freq_factor', 'high_freq_factor'"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 64}, "long_factor"),
    ],
)
def test_missing_keys_are_named(rope, missing):
    with pytest.raises(ValueError, match=missing):
        RopeParams.from_config(_base(128, 1e4, 4096, rope_scaling=rope))


def test_missing_sizes_are_named():
    with pytest.raises(ValueError, match="num_attention_heads"):
        RopeParams.from_config({"hidden_size": 4096, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        RopeParams.from_config({"head_dim": 64, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeParams.from_config({"head_dim": 64, "rope_scaling": {"type": "yarn", "factor": 2.0}})


@pytest.mark.parametrize(
    "patch, names",
    [
        ({"rope_scaling": {"type": "yarn", "rope_type": "linear", "factor": 4.0}}, ["rope_type", "type"]),
        ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, ["rope_theta"]),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0},
          "rope_parameters": {"rope_type": "linear", "factor": 4.0}}, ["factor", "rope_scaling", "rope_parameters"]),
        ({"partial_rotary_factor": 0.5,
          "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}}, ["partial_rotary_factor"]),
        ({"original_max_position_embeddings": 4096,
          "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}},
         ["original_max_position_embeddings"]),
    ],
)
def test_contradictory_keys_are_named(patch, names):
    d = _base(128, None, 32768)
    d.pop("rope_theta")
    d.update(patch)
    with pytest.raises(ValueError, match="contradictory") as e:
        RopeParams.from_config(d)
    for n in names:
        assert n in str(e.value)


def test_bad_config_kinds():
    with pytest.raises(TypeError, match="PretrainedConfig"):
        RopeParams.from_config(42)
    with pytest.raises(FileNotFoundError):
        RopeParams.from_config("/nonexistent/config.json")


def test_constructor_argument_errors():
    with pytest.raises(ValueError, match="short_factor"):
        RopeParams.longrope(8, 1e4, [1.0] * 3, [1.0] * 4, 16, factor=2.0)
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeParams.llama3(64, 5e5, 8.0, 4.0, 1.0, 8192)
    with pytest.raises(ValueError, match="factor"):
        RopeParams.linear(64, 1e4, 0.0)
    with pytest.raises(ValueError, match="seq_len"):
        RopeParams.dynamic(64, 1e4, 2.0, 128).for_seq_len(-1)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeParams.yarn_hf(64, 1e4, 4.0)


# --------------------------------------------------------------------------------------
# Against the rotary module of tiny models built by transformers (issue 15)
# --------------------------------------------------------------------------------------
_TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16384, pad_token_id=0)
_TINY_MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=16,
                 moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
_TINY_DSA = dict(_TINY_MLA, index_head_dim=16, index_n_heads=2, index_topk=4)
_TINY_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 2048,
         "beta_fast": 32.0, "beta_slow": 1.0}
_YARN_MSCALE = dict(_YARN, mscale=1.0, mscale_all_dim=1.0)

# name: (model_type, config kwargs); the model type is the part of the name before "/"
TINY_MODELS = {
    # Mistral Small 4: MLA whose config sets head_dim = qk_nope + qk_rope and
    # partial_rotary_factor = qk_rope / head_dim; the rope runs on the qk_rope slice.
    "mistral4": ("mistral4", dict(_TINY, **_TINY_MLA, rope_parameters=dict(_YARN_MSCALE))),
    "mistral4/equal-split": ("mistral4", dict(_TINY, **dict(_TINY_MLA, qk_rope_head_dim=32),
                                             rope_parameters=dict(_YARN_MSCALE, llama_4_scaling_beta=0.1))),
    "mistral4/class-default-rope": ("mistral4", dict(_TINY, **_TINY_MLA)),
    "mistral_large4_text": ("mistral_large4_text", dict(_TINY, **_TINY_DSA, rope_parameters=dict(_YARN))),
    "deepseek_v32": ("deepseek_v32", dict(_TINY, **_TINY_DSA, rope_parameters=dict(_YARN_MSCALE))),
    "glm4_moe_lite": ("glm4_moe_lite", dict(_TINY, **_TINY_MLA, rope_parameters=dict(_YARN_MSCALE))),
    "qwen3_moe": ("qwen3_moe", dict(_TINY, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16, rope_parameters=dict(_YARN))),
    "gpt_oss": ("gpt_oss", dict(_TINY, head_dim=16, **_TINY_MOE, rope_parameters=dict(_YARN, truncate=False))),
    "ministral3": ("ministral3", dict(_TINY, head_dim=16,
                                      rope_parameters=dict(_YARN_MSCALE, llama_4_scaling_beta=0.1))),
    # MiniMax-M2 checkpoints give the rotary width as a legacy `rotary_dim`.
    "minimax_m2": ("minimax_m2", dict(_TINY, head_dim=16, rotary_dim=8, **_TINY_MOE, rope_parameters=dict(_YARN))),
    "phi3": ("phi3", dict(_TINY, original_max_position_embeddings=2048, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0,
        "short_factor": [1.0 + i / 10 for i in range(8)], "long_factor": [2.0 + i for i in range(8)]})),
    # Phi-4-mini style: partial rotary factor 0.75 with LongRoPE lists for the rotated part
    "phi3/partial": ("phi3", dict(_TINY, partial_rotary_factor=0.75, original_max_position_embeddings=2048,
                                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "short_factor": [1.5] * 6, "long_factor": [4.0] * 6})),
}


def _tiny_model(name):
    model_type, kwargs = TINY_MODELS[name]
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"the installed transformers has no {model_type!r} model")
    cfg = AutoConfig.for_model(model_type, **copy.deepcopy(kwargs))
    torch.manual_seed(0)
    return cfg, transformers.AutoModel.from_config(cfg)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_model_rotary_module_matches(name, tmp_path):
    """inv_freq and the cos/sin factor of each model's own rotary module, and the softmax
    factor of its attention (``scaling * sqrt(qk head dim)``), from the config object, its
    dict and the config.json that save_pretrained writes."""
    cfg, model = _tiny_model(name)
    rotary = [m for n, m in model.named_modules() if n.endswith("rotary_emb")]
    assert len(rotary) == 1, name
    inv, att = rotary[0].inv_freq, float(rotary[0].attention_scaling)
    if name == "minimax_m2" and 2 * inv.numel() != getattr(cfg, "rotary_dim", 2 * inv.numel()):
        pytest.skip(f"transformers {transformers.__version__} ignores MiniMax-M2's rotary_dim (later releases honour it)")
    attn = next(m for n, m in model.named_modules() if n.endswith("self_attn"))
    softmax = attn.scaling * math.sqrt(getattr(attn, "qk_head_dim", None) or attn.head_dim)
    cfg.save_pretrained(tmp_path)
    for source in (cfg, cfg.to_dict(), tmp_path):
        ours = RopeParams.from_config(source)
        assert ours.rope_dim == 2 * inv.numel(), (name, source)
        assert torch.equal(ours.inv_freq, inv.float()), (name, source)
        assert rel(ours.cos_sin_scale, att) <= 1e-12, (name, ours.cos_sin_scale, att)
        assert rel(ours.softmax_scale_factor, softmax) <= 1e-12, (name, ours.softmax_scale_factor, softmax)


def test_mistral4_rotates_the_rope_slice_only():
    """Mistral 4's rotary width is qk_rope_head_dim, not qk_rope_head_dim times its
    partial_rotary_factor (which is a fraction of the whole qk head), and a config.json
    without the factor gets the one Mistral4Config would set."""
    cfg, model = _tiny_model("mistral4")
    assert cfg.head_dim == 48 and abs(cfg.rope_parameters["partial_rotary_factor"] - 16 / 48) < 1e-15
    ours = RopeParams.from_config(cfg)
    assert ours.rope_dim == cfg.qk_rope_head_dim == 16
    bare = dict(model_type="mistral4", **_TINY, **_TINY_MLA, rope_parameters=dict(_YARN_MSCALE))
    assert torch.equal(RopeParams.from_config(bare).inv_freq, model.rotary_emb.inv_freq)
    # a DeepSeek-style MLA config with the same sizes: head_dim is the rope slice there
    deepseek = dict(bare, model_type="deepseek_v3")
    assert torch.equal(RopeParams.from_config(deepseek).inv_freq, ours.inv_freq)


def test_minimax_rotary_dim_from_config_json():
    """MiniMax-M2's config.json gives rotary_dim (no partial_rotary_factor); a top-level or
    rope-dict partial_rotary_factor wins over it, as in MiniMaxM2Config."""
    d = dict(model_type="minimax_m2", hidden_size=3072, num_attention_heads=48, head_dim=128, rotary_dim=64,
             max_position_embeddings=196608, rope_theta=5e6)
    assert RopeParams.from_config(d).rope_dim == 64
    assert RopeParams.from_config(dict(d, partial_rotary_factor=0.25)).rope_dim == 32
    assert RopeParams.from_config(dict(d, model_type="llama")).rope_dim == 128  # rotary_dim is MiniMax's
    modeling = pytest.importorskip("transformers.models.minimax_m2.modeling_minimax_m2")
    module = modeling.MiniMaxM2RotaryEmbedding(hf_config(d))
    if module.inv_freq.numel() * 2 != 64:
        pytest.skip(f"transformers {transformers.__version__} ignores MiniMax-M2's rotary_dim (later releases honour it)")
    assert torch.equal(RopeParams.from_config(d).inv_freq, module.inv_freq)
