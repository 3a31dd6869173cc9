"""Patching and restoring the modeling modules: the dispatchers are installed in a modeling
module's globals once per ``(module, function)``, counted per switched model
(:func:`_acquire`), and the original put back when the last one is switched back
(:func:`_release`); :data:`_LOCK` guards switching."""

from __future__ import annotations

import threading
from typing import Dict, Optional, Tuple

from .dispatch import _RopeDispatch
from .q_scale import _QScaleDispatch
from .support import RopeFunction


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
