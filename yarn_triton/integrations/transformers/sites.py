"""Discovery: the rope sites of a model and its modeling modules -- the ``rotary_emb``
submodules (:func:`_rotary_sites`), the module-level functions the ``forward``s call by
name (:func:`_code_hooks`; :func:`plain_function`, the Python function behind a
hub-kernels wrapper), the config a rotary was built from (:func:`_config_of`) and the
table row of a model (:func:`_support_of`)."""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

from .support import MODEL_SUPPORT, ROPE_FUNCTIONS, ModelSupport


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
