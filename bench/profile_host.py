"""Where the eager host time of one apply_rope_ call goes (cProfile over many calls).

    python bench/profile_host.py [--calls 2000]
"""

import argparse
import cProfile
import pstats
import time

import torch

import yarn_triton as yt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = yt.RopeParams.yarn(128, 500000.0, 4.0, 8192)
    q = torch.randn(1, 1, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 8, 128, device=dev, dtype=torch.bfloat16)
    pos = torch.zeros(1, 1, dtype=torch.long, device=dev)
    fns = {
        "apply_rope_": lambda: yt.apply_rope_(q, k, pos, p),
        "check_rope_args": lambda: yt.op.check_rope_args(q, k, pos, p, "neox", None),
    }
    for name, fn in fns.items():
        for _ in range(100):
            fn()
        torch.cuda.synchronize() if dev == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        print(f"{name}: {(time.perf_counter() - t0) / args.calls * 1e6:.1f} us/call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        fns["apply_rope_"]()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
