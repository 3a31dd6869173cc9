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
6. under transformers' continuous batching (``generate_batch``: a ``PagedAttentionCache``
   handed to the attention as ``cache``), for the model types in
   :data:`~.paged.PAGED_MODEL_TYPES`, forward hooks on the attention modules have the
   dispatcher leave q and k to the same call's write of the layer's paged cache, which
   then runs as one :func:`yarn_triton.apply_rope_and_cache_` (q rotated in place, rope(k)
   and v written) in place of transformers' own write; sliding-window and MLA layers, the
   flash decode fast path and compiled forwards keep the plain path (``docs/usage.md``).

The function swaps are process-wide but only change what happens for models that were
switched; they are undone when the last switched model is switched back. The attention
code, the KV cache (but its write in 6.), masks, the attention backend and the softmax
scale stay transformers' own. What this relies on is checked when switching (and by the
tests against the installed transformers): ``rotary_emb`` submodules, attention code that
calls the functions above by name, and a rope whose ``inv_freq`` / ``attention_scaling``
match :meth:`RopeParams.from_config` of the model's config. Rope types whose frequencies change
with the sequence length (dynamic NTK, longrope) follow transformers' rule for picking them
per forward through a :class:`~yarn_triton.RopeTracker`.

The package, one concern per module, each importing only those listed before it:

* ``support`` -- the model-support table (:data:`MODEL_SUPPORT`, :data:`ROPE_FUNCTIONS`)
  and :func:`supported_models_markdown`;
* ``handle`` -- :class:`FusedRopePositions`, the M-RoPE position ids it carries, and its
  call into the fused op;
* ``sites`` -- discovery: ``rotary_emb`` submodules, the modeling-file functions that the
  modules' ``forward`` calls, the table row of a model;
* ``params`` -- the params of each rotary site, read from its config and checked against
  its rotary;
* ``q_scale`` -- the Llama-4 query scale moved into the rope call (3.);
* ``qk_norm`` -- the q/k norms deferred to the rope call (4.);
* ``paged`` -- the rope deferred to the paged cache write, and its hooks (6.);
* ``dispatch`` -- the dispatcher that stands in for the rope functions (2.);
* ``patch`` -- installing the dispatchers in the modeling files, and restoring them;
* ``rotary`` -- :class:`FusedRotaryEmbedding` (1.);
* ``switch`` -- :func:`enable_fused_rope`, :func:`disable_fused_rope`, :func:`fused_rope`,
  :func:`is_fused_rope_enabled`.
"""

import transformers  # noqa: F401  (this integration is only imported when transformers is wanted)

# The public names. Private ones live in their own module, where tests read and patch them.
from .handle import FusedRopePositions
from .rotary import FusedRotaryEmbedding
from .sites import plain_function
from .support import (
    MODEL_SUPPORT,
    ROPE_FUNCTIONS,
    SUPPORTED_MODEL_TYPES,
    ModelSupport,
    RopeFunction,
    supported_models_markdown,
)
from .switch import disable_fused_rope, enable_fused_rope, fused_rope, is_fused_rope_enabled

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
