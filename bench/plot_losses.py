"""Plot the loss curves that ``bench/torchtitan_train.py compare`` wrote.

    python bench/plot_losses.py OUT/llama3/torchtitan_train_*.json OUT/deepseek_v3/torchtitan_train_*.json \
        --png docs/distributed_loss.png

The inputs may also be compare's logs (``torchtitan_train.log``): the per-step tables it
prints for each model and mode (what survives a run that failed before its summary).

One column per model: the top panel has the loss per step of every run (torchtitan's own rope
and ours, eager and compiled), the bottom panel ``|ours - torchtitan|`` per step and mode on a
log axis, with the tolerance the comparison used. The numbers come only from those files.
"""

from __future__ import annotations

import argparse
import json
import re


def _curves(summaries: list) -> dict:
    """{model: {run: [(step, loss), ...]}} from compare's summary files."""
    out: dict = {}
    for s in summaries:
        for key, rec in s["runs"].items():
            model, run = key.split("/", 1)
            out.setdefault(model, {})[run] = [(int(st), float(loss)) for st, loss, _ in rec["losses"]]
    return out


def _from_log(path: str) -> dict:
    """A summary-like dict of the step tables in one of compare's logs."""
    with open(path) as f:
        text = f.read()
    runs, diffs, cur = {}, {}, None
    for line in text.splitlines():
        m = re.match(r"== (\S+) (\S+): rope ", line)
        if m:
            cur = m.groups()
            continue
        m = re.match(r"\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)$", line)
        if cur and m:
            step, theirs, ours = int(m[1]), float(m[2]), float(m[3])
            # the log's losses have 5 decimals; its |diff| column is exact
            diffs.setdefault(f"{cur[0]}/{cur[1]}", {})[step] = float(m[4])
            for variant, loss in (("torchtitan", theirs), ("yarn_triton", ours)):
                runs.setdefault(f"{cur[0]}/{cur[1]}-{variant}", {"losses": []})["losses"].append([step, loss, 0.0])
        elif line.startswith("== "):
            cur = None
    tol = re.search(r"\(tol ([0-9.e+-]+);", text)
    prec = re.search(r"--training\.mixed_precision_param (\S+)", text)
    seq = re.search(r"--training\.seq_len (\d+)", text)
    batch = re.search(r"--training\.local_batch_size (\d+)", text)
    return {"runs": runs, "diffs": diffs, "tol": float(tol[1]) if tol else 1e-3,
            "precision": prec[1] if prec else "?", "seq_len": int(seq[1]) if seq else 0,
            "batch": int(batch[1]) if batch else 0}


def plot(summaries: list, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _curves(summaries)
    exact = {k: v for s in summaries for k, v in s.get("diffs", {}).items()}
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
            d = exact.get(f"{model}/{mode}") or {s: abs(a[s] - b[s]) for s in steps}
            # a zero difference cannot sit on a log axis: it is drawn at the axis floor
            diff = [max(d[s], 1e-9) for s in steps]
            bottom.semilogy(steps, diff, marker=".", label=mode)
        bottom.axhline(tol, color="k", lw=0.8, ls=":", label=f"tolerance {tol:g}")
        top.set_title(model)
        top.set_ylabel("loss")
        top.legend(fontsize=8)
        bottom.set_ylabel("|loss diff| (0 at 1e-9)")
        bottom.set_xlabel("step")
        bottom.legend(fontsize=8)
    meta = summaries[0]
    fig.suptitle(f"torchtitan debug models, {meta['precision']}, {meta['batch']} x {meta['seq_len']} tokens per step")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+", help="JSON files written by torchtitan_train.py compare, or its logs")
    ap.add_argument("--png", required=True, help="the image to write")
    args = ap.parse_args(argv)
    summaries = []
    for path in args.summaries:
        if path.endswith(".json"):
            with open(path) as f:
                summaries.append(json.load(f))
        else:
            summaries.append(_from_log(path))
    plot(summaries, args.png)
    print("wrote", args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
