"""Which kernel paths each test runs: a pytest plugin for planning the suite, not a test.

``YARN_TRITON_KERNEL_PATHS=paths.json python -m pytest ...`` records, for every test, the
kernel's compile-time switches of each launch it makes (the interpreter's or a GPU's) and
writes them as JSON at the end: ``{"tests": {nodeid: [path, ...]}, "random": [nodeid, ...]}``,
where a path is the switches (layout, position mode, norm, M-RoPE, q-scale, in place, one
step, cache write, ...) plus the dtypes of q, its output and k (and the caches'), and "random" lists the property-based
tests (hypothesis), whose paths change from run to run. ``python tests/kernel_paths.py
paths.json [other.json]`` then counts the paths and the tests that run one of their own,
and, given a second file, lists the paths that the first run's fixed (not random) tests
launch and no test of the second run does: the check that a faster suite covers no less.
It exits 1 if there is one.

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
          "K_BLOCK_H", "HEAD_GROUPS", "V_DIM", "V_PAD", "V_BLOCK_H"}
ENV = "YARN_TRITON_KERNEL_PATHS"


def _path(args, kwargs) -> str:
    """One launch's path: its switches, whether the rotation is partial (tails) or padded,
    and the dtypes of q, q's output and k (absent k: '-')."""
    sw = {k: (int(v) if isinstance(v, bool) else v) for k, v in kwargs.items()
          if k.isupper() and k not in _SIZES}
    sw["Q_TAIL"] = int(kwargs.get("Q_TAIL_PAD", 0) > 0)
    sw["K_TAIL"] = int(kwargs.get("K_TAIL_PAD", 0) > 0)
    sw["PADDED"] = int(kwargs.get("HALF_PAD", 0) != kwargs.get("HALF", 0))
    from yarn_triton.kernels.configs import _NK  # n_k_heads' place in the kernel's arguments

    q, qo, k = args[0], args[1], args[2]
    n_k = args[_NK]
    sw["dtypes"] = "/".join(str(t.dtype).replace("torch.", "") for t in (q, qo)) + (
        "/" + str(k.dtype).replace("torch.", "") if n_k else "/-")
    if kwargs.get("CACHE"):  # the cache write: the caches' dtype too
        sw["dtypes"] += "->" + str(args[3].dtype).replace("torch.", "")
    return ",".join(f"{key}={sw[key]}" for key in sorted(sw))


class _Recorder:
    def __init__(self, out: str):
        self.out = out
        self.paths = defaultdict(set)
        self.random = set()
        self.current = None

    def pytest_configure(self, config):
        from yarn_triton.kernels import configs, launcher
        from yarn_triton.kernels.rope_kernel import rope_kernel

        real, recorder = rope_kernel, self

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

        # every module that launches the kernel reads it by its own global name: the
        # launcher, and configs (the tuner's timing runs)
        spy = _Spy()
        for module in (configs, launcher):
            assert module.rope_kernel is real, module.__name__
            module.rope_kernel = spy

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid
        if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
            self.random.add(item.nodeid)

    def pytest_runtest_teardown(self, item):
        self.current = None

    def pytest_sessionfinish(self, session):
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        out = self.out if not worker else f"{self.out}.{worker}"
        with open(out, "w") as f:
            json.dump({"tests": {k: sorted(v) for k, v in sorted(self.paths.items())},
                       "random": sorted(self.random)}, f, indent=0)


def plugin():
    """The recorder when ``YARN_TRITON_KERNEL_PATHS`` names an output file, else None."""
    out = os.environ.get(ENV)
    return _Recorder(out) if out else None


def _load(path: str):
    """The tests' paths and the random tests of one run (its xdist workers' files merged)."""
    import glob

    tests, random = {}, set()
    for name in [path, *sorted(glob.glob(path + ".gw*"))]:
        if os.path.exists(name):
            with open(name) as f:
                run = json.load(f)
            tests.update(run["tests"])
            random.update(run["random"])
    return tests, random


def _report(first: str, second: str | None = None) -> int:
    runs, random = _load(first)
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
    other = {p for paths in _load(second)[0].values() for p in paths}
    fixed = {p: [t for t in ts if t not in random] for p, ts in by_path.items()}
    fixed = {p: ts for p, ts in fixed.items() if ts}
    lost = sorted(set(fixed) - other)
    drawn = len(set(by_path) - set(fixed) - other)
    print(f"{second}: {len(other)} distinct paths; of {first}'s {len(fixed)} paths of fixed tests, "
          f"{len(lost)} are not run there ({drawn} paths only random tests drew are not either)")
    for p in lost:
        print("  lost:", p, "<-", fixed[p][0])
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(_report(*sys.argv[1:3]))
