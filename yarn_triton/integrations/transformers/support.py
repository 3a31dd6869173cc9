"""The model-support table: which ``config.model_type`` values the switch supports, what
it fuses in each (:class:`ModelSupport`, :data:`MODEL_SUPPORT`), how a modeling file's rope
functions map onto the fused op (:class:`RopeFunction`, :data:`ROPE_FUNCTIONS`), and the
markdown of ``docs/models.md`` generated from it (:func:`supported_models_markdown`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple


@dataclass(frozen=True)
class RopeFunction:
    """How one rope function of a modeling file maps onto the fused op.

    Attributes:
        layout: channel layout of its rotation (``"neox"``, ``"interleaved"``,
            ``"deepseek"``).
        pair: ``fn(q, k, cos, sin, ...) -> (q, k)`` (``k`` may be None); False for
            ``fn(x, cos, sin, ...) -> x``.
        trailing: rotates the last ``rope_dim`` channels of each head (DeepSeek-V4)
            rather than the first.
    """

    layout: str
    pair: bool = True
    trailing: bool = False


#: Module-level rope functions of transformers' modeling files -> layout of their channels
#: (the ``(q, k, cos, sin)`` functions; a model type may override one in its table row).
ROPE_FUNCTIONS: Dict[str, str] = {
    "apply_rotary_pos_emb": "neox",
    "apply_rotary_pos_emb_interleave": "deepseek",
    "apply_rotary_emb": "interleaved",
}
_DEFAULT_FUNCTIONS: Dict[str, RopeFunction] = {n: RopeFunction(lay) for n, lay in ROPE_FUNCTIONS.items()}

#: Modeling-file function that computes Llama-4 style query scaling (Ministral-3, Mistral-4).
_Q_SCALE_FUNCTION = "get_llama_4_attn_scale"


@dataclass(frozen=True)
class ModelSupport:
    """One supported ``config.model_type``: what it is and what the switch does to it.

    Attributes:
        model_type: the ``config.model_type`` (for a multimodal wrapper, the one of its
            text config, e.g. ``"mistral_large4_text"``).
        family: ``"dense"``, ``"moe"``, ``"mla"`` (multi-head latent attention) or
            ``"deepseek_v4"``.
        rope: the rope type(s) its released configs use.
        layout: our layout(s) of its rotated channels.
        partial_rotary: which channels of a head rotate.
        fused: the rope sites that run in the fused op.
        not_fused: what stays transformers' own, and why ("" for nothing).
        functions: rope functions whose mapping differs from :data:`ROPE_FUNCTIONS`.
        fuse_q_scale: the Llama-4 query scale (``llama_4_scaling_beta``) is applied to q in
            the rope pass (the op's ``q_scale``), and transformers' multiply is skipped.
        q_scale_lead: with ``fuse_q_scale``, the config attribute giving the number of
            pass-through channels that precede the rope part of each query head but that
            the rope function does not see (Mistral-4's ``qk_nope_head_dim``): the scale is
            then fused only where those channels lie right before the rope part in memory
            and nothing needs a gradient (one in-place call on the whole heads,
            ``rotary_at="end"``); elsewhere transformers' multiply runs.
        freq_scale_param: name of a learned parameter ``a`` of the rotary embedding whose
            frequencies are ``inv_freq * exp(a)`` (Mistral-Large-4's ``alpha``).
        rope_labels: the rotary takes ``layer_type=<label>`` and keeps one set of params
            per label (DeepSeek-V4's ``main`` / ``compress``).
        fuse_qk_norm: the attention's per-head ``q_norm``/``k_norm`` (RMSNorm, scaled by
            ``weight`` or by ``1 + weight``) run in the rope call
            (:func:`yarn_triton.apply_qk_norm_rope_`).
        mrope: ``"sectioned"`` or ``"interleaved"`` for a multimodal rope (M-RoPE) whose
            rotary takes ``[3, B, S]`` position ids (time, height, width); None otherwise.
    """

    model_type: str
    family: str
    rope: str
    layout: str
    partial_rotary: str
    fused: str
    not_fused: str = ""
    functions: Mapping[str, RopeFunction] = field(default_factory=dict)
    fuse_q_scale: bool = False
    q_scale_lead: Optional[str] = None
    freq_scale_param: Optional[str] = None
    rope_labels: bool = False
    fuse_qk_norm: bool = False
    mrope: Optional[str] = None

    def function(self, name: str) -> RopeFunction:
        """The mapping of the modeling file's function ``name``."""
        return self.functions.get(name) or _DEFAULT_FUNCTIONS[name]


_QK = "q, k"
_QK_NORM_FUSED = "q, k, with their per-head RMSNorm (`q_norm`, `k_norm`) in the same pass"
_QK_NORM1_FUSED = ("q, k, with their per-head `(1 + weight)` RMSNorm (`q_norm`, `k_norm`) in the same pass; "
                   "linear-attention (Gated DeltaNet) layers have no rope and are untouched")
_MLA = "q_rot, k_rot (MLA)"
_MROPE_S = "M-RoPE, sectioned (t, h, w); default or yarn"
_MROPE_I = "M-RoPE, interleaved (t, h, w); default or yarn"
_MROPE_35 = "M-RoPE, interleaved (t, h, w); yarn (theta 1e7, factor 4)"
_PARTIAL_35 = "`partial_rotary_factor` (leading 64 of 256 channels)"
_V4_ROPE = RopeFunction("interleaved", pair=False, trailing=True)

#: The supported model types, one row each; :data:`SUPPORTED_MODEL_TYPES` and
#: ``docs/models.md`` are generated from it, and the tests iterate over it.
MODEL_SUPPORT: Dict[str, ModelSupport] = {
    s.model_type: s
    for s in (
        ModelSupport("llama", "dense", "any (yarn, llama3, dynamic, ...)", "neox", "no", _QK),
        ModelSupport("mistral", "dense", "any", "neox", "no", _QK),
        ModelSupport("qwen2", "dense", "any (yarn)", "neox", "no", _QK),
        ModelSupport("qwen3", "dense", "any (yarn)", "neox", "no", _QK_NORM_FUSED, fuse_qk_norm=True),
        ModelSupport("ministral3", "dense", "yarn + llama-4 query scale", "neox", "no",
                     _QK + "; query scale (`llama_4_scaling_beta`) in the same pass",
                     fuse_q_scale=True),
        ModelSupport("phi3", "dense", "longrope (short/long factors)", "neox",
                     "`partial_rotary_factor` (leading channels)", _QK),
        ModelSupport("qwen3_moe", "moe", "yarn", "neox", "no", _QK_NORM_FUSED, fuse_qk_norm=True),
        ModelSupport("gpt_oss", "moe", "yarn (x32, no truncation)", "neox", "no", _QK),
        ModelSupport("minimax_m2", "moe", "default / yarn", "neox",
                     "`rotary_dim` (leading channels)", _QK),
        ModelSupport("deepseek_v2", "mla", "yarn (mscale)", "interleaved (complex)",
                     "`qk_rope_head_dim`", _MLA),
        ModelSupport("deepseek_v3", "mla", "yarn (mscale)",
                     "deepseek (`rope_interleave`), else neox", "`qk_rope_head_dim`", _MLA),
        ModelSupport("glm4_moe_lite", "mla", "yarn / default",
                     "deepseek (`rope_interleave`), else neox", "`qk_rope_head_dim`", _MLA),
        ModelSupport("deepseek_v32", "mla", "yarn (mscale)",
                     "deepseek (attention), neox (indexer)", "`qk_rope_head_dim`",
                     _MLA + "; indexer q, k"),
        ModelSupport("mistral_large4_text", "mla", "yarn, learned `alpha` on the frequencies",
                     "deepseek", "`qk_rope_head_dim`; NoPE layers untouched",
                     _MLA + " (q alone on KV-sharing layers); indexer q, k",
                     "the per-head log-position query scaling (not rope)",
                     freq_scale_param="alpha"),
        ModelSupport("mistral4", "mla", "yarn + llama-4 query scale",
                     "deepseek (`rope_interleave`), else neox", "`qk_rope_head_dim`",
                     _MLA + "; without gradients, the llama-4 query scale in the same pass "
                     "(one in-place call on whole query heads, no-rope channels included)",
                     "the llama-4 query scale when a gradient is needed (training: its own "
                     "multiply, after the fused rope of q_rot, k_rot), under torch.compile "
                     "(Dynamo cannot read the storage offset that locates q_nope), or when the "
                     "query heads are not one `[q_nope, q_rope]` block in memory",
                     fuse_q_scale=True, q_scale_lead="qk_nope_head_dim"),
        ModelSupport("deepseek_v4", "deepseek_v4",
                     "per layer: `main` (default, theta 1e4) on sliding layers, `compress` "
                     "(yarn, theta 1.6e5) on compressed layers",
                     "interleaved (GPT-J pairs)", "trailing `head_dim * partial_rotary_factor`",
                     "q, kv; compressor entries; indexer entries and q; inverse rotation "
                     "of the attention output",
                     functions={"apply_rotary_pos_emb": _V4_ROPE}, rope_labels=True),
        # Multimodal rope: the text models of the Qwen VL families and Qwen3.5 (the
        # `...ForConditionalGeneration` / `...Model` wrappers are found through them).
        ModelSupport("qwen2_vl_text", "dense", _MROPE_S, "neox", "no", _QK, mrope="sectioned"),
        ModelSupport("qwen2_5_vl_text", "dense", _MROPE_S, "neox", "no", _QK, mrope="sectioned"),
        ModelSupport("qwen3_vl_text", "dense", _MROPE_I, "neox", "no", _QK_NORM_FUSED,
                     fuse_qk_norm=True, mrope="interleaved"),
        ModelSupport("qwen3_vl_moe_text", "moe", _MROPE_I, "neox", "no", _QK_NORM_FUSED,
                     fuse_qk_norm=True, mrope="interleaved"),
        ModelSupport("qwen3_5_text", "dense", _MROPE_35, "neox", _PARTIAL_35, _QK_NORM1_FUSED,
                     fuse_qk_norm=True, mrope="interleaved"),
        ModelSupport("qwen3_5_moe_text", "moe", _MROPE_35, "neox", _PARTIAL_35, _QK_NORM1_FUSED,
                     fuse_qk_norm=True, mrope="interleaved"),
    )
}

#: ``config.model_type`` values this integration supports (:data:`MODEL_SUPPORT`'s keys).
SUPPORTED_MODEL_TYPES: Tuple[str, ...] = tuple(MODEL_SUPPORT)


def supported_models_markdown() -> str:
    """The table of ``docs/models.md``: one row per :data:`MODEL_SUPPORT` entry."""
    rows = [
        "| model type | family | rope | layout | partial rotary | fused | stays transformers' |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in MODEL_SUPPORT.values():
        rows.append(
            f"| `{s.model_type}` | {s.family} | {s.rope} | {s.layout} | {s.partial_rotary} "
            f"| {s.fused} | {s.not_fused or '-'} |"
        )
    return "\n".join(rows) + "\n"
