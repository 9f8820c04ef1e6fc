"""Packing: concatenate tokenized documents and cut fixed-length blocks, carrying the remainder.

Unlike HF's `group_texts`, which drops the tail of every `map` batch, the remainder of one read batch
stays in the carry and starts the next block, so only the very end of a stream's epoch can be short.

The packer also tracks *where* each block starts and ends in the corpus: the carry is a list of piece
records (where the piece is, how many of its tokens are used), so the stream position after any block
is exact and resuming needs no replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PieceTokens:
    seg: int  # index of the segment in the stream's current plan
    offset: int  # file byte offset of the piece
    doc_start: bool
    tokens: np.ndarray  # int32 tokens of the piece incl. [CLS]/[SEP] where they belong
    used: int = 0  # tokens already emitted in earlier blocks (or skipped on resume)
    doc_offset: int = -1  # byte offset of the document's first piece (its id within the file)
    doc_id: int = -1  # corpus-wide document id (file, doc_offset) for exactly-once audits
    n_docs: int | None = None  # documents starting in the piece (token-cache pieces hold many)

    def position(self) -> tuple[int, int, int, bool, int]:
        return (self.seg, self.offset, self.used, self.doc_start, self.doc_offset)


class Packer:
    """Feed PieceTokens in stream order; take full blocks of `block_size` tokens out."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.carry: list[PieceTokens] = []
        self.available = 0  # unused tokens in the carry

    def add(self, piece: PieceTokens) -> None:
        # a fully used record is kept only as long as it is the last one: it marks the position
        if self.carry and self.carry[-1].used >= len(self.carry[-1].tokens):
            self.carry.pop()
        self.carry.append(piece)
        self.available += len(piece.tokens) - piece.used

    def position(self):
        """Where the next unemitted token is: (seg, piece offset, used, doc_start, doc_offset) or None."""
        return self.carry[0].position() if self.carry else None

    def take(self, n: int | None = None, audit: list | None = None) -> np.ndarray:
        """Remove and return the next n (default block_size) tokens, or fewer at the end of the carry."""
        n = self.block_size if n is None else n
        parts, need = [], min(n, self.available)
        while need:
            rec = self.carry[0]
            k = min(need, len(rec.tokens) - rec.used)
            parts.append(rec.tokens[rec.used: rec.used + k])
            if audit is not None:
                audit.append((rec.doc_id, k))
            rec.used += k
            need -= k
            self.available -= k
            if rec.used == len(rec.tokens) and len(self.carry) > 1:
                self.carry.pop(0)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def run_length(self) -> int:
        """Whole blocks the first carry record alone can still give (token-cache pieces hold many)."""
        rec = self.carry[0]
        return (len(rec.tokens) - rec.used) // self.block_size

    def take_run(self, k: int) -> np.ndarray:
        """The next k full blocks, all from the first record: int32[k, block_size] (a view, no copy).
        Same bookkeeping as k calls of `take`."""
        rec, n = self.carry[0], k * self.block_size
        out = rec.tokens[rec.used: rec.used + n].reshape(k, self.block_size)
        rec.used += n
        self.available -= n
        if rec.used == len(rec.tokens) and len(self.carry) > 1:
            self.carry.pop(0)
        return out

    def full(self) -> bool:
        return self.available >= self.block_size
