// A small torch binding of FlashInfer's rope + paged-KV-cache launchers (pos_enc.cuh, page.cuh,
// flashinfer-python 0.7.4), for bench/bench_cache.py; our code, FlashInfer's headers (fetched by
// fetch_headers.sh into .flashinfer/include, not committed). Like rope_binding.cu, this file sees
// no torch header (FlashInfer's bundled CCCL and torch's cannot share a translation unit);
// cache_binding.cpp holds the torch side (checks, strides, stream, Python module).
//
//   gqa_rope_quant_append   RopeQuantizeAppendPagedKVCache: one kernel rotates q and k with an
//                           fp32 cos/sin cache, writes q (all channels) to an FP8 q_out, and k, v
//                           to an FP8 paged cache (multiplied by quant_scale_q / quant_scale_kv,
//                           saturated to +-448);
//   mla_rope_quant_append   RopeQuantizeAppendPagedMLACache: the same for MLA (q_rope/q_nope to
//                           FP8 outputs, k_pe and kv_c to the FP8 ckv/kpe caches);
//   append_paged_kv         AppendPagedKVCache: copies k, v (bf16) into a bf16 paged cache;
//   append_paged_mla        AppendPagedKVMlaCache: copies kv_c (512), k_pe (64) into a bf16
//                           MLA paged cache.
//
// Every cache is paged as FlashInfer pages it: token i of sequence batch_indices[i] at position
// positions[i] lands in page indices[indptr[b] + positions[i] / page_size], entry
// positions[i] % page_size. Inputs bf16; rope ids (pos_ids) int64; page ids int32; FP8 is e4m3.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <exception>
#include <string>

#include <flashinfer/page.cuh>
#include <flashinfer/pos_enc.cuh>

#include "cache_binding.h"

namespace yarn_bench_fi_cache {

using bf16 = nv_bfloat16;
using fp8 = __nv_fp8_e4m3;

#include "guarded.cuh"  // guarded(), last_error

// q [nnz, hq, head_dim] (rope part = first `rot` channels), k [nnz, hk, head_dim], v [nnz, hk,
// head_dim], q_out [nnz, hq, head_dim] FP8; caches [pages, page_size, hk, head_dim] FP8 (NHD,
// any strides given as 4 int64 each)
const char* gqa_rope_quant_append(void* q, void* k, void* v, void* q_out, void* k_cache, void* v_cache,
                                  const float* cos_sin_cache, const int64_t* pos_ids, const int32_t* indices,
                                  const int32_t* indptr, const int32_t* batch_indices, const int32_t* positions,
                                  uint32_t nnz, uint32_t batch_size, uint32_t hq, uint32_t hk, uint32_t head_dim,
                                  uint32_t rot, uint32_t page_size, size_t q_sn, size_t q_sh, size_t k_sn,
                                  size_t k_sh, size_t v_sn, size_t v_sh, size_t qo_sn, size_t qo_sh,
                                  const int64_t* k_cache_strides, const int64_t* v_cache_strides,
                                  float quant_scale_q, float quant_scale_kv, bool interleave, cudaStream_t stream) {
  auto* qp = static_cast<bf16*>(q);
  auto* kp = static_cast<bf16*>(k);
  auto* qo = static_cast<fp8*>(q_out);
  const uint32_t no_rope = head_dim - rot;
  return guarded("RopeQuantizeAppendPagedKVCache", [&] {
    flashinfer::paged_kv_t<fp8, int32_t> paged_kv(
        hk, page_size, head_dim, batch_size, flashinfer::QKVLayout::kNHD, static_cast<fp8*>(k_cache),
        static_cast<fp8*>(v_cache), k_cache_strides, v_cache_strides, const_cast<int32_t*>(indices),
        const_cast<int32_t*>(indptr), /*last_page_len=*/nullptr);
    return flashinfer::RopeQuantizeAppendPagedKVCache<bf16, int64_t, int32_t, fp8>(
        qp, kp, qp + rot, kp + rot, static_cast<bf16*>(v), qo, qo + rot, paged_kv,
        const_cast<int32_t*>(batch_indices), const_cast<int32_t*>(positions), const_cast<float*>(cos_sin_cache),
        const_cast<int64_t*>(pos_ids), nnz, hq, hk, rot, no_rope, q_sn, q_sh, q_sn, q_sh, qo_sn, qo_sh, qo_sn,
        qo_sh, k_sn, k_sh, k_sn, k_sh, v_sn, v_sh, quant_scale_q, quant_scale_kv, interleave,
        /*enable_pdl=*/false, stream);
  });
}

// q_rope [nnz, h, rot], q_nope [nnz, h, no_rope], k_rope [nnz, rot], k_nope [nnz, no_rope] (bf16,
// token strides given); q_rope_out / q_nope_out FP8 likewise; ckv_cache [pages, page_size,
// no_rope], kpe_cache [pages, page_size, rot] FP8 (3 int64 strides each)
const char* mla_rope_quant_append(void* q_rope, void* q_nope, void* k_rope, void* k_nope, void* q_rope_out,
                                  void* q_nope_out, void* ckv_cache, void* kpe_cache, const float* cos_sin_cache,
                                  const int64_t* pos_ids, const int32_t* indices, const int32_t* indptr,
                                  const int32_t* batch_indices, const int32_t* positions, uint32_t nnz,
                                  uint32_t batch_size, uint32_t h, uint32_t rot, uint32_t no_rope,
                                  uint32_t page_size, size_t qr_sn, size_t qr_sh, size_t qn_sn, size_t qn_sh,
                                  size_t qro_sn, size_t qro_sh, size_t qno_sn, size_t qno_sh, size_t kr_sn,
                                  size_t kn_sn, const int64_t* ckv_strides, const int64_t* kpe_strides,
                                  float quant_scale_q, float quant_scale_kv, bool interleave, cudaStream_t stream) {
  return guarded("RopeQuantizeAppendPagedMLACache", [&] {
    flashinfer::paged_kv_mla_t<fp8, int32_t> paged_kv_mla(
        page_size, no_rope, rot, batch_size, static_cast<fp8*>(ckv_cache), ckv_strides,
        static_cast<fp8*>(kpe_cache), kpe_strides, const_cast<int32_t*>(indices), const_cast<int32_t*>(indptr),
        /*last_page_len=*/nullptr);
    return flashinfer::RopeQuantizeAppendPagedMLACache<bf16, int64_t, int32_t, fp8>(
        static_cast<bf16*>(q_rope), static_cast<bf16*>(k_rope), static_cast<bf16*>(q_nope),
        static_cast<bf16*>(k_nope), static_cast<fp8*>(q_rope_out), static_cast<fp8*>(q_nope_out), paged_kv_mla,
        const_cast<int32_t*>(batch_indices), const_cast<int32_t*>(positions), const_cast<float*>(cos_sin_cache),
        const_cast<int64_t*>(pos_ids), nnz, h, rot, no_rope, qr_sn, qr_sh, qn_sn, qn_sh, qro_sn, qro_sh, qno_sn,
        qno_sh, kr_sn, kn_sn, quant_scale_q, quant_scale_kv, interleave, /*enable_pdl=*/false, stream);
  });
}

// k, v [nnz, hk, head_dim] bf16 -> bf16 caches [pages, page_size, hk, head_dim] (NHD)
const char* append_paged_kv(void* k, void* v, void* k_cache, void* v_cache, const int32_t* indices,
                            const int32_t* indptr, const int32_t* batch_indices, const int32_t* positions,
                            uint32_t nnz, uint32_t batch_size, uint32_t hk, uint32_t head_dim, uint32_t page_size,
                            size_t k_sn, size_t k_sh, size_t v_sn, size_t v_sh, const int64_t* k_cache_strides,
                            const int64_t* v_cache_strides, cudaStream_t stream) {
  return guarded("AppendPagedKVCache", [&] {
    flashinfer::paged_kv_t<bf16, int32_t> paged_kv(
        hk, page_size, head_dim, batch_size, flashinfer::QKVLayout::kNHD, static_cast<bf16*>(k_cache),
        static_cast<bf16*>(v_cache), k_cache_strides, v_cache_strides, const_cast<int32_t*>(indices),
        const_cast<int32_t*>(indptr), /*last_page_len=*/nullptr);
    return flashinfer::AppendPagedKVCache<bf16, int32_t>(
        paged_kv, static_cast<bf16*>(k), static_cast<bf16*>(v), const_cast<int32_t*>(batch_indices),
        const_cast<int32_t*>(positions), nnz, k_sn, k_sh, v_sn, v_sh, stream);
  });
}

// ckv [nnz, 512], kpe [nnz, 64] bf16 -> bf16 caches [pages, page_size, 512] / [.., 64]
const char* append_paged_mla(void* ckv, void* kpe, void* ckv_cache, void* kpe_cache, const int32_t* indices,
                             const int32_t* indptr, const int32_t* batch_indices, const int32_t* positions,
                             uint32_t nnz, uint32_t batch_size, uint32_t ckv_dim, uint32_t kpe_dim,
                             uint32_t page_size, size_t ckv_sn, size_t kpe_sn, const int64_t* ckv_strides,
                             const int64_t* kpe_strides, cudaStream_t stream) {
  return guarded("AppendPagedKVMlaCache", [&] {
    flashinfer::paged_kv_mla_t<bf16, int32_t> paged_kv_mla(
        page_size, ckv_dim, kpe_dim, batch_size, static_cast<bf16*>(ckv_cache), ckv_strides,
        static_cast<bf16*>(kpe_cache), kpe_strides, const_cast<int32_t*>(indices), const_cast<int32_t*>(indptr),
        /*last_page_len=*/nullptr);
    return flashinfer::AppendPagedKVMlaCache<bf16, int32_t>(
        paged_kv_mla, static_cast<bf16*>(ckv), static_cast<bf16*>(kpe), const_cast<int32_t*>(batch_indices),
        const_cast<int32_t*>(positions), nnz, ckv_sn, kpe_sn, stream);
  });
}

}  // namespace yarn_bench_fi_cache
