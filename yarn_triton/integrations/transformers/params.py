"""The :class:`~yarn_triton.RopeParams` of each rotary site: read from its config (per rope
label for DeepSeek-V4), given a :class:`~yarn_triton.RopeTracker` when they depend on the
sequence length or a :class:`_LearnedFreqScale` for learned frequencies, and checked
against the model's own rotary (``inv_freq``, ``attention_scaling``, M-RoPE sections):
:func:`_site_params`."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from ...rope import RopeParams, RopeTracker
from .sites import _config_of
from .support import ModelSupport


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
