"""The switch: :func:`enable_fused_rope`, :func:`disable_fused_rope`, :func:`fused_rope`
and :func:`is_fused_rope_enabled` (what they change is described in the package
docstring)."""

from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

from torch import nn

from ...rope import RopeParams
from .paged import _install_paged_hooks, _remove_paged_hooks
from .params import _site_params
from .patch import _LOCK, _acquire, _release
from .q_scale import _q_scale_of
from .qk_norm import _defer_qk_norm, _qk_norm_sites, _restore_qk_norms
from .rotary import FusedRotaryEmbedding
from .sites import _code_hooks, _config_of, _rotary_sites, _support_of
from .support import _DEFAULT_FUNCTIONS, _Q_SCALE_FUNCTION, ROPE_FUNCTIONS, SUPPORTED_MODEL_TYPES


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
        _install_paged_hooks(model, model_type if support is not None else None,
                             [n for _, n, spec in specs if spec is not None and spec.pair])
    return model


def disable_fused_rope(model: nn.Module) -> nn.Module:
    """Switch ``model`` back to its own rope (in place; returns it). Restores the original
    ``rotary_emb`` (and ``q_norm``/``k_norm``) modules, and the modeling files' functions
    once no switched model uses them. Does nothing on a model that is not switched."""
    with _LOCK:
        _remove_paged_hooks(model)
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
