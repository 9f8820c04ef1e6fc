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
    starts: np.ndarray | None = None  # offsets in `tokens` where documents start (None: 0 if doc_start)

    def position(self) -> tuple[int, int, int, bool, int]:
        return (self.seg, self.offset, self.used, self.doc_start, self.doc_offset)

    def starts_in(self, lo: int, hi: int) -> np.ndarray:
        """Offsets in [lo, hi) of `tokens` where a document starts."""
        if self.starts is None:
            return _ZERO if self.doc_start and lo == 0 < hi else _NONE
        return self.starts[(self.starts >= lo) & (self.starts < hi)]


_ZERO, _NONE = np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)


class Packer:
    """Feed PieceTokens in stream order; take full blocks of `block_size` tokens out."""

    def __init__(self, block_size: int, track_starts: bool = False):
        self.block_size = block_size
        self.track_starts = track_starts  # record where documents start in each block (data.isolate_documents)
        self.starts: np.ndarray | None = None  # after a take: those offsets in the tokens taken
        self.carry: list[PieceTokens] = []
        self.available = 0  # unused tokens in the carry
        self.new_docs = 0  # documents started by the takes since the last collect_docs()

    def add(self, piece: PieceTokens) -> None:
        # a fully used record is kept only as long as it is the last one: it marks the position
        if self.carry and self.carry[-1].used >= len(self.carry[-1].tokens):
            self.carry.pop()
        self.carry.append(piece)
        self.available += len(piece.tokens) - piece.used

    def position(self):
        """Where the next unemitted token is: (seg, piece offset, used, doc_start, doc_offset) or None."""
        return self.carry[0].position() if self.carry else None

    def _touch(self, rec: PieceTokens) -> None:
        """Count the documents a record starts when its first token is taken (not when it is added: a
        record added but not reached yet is read again after a resume, and must not count twice). A
        record is at used == 0 only once: taking moves it on, and an empty one (never a document's
        start: that has [CLS]) is dropped when reached."""
        if rec.used == 0:
            self.new_docs += rec.n_docs if rec.n_docs is not None else int(rec.doc_start)

    def take(self, n: int | None = None, audit: list | None = None) -> np.ndarray:
        """Remove and return the next n (default block_size) tokens, or fewer at the end of the carry."""
        n = self.block_size if n is None else n
        total = min(n, self.available)
        parts, need, starts = [], total, []
        while need:
            rec = self.carry[0]
            self._touch(rec)
            k = min(need, len(rec.tokens) - rec.used)
            if self.track_starts:
                starts.append(rec.starts_in(rec.used, rec.used + k) + (total - need - rec.used))
            parts.append(rec.tokens[rec.used: rec.used + k])
            if audit is not None:
                audit.append((rec.doc_id, k))
            rec.used += k
            need -= k
            self.available -= k
            if rec.used == len(rec.tokens) and len(self.carry) > 1:
                self.carry.pop(0)
        if self.track_starts:
            self.starts = np.concatenate(starts) if starts else _NONE
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def take_blocks(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The next k full blocks (k * block_size <= available) at once, with the same tokens and bookkeeping
        as k calls of `take`: (int32[k, block_size], int64[k, 3] (seg, piece offset, used): where each block
        starts, as `position()` would say before each take). One pass over the records it reaches, not one
        per block; a view, no copy, when one record holds them all (token-cache pieces). With track_starts,
        `self.starts` holds where documents start, as offsets into the run's k * block_size tokens."""
        size, n = self.block_size, k * self.block_size
        parts, recs, cum, need = [], [], [], n  # cum: run offset of each record's first taken token
        doc_starts = []
        while need:
            rec = self.carry[0]
            self._touch(rec)
            m = min(need, len(rec.tokens) - rec.used)
            if self.track_starts:
                doc_starts.append(rec.starts_in(rec.used, rec.used + m) + (n - need - rec.used))
            parts.append(rec.tokens[rec.used: rec.used + m])
            recs.append((rec.seg, rec.offset, rec.used))
            cum.append(n - need)
            rec.used += m
            need -= m
            if rec.used == len(rec.tokens) and len(self.carry) > 1:
                self.carry.pop(0)
        self.available -= n
        info, cum_a = np.array(recs, dtype=np.int64), np.array(cum, dtype=np.int64)
        ends = cum_a + np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        at = size * np.arange(k, dtype=np.int64)
        # block j starts in the first record with tokens left at `at` (end > at): the record `take` would
        # find first in the carry (an empty record is only ever the carry's last: `add` drops it)
        r = np.searchsorted(ends, at, side="right")
        starts = info[r]
        starts[:, 2] += at - cum_a[r]
        if self.track_starts:
            self.starts = np.concatenate(doc_starts)
        tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)  # one record: a view, no copy
        return tokens.reshape(k, size), starts

    def collect_docs(self) -> int:
        """Documents started by the takes since the last call (for the stream state's count)."""
        n, self.new_docs = self.new_docs, 0
        return n

    def full(self) -> bool:
        return self.available >= self.block_size
