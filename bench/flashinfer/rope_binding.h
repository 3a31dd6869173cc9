// The C interface between rope_binding.cpp (the torch side) and rope_binding.cu (FlashInfer's side):
// both include it, so a declaration and its definition cannot drift apart. Plain types only:
// the .cu sees no torch header.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace yarn_bench_fi {
const char* cos_sin_cache(void* q, void* k, const float* cache, const void* pos, bool pos_i64, uint32_t nnz,
                          uint32_t hq, uint32_t hk, uint32_t rot, uint32_t head_dim, size_t q_sn, size_t q_sh,
                          size_t k_sn, size_t k_sh, bool interleave, cudaStream_t stream);
const char* pos_ids(void* q, void* k, const void* pos, bool pos_i64, uint32_t nnz, uint32_t hq, uint32_t hk,
                    uint32_t rot, uint32_t head_dim, size_t q_sn, size_t q_sh, size_t k_sn, size_t k_sh,
                    bool interleave, float rope_scale, float rope_theta, cudaStream_t stream);
}  // namespace yarn_bench_fi
