"""Embedding-task rows: (query, positive[, hard negative]) texts from a .jsonl, .tsv, .csv or .parquet table, local or
remote (data/tables/read.py), each column tokenized on its own ([CLS] text [SEP], truncated), and batches of them.

A training step's rows are drawn as fine-tuning's are (data/tables/pairs.py: epoch_order, split_global), so the
step -> rows map depends on (seed, epoch) only, never on the world size. The texts of a micro-batch (its queries,
then its positives, then its negatives) are sorted by length and encoded in length groups, padded or packed
(collate_rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bertlaunch.data.corpus.shards import DataError
from bertlaunch.data.tables.read import Rows, read_rows, require_columns


@dataclass
class TripleColumns:
    """Where the texts are (the embedding config's `task` section)."""

    train_file: str
    format: str
    query: str
    positive: str
    negative: str | None
    max_length: int
    max_train_examples: int | None


@dataclass
class Triples:
    path: str
    columns: list[str]  # the config keys' columns in order: query, positive(, negative)
    texts: list[list[np.ndarray]]  # per column: int32 token ids per row, [CLS] text [SEP]
    pad_id: int

    def __len__(self) -> int:
        return len(self.texts[0])

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each row, all its columns together (what a row costs)."""
        return np.sum([[len(x) for x in col] for col in self.texts], axis=0).astype(np.int64)


def column_texts(t: Rows, column: str, key: str) -> list[str]:
    """The column's texts; a row without one (missing, null, blank, not a string) names its line and the fix."""
    out = []
    for i, row in enumerate(t.rows):
        v = row.get(column)
        if not isinstance(v, str) or not v.strip():
            what = "is missing" if v is None else f"is {'empty' if isinstance(v, str) else type(v).__name__}"
            raise DataError(f"{t.path}: {t.where(i)}: column '{column}' ({key}) {what}; every row needs a text "
                            "there: fill it or drop the row")
        out.append(v)
    return out


def load_triples(c: TripleColumns, tokenizer) -> Triples:
    named = {"task.query": c.query, "task.positive": c.positive} | ({"task.negative": c.negative} if c.negative else {})
    t = read_rows(c.train_file, c.format, only=list(named.values()))
    require_columns(t, named)
    if c.max_train_examples:
        t = Rows(t.path, t.columns, t.rows[:c.max_train_examples], t.lines[:c.max_train_examples])
    texts = [encode_texts(tokenizer, column_texts(t, col, key), c.max_length) for key, col in named.items()]
    return Triples(t.path, list(named.values()), texts, tokenizer.pad_token_id)


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[np.ndarray]:
    """[CLS] text [SEP] ids, truncated to max_length (as sentence-transformers tokenizes)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False, return_attention_mask=False,
                    return_token_type_ids=False)
    return [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]


def pad_texts(ids: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask int64[n, longest] (one row of a single pad when n = 0)."""
    width = max((len(x) for x in ids), default=1)
    out = np.full((max(len(ids), 1), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(out)
    for row, x in enumerate(ids):
        out[row, :len(x)], mask[row, :len(x)] = x, 1
    return {"input_ids": torch.from_numpy(out), "attention_mask": torch.from_numpy(mask)}


def collate_rows(d: Triples, idx: np.ndarray, groups: int = 1, packed: bool = False) -> dict:
    """One micro-batch of rows: their texts, column after column ([n queries; n positives(; n negatives)]), sorted
    by length and cut into `groups` groups. `inputs` are the encoder's arguments (model/embed.py Encoder):
    - padded: per group int64 [n_g, width_g] input_ids and attention_mask, each group padded to its own longest;
    - packed: the sorted texts end to end (packed_inputs), the groups used by the attention only.
    `restore` (int64[cols * n], None when the texts keep their order) puts the embeddings, which come out in the
    groups' order, back in column order. Plus the host-side counts (no rows: one pad text, no slot)."""
    ids = [col[i] for col in d.texts for i in idx]
    sort = groups > 1 or packed
    order = np.argsort([len(x) for x in ids], kind="stable") if sort else np.arange(len(ids))
    parts = np.array_split(order, max(min(groups, len(ids)), 1))
    restore = torch.from_numpy(np.argsort(order)) if sort and ids else None
    n_real = int(sum(len(x) for x in ids))
    if packed:
        texts = [ids[j] for j in order] or [np.full(1, d.pad_id, dtype=np.int32)]
        inputs, n_slots = packed_inputs(texts, [len(g) for g in parts] if ids else [1]), n_real
    else:
        padded = [pad_texts([ids[j] for j in g], d.pad_id) for g in parts]
        inputs = {key: [b[key] for b in padded] for key in ("input_ids", "attention_mask")}
        n_slots = sum(len(g) * b["input_ids"].shape[1] for g, b in zip(parts, padded))
    return {"inputs": inputs, "restore": restore,
            "meta": {"index": [int(i) for i in idx], "n": len(idx), "n_real": n_real, "n_slots": n_slots,
                     "texts": len(ids)}}


def packed_inputs(texts: list[np.ndarray], sizes: list[int]) -> dict:
    """Texts sorted by length, end to end: input_ids int64[T], position_ids int64[T] (0.. in each text, BERT's
    absolute positions), offsets int64[N + 1], and per group of `sizes` consecutive texts the attention's padded
    layout (model/unpadded.py grouped_attention): (index int64[n_g * L_g], mask bool[n_g, 1, 1, L_g], real
    int64[T_g]), pads pointing at token 0."""
    lens = np.array([len(x) for x in texts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    groups, start = [], 0
    for n in sizes:
        glens = lens[start:start + n]
        width = int(glens.max())
        cols = np.arange(width)
        mask = cols[None, :] < glens[:, None]  # [n_g, L_g]
        index = np.where(mask, offsets[start:start + n, None] + cols[None, :], 0)
        groups.append((torch.from_numpy(index.reshape(-1)), torch.from_numpy(mask)[:, None, None, :],
                       torch.from_numpy(np.flatnonzero(mask.reshape(-1)))))
        start += n
    return {"input_ids": torch.from_numpy(np.concatenate(texts).astype(np.int64)),
            "position_ids": torch.from_numpy(np.concatenate([np.arange(n) for n in lens])),
            "offsets": torch.from_numpy(offsets), "groups": groups}
