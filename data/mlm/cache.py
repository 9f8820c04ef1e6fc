"""Pre-tokenized token cache: memory-mapped shards of token ids + a document index.

Layout of a cache folder (written by `bertlaunch prepare`):
  shard_00000.bin        token ids of consecutive documents, each as [CLS] ... [SEP] (uint16 or uint32)
  shard_00000.docs.npy   int64[n_docs + 1]: token offset of every document start, then the shard length
  meta.json              written last (the commit marker): tokenizer, dtype, shards, source files

Concatenating the shards in order gives exactly the token stream that text streaming produces for
the same files with one stream. Training reads a cache with the same machinery as text (data/mlm/stream.py):
a shard plays the role of a file and token offsets the role of byte offsets, so sharding over ranks and
workers, packing with carried remainders, masking and exact resume are the same code. Each piece is a
run of whole documents (about CHUNK tokens) sliced straight from the memory map: no tokenizing, no copies
beyond the block being cut.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from bertlaunch.data.corpus.shards import DataError, Piece, Segment

CHUNK = 1 << 15  # tokens per piece (rounded up to the next document start)
META = "meta.json"


def read_meta(cache_dir: str) -> dict:
    path = Path(cache_dir) / META
    if not path.is_file():
        raise DataError(f"data.cache: no {META} in '{cache_dir}' (not a token cache, or its preparation did not "
                        "finish); build it with: bertlaunch prepare --config YOUR.yaml --out DIR")
    return json.loads(path.read_text())


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_tokenizer(meta: dict, spec, cache_dir: str) -> None:
    have = meta["tokenizer"]
    if have["vocab_size"] != spec.vocab_size or have["sha256"] != file_sha256(spec.path):
        raise DataError(f"data.cache '{cache_dir}' was built with another tokenizer ({have['path']}, vocab "
                        f"{have['vocab_size']}) than this run's ({spec.path}, vocab {spec.vocab_size}); rebuild "
                        "it with bertlaunch prepare, or set `tokenizer` to the cache's tokenizer")


def shard_names_and_sizes(cache_dir: str) -> tuple[list[str], list[int]]:
    meta = read_meta(cache_dir)
    return [str(Path(cache_dir) / s["tokens"]) for s in meta["shards"]], [s["n_tokens"] for s in meta["shards"]]


class CacheReader:
    """Pieces of one shard for a Segment whose lo/hi are token offsets (documents starting in [lo, hi))."""

    def __init__(self, tokens_path: str, docs_path: str, dtype: str):
        self.tokens = np.memmap(tokens_path, dtype=dtype, mode="r")
        self.docs = np.load(docs_path)  # int64[n_docs + 1]
        self.starts = self.docs[:-1]

    def _next_start(self, x: int) -> int:
        """First document start >= x (or the shard length)."""
        i = int(np.searchsorted(self.starts, x, side="left"))
        return int(self.docs[i]) if i < len(self.starts) else int(self.docs[-1])

    def pieces(self, seg: Segment):
        s = seg.lo if seg.resume is not None else self._next_start(seg.lo)
        end = self._next_start(seg.hi)  # the last owned document ends where the next one starts
        while s < end:
            e = min(self._next_start(s + CHUNK), end)
            first, last = np.searchsorted(self.starts, [s, e], "left")
            yield Piece(s, s, None, False, False, e, tokens=np.asarray(self.tokens[s:e], dtype=np.int32),
                        n_docs=int(last - first), starts=self.starts[first:last] - s)
            s = e


@lru_cache(maxsize=4)
def cache_readers(cache_dir: str) -> list[CacheReader]:
    meta = read_meta(cache_dir)
    d = Path(cache_dir)
    return [CacheReader(str(d / s["tokens"]), str(d / s["docs"]), meta["dtype"]) for s in meta["shards"]]
