"""Shared test helpers.

Kernel tests run on ``kernel_device``: the CPU under ``TRITON_INTERPRET=1`` (how CI covers
every kernel path), CUDA when a GPU is present, and are skipped otherwise.
"""

import os

# Autotuning every shape the suite touches would take minutes on a GPU; the autotuned path
# has its own test (test_autotuned_launch_is_correct), which turns it back on.
os.environ.setdefault("YARN_TRITON_AUTOTUNE", "0")

import pytest
import torch

from yarn_triton.kernels.rope_kernel import INTERPRETED

import kernel_paths


def pytest_configure(config):
    # YARN_TRITON_KERNEL_PATHS=file: record which kernel paths each test runs (tests/kernel_paths.py)
    recorder = kernel_paths.plugin()
    if recorder is not None:
        config.pluginmanager.register(recorder, "kernel_paths")
    # The eager autograd's C++ node (yarn_triton/op/native_node.py) is otherwise built in
    # the background by the first call that can use it, and calls before that take the
    # Python Function: built here first, so that every test takes the same path (xdist
    # workers, configured after the controller, load the controller's build).
    from yarn_triton.op import native_node
    native_node.wait()

# Relative-error bounds of the kernel output vs the float64 truth, per dtype: storage
# rounding of the output dominates (bf16 2**-8, fp16 2**-11, fp32 ~1e-7 with precise angles).
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
POISON = float("nan")


def _kernel_device():
    if INTERPRETED:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    return None


KERNEL_DEVICE = _kernel_device()
requires_kernel = pytest.mark.skipif(
    KERNEL_DEVICE is None, reason="needs a CUDA GPU or TRITON_INTERPRET=1"
)
requires_cuda = pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="needs a CUDA GPU (native, not interpreted)"
)


def one_per_path(cases, path):
    """``pytest.param``s of ``cases`` (tuples of parameter values) for ``parametrize``.

    On a GPU every case runs. Through the interpreter, a case costs seconds, and cases that
    differ only in what does not select kernel code (strides of the same kind, host-side
    scales) run the same kernel path: there one case of each ``path(case)`` runs. Which one
    turns from path to path, so every value of every parameter still runs somewhere (the
    paths each test launches can be listed with ``tests/kernel_paths.py``)."""
    cases = [tuple(c) for c in cases]
    if INTERPRETED:
        cases = pick_one_per_path(cases, path)
    return [pytest.param(*c, id="-".join(str(v).replace("torch.", "") for v in c)) for c in cases]


def pick_one_per_path(cases: list, path) -> list:
    """One case of each ``path(case)``, in order of first appearance; within groups of one
    size, the position picked turns from group to group."""
    groups = {}
    for c in cases:
        groups.setdefault(path(c), []).append(c)
    turn = {}
    picked = []
    for group in groups.values():
        i = turn[len(group)] = turn.get(len(group), -1) + 1
        picked.append(group[i % len(group)])
    return picked


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (never passes)."""
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    if torch.isnan(out64).any() or torch.isnan(ref64).any():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm()).item()


@pytest.fixture
def kdev():
    if KERNEL_DEVICE is None:
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    return KERNEL_DEVICE


@pytest.fixture
def gen(request):
    """A fresh generator per test: inputs differ run to run; the seed is reported with a
    failure so it can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)


def assert_modeling_files_unpatched() -> None:
    """No transformers modeling module still holds one of our dispatchers (rope functions,
    the Llama-4 query-scale function): every switched model was switched back."""
    import sys

    from yarn_triton.integrations.transformers.support import _Q_SCALE_FUNCTION, ROPE_FUNCTIONS

    for name, mod in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or ".modeling_" not in name:
            continue
        for fn in (*ROPE_FUNCTIONS, _Q_SCALE_FUNCTION):
            f = getattr(mod, fn, None)
            assert f is None or not hasattr(f, "original"), f"{name}.{fn} left patched"


def assert_compiles_like_eager(f, q: torch.Tensor, *rest, tol: float = 1e-6) -> None:
    """``torch.compile(f, fullgraph=True)`` gives ``f``'s outputs, and the gradient of its
    first output's sum with respect to ``q`` (a leaf that requires grad), within ``tol``
    relative error. The backend is Inductor on a GPU, ``aot_eager`` elsewhere (Inductor
    would need a C++ compiler on the CPU)."""
    want = f(q, *rest)
    want[0].sum().backward()
    g_want = q.grad.clone()
    q.grad = None
    backend = "aot_eager" if q.device.type == "cpu" else "inductor"
    torch._dynamo.reset()
    try:
        got = torch.compile(f, fullgraph=True, backend=backend)(q, *rest)
    finally:
        torch._dynamo.reset()
    for g, w in zip(got, want):
        assert rel_err(g, w) < tol
    got[0].sum().backward()
    assert rel_err(q.grad, g_want) < tol
