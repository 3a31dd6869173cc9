"""Switch a loaded Hugging Face transformers model to the fused rope kernel, and back.

::

    from yarn_triton.integrations.transformers import enable_fused_rope, disable_fused_rope

    model = AutoModelForCausalLM.from_pretrained(...)
    enable_fused_rope(model)     # rope now runs in the Triton kernel, params from model.config
    model.generate(...)
    disable_fused_rope(model)    # the model's own rope again

How it hooks in (transformers 5.x, families Llama, Mistral, Qwen2, Qwen3, DeepSeek-V2,
DeepSeek-V3). The base model computes its rope once per forward in ``self.rotary_emb``
(``rotary_emb(hidden_states, position_ids)`` returns cos/sin, or DeepSeek-V2's complex
``freqs_cis``) and hands the result to every attention layer as ``position_embeddings``;
each attention layer rotates its q/k with a module-level function of its modeling file:

* ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2, Qwen3; DeepSeek-V3 with
  ``rope_interleave=False``): rotate_half -> our ``"neox"`` layout;
* ``apply_rotary_pos_emb_interleave`` (DeepSeek-V3, ``rope_interleave=True``, its
  default): adjacent pairs in, halves out -> ``"deepseek"``;
* ``apply_rotary_emb`` (DeepSeek-V2, complex ``freqs_cis``): adjacent pairs in and
  out -> ``"interleaved"``.

:func:`enable_fused_rope` makes two changes:

1. it swaps the model's ``rotary_emb`` submodule for a :class:`FusedRotaryEmbedding` that
   returns a :class:`FusedRopePositions` -- the position ids plus the
   :class:`~yarn_triton.RopeParams` -- in place of cos/sin (it unpacks as ``cos, sin`` and
   answers ``.to()``, so the attention code passes it on untouched);
2. it replaces those module-level functions with a dispatcher that, when handed a
   :class:`FusedRopePositions`, rotates q and k with the fused op -- in place on the
   projection views the attention layer passes (``[B, H, S, D]`` transposes of the
   projection output), or out of place and differentiable when autograd records -- and
   otherwise calls the original function unchanged. The function swap is process-wide
   but only changes what happens for models that were switched; it is undone when the
   last switched model is switched back.

The attention code, the KV cache, masks and the attention backend stay transformers' own,
and the model's softmax scale (DeepSeek's ``mscale_all_dim`` correction) is the one it
already applies. What this relies on is checked when switching (and by the tests against
the installed transformers): a ``rotary_emb`` submodule, attention ``forward``s that call
one of the functions above by name, and a rope whose ``inv_freq`` / ``attention_scaling``
match :meth:`RopeParams.from_config` of the model's config. Rope types whose frequencies
change with the sequence length (dynamic NTK, longrope) follow transformers' rule for
picking them per forward through a :class:`~yarn_triton.RopeTracker`.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

import transformers  # noqa: F401  (this integration is only imported when transformers is wanted)

from ..attention import rope_qk
from ..rope import RopeParams, RopeTracker

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ROPE_FUNCTIONS",
    "FusedRopePositions",
    "FusedRotaryEmbedding",
    "enable_fused_rope",
    "disable_fused_rope",
    "is_fused_rope_enabled",
    "fused_rope",
]

#: ``config.model_type`` values this integration is tested with.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "deepseek_v2", "deepseek_v3")

#: Module-level rope functions of transformers' modeling files -> layout of their channels.
ROPE_FUNCTIONS: Dict[str, str] = {
    "apply_rotary_pos_emb": "neox",
    "apply_rotary_pos_emb_interleave": "deepseek",
    "apply_rotary_emb": "interleaved",
}

# --------------------------------------------------------------------------------------
# What flows from the rotary embedding to the attention layers
# --------------------------------------------------------------------------------------
class FusedRopePositions:
    """Stands in for the ``(cos, sin)`` pair (or ``freqs_cis``) of a switched model.

    Holds the position ids and the params; unpacks as ``cos, sin`` (both itself) and
    ``.to(...)`` returns itself, so attention code passes it to its rope function untouched.
    """

    __slots__ = ("positions", "params")

    def __init__(self, positions: torch.Tensor, params: RopeParams) -> None:
        self.positions = positions
        self.params = params

    def __iter__(self) -> Iterator["FusedRopePositions"]:
        return iter((self, self))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> "FusedRopePositions":
        return (self, self)[i]

    def to(self, *args, **kwargs) -> "FusedRopePositions":
        return self

    def rotate(
        self, q: torch.Tensor, k: torch.Tensor, layout: str, head_axis: int = 1
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q``/``k`` whose heads are at ``head_axis`` (``[B, H, S, D]`` for 1).

        In place on the given views under no-grad (returns the same tensors), out of place
        when autograd records."""
        pos = self.positions
        if pos.device != q.device:
            pos = pos.to(q.device)
        qv, kv = q.movedim(head_axis, -2), k.movedim(head_axis, -2)
        qo, ko = rope_qk(qv, kv, pos, self.params, layout=layout)
        if qo is qv and ko is kv:
            return q, k
        return qo.movedim(-2, head_axis), ko.movedim(-2, head_axis)

    def __repr__(self) -> str:
        return f"FusedRopePositions(positions={tuple(self.positions.shape)}, {self.params!r})"


class FusedRotaryEmbedding(nn.Module):
    """Replaces a switched model's ``rotary_emb``: returns :class:`FusedRopePositions`
    instead of cos/sin. Keeps the original as ``.original`` (a submodule, so it follows
    ``.to()``) for :func:`disable_fused_rope`.

    For rope types whose frequencies depend on the sequence length (dynamic NTK,
    longrope) a :class:`~yarn_triton.RopeTracker` picks the params per forward from
    ``max(position_ids) + 1``, as transformers' ``dynamic_rope_update`` does (this reads
    one number back from the device, as transformers does too); for all others nothing is
    read and the params are fixed.
    """

    def __init__(
        self,
        original: nn.Module,
        params: RopeParams,
        hooks: List[Tuple[str, str]],
        tracker: Optional[RopeTracker] = None,
    ) -> None:
        super().__init__()
        self.original = original
        self.params = params
        self.tracker = tracker
        self._hooks = list(hooks)

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None, *args, **kwargs):
        if position_ids is None:
            raise ValueError("the fused rope needs position_ids")
        if kwargs.get("layer_type") is not None:
            # A rope per layer type (Gemma 3 style) would need params per type.
            raise NotImplementedError("rotary embeddings with per-layer-type rope are not supported")
        params = self.params
        if self.tracker is not None:
            params = self.tracker.update(int(position_ids.max()) + 1)
        return FusedRopePositions(position_ids, params)

    def extra_repr(self) -> str:
        fns = ", ".join(sorted({f"{m.rsplit('.', 1)[-1]}.{n}" for m, n in self._hooks}))
        return f"{self.params!r}, hooks=[{fns}]"


# --------------------------------------------------------------------------------------
# The dispatcher that stands in for the modeling file's rope function
# --------------------------------------------------------------------------------------
class _RopeDispatch:
    """Calls the fused op when handed a :class:`FusedRopePositions`, else the original."""

    def __init__(self, original, layout: str) -> None:
        functools.update_wrapper(self, original)
        self.original = original
        self.layout = layout
        self._sig = inspect.signature(original)
        params = list(self._sig.parameters)
        if len(params) < 3:
            raise NotImplementedError(f"unexpected signature of {original.__qualname__}{self._sig}")
        self._q, self._k = params[0], params[1]
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
        handle = next(v for v in a.values() if isinstance(v, FusedRopePositions))
        axis = a[self._axis] if self._axis is not None else 1
        return handle.rotate(a[self._q], a[self._k], self.layout, axis)


_LOCK = threading.RLock()
# (module name, function name) -> [dispatcher, module globals, number of switched users]
_INSTALLED: Dict[Tuple[str, str], list] = {}


def _acquire(module_globals: dict, name: str) -> Tuple[str, str]:
    key = (module_globals["__name__"], name)
    entry = _INSTALLED.get(key)
    if entry is None:
        dispatch = _RopeDispatch(module_globals[name], ROPE_FUNCTIONS[name])
        module_globals[name] = dispatch
        _INSTALLED[key] = entry = [dispatch, module_globals, 0]
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


def _attention_hooks(model: nn.Module) -> List[Tuple[dict, str]]:
    """``(module globals, function name)`` of the rope functions the model's attention
    ``forward``s call by name."""
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
        for name in ROPE_FUNCTIONS:
            if name in code.co_names and callable(g.get(name)):
                found[(g["__name__"], name)] = (g, name)
    return list(found.values())


def _config_of(model: nn.Module, parent: nn.Module):
    config = getattr(parent, "config", None) or getattr(model, "config", None)
    if config is None:
        raise ValueError("the model has no .config; pass params= explicitly")
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


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


def _check_params(params: RopeParams, tracker: Optional[RopeTracker], rotary: nn.Module) -> None:
    """The params must reproduce the model's own rope (catches rope types or config
    readings that differ from the model's)."""
    if tracker is None:
        inv, current = getattr(rotary, "inv_freq", None), params
    elif params.rope_type == "dynamic":
        inv, current = getattr(rotary, "inv_freq", None), tracker.current
    else:  # longrope: the buffer holds whichever set the last call picked; check the initial one
        inv, current = getattr(rotary, "original_inv_freq", None), params
    if isinstance(inv, torch.Tensor):
        # ``model.to(torch.bfloat16)`` casts the buffer too (the model's own rope then runs
        # on rounded frequencies; ours keeps float32): compare at the buffer's precision.
        low = inv.dtype in (torch.float16, torch.bfloat16)
        ours = current.inv_freq.to(inv.dtype).float() if low else current.inv_freq
        rtol = torch.finfo(inv.dtype).eps if low else 1e-5
        inv = inv.detach().float().cpu()
        if inv.shape != ours.shape or not torch.allclose(ours, inv, rtol=rtol, atol=0.0):
            raise ValueError(
                f"the params' inv_freq ({current!r}) do not match the model's rotary_emb.inv_freq "
                f"(shape {tuple(inv.shape)}); refusing to change the model's rope"
            )
    scale = getattr(rotary, "attention_scaling", None)
    if isinstance(scale, (int, float)) and abs(float(scale) - current.cos_sin_scale) > 1e-6 * max(
        1.0, abs(float(scale))
    ):
        raise ValueError(
            f"the params' cos_sin_scale={current.cos_sin_scale!r} does not match the model's "
            f"rotary_emb.attention_scaling={scale!r}"
        )


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
        model: a ``*ForCausalLM`` / ``*Model`` of the Llama, Mistral, Qwen2, Qwen3,
            DeepSeek-V2 or DeepSeek-V3 family (any dtype or device, before or after
            ``.to()``).
        params: the rope parameters; default ``RopeParams.from_config(model.config)``.
            Checked against the model's own ``rotary_emb`` (``inv_freq`` to 1e-5 relative,
            ``attention_scaling``) either way.
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
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if strict and model_type not in SUPPORTED_MODEL_TYPES:
            raise NotImplementedError(
                f"model_type={model_type!r} is not one of {SUPPORTED_MODEL_TYPES}; "
                "pass strict=False to try anyway"
            )
        if not sites:
            raise NotImplementedError(
                f"{type(model).__name__} has no `rotary_emb` submodule; cannot switch its rope"
            )
        hooks = _attention_hooks(model)
        if not hooks:
            raise NotImplementedError(
                f"no attention forward of {type(model).__name__} calls one of "
                f"{tuple(ROPE_FUNCTIONS)}; cannot switch its rope"
            )
        site_params = []
        for parent, rotary in sites:
            p = params if params is not None else RopeParams.from_config(_config_of(model, parent))
            if not isinstance(p, RopeParams):
                raise TypeError(f"params must be a yarn_triton.RopeParams, got {type(p).__name__}")
            tracker = _make_tracker(p, rotary)
            _check_params(p, tracker, rotary)
            site_params.append((p, tracker))

        keys = [_acquire(g, name) for g, name in hooks]
        for (parent, rotary), (p, tracker) in zip(sites, site_params):
            parent.rotary_emb = FusedRotaryEmbedding(rotary, p, keys, tracker)
    return model


def disable_fused_rope(model: nn.Module) -> nn.Module:
    """Switch ``model`` back to its own rope (in place; returns it). Restores the original
    ``rotary_emb`` modules, and the modeling files' rope functions once no switched model
    uses them. Does nothing on a model that is not switched."""
    with _LOCK:
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
