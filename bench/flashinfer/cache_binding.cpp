// The torch side of our FlashInfer rope + paged-cache binding (see cache_binding.cu): argument
// checks, strides, the current CUDA stream, the Python module. Paging is FlashInfer's: token i
// of sequence batch_indices[i] at position positions[i] goes to page
// indices[indptr[b] + positions[i] / page_size], entry positions[i] % page_size.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <vector>

#include "cache_binding.h"

namespace {

using at::Tensor;

void same_device(const Tensor& ref, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    TORCH_CHECK(t->is_cuda() && t->device() == ref.device(), "all tensors must be on one CUDA device");
  }
}

// FlashInfer's kernels move 16 bytes per access: every row (token, head, page, entry) they
// touch must start on a 16-byte boundary (FlashInfer's check_append_rows_16b_aligned), and
// the last dim must be contiguous.
void aligned_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1 || t.size(-1) == 1, name, ": the last dim must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must start on a 16-byte boundary");
  for (int64_t i = 0; i + 1 < t.dim(); ++i) {
    TORCH_CHECK(t.size(i) <= 1 || (t.stride(i) * t.element_size()) % 16 == 0, name, ".stride(", i,
                ") is not a multiple of 16 bytes");
  }
}

void check_paging(const Tensor& ref, const Tensor& indices, const Tensor& indptr, const Tensor& batch_indices,
                  const Tensor& positions, int64_t nnz) {
  same_device(ref, {&indices, &indptr, &batch_indices, &positions});
  for (const Tensor* t : {&indices, &indptr, &batch_indices, &positions}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous(),
                "indices, indptr, batch_indices, positions must be contiguous 1-D int32");
  }
  TORCH_CHECK(batch_indices.size(0) == nnz && positions.size(0) == nnz, "batch_indices/positions: one per token");
  TORCH_CHECK(indptr.size(0) >= 2, "indptr must be [batch + 1]");
}

void check_rope_inputs(const Tensor& ref, const Tensor& cos_sin_cache, const Tensor& pos_ids, int64_t nnz,
                       int64_t rot) {
  same_device(ref, {&cos_sin_cache, &pos_ids});
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 &&
                  cos_sin_cache.is_contiguous() && cos_sin_cache.size(1) == rot,
              "cos_sin_cache must be a contiguous float32 [max_pos, rotary_dim]");
  TORCH_CHECK(pos_ids.scalar_type() == at::kLong && pos_ids.dim() == 1 && pos_ids.is_contiguous() &&
                  pos_ids.size(0) == nnz,
              "pos_ids must be a contiguous int64 [nnz]");
  TORCH_CHECK(rot > 0 && rot % 16 == 0, "rotary_dim must be a positive multiple of 16");
}

std::vector<int64_t> strides_of(const Tensor& t) { return std::vector<int64_t>(t.strides().begin(), t.strides().end()); }

// q [nnz, Hq, D] bf16 (first R = cos_sin_cache.size(1) channels rotated), k, v [nnz, Hk, D]
// bf16, q_out [nnz, Hq, D] e4m3, k_cache, v_cache [pages, page_size, Hk, D] e4m3 (NHD). q, k,
// v are only read.
void gqa_rope_quant_append_(Tensor q, Tensor k, Tensor v, Tensor q_out, Tensor k_cache, Tensor v_cache,
                            Tensor cos_sin_cache, Tensor pos_ids, Tensor indices, Tensor indptr,
                            Tensor batch_indices, Tensor positions, double quant_scale_q, double quant_scale_kv,
                            bool interleave) {
  same_device(q, {&k, &v, &q_out, &k_cache, &v_cache});
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q_out.dim() == 3, "q, k, v, q_out: [nnz, H, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "this binding takes bfloat16 q, k, v");
  TORCH_CHECK(q_out.scalar_type() == at::kFloat8_e4m3fn && k_cache.scalar_type() == at::kFloat8_e4m3fn &&
                  v_cache.scalar_type() == at::kFloat8_e4m3fn,
              "q_out and the caches must be float8_e4m3fn");
  const int64_t nnz = q.size(0), hq = q.size(1), d = q.size(2), hk = k.size(1);
  TORCH_CHECK(k.size(0) == nnz && v.size(0) == nnz && k.size(2) == d && v.size(1) == hk && v.size(2) == d,
              "k and v must be [nnz, Hk, D] with q's nnz and D");
  TORCH_CHECK(q_out.sizes() == q.sizes(), "q_out must have q's shape");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == hk && k_cache.size(3) == d && v_cache.sizes() == k_cache.sizes(),
              "k_cache, v_cache must be [pages, page_size, Hk, D]");
  const int64_t rot = cos_sin_cache.size(1);
  check_rope_inputs(q, cos_sin_cache, pos_ids, nnz, rot);
  TORCH_CHECK(rot <= d && (d - rot) % 16 == 0, "head dim - rotary_dim must be a multiple of 16");
  check_paging(q, indices, indptr, batch_indices, positions, nnz);
  aligned_rows(q, "q");
  aligned_rows(k, "k");
  aligned_rows(v, "v");
  aligned_rows(q_out, "q_out");
  aligned_rows(k_cache, "k_cache");
  aligned_rows(v_cache, "v_cache");
  const auto ks = strides_of(k_cache), vs = strides_of(v_cache);
  const c10::cuda::CUDAGuard guard(q.device());
  const char* err = yarn_bench_fi_cache::gqa_rope_quant_append(
      q.data_ptr(), k.data_ptr(), v.data_ptr(), q_out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
      cos_sin_cache.data_ptr<float>(), pos_ids.data_ptr<int64_t>(), indices.data_ptr<int32_t>(),
      indptr.data_ptr<int32_t>(), batch_indices.data_ptr<int32_t>(), positions.data_ptr<int32_t>(), nnz,
      indptr.size(0) - 1, hq, hk, d, rot, k_cache.size(1), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
      v.stride(0), v.stride(1), q_out.stride(0), q_out.stride(1), ks.data(), vs.data(),
      static_cast<float>(quant_scale_q), static_cast<float>(quant_scale_kv), interleave,
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err[0] == 0, err);
}

// q_rope [nnz, H, R], q_nope [nnz, H, Dn] bf16 (views of q [nnz, H, Dn + R]), k_rope [nnz, R],
// k_nope [nnz, L] bf16; q_rope_out, q_nope_out e4m3 likewise; ckv_cache [pages, page_size, L],
// kpe_cache [pages, page_size, R] e4m3 (views of one [pages, page_size, L + R] cache).
void mla_rope_quant_append_(Tensor q_rope, Tensor q_nope, Tensor k_rope, Tensor k_nope, Tensor q_rope_out,
                            Tensor q_nope_out, Tensor ckv_cache, Tensor kpe_cache, Tensor cos_sin_cache,
                            Tensor pos_ids, Tensor indices, Tensor indptr, Tensor batch_indices, Tensor positions,
                            double quant_scale_q, double quant_scale_kv, bool interleave) {
  same_device(q_rope, {&q_nope, &k_rope, &k_nope, &q_rope_out, &q_nope_out, &ckv_cache, &kpe_cache});
  TORCH_CHECK(q_rope.dim() == 3 && q_nope.dim() == 3 && q_rope_out.dim() == 3 && q_nope_out.dim() == 3,
              "q_rope, q_nope and their outputs: [nnz, H, D]");
  TORCH_CHECK(k_rope.dim() == 2 && k_nope.dim() == 2, "k_rope, k_nope: [nnz, D]");
  for (const Tensor* t : {&q_rope, &q_nope, &k_rope, &k_nope}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "this binding takes bfloat16 inputs");
  }
  for (const Tensor* t : {&q_rope_out, &q_nope_out, &ckv_cache, &kpe_cache}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat8_e4m3fn, "q outputs and the caches must be float8_e4m3fn");
  }
  const int64_t nnz = q_rope.size(0), h = q_rope.size(1), rot = q_rope.size(2), dn = q_nope.size(2);
  const int64_t l = k_nope.size(1);
  TORCH_CHECK(q_nope.size(0) == nnz && q_nope.size(1) == h, "q_nope: [nnz, H, Dn]");
  TORCH_CHECK(k_rope.size(0) == nnz && k_rope.size(1) == rot && k_nope.size(0) == nnz, "k_rope/k_nope: [nnz, *]");
  TORCH_CHECK(q_rope_out.sizes() == q_rope.sizes() && q_nope_out.sizes() == q_nope.sizes(),
              "q outputs must have their inputs' shapes");
  // FlashInfer splits q_nope and k_nope in chunks of R: one no_rope_dim for both
  TORCH_CHECK(dn == l, "FlashInfer's MLA kernel takes one no_rope_dim: q_nope's dim must equal k_nope's (",
              dn, " vs ", l, "); pass q_nope = the kv_c-sized part");
  TORCH_CHECK(ckv_cache.dim() == 3 && kpe_cache.dim() == 3 && ckv_cache.size(2) == l && kpe_cache.size(2) == rot &&
                  ckv_cache.size(1) == kpe_cache.size(1),
              "ckv_cache [pages, page_size, L], kpe_cache [pages, page_size, R]");
  check_rope_inputs(q_rope, cos_sin_cache, pos_ids, nnz, rot);
  check_paging(q_rope, indices, indptr, batch_indices, positions, nnz);
  aligned_rows(q_rope, "q_rope");
  aligned_rows(q_nope, "q_nope");
  aligned_rows(k_rope, "k_rope");
  aligned_rows(k_nope, "k_nope");
  aligned_rows(q_rope_out, "q_rope_out");
  aligned_rows(q_nope_out, "q_nope_out");
  aligned_rows(ckv_cache, "ckv_cache");
  aligned_rows(kpe_cache, "kpe_cache");
  const auto cs = strides_of(ckv_cache), ps = strides_of(kpe_cache);
  const c10::cuda::CUDAGuard guard(q_rope.device());
  const char* err = yarn_bench_fi_cache::mla_rope_quant_append(
      q_rope.data_ptr(), q_nope.data_ptr(), k_rope.data_ptr(), k_nope.data_ptr(), q_rope_out.data_ptr(),
      q_nope_out.data_ptr(), ckv_cache.data_ptr(), kpe_cache.data_ptr(), cos_sin_cache.data_ptr<float>(),
      pos_ids.data_ptr<int64_t>(), indices.data_ptr<int32_t>(), indptr.data_ptr<int32_t>(),
      batch_indices.data_ptr<int32_t>(), positions.data_ptr<int32_t>(), nnz, indptr.size(0) - 1, h, rot, l,
      ckv_cache.size(1), q_rope.stride(0), q_rope.stride(1), q_nope.stride(0), q_nope.stride(1),
      q_rope_out.stride(0), q_rope_out.stride(1), q_nope_out.stride(0), q_nope_out.stride(1), k_rope.stride(0),
      k_nope.stride(0), cs.data(), ps.data(), static_cast<float>(quant_scale_q), static_cast<float>(quant_scale_kv),
      interleave, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err[0] == 0, err);
}

// k, v [nnz, Hk, D] bf16 -> k_cache, v_cache [pages, page_size, Hk, D] bf16 (NHD)
void append_paged_kv_(Tensor k, Tensor v, Tensor k_cache, Tensor v_cache, Tensor indices, Tensor indptr,
                      Tensor batch_indices, Tensor positions) {
  same_device(k, {&v, &k_cache, &v_cache});
  for (const Tensor* t : {&k, &v, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "this binding appends bfloat16 to a bfloat16 cache");
  }
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k, v: [nnz, Hk, D]");
  const int64_t nnz = k.size(0), hk = k.size(1), d = k.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == hk && k_cache.size(3) == d && v_cache.sizes() == k_cache.sizes(),
              "k_cache, v_cache must be [pages, page_size, Hk, D]");
  TORCH_CHECK(d == 64 || d == 128 || d == 256 || d == 512, "FlashInfer's append takes head dim 64/128/256/512");
  check_paging(k, indices, indptr, batch_indices, positions, nnz);
  aligned_rows(k, "k");
  aligned_rows(v, "v");
  aligned_rows(k_cache, "k_cache");
  aligned_rows(v_cache, "v_cache");
  const auto ks = strides_of(k_cache), vs = strides_of(v_cache);
  const c10::cuda::CUDAGuard guard(k.device());
  const char* err = yarn_bench_fi_cache::append_paged_kv(
      k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), indices.data_ptr<int32_t>(),
      indptr.data_ptr<int32_t>(), batch_indices.data_ptr<int32_t>(), positions.data_ptr<int32_t>(), nnz,
      indptr.size(0) - 1, hk, d, k_cache.size(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), ks.data(),
      vs.data(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err[0] == 0, err);
}

// ckv [nnz, 512], kpe [nnz, 64] bf16 -> ckv_cache [pages, page_size, 512], kpe_cache [.., 64] bf16
void append_paged_mla_(Tensor ckv, Tensor kpe, Tensor ckv_cache, Tensor kpe_cache, Tensor indices, Tensor indptr,
                       Tensor batch_indices, Tensor positions) {
  same_device(ckv, {&kpe, &ckv_cache, &kpe_cache});
  for (const Tensor* t : {&ckv, &kpe, &ckv_cache, &kpe_cache}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "this binding appends bfloat16 to a bfloat16 cache");
  }
  TORCH_CHECK(ckv.dim() == 2 && kpe.dim() == 2 && kpe.size(0) == ckv.size(0), "ckv [nnz, 512], kpe [nnz, 64]");
  TORCH_CHECK(ckv.size(1) == 512 && kpe.size(1) == 64, "FlashInfer's MLA append takes ckv 512 and kpe 64");
  TORCH_CHECK(ckv_cache.dim() == 3 && kpe_cache.dim() == 3 && ckv_cache.size(2) == 512 && kpe_cache.size(2) == 64 &&
                  ckv_cache.size(1) == kpe_cache.size(1),
              "ckv_cache [pages, page_size, 512], kpe_cache [pages, page_size, 64]");
  const int64_t nnz = ckv.size(0);
  check_paging(ckv, indices, indptr, batch_indices, positions, nnz);
  aligned_rows(ckv, "ckv");
  aligned_rows(kpe, "kpe");
  aligned_rows(ckv_cache, "ckv_cache");
  aligned_rows(kpe_cache, "kpe_cache");
  const auto cs = strides_of(ckv_cache), ps = strides_of(kpe_cache);
  const c10::cuda::CUDAGuard guard(ckv.device());
  const char* err = yarn_bench_fi_cache::append_paged_mla(
      ckv.data_ptr(), kpe.data_ptr(), ckv_cache.data_ptr(), kpe_cache.data_ptr(), indices.data_ptr<int32_t>(),
      indptr.data_ptr<int32_t>(), batch_indices.data_ptr<int32_t>(), positions.data_ptr<int32_t>(), nnz,
      indptr.size(0) - 1, 512, 64, ckv_cache.size(1), ckv.stride(0), kpe.stride(0), cs.data(), ps.data(),
      at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err[0] == 0, err);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gqa_rope_quant_append_", &gqa_rope_quant_append_,
        "FlashInfer RopeQuantizeAppendPagedKVCache: rope q, k (fp32 cos/sin cache), q -> FP8 q_out, k, v -> FP8 "
        "paged cache",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_out"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("cos_sin_cache"), py::arg("pos_ids"), py::arg("indices"), py::arg("indptr"),
        py::arg("batch_indices"), py::arg("positions"), py::arg("quant_scale_q"), py::arg("quant_scale_kv"),
        py::arg("interleave"));
  m.def("mla_rope_quant_append_", &mla_rope_quant_append_,
        "FlashInfer RopeQuantizeAppendPagedMLACache: rope q_pe, k_pe, q -> FP8, kv_c and k_pe -> FP8 MLA cache",
        py::arg("q_rope"), py::arg("q_nope"), py::arg("k_rope"), py::arg("k_nope"), py::arg("q_rope_out"),
        py::arg("q_nope_out"), py::arg("ckv_cache"), py::arg("kpe_cache"), py::arg("cos_sin_cache"),
        py::arg("pos_ids"), py::arg("indices"), py::arg("indptr"), py::arg("batch_indices"), py::arg("positions"),
        py::arg("quant_scale_q"), py::arg("quant_scale_kv"), py::arg("interleave"));
  m.def("append_paged_kv_", &append_paged_kv_, "FlashInfer AppendPagedKVCache (bf16)", py::arg("k"), py::arg("v"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("indices"), py::arg("indptr"), py::arg("batch_indices"),
        py::arg("positions"));
  m.def("append_paged_mla_", &append_paged_mla_, "FlashInfer AppendPagedKVMlaCache (bf16)", py::arg("ckv"),
        py::arg("kpe"), py::arg("ckv_cache"), py::arg("kpe_cache"), py::arg("indices"), py::arg("indptr"),
        py::arg("batch_indices"), py::arg("positions"));
}
