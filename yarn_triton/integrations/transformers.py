"""Switch a loaded Hugging Face transformers model to the fused rope kernel, and back.

::

    from yarn_triton.integrations.transformers import enable_fused_rope, disable_fused_rope

    model = AutoModelForCausalLM.from_pretrained(...)
    enable_fused_rope(model)     # rope now runs in the Triton kernel, params from model.config
    model.generate(...)
    disable_fused_rope(model)    # the model's own rope again

The model types it supports are the rows of :data:`MODEL_SUPPORT` (listed with their rope
type, layout, partial rotary and what is fused in ``docs/models.md``, which is generated
from the same table by :func:`supported_models_markdown`); the tests iterate over that
table.

How it hooks in (transformers 5.x). The base model computes its rope once per forward in
``self.rotary_emb`` (``rotary_emb(hidden_states, position_ids)`` returns cos/sin, or
DeepSeek-V2's complex ``freqs_cis``; DeepSeek-V4 asks it once per rope label,
``layer_type="main"`` / ``"compress"``, and its compressors and indexers own rotaries of
their own) and hands the result to the attention layers as ``position_embeddings``; the
attention code rotates with a module-level function of its modeling file:

* ``apply_rotary_pos_emb(q, k, cos, sin)`` (Llama family, most models): rotate_half ->
  our ``"neox"`` layout, on the first ``rope_dim`` channels of each head (partial rotary:
  Phi-3, MiniMax-M2);
* ``apply_rotary_pos_emb_interleave`` (DeepSeek-V3 style MLA with
  ``rope_interleave=True``): adjacent pairs in, halves out -> ``"deepseek"``;
* ``apply_rotary_emb`` (DeepSeek-V2, complex ``freqs_cis``): adjacent pairs in and out ->
  ``"interleaved"``;
* DeepSeek-V4's ``apply_rotary_pos_emb(x, cos, sin)``: one tensor, GPT-J pairs
  (``"interleaved"``) on the *trailing* ``rope_dim`` channels; called with ``-sin`` to
  de-rotate the attention output.

:func:`enable_fused_rope` makes these changes:

1. it swaps every ``rotary_emb`` submodule for a :class:`FusedRotaryEmbedding` that
   returns a :class:`FusedRopePositions` -- the position ids plus the
   :class:`~yarn_triton.RopeParams` of the asked rope label -- in place of cos/sin (it
   unpacks as ``cos, sin``, answers ``.to()``, and ``-sin`` marks the inverse rotation,
   so the attention code passes it on untouched);
2. it replaces those module-level functions with a dispatcher that, when handed a
   :class:`FusedRopePositions`, rotates with the fused op -- in place on the views the
   attention code passes, or out of place and differentiable when autograd records --
   and otherwise calls the original function unchanged;
3. for models that scale the query after rope by a per-position factor (Ministral-3's
   ``llama_4_scaling_beta``), the dispatcher hands that scale to the fused op
   (``q_scale=QueryScale(beta, original_max_position_embeddings)``), which applies it to q
   in the same pass as the rotation, and the modeling file's ``get_llama_4_attn_scale``
   hands the attention code a neutral factor for that call. Mistral-4 scales whole query
   heads ``[q_nope | q_rope]`` while its rope function sees only ``q_rope``: when nothing
   needs a gradient and ``q_nope`` lies right before ``q_rope`` in memory, the dispatcher
   runs one in-place call on the whole heads (``rotary_at="end"``), which scales
   ``q_nope`` too; otherwise (training, other layouts) it rotates ``q_rope`` alone and
   transformers' own multiply runs;
4. for models whose attention normalises every head of q and k right before rope (Qwen3,
   Qwen3-MoE: ``q_norm``/``k_norm``, per-head RMSNorm), it replaces those two modules by
   :class:`_DeferredQKNorm`, which hands its input back unchanged and leaves the norm to
   the rope call of the same attention call: the dispatcher then runs
   :func:`yarn_triton.apply_qk_norm_rope_` (norm and rotation in one pass). Hooks on the
   attention module bound the deferral to one call, and the dispatcher checks (in eager
   mode) that the q and k it receives are views of the deferred norms' inputs; anything
   else raises rather than skip a norm. The norm class is probed when switching: it must
   scale by ``weight`` or by ``1 + weight`` (Qwen3.5, passed on as ``unit_offset=True``).
   Qwen3-VL and Qwen3.5 (dense and MoE) take this path too;
5. for multimodal rope (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5), whose text model
   hands its rotary ``position_ids`` of shape ``[3, B, S]`` (time, height, width; the
   rope delta of decode steps already added) and whose rotary recomposes cos/sin per
   frequency pair from the three streams, the handle carries those ``[3, B, S]`` ids and
   the params carry the sections (sectioned or interleaved, checked against the rotary's
   ``mrope_section`` and the model type): the fused op picks the stream per pair itself,
   and transformers' cos/sin and their recomposition are never computed. ``[B, S]`` ids
   (or ``[1, B, S]``) mean text: the same position on all three streams.

The function swaps are process-wide but only change what happens for models that were
switched; they are undone when the last switched model is switched back. The attention
code, the KV cache, masks, the attention backend and the softmax scale stay transformers'
own. What this relies on is checked when switching (and by the tests against the installed
transformers): ``rotary_emb`` submodules, attention code that calls the functions above by
name, and a rope whose ``inv_freq`` / ``attention_scaling`` match
:meth:`RopeParams.from_config` of the model's config. Rope types whose frequencies change
with the sequence length (dynamic NTK, longrope) follow transformers' rule for picking them
per forward through a :class:`~yarn_triton.RopeTracker`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

import transformers  # noqa: F401  (this integration is only imported when transformers is wanted)

from .. import op as _op
from ..rope import RopeParams, RopeTracker

__all__ = [
    "MODEL_SUPPORT",
    "SUPPORTED_MODEL_TYPES",
    "ROPE_FUNCTIONS",
    "ModelSupport",
    "RopeFunction",
    "FusedRopePositions",
    "FusedRotaryEmbedding",
    "enable_fused_rope",
    "disable_fused_rope",
    "is_fused_rope_enabled",
    "fused_rope",
    "supported_models_markdown",
]


# --------------------------------------------------------------------------------------
# What each supported model type is, and how its rope functions map onto the fused op
# --------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------
# What flows from the rotary embedding to the attention layers
# --------------------------------------------------------------------------------------
class FusedRopePositions:
    """Stands in for the ``(cos, sin)`` pair (or ``freqs_cis``) of a switched model.

    Holds the position ids and the params; unpacks as ``cos, sin`` (both itself),
    ``.to(...)`` returns itself, and ``-handle`` is the same handle marked for the inverse
    rotation (what ``cos, -sin`` means), so attention code passes it to its rope function
    untouched. ``q_scale`` is the :class:`~yarn_triton.op.QueryScale` ``(beta,
    original_max_position_embeddings)`` of a Llama-4 query scale that the rope call applies
    to q in the same pass, or None. ``q_lead``: the number of query channels before the
    rope part of each head that the rope function is not handed but the scale covers
    (Mistral-4's ``qk_nope_head_dim``), 0 when it sees whole heads.
    """

    __slots__ = ("positions", "params", "inverse", "q_scale", "q_lead")

    def __init__(
        self,
        positions: torch.Tensor,
        params: RopeParams,
        inverse: bool = False,
        q_scale: Optional[_op.QueryScale] = None,
        q_lead: int = 0,
    ) -> None:
        self.positions = positions
        self.params = params
        self.inverse = inverse
        self.q_scale = q_scale
        self.q_lead = q_lead

    def __iter__(self) -> Iterator["FusedRopePositions"]:
        return iter((self, self))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> "FusedRopePositions":
        return (self, self)[i]

    def __neg__(self) -> "FusedRopePositions":
        return FusedRopePositions(self.positions, self.params, not self.inverse, self.q_scale, self.q_lead)

    def to(self, *args, **kwargs) -> "FusedRopePositions":
        return self

    def rotate(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor],
        layout: str,
        head_axis: int = 1,
        inverse: bool = False,
        norm: Optional[Tuple[torch.Tensor, torch.Tensor, float, bool]] = None,
        q_scale: Optional[_op.QueryScale] = None,
        rotary_at: str = "start",
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rotate ``q`` (and ``k`` unless None) whose heads are at ``head_axis``
        (``[B, H, S, D]`` for 1), on their first ``params.rope_dim`` channels (their last
        ones for ``rotary_at="end"``); with
        ``norm = (q_weight, k_weight, eps, unit_offset)``, RMSNorm every head first (same
        pass); with ``q_scale``, scale every channel of q by its Llama-4 query scale after
        (same pass).

        In place on the given views under no-grad (returns the same tensors), out of place
        when autograd records."""
        pos = self.positions
        if pos.device != q.device:
            pos = pos.to(q.device)
        qv = q.movedim(head_axis, -2)
        kv = None if k is None else k.movedim(head_axis, -2)
        qo, ko = _rope(qv, kv, pos, self.params, layout, inverse, norm, q_scale, rotary_at)
        if qo is qv and ko is kv:
            return q, k
        return qo.movedim(-2, head_axis), (None if ko is None else ko.movedim(-2, head_axis))

    def __repr__(self) -> str:
        inv = ", inverse" if self.inverse else ""
        return f"FusedRopePositions(positions={tuple(self.positions.shape)}, {self.params!r}{inv})"


def _rope(q, k, positions, params, layout, inverse, norm=None, q_scale=None, rotary_at="start"):
    """The fused op on ``[*T, H, D]`` views: in place (:func:`yarn_triton.apply_rope_`,
    the same tensors come back) unless autograd records for q or k, then the
    differentiable out-of-place :func:`yarn_triton.apply_rope`. With ``norm``, the same
    through :func:`yarn_triton.apply_qk_norm_rope_` / :func:`yarn_triton.apply_qk_norm_rope`
    (autograd also records for the norm weights); ``norm = (q_weight, k_weight, eps,
    unit_offset)``. ``q_scale`` and ``rotary_at`` go to the op as they are (the Llama-4 query
    scale, same pass; where each head's rotary part lies)."""
    if norm is not None:
        qw, kw, eps, unit = norm
        if inverse:
            raise NotImplementedError("a deferred q/k norm before an inverse rotation")
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, qw, kw)):
            return _op.apply_qk_norm_rope(q, k, positions, params, qw, kw, eps=eps, unit_offset=unit,
                                          layout=layout, q_scale=q_scale, rotary_at=rotary_at)
        _op.apply_qk_norm_rope_(q, _unit_strides_like(k, q), positions, params, qw, kw, eps=eps, unit_offset=unit,
                                layout=layout, q_scale=q_scale, rotary_at=rotary_at)
        return q, k
    if torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad)):
        return _op.apply_rope(q, k, positions, params, layout=layout, inverse=inverse, q_scale=q_scale,
                              rotary_at=rotary_at)
    _op.apply_rope_(q, _unit_strides_like(k, q), positions, params, layout=layout, inverse=inverse,
                    q_scale=q_scale, rotary_at=rotary_at)
    return q, k


def _unit_strides_like(k: Optional[torch.Tensor], q: torch.Tensor) -> Optional[torch.Tensor]:
    """``k``, with the strides of its size-1 dims set to ``q``'s (the same elements).

    Views of one fused projection (Phi-3's ``qkv``) at one token per sequence (decode)
    differ only there, and the op's q/k overlap check treats any stride difference as a
    possible overlap."""
    if k is None or k.stride() == q.stride() or k.dim() != q.dim() or torch.compiler.is_compiling():
        return k
    strides = [qs if n == 1 and m == 1 else ks for n, m, ks, qs in zip(k.shape, q.shape, k.stride(), q.stride())]
    if strides == list(k.stride()):
        return k
    return k.as_strided(k.shape, strides, k.storage_offset())


def _whole_heads(q_rot: torch.Tensor, lead: int) -> Optional[torch.Tensor]:
    """The view of whole query heads ``[lead channels | q_rot]`` when the ``lead``
    channels of each head lie right before ``q_rot``'s in memory (``q_rot`` being the
    trailing part of a split along the last dim, Mistral-4's ``q_pass, q_rot``), the
    view's elements within ``q_rot``'s storage and distinct; else None."""
    if lead <= 0 or q_rot.dim() < 2 or q_rot.stride(-1) != 1 or any(s < 0 for s in q_rot.stride()):
        return None
    offset = q_rot.storage_offset() - lead
    if offset < 0:
        return None
    shape = tuple(q_rot.shape[:-1]) + (lead + q_rot.shape[-1],)
    if any(n == 0 for n in shape):
        return None
    last = offset + sum((n - 1) * st for n, st in zip(shape, q_rot.stride()))
    if last >= q_rot.untyped_storage().nbytes() // q_rot.element_size():
        return None
    whole = q_rot.as_strided(shape, q_rot.stride(), offset)
    if _op._self_overlapping(whole):  # heads closer than a whole head apart
        return None
    return whole


# --------------------------------------------------------------------------------------
# Query scaling (Llama-4 style, Ministral-3): applied by the rope call itself (q_scale)
# --------------------------------------------------------------------------------------
class _Unit:
    """The neutral factor handed to attention code whose query was already scaled:
    ``.to()`` returns itself and ``q * unit`` is ``q`` (no pass over q)."""

    __slots__ = ()

    def to(self, *args, **kwargs) -> "_Unit":
        return self

    def __rmul__(self, other):
        return other

    __mul__ = __rmul__

    def __repr__(self) -> str:
        return "<query already scaled>"


_UNIT = _Unit()
# One-shot hand-over from the rope dispatcher to the query-scale dispatcher of the same
# attention call: the positions tensor whose query the rope call just scaled. Per thread.
_HANDOVER = threading.local()


class _QScaleDispatch:
    """Stands in for ``get_llama_4_attn_scale``: neutral right after the rope call of the
    same attention call scaled the query in its pass (same positions object), else the
    original."""

    def __init__(self, original) -> None:
        functools.update_wrapper(self, plain_function(original))
        self.original = original

    def __call__(self, positions_ids, *args, **kwargs):
        pending = getattr(_HANDOVER, "positions", None)
        if pending is not None:
            _HANDOVER.positions = None
            if pending is positions_ids:
                if torch.compiler.is_compiling():
                    # graphs cannot hold the neutral object; x * 1 is exact and free once fused
                    return torch.ones((), dtype=torch.float32, device=positions_ids.device)
                return _UNIT
        return self.original(positions_ids, *args, **kwargs)


# --------------------------------------------------------------------------------------
# Per-head q/k RMSNorm moved into the rope call (Qwen3, Qwen3-MoE, Qwen3-VL, Qwen3.5)
# --------------------------------------------------------------------------------------
# Per thread: ``attn``, the switched attention module whose call is running (set by its
# forward pre-hook, only when it was handed a FusedRopePositions); ``q``/``k``, the norm
# deferred during that call, as ``(deferring module, its input)`` -- the input is None
# under torch.compile, where only the order of the calls is relied on.
_QK_NORM = threading.local()


class _DeferredQKNorm(nn.Module):
    """Stands in for a switched attention's ``q_norm`` / ``k_norm`` (per-head RMSNorm).

    Inside a call of its attention that was handed a :class:`FusedRopePositions`, it
    returns its input unchanged and records itself; the rope dispatcher of the same call
    then normalises and rotates in one pass (:func:`_take_qk_norm`). Anywhere else (called
    on its own, by an attention handed real cos/sin) it is the original norm. It holds the
    original's ``weight`` Parameter itself (same object: state-dict keys and optimizers see
    no change); the original module is kept outside the module tree for
    :func:`disable_fused_rope`. ``unit_offset``: the norm scales by ``1 + weight``
    (Qwen3.5), found by :func:`_qk_norm_sites`."""

    def __init__(self, original: nn.Module, attn: nn.Module, role: str, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = original.weight
        self.eps = _norm_eps(original)
        self.unit_offset = unit_offset
        self.role = role
        object.__setattr__(self, "_attn", attn)  # not submodules: no cycle, no new state keys
        object.__setattr__(self, "_original", original)
        self._handles: list = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = _QK_NORM
        if getattr(st, "attn", None) is not self._attn or getattr(st, self.role, None) is not None:
            # not inside a switched call of its own attention (or asked twice in one): the norm
            return self.restored()(x)
        # deferred: x goes on un-normed; the rope dispatcher (or the post-hook) takes this up
        setattr(st, self.role, (self, None if torch.compiler.is_compiling() else x))
        return x

    def restored(self) -> nn.Module:
        """The original norm module, holding the current weight (one that replaced it while
        switched, e.g. ``load_state_dict(assign=True)``, carries over)."""
        original = self._original
        if original.weight is not self.weight:
            original.weight = self.weight
        return original

    def extra_repr(self) -> str:
        scale = "1 + weight" if self.unit_offset else "weight"
        return f"{tuple(self.weight.shape)}, eps={self.eps}, scale={scale}, deferred to the rope call"


def _qk_norm_pre_hook(attn: nn.Module, args, kwargs) -> None:
    # Norms defer only during a call handed the switch's rope handle (not real cos/sin).
    live = any(isinstance(v, FusedRopePositions) for v in (*args, *kwargs.values()))
    _QK_NORM.attn = attn if live else None
    _QK_NORM.q = _QK_NORM.k = None


def _qk_norm_post_hook(attn: nn.Module, args, output) -> None:
    # always_call=True: also ends the deferral when the forward raised.
    left = getattr(_QK_NORM, "q", None) is not None or getattr(_QK_NORM, "k", None) is not None
    _QK_NORM.attn = _QK_NORM.q = _QK_NORM.k = None
    if left:
        raise RuntimeError(
            f"{type(attn).__name__}: a q_norm/k_norm deferred to the fused rope call was not consumed by "
            "it; this attention's output skipped the norm. The attention code differs from what "
            "enable_fused_rope expects: switch the model back (disable_fused_rope)"
        )


def _same_elements(t: torch.Tensor, x: torch.Tensor) -> bool:
    """``t`` is ``x`` with its dims permuted (the attention's ``transpose(1, 2)``), the
    head dim (the one the norm reduces over) last in both."""
    return (t.data_ptr() == x.data_ptr() and t.shape[-1] == x.shape[-1] and t.stride(-1) == x.stride(-1)
            and sorted(zip(t.shape, t.stride())) == sorted(zip(x.shape, x.stride())))


def _take_qk_norm(q: torch.Tensor, k: Optional[torch.Tensor]):
    """``(q_weight, k_weight, eps, unit_offset)`` of the q and k norms deferred in this
    attention call (consumed), or None when none is pending. Raises unless both are pending
    and, in eager mode, ``q``/``k`` are views of exactly the tensors they were handed."""
    st = _QK_NORM
    pq, pk = getattr(st, "q", None), getattr(st, "k", None)
    if pq is None and pk is None:
        return None
    st.q = st.k = None
    if pq is None or pk is None or k is None or not (
        torch.compiler.is_compiling() or (_same_elements(q, pq[1]) and _same_elements(k, pk[1]))
    ):
        raise RuntimeError(
            "the fused rope call did not get the q and k whose q_norm/k_norm were deferred to it; the "
            "attention code differs from what enable_fused_rope expects: switch the model back "
            "(disable_fused_rope)"
        )
    return pq[0].weight, pk[0].weight, pq[0].eps, pq[0].unit_offset


def _norm_eps(norm: nn.Module):
    """The eps of an RMSNorm module: ``variance_epsilon`` (Llama style) or ``eps``."""
    eps = getattr(norm, "variance_epsilon", None)
    return getattr(norm, "eps", None) if eps is None else eps


def _norm_form(norm: nn.Module, w: torch.Tensor, eps: float) -> Optional[bool]:
    """Which RMSNorm ``norm`` computes, probed on a small input with a random weight put in
    for this one call (``torch.func.functional_call``: the module is not changed):
    ``x * rsqrt(mean(x^2) + eps) * weight`` -> False, the same times ``(1 + weight)`` ->
    True (Qwen3.5, Gemma), anything else -> None."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, w.numel(), generator=g).to(w.device, w.dtype)
    probe = (0.5 + torch.rand(w.numel(), generator=g)).to(w.device, w.dtype)  # 1 + probe differs from probe
    with torch.no_grad():
        out = torch.func.functional_call(norm, {"weight": probe}, (x,)).float()
        xf, pf = x.float(), probe.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        for unit, scale in ((False, pf), (True, 1.0 + pf)):
            if torch.allclose(out, normed * scale, rtol=2e-2, atol=2e-2 * float(scale.abs().max())):
                return unit
    return None


def _qk_norm_sites(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    """``(attention, unit_offset)`` for the attention modules whose ``q_norm``/``k_norm``
    can move into the rope call: their forward calls both and ``apply_rotary_pos_emb``,
    and both are the RMSNorm the fused op computes over ``head_dim`` (scaled by ``weight``,
    or by ``1 + weight`` for ``unit_offset``: probed once per norm class), one eps."""
    sites, forms = [], {}
    for m in model.modules():
        norms = (m._modules.get("q_norm"), m._modules.get("k_norm"))
        names = set(getattr(getattr(inspect.unwrap(type(m).forward), "__code__", None), "co_names", ()))
        if None in norms or not {"q_norm", "k_norm", "apply_rotary_pos_emb"} <= names:
            continue
        for n in norms:
            w, eps = getattr(n, "weight", None), _norm_eps(n)
            if not (isinstance(w, nn.Parameter) and tuple(w.shape) == (getattr(m, "head_dim", -1),)
                    and isinstance(eps, float) and eps > 0):
                raise NotImplementedError(f"{type(m).__name__}'s {type(n).__name__} is not a per-head RMSNorm "
                                          "(`weight` [head_dim], `variance_epsilon` or `eps`); cannot fuse it")
            if type(n) not in forms:
                if w.is_meta:
                    raise NotImplementedError(f"{type(n).__name__} has its weight on the meta device; load the "
                                              "model before switching it")
                forms[type(n)] = _norm_form(n, w, eps)
                if forms[type(n)] is None:
                    raise NotImplementedError(f"{type(n).__name__} computes neither x * rsqrt(mean(x^2) + eps) "
                                              "* weight nor the same times (1 + weight); cannot fuse it")
        if forms[type(norms[0])] != forms[type(norms[1])]:
            raise NotImplementedError(f"{type(m).__name__}: q_norm and k_norm scale differently; cannot fuse them")
        if _norm_eps(norms[0]) != _norm_eps(norms[1]):
            raise NotImplementedError(f"{type(m).__name__}: q_norm and k_norm have different eps; cannot fuse them")
        sites.append((m, forms[type(norms[0])]))
    if not sites:
        raise NotImplementedError(f"{type(model).__name__} has no attention with q_norm/k_norm before "
                                  "apply_rotary_pos_emb; cannot fuse them")
    return sites


def _defer_qk_norm(attn: nn.Module, unit_offset: bool = False) -> None:
    q = _DeferredQKNorm(attn.q_norm, attn, "q", unit_offset)
    k = _DeferredQKNorm(attn.k_norm, attn, "k", unit_offset)
    q._handles = [attn.register_forward_pre_hook(_qk_norm_pre_hook, with_kwargs=True),
                  attn.register_forward_hook(_qk_norm_post_hook, always_call=True)]
    attn.q_norm, attn.k_norm = q, k


def _restore_qk_norms(model: nn.Module) -> None:
    for m in list(model.modules()):
        for name in ("q_norm", "k_norm"):
            d = m._modules.get(name)
            if isinstance(d, _DeferredQKNorm):
                for h in d._handles:
                    h.remove()
                setattr(m, name, d.restored())


# --------------------------------------------------------------------------------------
# The dispatcher that stands in for the modeling file's rope function
# --------------------------------------------------------------------------------------
def plain_function(fn: Callable) -> Callable:
    """The Python function behind a modeling file's module-level function ``fn``: ``fn``
    itself, or the one a hub-kernels wrapper calls. With the ``kernels`` package installed
    (a dependency of transformers >= 5.25), ``@use_kernel_forward_from_hub`` turns e.g.
    ``apply_rotary_pos_emb`` into a ``Func`` module whose ``forward(*args, **kwargs)``
    calls the original (closure variable ``func``) unless a hub kernel was activated; its
    signature is the original's. ``functools.wraps`` layers are followed first."""
    fn = inspect.unwrap(fn)
    if inspect.isfunction(fn):
        return fn
    forward = getattr(type(fn), "forward", None)
    code = getattr(forward, "__code__", None)
    cells = dict(zip(getattr(code, "co_freevars", ()), getattr(forward, "__closure__", None) or ()))
    inner = cells["func"].cell_contents if "func" in cells else None
    return inner if inspect.isfunction(inner) else fn


class _RopeDispatch:
    """Calls the fused op when handed a :class:`FusedRopePositions`, else the original
    (as the modeling file holds it: a hub-kernels wrapper stays in the path)."""

    def __init__(self, original, spec: RopeFunction) -> None:
        plain = plain_function(original)
        functools.update_wrapper(self, plain)
        self.original = original
        self.spec = spec
        self.layout = spec.layout
        self._sig = inspect.signature(plain)
        params = list(self._sig.parameters)
        need = 3 if spec.pair else 2
        if len(params) < need:
            name = getattr(plain, "__qualname__", type(plain).__name__)
            raise NotImplementedError(f"unexpected signature of {name}{self._sig}")
        if spec.pair:
            self._q, self._k = params[0], params[1]
        else:
            self._q, self._k = params[0], None
        # apply_rotary_pos_emb*(q, k, cos, sin, unsqueeze_dim=1): heads at unsqueeze_dim;
        # DeepSeek-V2's apply_rotary_emb(xq, xk, freqs_cis) unsqueezes dim 1 in its body.
        self._axis = "unsqueeze_dim" if "unsqueeze_dim" in self._sig.parameters else None

    def __call__(self, *args, **kwargs):
        if not any(isinstance(a, FusedRopePositions) for a in args) and not any(
            isinstance(a, FusedRopePositions) for a in kwargs.values()
        ):
            return self.original(*args, **kwargs)
        bound = self._sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        handles = [v for v in a.values() if isinstance(v, FusedRopePositions)]
        first, last = handles[0], handles[-1]
        for h in handles[1:]:
            if h.params is not first.params or h.positions is not first.positions:
                raise ValueError("the cos and sin handed to the rope function come from different rope calls")
        if len(handles) > 1 and first.inverse:
            raise NotImplementedError("a negated cos is not a rotation; only `cos, -sin` (the inverse) is")
        inverse = last.inverse  # `cos, -sin`
        axis = a[self._axis] if self._axis is not None else 1
        q = a[self._q]
        if not self.spec.pair:
            return self._rotate_one(q, first, axis, inverse)
        k = a[self._k]
        norm = _take_qk_norm(q, k)
        if first.q_scale is not None and first.q_lead:
            return self._rotate_scaling_whole_heads(q, k, first, axis, inverse, norm)
        # the query scale (Ministral-3) is applied by the same kernel pass
        q, k = first.rotate(q, k, self.layout, axis, inverse, norm, first.q_scale)
        if first.q_scale is not None:
            _HANDOVER.positions = first.positions
        return q, k

    def _rotate_scaling_whole_heads(self, q, k, handle: FusedRopePositions, axis: int, inverse: bool, norm):
        """Mistral-4: ``q`` is the rope part of query heads whose ``handle.q_lead``
        pass-through channels the query scale covers too. With nothing needing a gradient
        and those channels right before ``q`` in memory: one in-place call on the whole
        heads (``rotary_at="end"``) rotates and scales them, and transformers' multiply
        becomes neutral. Otherwise the rotation alone, and transformers scales (under
        autograd, scaling the other channels in place behind its back would be wrong)."""
        grad = torch.is_grad_enabled() and (q.requires_grad or (k is not None and k.requires_grad))
        whole = None
        if not grad and not inverse and norm is None and not torch.compiler.is_compiling():
            whole = _whole_heads(q, handle.q_lead)
            if whole is not None and k is not None and _op._may_overlap(whole, k):
                whole = None
        if whole is None:
            return handle.rotate(q, k, self.layout, axis, inverse, norm, None)
        handle.rotate(whole, k, self.layout, axis, False, None, handle.q_scale, rotary_at="end")
        _HANDOVER.positions = handle.positions
        return q, k

    def _rotate_one(self, x: torch.Tensor, handle: FusedRopePositions, axis: int, inverse: bool):
        rot = handle.params.rope_dim
        d = x.shape[-1]
        if d < rot:
            raise ValueError(f"the rope function got {d} channels per head, fewer than rope_dim={rot}")
        view = x[..., d - rot:] if self.spec.trailing else x[..., :rot]
        out, _ = handle.rotate(view, None, self.layout, axis, inverse)
        if out is view:
            return x
        if rot == d:
            return out
        return torch.cat((x[..., : d - rot], out) if self.spec.trailing else (out, x[..., rot:]), dim=-1)


_LOCK = threading.RLock()
# (module name, function name) -> [dispatcher, module globals, number of switched users]
_INSTALLED: Dict[Tuple[str, str], list] = {}


def _acquire(module_globals: dict, name: str, spec: Optional[RopeFunction]) -> Tuple[str, str]:
    key = (module_globals["__name__"], name)
    entry = _INSTALLED.get(key)
    if entry is None:
        original = module_globals[name]
        dispatch = _QScaleDispatch(original) if spec is None else _RopeDispatch(original, spec)
        module_globals[name] = dispatch
        _INSTALLED[key] = entry = [dispatch, module_globals, 0]
    elif spec is not None and entry[0].spec != spec:
        raise NotImplementedError(
            f"{key[0]}.{key[1]} is already switched as {entry[0].spec}, not {spec}"
        )
    entry[2] += 1
    return key


def _release(key: Tuple[str, str]) -> None:
    entry = _INSTALLED.get(key)
    if entry is None:
        return
    entry[2] -= 1
    if entry[2] <= 0:
        dispatch, module_globals, _ = entry
        if module_globals.get(key[1]) is dispatch:
            module_globals[key[1]] = dispatch.original
        del _INSTALLED[key]


# --------------------------------------------------------------------------------------
# The replacement rotary embedding
# --------------------------------------------------------------------------------------
class _LearnedFreqScale:
    """Frequencies ``inv_freq * exp(a)`` with ``a`` a learned parameter of the rotary
    (Mistral-Large-4's ``alpha``): the params follow ``a`` when it changes (checked by
    its version counter in eager forwards)."""

    def __init__(self, base: RopeParams, param: torch.Tensor, name: str) -> None:
        if base.is_seq_len_dependent:
            raise NotImplementedError(f"a learned `{name}` with rope type {base.rope_type!r} is not supported")
        self.base, self.param, self.name = base, param, name
        self.version = -1
        self.params = base
        self.refresh()

    def refresh(self) -> RopeParams:
        v = self.param._version
        if v != self.version:
            scale = self.param.detach().to(device="cpu", dtype=torch.float32).exp()
            b = self.base
            self.params = RopeParams(b.inv_freq * scale, b.rope_dim, b.cos_sin_scale,
                                     b.softmax_scale_factor, b.rope_type)
            self.version = v
        return self.params


def _mrope_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """The position ids an M-RoPE rotary was handed, as the fused op takes them:
    ``[3, B, S]`` (t, h, w) as they are; ``[1, B, S]`` and ``[B, S]`` (the rotary's
    ``expand(3, -1, -1)`` repeats them on all streams) as text ``[B, S]``."""
    if position_ids.dim() == 3 and position_ids.shape[0] == 1:
        return position_ids[0]
    if position_ids.dim() == 2 or (position_ids.dim() == 3 and position_ids.shape[0] == 3):
        return position_ids
    raise ValueError(
        f"M-RoPE position ids must be [3, batch, seq] (time, height, width) or [batch, seq] (text), got "
        f"shape {tuple(position_ids.shape)}"
    )


class FusedRotaryEmbedding(nn.Module):
    """Replaces a switched model's ``rotary_emb``: returns :class:`FusedRopePositions`
    instead of cos/sin. Keeps the original as ``.original`` (a submodule, so it follows
    ``.to()``) for :func:`disable_fused_rope`.

    For rope types whose frequencies depend on the sequence length (dynamic NTK,
    longrope) a :class:`~yarn_triton.RopeTracker` picks the params per forward from
    ``max(position_ids) + 1``, as transformers' ``dynamic_rope_update`` does (this reads
    one number back from the device, as transformers does too); for all others nothing is
    read and the params are fixed. A rotary with rope labels (``layer_type=``, DeepSeek-V4)
    keeps one set per label in ``by_label``.

    With M-RoPE params the handle carries ``[3, B, S]`` position ids (time, height, width)
    as the text model passes them; ``[B, S]`` or ``[1, B, S]`` ids (text: one position on
    all three streams, which the model's rotary broadcasts) are handed on as ``[B, S]``.
    """

    def __init__(
        self,
        original: nn.Module,
        params: Optional[RopeParams],
        hooks: List[Tuple[str, str]],
        tracker: Optional[RopeTracker] = None,
        *,
        by_label: Optional[Mapping[str, Tuple[RopeParams, Optional[RopeTracker]]]] = None,
        q_scale: Optional[_op.QueryScale] = None,
        freq_scale: Optional[_LearnedFreqScale] = None,
        q_lead: int = 0,
    ) -> None:
        super().__init__()
        self.original = original
        self.params = params
        self.tracker = tracker
        self.by_label = dict(by_label or {})
        self.q_scale = q_scale
        self.q_lead = q_lead
        self._freq_scale = freq_scale
        self._hooks = list(hooks)

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None, *args, **kwargs):
        if position_ids is None:
            raise ValueError("the fused rope needs position_ids")
        label = kwargs.get("layer_type", args[0] if args else None)
        if self.by_label:
            if label not in self.by_label:
                raise ValueError(f"rope label {label!r} is not one of {sorted(self.by_label)}")
            params, tracker = self.by_label[label]
        elif label is not None:
            # A rope per layer type (Gemma 3 style) would need params per type.
            raise NotImplementedError("rotary embeddings with per-layer-type rope are not supported")
        else:
            params, tracker = self.params, self.tracker
        if tracker is not None:
            params = tracker.update(int(position_ids.max()) + 1)
        elif self._freq_scale is not None:
            fs = self._freq_scale
            if torch.is_grad_enabled() and fs.param.requires_grad and self.training:
                raise RuntimeError(
                    f"the fused rope does not train the rotary's `{fs.name}`; freeze it "
                    f"(requires_grad_(False)) or switch the model back for training"
                )
            params = fs.params if torch.compiler.is_compiling() else fs.refresh()
        if params.mrope_section is not None:
            position_ids = _mrope_positions(position_ids)
        return FusedRopePositions(position_ids, params, False, self.q_scale, self.q_lead)

    def extra_repr(self) -> str:
        fns = ", ".join(sorted({f"{m.rsplit('.', 1)[-1]}.{n}" for m, n in self._hooks}))
        if self.by_label:
            ps = ", ".join(f"{k}={p!r}" for k, (p, _) in self.by_label.items())
        else:
            ps = repr(self.params)
        return f"{ps}, hooks=[{fns}]" + (f", q_scale={self.q_scale}" if self.q_scale else "")


# --------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------
def _rotary_sites(model: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    """``(parent, rotary_emb)`` for every module with a ``rotary_emb`` child."""
    sites = []
    for module in model.modules():
        child = module._modules.get("rotary_emb")
        if isinstance(child, nn.Module):
            sites.append((module, child))
    return sites


def _code_hooks(model: nn.Module, names) -> List[Tuple[dict, str]]:
    """``(module globals, function name)`` of the functions in ``names`` that the
    ``forward``s of the model's modules call by name."""
    found: Dict[Tuple[str, str], Tuple[dict, str]] = {}
    seen = set()
    for module in model.modules():
        cls = type(module)
        if cls in seen:
            continue
        seen.add(cls)
        forward = inspect.unwrap(cls.forward)
        code = getattr(forward, "__code__", None)
        g = getattr(forward, "__globals__", None)
        if code is None or g is None or "__name__" not in g:
            continue
        for name in names:
            if name in code.co_names and callable(g.get(name)):
                found[(g["__name__"], name)] = (g, name)
    return list(found.values())


def _attention_hooks(model: nn.Module) -> List[Tuple[dict, str]]:
    """``(module globals, function name)`` of the rope functions the model's attention
    ``forward``s call by name."""
    return _code_hooks(model, ROPE_FUNCTIONS)


def _config_of(model: nn.Module, parent: nn.Module, rotary: Optional[nn.Module] = None):
    """The (text) config a rotary embedding was built from."""
    config = getattr(rotary, "config", None) if rotary is not None else None
    config = config or getattr(parent, "config", None) or getattr(model, "config", None)
    if config is None:
        raise ValueError("the model has no .config; pass params= explicitly")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _row(model_type: Any) -> Optional[ModelSupport]:
    """The table row of ``model_type``, or of its text model ``<model_type>_text`` (a
    multimodal type whose text settings sit in its own, flat config, as older transformers'
    Qwen2-VL configs did)."""
    if not isinstance(model_type, str):
        return None
    return MODEL_SUPPORT.get(model_type) or MODEL_SUPPORT.get(model_type + "_text")


def _support_of(model: nn.Module, sites) -> Tuple[Optional[str], Optional[ModelSupport]]:
    """``(model type, its table row or None)``. A wrapper (multimodal) model whose own type
    is not in the table is looked up by the type of the config its rotaries were built
    from, when they all share one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in MODEL_SUPPORT:
        return model_type, MODEL_SUPPORT[model_type]
    inner = set()
    for parent, rotary in sites:
        try:
            inner.add(getattr(_config_of(model, parent, rotary), "model_type", None))
        except ValueError:
            inner.add(None)
    if len(inner) == 1:
        (t,) = inner
        row = _row(t)
        if row is not None:
            return row.model_type, row
    row = _row(model_type)
    return (model_type, None) if row is None else (row.model_type, row)


def _make_tracker(params: RopeParams, rotary: nn.Module) -> Optional[RopeTracker]:
    """A tracker for sequence-length dependent params, caught up with the state of the
    model's own rotary embedding (dynamic NTK remembers the longest length seen)."""
    if not params.is_seq_len_dependent:
        return None
    tracker = RopeTracker(params)
    cached = getattr(rotary, "max_seq_len_cached", None)
    if params.rope_type == "dynamic" and isinstance(cached, int) and cached > tracker.max_seq_len_cached:
        tracker.update(cached)
    return tracker


def _check_params(
    params: RopeParams, tracker: Optional[RopeTracker], rotary: nn.Module, prefix: str = ""
) -> None:
    """The params must reproduce the model's own rope (catches rope types or config
    readings that differ from the model's). ``prefix`` names a rope label's buffers
    (``"compress_"`` -> ``compress_inv_freq``, ``compress_attention_scaling``)."""
    if tracker is None:
        inv, current = getattr(rotary, f"{prefix}inv_freq", None), params
    elif params.rope_type == "dynamic":
        inv, current = getattr(rotary, f"{prefix}inv_freq", None), tracker.current
    else:  # longrope: the buffer holds whichever set the last call picked; check the initial one
        inv, current = getattr(rotary, f"{prefix}original_inv_freq", None), params
    if isinstance(inv, torch.Tensor):
        # ``model.to(torch.bfloat16)`` casts the buffer too (the model's own rope then runs
        # on rounded frequencies; ours keeps float32): compare at the buffer's precision.
        low = inv.dtype in (torch.float16, torch.bfloat16)
        ours = current.inv_freq.to(inv.dtype).float() if low else current.inv_freq
        rtol = torch.finfo(inv.dtype).eps if low else 1e-5
        inv = inv.detach().float().cpu()
        if inv.shape != ours.shape or not torch.allclose(ours, inv, rtol=rtol, atol=0.0):
            raise ValueError(
                f"the params' inv_freq ({current!r}) do not match the model's rotary_emb.{prefix}inv_freq "
                f"(shape {tuple(inv.shape)}); refusing to change the model's rope"
            )
    scale = getattr(rotary, f"{prefix}attention_scaling", None)
    if isinstance(scale, (int, float)) and abs(float(scale) - current.cos_sin_scale) > 1e-6 * max(
        1.0, abs(float(scale))
    ):
        raise ValueError(
            f"the params' cos_sin_scale={current.cos_sin_scale!r} does not match the model's "
            f"rotary_emb.{prefix}attention_scaling={scale!r}"
        )


def _check_mrope(params: RopeParams, rotary: nn.Module, support: Optional[ModelSupport]) -> None:
    """M-RoPE params must match the model's rotary: its ``mrope_section`` (transformers'
    class default when the config names none) and the sectioned / interleaved stream
    choice of the model type; a rotary without sections must get params without them."""
    theirs = getattr(rotary, "mrope_section", None)
    ours = params.mrope_section
    kind = support.mrope if support is not None else None
    if theirs is None and kind is None:
        if ours is not None:
            raise ValueError(f"the params carry mrope_section={list(ours)} but {type(rotary).__name__} has no "
                             "multimodal rope")
        return
    if theirs is None:
        raise NotImplementedError(f"{type(rotary).__name__} has no `mrope_section`; cannot switch its M-RoPE")
    if kind is None:
        raise NotImplementedError(f"{type(rotary).__name__} uses M-RoPE (mrope_section={list(theirs)}), but "
                                  "its model type is not in the table: sectioned or interleaved is unknown")
    if ours is None:
        raise ValueError(f"{type(rotary).__name__} uses M-RoPE (mrope_section={list(theirs)}), but the params "
                         "carry no sections; build them with RopeParams.from_config or .with_mrope(...)")
    if tuple(ours) != tuple(int(x) for x in theirs) or params.mrope_interleaved != (kind == "interleaved"):
        got = "interleaved" if params.mrope_interleaved else "sectioned"
        raise ValueError(f"the params' M-RoPE ({list(ours)}, {got}) does not match the model's "
                         f"({list(theirs)}, {kind}); refusing to change the model's rope")


def _label_config(config, label: str) -> Dict[str, Any]:
    """The flat config a labelled rotary (DeepSeek-V4) reads for ``label``: the label's
    rope dict, over ``head_dim`` (its ``partial_rotary_factor`` inside that dict), with the
    top-level rope fields -- which describe the ``main`` rope only -- left out."""
    d = config.to_dict()
    rope = (d.get("rope_parameters") or {}).get(label)
    if not isinstance(rope, Mapping):
        raise ValueError(f"the config's rope_parameters has no {label!r} entry")
    drop = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "qk_rope_head_dim")
    flat = {k: v for k, v in d.items() if k not in drop}
    flat["rope_parameters"] = dict(rope)
    return flat


def _site_params(model, parent, rotary, params, support, memo: Dict[Tuple[int, Optional[str]], RopeParams]):
    """``(params, tracker, by_label, freq_scale)`` for one rotary site, checked against it.
    Sites built from one config share one params object per label (``memo``), and with it
    the op's launch plans."""
    config = _config_of(model, parent, rotary)

    def read(label: Optional[str]) -> RopeParams:
        key = (id(config), label)
        if key not in memo:
            memo[key] = RopeParams.from_config(config if label is None else _label_config(config, label))
        return memo[key]

    if support is not None and support.rope_labels:
        labels = list(getattr(rotary, "layer_types", None) or [])
        if not labels:
            raise NotImplementedError(f"{type(rotary).__name__} has no rope labels (`layer_types`)")
        if params is not None:
            raise ValueError(f"{support.model_type} has one rope per label ({', '.join(labels)}); "
                             "params= cannot stand for all of them")
        by_label = {}
        for label in labels:
            p = read(label)
            t = _make_tracker(p, rotary)
            if t is not None:
                raise NotImplementedError(f"sequence-length dependent rope ({p.rope_type}) per label")
            _check_params(p, t, rotary, prefix=f"{label}_")
            by_label[label] = (p, t)
        return None, None, by_label, None
    p = params if params is not None else read(None)
    if not isinstance(p, RopeParams):
        raise TypeError(f"params must be a yarn_triton.RopeParams, got {type(p).__name__}")
    tracker = _make_tracker(p, rotary)
    _check_params(p, tracker, rotary)
    _check_mrope(p, rotary, support)
    freq_scale = None
    if support is not None and support.freq_scale_param is not None:
        learned = getattr(rotary, support.freq_scale_param, None)
        if not isinstance(learned, torch.Tensor) or learned.shape != p.inv_freq.shape:
            raise NotImplementedError(
                f"{type(rotary).__name__} has no `{support.freq_scale_param}` of shape {tuple(p.inv_freq.shape)}"
            )
        freq_scale = _LearnedFreqScale(p, learned, support.freq_scale_param)
    return p, tracker, None, freq_scale


def _q_scale_of(config) -> Optional[_op.QueryScale]:
    """The :class:`~yarn_triton.op.QueryScale` ``(beta, original_max_position_embeddings)``
    of a Llama-4 query scale, read where the attention code reads them; None when the
    config lacks one of them or holds values the fused op does not take (a non-finite
    beta, an original max that is not a positive integer): then the modeling file's own
    code runs, and does what it does."""
    rp = getattr(config, "rope_parameters", None) or {}
    beta, omax = rp.get("llama_4_scaling_beta"), rp.get("original_max_position_embeddings")
    if beta is None or omax is None:
        return None
    if isinstance(omax, float) and omax.is_integer():
        omax = int(omax)
    try:
        return _op.check_q_scale((beta, omax))
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def is_fused_rope_enabled(model: nn.Module) -> bool:
    """Whether :func:`enable_fused_rope` is in effect on ``model``."""
    return any(isinstance(r, FusedRotaryEmbedding) for _, r in _rotary_sites(model))


def enable_fused_rope(
    model: nn.Module, params: Optional[RopeParams] = None, *, strict: bool = True
) -> nn.Module:
    """Switch a loaded transformers model to the fused rope kernel (in place; returns it).

    Args:
        model: a ``*ForCausalLM`` / ``*Model`` (or a multimodal wrapper around one) of a
            type in :data:`SUPPORTED_MODEL_TYPES` (any dtype or device, before or after
            ``.to()``).
        params: the rope parameters; default ``RopeParams.from_config`` of the model's
            config. Checked against the model's own rotary embeddings (``inv_freq`` to
            1e-5 relative, ``attention_scaling``) either way. Not accepted for models with
            a rope per label (DeepSeek-V4), whose params are read per label.
        strict: refuse model types outside :data:`SUPPORTED_MODEL_TYPES`; with False any
            model whose structure matches (a ``rotary_emb`` submodule and attention that
            calls one of :data:`ROPE_FUNCTIONS`) is switched -- verify its outputs.

    Raises:
        NotImplementedError: unsupported model type or structure.
        ValueError: params that do not reproduce the model's rope.

    Calling it on a model that is already switched does nothing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    with _LOCK:
        sites = _rotary_sites(model)
        if any(isinstance(r, FusedRotaryEmbedding) for _, r in sites):
            return model
        model_type, support = _support_of(model, sites)
        if strict and support is None:
            raise NotImplementedError(
                f"model_type={model_type!r} is not supported by the fused rope switch; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (see docs/models.md). Pass strict=False to "
                "try anyway, and compare its outputs with the unswitched model's"
            )
        if not sites:
            raise NotImplementedError(
                f"{type(model).__name__} has no `rotary_emb` submodule; cannot switch its rope"
            )
        names = set(ROPE_FUNCTIONS) | set(support.functions if support else ())
        hooks = _code_hooks(model, names)
        if not hooks:
            raise NotImplementedError(
                f"no attention forward of {type(model).__name__} calls one of "
                f"{tuple(sorted(names))}; cannot switch its rope"
            )
        specs = [(g, n, support.function(n) if support else _DEFAULT_FUNCTIONS[n]) for g, n in hooks]
        q_scale = None
        q_lead_of = 0
        if support is not None and support.fuse_q_scale:
            scale_hooks = _code_hooks(model, (_Q_SCALE_FUNCTION,))
            if not scale_hooks:
                raise NotImplementedError(
                    f"no attention forward of {type(model).__name__} calls {_Q_SCALE_FUNCTION}; "
                    "cannot move its query scale"
                )
            config = _config_of(model, sites[0][0], sites[0][1])
            q_scale = _q_scale_of(config)
            if q_scale is not None and support.q_scale_lead:
                q_lead = getattr(config, support.q_scale_lead, None)
                if isinstance(q_lead, bool) or not isinstance(q_lead, int) or q_lead < 0:
                    q_scale = None  # not what the fused path expects: transformers' multiply stays
                else:
                    q_lead_of = q_lead
            if q_scale is not None:
                specs += [(g, n, None) for g, n in scale_hooks]

        memo: Dict[Tuple[int, Optional[str]], RopeParams] = {}
        site_params = [_site_params(model, parent, rotary, params, support, memo) for parent, rotary in sites]
        norm_sites = _qk_norm_sites(model) if support is not None and support.fuse_qk_norm else []

        keys = []
        try:
            for g, name, spec in specs:
                keys.append(_acquire(g, name, spec))
        except Exception:
            for key in keys:
                _release(key)
            raise
        for (parent, rotary), (p, tracker, by_label, freq_scale) in zip(sites, site_params):
            parent.rotary_emb = FusedRotaryEmbedding(
                rotary, p, keys, tracker, by_label=by_label, q_scale=q_scale, freq_scale=freq_scale,
                q_lead=q_lead_of,
            )
        for attn, unit_offset in norm_sites:
            _defer_qk_norm(attn, unit_offset)
    return model


def disable_fused_rope(model: nn.Module) -> nn.Module:
    """Switch ``model`` back to its own rope (in place; returns it). Restores the original
    ``rotary_emb`` (and ``q_norm``/``k_norm``) modules, and the modeling files' functions
    once no switched model uses them. Does nothing on a model that is not switched."""
    with _LOCK:
        _restore_qk_norms(model)
        released = False
        for parent, rotary in _rotary_sites(model):
            if isinstance(rotary, FusedRotaryEmbedding):
                parent.rotary_emb = rotary.original
                if not released:
                    for key in rotary._hooks:
                        _release(key)
                    released = True
    return model


@contextlib.contextmanager
def fused_rope(model: nn.Module, params: Optional[RopeParams] = None, *, strict: bool = True):
    """``with fused_rope(model): ...`` -- switched inside the block, back after it (unless
    it already was switched before)."""
    was = is_fused_rope_enabled(model)
    enable_fused_rope(model, params, strict=strict)
    try:
        yield model
    finally:
        if not was:
            disable_fused_rope(model)
