"""Build (once, cached) and load our torch bindings of FlashInfer's launchers.

    from load import load            # bench/flashinfer/load.py, imported by path
    fi = load()                      # fi.cos_sin_cache_(q, k, cache, pos_ids, interleave)
                                     # fi.pos_ids_(q, k, pos_ids, rotary_dim, interleave, scale, theta)
    fc = load_cache()                # rope + paged KV cache (cache_binding.cpp/.cu, bench_cache.py):
                                     # fc.gqa_rope_quant_append_, fc.mla_rope_quant_append_ (FP8),
                                     # fc.append_paged_kv_, fc.append_paged_mla_ (bf16)

Needs FlashInfer's headers at ``.flashinfer/include`` (``bench/flashinfer/fetch_headers.sh``), a
CUDA toolkit (nvcc) and a GPU; builds for the current GPU's arch (sm_90 on an H100) with
FlashInfer's own JIT flags (``-O3 -use_fast_math``), into ``.flashinfer/build`` (rebuilt only when
the source or flags change). This folder has no ``__init__.py`` on purpose: ``import flashinfer``
must keep finding the real package, if one is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
INCLUDE = ROOT / ".flashinfer" / "include"
BUILD = ROOT / ".flashinfer" / "build"
NAME = "yarn_bench_flashinfer_rope"
CACHE_NAME = "yarn_bench_flashinfer_cache"


def load(verbose: bool = False):
    """The rope binding (rope_binding.cpp/.cu)."""
    return _build(NAME, ["rope_binding.cpp", "rope_binding.cu"], verbose)


def load_cache(verbose: bool = False):
    """The rope + paged-cache binding (cache_binding.cpp/.cu): a module of its own, so that a
    failure to build it leaves the rope binding usable."""
    return _build(CACHE_NAME, ["cache_binding.cpp", "cache_binding.cu"], verbose)


def _build(name: str, sources, verbose: bool):
    import torch
    from torch.utils.cpp_extension import load as cpp_load

    if not (INCLUDE / "flashinfer" / "pos_enc.cuh").is_file():
        raise FileNotFoundError(f"no FlashInfer headers at {INCLUDE}: run bench/flashinfer/fetch_headers.sh")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU")
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    build = BUILD if name == NAME else BUILD / name  # one build.ninja per extension
    build.mkdir(parents=True, exist_ok=True)
    cccl = INCLUDE / "cccl"
    return cpp_load(
        name=name,
        # the .cu sees FlashInfer's headers and its bundled CCCL (3.6, first on the path as its
        # JIT puts it), no torch header: torch's pull in the toolkit's thrust under nvcc, and
        # two CCCLs cannot share a translation unit; the .cpp is the torch side
        sources=[str(HERE / s) for s in sources],
        extra_include_paths=[str(INCLUDE)],
        extra_cflags=["-O3", "-DNDEBUG"],
        extra_cuda_cflags=[f"-I{cccl / 'libcudacxx' / 'include'}", f"-I{cccl / 'cub'}", f"-I{cccl / 'thrust'}",
                           "-O3", "-DNDEBUG", "-use_fast_math", "--expt-relaxed-constexpr",
                           "-DFLASHINFER_ENABLE_F16", "-DFLASHINFER_ENABLE_BF16",
                           "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                           "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"],
        build_directory=str(build),
        verbose=verbose,
    )


def yarn_cos_sin_cache(params, max_positions: int, device):
    """The cache FlashInfer's YaRN users (vLLM, SGLang) build once per model:
    float32 ``[max_positions, R]``, ``cos`` of each position's angles in the first ``R/2``
    columns, ``sin`` in the last, both times YaRN's cos/sin scale (its mscale)."""
    import torch

    inv = params.inv_freq_on(device)  # float32, copied to the device once (graph-capturable)
    freqs = torch.outer(torch.arange(max_positions, device=device, dtype=torch.float32), inv)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * params.cos_sin_scale
