"""Fine-tuning's end-of-run outputs: the best weights back in the engine, test predictions
(predictions.tsv), eval_results.json and final/ (the Hugging Face export)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from bertlaunch.core.checkpoint import DS_TAG, step_dir
from bertlaunch.core.export import export
from bertlaunch.core.layout import RunDir
from bertlaunch.core.task import Ending


def finish_finetune(task, end: Ending) -> None:
    """Best weights back in the engine, test predictions (collective), then rank 0 alone writes
    eval_results.json and final/; no collective follows, so the other ranks do not wait on the export."""
    cfg, state, engine = task.cfg, end.state, end.engine
    out = RunDir(cfg.output_dir)
    source = step_dir(end.checkpoints, state.step)
    if cfg.eval.save_best and state.best_step is not None and state.best_step != state.step:
        source = step_dir(end.checkpoints, state.best_step)
        path, _ = engine.load_checkpoint(str(source / "ds"), tag=DS_TAG, load_module_only=True,
                                         load_optimizer_states=False, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"could not load the best checkpoint {source}")
    results = {"best_step": state.best_step, "metric": task.metric, "best": state.best_result,
               "final_step": state.step, "labels": task.d.labels.names, "train_examples": len(task.d.train)}
    tables = ({"": task.d.test} if task.d.test is not None else {}) | task.d.extra_test
    for name, table in tables.items():
        engine.eval()
        with torch.no_grad():
            logits = task.predict(engine, table.enc)
        if table.has_labels:
            results["test" + (f"_{name}" if name else "")] = task.scores(logits, table.enc.labels, "test")
        if task.info.is_main:
            write_predictions(out.predictions(name), logits, table, task)
    if task.info.is_main:
        out.eval_results.write_text(json.dumps(results, indent=1))
        if source.is_dir():
            export(source, out.final)
            end.log(f"final model (step {source.name}): {out.final}")


def write_predictions(path: Path, logits: np.ndarray, table, task) -> None:
    """index (the row's position in the table), prediction, the gold label when known, class probabilities."""
    names, gold, labelled = task.d.labels.names, table.enc.labels, table.has_labels
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        if task.regression:
            w.writerow(["index", "prediction"] + (["label"] if labelled else []))
            for i, row in enumerate(logits):
                w.writerow([i, f"{row[0]:.6g}"] + ([f"{gold[i]:.6g}"] if labelled else []))
            return
        z = np.exp(logits - logits.max(1, keepdims=True))
        probs = z / z.sum(1, keepdims=True)
        w.writerow(["index", "prediction"] + (["label"] if labelled else []) + [f"prob_{n}" for n in names])
        for i, p in enumerate(probs):
            gold_col = [names[int(gold[i])]] if labelled else []
            w.writerow([i, names[int(p.argmax())]] + gold_col + [f"{x:.6f}" for x in p])
