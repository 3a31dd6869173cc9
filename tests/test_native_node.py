"""The eager autograd's C++ node (``yarn_triton/op/native_node.py``, ``native_node.cpp``):
built where a C++ compiler exists, and the same graph, gradients and errors as the Python
``autograd.Function`` it stands in for on replayed calls. (The replayed calls' values and
gradients against the float64 reference, with either node: ``test_host_path``.)"""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import yarn_triton as yt
from yarn_triton import native
from yarn_triton.op import eager
from yarn_triton.op import native_node as nn


def _params(dim=64):
    return yt.RopeParams.yarn(dim, 10000.0, 40.0, 4096, mscale=0.707, mscale_all_dim=0.707)


@pytest.fixture
def node():
    """The C++ node's apply (conftest built it), or a skip where no C++ compiler exists."""
    if native.compiler(cxx=True) is None:
        pytest.skip("no C++ compiler")
    apply = nn.wait()
    assert apply is not None, nn.unavailable_reason()  # a compiler, but no node: a bug, not a skip
    return apply


def _inputs(kdev, gen, k=True, tokens=5):
    q = (torch.randn(1, tokens, 4, 64, generator=gen) * 2).to(kdev).requires_grad_()
    kk = torch.randn(1, tokens, 2, 64, generator=gen).to(kdev).requires_grad_() if k else None
    pos = torch.randint(0, 1 << 16, (1, tokens), generator=gen).to(kdev)
    return q, kk, pos


def _both_nodes(monkeypatch, call):
    """``call()`` replayed with the C++ node, then with the Python Function: both results."""
    call()  # builds the plan (the first call takes the Python Function)
    cpp = call()
    monkeypatch.setattr(nn, "APPLY", None)
    py = call()
    monkeypatch.undo()
    return cpp, py


@pytest.mark.parametrize("with_k", [True, False], ids=["q_and_k", "q_only"])
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "qk_norm"])
def test_cpp_node_gives_the_python_functions_values_and_gradients(kdev, gen, node, monkeypatch, with_k, norm):
    """Same inputs and upstream gradients through both nodes: equal outputs and equal
    gradients of q, k and the norm weights, bit for bit (the same kernels run); with k
    given, a backward through q's output alone gives k a zero gradient in both (an unused
    output's gradient is zeros, as a Python Function materializes it)."""
    p = _params()
    q0, k0, pos = _inputs(kdev, gen, k=with_k)
    w0 = [torch.rand(64, generator=gen).to(kdev) + 0.5 for _ in range(2 if with_k else 1)]
    g = [torch.randn(q0.shape, generator=gen).to(kdev)] + ([torch.randn(k0.shape, generator=gen).to(kdev)]
                                                          if with_k else [])

    def call(only_q=False):
        leaves = [t.detach().clone().requires_grad_() for t in [q0, k0] + (w0 if norm else []) if t is not None]
        if norm:
            k, w = (leaves[1], leaves[2:]) if with_k else (None, leaves[1:] + [None])
            out = yt.apply_qk_norm_rope(leaves[0], k, pos, p, *w)
        else:
            out = yt.apply_rope(*leaves[:2] if with_k else (leaves[0], None), pos, p)
        outs = [t for t in out if t is not None]
        if only_q:
            outs[0].backward(g[0])
        else:
            torch.autograd.backward(outs, g)
        return outs[0].grad_fn.name(), [t.detach() for t in outs], [t.grad for t in leaves]

    for only_q in ([False, True] if with_k else [False]):
        cpp, py = _both_nodes(monkeypatch, lambda: call(only_q))
        assert cpp[0] == "YarnRopeBackward" and py[0] == "_EagerRopeBackward"
        for a, b in zip(cpp[1] + cpp[2], py[1] + py[2]):
            assert a is not None and b is not None and torch.equal(a, b)
        if only_q:
            assert torch.equal(cpp[2][1], torch.zeros_like(k0))


def test_errors_in_the_backward_keep_their_type(kdev, gen, node, monkeypatch):
    """An exception raised by the Python backward comes out of ``backward()`` as itself,
    through the C++ node."""
    p = _params()
    q, _, pos = _inputs(kdev, gen, k=False)
    for _ in range(2):
        qo, _ = yt.apply_rope(q, None, pos, p)
    assert qo.grad_fn.name() == "YarnRopeBackward"

    def boom(*args):
        raise KeyError("from the rope backward")

    monkeypatch.setattr(eager, "_rope_backward", boom)
    with pytest.raises(KeyError, match="from the rope backward"):
        qo.sum().backward()


def test_norm_saves_its_inputs_as_autograd_does(kdev, gen, node):
    """The QK-norm's backward needs q, k and the weights: through the C++ node, an
    in-place change of one of them before the backward is an error, and a second
    backward needs retain_graph (then gives the same gradients again)."""
    p = _params()
    q, k, pos = _inputs(kdev, gen)
    w = [(torch.rand(64, generator=gen) + 0.5).to(kdev).requires_grad_() for _ in range(2)]
    for _ in range(2):
        qo, ko = yt.apply_qk_norm_rope(q, k, pos, p, *w)
    assert qo.grad_fn.name() == "YarnRopeBackward"
    (qo.sum() + ko.sum()).backward(retain_graph=True)
    first = q.grad.clone()
    (qo.sum() + ko.sum()).backward()
    assert torch.allclose(q.grad, 2 * first)
    with pytest.raises(RuntimeError, match="second time"):
        (qo.sum() + ko.sum()).backward()
    qo, ko = yt.apply_qk_norm_rope(q, k, pos, p, *w)
    with torch.no_grad():
        w[0].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        qo.sum().backward()


def test_packed_sequences_keep_the_tail_tokens(kdev, gen, node):
    """With cu_seqlens the out-of-place output starts as a copy of the input (tokens past
    the last sequence come out as they went in): so too from the C++ node."""
    p = _params()
    q = torch.randn(9, 2, 64, generator=gen).to(kdev).requires_grad_()
    cu = torch.tensor([0, 3, 7], dtype=torch.int32).to(kdev)
    for _ in range(2):
        qo, _ = yt.apply_rope(q, None, None, p, cu_seqlens=cu)
    assert qo.grad_fn.name() == "YarnRopeBackward"
    assert torch.equal(qo[7:].detach(), q[7:].detach()) and not torch.equal(qo[:7].detach(), q[:7].detach())
    qo.backward(torch.ones_like(qo))
    assert torch.equal(q.grad[7:], torch.ones_like(q.grad[7:]))


def test_the_graph_lets_go_of_the_call(kdev, gen, node):
    """The node holds the call's positions for its backward, and nothing once the graph is
    gone (no reference cycle, nothing kept by the module)."""
    p = _params()
    q, k, pos = _inputs(kdev, gen)
    yt.apply_rope(q, k, pos, p)
    pos2 = pos.clone()
    qo, ko = yt.apply_rope(q, k, pos2, p)
    assert qo.grad_fn.name() == "YarnRopeBackward"
    ref = weakref.ref(pos2)
    del pos2
    gc.collect()
    assert ref() is not None  # the backward will need it
    del qo, ko
    assert ref() is None  # freed at once: no cycle for the collector


def test_no_compiler_keeps_the_python_function(monkeypatch, tmp_path):
    """No C++ compiler: no node, the reason kept, no exception; turned off, it says so."""
    monkeypatch.setenv("YARN_TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-cxx"))
    monkeypatch.setattr(nn, "_state", {"module": None, "tried": False, "error": None})
    for name in ("_started", "_built"):
        monkeypatch.setattr(nn, name, threading.Event())
    monkeypatch.setattr(nn, "APPLY", None)
    monkeypatch.setattr(nn, "ENABLED", True)
    assert nn.wait(60) is None
    assert "no-such-cxx" in nn.unavailable_reason()
    monkeypatch.setattr(nn, "ENABLED", False)
    assert nn.unavailable_reason() == "YARN_TRITON_NATIVE_NODE=0"


def test_apply_refuses_what_is_not_a_tensor(node):
    """The C++ apply's own argument checks (the eager path never trips them)."""
    q = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(TypeError, match="7 arguments"):
        node(None, None, q)
    with pytest.raises(TypeError, match="q must be a tensor"):
        node(None, None, [1.0], None, None, None, False)
    with pytest.raises(TypeError, match="k must be a tensor or None"):
        node(None, None, q, 3, None, None, False)
    out = node(lambda *a: (None, None), None, q, None, None, None, False)
    assert out[1] is None and out[0].shape == q.shape and out[0].grad_fn.name() == "YarnRopeBackward"
