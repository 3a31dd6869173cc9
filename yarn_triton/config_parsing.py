"""Read a model config (transformers ``PretrainedConfig``, dict, or config.json) into a
:class:`~yarn_triton.variants.RopeSpec`: the one place where config files are parsed.

The rules follow the installed transformers (v5) -- ``standardize_rope_params``, the
``ROPE_INIT_FUNCTIONS`` of ``modeling_rope_utils`` and the few model configs that derive
their rotary width in ``__post_init__`` -- without importing it: a ``PretrainedConfig`` is
recognised by its ``to_dict()`` method.

Where transformers silently prefers one of two *different* values given for the same thing
(``rope_scaling`` vs ``rope_parameters``, ``type`` vs ``rope_type``, a top-level
``rope_theta`` / ``partial_rotary_factor`` / ``original_max_position_embeddings`` vs the one
in the rope dict), this module raises instead, naming both: a config that says two things
is more likely a mistake than a wish.

This module imports :mod:`yarn_triton.variants` only; :meth:`RopeParams.from_config
<yarn_triton.rope.RopeParams.from_config>` and :func:`yarn_triton.config.rope_params_from_config`
wrap its :func:`rope_spec_from_config`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from ._validate import MAX_ROPE_DIM, check_base, check_number, check_rope_dim
from .variants import (
    RopeSpec,
    default_spec,
    dynamic_spec,
    linear_spec,
    llama3_spec,
    longrope_spec,
    ntk_spec,
    proportional_spec,
    yarn_hf_spec,
)

__all__ = ["SUPPORTED_ROPE_TYPES", "load_config_dict", "rope_dim_from_config", "rope_spec_from_config"]

#: rope types :func:`rope_spec_from_config` understands (``"ntk"`` is ours; the rest are
#: transformers' names). ``"su"`` (Phi-3 128k's first release) is read as ``"longrope"``.
SUPPORTED_ROPE_TYPES: Tuple[str, ...] = (
    "default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "proportional",
)
_ALIASES = {"su": "longrope"}
_DEFAULT_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")

# MLA models (configs with qk_rope_head_dim) whose partial_rotary_factor is a fraction of
# the whole query/key head, qk_nope_head_dim + qk_rope_head_dim: transformers'
# Mistral4Config sets head_dim to that sum and partial_rotary_factor (unless given) to
# qk_rope_head_dim / head_dim, and the rope init functions take int(head_dim * factor).
# In every other MLA config (DeepSeek-V2/V3/V3.2, Kimi, GLM-4-MoE-Lite, Mistral Large 3,
# ...) head_dim *is* qk_rope_head_dim.
_MLA_FACTOR_OF_FULL_HEAD = frozenset({"mistral4"})
# Models whose config.json gives the rotary width as `rotary_dim` (MiniMax-M2): transformers
# turns it into partial_rotary_factor = rotary_dim / head_dim when no factor is given.
_ROTARY_DIM_MODELS = frozenset({"minimax_m2"})


# --------------------------------------------------------------------------------------
# Input normalisation
# --------------------------------------------------------------------------------------
def load_config_dict(config: Any) -> Dict[str, Any]:
    """A plain dict of the config's fields.

    Args:
        config: a ``PretrainedConfig`` (or any object with ``to_dict()``), a mapping, or a
            path (``str`` / ``os.PathLike``) to a config.json or to the folder holding one.

    Raises:
        TypeError: for anything else; FileNotFoundError / ValueError for unreadable files.
    """
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, "r", encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return data
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
        if not isinstance(data, Mapping):
            raise TypeError(f"{type(config).__name__}.to_dict() returned {type(data).__name__}, not a dict")
        return dict(data)
    raise TypeError(
        "config must be a transformers PretrainedConfig, a dict or a path to a config.json, "
        f"got {type(config).__name__}"
    )


def _given(d: Mapping[str, Any], key: str) -> bool:
    return d.get(key) is not None


def _pick_text_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Multimodal configs keep the language model's rope in ``text_config``."""
    if not any(_given(cfg, k) for k in _ROPE_KEYS):
        sub = cfg.get("text_config")
        if isinstance(sub, Mapping) and any(_given(sub, k) for k in _ROPE_KEYS):
            return dict(sub)
    return cfg


def _merge(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str, b_name: str) -> Dict[str, Any]:
    """Union of two dicts; keys given in both with different values are an error."""
    clash = sorted(k for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None and a[k] != b[k])
    if clash:
        detail = ", ".join(f"{k!r} ({a_name}: {a[k]!r}, {b_name}: {b[k]!r})" for k in clash)
        raise ValueError(f"contradictory rope settings: {detail}")
    out = dict(b)
    out.update({k: v for k, v in a.items() if v is not None or k not in out})
    return out


def _is_nested(rope: Mapping[str, Any], cfg: Mapping[str, Any]) -> bool:
    """Per-layer-type rope dicts (Gemma 3 style): every value a dict or None, keyed by layer type."""
    if not rope:
        return False
    labels = set(cfg.get("layer_types") or ()) | set(cfg.get("_rope_type_labels") or ())
    if labels and any(k in labels for k in rope):
        return True
    return all(isinstance(v, Mapping) or v is None for v in rope.values())


def _rope_dict(cfg: Mapping[str, Any], layer_type: Optional[str]) -> Dict[str, Any]:
    """The one flat rope dict of the config (or of ``layer_type``), merged from both formats."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for name, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(d, Mapping):
            raise ValueError(f"{name} must be a dict, got {type(d).__name__}")
    picked = []
    for name, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if _is_nested(d, cfg):
            available = sorted(k for k, v in d.items() if v is not None)
            if layer_type is None:
                distinct = {json.dumps(d[k], sort_keys=True, default=str) for k in available}
                if len(distinct) > 1:
                    raise ValueError(
                        f"{name} differs per layer type ({', '.join(available)}); "
                        "pass layer_type= to choose one"
                    )
                d = d[available[0]] if available else {}
            else:
                if layer_type not in d:
                    raise ValueError(
                        f"layer_type {layer_type!r} not in {name}; it has {', '.join(available)}"
                    )
                d = d[layer_type] or {}
        elif layer_type is not None and d:
            pass  # one dict for every layer type
        picked.append((name, dict(d)))
    (pn, p), (sn, s) = picked
    return _merge(p, s, pn, sn)


def _top_or_rope(cfg: Mapping[str, Any], rope: Mapping[str, Any], key: str, where: str) -> Any:
    """A value that may sit at the top level or in the rope dict; different values raise."""
    top, inner = cfg.get(key), rope.get(key)
    if top is not None and inner is not None and top != inner:
        raise ValueError(
            f"contradictory rope settings: {key!r} is {top!r} at the top level of the config "
            f"but {inner!r} in {where}"
        )
    return inner if inner is not None else top


def _rope_type(rope: Mapping[str, Any], cfg: Mapping[str, Any], where: str) -> str:
    rt, t = rope.get("rope_type"), rope.get("type")
    if rt is not None and t is not None and rt != t:
        raise ValueError(
            f"contradictory rope settings: {where} has rope_type={rt!r} but type={t!r}"
        )
    name = rt if rt is not None else (t if t is not None else "default")
    if not isinstance(name, str):
        raise ValueError(f"rope type must be a string, got {name!r}")
    name = _ALIASES.get(name, name)
    # transformers' Phi3Config reads a "yarn" type as longrope (Phi-3.5 / Phi-4 mini configs).
    if name == "yarn" and cfg.get("model_type") == "phi3":
        name = "longrope"
    if name not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unknown rope type {name!r} in {where}; supported: {', '.join(SUPPORTED_ROPE_TYPES)} "
            f"(and {', '.join(repr(a) for a in _ALIASES)} for longrope)"
        )
    return name


def _int_field(cfg: Mapping[str, Any], key: str, limit: Optional[int] = MAX_ROPE_DIM) -> int:
    """A positive integer size from the config (``head_dim``, ``qk_rope_head_dim``, ...),
    at most ``limit`` (None: no limit)."""
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{key} must be an integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")
    if limit is not None and value > limit:
        raise ValueError(f"{key} must be <= {limit}, got {value}")
    return value


def _head_dim(cfg: Mapping[str, Any]) -> int:
    if _given(cfg, "head_dim"):
        return _int_field(cfg, "head_dim")
    missing = [k for k in ("hidden_size", "num_attention_heads") if not _given(cfg, k)]
    if missing:
        raise ValueError(
            "cannot tell the head size: the config has no head_dim and no "
            + " / ".join(missing)
        )
    head = _int_field(cfg, "hidden_size", None) // _int_field(cfg, "num_attention_heads", None)
    if not 0 < head <= MAX_ROPE_DIM:
        raise ValueError(
            f"hidden_size // num_attention_heads = {head} is not a head size in [1, {MAX_ROPE_DIM}]"
        )
    return head


def _rotary_head(cfg: Mapping[str, Any]) -> Tuple[int, Optional[float]]:
    """``(head, default_factor)``: the size transformers multiplies by the partial rotary
    factor, and the factor the model's config class supplies when the config gives none."""
    model_type = cfg.get("model_type")
    if _given(cfg, "qk_rope_head_dim"):  # MLA
        rope_part = _int_field(cfg, "qk_rope_head_dim")
        if model_type not in _MLA_FACTOR_OF_FULL_HEAD:
            return rope_part, None
        if _given(cfg, "qk_nope_head_dim"):
            head = rope_part + _int_field(cfg, "qk_nope_head_dim")
        elif _given(cfg, "head_dim"):
            head = _int_field(cfg, "head_dim")
        else:
            raise ValueError(
                f"a {model_type} config needs qk_nope_head_dim (or head_dim) besides qk_rope_head_dim"
            )
        return head, rope_part / head
    head = _head_dim(cfg)
    if model_type in _ROTARY_DIM_MODELS and _given(cfg, "rotary_dim"):
        return head, _int_field(cfg, "rotary_dim") / head
    return head, None


def rope_dim_from_config(config: Any, partial_rotary_factor: Optional[float] = None) -> int:
    """Rotary dimension of a config, as transformers' rope init functions compute it:
    ``int(head * partial_rotary_factor)``.

    ``head`` is ``qk_rope_head_dim`` in MLA configs (DeepSeek, Kimi, ...) except Mistral 4,
    where it is ``qk_nope_head_dim + qk_rope_head_dim`` with a default factor of
    ``qk_rope_head_dim / head``; elsewhere ``head_dim`` (or ``hidden_size //
    num_attention_heads``). The factor is ``partial_rotary_factor`` (argument, else the
    config's), else MiniMax-M2's ``rotary_dim / head_dim``, else 1.

    Raises:
        ValueError: a factor outside ``(0, 1]``, or a product that is not a positive even
            number.
    """
    cfg = load_config_dict(config)
    head, default_prf = _rotary_head(cfg)
    if partial_rotary_factor is None:
        partial_rotary_factor = cfg.get("partial_rotary_factor")
    if partial_rotary_factor is None:
        partial_rotary_factor = default_prf
    prf = 1.0 if partial_rotary_factor is None else check_number("partial_rotary_factor", partial_rotary_factor)
    if not (0.0 < prf <= 1.0):
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {prf}")
    dim = int(head * prf)
    if dim <= 0 or dim % 2:
        raise ValueError(
            f"the rotary dimension int({head} * partial_rotary_factor={prf}) = {dim} is not a "
            "positive even number"
        )
    return check_rope_dim("rotary dimension", dim)


def _need(rope: Mapping[str, Any], rope_type: str, where: str, *keys: str) -> None:
    missing = [k for k in keys if k not in rope]
    if missing:
        raise ValueError(
            f"rope type {rope_type!r} needs {', '.join(repr(k) for k in missing)} in {where}"
        )


def _need_value(value: Any, rope_type: str, what: str) -> Any:
    if value is None:
        raise ValueError(f"rope type {rope_type!r} needs {what}")
    return value


# --------------------------------------------------------------------------------------
# Multimodal rope (M-RoPE)
# --------------------------------------------------------------------------------------
# transformers decides sectioned or interleaved by the model class, not by a config key,
# and falls back to a class default when the config names no sections.
_MROPE_DEFAULTS = {
    "qwen2_vl": ((16, 24, 24), False),
    "qwen2_5_vl": ((16, 24, 24), False),
    "qwen3_vl": ((24, 20, 20), True),
    "qwen3_vl_moe": ((24, 20, 20), True),
    "qwen3_5": ((11, 11, 10), True),
    "qwen3_5_moe": ((11, 11, 10), True),
}


def _mrope_family(model_type: Any) -> Optional[str]:
    if not isinstance(model_type, str):
        return None
    name = model_type[: -len("_text")] if model_type.endswith("_text") else model_type
    return name if name in _MROPE_DEFAULTS else None


def mrope_from_config(config: Any) -> Optional[Tuple[Tuple[int, ...], bool]]:
    """``(mrope_section, interleaved)`` of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) /
    Qwen3.5(-MoE) config (the top-level one, its ``text_config``, or the text config
    alone), as that model's rotary embedding reads it; None for other models. The section
    is not validated here (:class:`~yarn_triton.rope.RopeParams` does, against the rotary
    dim)."""
    top = load_config_dict(config)
    text = top.get("text_config") if isinstance(top.get("text_config"), Mapping) else None
    family = _mrope_family(top.get("model_type")) or (_mrope_family(text.get("model_type")) if text else None)
    if family is None:
        return None
    section, interleaved = _MROPE_DEFAULTS[family]
    for cfg in ((text, top) if text else (top,)):
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if isinstance(rope, Mapping) and rope.get("mrope_section") is not None:
            section = rope["mrope_section"]
            break
    return tuple(section) if isinstance(section, (list, tuple)) else section, interleaved


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------
def rope_spec_from_config(config: Any, *, layer_type: Optional[str] = None) -> RopeSpec:
    """The :class:`~yarn_triton.variants.RopeSpec` of a model config, as the installed
    transformers computes its rope.

    Reads ``rope_parameters`` (transformers 5) and/or ``rope_scaling`` (older; ``type`` or
    ``rope_type``) with ``rope_theta`` inside or beside it (default 10000). The rotary
    dimension is given by :func:`rope_dim_from_config`. ``original_max_position_embeddings``
    may sit in the rope dict or at the top level (Phi-3) and falls back to
    ``max_position_embeddings``.

    The result carries the method's cos/sin factor (YaRN's attention_factor / mscale ratio,
    LongRoPE's attention factor) and, for YaRN with a non-zero ``mscale_all_dim`` in a
    config with MLA attention (one naming ``qk_rope_head_dim``: DeepSeek-V2/V3, Kimi K2,
    Mistral 4, ...), ``softmax_scale_factor = get_mscale(factor, mscale_all_dim) ** 2``, as
    those attention layers apply it. Dynamic and longrope results depend on the sequence
    length (their ``seq_len_rule``).

    Args:
        config: ``PretrainedConfig``, dict, or path to config.json (or its folder).
        layer_type: for configs with a rope dict per layer type (``{"full_attention": ...,
            "sliding_attention": ...}``), which one to read.

    Raises:
        ValueError: unknown rope type (the message lists the supported ones), a required
            key missing, a value out of range (named), or two places of the config giving
            different values (both named).
        TypeError: ``config`` of an unsupported kind, or a non-numeric value.
    """
    cfg = _pick_text_config(load_config_dict(config))
    rope = _rope_dict(cfg, layer_type)
    where = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope_type = _rope_type(rope, cfg, where)

    theta = _top_or_rope(cfg, rope, "rope_theta", where)
    theta = check_base("rope_theta", _DEFAULT_THETA if theta is None else theta)
    prf = _top_or_rope(cfg, rope, "partial_rotary_factor", where)
    max_pos = cfg.get("max_position_embeddings")

    if rope_type == "proportional":
        return proportional_spec(
            _head_dim(cfg), theta, rope.get("factor", 1.0), 1.0 if prf is None else prf
        )

    dim = rope_dim_from_config(cfg, prf)
    if rope_type == "default":
        return default_spec(dim, theta)
    if rope_type in ("linear", "ntk"):
        _need(rope, rope_type, where, "factor")
        return (linear_spec if rope_type == "linear" else ntk_spec)(dim, theta, rope["factor"])
    if rope_type == "dynamic":
        _need(rope, rope_type, where, "factor")
        _need_value(max_pos, rope_type, "max_position_embeddings in the config")
        return dynamic_spec(dim, theta, rope["factor"], max_pos)

    # llama3 / yarn / longrope: the pre-training length, from the rope dict or the top level
    # (Phi-3 keeps it there), else max_position_embeddings -- transformers'
    # standardize_rope_params.
    omax = _top_or_rope(cfg, rope, "original_max_position_embeddings", where)
    if omax is None:
        omax = _need_value(
            max_pos, rope_type, "original_max_position_embeddings or max_position_embeddings"
        )

    if rope_type == "yarn":
        _need(rope, rope_type, where, "factor")
        if rope["factor"] is None:
            _need_value(max_pos, rope_type, "a factor or max_position_embeddings to derive it from")
        return yarn_hf_spec(
            dim,
            theta,
            rope["factor"],
            omax,
            max_position_embeddings=max_pos,
            attention_factor=rope.get("attention_factor"),
            beta_fast=rope.get("beta_fast"),
            beta_slow=rope.get("beta_slow"),
            mscale=rope.get("mscale"),
            mscale_all_dim=rope.get("mscale_all_dim"),
            truncate=rope.get("truncate", True),
            # Only MLA attention (DeepSeek-V2/V3, Kimi K2, MiniCPM3, Mistral 4, ...: the configs
            # with a qk_rope_head_dim) multiplies its softmax scale by get_mscale(f, mscale_all_dim)**2.
            softmax_mscale=_given(cfg, "qk_rope_head_dim"),
        )
    if rope_type == "llama3":
        _need(rope, rope_type, where, "factor", "low_freq_factor", "high_freq_factor")
        return llama3_spec(
            dim, theta, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], omax
        )
    # longrope
    _need(rope, rope_type, where, "short_factor", "long_factor")
    factor, attention = rope.get("factor"), rope.get("attention_factor")
    if factor is None and attention is None:
        _need_value(max_pos, rope_type, "factor, attention_factor or max_position_embeddings")
    return longrope_spec(
        dim,
        theta,
        rope["short_factor"],
        rope["long_factor"],
        omax,
        factor=factor,
        max_position_embeddings=max_pos,
        attention_factor=attention,
    )
