"""Switch torchtitan's llama3, qwen3 and deepseek_v3 models to the fused rope kernel.

Load it into a torchtitan run with::

    torchrun ... -m torchtitan.train --experimental.custom_import yarn_triton.integrations.torchtitan

Importing the module calls :func:`enable` (``precise_angles`` from the environment variable
``YARN_TRITON_TORCHTITAN_PRECISE_ANGLES``, ``1`` unless set to ``0``); :func:`disable` puts
torchtitan's own functions back. Written against torchtitan 0.2.2; another version whose functions differ is refused
with a :class:`RuntimeError` naming the function, rather than run half switched.

How it hooks in. Each of the three model files precomputes a rope table once per model
(a buffer of the model, rebuilt by ``init_weights``) and rotates q and k with a
module-level function that the attention code calls by name:

=============  =============================  ============================  ===============
model          precompute (args it reads)     rotate                        our layout
=============  =============================  ============================  ===============
llama3         ``precompute_freqs_cis(dim,    ``apply_rotary_emb(xq, xk,    ``interleaved``
               end, theta, scaling_args)``:   freqs_cis, positions)``
               Llama 3.1 band scaling         complex pairs
qwen3          ``precompute_rope_cache(dim,   ``apply_rotary_emb(xq, xk,    ``neox``
               max_seq_len, base)``: plain    rope_cache, positions)``
               rope, ``[cos | sin]`` table    rotate_half
deepseek_v3    ``precompute_freqs_cis(args)``  ``apply_rotary_emb(x,         ``interleaved``
               YaRN when ``max_seq_len >      freqs_cis, positions)``, once
               original_seq_len``, else       for q_pe, once for k_pe
               plain rope
=============  =============================  ============================  ===============

:func:`enable` wraps each precompute function so that, besides building torchtitan's table
as before (the buffer stays, and so does everything that reads it), it builds the
:class:`~yarn_triton.RopeParams` of the same arguments and records them under the table's
shape ``(rows, columns)``; and it replaces each rotate function with one that looks the
params up by the shape of the table it is handed and calls :func:`yarn_triton.apply_rope`
(out of place, differentiable; traced by ``torch.compile``) with torchtitan's
``positions`` (the sharded positions of context parallelism) or, when they are None,
``0 .. seqlen-1``. The params come from the same float32 operations as torchtitan's table:
the angles ``position * inv_freq`` are bit for bit those of the table (with
``precise_angles=True``, the default, the kernel forms them in float64, more accurate
than the float32 table at long positions). For deepseek_v3 the YaRN table has unit
magnitude (``cos_sin_scale == 1``) and torchtitan folds YaRN's mscale into the attention's
``softmax_scale`` (``* mscale**2``), which stays torchtitan's; the params'
``softmax_scale_factor`` is that same ``mscale**2``.

Tables of a shape nobody registered fall back to torchtitan's own function (with one
warning outside ``torch.compile``): models built before :func:`enable`, and a table that
context parallelism shards in place (torchtitan's validator does so). Two models of one
family whose tables have one shape but different params are refused when used (the shape
cannot tell them apart).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ..op import apply_rope
from ..rope import RopeParams
from ..variants import yarn_find_correction_range, yarn_linear_ramp_mask

__all__ = ["enable", "disable", "is_enabled", "params_for", "verify", "SUPPORTED_TORCHTITAN"]

#: The torchtitan release this integration is written and tested against.
SUPPORTED_TORCHTITAN = "0.2.2"


# --------------------------------------------------------------------------------------
# Params from each precompute function's arguments
# --------------------------------------------------------------------------------------
def _llama3_params(dim, end, theta, scaling_args) -> Tuple[RopeParams, Tuple[int, int]]:
    params = RopeParams.llama3(
        dim, theta, scaling_args.scaling_factor, scaling_args.low_freq_factor,
        scaling_args.high_freq_factor, scaling_args.original_max_position_embeddings,
    )
    return params, (int(end), dim // 2)


def _qwen3_params(dim, max_seq_len, base) -> Tuple[RopeParams, Tuple[int, int]]:
    return RopeParams.default(dim, base), (int(max_seq_len), 2 * dim)


def _deepseek_v3_params(args) -> Tuple[RopeParams, Tuple[int, int]]:
    dim, seqlen = args.qk_rope_head_dim, args.max_seq_len
    key = (int(seqlen), dim // 2)
    if not seqlen > args.original_seq_len:  # torchtitan's condition for YaRN
        return RopeParams.default(dim, args.rope_theta), key
    base, factor = args.rope_theta, args.rope_factor
    # YaRN in DeepSeek-V3's reference order of operations (``freqs / factor`` rather than
    # RopeParams.yarn's ``1 / (factor * base**x)``, one float32 ulp apart at times), so
    # inv_freq is torchtitan's to the bit; the correction range and ramp are the shared ones.
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low, high = yarn_find_correction_range(args.beta_fast, args.beta_slow, dim, base, args.original_seq_len)
    smooth = 1 - yarn_linear_ramp_mask(low, high, dim // 2)
    inv_freq = freqs / factor * (1 - smooth) + freqs * smooth
    # torchtitan's table has unit magnitude; its Attention multiplies the softmax scale by
    # mscale**2 (for factor > 1, RopeParams.yarn(mscale=m, mscale_all_dim=m) gives this pair).
    mscale = 0.1 * args.mscale * math.log(factor) + 1.0  # as torchtitan's Attention computes it
    return RopeParams(inv_freq, dim, 1.0, mscale * mscale, "yarn"), key


# --------------------------------------------------------------------------------------
# The sites
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Site:
    family: str
    module: str
    precompute: str
    precompute_args: Tuple[str, ...]  # its parameter names, checked when enabling
    params: Callable  # precompute's arguments (by name, defaults filled) -> (RopeParams, table shape)
    rotate: str
    rotate_args: Tuple[str, ...]
    layout: str


_SITES = (
    _Site("llama3", "torchtitan.models.llama3.model.model",
          "precompute_freqs_cis", ("dim", "end", "theta", "scaling_args"), _llama3_params,
          "apply_rotary_emb", ("xq", "xk", "freqs_cis", "positions"), "interleaved"),
    _Site("qwen3", "torchtitan.models.qwen3.model.model",
          "precompute_rope_cache", ("dim", "max_seq_len", "base"), _qwen3_params,
          "apply_rotary_emb", ("xq", "xk", "rope_cache", "positions"), "neox"),
    _Site("deepseek_v3", "torchtitan.models.deepseek_v3.model.model",
          "precompute_freqs_cis", ("args",), _deepseek_v3_params,
          "apply_rotary_emb", ("x", "freqs_cis", "positions"), "interleaved"),
)

_LOCK = threading.RLock()
# family -> {table shape: RopeParams, or _Clash when two differing params share a shape}
_REGISTRY: Dict[str, Dict[Tuple[int, int], object]] = {s.family: {} for s in _SITES}
# (module globals, name, original) of every installed replacement
_INSTALLED: list = []
_OPTIONS = {"precise_angles": True}
_WARNED: set = set()


class _Clash:
    def __init__(self, family: str, shape: Tuple[int, int]) -> None:
        self.message = (
            f"yarn_triton.integrations.torchtitan: two {family} models in this process have rope tables "
            f"of shape {shape} but different rope parameters; the switch cannot tell them apart. Build "
            "one of them before yarn_triton.integrations.torchtitan.enable(), or use one at a time "
            "(disable() and enable() clear the record)."
        )


def _same(a: RopeParams, b: RopeParams) -> bool:
    return (a.rope_dim == b.rope_dim and a.cos_sin_scale == b.cos_sin_scale
            and a.softmax_scale_factor == b.softmax_scale_factor and torch.equal(a.inv_freq, b.inv_freq))


@contextmanager
def _host_math():
    """CPU, float32 by default: torchtitan builds models under ``torch.device("meta")``
    (or the buffer device) and ``set_default_dtype(training.dtype)``."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(dtype)


def _record(site: _Site, signature: inspect.Signature, args, kwargs) -> None:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    with _host_math():
        params, shape = site.params(**bound.arguments)
    with _LOCK:
        table = _REGISTRY[site.family]
        old = table.get(shape)
        if old is None:
            table[shape] = params
        elif isinstance(old, RopeParams) and not _same(old, params):
            table[shape] = _Clash(site.family, shape)
        # equal params: keep the first object (launch plans and compiled graphs key on it)


def params_for(family: str, table: torch.Tensor) -> Optional[RopeParams]:
    """The params recorded for a rope table of ``family`` (``"llama3"``, ``"qwen3"``,
    ``"deepseek_v3"``), or None when no model of that table's shape was built while
    enabled. Raises RuntimeError when two models of that shape have different params."""
    hit = _REGISTRY[family].get((table.shape[0], table.shape[-1]))
    if isinstance(hit, _Clash):
        raise RuntimeError(hit.message)
    return hit


def _fallback_warning(site: _Site, table: torch.Tensor) -> None:
    key = (site.family, tuple(table.shape))
    if torch.compiler.is_compiling() or key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"yarn_triton.integrations.torchtitan: no {site.family} model with a rope table of shape "
        f"{tuple(table.shape)} was built while the switch was on (built before enable(), or the "
        "table was sharded); torchtitan's own rope runs for it", RuntimeWarning, stacklevel=3,
    )


def _make_precompute(site: _Site, original: Callable) -> Callable:
    signature = inspect.signature(original)

    def precompute(*args, **kwargs):
        out = original(*args, **kwargs)
        _record(site, signature, args, kwargs)
        return out

    precompute.__wrapped__ = original
    precompute.__name__ = original.__name__
    precompute.__doc__ = original.__doc__
    return precompute


def _rotate_pair(site: _Site, original: Callable, xq, xk, table, positions):
    params = params_for(site.family, table)
    if params is None:
        _fallback_warning(site, table)
        return original(xq, xk, table, positions)
    out = apply_rope(xq, xk, positions, params, layout=site.layout, precise_angles=_OPTIONS["precise_angles"])
    if _verifying():
        _verify(site, original, (xq, xk, table, positions), out)
    return out


def _make_rotate(site: _Site, original: Callable) -> Callable:
    # the replacements keep the parameter names: the attention code passes some by keyword
    if site.family == "llama3":
        def rotate(xq, xk, freqs_cis, positions=None):
            return _rotate_pair(site, original, xq, xk, freqs_cis, positions)
    elif site.family == "qwen3":
        def rotate(xq, xk, rope_cache, positions=None):
            return _rotate_pair(site, original, xq, xk, rope_cache, positions)
    else:
        def rotate(x, freqs_cis, positions=None):
            params = params_for(site.family, freqs_cis)
            if params is None:
                _fallback_warning(site, freqs_cis)
                return original(x, freqs_cis, positions)
            out = apply_rope(x, None, positions, params, layout=site.layout,
                             precise_angles=_OPTIONS["precise_angles"])[0]
            if _verifying():
                _verify(site, original, (x, freqs_cis, positions), (out,))
            return out
    assert tuple(inspect.signature(rotate).parameters) == site.rotate_args

    rotate.__wrapped__ = original
    rotate.__name__ = original.__name__
    rotate.__doc__ = original.__doc__
    return rotate


# --------------------------------------------------------------------------------------
# Verification: switched calls checked against torchtitan's own function
# --------------------------------------------------------------------------------------
_VERIFY: Dict[str, object] = {"on": False, "tol": None, "calls": 0, "max_rel_err": 0.0}


def verify(enabled: bool, tol: Optional[float] = None) -> dict:
    """Check every switched rope call against torchtitan's own function while enabled.

    Each eager call then also runs torchtitan's rotate function (with its table) on the
    same q/k and ``positions`` argument, and compares: so both the positions the kernel
    derives (``0 .. seqlen-1`` when torchtitan passes None; the sharded positions under
    context parallelism) and the rotation itself are checked. A relative error (by norm,
    in float64) above ``tol`` raises RuntimeError; the default is 1e-3 for float32 inputs
    (torchtitan's table forms its angles in float32: ~1e-4 rad of difference at a few
    thousand positions) and 2e-2 for 16-bit ones. Calls that ``torch.compile`` traces are
    neither checked nor counted, and the compiled code never reads this switch: a check
    would become part of the graph, and any write to this module's state from inside a
    traced region breaks torchtitan's compiled, activation-checkpointed blocks ("HOP:
    Unsafe side effect"; seen on the device, torchtitan 0.2.2 with ``--compile.enable``).

    Returns the report so far: ``{"calls", "max_rel_err"}``; enabling resets it.
    For a first training step: ``verify(True)`` before it, ``verify(False)`` after."""
    with _LOCK:
        report = {k: _VERIFY[k] for k in ("calls", "max_rel_err")}
        if enabled:
            _VERIFY.update(on=True, tol=tol, calls=0, max_rel_err=0.0)
        else:
            _VERIFY["on"] = False
    return report


def _verifying() -> bool:
    """Whether this call is checked: only eager ones while enabled (under torch.compile the
    switch is not even read; see :func:`verify`)."""
    return not torch.compiler.is_compiling() and _VERIFY["on"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-300))


def _verify(site: _Site, original: Callable, args: tuple, ours: tuple) -> None:
    with torch.no_grad():
        theirs = original(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    theirs = theirs if isinstance(theirs, tuple) else (theirs,)
    err = max(_rel_err(o, t) for o, t in zip(ours, theirs))
    tol = _VERIFY["tol"] or (1e-3 if ours[0].dtype == torch.float32 else 2e-2)
    _VERIFY["calls"] += 1
    _VERIFY["max_rel_err"] = max(_VERIFY["max_rel_err"], err)
    if not err <= tol:  # (NaN fails too)
        raise RuntimeError(f"yarn_triton.integrations.torchtitan: {site.family} rope call {_VERIFY['calls']} "
                           f"differs from torchtitan's {site.rotate}: relative error {err:.2e} > {tol:g}")


def _check(site: _Site, module, name: str, expected: Tuple[str, ...]) -> Callable:
    fn = module.__dict__.get(name)
    if not callable(fn):
        raise RuntimeError(
            f"yarn_triton.integrations.torchtitan supports torchtitan {SUPPORTED_TORCHTITAN}: "
            f"{site.module} has no function {name} in this torchtitan version"
        )
    got = tuple(inspect.signature(fn).parameters)
    if got != expected:
        raise RuntimeError(
            f"yarn_triton.integrations.torchtitan supports torchtitan {SUPPORTED_TORCHTITAN}: "
            f"{site.module}.{name} takes {got} in this torchtitan version, not {expected}"
        )
    return fn


# --------------------------------------------------------------------------------------
# The switch
# --------------------------------------------------------------------------------------
def enable(precise_angles: bool = True) -> None:
    """Switch torchtitan's llama3, qwen3 and deepseek_v3 models built from now on to the
    fused rope kernel (called by importing this module). ``precise_angles`` is passed to
    :func:`yarn_triton.apply_rope` (False: float32 ``position * inv_freq``, as torchtitan's
    table). Calling it again only updates ``precise_angles``. Raises, before changing
    anything, ImportError if a model file does not import and RuntimeError if the installed
    torchtitan's functions are not the expected ones."""
    if not isinstance(precise_angles, bool):
        raise TypeError(f"precise_angles must be a bool, got {type(precise_angles).__name__}")
    with _LOCK:
        _OPTIONS["precise_angles"] = precise_angles
        if _INSTALLED:
            return
        plan = []
        for site in _SITES:
            try:
                module = importlib.import_module(site.module)
            except ImportError as e:
                raise ImportError(
                    f"yarn_triton.integrations.torchtitan needs torchtitan {SUPPORTED_TORCHTITAN} (and what its "
                    f"model packages import): importing {site.module} failed: {e}"
                ) from e
            pre = _check(site, module, site.precompute, site.precompute_args)
            rot = _check(site, module, site.rotate, site.rotate_args)
            plan.append((module.__dict__, site.precompute, pre, _make_precompute(site, pre)))
            plan.append((module.__dict__, site.rotate, rot, _make_rotate(site, rot)))
        for namespace, name, original, replacement in plan:
            namespace[name] = replacement
            _INSTALLED.append((namespace, name, original, replacement))


def disable() -> None:
    """Put torchtitan's own precompute and rotate functions back and forget the recorded
    params: models run torchtitan's rope again, also those built while enabled."""
    with _LOCK:
        while _INSTALLED:
            namespace, name, original, replacement = _INSTALLED.pop()
            if namespace.get(name) is replacement:
                namespace[name] = original
        for table in _REGISTRY.values():
            table.clear()
        _WARNED.clear()


def is_enabled() -> bool:
    """Whether torchtitan's rope functions are switched."""
    return bool(_INSTALLED)


enable(precise_angles=os.environ.get("YARN_TRITON_TORCHTITAN_PRECISE_ANGLES", "1") != "0")
