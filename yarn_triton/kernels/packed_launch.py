"""The packed launcher: a replayed plan's launch without re-parsing its fixed arguments.

Triton's C launcher reads all 101 of ``rope_kernel``'s arguments from Python objects on
every call; on an H100 host that is about a third of a plan replay's launch cost (measured by
``bench/launch_args_probe.py``). A plan replays with only its 15 data pointers and
``pos_base`` changed, so :func:`spec_for` packs everything else once, into the byte layout
the CUDA driver reports for the compiled function (``cuFuncGetParamInfo``, for as many
parameters as its PTX entry declares), and the small C
module ``packed_launch.c`` copies that template, writes the pointers and ``pos_base`` and
calls ``cuLaunchKernel`` (the module's ``launch(spec, stream, pointers, pos_base)``).

The C module is built on first use with the C compiler Triton itself needs (``CC``, else
``gcc``/``cc``/``clang``), into ``$YARN_TRITON_CACHE_DIR`` (default
``~/.cache/yarn_triton``), keyed by the source and the Python version. Anything missing (no
compiler, a driver older than CUDA 12.4, a Triton whose compiled kernels hold their
signature or PTX elsewhere, a layout that does not match the signature) makes :func:`spec_for`
return None, and the plan keeps Triton's launcher: slower on the host, never different on
the device. ``YARN_TRITON_PACKED_LAUNCH=0`` turns it off.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .. import native

ENABLED = os.environ.get("YARN_TRITON_PACKED_LAUNCH", "1") != "0"
_SOURCE = Path(__file__).with_name("packed_launch.c")
_MODULE_NAME = "_yarn_triton_launch"
_HEADER = struct.Struct("<Q12I")  # packed_launch.c's Header

# Triton's signature types of scalar arguments: how each is stored in the parameter buffer
_SCALAR_FORMATS = {"i1": "b", "i8": "b", "u1": "B", "u8": "B", "i16": "h", "u16": "H", "i32": "i", "u32": "I",
                   "i64": "q", "u64": "Q", "fp16": "e", "fp32": "f", "f32": "f", "fp64": "d"}

_state = {"module": None, "tried": False, "error": None}


def _build() -> Path:
    """Compile ``packed_launch.c`` (once per source and Python version: :mod:`yarn_triton.native`)
    and return the shared object's path; raises when there is no compiler or it fails."""
    return native.build(_MODULE_NAME, _SOURCE, ["-ldl"])


def module():
    """The built C module, or None (the reason in :func:`unavailable_reason`); built and
    loaded once per process."""
    return native.load_once(_state, _MODULE_NAME, _build)  # (without it: Triton's launcher)


def unavailable_reason() -> Optional[str]:
    """Why the packed launcher is not in use (None when it is, or was not yet needed)."""
    if not ENABLED:
        return "YARN_TRITON_PACKED_LAUNCH=0"
    return _state["error"]


def build_spec(function: int, grid: Sequence[int], block: int, shared: int, device: int, types: Sequence[str],
               values: Sequence, layout: Sequence[Tuple[int, int]], n_ptrs: int, base_index: int) -> bytes:
    """The spec of one launch (``packed_launch.c``'s layout), or ValueError when the
    signature and the driver's parameter layout disagree.

    ``types``/``values``: every kernel argument's Triton signature type (``"constexpr"``
    for the ones compiled in) and value, in order; the first ``n_ptrs`` are the pointers
    each call brings (their values unused) and ``values[base_index]`` is ``pos_base``, also
    brought by each call. ``layout``: ``(offset, size)`` per parameter of the compiled
    function, which are the non-constexpr arguments then Triton's trailing scratch pointers
    (null here)."""
    runtime = [i for i, ty in enumerate(types) if ty != "constexpr"]
    extra = layout[len(runtime):]
    if len(layout) < len(runtime) or len(extra) > 2 or any(size != 8 for _, size in extra):
        raise ValueError(f"{len(layout)} parameters in the compiled function for {len(runtime)} arguments")
    size = max((off + sz for off, sz in layout), default=0)
    buf = bytearray(size)
    ptr_off: List[int] = [0] * n_ptrs
    base = None
    for i, (off, sz) in zip(runtime, layout):
        ty = types[i]
        if ty.startswith("*"):
            if sz != 8 or i >= n_ptrs:
                raise ValueError(f"pointer argument {i} ({ty}): size {sz}, or past the {n_ptrs} call pointers")
            ptr_off[i] = off
            continue
        fmt = _SCALAR_FORMATS.get(ty)
        if fmt is None or struct.calcsize(fmt) != sz:
            raise ValueError(f"argument {i}: type {ty!r} does not fit a {sz}-byte parameter")
        if i == base_index:
            if fmt not in ("i", "q"):
                raise ValueError(f"pos_base has type {ty!r}")
            base = (off, sz)
            continue
        struct.pack_into("<" + fmt, buf, off, values[i])
    if base is None or set(range(n_ptrs)) - set(runtime):
        raise ValueError("pos_base or a call pointer was compiled in as a constant")
    header = _HEADER.pack(function, *grid, block, shared, device, len(layout), n_ptrs, size, *base, 0)
    return header + struct.pack(f"<{n_ptrs}I", *ptr_off) + struct.pack(f"<{len(layout)}I",
                                                                        *(o for o, _ in layout)) + bytes(buf)


def spec_for(compiled, arg_names: Sequence[str], values: Sequence, grid: Sequence[int], device: int,
             n_ptrs: int, base_index: int) -> Optional[bytes]:
    """The packed spec of ``compiled`` (a Triton ``CompiledKernel`` with its handles
    loaded) launched on ``grid`` with ``values`` (every argument of the kernel, by
    ``arg_names``; the call pointers' and ``pos_base``'s unused), or None where the packed
    launcher cannot stand in for Triton's."""
    md = getattr(compiled, "metadata", None)
    if not ENABLED or md is None:
        return None
    mod = module()
    if mod is None:
        return None
    if getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_pdl", False) or \
            getattr(md, "launch_cooperative_grid", False) or getattr(md, "global_scratch_size", 0) or \
            getattr(md, "profile_scratch_size", 0):
        return None  # launch attributes or scratch buffers: Triton's launcher knows them
    signature = getattr(getattr(compiled, "src", None), "signature", None)
    if not isinstance(signature, dict) or list(signature) != list(arg_names):
        return None
    count = _ptx_param_count(compiled)
    if count is None:
        return None
    try:
        mod.load_driver()
        layout = mod.param_layout(compiled.function, count)
        return build_spec(compiled.function, grid, 32 * md.num_warps, md.shared, device,
                          list(signature.values()), values, layout, n_ptrs, base_index)
    except (OSError, RuntimeError, ValueError, struct.error) as exc:
        _state["error"] = f"{type(exc).__name__}: {exc}"
        return None


def _ptx_param_count(compiled) -> Optional[int]:
    """How many parameters the compiled kernel's PTX entry declares (every argument Triton
    passes, its trailing scratch pointers included), or None without its PTX. This is the
    check that no parameter goes unpacked: the driver reports each parameter's place but
    not how many there are, except by failing past the last."""
    try:
        ptx = compiled.asm["ptx"]
    except (AttributeError, KeyError, TypeError):
        return None
    entry = re.search(r"\.entry\s+[\w$]+\s*\((.*?)\)", ptx if isinstance(ptx, str) else "", re.S)
    return None if entry is None else len(re.findall(r"\.param\b", entry.group(1)))
