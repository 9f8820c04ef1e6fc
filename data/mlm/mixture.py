"""Weighted mixtures of corpora (data.sources): each block comes from one source, chosen by weight.

Each source is sharded and read on its own, with the same (rank, worker) streams as a single corpus: a
mixture stream holds one TextStream per source, and each keeps its own position and epoch (a source that
runs out starts its next epoch alone, while the others read on).

Which source gives block k is a function of (seed, k) only: u_k = frac(x0(seed) + k / phi), a Weyl
sequence, compared with the cumulative weights. Its points fill [0, 1) evenly (the count falling in an
interval of length w over K consecutive k is K*w +- O(log K)), where independent random draws would wander
by +-0.01 over 10k blocks. The block index is global: stream j of N takes k = j, j + N, j + 2N, ..., so the
N streams together use every k once and the shares hold to about 1e-3 over 10k blocks at any world size.
After a resize the new streams interleave the same way from above the highest k used. The counter is part
of the saved state, so a resume makes the same choices; a dropped epoch tail (data.last_block=drop) passes
its position on without using a k.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field

from bertlaunch.data.corpus.reader import text_readers
from bertlaunch.data.mlm.stream import Block, StreamState, TextStream, replan

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / phi, odd: k * G mod 2^64 is a Weyl sequence over 64-bit integers
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class Source:
    name: str
    files: list[str]
    sizes: list[int]  # each file's extent in the sharding byte space (data.sources.file_sizes)
    weight: float
    mode: str  # txt_documents of its .txt files
    text_field: str  # its .jsonl / .parquet text field
    base: int  # global index of its first file: keeps mask keys and document ids of sources apart


def shares(sources: list[Source]) -> list[float]:
    total = sum(s.weight for s in sources)
    return [s.weight / total for s in sources]


def pick(seed: int, k: int, cumulative: list[int]) -> int:
    """Index of the source of block k: cumulative = upper bounds of each source's share in 2^64 units."""
    x0 = (seed * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK  # a seed-dependent start point
    u = (x0 + k * _GOLDEN) & _MASK
    return min(bisect.bisect_right(cumulative, u), len(cumulative) - 1)


def cumulative_bounds(sources: list[Source]) -> list[int]:
    acc, out = 0.0, []
    for w in shares(sources):
        acc += w
        out.append(min(int(acc * (1 << 64)), 1 << 64))
    return out


@dataclass
class MixtureState:
    stream: int
    num_streams: int
    sources: dict[str, StreamState]  # each source's own position and epoch
    blocks: int = 0  # trained blocks chosen so far by this stream
    tokens: dict[str, int] = field(default_factory=dict)  # real tokens in those blocks, per source
    first: int = 0  # this stream's i-th block has the global index k = first + stride * i
    stride: int = 1

    @property
    def k(self) -> int:
        return self.first + self.stride * self.blocks

    @property
    def docs(self) -> int:
        return sum(s.docs for s in self.sources.values())

    def to_dict(self) -> dict:
        return {"stream": self.stream, "num_streams": self.num_streams, "blocks": self.blocks,
                "first": self.first, "stride": self.stride, "tokens": dict(self.tokens), "docs": self.docs,
                "epoch": min(s.epoch for s in self.sources.values()),
                "sources": {n: s.to_dict() for n, s in self.sources.items()}}

    @staticmethod
    def from_dict(d: dict) -> MixtureState:
        return MixtureState(d["stream"], d["num_streams"],
                            {n: StreamState.from_dict(s) for n, s in d["sources"].items()},
                            d["blocks"], dict(d["tokens"]), d["first"], d["stride"])

    @staticmethod
    def fresh(stream: int, num_streams: int, sources: list[Source]) -> MixtureState:
        return MixtureState(stream, num_streams, {s.name: StreamState(stream, num_streams) for s in sources},
                            0, {s.name: 0 for s in sources}, stream, num_streams)


class MixtureStream:
    """Blocks of one (rank, worker) stream of a mixture, forever."""

    def __init__(self, sources: list[Source], spec, *, block_size: int, last_block: str, state: MixtureState,
                 seed: int, max_chunk_bytes: int, errors: str, audit: bool = False, doc_starts: bool = False):
        self.sources, self.seed = sources, seed
        self.cumulative = cumulative_bounds(sources)
        self.state = copy.deepcopy(state)
        self.streams = []
        for s in sources:
            readers = text_readers(s.files, s.mode, s.text_field, max_chunk_bytes, errors)
            ts = TextStream(readers, s.sizes, spec, block_size=block_size, last_block=last_block,
                            state=self.state.sources[s.name], audit=audit, file_base=s.base, doc_starts=doc_starts)
            self.state.sources[s.name] = ts.state  # the live state: it moves as the source is read
            self.streams.append(ts)
        self.max_run = 1  # the consumer's hint; a mixture decides block by block

    @property
    def replaced_bytes(self) -> int:
        return sum(ts.replaced_bytes for ts in self.streams)

    def __iter__(self):
        st, its = self.state, [iter(ts) for ts in self.streams]
        while True:
            j = pick(self.seed, st.k, self.cumulative)
            blk: Block = next(its[j])
            if blk.count:
                st.blocks += 1
                name = self.sources[j].name
                st.tokens[name] = st.tokens.get(name, 0) + int(blk.tokens.size)
            yield blk


def replan_mixture(states: list[MixtureState], sources: list[Source], new_n: int,
                   units: dict[str, frozenset[int]]) -> list[MixtureState]:
    """Each source's unread rest re-split over new_n streams (data.stream.replan, so every document is
    still read once); the new streams interleave their block indexes from above the highest one used, and
    the token counts carry over."""
    per = {s.name: replan([st.sources[s.name] for st in states], s.sizes, new_n, units.get(s.name, frozenset()))
           for s in sources}
    tokens = {s.name: sum(st.tokens.get(s.name, 0) for st in states) for s in sources}
    base = max(st.k for st in states)
    return [MixtureState(j, new_n, {s.name: per[s.name][j] for s in sources}, 0,
                         tokens if j == 0 else {s.name: 0 for s in sources}, base + j, new_n) for j in range(new_n)]
