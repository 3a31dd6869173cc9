// A small torch binding of FlashInfer's two position-id rope launchers (pos_enc.cuh,
// flashinfer-python 0.7.4), for bench/bench_rope.py; our code, FlashInfer's headers (fetched
// by fetch_headers.sh into .flashinfer/include, not committed). This file calls the launchers
// and sees no torch header: FlashInfer needs its bundled CCCL (3.6: cuda::fast_mod_div), and
// torch's headers pull the toolkit's thrust under nvcc; the two CCCLs cannot share a
// translation unit. rope_binding.cpp holds the torch side (checks, stream, Python module).
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
// current CUDA stream. q: [nnz, Hq, D] bfloat16, k: [nnz, Hk, D], any token and head strides,
// the last dim contiguous; the first R channels of each head are rotated. pos_ids: [nnz]
// int32/int64.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <exception>
#include <string>

#include <flashinfer/pos_enc.cuh>

#include "rope_binding.h"

namespace yarn_bench_fi {

#include "guarded.cuh"  // guarded(), last_error

// q, k: bf16, rotated in place (q_rope = q, k_rope = k); pos: int32 or int64 [nnz]
const char* cos_sin_cache(void* q, void* k, const float* cache, const void* pos, bool pos_i64, uint32_t nnz,
                          uint32_t hq, uint32_t hk, uint32_t rot, uint32_t head_dim, size_t q_sn, size_t q_sh,
                          size_t k_sn, size_t k_sh, bool interleave, cudaStream_t stream) {
  auto* qp = static_cast<nv_bfloat16*>(q);
  auto* kp = static_cast<nv_bfloat16*>(k);
  auto* c = const_cast<float*>(cache);
  return guarded("BatchQKApplyRotaryPosIdsCosSinCache", [&] {
    if (pos_i64) {
      return flashinfer::BatchQKApplyRotaryPosIdsCosSinCache<nv_bfloat16, int64_t>(
          qp, kp, qp, kp, c, static_cast<int64_t*>(const_cast<void*>(pos)), nnz, hq, hk, rot, head_dim, q_sn,
          q_sh, k_sn, k_sh, q_sn, q_sh, k_sn, k_sh, interleave, stream);
    }
    return flashinfer::BatchQKApplyRotaryPosIdsCosSinCache<nv_bfloat16, int32_t>(
        qp, kp, qp, kp, c, static_cast<int32_t*>(const_cast<void*>(pos)), nnz, hq, hk, rot, head_dim, q_sn, q_sh,
        k_sn, k_sh, q_sn, q_sh, k_sn, k_sh, interleave, stream);
  });
}

const char* pos_ids(void* q, void* k, const void* pos, bool pos_i64, uint32_t nnz, uint32_t hq, uint32_t hk,
                    uint32_t rot, uint32_t head_dim, size_t q_sn, size_t q_sh, size_t k_sn, size_t k_sh,
                    bool interleave, float rope_scale, float rope_theta, cudaStream_t stream) {
  auto* qp = static_cast<nv_bfloat16*>(q);
  auto* kp = static_cast<nv_bfloat16*>(k);
  return guarded("BatchQKApplyRotaryPosIds", [&] {
    if (pos_i64) {
      return flashinfer::BatchQKApplyRotaryPosIds<nv_bfloat16, int64_t>(
          qp, kp, qp, kp, static_cast<int64_t*>(const_cast<void*>(pos)), nnz, hq, hk, rot, head_dim, q_sn, q_sh,
          k_sn, k_sh, q_sn, q_sh, k_sn, k_sh, interleave, rope_scale, rope_theta, stream);
    }
    return flashinfer::BatchQKApplyRotaryPosIds<nv_bfloat16, int32_t>(
        qp, kp, qp, kp, static_cast<int32_t*>(const_cast<void*>(pos)), nnz, hq, hk, rot, head_dim, q_sn, q_sh,
        k_sn, k_sh, q_sn, q_sh, k_sn, k_sh, interleave, rope_scale, rope_theta, stream);
  });
}

}  // namespace yarn_bench_fi
