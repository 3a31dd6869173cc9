"""Plot the loss curves that ``bench/torchtitan_train.py compare`` wrote.

    python bench/plot_losses.py OUT/llama3/torchtitan_train_*.json OUT/deepseek_v3/torchtitan_train_*.json \
        --png docs/distributed_loss.png

One column per model: the top panel has the loss per step of every run (torchtitan's own rope
and ours, eager and compiled), the bottom panel ``|ours - torchtitan|`` per step and mode on a
log axis, with the tolerance the comparison used. The numbers come only from the JSON files.
"""

from __future__ import annotations

import argparse
import json


def _curves(summaries: list) -> dict:
    """{model: {run: [(step, loss), ...]}} from compare's summary files."""
    out: dict = {}
    for s in summaries:
        for key, rec in s["runs"].items():
            model, run = key.split("/", 1)
            out.setdefault(model, {})[run] = [(int(st), float(loss)) for st, loss, _ in rec["losses"]]
    return out


def plot(summaries: list, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(summaries)
    tol = max(s["tol"] for s in summaries)
    fig, axes = plt.subplots(2, len(curves), figsize=(5.5 * len(curves), 6), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]}, sharex="col")
    styles = {"torchtitan": dict(lw=2.5, alpha=0.45), "yarn_triton": dict(lw=1.0, ls="--")}
    for col, (model, runs) in enumerate(sorted(curves.items())):
        top, bottom = axes[0][col], axes[1][col]
        for run, pts in sorted(runs.items()):
            mode, variant = run.split("-", 1)
            top.plot(*zip(*pts), label=f"{variant} ({mode})", **styles.get(variant, {}))
        for mode in sorted({r.split("-", 1)[0] for r in runs}):
            a, b = dict(runs.get(f"{mode}-torchtitan", [])), dict(runs.get(f"{mode}-yarn_triton", []))
            steps = sorted(set(a) & set(b))
            # a zero difference cannot sit on a log axis: it is drawn at the axis floor
            diff = [max(abs(a[s] - b[s]), 1e-9) for s in steps]
            bottom.semilogy(steps, diff, marker=".", label=mode)
        bottom.axhline(tol, color="k", lw=0.8, ls=":", label=f"tolerance {tol:g}")
        top.set_title(model)
        top.set_ylabel("loss")
        top.legend(fontsize=8)
        bottom.set_ylabel("|loss diff|")
        bottom.set_xlabel("step")
        bottom.legend(fontsize=8)
    meta = summaries[0]
    fig.suptitle(f"torchtitan debug models, {meta['precision']}, {meta['batch']} x {meta['seq_len']} tokens per step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+", help="JSON files written by torchtitan_train.py compare")
    ap.add_argument("--png", required=True, help="the image to write")
    args = ap.parse_args(argv)
    summaries = []
    for path in args.summaries:
        with open(path) as f:
            summaries.append(json.load(f))
    plot(summaries, args.png)
    print("wrote", args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
