"""Correctness of our FlashInfer binding against yarn_triton's reference, on a GPU.

    python bench/flashinfer/check.py        # exits 1 if a cos/sin-cache case is off

* cos/sin cache (``BatchQKApplyRotaryPosIdsCosSinCache``) with YaRN's cache, as vLLM/SGLang
  build it (:func:`yarn_cos_sin_cache`): must match the YaRN reference to bf16 rounding;
* on the fly (``BatchQKApplyRotaryPosIds``) against plain rope: reported. Its inv_freq is
  ``theta^(-2i/R) / rope_scale`` (``__powf``/``__sincosf``, fast math), so it cannot express
  YaRN's ramp-blended inv_freq nor its cos/sin scale: the last column shows how far its best
  stand-in (rope_scale = YaRN's factor) is from YaRN. Ours on the same views, for scale.

Relative error = ||out - ref|| / ||ref|| over q and k, ref computed in float64.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _load():
    spec = importlib.util.spec_from_file_location("fi_rope_load", HERE / "load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rel_err(q, k, rq, rk) -> float:
    num = (q.double() - rq).norm() ** 2 + (k.double() - rk).norm() ** 2
    return (num / (rq.norm() ** 2 + rk.norm() ** 2)).sqrt().item()


def main() -> int:
    import yarn_triton as yt
    from yarn_triton.reference import rope_reference

    mod = _load()
    fi = mod.load()
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    cases = [  # name, q storage, k storage (views), yarn args, layout
        ("llama [T,32,128]/[T,8,128]", (1024, 32, 128), (1024, 8, 128), None, None,
         (128, 500000.0, 4.0, 8192), "neox"),
        ("mla view neox", (1024, 128, 192), (1024, 576), (128, 192), (512, 576),
         (64, 10000.0, 40.0, 4096, 32, 1, 0.707, 0.707), "neox"),
        ("mla view interleaved", (1024, 128, 192), (1024, 576), (128, 192), (512, 576),
         (64, 10000.0, 40.0, 4096, 32, 1, 0.707, 0.707), "interleaved"),
    ]
    bad = 0
    print(f"{'case':28s} {'pos <':>7s} {'ids':>5s} {'cache (YaRN)':>12s} {'fly (plain)':>11s} {'fly vs YaRN':>11s} {'ours (YaRN)':>11s}")
    for name, qs, ks, qsl, ksl, yargs, layout in cases:
        for maxpos, idt in ((4096, torch.int64), (128 * 1024, torch.int64), (128 * 1024, torch.int32)):
            q = torch.randn(*qs, device=dev, dtype=dt, generator=g)
            k = torch.randn(*ks, device=dev, dtype=dt, generator=g)
            if qsl:  # MLA: rope part of q heads, k_pe of the kv projection
                q, k = q[..., qsl[0]:qsl[1]], k[..., ksl[0]:ksl[1]].unsqueeze(1)
            pos = torch.randint(0, maxpos, (qs[0],), device=dev, generator=g)
            p = yt.RopeParams.yarn(*yargs)
            rot, theta, factor = yargs[0], yargs[1], yargs[2]
            plain = yt.RopeParams.default(rot, theta)
            ids = pos.to(idt)
            errs = []
            cache = mod.yarn_cos_sin_cache(p, maxpos, dev)
            for kind, ref_p in (("cache", p), ("fly", plain), ("fly", p), ("ours", p)):
                qc, kc = q, k  # the reference is out of place
                qv = torch.empty_strided(q.shape, q.stride(), dtype=dt, device=dev).copy_(q)
                kv = torch.empty_strided(k.shape, k.stride(), dtype=dt, device=dev).copy_(k)
                if kind == "ours":  # ours, same views, for scale
                    yt.apply_rope_(qv, kv, pos, p, layout=layout)
                elif kind == "cache":
                    fi.cos_sin_cache_(qv, kv, cache, ids, layout == "interleaved")
                else:
                    fi.pos_ids_(qv, kv, ids, rot, layout == "interleaved", 1.0 if ref_p is plain else factor, theta)
                rq, rk = rope_reference(qc.double(), kc.double(), pos, ref_p, layout=layout,
                                        compute_dtype=torch.float64)
                errs.append(rel_err(qv, kv, rq, rk))
            ok = errs[0] < 1e-2
            bad += not ok
            print(f"{name:28s} {maxpos:7d} {str(idt)[-5:]:>5s} {errs[0]:12.2e} {errs[1]:11.2e} {errs[2]:11.2e} {errs[3]:11.2e}"
                  f"{'' if ok else '  FAIL'}")
    print("FlashInfer binding check:", "PASS" if not bad else f"FAIL ({bad})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
