"""The package's two small native modules, built on first use and cached.

``kernels/packed_launch.c`` (plain C, the Python headers only) and ``op/native_node.cpp``
(C++ against torch's headers and libraries, which every torch wheel ships) are compiled
with the machine's C/C++ compiler, as Triton compiles its own launcher, into
``$YARN_TRITON_CACHE_DIR`` (default ``~/.cache/yarn_triton``): once per source, Python
and (for the C++ module) torch version. Nothing here is needed for correctness: where a
module cannot be built its caller keeps a pure-Python or Triton path, and the reason is
kept for reports.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence


def cache_dir() -> Path:
    """Where built modules are kept (``$YARN_TRITON_CACHE_DIR``, default ``~/.cache/yarn_triton``)."""
    return Path(os.environ.get("YARN_TRITON_CACHE_DIR") or Path.home() / ".cache" / "yarn_triton")


def compiler(cxx: bool = False) -> Optional[str]:
    """The C (``CC``, else gcc/cc/clang) or C++ (``CXX``, else g++/c++/clang++) compiler, or None."""
    if cxx:
        return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")


def python_includes() -> List[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["include"], paths["platinclude"]})


def build(name: str, source: Path, flags: Sequence[str], *, cxx: bool = False, tag: bytes = b"",
          timeout: float = 300) -> Path:
    """Compile ``source`` into the extension module ``name`` (the cached one when the
    source, ``flags``, the Python version and ``tag`` are unchanged) and return its path;
    RuntimeError without a compiler or when it fails."""
    text = source.read_bytes()
    key = hashlib.sha256(text + sys.version.encode() + "\0".join(flags).encode() + tag).hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = cache_dir() / f"{name}-{key}{suffix}"
    if target.exists():
        return target
    cc = compiler(cxx)
    if cc is None:
        raise RuntimeError(f"no {'C++' if cxx else 'C'} compiler (set {'CXX' if cxx else 'CC'}, or install "
                           f"{'g++' if cxx else 'gcc'})")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, str(source), "-O2", "-shared", "-fPIC", *(f"-I{d}" for d in python_includes()), *flags,
               "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(out, target)  # atomic: a concurrent build loses nothing
    return target


def load(name: str, path: Path):
    """Import the extension module ``name`` from ``path``."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_once(state: dict, name: str, build) -> Optional[object]:
    """The module ``name`` built by ``build()`` (a path) and loaded, once per process:
    ``state`` (``{"module", "tried", "error"}``) keeps it, or the reason it is None."""
    if not state["tried"]:
        state["tried"] = True
        try:
            state["module"] = load(name, build())
        except Exception as exc:  # no compiler, no headers: the caller keeps its other path
            state["error"] = f"{type(exc).__name__}: {exc}"
    return state["module"]
