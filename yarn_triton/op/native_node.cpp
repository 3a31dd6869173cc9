// The eager rope's autograd node in C++: fresh outputs for q and k, wired into the graph.
//
// apply(backward, state, q, k, q_weight, k_weight, copy) -> (q_out, k_out)
//
// allocates q_out/k_out (empty_like, or clone when `copy`: the packed cu_seqlens case,
// whose tokens past the last sequence keep q's values), and when grad mode is on and an
// input requires grad, gives them one node whose backward calls the Python function
// `backward(state, grad_q, grad_k, saved)`, which returns the gradients of (q, k) or of
// (q, k, q_weight, k_weight). The caller (op/eager.py, replay_with_node) then launches the
// kernel into the outputs. A torch.autograd.Function does the same from Python at several times the
// host cost; this is its eager fast path, nothing more: the Python Function stays for
// every other case.
//
// As a Python Function does: an unused output's gradient arrives as zeros; with the
// weights (the QK-norm), q, k and the weights are saved for the backward as autograd
// saves tensors (an in-place change before the backward is an error, saved-tensor hooks
// apply, a second backward without retain_graph is an error); the node holds `backward`
// and `state` (Python references, released with the GIL held).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// Nodes are held by std::shared_ptr in torch 2.11 (and before) and by c10::intrusive_ptr
// in 2.13; Node::getptr() exists in both and names the pointer type of this build.
using NodePtr = decltype(std::declval<Node&>().getptr());
constexpr bool kIntrusive = !std::is_same_v<NodePtr, std::shared_ptr<Node>>;

template <bool Intrusive>
struct NodeMaker {
  template <typename T>
  static auto make() {  // as torch's own custom Functions make theirs (deleteNode: no deep recursion)
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  }
};
template <>
struct NodeMaker<true> {
  template <typename T>
  static auto make() {
    return c10::make_intrusive<T>();
  }
};

[[noreturn]] void raise_python_error() {  // the Python error set now, carried through C++ to the caller
  python_error err;
  err.persist();
  throw err;
}

bool python_alive() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsInitialized() && !Py_IsFinalizing();
#else
  return Py_IsInitialized() && !_Py_IsFinalizing();
#endif
}

struct Gil {
  PyGILState_STATE state = PyGILState_Ensure();
  ~Gil() { PyGILState_Release(state); }
};

PyObject* wrap_or_none(const at::Tensor& t) {
  if (t.defined()) return THPVariable_Wrap(t);
  Py_RETURN_NONE;
}

struct YarnRopeBackward : public Node {
  PyObject* backward = nullptr;  // owned
  PyObject* state = nullptr;     // owned
  bool has_k = false;
  std::vector<SavedVariable> saved;  // q, k, q_weight, k_weight (the norm case only)

  std::string name() const override { return "YarnRopeBackward"; }

  void release_variables() override {
    for (auto& s : saved) s.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    // an output nothing used: zeros, as a Python Function materializes them
    for (size_t i = 0; i < grads.size(); ++i) {
      if (!grads[i].defined() && (i == 0 || has_k)) grads[i] = input_metadata(i).zeros_like();
    }
    std::vector<at::Tensor> unpacked;
    unpacked.reserve(saved.size());
    for (auto& s : saved) unpacked.push_back(s.unpack(getptr()));
    Gil gil;
    PyObject* saved_tuple = nullptr;
    if (unpacked.empty()) {
      saved_tuple = Py_NewRef(Py_None);
    } else {
      saved_tuple = PyTuple_New(static_cast<Py_ssize_t>(unpacked.size()));
      if (!saved_tuple) raise_python_error();
      for (size_t i = 0; i < unpacked.size(); ++i) {
        PyTuple_SET_ITEM(saved_tuple, static_cast<Py_ssize_t>(i), wrap_or_none(unpacked[i]));
      }
    }
    PyObject* gq = wrap_or_none(grads[0]);
    PyObject* gk = has_k ? wrap_or_none(grads[1]) : Py_NewRef(Py_None);
    PyObject* args[4] = {state, gq, gk, saved_tuple};
    PyObject* result = PyObject_Vectorcall(backward, args, 4, nullptr);
    Py_DECREF(gq);
    Py_DECREF(gk);
    Py_DECREF(saved_tuple);
    if (!result) raise_python_error();
    const size_t n = num_outputs();
    variable_list out(n);
    if (!PyTuple_Check(result) || static_cast<size_t>(PyTuple_GET_SIZE(result)) != n) {
      Py_DECREF(result);
      throw std::runtime_error("yarn_triton: the rope backward returned the wrong number of gradients");
    }
    for (size_t i = 0; i < n; ++i) {
      PyObject* g = PyTuple_GET_ITEM(result, static_cast<Py_ssize_t>(i));
      if (g == Py_None) continue;
      if (!THPVariable_Check(g)) {
        Py_DECREF(result);
        throw std::runtime_error("yarn_triton: the rope backward returned a gradient that is not a tensor");
      }
      out[i] = THPVariable_Unpack(g);
    }
    Py_DECREF(result);
    return out;
  }

  ~YarnRopeBackward() override {
    if (python_alive()) {
      Gil gil;
      Py_XDECREF(backward);
      Py_XDECREF(state);
    }
  }
};

const at::Tensor* tensor_or_null(PyObject* obj, const char* what) {
  if (obj == Py_None) return nullptr;
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "native_node.apply: %s must be a tensor or None", what);
    return nullptr;
  }
  return &THPVariable_Unpack(obj);
}

PyObject* apply(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError,
                    "native_node.apply(backward, state, q, k, q_weight, k_weight, copy) takes 7 arguments");
    return nullptr;
  }
  if (!THPVariable_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "native_node.apply: q must be a tensor");
    return nullptr;
  }
  const at::Tensor& q = THPVariable_Unpack(args[2]);
  const at::Tensor* k = tensor_or_null(args[3], "k");
  const at::Tensor* qw = tensor_or_null(args[4], "q_weight");
  const at::Tensor* kw = tensor_or_null(args[5], "k_weight");
  if (PyErr_Occurred()) return nullptr;
  const bool copy = PyObject_IsTrue(args[6]);
  const at::Tensor none;
  const at::Tensor& kt = k ? *k : none;
  const at::Tensor& qwt = qw ? *qw : none;
  const at::Tensor& kwt = kw ? *kw : none;

  at::Tensor q_out, k_out;
  {
    at::NoGradGuard no_grad;  // the allocation itself is not part of the graph
    q_out = copy ? q.clone() : at::empty_like(q);
    if (k) k_out = copy ? k->clone() : at::empty_like(*k);
  }
  const bool norm = qw != nullptr;
  if (torch::autograd::compute_requires_grad(q, kt, qwt, kwt)) {
    auto node = NodeMaker<kIntrusive>::make<YarnRopeBackward>();
    if (norm) {
      node->set_next_edges(torch::autograd::collect_next_edges(q, kt, qwt, kwt));
      node->saved.emplace_back(q, false);
      node->saved.emplace_back(kt, false);
      node->saved.emplace_back(qwt, false);
      node->saved.emplace_back(kwt, false);
    } else {
      node->set_next_edges(torch::autograd::collect_next_edges(q, kt));
    }
    node->has_k = k != nullptr;
    node->backward = Py_NewRef(args[0]);
    node->state = Py_NewRef(args[1]);
    torch::autograd::set_history(q_out, node);
    torch::autograd::set_history(k_out, node);  // (an undefined k_out keeps output slot 1 empty)
  }
  PyObject* result = PyTuple_New(2);
  if (!result) return nullptr;
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(q_out));
  PyTuple_SET_ITEM(result, 1, wrap_or_none(k_out));
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"apply", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(apply)), METH_FASTCALL,
     "apply(backward, state, q, k, q_weight, k_weight, copy) -> (q_out, k_out)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_yarn_triton_node", "The eager rope's autograd node.", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__yarn_triton_node(void) { return PyModule_Create(&module_def); }
