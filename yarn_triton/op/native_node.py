"""The eager rope's autograd node in C++ (``native_node.cpp``), built in the background.

A replayed out-of-place call (:func:`~.eager.replay_with_node`) needs two fresh outputs
and one autograd node whose backward runs the inverse rotation. ``torch.autograd.Function``
does that from Python at about 5 us of host time on an H100 host, more than the kernel's
own launch; the C++ node (``apply(backward, state, q, k, q_weight, k_weight, copy)``)
allocates the outputs and wires them into the graph in about a third of that, and calls
back into Python (``backward(state, grad_q, grad_k, saved)``) only in the backward.

It is compiled against the installed torch's headers and libraries (every torch wheel
ships them) with the machine's C++ compiler, about 10 s, into the cache of
:mod:`yarn_triton.native`. The first eager call that could use it starts that build on a
background thread and, like every call until the build is done, takes the Python
``autograd.Function`` (:class:`~.eager._EagerRope`); the results are the same either way.
No compiler, headers that do not build, or ``YARN_TRITON_NATIVE_NODE=0``: the Python
Function stays, and :func:`unavailable_reason` says why.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import torch

from .. import native

ENABLED = os.environ.get("YARN_TRITON_NATIVE_NODE", "1") != "0"
_SOURCE = Path(__file__).with_name("native_node.cpp")
_MODULE_NAME = "_yarn_triton_node"

# The module's apply once it is loaded (read by the eager path on every call), else None.
APPLY = None
_state = {"module": None, "tried": False, "error": None}
_started = threading.Event()  # the build was asked for (at most one per process)
_lock = threading.Lock()
_built = threading.Event()


def _flags() -> list:
    root = Path(torch.__file__).parent
    lib = root / "lib"
    return ["-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{root / 'include'}", f"-L{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
            f"-Wl,-rpath,{lib}"]


def _build() -> Path:
    """Compile ``native_node.cpp`` against this torch (cached per source, flags, Python and
    torch version) and return the module's path."""
    return native.build(_MODULE_NAME, _SOURCE, _flags(), cxx=True,
                        tag=f"{torch.__version__} {torch.__file__}".encode())


def _build_and_publish() -> None:
    global APPLY
    try:
        mod = native.load_once(_state, _MODULE_NAME, _build)
        if mod is not None:
            APPLY = mod.apply
    finally:
        _built.set()


def request() -> None:
    """Start building the module on a background thread (once per process; nothing when
    disabled)."""
    if _started.is_set() or not ENABLED:
        return
    with _lock:
        if _started.is_set():
            return
        _started.set()
        threading.Thread(target=_build_and_publish, name="yarn_triton native node build", daemon=True).start()


def wait(timeout: Optional[float] = None):
    """Start the build if needed and wait for it: the module's ``apply``, or None (then
    :func:`unavailable_reason` says why). For tests and benchmarks that want the node from
    their first call."""
    request()
    if ENABLED:
        _built.wait(timeout)
    return APPLY


def unavailable_reason() -> Optional[str]:
    """Why the C++ node is not in use (None when it is, or not yet asked for)."""
    if not ENABLED:
        return "YARN_TRITON_NATIVE_NODE=0"
    if _started.is_set() and not _built.is_set():
        return "still building"
    return _state["error"]
