// The torch side of our FlashInfer rope binding (see rope_binding.cu): argument checks, the
// current CUDA stream, the Python module.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include "rope_binding.h"

namespace {

void check_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos_ids) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && pos_ids.is_cuda(), "q, k, pos_ids must be CUDA tensors");
  TORCH_CHECK(q.device() == k.device() && q.device() == pos_ids.device(), "q, k, pos_ids: one device");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be [nnz, H, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have one dtype");
  // FlashInfer takes float16 too; bfloat16 only here, to halve the build (the bench is bf16)
  TORCH_CHECK(q.scalar_type() == at::kBFloat16, "this binding takes bfloat16 q/k");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), "q and k: same nnz and head dim");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "FlashInfer's rope needs a contiguous last dim");
  // its kernels load and store 16 bytes per thread: every head must start 16-byte aligned
  const int64_t vec = 16 / q.element_size();
  for (const at::Tensor* t : {&q, &k}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 &&
                    (t->size(0) < 2 || t->stride(0) % vec == 0) && (t->size(1) < 2 || t->stride(1) % vec == 0),
                "FlashInfer's rope needs 16-byte aligned heads (pointer and token/head strides)");
  }
  TORCH_CHECK(pos_ids.dim() == 1 && pos_ids.size(0) == q.size(0) && pos_ids.is_contiguous(),
              "pos_ids must be a contiguous [nnz] tensor");
  TORCH_CHECK(pos_ids.scalar_type() == at::kInt || pos_ids.scalar_type() == at::kLong,
              "pos_ids must be int32 or int64");
}

void cos_sin_cache_(at::Tensor q, at::Tensor k, at::Tensor cos_sin_cache, at::Tensor pos_ids, bool interleave) {
  check_qk(q, k, pos_ids);
  TORCH_CHECK(cos_sin_cache.is_cuda() && cos_sin_cache.device() == q.device(), "cache on q's device");
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 &&
                  cos_sin_cache.is_contiguous(),
              "cos_sin_cache must be a contiguous float32 [max_pos, rotary_dim]");
  const int64_t rot = cos_sin_cache.size(1);
  TORCH_CHECK(rot % 2 == 0 && rot <= q.size(2), "rotary_dim must be even and <= head dim");
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const char* err = yarn_bench_fi::cos_sin_cache(
      q.data_ptr(), k.data_ptr(), cos_sin_cache.data_ptr<float>(), pos_ids.data_ptr(),
      pos_ids.scalar_type() == at::kLong, q.size(0), q.size(1), k.size(1), rot, q.size(2), q.stride(0), q.stride(1),
      k.stride(0), k.stride(1), interleave, stream);
  TORCH_CHECK(err[0] == 0, err);
}

void pos_ids_(at::Tensor q, at::Tensor k, at::Tensor pos_ids, int64_t rotary_dim, bool interleave, double rope_scale,
              double rope_theta) {
  check_qk(q, k, pos_ids);
  const int64_t d = q.size(2);  // the cache launcher takes other head dims (through RopeQuantize)
  TORCH_CHECK(d == 64 || d == 128 || d == 256 || d == 512,
              "head dim ", d, ": FlashInfer's on-the-fly rope takes 64/128/256/512");
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= q.size(2),
              "rotary_dim must be even and <= head dim");
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const char* err = yarn_bench_fi::pos_ids(
      q.data_ptr(), k.data_ptr(), pos_ids.data_ptr(), pos_ids.scalar_type() == at::kLong, q.size(0), q.size(1),
      k.size(1), rotary_dim, q.size(2), q.stride(0), q.stride(1), k.stride(0), k.stride(1), interleave,
      static_cast<float>(rope_scale), static_cast<float>(rope_theta), stream);
  TORCH_CHECK(err[0] == 0, err);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cos_sin_cache_", &cos_sin_cache_, "FlashInfer BatchQKApplyRotaryPosIdsCosSinCache, in place",
        py::arg("q"), py::arg("k"), py::arg("cos_sin_cache"), py::arg("pos_ids"), py::arg("interleave"));
  m.def("pos_ids_", &pos_ids_, "FlashInfer BatchQKApplyRotaryPosIds (angles on the fly), in place", py::arg("q"),
        py::arg("k"), py::arg("pos_ids"), py::arg("rotary_dim"), py::arg("interleave"), py::arg("rope_scale"),
        py::arg("rope_theta"));
}
