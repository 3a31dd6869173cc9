"""Render the benchmark's JSON as the tables of ``docs/performance.md``.

    python bench/report.py measurements/2026-11-25-da8c6b1-h100/bench_h100.json    # print the tables
    python bench/report.py measurements/2026-11-25-da8c6b1-h100/bench_h100.json --update docs/performance.md
    python bench/report.py measurements/2026-11-25-da8c6b1-h100/sweep_h100.json --plot docs/performance_gbps.png

With ``--update``, each table replaces the lines between ``<!-- table:NAME -->`` and
``<!-- /table -->`` in the page, so the prose around the tables stays hand-written and
the numbers come from one run. Needs no GPU.

Columns are device time in a CUDA graph (us): 20 calls per replay (training: 10). Ratios are to the row's floor, the rope bytes read and written once over the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Callable, Dict, List, Optional

LABELS = {
    "llama3-8b-prefill": "Llama-3-8B prefill, 16384 tok, 32/8 heads, d128",
    "gqa-64x8-8k": "GQA 64/8, 8192 tok, d128",
    "mla-8k-deepseek": "DeepSeek MLA 8192 tok, 128 heads, rope = last 64 of 192 (view), deepseek layout",
    "mla-8k-interleaved": "the same, interleaved layout",
    "mla-8k-neox": "the same, neox layout",
    "decode-1": "decode, 1 token (per call in a graph)",
    "decode-64": "decode, 64 tokens",
    "decode-256": "decode, 256 tokens",
    "qwen3-qknorm-prefill": "prefill, 16384 tok",
    "qwen3-qknorm-decode-1": "decode, 1 token",
    "qwen3-qknorm-decode-64": "decode, 64 tokens",
    "qwen3-qknorm-decode-256": "decode, 256 tokens",
    "qwen3.5-prefill": "Qwen3.5 (16/4, d256, rope 64, [11,11,10] interleaved), 16384 tok",
    "qwen3.5-decode-1": "Qwen3.5, decode 1",
    "qwen3.5-decode-64": "Qwen3.5, decode 64",
    "qwen3.5-decode-256": "Qwen3.5, decode 256",
    "qwen3-vl-8b-prefill": "Qwen3-VL-8B (32/8, d128, [24,20,20] interleaved), 16384 tok",
    "qwen3-vl-8b-decode-1": "Qwen3-VL-8B, decode 1",
    "qwen3-vl-8b-decode-64": "Qwen3-VL-8B, decode 64",
    "qwen3-vl-8b-decode-256": "Qwen3-VL-8B, decode 256",
    "qwen2-vl-sect-prefill": "sectioned [16,24,24] (Qwen2-VL style), 32/8 d128, 16384 tok",
    "qwen2-vl-sect-decode-64": "sectioned, decode 64",
}


def _num(x: Optional[float], nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def device_us(row: dict, method: str) -> Optional[float]:
    """A method's device time in a CUDA graph: ``*_graph_us`` for the rope and training
    rows (whose ``*_us`` is eager ``do_bench``), ``*_us`` for the rows timed only in graphs
    (decode, QK-norm, M-RoPE)."""
    if f"{method}_graph_us" in row:
        return row[f"{method}_graph_us"]
    if row["kind"] in ("prefill", "mla", "train"):
        return None  # only an eager figure: not comparable with the device-time columns
    return row.get(f"{method}_us")


def _with_table(row: dict, method: str) -> Optional[float]:
    t = device_us(row, method)
    return None if t is None else t + row["table_us"] / row["layers"]


def _digits(row: dict) -> int:
    return 2 if row["tokens"] <= 256 else 1


def _ratio(row: dict, t: Optional[float]) -> str:
    if t is None or row["tokens"] <= 256:  # decode: the floor is below a launch
        return "-"
    return f"{t / row['floor_us']:.3f}"


def _floor(row: dict) -> str:
    return "-" if row["floor_us"] < 0.1 else _num(row["floor_us"], _digits(row) if row["floor_us"] < 10 else 1)


def _table(header: List[str], lines: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _bold(s: str) -> str:
    return s if s == "-" else f"**{s}**"


def _device_cells(r: dict) -> List[str]:
    """Label, floor, ours, ours / floor, Liger, torch.compile, transformers eager: the
    device-time columns every kernel table shares."""
    nd = _digits(r)
    ours = device_us(r, "ours")
    return [LABELS.get(r["shape"], r["shape"]), _floor(r), _bold(_num(ours, nd)), _ratio(r, ours),
            _num(device_us(r, "liger"), nd), _num(device_us(r, "torch_compile"), nd), _num(device_us(r, "torch"), nd)]


def kernel_table(rows: List[dict]) -> str:
    lines = [_device_cells(r) for r in rows if r["kind"] in ("prefill", "mla", "decode")]
    return _table(["shape", "floor", "**ours**", "ours / floor", "Liger", "torch.compile", "transformers eager"],
                  lines)


def eager_table(rows: List[dict]) -> str:
    lines = []
    for r in rows:
        if r["kind"] not in ("prefill", "mla"):
            continue
        ours = r.get("ours_us")
        lines.append([LABELS.get(r["shape"], r["shape"]), _floor(r), _bold(_num(ours)), _ratio(r, ours),
                      _num(r.get("liger_us")), _num(r.get("torch_compile_us")), _num(r.get("ours_fp32_angles_us"))])
    return _table(["shape (eager `do_bench`)", "floor", "**ours**", "ours / floor", "Liger", "torch.compile",
                   "ours, float32 angles"], lines)


def table_table(rows: List[dict]) -> str:
    lines = []
    for r in rows:
        if r["kind"] not in ("prefill", "mla", "decode"):
            continue
        nd = _digits(r)
        lines.append([LABELS.get(r["shape"], r["shape"]).split(",")[0] if r["kind"] == "prefill"
                      else LABELS.get(r["shape"], r["shape"]),
                      _bold(_num(device_us(r, "ours"), nd)), _num(_with_table(r, "liger"), nd),
                      _num(_with_table(r, "torch_compile"), nd), _num(_with_table(r, "torch"), nd),
                      f"{r['table_us']:.1f} / {r['layers']}"])
    return _table(["shape", "**ours**", "Liger + table", "torch.compile + table", "eager + table",
                   "table, once per forward / layers"], lines)


def train_table(rows: List[dict]) -> str:
    lines = []
    for r in rows:
        if r["kind"] != "train":
            continue
        ours = device_us(r, "ours")
        lines.append(["16384 tok, 32/8 heads, d128: graph", _floor(r), _bold(_num(ours)), _ratio(r, ours),
                      _num(device_us(r, "liger")), _num(r.get("liger_kernels_us")), _num(device_us(r, "torch"))])
        lines.append(["the same, eager `do_bench`", _floor(r), _bold(_num(r.get("ours_us"))), _ratio(r, r.get("ours_us")),
                      _num(r.get("liger_us")), "-", _num(r.get("torch_us"))])
    return _table(["forward + backward", "floor", "**ours**", "ours / floor", "Liger", "Liger's kernels alone",
                   "transformers eager"], lines)


def qknorm_table(rows: List[dict]) -> str:
    lines = [_device_cells(r) for r in rows if r["kind"] == "qknorm"]
    return _table(["shape", "floor", "**ours (fused)**", "ours / floor", "Liger RMSNorm + rope", "torch.compile",
                   "transformers eager"], lines)


def mrope_table(rows: List[dict]) -> str:
    lines = [_device_cells(r) + [_num(r["table_us"])] for r in rows if r["kind"].startswith("mrope")]
    return _table(["model, shape", "floor", "**ours**", "ours / floor", "Liger", "torch.compile",
                   "transformers eager", "table, once per forward"], lines)


def host_table(host: Dict[str, float]) -> str:
    ref = host.get("trivial torch op (q.add_(0))")
    lines = []
    for name, us in host.items():
        in_graph = name.startswith("device us")
        ratio = "-" if in_graph or not ref else f"{us / ref:.2f}"
        lines.append([name, f"{us:.2f}", ratio])
    return _table(["call (eager wall time per call, median of 5 interleaved rounds)", "us", "x `q.add_(0)`"], lines)


TABLES: Dict[str, Callable[[dict], str]] = {
    "meta": lambda d: (f"{d['meta']['device']}, torch {d['meta']['torch']}, triton {d['meta']['triton']}, "
                       f"{d['meta']['dtype']}; copy bandwidth {d['meta']['copy_tbps']:.2f} TB/s; an empty Triton "
                       f"kernel replayed in a graph {d['meta']['empty_kernel_us']:.2f} us."),
    "kernel": lambda d: kernel_table(d["rows"]),
    "eager": lambda d: eager_table(d["rows"]),
    "with-table": lambda d: table_table(d["rows"]),
    "train": lambda d: train_table(d["rows"]),
    "qknorm": lambda d: qknorm_table(d["rows"]),
    "mrope": lambda d: mrope_table(d["rows"]),
    "host": lambda d: host_table(d.get("host_us", {})),
}


def plot_sweep(sweep: List[dict], meta: dict, path: str) -> bool:
    """GB/s of the rope bytes against tokens, two panels: eager (``do_bench``, each call's
    host cost included where it exceeds the GPU time) and device time in a CUDA graph.
    False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    toks = [r["tokens"] for r in sweep]
    methods = (("ours", "yarn-triton"), ("liger", "Liger (given cos/sin)"), ("torch_compile", "torch.compile"),
               ("torch", "transformers eager"))
    for ax, suffix, title in ((axes[0], "_us", "eager (host cost included)"),
                              (axes[1], "_graph_us", "device time (CUDA graph)")):
        for m, label in methods:
            if all(f"{m}{suffix}" in r for r in sweep):
                gbps = [r["floor_us"] * meta["copy_tbps"] * 1e3 / r[f"{m}{suffix}"] for r in sweep]
                ax.plot(toks, gbps, "o-" if m == "ours" else "o--", label=label)
        ax.axhline(meta["copy_tbps"] * 1e3, color="gray", ls=":", label="d2d copy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens (32 q / 8 kv heads, d128)")
        ax.set_title(title)
    axes[0].set_ylabel("GB/s (rope bytes / time)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{meta['device']}, {meta['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def update(page: str, data: dict) -> str:
    """``page`` with every ``<!-- table:NAME -->`` ... ``<!-- /table -->`` block re-rendered."""
    def render(m: "re.Match") -> str:
        name = m.group(1)
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r} in the page; known: {sorted(TABLES)}")
        return f"<!-- table:{name} -->\n{TABLES[name](data)}\n<!-- /table -->"
    return re.sub(r"<!-- table:([\w-]+) -->\n.*?<!-- /table -->", render, page, flags=re.S)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="the benchmark's --out file")
    ap.add_argument("--update", default="", help="a markdown page whose marked tables are rewritten in place")
    ap.add_argument("--plot", default="", help="redraw the GB/s plot of the JSON's sweep into this PNG")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    if args.plot:
        if not data.get("sweep"):
            raise SystemExit(f"{args.json} has no sweep to plot")
        if not plot_sweep(data["sweep"], data["meta"], args.plot):
            raise SystemExit("matplotlib is not installed")
        if not args.update:
            return 0
    if args.update:
        with open(args.update) as f:
            page = f.read()
        with open(args.update, "w") as f:
            f.write(update(page, data))
        return 0
    for name, fn in TABLES.items():
        print(f"## {name}\n\n{fn(data)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
