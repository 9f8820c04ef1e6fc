"""Fine-tuning data loading and end-of-run outputs (best model, predictions, eval_results.json, final/)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch import dist
from launch.checkpoint import DS_TAG, step_dir


@dataclass
class TaskData:
    tokenizer: object
    pad_id: int
    labels: object  # data.tasks.LabelSpace
    train: object  # data.pairs.Encoded
    eval: object | None
    test: object | None
    test_rows: object | None  # data.tasks.Rows (for predictions.tsv)
    test_has_labels: bool
    train_path: str


def _hub_rows(cfg, split: str):
    from data.tasks import Rows

    try:
        from datasets import load_dataset

        ds = load_dataset(cfg.task.dataset, cfg.task.dataset_config, split=split)
    except Exception as e:
        raise FileNotFoundError(f"task.dataset={cfg.task.dataset}: could not load split '{split}' ({e}); "
                                "without hub access use local files (task.train_file ...)") from None
    rows = [dict(r) for r in ds]
    return Rows(f"{cfg.task.dataset}:{split}", list(ds.column_names), rows, list(range(1, len(rows) + 1)))


def load_task_data(cfg) -> TaskData:
    from data.pairs import encode_pairs
    from data.tasks import infer_labels, read_rows, require_columns, texts
    from data.tokenize import load_hf_tokenizer
    from model.build import resolve_model_dir

    t = cfg.task
    tokenizer = load_hf_tokenizer(cfg.tokenizer or resolve_model_dir(cfg.model.pretrained))

    def rows(file, split):
        if file:
            return read_rows(file, t.format)
        return _hub_rows(cfg, split) if (t.dataset and split) else None

    train = rows(t.train_file, t.train_split)
    columns = {"task.text_a": t.text_a, "task.label": t.label} | ({"task.text_b": t.text_b} if t.text_b else {})
    require_columns(train, columns)
    labels = infer_labels(train, t.label, t.problem, t.labels)

    def encode(table, need_labels: bool):
        if need_labels:
            require_columns(table, columns)
        else:
            require_columns(table, {k: v for k, v in columns.items() if k != "task.label"})
        a, b = texts(table, t.text_a, t.text_b)
        has = t.label in table.columns
        y = [labels.encode(r[t.label], table, i, t.label) for i, r in enumerate(table.rows)] if has else \
            [np.nan] * len(table.rows)
        return encode_pairs(tokenizer, a, b, y, t.max_length), has

    train_enc, _ = encode(train, True)
    eval_rows = rows(t.eval_file, t.eval_split)
    eval_enc = encode(eval_rows, True)[0] if eval_rows is not None else None
    test_rows = rows(t.test_file, t.test_split)
    test_enc, test_has = encode(test_rows, False) if test_rows is not None else (None, False)
    return TaskData(tokenizer, tokenizer.pad_token_id, labels, train_enc, eval_enc, test_enc, test_rows, test_has,
                    train.path)


def meta_writer_for(hf_config, tokenizer):
    def write(path: Path) -> None:
        hf_config.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (path / "task.json").write_text(json.dumps({"kind": "classification"}))
    return write


def finish_finetune(task, trainer) -> None:
    """Best weights back in the engine, test predictions, eval_results.json and final/ (rank 0 writes)."""
    cfg, state, engine = task.cfg, trainer.state, trainer.engine
    out = Path(cfg.output_dir)
    source = step_dir(trainer.saver.root, state.step)
    if cfg.eval.save_best and state.best_step is not None and state.best_step != state.step:
        source = step_dir(trainer.saver.root, state.best_step)
        path, _ = engine.load_checkpoint(str(source / "ds"), tag=DS_TAG, load_module_only=True,
                                         load_optimizer_states=False, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"could not load the best checkpoint {source}")
    results = {"best_step": state.best_step, "metric": task.metric, "best": state.best_result,
               "final_step": state.step, "labels": task.d.labels.names, "train_examples": len(task.d.train)}
    if task.d.test is not None:
        engine.eval()
        import torch

        with torch.no_grad():
            logits = task.predict(engine, task.d.test)
        if task.d.test_has_labels:
            results["test"] = task.scores(logits, task.d.test.labels, "test")
        if trainer.info.is_main:
            write_predictions(out / "predictions.tsv", logits, task)
    if trainer.info.is_main:
        (out / "eval_results.json").write_text(json.dumps(results, indent=1))
        if source.is_dir():
            from launch.export import export

            export(source, out / "final")
            trainer.metrics.info(f"final model (step {source.name}): {out / 'final'}")
    dist.barrier()


def write_predictions(path: Path, logits: np.ndarray, task) -> None:
    names = task.d.labels.names
    gold = task.d.test.labels
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        if task.regression:
            w.writerow(["index", "prediction"] + (["label"] if task.d.test_has_labels else []))
            for i, row in enumerate(logits):
                w.writerow([i, f"{row[0]:.6g}"] + ([f"{gold[i]:.6g}"] if task.d.test_has_labels else []))
            return
        z = np.exp(logits - logits.max(1, keepdims=True))
        probs = z / z.sum(1, keepdims=True)
        w.writerow(["index", "prediction"] + (["label"] if task.d.test_has_labels else [])
                   + [f"prob_{n}" for n in names])
        for i, p in enumerate(probs):
            gold_col = [names[int(gold[i])]] if task.d.test_has_labels else []
            w.writerow([i, names[int(p.argmax())]] + gold_col + [f"{x:.6f}" for x in p])
