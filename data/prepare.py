"""Build a token cache once, in parallel (the CLI is `python -m launch.tools.prepare`).

Tokenizes the corpus with one process per core and writes memory-mapped shards that training reads with
data.cache=DIR (see data/cache.py). meta.json is written last: an interrupted build is never mistaken
for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data.cache import META
from data.compressed import compression_of, decompressed_size
from data.sources import file_sizes, partition, resolve_files
from data.storage import settings


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _build_shard(job) -> tuple[int, int, int]:
    """Tokenize one byte range of the corpus into shard files; returns (index, tokens, documents)."""
    index, segs, files, spec, opts, out, storage_settings = job
    from data.storage import configure
    from data.stream import StreamState, TextStream, text_readers

    configure(*storage_settings)  # a spawned worker: the parent's storage options and retry policy

    readers = text_readers(files, opts["mode"], opts["text_field"], opts["max_chunk_bytes"], opts["errors"],
                           whole_compressed=False)  # segments are decompressed byte ranges here
    stream = TextStream(readers, [0] * len(files), spec, block_size=1, last_block="pad",
                        state=StreamState(0, 1, segments=segs), finite=True)
    dtype = np.uint16 if spec.vocab_size <= 1 << 16 else np.uint32
    starts, n = [], 0
    with open(Path(out) / f"shard_{index:05d}.bin", "wb") as f:
        for rec in stream._tokenized(stream.state, segs):  # pieces in order, [CLS]/[SEP] in place
            if rec.doc_start:
                starts.append(n)
            rec.tokens.astype(dtype).tofile(f)
            n += len(rec.tokens)
    np.save(Path(out) / f"shard_{index:05d}.docs.npy", np.array(starts + [n], dtype=np.int64))
    return index, n, len(starts)


def prepare(files: list[str], tokenizer: str, out: str, *, mode: str = "blank_line", text_field: str = "text",
            max_chunk_bytes: int = 1 << 20, errors: str = "strict", workers: int | None = None,
            shard_bytes: int = 64 << 20) -> dict:
    from data.tokenize import load_spec

    files = resolve_files(files)
    # compressed files count by their decompressed bytes, so they split into shards exactly like the same
    # text uncompressed (one decompression pass to measure them; each shard then skips to its range)
    sizes = [decompressed_size(f) if compression_of(f) else n for f, n in zip(files, file_sizes(files))]
    spec = load_spec(tokenizer)
    workers = workers or os.cpu_count() or 1
    n_shards = max(workers, -(-sum(sizes) // shard_bytes))
    plan = [segs for segs in partition(sizes, n_shards) if segs]
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / META).unlink(missing_ok=True)
    opts = {"mode": mode, "text_field": text_field, "max_chunk_bytes": max_chunk_bytes, "errors": errors}
    jobs = [(i, segs, files, spec, opts, str(outdir), settings()) for i, segs in enumerate(plan)]
    t0 = time.time()
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            results = sorted(pool.map(_build_shard, jobs, chunksize=1))
    else:
        results = [_build_shard(j) for j in jobs]
    seconds = time.time() - t0
    meta = {"version": 1, "dtype": "uint16" if spec.vocab_size <= 1 << 16 else "uint32",
            "tokenizer": {"path": spec.path, "vocab_size": spec.vocab_size, "sha256": file_sha256(spec.path)},
            "source": {"files": files, "sizes": sizes, "txt_documents": mode, "text_field": text_field},
            "shards": [{"tokens": f"shard_{i:05d}.bin", "docs": f"shard_{i:05d}.docs.npy", "n_tokens": n,
                        "n_docs": d} for i, n, d in results],
            "n_tokens": sum(r[1] for r in results), "n_docs": sum(r[2] for r in results),
            "build_seconds": round(seconds, 3)}
    tmp = outdir / (META + ".part")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, outdir / META)
    return meta

