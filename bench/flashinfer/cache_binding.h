// The C interface between cache_binding.cpp (the torch side) and cache_binding.cu (FlashInfer's side):
// both include it, so a declaration and its definition cannot drift apart. Plain types only:
// the .cu sees no torch header.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace yarn_bench_fi_cache {
const char* gqa_rope_quant_append(void* q, void* k, void* v, void* q_out, void* k_cache, void* v_cache,
                                  const float* cos_sin_cache, const int64_t* pos_ids, const int32_t* indices,
                                  const int32_t* indptr, const int32_t* batch_indices, const int32_t* positions,
                                  uint32_t nnz, uint32_t batch_size, uint32_t hq, uint32_t hk, uint32_t head_dim,
                                  uint32_t rot, uint32_t page_size, size_t q_sn, size_t q_sh, size_t k_sn,
                                  size_t k_sh, size_t v_sn, size_t v_sh, size_t qo_sn, size_t qo_sh,
                                  const int64_t* k_cache_strides, const int64_t* v_cache_strides,
                                  float quant_scale_q, float quant_scale_kv, bool interleave, cudaStream_t stream);
const char* mla_rope_quant_append(void* q_rope, void* q_nope, void* k_rope, void* k_nope, void* q_rope_out,
                                  void* q_nope_out, void* ckv_cache, void* kpe_cache, const float* cos_sin_cache,
                                  const int64_t* pos_ids, const int32_t* indices, const int32_t* indptr,
                                  const int32_t* batch_indices, const int32_t* positions, uint32_t nnz,
                                  uint32_t batch_size, uint32_t h, uint32_t rot, uint32_t no_rope,
                                  uint32_t page_size, size_t qr_sn, size_t qr_sh, size_t qn_sn, size_t qn_sh,
                                  size_t qro_sn, size_t qro_sh, size_t qno_sn, size_t qno_sh, size_t kr_sn,
                                  size_t kn_sn, const int64_t* ckv_strides, const int64_t* kpe_strides,
                                  float quant_scale_q, float quant_scale_kv, bool interleave, cudaStream_t stream);
const char* append_paged_kv(void* k, void* v, void* k_cache, void* v_cache, const int32_t* indices,
                            const int32_t* indptr, const int32_t* batch_indices, const int32_t* positions,
                            uint32_t nnz, uint32_t batch_size, uint32_t hk, uint32_t head_dim, uint32_t page_size,
                            size_t k_sn, size_t k_sh, size_t v_sn, size_t v_sh, const int64_t* k_cache_strides,
                            const int64_t* v_cache_strides, cudaStream_t stream);
const char* append_paged_mla(void* ckv, void* kpe, void* ckv_cache, void* kpe_cache, const int32_t* indices,
                             const int32_t* indptr, const int32_t* batch_indices, const int32_t* positions,
                             uint32_t nnz, uint32_t batch_size, uint32_t ckv_dim, uint32_t kpe_dim,
                             uint32_t page_size, size_t ckv_sn, size_t kpe_sn, const int64_t* ckv_strides,
                             const int64_t* kpe_strides, cudaStream_t stream);
}  // namespace yarn_bench_fi_cache
