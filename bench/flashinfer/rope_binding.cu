// A small torch binding of FlashInfer's two position-id rope launchers (pos_enc.cuh,
// flashinfer-python 0.7.4), for bench/bench_rope.py; our code, FlashInfer's headers (fetched
// by fetch_headers.sh into .flashinfer/include, not committed).
//
//   cos_sin_cache_(q, k, cos_sin_cache, pos_ids, interleave)
//       BatchQKApplyRotaryPosIdsCosSinCache: cos/sin gathered from an fp32 [max_pos, R] cache
//       (cos in [:, :R/2], sin in [:, R/2:], one value per frequency pair); the path SGLang and
//       vLLM take for YaRN (their cache holds YaRN's blended inv_freq and mscale).
//   pos_ids_(q, k, pos_ids, rotary_dim, interleave, rope_scale, rope_theta)
//       BatchQKApplyRotaryPosIds: angles computed in the kernel, inv_freq[i] =
//       theta^(-2i/R) / rope_scale (no YaRN ramp, no cos/sin scale).
//
// Both rotate in place, as FlashInfer's *_inplace API does (q_rope = q, k_rope = k), on the
// current CUDA stream. q: [nnz, Hq, D], k: [nnz, Hk, D], any token and head strides, the last
// dim contiguous; the first R channels of each head are rotated. pos_ids: [nnz] int32/int64.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <flashinfer/pos_enc.cuh>

namespace {

void check_qk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos_ids) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && pos_ids.is_cuda(), "q, k, pos_ids must be CUDA tensors");
  TORCH_CHECK(q.device() == k.device() && q.device() == pos_ids.device(), "q, k, pos_ids: one device");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "q and k must be [nnz, H, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must have one dtype");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "FlashInfer's rope takes float16/bfloat16 q/k");
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

template <typename F>
void dispatch(const at::Tensor& q, const at::Tensor& pos_ids, F&& f) {
  auto by_id = [&](auto dtype_tag) {
    using DType = decltype(dtype_tag);
    if (pos_ids.scalar_type() == at::kInt) {
      f(DType{}, int32_t{});
    } else {
      f(DType{}, int64_t{});
    }
  };
  if (q.scalar_type() == at::kBFloat16) {
    by_id(nv_bfloat16{});
  } else {
    by_id(half{});
  }
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
  dispatch(q, pos_ids, [&](auto dtype_tag, auto id_tag) {
    using DType = decltype(dtype_tag);
    using IdType = decltype(id_tag);
    auto* qp = static_cast<DType*>(q.data_ptr());
    auto* kp = static_cast<DType*>(k.data_ptr());
    const cudaError_t err = flashinfer::BatchQKApplyRotaryPosIdsCosSinCache<DType, IdType>(
        qp, kp, qp, kp, cos_sin_cache.data_ptr<float>(), static_cast<IdType*>(pos_ids.data_ptr()),
        q.size(0), q.size(1), k.size(1), rot, q.size(2), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), interleave, stream);
    TORCH_CHECK(err == cudaSuccess, "BatchQKApplyRotaryPosIdsCosSinCache: ", cudaGetErrorString(err));
  });
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
  dispatch(q, pos_ids, [&](auto dtype_tag, auto id_tag) {
    using DType = decltype(dtype_tag);
    using IdType = decltype(id_tag);
    auto* qp = static_cast<DType*>(q.data_ptr());
    auto* kp = static_cast<DType*>(k.data_ptr());
    const cudaError_t err = flashinfer::BatchQKApplyRotaryPosIds<DType, IdType>(
        qp, kp, qp, kp, static_cast<IdType*>(pos_ids.data_ptr()), q.size(0), q.size(1), k.size(1), rotary_dim,
        q.size(2), q.stride(0), q.stride(1), k.stride(0), k.stride(1), q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), interleave, static_cast<float>(rope_scale), static_cast<float>(rope_theta), stream);
    TORCH_CHECK(err == cudaSuccess, "BatchQKApplyRotaryPosIds: ", cudaGetErrorString(err));
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cos_sin_cache_", &cos_sin_cache_, "FlashInfer BatchQKApplyRotaryPosIdsCosSinCache, in place",
        py::arg("q"), py::arg("k"), py::arg("cos_sin_cache"), py::arg("pos_ids"), py::arg("interleave"));
  m.def("pos_ids_", &pos_ids_, "FlashInfer BatchQKApplyRotaryPosIds (angles on the fly), in place", py::arg("q"),
        py::arg("k"), py::arg("pos_ids"), py::arg("rotary_dim"), py::arg("interleave"), py::arg("rope_scale"),
        py::arg("rope_theta"));
}
