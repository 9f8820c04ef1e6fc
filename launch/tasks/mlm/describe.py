"""What the dry run shows of a pretraining corpus: per source its kind, files, bytes or rows, estimated tokens,
weight, share and epochs within the run; then one masked block, read through the real loader."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np

from bertlaunch.core.preflight import count
from bertlaunch.data.corpus.compressed import compression_of, inner_name, open_bytes
from bertlaunch.data.corpus.parquet import ParquetReader, is_parquet
from bertlaunch.data.corpus.reader import JSONL_SUFFIXES
from bertlaunch.data.corpus.shards import Segment
from bertlaunch.data.mlm.batches import MLMDataset, MLMSettings, initial_states
from bertlaunch.data.mlm.cache import read_meta
from bertlaunch.data.mlm.mixture import shares
from bertlaunch.tasks.mlm.corpus import Corpus


def describe_corpus(cfg, spec, tok, corpus: Corpus, n_streams: int, p) -> None:
    """Per source: kind, files, bytes or rows, estimated tokens, weight, share and epochs in this run; then
    one masked block, read through the real loader."""
    d = cfg.data
    slots = sum(ph.global_batch * ph.block_size * (ph.end - ph.start) for ph in p.phases)
    if d.cache:
        est = read_meta(d.cache)["n_tokens"]
        print(f"data          token cache {d.cache}: {len(corpus.files)} shard(s), {est / 1e6:.2f}M tokens, "
              f"~{slots / max(est, 1):.2f} epoch(s) in this run, {n_streams} stream(s)")
    elif corpus.sources:
        print(f"data          a mixture of {len(corpus.sources)} sources, {n_streams} stream(s) each:")
        for src, share in zip(corpus.sources, shares(corpus.sources)):
            kind, size, est = _describe(src.files, src.sizes, spec, src.text_field)
            print(f"  {src.name:<12}{kind}, {len(src.files)} file(s), {size}, ~{count(est)} tokens; weight "
                  f"{src.weight:g} -> {share:.1%} of blocks, ~{share * slots / max(est, 1):.2f} epoch(s) in this run")
    else:
        kind, size, est = _describe(corpus.files, corpus.sizes, spec, d.text_field)
        print(f"data          {kind}, {len(corpus.files)} file(s), {size} -> ~{est / 1e6:.2f}M tokens per epoch "
              f"(~{est / d.block_size:,.0f} blocks of {d.block_size}), ~{slots / max(est, 1):.2f} epoch(s) in this "
              f"run, {n_streams} stream(s)")
    s = MLMSettings.from_config(cfg, micro_batch_size=min(cfg.train.micro_batch_size, 2), audit=False,
                                mlm_probability=p.phases[0].settings.get("mlm_probability", d.mlm_probability))
    batch = next(iter(MLMDataset(corpus.files, corpus.sizes, spec, s, initial_states(0, 1, 1, corpus.sources),
                                 cache=d.cache, sources=corpus.sources)))
    ids, labels = batch["input_ids"][0].numpy(), batch["labels"][0].numpy()
    print(f"one block     input ({int((labels != -100).sum())} of {len(ids)} tokens masked):\n  "
          + tok.decode(ids.tolist())[:600])
    if d.isolate_documents:
        starts = batch["doc_starts"].numpy()
        print(f"  documents isolated (data.isolate_documents): {int((starts < len(ids)).sum())} in this block, each "
              "attending only to itself, positions restarting at 0 at offsets "
              + ", ".join(str(x) for x in starts[starts < len(ids)]))
    shown = np.where(labels != -100, labels, spec.pad_id)
    print("  targets: " + " ".join(tok.convert_ids_to_tokens([int(t) for t in shown if t != spec.pad_id]))[:300])


def _describe(files: list[str], sizes: list[int], spec, text_field: str) -> tuple[str, str, int]:
    """(kinds, size, estimated tokens) of a set of corpus files. Tokens per stored byte (text, maybe
    compressed) or per row (Parquet, counted from its metadata) are measured on up to 2 MB of text."""
    kinds = Counter(".".join(f.rsplit("/", 1)[-1].split(".")[-2 if compression_of(f) else -1:]) for f in files)
    kind = ", ".join(f"{k}" + (f" x{n}" if n > 1 else "") for k, n in kinds.items())
    pq_files = [f for f in files if is_parquet(f)]
    text_bytes = sum(n for f, n in zip(files, sizes) if not is_parquet(f))
    rows, est = 0, 0
    if pq_files:
        readers = [ParquetReader(f, text_field) for f in pq_files]
        rows = sum(r.rows for r in readers)
        sample, n_rows = [], 0
        for r in readers:
            for piece in r.pieces(_first_rows(r)):
                sample.append(piece.text)
                n_rows += 1
                if sum(map(len, sample)) >= 2 << 20:
                    break
        per_row = sum(map(len, spec.encode(sample))) / max(n_rows, 1) + 2 if sample else 0
        est += math.ceil(per_row * rows)
    if text_bytes:
        sample, stored = b"", 0
        for f in (f for f in files if not is_parquet(f)):
            with open_bytes(f) as fh:
                sample += fh.read((2 << 20) - len(sample))
                stored += getattr(fh, "compressed_read", None) or fh.tell()
            if len(sample) >= 2 << 20:
                break
        text = sample.decode("utf-8", errors="replace")
        if any(inner_name(f).endswith(JSONL_SUFFIXES) for f in files):
            text = "\n".join(_jsonl_texts(text, text_field))
        est += math.ceil(sum(map(len, spec.encode([text]))) / max(stored, 1) * text_bytes)
    size = (f"{text_bytes / 1e6:.1f} MB" if text_bytes else "") + (", " if text_bytes and rows else "") \
        + (f"{rows:,} rows" if rows else "")
    packed = sum(1 for f in files if compression_of(f))
    if packed:
        size += f" ({packed} compressed: each read whole by one stream)"
    return kind, size, est


def _first_rows(reader):
    return Segment(0, 0, reader.per_row * min(reader.rows, 10_000))


def _jsonl_texts(text: str, field: str) -> list[str]:
    out = []
    for line in text.splitlines()[:-1]:  # the last line may be cut by the sample
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get(field), str):
            out.append(rec[field])
    return out
