"""Loss curves of torchtitan training with and without the yarn-triton switch.

Trains torchtitan's llama3 and deepseek_v3 ``debugmodel`` flavors (one GPU; torchtitan's
single-device autocast, in ``--precision``) for ``--steps`` steps from one seed checkpoint per
model, once with torchtitan's own rope and once with
``--experimental.custom_import yarn_triton.integrations.torchtitan``, eager and with
``--compile.enable``, and compares the losses step by step (``|a - b| <= --tol``). The
tokenizer and the dataset are generated here, from a fixed seed, and read from local
paths (nothing is downloaded)::

    python bench/torchtitan_train.py compare [--work DIR] [--models llama3,deepseek_v3]
                                             [--modes eager,compile] [--steps 30] [--tol 1e-3]
                                             [--seq-len 2048] [--batch 8] [--out DIR]
                                             [--precision float32|bfloat16]
    python bench/torchtitan_train.py assets DIR    # only write the tokenizer and dataset
    python bench/torchtitan_train.py check [--work DIR]   # CPU: assets through torchtitan's
                                                           # loaders, every run's arguments parsed

``bench/torchtitan_train.sh`` runs ``compare`` on the device machine (wheels, environment).

How torchtitan 0.2.2 takes local data. Its debug configs point at ``tests/assets/tokenizer``
and the ``c4_test`` dataset at ``tests/assets/c4_test``, files of the torchtitan repository
that the wheel does not ship. Both are plain paths:

* tokenizer: ``--model.hf_assets_path DIR`` with ``DIR/tokenizer.json`` (a ``tokenizers``
  file) and ``DIR/tokenizer_config.json`` naming ``bos_token``/``eos_token``
  (``torchtitan.components.tokenizer.HuggingFaceTokenizer``); the ids must stay below the
  flavor's ``vocab_size`` (2048 for the debug models);
* dataset: ``--training.dataset c4_test --training.dataset_path DIR``: ``c4_test`` is
  loaded as ``datasets.load_dataset(DIR, split="train")``, so a folder holding
  ``train.jsonl`` of ``{"text": ...}`` lines does (``datasets``' packaged json builder;
  offline). The loader re-loops the data, so a small file lasts any number of steps
  (3000 generated documents, ~1M tokens: 30 steps of 8 x 2048 read it about once).

Precision. The check runs in float32 by default: there the two ropes differ by float32
rounding and the curves stay together (a CPU smoke run of deepseek_v3, 30 steps of 2 x 64
tokens: |diff| <= 4e-6). Under bfloat16 autocast a rounding difference of one bf16 ulp in
q or k is enough to flip an MoE routing decision somewhere, and deepseek_v3's curves then
part after some steps (the same CPU run: <= 9e-4 for 15 steps, then up to 0.7), as they
would for any change of rounding; ``--precision bfloat16`` shows it.

Step 1 of every run with the switch is verified: each eager rope call also runs
torchtitan's own rotate function on the same inputs and compares
(``yarn_triton.integrations.torchtitan.verify``: the positions the kernel derives and the
rotation), and the report (calls checked, largest relative error) goes into the JSON. The
compiled runs' rope calls run inside compiled blocks, where nothing can be checked by
Python: their report shows no calls, and their loss curve is the check.

deepseek_v3's YaRN only runs when ``max_seq_len`` (set to ``--training.seq_len``) exceeds
``original_seq_len`` (4096 in the flavor). ``--ds-original-seq-len`` (default 512, 0 to keep
4096) lowers it in every deepseek_v3 run alike, so that YaRN (factor 40, mscale 0.7) and its
softmax-scale change are what trains.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SWITCH = "yarn_triton.integrations.torchtitan"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


# --------------------------------------------------------------------------------------
# Assets: a tokenizer and a dataset, generated from a fixed seed
# --------------------------------------------------------------------------------------
def _corpus(n_docs: int = 3000, seed: int = 0) -> list:
    """Documents of a small synthetic language: a few hundred made-up words, drawn with
    Zipf-like frequencies and a fixed word-to-word bias, so there is something to learn."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "gu", "fe", "zo", "ba", "xi", "qu"]
    words = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(700)})
    weights = [1.0 / (i + 1) for i in range(len(words))]
    follow = {w: rng.choices(words, weights, k=4) for w in words}
    docs = []
    for _ in range(n_docs):
        out, w = [], rng.choices(words, weights)[0]
        for i in range(rng.randint(60, 400)):
            out.append(w)
            if i % rng.randint(6, 14) == 0:
                out[-1] += "."
            w = rng.choice(follow[w]) if rng.random() < 0.7 else rng.choices(words, weights)[0]
        docs.append(" ".join(out).capitalize())
    return docs


def make_assets(work: str) -> tuple:
    """``(tokenizer_dir, dataset_dir)`` under ``work``, written unless already there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok_dir, data_dir = os.path.join(work, "tokenizer"), os.path.join(work, "dataset")
    if os.path.exists(os.path.join(tok_dir, "tokenizer_config.json")) and os.path.exists(
            os.path.join(data_dir, "train.jsonl")):
        return tok_dir, data_dir
    os.makedirs(tok_dir, exist_ok=True)
    os.makedirs(data_dir, exist_ok=True)
    docs = _corpus()
    with open(os.path.join(data_dir, "train.jsonl"), "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    assert tok.get_vocab_size() <= 2048, tok.get_vocab_size()
    tok.save(os.path.join(tok_dir, "tokenizer.json"))
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "add_bos_token": False, "add_eos_token": False}, f)
    return tok_dir, data_dir


# --------------------------------------------------------------------------------------
# One training run (inside torchrun)
# --------------------------------------------------------------------------------------
def _lower_ds_original_seq_len(n: int) -> None:
    if n > 0:
        import torchtitan.models.deepseek_v3 as ds

        for args in ds.deepseekv3_args.values():
            args.original_seq_len = n


def train(argv: list, losses_file: str, ds_original_seq_len: int) -> None:
    """torchtitan.train.main, recording every logged step's loss and grad norm."""
    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.tools.logging import init_logger
    from torchtitan.train import Trainer

    init_logger()
    _lower_ds_original_seq_len(ds_original_seq_len)
    config = ConfigManager().parse_args(argv)
    record = {"argv": argv, "losses": [], "switched": False, "rope": None, "verified": None}

    class RecordingTrainer(Trainer):
        def __init__(self, job_config):
            super().__init__(job_config)
            log = self.metrics_processor.log

            def recording_log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=None):
                record["losses"].append([step, float(global_avg_loss), float(grad_norm)])
                sw = sys.modules.get(SWITCH)  # (imported by the trainer: --experimental.custom_import)
                if step == 1 and sw is not None and sw.is_enabled():
                    # step 1's rope calls, each checked against torchtitan's own (eager ones)
                    record["verified"] = sw.verify(False)
                return log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics=extra_metrics)

            self.metrics_processor.log = recording_log

    trainer = RecordingTrainer(config)
    switch = sys.modules.get(SWITCH)
    if switch is not None and switch.is_enabled():
        switch.verify(True)
        model = trainer.model_parts[0]
        table = model.freqs_cis if hasattr(model, "freqs_cis") else model.rope_cache
        params = switch.params_for(config.model.name, table)
        record["switched"] = params is not None
        record["rope"] = repr(params)
    try:
        if config.checkpoint.create_seed_checkpoint:
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            trainer.train()
    finally:
        trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    with open(losses_file, "w") as f:
        json.dump(record, f)


# --------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------
def _common_args(model: str, tok_dir: str, data_dir: str, steps: int, seed: int, seq_len: int = 2048,
                 batch: int = 8, precision: str = "bfloat16") -> list:
    return [
        "--model.name", model, "--model.flavor", "debugmodel", "--model.hf_assets_path", tok_dir,
        "--training.dataset", "c4_test", "--training.dataset_path", data_dir,
        "--training.steps", str(steps), "--training.local_batch_size", str(batch), "--training.seq_len", str(seq_len),
        "--training.mixed_precision_param", precision,  # the autocast dtype on one device
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
        "--debug.seed", str(seed), "--debug.deterministic", "--debug.deterministic_warn_only",
    ]


def _run_args(work: str, model: str, run: str, common: list, seed_ckpt: str, mode: str, ours: bool) -> list:
    args = common + ["--job.dump_folder", os.path.join(work, model, run),
                     "--checkpoint.enable", "--checkpoint.initial_load_path", seed_ckpt,
                     "--checkpoint.interval", "100000"]
    if mode == "compile":
        args += ["--compile.enable"]
    if ours:
        args += ["--experimental.custom_import", SWITCH]
    return args


def _seed_args(work: str, model: str, common: list) -> list:
    return common + ["--job.dump_folder", os.path.join(work, model, "seed"), "--checkpoint.enable",
                     "--checkpoint.create_seed_checkpoint", "--parallelism.data_parallel_shard_degree", "1"]


def _torchrun(args: list, losses_file: str, ds_len: int, log) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           os.path.abspath(__file__), "train", "--losses", losses_file, "--ds-original-seq-len", str(ds_len), "--",
           *args]
    log(f"$ {' '.join(cmd)}")
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log(proc.stdout[-6000:] if proc.returncode else proc.stdout[-1500:])
    log(f"  -> rc {proc.returncode} in {time.time() - t0:.0f} s")
    if proc.returncode:
        raise SystemExit(f"run failed: {' '.join(args)}")
    with open(losses_file) as f:
        return json.load(f)


def compare(work: str, models: list, modes: list, steps: int, tol: float, seed: int, ds_len: int,
            out: str | None, seq_len: int = 2048, batch: int = 8, precision: str = "bfloat16") -> int:
    os.makedirs(work, exist_ok=True)
    os.makedirs(out or work, exist_ok=True)
    logf = open(os.path.join(out or work, "torchtitan_train.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    tok_dir, data_dir = make_assets(work)
    summary, failed = {"steps": steps, "tol": tol, "seq_len": seq_len, "batch": batch, "precision": precision,
                       "ds_original_seq_len": ds_len, "runs": {}}, False
    for model in models:
        common = _common_args(model, tok_dir, data_dir, steps, seed, seq_len, batch, precision)
        seed_ckpt = os.path.join(work, model, "seed", "checkpoint", "step-0")
        if not os.path.isdir(seed_ckpt):
            _torchrun(_seed_args(work, model, common), os.path.join(work, f"{model}-seed.json"), ds_len, log)
        for mode in modes:
            curves = {}
            for variant, ours in (("torchtitan", False), ("yarn_triton", True)):
                run = f"{mode}-{variant}"
                # a checkpoint folder left by an earlier run would be resumed from
                shutil.rmtree(os.path.join(work, model, run), ignore_errors=True)
                rec = _torchrun(_run_args(work, model, run, common, seed_ckpt, mode, ours),
                                os.path.join(work, f"{model}-{run}.json"), ds_len, log)
                if rec["switched"] != ours:
                    log(f"!! {model} {run}: switched={rec['switched']} (expected {ours})")
                    failed = True
                if ours:
                    v = rec["verified"] or {}
                    log(f"   {model} {run}: step 1's rope calls checked against torchtitan's: {v}")
                    if mode == "eager" and not v.get("calls"):
                        log(f"!! {model} {run}: no rope call was checked on step 1")
                        failed = True
                curves[variant] = rec
                summary["runs"][f"{model}/{run}"] = rec
            a = {s: l for s, l, _ in curves["torchtitan"]["losses"]}
            b = {s: l for s, l, _ in curves["yarn_triton"]["losses"]}
            if sorted(a) != sorted(b) or len(a) < steps:
                log(f"!! {model} {mode}: logged steps differ or are missing ({len(a)} vs {len(b)} of {steps})")
                failed = True
            diffs = [abs(a[s] - b[s]) for s in sorted(set(a) & set(b))]
            worst = max(diffs) if diffs else float("inf")
            ok = worst <= tol
            failed |= not ok
            log(f"== {model} {mode}: rope {curves['yarn_triton']['rope']}")
            log("   step  torchtitan  yarn_triton  |diff|")
            for s in sorted(set(a) & set(b)):
                log(f"   {s:4d}  {a[s]:10.5f}  {b[s]:11.5f}  {abs(a[s] - b[s]):.2e}")
            log(f"== {model} {mode}: max |loss diff| {worst:.2e} over {len(diffs)} steps -> {'OK' if ok else 'FAIL'}"
                f" (tol {tol:g}; loss {a.get(1, float('nan')):.4f} -> {a.get(steps, float('nan')):.4f})")
            summary[f"{model}/{mode}/max_abs_diff"] = worst
    summary["ok"] = not failed
    name = f"torchtitan_train_{'_'.join(models)}_{'_'.join(modes)}_{precision}.json"
    with open(os.path.join(out or work, name), "w") as f:
        json.dump(summary, f, indent=1)
    log("ALL OK" if not failed else "SOME FAILED")
    return 1 if failed else 0


def check(work: str, models: list, steps: int, seed: int, ds_len: int) -> None:
    """What can be checked without a GPU: the assets load through torchtitan's own
    tokenizer and dataset classes, and every run's arguments parse."""
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.config import ConfigManager
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    tok_dir, data_dir = make_assets(work)
    tok = HuggingFaceTokenizer(tok_dir)
    assert tok.bos_id is not None and tok.eos_id is not None and tok.get_vocab_size() <= 2048
    ds = HuggingFaceTextDataset("c4_test", data_dir, tok, seq_len=2048, infinite=True)
    it = iter(ds)
    n = 0
    for _ in range(8 * steps):
        inp, label = next(it)
        assert inp["input"].shape == (2048,) and int(inp["input"].max()) < 2048
        n += 1
    print(f"tokenizer: {tok.get_vocab_size()} tokens (bos {tok.bos_id}, eos {tok.eos_id}); dataset: {n} samples "
          f"of 2048 drawn ({steps} steps of batch 8), e.g. {tok.decode(inp['input'][:24].tolist())!r}")
    _lower_ds_original_seq_len(ds_len)
    for model in models:
        common = _common_args(model, tok_dir, data_dir, steps, seed)
        seed_ckpt = os.path.join(work, model, "seed", "checkpoint", "step-0")
        for args in [_seed_args(work, model, common)] + [
                _run_args(work, model, f"{m}-{v}", common, seed_ckpt, m, v == "y")
                for m in ("eager", "compile") for v in ("t", "y")]:
            cfg = ConfigManager().parse_args(args)
            assert cfg.model.name == model and cfg.training.dataset_path == data_dir
        print(f"{model}: the 5 runs' arguments parse")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("assets")
    a.add_argument("dir")
    for name in ("compare", "check"):
        c = sub.add_parser(name)
        c.add_argument("--work", default="/tmp/torchtitan_train")
        c.add_argument("--models", default="llama3,deepseek_v3")
        c.add_argument("--steps", type=int, default=30)
        c.add_argument("--seed", type=int, default=42)
        c.add_argument("--ds-original-seq-len", type=int, default=512)
        c.add_argument("--seq-len", type=int, default=2048)
        c.add_argument("--batch", type=int, default=8)
        c.add_argument("--precision", default="float32", choices=("bfloat16", "float32"))
        if name == "compare":
            c.add_argument("--modes", default="eager,compile")
            c.add_argument("--tol", type=float, default=1e-3)
            c.add_argument("--out", default=os.environ.get("OUT"))
    t = sub.add_parser("train")
    t.add_argument("--losses", required=True)
    t.add_argument("--ds-original-seq-len", type=int, default=0)
    t.add_argument("rest", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.cmd == "assets":
        print(make_assets(args.dir))
        return 0
    if args.cmd == "train":
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        train(rest, args.losses, args.ds_original_seq_len)
        return 0
    models = args.models.split(",")
    if args.cmd == "check":
        check(args.work, models, args.steps, args.seed, args.ds_original_seq_len)
        return 0
    return compare(args.work, models, args.modes.split(","), args.steps, args.tol, args.seed,
                   args.ds_original_seq_len, args.out, args.seq_len, args.batch, args.precision)


if __name__ == "__main__":
    sys.exit(main())
