"""Fine-tuning batches: tokenized pairs, length-grouped global batches, dynamic padding.

Each optimizer step takes one *global batch* of G = micro x accum x world examples. An epoch's order is
a function of (seed, epoch) only: shuffle, cut into mega-batches of `group_factor` global batches, sort
each mega-batch by length, cut it into global batches, shuffle those. Inside a global batch, consecutive
(similar-length) runs of `micro` examples become the micro-batches: micro-batch j goes to rank j % world
at accumulation slot j // world. So the step -> examples map does not depend on the world size: a resume
on another number of ranks continues with the same global batches, every example exactly once.
Each micro-batch is padded only to its own longest sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Encoded:
    ids: list[np.ndarray]  # int32 token ids per example, [CLS] a [SEP] (b [SEP])
    types: list[np.ndarray]  # int8 token_type_ids (0 for a, 1 for b)
    labels: np.ndarray  # int64 class ids or float32 targets (NaN when the file has no labels)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))


def encode_pairs(tokenizer, a: list[str], b: list[str] | None, labels, max_length: int) -> Encoded:
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=False, return_attention_mask=False,
                    return_token_type_ids=True)
    ids = [np.asarray(x, dtype=np.int32) for x in enc["input_ids"]]
    types = [np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"]]
    return Encoded(ids, types, np.asarray(labels))


def epoch_order(lengths: np.ndarray, global_batch: int, seed: int, epoch: int, group: bool,
                group_factor: int = 50) -> list[np.ndarray]:
    """Global batches (arrays of example indices) of one epoch; the last may be smaller."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    if not group:
        return [perm[i:i + global_batch] for i in range(0, len(perm), global_batch)]
    mega = global_batch * group_factor
    batches = []
    for i in range(0, len(perm), mega):
        chunk = perm[i:i + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]  # longest first within the mega-batch
        batches += [chunk[j:j + global_batch] for j in range(0, len(chunk), global_batch)]
    full = [b for b in batches if len(b) == global_batch]
    tail = [b for b in batches if len(b) < global_batch]  # at most one per mega-batch; keep them last
    order = rng.permutation(len(full))
    return [full[k] for k in order] + tail


def split_global(batch: np.ndarray, micro: int, world: int, accum: int) -> list[list[np.ndarray]]:
    """-> per rank, `accum` micro-batches (possibly empty for a short last global batch).
    Consecutive runs go to the same micro-batch, so lengths inside a micro-batch stay alike."""
    slots = world * accum
    per = -(-len(batch) // slots) if len(batch) < micro * slots else micro  # spread a short batch evenly
    parts = [batch[j * per:(j + 1) * per] for j in range(slots)]
    return [[parts[a * world + r] for a in range(accum)] for r in range(world)]


def collate(enc: Encoded, idx: np.ndarray, pad_id: int, regression: bool, pad_to_multiple_of: int | None = None,
            n_step: int | None = None, unpad: bool = False) -> dict:
    """Pad to the longest example of this micro-batch (optionally rounded up to a multiple); or with `unpad`,
    pack the examples end to end, without pads (model/unpadded.py): int64[T] ids, token types and positions
    plus offsets int64[B + 1]."""
    n = len(idx)
    labels = torch.as_tensor(enc.labels[idx] if n else enc.labels[:0],
                             dtype=torch.float32 if regression else torch.int64)
    if unpad:
        return _packed(enc, idx, pad_id, labels, n_step)
    width = max((len(enc.ids[i]) for i in idx), default=1)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((max(n, 1), width), pad_id, dtype=np.int64)
    types = np.zeros((max(n, 1), width), dtype=np.int64)
    attn = np.zeros((max(n, 1), width), dtype=np.int64)
    for row, i in enumerate(idx):
        k = len(enc.ids[i])
        ids[row, :k], types[row, :k], attn[row, :k] = enc.ids[i], enc.types[i], 1
    return {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
            "attention_mask": torch.from_numpy(attn), "labels": labels,
            "meta": {"index": idx.tolist(), "n": n, "n_real": int(attn[:n].sum()), "n_slots": n * width,
                     "n_step": n_step or n}}


def _packed(enc: Encoded, idx: np.ndarray, pad_id: int, labels: torch.Tensor, n_step: int | None) -> dict:
    """The examples end to end; an empty micro-batch (a short last global batch) is one [PAD] token."""
    n = len(idx)
    lens = np.array([len(enc.ids[i]) for i in idx] if n else [1], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    ids = np.concatenate([enc.ids[i] for i in idx]).astype(np.int64) if n else np.array([pad_id], dtype=np.int64)
    types = np.concatenate([enc.types[i] for i in idx]).astype(np.int64) if n else np.zeros(1, dtype=np.int64)
    positions = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], lens)  # 0..n_i-1 per example
    real = int(offsets[-1]) if n else 0  # every computed token is real: no slot is wasted
    return {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
            "position_ids": torch.from_numpy(positions), "offsets": torch.from_numpy(offsets), "labels": labels,
            "meta": {"index": idx.tolist(), "n": n, "n_real": real, "n_slots": real, "n_step": n_step or n,
                     "max_len": int(lens.max())}}


def pad_fraction(enc: Encoded, batches: list[np.ndarray], micro: int, fixed_width: int | None = None) -> float:
    """Fraction of pad tokens over micro-batches (dynamic padding, or every row padded to fixed_width)."""
    real = slots = 0
    for batch in batches:
        for j in range(0, len(batch), micro):
            lens = [len(enc.ids[i]) for i in batch[j:j + micro]]
            real += sum(lens)
            slots += len(lens) * (fixed_width or max(lens))
    return 1.0 - real / slots
