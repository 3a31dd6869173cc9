"""Read a model config (transformers ``PretrainedConfig``, dict, or config.json) into
:class:`~yarn_triton.rope.RopeParams`.

The rules follow the installed transformers (v5) -- ``standardize_rope_params`` and the
``ROPE_INIT_FUNCTIONS`` of ``modeling_rope_utils`` -- without importing it: a
``PretrainedConfig`` is recognised by its ``to_dict()`` method.

Where transformers silently prefers one of two *different* values given for the same thing
(``rope_scaling`` vs ``rope_parameters``, ``type`` vs ``rope_type``, a top-level
``rope_theta`` / ``partial_rotary_factor`` / ``original_max_position_embeddings`` vs the one
in the rope dict), this module raises instead, naming both: a config that says two things
is more likely a mistake than a wish.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from .rope import RopeParams

__all__ = ["SUPPORTED_ROPE_TYPES", "load_config_dict", "rope_dim_from_config", "rope_params_from_config"]

#: rope types :func:`rope_params_from_config` understands (``"ntk"`` is ours; the rest are
#: transformers' names). ``"su"`` (Phi-3 128k's first release) is read as ``"longrope"``.
SUPPORTED_ROPE_TYPES: Tuple[str, ...] = (
    "default", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "proportional",
)
_ALIASES = {"su": "longrope"}
_DEFAULT_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")


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


def _head_dim(cfg: Mapping[str, Any]) -> int:
    if _given(cfg, "head_dim"):
        return int(cfg["head_dim"])
    missing = [k for k in ("hidden_size", "num_attention_heads") if not _given(cfg, k)]
    if missing:
        raise ValueError(
            "cannot tell the head size: the config has no head_dim and no "
            + " / ".join(missing)
        )
    return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])


def rope_dim_from_config(config: Any, partial_rotary_factor: Optional[float] = None) -> int:
    """Rotary dimension of a config: DeepSeek's ``qk_rope_head_dim`` where present, else
    ``head_dim`` (or ``hidden_size // num_attention_heads``), times the partial rotary factor
    (``int(...)``, as transformers truncates it)."""
    cfg = load_config_dict(config)
    if partial_rotary_factor is None:
        partial_rotary_factor = cfg.get("partial_rotary_factor")
    prf = 1.0 if partial_rotary_factor is None else float(partial_rotary_factor)
    if not (0.0 < prf <= 1.0):
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {prf}")
    head = int(cfg["qk_rope_head_dim"]) if _given(cfg, "qk_rope_head_dim") else _head_dim(cfg)
    return int(head * prf)


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
# The entry point
# --------------------------------------------------------------------------------------
def rope_params_from_config(config: Any, *, layer_type: Optional[str] = None) -> RopeParams:
    """:class:`RopeParams` for a model config, as the installed transformers computes them.

    Reads ``rope_parameters`` (transformers 5) and/or ``rope_scaling`` (older; ``type`` or
    ``rope_type``) with ``rope_theta`` inside or beside it (default 10000). The rotary
    dimension is ``qk_rope_head_dim`` where present (DeepSeek, Kimi), else ``head_dim`` or
    ``hidden_size // num_attention_heads``, times ``partial_rotary_factor``.
    ``original_max_position_embeddings`` may sit in the rope dict or at the top level (Phi-3)
    and falls back to ``max_position_embeddings``.

    The result carries the method's cos/sin factor (``cos_sin_scale``: YaRN's
    attention_factor / mscale ratio, LongRoPE's attention factor) and, for YaRN with a
    non-zero ``mscale_all_dim`` in a config with MLA attention (one naming
    ``qk_rope_head_dim``: DeepSeek-V2/V3, Kimi K2, ...), ``softmax_scale_factor =
    get_mscale(factor, mscale_all_dim) ** 2``, as those attention layers apply it. Dynamic and longrope results depend on the
    sequence length: use :meth:`RopeParams.for_seq_len` or :class:`~yarn_triton.rope.RopeTracker`.

    Args:
        config: ``PretrainedConfig``, dict, or path to config.json (or its folder).
        layer_type: for configs with a rope dict per layer type (``{"full_attention": ...,
            "sliding_attention": ...}``), which one to read.

    Raises:
        ValueError: unknown rope type (the message lists the supported ones), a required
            key missing, or two places of the config giving different values (both named).
        TypeError: ``config`` of an unsupported kind, or a non-numeric value.
    """
    cfg = _pick_text_config(load_config_dict(config))
    rope = _rope_dict(cfg, layer_type)
    where = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope_type = _rope_type(rope, cfg, where)

    theta = _top_or_rope(cfg, rope, "rope_theta", where)
    theta = _DEFAULT_THETA if theta is None else theta
    prf = _top_or_rope(cfg, rope, "partial_rotary_factor", where)
    max_pos = cfg.get("max_position_embeddings")

    if rope_type == "proportional":
        return RopeParams.proportional(
            _head_dim(cfg), theta, rope.get("factor", 1.0), 1.0 if prf is None else prf
        )

    dim = rope_dim_from_config(cfg, prf)
    if rope_type == "default":
        return RopeParams.default(dim, theta)
    if rope_type in ("linear", "ntk"):
        _need(rope, rope_type, where, "factor")
        return getattr(RopeParams, rope_type)(dim, theta, rope["factor"])
    if rope_type == "dynamic":
        _need(rope, rope_type, where, "factor")
        _need_value(max_pos, rope_type, "max_position_embeddings in the config")
        return RopeParams.dynamic(dim, theta, rope["factor"], max_pos)

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
        return RopeParams.yarn_hf(
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
            # Only MLA attention (DeepSeek-V2/V3, Kimi K2, MiniCPM3, ...: the configs with a
            # qk_rope_head_dim) multiplies its softmax scale by get_mscale(f, mscale_all_dim)**2.
            softmax_mscale=_given(cfg, "qk_rope_head_dim"),
        )
    if rope_type == "llama3":
        _need(rope, rope_type, where, "factor", "low_freq_factor", "high_freq_factor")
        return RopeParams.llama3(
            dim, theta, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"], omax
        )
    # longrope
    _need(rope, rope_type, where, "short_factor", "long_factor")
    factor, attention = rope.get("factor"), rope.get("attention_factor")
    if factor is None and attention is None:
        _need_value(max_pos, rope_type, "factor, attention_factor or max_position_embeddings")
    return RopeParams.longrope(
        dim,
        theta,
        rope["short_factor"],
        rope["long_factor"],
        omax,
        factor=factor,
        max_position_embeddings=max_pos,
        attention_factor=attention,
    )
