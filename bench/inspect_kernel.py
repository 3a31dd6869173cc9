"""Compile the rope kernel for Hopper (sm_90) on any machine, no GPU needed, and report
what decides its speed: registers, spills, and the SASS instruction mix (wide loads and
stores, special-function and float64 instructions).

    python bench/inspect_kernel.py                       # the prefill neox configuration
    python bench/inspect_kernel.py --layout deepseek --half 32 --block-t 4 --block-h 16
    python bench/inspect_kernel.py --mla-fp8-decode       # the serving op's 1-token MLA FP8 launch

``--order`` prints the global loads and stores in program order: in a decode launch what
matters is how many round trips to memory lie on a program's path (a load issued after a
store that waits for data waits that long too).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def compile_sm90(fn, constexprs: dict, dtype: str = "bf16", divisible=(), num_warps: int = 4, ptr_types=None):
    """Compile ``fn`` with pointer args of ``dtype`` (int args i32, float args fp32;
    ``ptr_types``: other types of named pointers)."""
    sig = {}
    for p in fn.params:
        name = p.name
        if name in constexprs:
            sig[name] = "constexpr"
        elif ptr_types and name in ptr_types:
            sig[name] = ptr_types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name in ("pos_ptr", "cu_ptr") else ("*fp32" if "freq" in name or "scale" in name and name.endswith("_ptr") else f"*{dtype}")
        elif name in ("scale", "qs_beta"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    idx = {p.name: i for i, p in enumerate(fn.params)}
    attrs = {(idx[n],): [["tt.divisibility", 16]] for n in divisible if n in idx}
    src = ASTSource(fn, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 1})


def sass_mix(cubin: bytes):
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1)] += 1
    return sass, ops


def resources(cubin: bytes) -> str:
    """Registers, stack and spills from cuobjdump's resource report."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return f"registers {m.group(1)}, stack {m.group(2)}, local {m.group(4)}" if m else out.strip()


def main(argv=None):
    from yarn_triton.kernels.rope_kernel import rope_kernel

    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="neox", choices=["neox", "interleaved", "deepseek"])
    ap.add_argument("--half", type=int, default=64)
    ap.add_argument("--block-t", type=int, default=16)
    ap.add_argument("--block-h", type=int, default=2)
    ap.add_argument("--k-block-h", type=int, default=0, help="k's heads per step (default: --block-h)")
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--norm", type=int, default=0, help="0 none, 1 RMSNorm, 2 (1 + weight)")
    ap.add_argument("--mrope", type=int, default=0, help="0 none, 1 sectioned, 2 interleaved")
    ap.add_argument("--q-scale", action="store_true", help="the Llama-4 query scale (Q_SCALE)")
    ap.add_argument("--imprecise", action="store_true")
    ap.add_argument("--sincos", type=int, default=1, help="0 polynomials (float32 outputs), 1 special-function unit")
    ap.add_argument("--wide", action="store_true", help="64-bit offsets (tensors of 2**31+ elements)")
    ap.add_argument("--rows", type=int, default=1, help="0 batched rows, 1 one row, 2 one token per row")
    ap.add_argument("--one-step", action="store_true", help="one head step covers each group (no head loop)")
    ap.add_argument("--low-rot", action="store_true",
                    help="the opt-in low-precision rotation (LOW_ROT: 16-bit products, YARN_TRITON_LOW_PRECISION_ROTATION)")
    ap.add_argument("--mla-fp8-decode", action="store_true",
                    help="the serving op's DeepSeek-V3 decode launch: one token, one q head (512 q_nope channels "
                         "copied before 64 rotary ones) per one-warp program, FP8 q_out, k_pe and kv_c to an FP8 cache")
    ap.add_argument("--order", action="store_true", help="print the global loads and stores in program order")
    ap.add_argument("--dump", default="", help="write SASS here")
    a = ap.parse_args(argv)
    in_pairs, out_pairs = {"neox": (0, 0), "interleaved": (1, 1), "deepseek": (1, 0)}[a.layout]
    c = dict(HALF=a.half, HALF_PAD=triton.next_power_of_2(a.half), Q_TAIL_PAD=0, K_TAIL_PAD=0,
             IN_PAIRS=in_pairs, OUT_PAIRS=out_pairs, INVERSE=0, PRECISE=int(not a.imprecise), INPLACE=1,
             POS_MODE=0, HAS_OFFSETS=0, VARLEN=0, NORM=a.norm, MROPE=a.mrope, SEC_T=a.half // 3, SEC_H=a.half // 3,
             SEC_W=a.half - 2 * (a.half // 3), BLOCK_T=a.block_t, Q_BLOCK_H=a.block_h,
             K_BLOCK_H=a.k_block_h or a.block_h, HEAD_GROUPS=a.groups, WIDE=int(a.wide),
             Q_ONE_STEP=int(a.one_step), K_ONE_STEP=int(a.one_step),
             ROWS=a.rows, Q_SCALE=int(a.q_scale), TAIL_FIRST=0, SINCOS=a.sincos,
             # the serving op's cache write and the context-parallel derivation: off here
             CACHE=0, V_DIM=0, V_PAD=1, QUANT_PTRS=0, V_BLOCK_H=1, V_ONE_STEP=1, CP=0, LOW_ROT=int(a.low_rot))
    ptr_types = None
    extra_div = []
    if a.mla_fp8_decode:
        c.update(HALF=32, HALF_PAD=32, Q_TAIL_PAD=512, IN_PAIRS=1, OUT_PAIRS=0, INPLACE=0, BLOCK_T=1, Q_BLOCK_H=1,
                 K_BLOCK_H=1, HEAD_GROUPS=128, TAIL_FIRST=1, Q_ONE_STEP=1, K_ONE_STEP=1, CACHE=1, V_DIM=512,
                 V_PAD=512, QUANT_PTRS=7, V_BLOCK_H=1, V_ONE_STEP=1, NORM=0, MROPE=0, Q_SCALE=0, LOW_ROT=0)
        c.update({n: 1 for n in ("v_sd", "vc_sd", "slot_ss")})
        a.warps = 1
        ptr_types = {"qo_ptr": "*fp8e4nv", "ko_ptr": "*fp8e4nv", "vc_ptr": "*fp8e4nv", "qq_ptr": "*fp32",
                     "kq_ptr": "*fp32", "vq_ptr": "*fp32", "slot_ptr": "*i64"}
        # 512 q_nope channels, cache rows of 576 and slot counts: multiples of 16, as Triton sees them
        extra_div = ["q_tail", "n_slots", "block_size", "v_sb", "v_ss", "v_sh", "vc_sb", "vc_ss", "vc_sh"]
    c.update({n: 1 for n in ("q_sd", "qo_sd", "k_sd", "ko_sd", "pos_ss")})
    # pointers and the token/head strides of q, k and their outputs 16-aligned, as for
    # contiguous or fused-projection tensors of a real model
    strides = [p.name for p in rope_kernel.params if p.name[:1] in "qk" and p.name[-3:-1] in ("_s", "os")]
    k = compile_sm90(rope_kernel, c, num_warps=a.warps, ptr_types=ptr_types, divisible=strides + extra_div + [
        p.name for p in rope_kernel.params if p.name.endswith("_ptr")])
    sass, ops = sass_mix(k.asm["cubin"])
    print(f"{resources(k.asm['cubin'])}, shared {k.metadata.shared} B")
    keys = [o for o in ops if o.startswith(("LDG", "STG", "MUFU", "D", "LDS", "STS", "SHFL", "BAR", "F2F", "I2F", "F2I", "CALL", "BRA"))]
    print("  ".join(f"{o}:{ops[o]}" for o in sorted(keys)), f" total:{sum(ops.values())}")
    if a.order:
        print("order:", " ".join(re.findall(r"\b(?:LDG|STG)[A-Z0-9_.]*", sass)))
    if a.dump:
        open(a.dump, "w").write(sass)


if __name__ == "__main__":
    main()
