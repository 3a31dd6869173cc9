"""Run one benchmark shape's rope call under a profiler window, for Nsight Compute:

    ncu --profile-from-start off --section SpeedOfLight python3 bench/ncu_case.py llama3-8b-prefill
    ncu ... python3 bench/ncu_case.py decode-256 1 1,32,1,4   # a given launch shape
    ncu ... python3 bench/ncu_case.py decode-256 1 liger      # Liger's kernel, its users' layout

Tuning and compilation happen before the window opens; inside it, ``--calls`` calls run.
"""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_rope import SHAPES, make_inputs  # noqa: E402

import yarn_triton as yt  # noqa: E402
from yarn_triton.kernels.configs import LaunchConfig  # noqa: E402


def main() -> None:
    name = sys.argv[1]
    calls = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    # optional launch shape "block_t,block_h,head_groups,warps" (default: the tuner's pick)
    config = None
    peer = len(sys.argv) > 3 and sys.argv[3] == "liger"
    if len(sys.argv) > 3 and not peer:
        bt, bh, g, w = (int(v) for v in sys.argv[3].split(","))
        config = LaunchConfig(bt, bh, w, 1, g)
    gen = torch.Generator(device="cuda").manual_seed(0)
    if name in SHAPES:
        shape = SHAPES[name]
        q, k, pos, _ = make_inputs(shape, torch.bfloat16, gen)
        base = yt.RopeParams.yarn(shape[4], 500000.0, 4.0, 8192)
        params = yt.RopeParams(base.inv_freq, shape[4], 1.0, 1.0, "yarn")
        layout = shape[6]
    else:  # an M-RoPE row (qwen3.5-prefill, ...)
        from explore_configs import mrope_inputs

        _, q, k, pos, params, _ = mrope_inputs(name, gen)
        layout = "neox"
    if peer:
        from bench_rope import transformers_inputs
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        qv, kv, cos, sin = transformers_inputs(q, k, pos, params.inv_freq_on("cuda"))

        def call():
            liger_rotary_pos_emb(qv, kv, cos, sin)
    else:
        def call():
            yt.apply_rope_(q, k, pos, params, layout=layout, config=config)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
