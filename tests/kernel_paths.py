"""Which kernel paths each test runs: a pytest plugin for planning the suite, not a test.

``YARN_TRITON_KERNEL_PATHS=paths.json python -m pytest ...`` records, for every test, the
kernel's compile-time switches of each launch it makes (the interpreter's or a GPU's) and
writes them as JSON at the end: ``{nodeid: [path, ...]}``, where a path is the switches
(layout, position mode, norm, M-RoPE, q-scale, in place, one step, ...) plus the dtypes of
q and its output. ``python tests/kernel_paths.py paths.json [other.json]`` then prints the
paths only one test runs, the tests none of whose paths is their own, and, given a second
file, the paths the first run covers and the second does not (the check that a faster
suite covers no less).

Values that only size the kernel (head dim, padding, tile shape) are left out: in the
interpreter they run the same code, which is what a path means here.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

# constexprs that size the kernel rather than choose its code: left out of a path
_SIZES = {"HALF", "HALF_PAD", "Q_TAIL_PAD", "K_TAIL_PAD", "SEC_T", "SEC_H", "SEC_W", "BLOCK_T", "Q_BLOCK_H",
          "K_BLOCK_H", "HEAD_GROUPS"}
ENV = "YARN_TRITON_KERNEL_PATHS"


def _path(args, kwargs) -> str:
    """One launch's path: its switches, whether the rotation is partial (tails) or padded,
    and the dtypes of q, q's output and k (absent k: '-')."""
    sw = {k: (int(v) if isinstance(v, bool) else v) for k, v in kwargs.items()
          if k.isupper() and k not in _SIZES}
    sw["Q_TAIL"] = int(kwargs.get("Q_TAIL_PAD", 0) > 0)
    sw["K_TAIL"] = int(kwargs.get("K_TAIL_PAD", 0) > 0)
    sw["PADDED"] = int(kwargs.get("HALF_PAD", 0) != kwargs.get("HALF", 0))
    q, qo, k = args[0], args[1], args[2]
    n_k = args[17] if len(args) > 17 else 1
    sw["dtypes"] = "/".join(str(t.dtype).replace("torch.", "") for t in (q, qo)) + (
        "/" + str(k.dtype).replace("torch.", "") if n_k else "/-")
    return ",".join(f"{key}={sw[key]}" for key in sorted(sw))


class _Recorder:
    def __init__(self, out: str):
        self.out = out
        self.paths = defaultdict(set)
        self.current = None

    def pytest_configure(self, config):
        from yarn_triton.kernels import rope_kernel as rk

        real, recorder = rk.rope_kernel, self

        class _Spy:
            """Stands in for the kernel object: records each launch's switches."""

            def __getattr__(self, name):
                return getattr(real, name)

            def __getitem__(self, grid):
                launch = real[grid]

                def call(*args, **kwargs):
                    if recorder.current is not None:
                        recorder.paths[recorder.current].add(_path(args, kwargs))
                    return launch(*args, **kwargs)
                return call

        rk.rope_kernel = _Spy()

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid

    def pytest_runtest_teardown(self, item):
        self.current = None

    def pytest_sessionfinish(self, session):
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        out = self.out if not worker else f"{self.out}.{worker}"
        with open(out, "w") as f:
            json.dump({k: sorted(v) for k, v in sorted(self.paths.items())}, f, indent=0)


def plugin():
    """The recorder when ``YARN_TRITON_KERNEL_PATHS`` names an output file, else None."""
    out = os.environ.get(ENV)
    return _Recorder(out) if out else None


def _load(path: str) -> dict:
    import glob

    merged = {}
    for name in [path, *sorted(glob.glob(path + ".gw*"))]:
        if os.path.exists(name):
            with open(name) as f:
                merged.update(json.load(f))
    return merged


def _report(first: str, second: str | None = None) -> int:
    runs = _load(first)
    by_path = defaultdict(list)
    for test, paths in runs.items():
        for p in paths:
            by_path[p].append(test)
    print(f"{len(runs)} tests launch the kernel; {len(by_path)} distinct paths")
    own = {t for ts in by_path.values() if len(ts) == 1 for t in ts}
    print(f"{len(own)} tests run a path no other test runs; "
          f"{len(runs) - len(own)} run only paths other tests run too")
    if second is None:
        return 0
    other = defaultdict(list)
    for test, paths in _load(second).items():
        for p in paths:
            other[p].append(test)
    lost = sorted(set(by_path) - set(other))
    print(f"{second}: {len(other)} distinct paths; {len(lost)} of {first}'s are not run there")
    for p in lost:
        print("  lost:", p, "<-", by_path[p][0])
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(_report(*sys.argv[1:3]))
