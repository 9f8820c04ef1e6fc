"""Build a token cache once, in parallel (the CLI is `bertlaunch prepare`).

Tokenizes the corpus with one process per core and writes memory-mapped shards that training reads with
data.cache=DIR (see data/mlm/cache.py). meta.json is written last: an interrupted build is never mistaken
for a complete one.

How the corpus is cut into shards depends only on its contents, not on how it is stored:
- record corpora (every file .jsonl or .parquet, compressed or not) are cut by record: line r of a .jsonl
  file and row r of a .parquet file are the same unit, so X.jsonl, X.jsonl.gz, X.jsonl.zst, X.parquet and
  s3://.../X.parquet give the same shards, byte for byte;
- text corpora (.txt) are cut by decompressed byte, so X.txt and X.txt.gz give the same shards.
The counting pass over a .jsonl file also notes where every LINE_STEP-th line starts, so a worker finds
where its records start by reading from the nearest noted line, not from the file start (a compressed
file is still decompressed up to there, but not tokenized).
"""

from __future__ import annotations

import json
import os
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from bertlaunch.data.corpus.compressed import compression_of, decompressed_size, inner_name, open_bytes
from bertlaunch.data.corpus.parquet import ParquetReader, is_parquet
from bertlaunch.data.corpus.reader import JSONL_SUFFIXES, file_sizes, resolve_files, text_readers
from bertlaunch.data.corpus.shards import Segment, partition
from bertlaunch.data.corpus.storage import configure, settings
from bertlaunch.data.mlm.cache import META, file_sha256
from bertlaunch.data.mlm.stream import StreamState, TextStream
from bertlaunch.data.tokenize import load_spec


def _build_shard(job) -> tuple[int, int, int]:
    """Tokenize one range of the corpus into shard files; returns (index, tokens, documents)."""
    index, segs, files, spec, opts, out, storage_settings = job
    configure(*storage_settings)  # a spawned worker: the parent's storage options and retry policy
    if opts["records"]:  # segments in records (lines / rows): to the readers' byte (or virtual) offsets
        segs = [_record_segment(files[seg.file], seg, opts["line_starts"][seg.file]) for seg in segs]
    readers = text_readers(files, opts["mode"], opts["text_field"], opts["max_chunk_bytes"], opts["errors"],
                           whole_compressed=False)  # segments are decompressed byte ranges here
    stream = TextStream(readers, [0] * len(files), spec, block_size=1, last_block="pad",
                        state=StreamState(0, 1, segments=segs), finite=True)
    dtype = np.uint16 if spec.vocab_size <= 1 << 16 else np.uint32
    starts, n = [], 0
    with open(Path(out) / f"shard_{index:05d}.bin", "wb") as f:
        for recs in stream._tokenized(stream.state, segs):  # pieces in order, [CLS]/[SEP] in place
            for rec in recs:
                if rec.doc_start:
                    starts.append(n)
                rec.tokens.astype(dtype).tofile(f)
                n += len(rec.tokens)
    np.save(Path(out) / f"shard_{index:05d}.docs.npy", np.array(starts + [n], dtype=np.int64))
    return index, n, len(starts)


def prepare(files: list[str], tokenizer: str, out: str, *, mode: str = "blank_line", text_field: str = "text",
            max_chunk_bytes: int = 1 << 20, errors: str = "strict", workers: int | None = None,
            shard_bytes: int = 64 << 20, shard_records: int = 100_000) -> dict:
    """Tokenize `files` into a token cache at `out`. Text corpora get about shard_bytes of (decompressed) text
    per shard, record corpora (.jsonl/.parquet) shard_records records per shard; never fewer shards than
    workers."""
    files = resolve_files(files)
    records = all(is_parquet(f) or inner_name(f).endswith(JSONL_SUFFIXES) for f in files)
    line_starts: list[list[int] | None] = [None] * len(files)
    if records:  # each file's extent = its records (jsonl lines, parquet rows): one counting pass
        sizes = []
        for i, f in enumerate(files):
            if is_parquet(f):
                sizes.append(ParquetReader(f, None).rows)
            else:
                n, line_starts[i] = _count_lines(f)
                sizes.append(n)
    else:  # compressed files count by their decompressed bytes (one decompression pass to measure them)
        sizes = [decompressed_size(f) if compression_of(f) else n for f, n in zip(files, file_sizes(files))]
    spec = load_spec(tokenizer)
    workers = workers or os.cpu_count() or 1
    n_shards = max(workers, -(-sum(sizes) // (shard_records if records else shard_bytes)))
    plan = [segs for segs in partition(sizes, n_shards) if segs]
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / META).unlink(missing_ok=True)
    opts = {"mode": mode, "text_field": text_field, "max_chunk_bytes": max_chunk_bytes, "errors": errors,
            "records": records, "line_starts": line_starts}
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
            "source": {"files": files, "sizes": sizes, "split": "records" if records else "bytes",
                       "txt_documents": mode, "text_field": text_field},
            "shards": [{"tokens": f"shard_{i:05d}.bin", "docs": f"shard_{i:05d}.docs.npy", "n_tokens": n,
                        "n_docs": d} for i, n, d in results],
            "n_tokens": sum(r[1] for r in results), "n_docs": sum(r[2] for r in results),
            "build_seconds": round(seconds, 3)}
    tmp = outdir / (META + ".part")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, outdir / META)
    return meta



LINE_STEP = 1 << 14  # a .jsonl file's line index notes the start of every LINE_STEP-th line


def _count_lines(path: str) -> tuple[int, list[int]]:
    """Records of a .jsonl file (its lines, the last one counted also without a final newline), and the byte
    offset where line j x LINE_STEP starts, for every j."""
    n, pos, last, starts = 0, 0, b"\n", [0]
    with open_bytes(path) as f:
        while chunk := f.read(1 << 22):
            c = chunk.count(b"\n")
            if n + c >= len(starts) * LINE_STEP:  # a noted line starts in this chunk: find its newline
                newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
                while n + c >= len(starts) * LINE_STEP:  # line L starts after the L-th newline
                    starts.append(pos + int(newlines[len(starts) * LINE_STEP - n - 1]) + 1)
            n, pos, last = n + c, pos + len(chunk), chunk[-1:]
    return n + (last != b"\n"), starts


def _record_segment(path: str, seg: Segment, line_starts: list[int] | None) -> Segment:
    """Records [lo, hi) of a file as the reader's Segment: parquet rows at their virtual offsets, jsonl lines
    at the byte offsets where they start (counting newlines from the noted line at or before lo)."""
    if is_parquet(path):
        per_row = ParquetReader(path, None).per_row
        return Segment(seg.file, seg.lo * per_row, seg.hi * per_row)
    j = min(seg.lo // LINE_STEP, len(line_starts) - 1)
    bounds, line, pos, want = {}, j * LINE_STEP, line_starts[j], len({seg.lo, seg.hi})
    with open_bytes(path) as f:
        f.seek(pos)
        while len(bounds) < want:
            for target in (seg.lo, seg.hi):
                if target == line and target not in bounds:
                    bounds[target] = pos
            if len(bounds) == want:
                break
            chunk = f.read(1 << 20)
            if not chunk:
                break
            start = 0
            for target in sorted(t for t in (seg.lo, seg.hi) if t not in bounds):
                while line < target and (nl := chunk.find(b"\n", start)) >= 0:
                    line, start = line + 1, nl + 1
                if line == target:
                    bounds[target] = pos + start
            pos += len(chunk)
            line += chunk.count(b"\n", start)
    return Segment(seg.file, bounds.get(seg.lo, pos), bounds.get(seg.hi, pos))
