"""Accuracy of rope at long context: the table of docs/accuracy.md.

For a window of positions just below 4K, 32K, 128K, 1M, 16M and 1G it measures, against the
float64 truth (same float32 ``inv_freq``, float64 angles and cos/sin):

* max |cos/sin error|: the largest absolute error of the (scaled) cos and sin actually
  applied, over the window and all frequencies;
* rotated-q relative error: ``||q_rot - truth|| / ||truth||`` for random q (8 heads), the
  truth computed in float64 from the same input values (so bf16 rows include the bf16
  rounding of the output, not of the input).

Methods:

* ``kernel (precise)``: ``apply_rope_`` with its default ``precise_angles=True``, fp32 q;
* ``kernel (precise_angles=False)``: the kernel with float32 ``position * inv_freq``;
* ``fp32 cache``: the materialised float32 cos/sin cache of transformers (and of the seed
  implementation): ``rope_reference`` with ``compute_dtype=float32``;
* ``bf16 cache``: that cache cast to bf16 (the model dtype, as the seed stores it) and
  applied to bf16 q in bf16 arithmetic;
* ``kernel (precise), bf16 q``: for comparison with the row above: same bf16 input, angles
  and arithmetic in float32 registers, one rounding to bf16 on the store;
* ``Liger kernel, bf16 q`` (CUDA, when liger-kernel is installed): Liger's Triton kernel
  given that bf16 cache and the ``[B, H, S, D]`` view transformers passes; it multiplies
  in bf16, two values per instruction.

Runs the kernel on CUDA when available, otherwise on the CPU through Triton's interpreter
(TRITON_INTERPRET=1 is set here before Triton is imported); the device is printed.

    python bench/accuracy_table.py                          # print the tables
    python bench/accuracy_table.py --markdown docs/accuracy.md   # rewrite the doc
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from yarn_triton import RopeParams, apply_rope_, op  # noqa: E402  (after TRITON_INTERPRET)
from yarn_triton.kernels import launcher  # noqa: E402
from yarn_triton.kernels.configs import LaunchConfig  # noqa: E402
from yarn_triton.kernels.rope_kernel import INTERPRETED  # noqa: E402
from yarn_triton.reference import cos_sin_cache, rope_reference, rotate_half  # noqa: E402

POSITIONS = [("4K", 4096), ("32K", 32768), ("128K", 131072), ("1M", 1 << 20), ("16M", 1 << 24), ("1G", 1 << 30)]
HEADS = 8

CONFIGS = {
    "Plain RoPE, head_dim 128, theta 10000 (Llama-2 style)": lambda: RopeParams.default(128, base=10000.0),
    "YaRN, DeepSeek-V3 (rope dim 64, theta 10000, factor 40, original 4096, mscale 1/1)": lambda: RopeParams.yarn(
        64, base=10000.0, scaling_factor=40.0, original_max_position_embeddings=4096,
        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
}

METHODS = [
    "kernel (precise, default)",
    "kernel (precise_angles=False)",
    "fp32 cache (transformers / seed)",
    "bf16 cache, bf16 q (seed in model dtype)",
    "kernel (precise), bf16 q",
    "Liger kernel, bf16 q (bf16 cache, bf16 arithmetic)",
]

try:  # a peer, on CUDA only
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
except ImportError:
    liger_rotary_pos_emb = None


def pick_device() -> tuple[str, str]:
    if _HAS_CUDA and not INTERPRETED:
        return "cuda", f"CUDA: {torch.cuda.get_device_name()} (torch {torch.__version__})"
    if INTERPRETED:
        return "cpu", f"CPU through the Triton interpreter (TRITON_INTERPRET=1; torch {torch.__version__})"
    sys.exit("no CUDA device and TRITON_INTERPRET is not 1: the kernel cannot run here")


def _probe_q(n: int, rope_dim: int, q_rand: torch.Tensor) -> torch.Tensor:
    """Head 0 is the probe (x1 = 1, x2 = 0 in every pair: out = (scale*cos, scale*sin));
    heads 1.. are the random q."""
    probe = torch.zeros(n, 1, rope_dim)
    probe[..., : rope_dim // 2] = 1.0
    return torch.cat((probe, q_rand), dim=1)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def _cos_sin_err(c: torch.Tensor, s: torch.Tensor, c64: torch.Tensor, s64: torch.Tensor) -> float:
    return max((c.double().cpu() - c64).abs().max().item(), (s.double().cpu() - s64).abs().max().item())


@contextlib.contextmanager
def sixteen_bit_cos_sin():
    """Inside: every launch takes cos/sin as it does for 16-bit outputs (the special-function
    unit on a GPU), also for the float32 probe, where its error is visible; the launch
    plans of the ordinary path are set aside meanwhile (as
    ``test_special_function_unit_path_keeps_the_bound`` does)."""
    sixteen = launcher._sincos(torch.bfloat16, torch.bfloat16)
    saved_sincos, saved_plans = launcher._sincos, op.plans._PLANS
    launcher._sincos = lambda *dtypes: sixteen
    op.plans._PLANS = type(saved_plans)()
    try:
        yield
    finally:
        launcher._sincos, op.plans._PLANS = saved_sincos, saved_plans


def measure(params: RopeParams, p_end: int, window: int, device: str, cfg) -> dict:
    rd, half = params.rope_dim, params.rope_dim // 2
    gen = torch.Generator().manual_seed(p_end)
    pos = torch.arange(p_end - window, p_end, dtype=torch.int64)
    pos_d = pos.to(device)
    q = torch.randn(window, HEADS, rd, generator=gen)
    c64, s64 = cos_sin_cache(params, pos, torch.float64)
    c64, s64 = c64[:, :half], s64[:, :half]
    truth32 = rope_reference(q.double(), None, pos, params, compute_dtype=torch.float64)[0]
    q_bf = q.to(torch.bfloat16)
    truth_bf = rope_reference(q_bf.double(), None, pos, params, compute_dtype=torch.float64)[0]
    res = {}

    for name, precise in (("kernel (precise, default)", True), ("kernel (precise_angles=False)", False)):
        x = _probe_q(window, rd, q).to(device)
        apply_rope_(x, None, pos_d, params, precise_angles=precise, config=cfg)
        res[name] = (_cos_sin_err(x[:, 0, :half], x[:, 0, half:], c64, s64), _rel(x[:, 1:], truth32))

    c32, s32 = cos_sin_cache(params, pos_d, torch.float32)
    out = rope_reference(q.to(device), None, pos_d, params)[0]  # compute_dtype float32
    res["fp32 cache (transformers / seed)"] = (_cos_sin_err(c32[:, :half], s32[:, :half], c64, s64), _rel(out, truth32))

    cb, sb = c32.to(torch.bfloat16), s32.to(torch.bfloat16)
    xb = q_bf.to(device)
    out = xb * cb.unsqueeze(1) + rotate_half(xb) * sb.unsqueeze(1)  # bf16 arithmetic
    res["bf16 cache, bf16 q (seed in model dtype)"] = (_cos_sin_err(cb[:, :half], sb[:, :half], c64, s64), _rel(out, truth_bf))
    if liger_rotary_pos_emb is not None and device == "cuda":
        qv = q_bf.to(device)[None].transpose(1, 2)  # [1, H, S, D] view of [1, S, H, D] storage
        kv = qv[:, :1].clone()  # its API rotates a k too
        out = liger_rotary_pos_emb(qv, kv, cb[None], sb[None])[0].transpose(1, 2)[0]
        res["Liger kernel, bf16 q (bf16 cache, bf16 arithmetic)"] = (
            _cos_sin_err(cb[:, :half], sb[:, :half], c64, s64), _rel(out, truth_bf))

    xb = q_bf.to(device).clone()
    apply_rope_(xb, None, pos_d, params, config=cfg)
    with sixteen_bit_cos_sin():  # the cos/sin that row's kernel used, read through the float32 probe
        x = _probe_q(window, rd, q).to(device)
        apply_rope_(x, None, pos_d, params, config=cfg)
    res["kernel (precise), bf16 q"] = (_cos_sin_err(x[:, 0, :half], x[:, 0, half:], c64, s64), _rel(xb, truth_bf))
    return res


def fmt(v) -> str:
    if v == float("inf"):
        return "inf"
    return f"{v:.1e}"


def tables(window: int, device: str) -> tuple[str, float]:
    # Results do not depend on the launch shape; under the interpreter big programs are
    # much faster (its cost is per program). On CUDA the default heuristic is used.
    cfg = LaunchConfig(block_t=64, block_h=16, num_warps=4) if device == "cpu" else None
    t0 = time.time()
    out = []
    for title, make in CONFIGS.items():
        params = make()
        results = {label: measure(params, p, window, device, cfg) for label, p in POSITIONS}
        head = "| method | " + " | ".join(label for label, _ in POSITIONS) + " |"
        sep = "|---|" + "---:|" * len(POSITIONS)
        out.append(f"### {title}\n\ncos_sin_scale = {params.cos_sin_scale:.6g}\n")
        for metric, i in (("max \\|cos/sin error\\| (absolute)", 0), ("rotated-q relative error", 1)):
            out.append(f"**{metric}**\n\n{head}\n{sep}")
            for m in METHODS:
                if m not in results[POSITIONS[0][0]]:  # a peer not installed here
                    continue
                out.append(f"| {m} | " + " | ".join(fmt(results[label][m][i]) for label, _ in POSITIONS) + " |")
            out.append("")
    return "\n".join(out), time.time() - t0


DOC_HEAD = """# Accuracy at long context

How far the rotation applied by yarn-triton, and by the usual materialised cos/sin caches,
is from the float64 truth as positions grow. The truth uses the same float32 `inv_freq` as
everyone (the models' own), the exact integer position, and float64 angles and cos/sin.

Each column is a window of {window} consecutive positions ending just below the given
position (e.g. `1M` = positions {m_lo} .. {m_hi}); q is random normal, {heads} heads.

* **max |cos/sin error|**: the largest absolute error of the (scaled) cos and sin the
  method multiplies by. The kernel's are read back through a probe head (x1 = 1, x2 = 0 in
  every rotation pair, so the output is exactly `(scale*cos, scale*sin)`).
* **rotated-q relative error**: `||q_rot - truth|| / ||truth||`, truth computed in float64
  from the same input values (for bf16 rows from the bf16 input, so the error shown is the
  method's, including the final rounding to bf16).

Methods: the kernel with its default `precise_angles=True` (angle formed in float64 and
reduced in float64 before the float32 cos/sin), the kernel with `precise_angles=False`
(float32 `position * inv_freq`, like a materialised cache), the float32 cache of
transformers and of the seed implementation (`rope_reference(..., compute_dtype=float32)`),
that cache stored in bf16 (the model dtype) and applied to bf16 q in bf16, and, for
comparison with the last, the kernel on the same bf16 q. Where Liger-Kernel is installed
(a GPU run), its rope kernel joins the bf16 rows: given the same bf16 cache and the
`[B, H, S, D]` view transformers passes, it multiplies in bf16, two values per instruction
(the arithmetic that makes its decode launches shorter than ours, `performance.md`).

Contract (tested in `tests/test_accuracy.py`): with `precise_angles=True` the kernel's
cos/sin are within 2e-6 of the float64 truth at every position in the int32 range
(|position| <= 2**31), for plain RoPE and YaRN parameters alike.

How the kernel takes cos/sin depends on its output dtype. Float32 outputs (the probe, and
the fp32 rows below) get short polynomials after a float64 reduction by pi/2. When q's and
k's outputs are bf16/fp16, the reduction is by 2*pi to [-pi, pi], still in float64, and
cos/sin come from the GPU's special-function unit (`cos.approx.ftz.f32` /
`sin.approx.ftz.f32`), whose absolute error on that range is below 1e-6.
`test_special_function_unit_path_keeps_the_bound` forces that path onto the float32 probe,
where an error that small is visible, and checks the same 2e-6 bound at every int32
position (under the CPU interpreter numpy's cos/sin stand in for the unit). The rounding
to 16 bits all but hides it: for values in [0.5, 1) bf16's rounding step is 2**-8 = 3.9e-3
and fp16's 2**-11 = 4.9e-4, about 4000 and 500 times 1e-6. A cos/sin error e moves a
rotated pair by at most sqrt(2) * e of its norm, so before the store the unit's error
moves the rotated q by at most ~1.4e-6 relative, against the ~1.7e-3 that the store's
rounding to bf16 gives in the `kernel (precise), bf16 q` rows; it can change a stored
value only where the exact result lies that close to a rounding boundary, and then by one
step. The `kernel (precise), bf16 q` rows below take that path; their cos/sin column is the
float32 probe run through the same path (forced, as in the test).
`YARN_TRITON_HW_SINCOS=0` keeps the polynomials for 16-bit outputs too.

Reading the table: a float32 angle `p * inv_freq` carries a rounding error of up to
`p * 2**-24` rad, so any method that forms the angle in float32 loses about one digit per
decade of position: ~1e-4 at 4K, ~0.03 at 1M and O(1) (the angle is meaningless) from
16M on. The kernel's precise path stays at float32 rounding (~1e-7) at every position.
Storing the cache in bf16 adds ~2e-3 (half a bf16 ulp near 1) at every position on top.

Generated by:

    {command}

on: **{device}** ({seconds:.0f} s).{note}

"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=int, default=256, help="positions per column (default 256)")
    ap.add_argument("--markdown", metavar="PATH", help="write the full docs/accuracy.md to PATH")
    args = ap.parse_args(argv)
    device, device_desc = pick_device()
    print(f"device: {device_desc}", flush=True)
    body, seconds = tables(args.window, device)
    print(body)
    print(f"({seconds:.1f} s)")
    if args.markdown:
        note = ""
        if device == "cpu":
            note = ("\n\nThese numbers come from the CPU interpreter, where the kernel's float32 "
                    "cos/sin are numpy's; on a GPU they are short polynomials (float32 outputs) or "
                    "the special-function unit (16-bit outputs), so the kernel rows may differ in "
                    "the last digit. The "
                    "interpreter also stores float32 -> bf16 by truncation instead of "
                    "round-to-nearest (Triton 3.9's interpreter casts without a rounding mode), "
                    "which roughly doubles the `kernel (precise), bf16 q` row here; on a GPU the "
                    "store rounds to nearest. Re-run the command on a GPU to refresh this page.")
        command = "python bench/accuracy_table.py --markdown docs/accuracy.md"
        if args.window != 256:
            command += f" --window {args.window}"
        doc = DOC_HEAD.format(window=args.window, heads=HEADS, m_lo=(1 << 20) - args.window, m_hi=(1 << 20) - 1, command=command, device=device_desc,
                              seconds=seconds, note=note)
        with open(args.markdown, "w") as f:
            f.write(doc + body.rstrip() + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
