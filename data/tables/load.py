"""A fine-tuning task's tables, loaded and tokenized: train (labels required), eval, test (labels optional).

Reads local tables (data/tables/read.py) or a `datasets` hub split, checks the columns, infers the label space
from the training table, and encodes every table with the model's tokenizer (data/tables/pairs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bertlaunch.data.tables.pairs import Encoded, encode_pairs
from bertlaunch.data.tables.read import LabelSpace, Rows, infer_labels, read_rows, require_columns, texts


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
    extra_eval: dict[str, str]
    extra_test: dict[str, str]
    columns: list[str] | None
    max_train_examples: int | None
    text_a: str
    text_b: str | None
    label: str
    labels: list[str] | None
    problem: str
    max_length: int


@dataclass
class Table:
    """An encoded table to score or predict, with its raw rows (for the predictions file)."""

    enc: Encoded
    rows: Rows
    has_labels: bool


@dataclass
class TaskData:
    tokenizer: object  # a transformers tokenizer
    pad_id: int
    labels: LabelSpace
    train: Encoded
    train_path: str
    eval: Encoded | None
    extra_eval: dict[str, Encoded]  # name -> a further labelled table scored at every evaluation
    test: Table | None
    extra_test: dict[str, Table]  # name -> a further table to predict (predictions_<name>.tsv)


def hub_rows(t: TableSource, split: str) -> Rows:
    config, split = split.split(":", 1) if ":" in split else (t.dataset_config, split)  # "ax:test": another config
    try:
        from datasets import load_dataset  # lazy: a heavy import, only for task.dataset (the hub)

        ds = load_dataset(t.dataset, config, split=split)
    except Exception as e:
        raise FileNotFoundError(f"task.dataset={t.dataset}: could not load split '{split}' ({e}); "
                                "without hub access use local files (task.train_file ...)") from None
    rows, columns = [dict(r) for r in ds], list(ds.column_names)
    if rows and t.label in columns and all(r[t.label] == -1 for r in rows):
        columns.remove(t.label)  # the hub's test splits hide their labels as -1: they are unlabelled
        for r in rows:
            del r[t.label]
    return Rows(f"{t.dataset}:{split}", columns, rows, list(range(1, len(rows) + 1)))


def load_task_data(t: TableSource, tokenizer) -> TaskData:
    def rows(file, split=None):
        if file:
            return read_rows(file, t.format, t.columns, t.text_a)
        return hub_rows(t, split) if (t.dataset and split) else None

    train = rows(t.train_file, t.train_split)
    if t.max_train_examples:
        train = Rows(train.path, train.columns, train.rows[:t.max_train_examples], train.lines[:t.max_train_examples])
    columns = {"task.text_a": t.text_a, "task.label": t.label} | ({"task.text_b": t.text_b} if t.text_b else {})
    require_columns(train, columns)
    labels = infer_labels(train, t.label, t.problem, t.labels)

    def encode(table: Rows, need_labels: bool) -> Table:
        require_columns(table, columns if need_labels else {k: v for k, v in columns.items() if k != "task.label"})
        a, b = texts(table, t.text_a, t.text_b)
        has = t.label in table.columns
        y = [labels.encode(r[t.label], table, i, t.label) for i, r in enumerate(table.rows)] if has else \
            [np.nan] * len(table.rows)
        return Table(encode_pairs(tokenizer, a, b, y, t.max_length), table, has)

    def extra(ref: str) -> Rows:  # a file, or with task.dataset a split name
        return rows(None, ref) if t.dataset else rows(ref)

    def scored(table: Rows | None) -> Encoded | None:
        return encode(table, True).enc if table is not None else None

    def predicted(table: Rows | None) -> Table | None:
        return encode(table, False) if table is not None else None

    return TaskData(tokenizer, tokenizer.pad_token_id, labels, scored(train), train.path,
                    scored(rows(t.eval_file, t.eval_split)),
                    {name: scored(extra(r)) for name, r in t.extra_eval.items()},
                    predicted(rows(t.test_file, t.test_split)),
                    {name: predicted(extra(r)) for name, r in t.extra_test.items()})
