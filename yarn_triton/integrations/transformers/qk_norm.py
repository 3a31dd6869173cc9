"""Per-head q/k RMSNorm moved into the rope call (Qwen3, Qwen3-MoE, Qwen3-VL, Qwen3.5): the
:class:`_DeferredQKNorm` modules that stand in for ``q_norm``/``k_norm``, the attention
hooks that bound the deferral to one call, :func:`_take_qk_norm` (what the rope dispatcher
consumes), and finding (:func:`_qk_norm_sites`), installing and restoring them."""

from __future__ import annotations

import inspect
import threading
from typing import List, Optional, Tuple

import torch
from torch import nn

from .handle import FusedRopePositions


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
