"""A fine-tuning task's tables, loaded and tokenized: train (labels required), eval, test (labels optional).

Reads local tables (data/tasks.py) or a `datasets` hub split, checks the columns, infers the label space
from the training table, and encodes every table with the model's tokenizer (data/pairs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from data.pairs import Encoded, encode_pairs
from data.tasks import LabelSpace, Rows, infer_labels, read_rows, require_columns, texts


class TableSource(Protocol):
    """Where the tables are and which columns hold what (the fine-tuning config's `task` section)."""

    train_file: str | None
    eval_file: str | None
    test_file: str | None
    format: str
    dataset: str | None
    dataset_config: str | None
    train_split: str
    eval_split: str | None
    test_split: str | None
    text_a: str
    text_b: str | None
    label: str
    labels: list[str] | None
    problem: str
    max_length: int


@dataclass
class TaskData:
    tokenizer: object  # a transformers tokenizer
    pad_id: int
    labels: LabelSpace
    train: Encoded
    eval: Encoded | None
    test: Encoded | None
    test_rows: Rows | None  # for predictions.tsv
    test_has_labels: bool
    train_path: str


def hub_rows(t: TableSource, split: str) -> Rows:
    try:
        from datasets import load_dataset

        ds = load_dataset(t.dataset, t.dataset_config, split=split)
    except Exception as e:
        raise FileNotFoundError(f"task.dataset={t.dataset}: could not load split '{split}' ({e}); "
                                "without hub access use local files (task.train_file ...)") from None
    rows = [dict(r) for r in ds]
    return Rows(f"{t.dataset}:{split}", list(ds.column_names), rows, list(range(1, len(rows) + 1)))


def load_task_data(t: TableSource, tokenizer) -> TaskData:
    def rows(file, split):
        if file:
            return read_rows(file, t.format)
        return hub_rows(t, split) if (t.dataset and split) else None

    train = rows(t.train_file, t.train_split)
    columns = {"task.text_a": t.text_a, "task.label": t.label} | ({"task.text_b": t.text_b} if t.text_b else {})
    require_columns(train, columns)
    labels = infer_labels(train, t.label, t.problem, t.labels)

    def encode(table: Rows, need_labels: bool) -> tuple[Encoded, bool]:
        require_columns(table, columns if need_labels else {k: v for k, v in columns.items() if k != "task.label"})
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
