// Shared by rope_binding.cu and cache_binding.cu: run one FlashInfer launcher and turn its
// outcome into a C string for the torch side ("" on success, else why: a CUDA error, or
// FlashInfer's exception for an unsupported shape). Included inside each file's namespace.
#pragma once

// (each translation unit, each extension, keeps its own)
static thread_local std::string last_error;

template <typename F>
const char* guarded(const char* what, F&& f) {
  last_error.clear();
  try {
    const cudaError_t err = f();
    if (err != cudaSuccess) last_error = std::string(what) + ": " + cudaGetErrorString(err);
  } catch (const std::exception& e) {
    last_error = std::string(what) + ": " + e.what();
  }
  return last_error.c_str();
}
