"""A stream = one (rank, dataloader worker) share of the corpus: read -> tokenize -> pack -> blocks.

Its whole position is a small JSON-able `StreamState` (epoch, the byte ranges it owns, the piece it is
in and how many of that piece's tokens are used). Each block leaves the stream with the state *after*
that block, so the trainer can save exactly what it consumed, and resuming seeks straight there.
`replan` re-splits the unread rest of an epoch over a different number of streams (world-size change).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from bertlaunch.data.corpus.shards import DataError, Segment, partition, split_ranges
from bertlaunch.data.mlm.pack import Packer, PieceTokens
from bertlaunch.data.tokenize import flatten

READ_BATCH_BYTES = 1 << 16  # text tokenized per call: large enough to amortise the call, small enough to stream


@dataclass
class StreamState:
    stream: int  # this stream's index among num_streams (rank * workers + worker)
    num_streams: int
    epoch: int = 0
    segments: list[Segment] | None = None  # this epoch's byte ranges (None: the fresh split)
    seg_idx: int = 0
    pos: tuple[int, int, bool, int] | None = None  # (piece offset, tokens used, doc_start, doc_offset)
    pending: list[tuple[int, list[Segment]]] = field(default_factory=list)  # later epochs' rest (resize)
    blocks: int = 0  # blocks emitted so far (all epochs)
    docs: int = 0  # documents started so far

    def plan(self, sizes: list[int]) -> list[Segment]:
        if self.segments is None:
            return partition(sizes, self.num_streams)[self.stream]
        return self.segments

    def to_dict(self) -> dict:
        return {"stream": self.stream, "num_streams": self.num_streams, "epoch": self.epoch,
                "segments": None if self.segments is None else [s.to_list() for s in self.segments],
                "seg_idx": self.seg_idx, "pos": list(self.pos) if self.pos else None,
                "pending": [[e, [s.to_list() for s in segs]] for e, segs in self.pending],
                "blocks": self.blocks, "docs": self.docs}

    @staticmethod
    def from_dict(d: dict) -> StreamState:
        return StreamState(
            d["stream"], d["num_streams"], d["epoch"],
            None if d["segments"] is None else [Segment.from_list(s) for s in d["segments"]],
            d["seg_idx"], tuple(d["pos"]) if d["pos"] else None,
            [(e, [Segment.from_list(s) for s in segs]) for e, segs in d["pending"]], d["blocks"], d["docs"])

    def remaining(self, sizes: list[int], units: frozenset[int] = frozenset()) -> list[Segment]:
        """The unread rest of the current epoch, as segments (the current piece pinned by `resume`). A file in
        `units` (compressed: read whole by one stream) that was started stays one indivisible resume point."""
        segs = self.plan(sizes)[self.seg_idx:]
        if segs and self.pos is not None:
            cur = segs[0]
            off, used, start, doc_off = self.pos
            hi = off if cur.file in units else max(off, cur.hi)
            segs = [Segment(cur.file, off, hi, (used, start, doc_off))] + segs[1:]
        return segs


def replan(states: list[StreamState], sizes: list[int], new_n: int, units: frozenset[int] = frozenset()
           ) -> list[StreamState]:
    """Split all unread work of `states` over `new_n` fresh streams: every document still exactly once.

    Streams may be in different epochs: work of each epoch from the lowest to the highest one in flight
    is collected (what a stream still has of its epoch, plus the whole fresh range of epochs it has not
    begun) and cut into new_n equal parts; epochs after that use the fresh split for new_n streams."""
    max_epoch = max(s.epoch for s in states)
    work: dict[int, list[Segment]] = defaultdict(list)
    for st in sorted(states, key=lambda s: s.stream):
        work[st.epoch] += st.remaining(sizes, units)
        planned = {st.epoch}
        for e, segs in st.pending:
            work[e] += segs
            planned.add(e)
        fresh = partition(sizes, st.num_streams)[st.stream]
        for e in range(max(planned) + 1, max_epoch + 1):
            work[e] += fresh
    min_epoch = min(work)
    parts = {e: split_ranges(sorted(work[e], key=lambda s: (s.file, s.lo)), new_n) for e in work}
    docs = sum(s.docs for s in states)
    out = []
    for j in range(new_n):
        out.append(StreamState(j, new_n, min_epoch, parts[min_epoch][j], 0, None,
                               [(e, parts[e][j]) for e in range(min_epoch + 1, max_epoch + 1)],
                               0, docs if j == 0 else 0))
    return out


@dataclass
class Block:
    tokens: np.ndarray  # int32[n], n <= block_size (short only at the end of a stream's epoch); or a run of
    #                     k full blocks cut from one piece: int32[k, block_size]
    where: tuple[int, int, int, int] | np.ndarray  # (epoch, file, piece offset, tokens used): where it
    #                     starts -> mask key; int64[k, 4] for a run
    audit: list | None  # [(epoch, doc_id, n_tokens)] when auditing
    dropped: int = 0  # tokens of a dropped short block (data.last_block=drop)
    starts: np.ndarray | None = None  # data.isolate_documents: offsets in `tokens` (flat over a run's
    #                     k * block_size) where a document starts
    # The stream state after a block is `stream.state` right when the block is yielded (the generator
    # is paused there); callers snapshot it with stream.state.to_dict() only where they need it.

    @property
    def count(self) -> int:
        """Blocks this record stands for (0 for a dropped tail)."""
        return self.tokens.shape[0] if self.tokens.ndim == 2 else int(len(self.tokens) > 0)


def empty_streams(readers: list, sizes: list[int], n: int) -> list[int]:
    """Streams (of a fresh n-way split) that own no document at all: found before training starts, by
    reading at most one piece per segment, so no rank waits forever for data that never comes."""
    empty = []
    for s, segs in enumerate(partition(sizes, n)):
        if not any(next(iter(readers[seg.file].pieces(seg)), None) is not None for seg in segs):
            empty.append(s)
    return empty


class TextStream:
    """Blocks of one stream, forever (or one epoch when `finite`). `readers[i]` reads file i's pieces: text
    to tokenize (data.sources.PieceReader) or ready tokens (data.cache.CacheReader)."""

    def __init__(self, readers: list, sizes: list[int], spec, *, block_size: int, last_block: str,
                 state: StreamState, finite: bool = False, audit: bool = False, file_base: int = 0,
                 doc_starts: bool = False):
        """file_base: added to file indexes in block positions and document ids, so that the sources of a
        mixture (data/mlm/mixture.py), each with its own files 0..n-1, give distinct mask keys and ids.
        doc_starts: each Block says where its documents start (data.isolate_documents)."""
        self.readers, self.sizes, self.spec, self.base = readers, sizes, spec, file_base
        self.doc_starts = doc_starts
        self.block_size, self.last_block = block_size, last_block
        self.state, self.finite, self.audit = copy.deepcopy(state), finite, audit
        # at most this many blocks per yielded Block: >1 lets a token-cache piece give a whole run of
        # blocks at once (same blocks, keys and states as one by one); the consumer sets it before
        # each next() to the number of blocks it still needs
        self.max_run = 1

    @property
    def replaced_bytes(self) -> int:
        return sum(getattr(r, "replaced", 0) for r in self.readers)

    def _pieces(self, st: StreamState, segs: list[Segment]):
        """(seg_idx, Piece, tokens to skip) from the stream's position to the end of its epoch plan.

        A segment with `resume` starts at a saved piece: its first `skip` tokens were trained before."""
        for i in range(st.seg_idx, len(segs)):
            seg = segs[i]
            if i == st.seg_idx and st.pos is not None:
                off, used, start, doc_off = st.pos
                seg = Segment(seg.file, off, max(off, seg.hi), (used, start, doc_off))
            skip = seg.resume[0] if seg.resume is not None else 0
            for piece in self.readers[seg.file].pieces(seg):
                yield i, piece, skip
                skip = 0

    def _tokenized(self, st: StreamState, segs: list[Segment]):
        """Lists of PieceTokens in stream order: one list per tokenized read batch (about READ_BATCH_BYTES
        of text), or a token-cache piece alone."""
        spec, batch, size = self.spec, [], 0

        def flush():
            if not batch:
                return
            ids = spec.encode([p.text for _, p, _ in batch])
            # one list -> array conversion for the whole read batch, then [CLS]/[SEP] inserted vectorised
            # and each piece's tokens taken as a view: no per-piece array building
            n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            starts = np.fromiter((p.doc_start for _, p, _ in batch), dtype=bool, count=len(batch))
            ends = np.fromiter((p.doc_end for _, p, _ in batch), dtype=bool, count=len(batch))
            flat = flatten(ids)
            bounds = np.concatenate([[0], np.cumsum(n)])
            # per piece: [CLS] at its start, [SEP] at its end; np.insert keeps the order of equal indices,
            # so a piece's [SEP] lands before the next piece's [CLS]
            where = np.stack([bounds[:-1], bounds[1:]], axis=1).ravel()
            marks = np.tile(np.array([spec.cls_id, spec.sep_id], np.int32), len(batch))
            keep = np.stack([starts, ends], axis=1).ravel()
            flat = np.insert(flat, where[keep], marks[keep])
            edges = np.concatenate([[0], np.cumsum(n + starts + ends)]).tolist()
            base = [(self.base + segs[i].file) << 40 for i, _, _ in batch]
            yield [PieceTokens(i, p.offset, p.doc_start, flat[edges[k]:edges[k + 1]], skip, p.doc_offset,
                               base[k] + p.doc_offset) for k, (i, p, skip) in enumerate(batch)]

        for item in self._pieces(st, segs):
            i, p, skip = item
            if p.tokens is not None:  # pre-tokenized (token cache): [CLS]/[SEP] already in place
                yield from flush()
                batch, size = [], 0
                yield [PieceTokens(i, p.offset, p.doc_start, p.tokens, skip, p.doc_offset, -1, p.n_docs, p.starts)]
                continue
            batch.append(item)
            size += len(p.text)
            if size >= READ_BATCH_BYTES:
                yield from flush()
                batch, size = [], 0
        yield from flush()

    def __iter__(self):
        st = self.state
        while True:
            segs = st.plan(self.sizes)
            fresh = st.segments is None
            packer, got_tokens = Packer(self.block_size, self.doc_starts), False
            for recs in self._tokenized(st, segs):
                for rec in recs:  # a whole read batch at once, so blocks can be cut from it in runs
                    packer.add(rec)
                got_tokens = True
                while packer.full():
                    k = 1 if self.audit else min(self.max_run, packer.available // self.block_size)
                    if k > 1:
                        yield self._emit_run(st, segs, packer, k)
                        continue
                    start, audit = packer.position(), ([] if self.audit else None)
                    tokens = packer.take(audit=audit)
                    yield self._emit(st, segs, packer, tokens, start, audit)
            if fresh and not got_tokens and st.pos is None:
                raise DataError(f"stream {st.stream} of {st.num_streams} got no documents: the corpus "
                                f"({len(self.readers)} file(s)) has fewer documents than world_size x "
                                "data.num_workers streams; lower data.num_workers, use fewer ranks or add data")
            # end of this stream's epoch: the one short block, then the next epoch's plan
            start, audit = packer.position(), ([] if self.audit else None)
            tail = packer.take(audit=audit) if packer.available else None
            st.docs += packer.collect_docs()
            where = ((st.epoch, self.base + segs[start[0]].file, start[1], start[2]) if start
                     else (st.epoch, self.base, 0, 0))
            audit = [(st.epoch, d, n) for d, n in audit] if audit is not None else None
            self._next_epoch(st)
            if tail is not None and self.last_block == "pad":
                st.blocks += 1
                yield Block(tail, where, audit, starts=packer.starts)
            elif tail is not None:  # dropped: not trained, but counted and its position passed
                yield Block(tail[:0], where, audit, dropped=len(tail))
            if self.finite:
                return

    def _emit(self, st: StreamState, segs, packer: Packer, tokens, start, audit) -> Block:
        """A full block; the stream state moves to the first token not yet emitted."""
        seg_i, off, used, _, _ = start
        pos = packer.position()
        st.blocks += 1
        st.docs += packer.collect_docs()
        if pos is not None:
            st.seg_idx, st.pos = pos[0], tuple(pos[1:])
        audit = [(st.epoch, d, n) for d, n in audit] if audit is not None else None
        return Block(tokens, (st.epoch, self.base + segs[seg_i].file, off, used), audit, starts=packer.starts)

    def _emit_run(self, st: StreamState, segs, packer: Packer, k: int) -> Block:
        """k full blocks at once; the same blocks, keys and state as after k `_emit`s."""
        tokens, starts = packer.take_blocks(k)
        where = np.empty((k, 4), dtype=np.int64)
        where[:, 0], where[:, 2:] = st.epoch, starts[:, 1:]
        where[:, 1] = [self.base + segs[i].file for i in starts[:, 0].tolist()]
        pos = packer.position()
        st.blocks += k
        st.docs += packer.collect_docs()
        st.seg_idx, st.pos = pos[0], tuple(pos[1:])
        return Block(tokens, where, None, starts=packer.starts)

    def _next_epoch(self, st: StreamState) -> None:
        st.epoch += 1
        st.seg_idx, st.pos = 0, None
        if st.pending and st.pending[0][0] == st.epoch:
            st.segments = st.pending.pop(0)[1]
        else:
            st.segments = None
