"""The sharding vocabulary shared by every corpus reader: a Segment (the part of a file a stream owns), the
split of files into equal byte ranges, a Piece (what a reader yields) and DataError.

Sharding rule (exactly-once by construction): all files are laid end to end in one virtual byte space
and cut into N equal contiguous ranges, one per (rank, dataloader worker) stream. A document belongs to
the range that holds its first byte; a stream reads the documents that start in its range (finishing
the last one past the range end) and skips the tail of one that started before it. So every document
is read by exactly one stream, however the file count compares to N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file, position and the fix."""


@dataclass(frozen=True)
class Segment:
    """Part of one file owned by a stream: documents starting in [lo, hi).

    `resume` = (tokens_to_skip, piece_is_doc_start, doc_offset) means `lo` is the exact start of a
    piece to re-read (mid-document is allowed): a saved stream position."""

    file: int
    lo: int
    hi: int
    resume: tuple[int, bool, int] | None = None

    def to_list(self):
        return [self.file, self.lo, self.hi, list(self.resume) if self.resume else None]

    @staticmethod
    def from_list(v) -> Segment:
        return Segment(int(v[0]), int(v[1]), int(v[2]), tuple(v[3]) if v[3] is not None else None)


def split_ranges(ranges: list[Segment], n: int) -> list[list[Segment]]:
    """Cut a list of segments (in order) into n contiguous parts of (nearly) equal byte counts."""
    total = sum(max(0, s.hi - s.lo) for s in ranges)
    bounds = [total * i // n for i in range(n + 1)]
    parts: list[list[Segment]] = [[] for _ in range(n)]
    base = 0
    for seg in ranges:
        size = max(0, seg.hi - seg.lo)
        if size == 0:  # only the rest of a started document: keep it with the part holding its byte
            if seg.resume is not None:
                i = max(j for j in range(n) if bounds[j] <= base)
                parts[i].append(Segment(seg.file, seg.lo, seg.lo, seg.resume))
            continue
        for i in range(n):
            lo, hi = max(bounds[i], base), min(bounds[i + 1], base + size)
            if lo < hi:
                resume = seg.resume if lo == base else None  # the saved piece stays with its byte
                parts[i].append(Segment(seg.file, seg.lo + lo - base, seg.lo + hi - base, resume))
        base += size
    return parts


def partition(sizes: list[int], n: int) -> list[list[Segment]]:
    """The fresh-epoch split of all files into n streams."""
    return split_ranges([Segment(i, 0, s) for i, s in enumerate(sizes)], n)


@dataclass
class Piece:
    offset: int  # file byte offset of the piece's first byte (token offset in a token cache)
    doc_offset: int  # file byte offset of the document's first piece
    text: str | None
    doc_start: bool  # first piece of a document ([CLS] goes before it)
    doc_end: bool  # last piece of a document ([SEP] goes after it)
    next_offset: int  # byte offset just past the piece (and its line break)
    tokens: np.ndarray | None = None  # token-cache pieces: ready tokens instead of text
    n_docs: int | None = None  # token-cache pieces: documents starting inside the piece
    starts: np.ndarray | None = None  # token-cache pieces: offsets in `tokens` where those documents start
