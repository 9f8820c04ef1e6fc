"""Compressed corpora (.gz, .zst, .bz2, .xz) and Parquet: the same token stream as the plain file, every
document once over any number of streams, exact resume and re-split, the token cache, and clear errors."""

import bz2
import gzip
import json
import lzma
import random
from collections import Counter

import numpy as np
import pytest
import zstandard

import bertlaunch.data.mlm.cache_build
from bertlaunch.data.corpus.compressed import Window
from bertlaunch.data.corpus.reader import file_sizes, text_readers
from bertlaunch.data.corpus.shards import DataError
from bertlaunch.data.mlm.stream import StreamState, TextStream, empty_streams, replan
from tests.helpers import make_corpus

COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
            ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}


def compressed_copy(path, ext):
    out = path.parent / (path.name + ext)
    out.write_bytes(COMPRESS[ext](path.read_bytes()))
    return out


def blocks_of(files, state, spec, mode="blank_line", n=10_000, block=32):
    """(tokens of each block, audit, state after each block) of one stream, from `state`."""
    stream = TextStream(text_readers([str(f) for f in files], mode, "text", 1 << 10, "strict"),
                        file_sizes([str(f) for f in files]), spec, block_size=block, last_block="pad",
                        state=StreamState.from_dict(state), finite=True, audit=True)
    out = []
    for i, b in enumerate(stream):
        if i == n:
            break
        out.append((b.tokens.tolist(), b.audit, stream.state.to_dict()))
    return out


def jsonl_corpus(path, n):
    rng = random.Random(1)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(["river", "stone", "é", "light"])
                                                         for _ in range(rng.randint(1, 300)))}) + "\n"
                            for _ in range(n)))
    return path


@pytest.mark.parametrize("ext", list(COMPRESS))
def test_same_token_stream_as_the_plain_file(tmp_path, spec, ext):
    """Long lines (read in 1 KiB pieces), blank-line documents and JSON lines, compressed or not, give the
    same blocks with the same document ids (decompressed offsets are the plain file's offsets)."""
    for plain, mode in ((make_corpus(tmp_path / "c.txt", 120, words_per_doc=(1, 900)), "blank_line"),
                        (jsonl_corpus(tmp_path / "c.jsonl", 80), "line")):
        start = StreamState(0, 1).to_dict()
        want = blocks_of([plain], start, spec, mode)
        got = blocks_of([compressed_copy(plain, ext)], start, spec, mode)
        assert [b[:2] for b in got] == [b[:2] for b in want] and len(want) > 20


def test_whole_files_exactly_once_resume_and_resplit(tmp_path, spec):
    """Compressed files are sharding units: with fewer files than streams some streams get none (and the
    check names them); every document once; a resume mid-file and a re-split to another stream count
    continue exactly."""
    files = [compressed_copy(make_corpus(tmp_path / f"f{i}.txt", n, seed=i), ext)
             for i, (n, ext) in enumerate([(40, ".gz"), (30, ".zst"), (50, ".bz2")])]
    names = [str(f) for f in files]
    readers = text_readers(names, "blank_line", "text", 1 << 20, "strict")
    assert len(empty_streams(readers, file_sizes(names), 4)) == 1  # 3 files cannot feed 4 streams
    assert empty_streams(readers, file_sizes(names), 3) == []  # similar sizes: one file per stream
    truth = Counter()
    for _, audit, _ in blocks_of(files, StreamState(0, 1).to_dict(), spec):
        for _, doc, k in audit:
            truth[doc] += k
    seen, states = Counter(), []
    for s in range(3):  # 3 streams, each stopped somewhere (one mid-file)
        got = blocks_of(files, StreamState(s, 3).to_dict(), spec, n=4 + 3 * s)
        for _, audit, _ in got:
            for _, doc, k in audit:
                seen[doc] += k
        states.append(StreamState.from_dict(got[-1][2] if got else StreamState(s, 3).to_dict()))
    resumed = blocks_of(files, states[0].to_dict(), spec)  # resume = decompress and skip, then read on
    full = blocks_of(files, StreamState(0, 3).to_dict(), spec)
    assert [b[0] for b in resumed] == [b[0] for b in full[4:]]
    for new in replan(states, file_sizes(names), 2, units=frozenset({0, 1, 2})):
        for _, audit, _ in blocks_of(files, new.to_dict(), spec):
            for _, doc, k in audit:
                seen[doc] += k
    assert seen == truth


def test_bad_compressed_input_is_named(tmp_path, spec):
    plain = make_corpus(tmp_path / "c.txt", 200)
    data = gzip.compress(plain.read_bytes())
    (tmp_path / "cut.txt.gz").write_bytes(data[: len(data) // 2])
    bad = bytearray(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    bad[40:60] = bytes(20)
    (tmp_path / "bad.txt.zst").write_bytes(bytes(bad))
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 au lait\n\nsecond doc\n")
    for name, msg in (("cut.txt.gz", "cut.txt.gz: the compressed stream is truncated or corrupt after"),
                      ("bad.txt.zst", "bad.txt.zst: the zstd stream is truncated or corrupt"),
                      (compressed_copy(latin, ".xz").name, "latin.txt.xz: line 1 (byte 3) is not valid UTF-8")):
        with pytest.raises(DataError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            blocks_of([tmp_path / name], StreamState(0, 1).to_dict(), spec)
    xz = str(tmp_path / "latin.txt.xz")
    stream = TextStream(text_readers([xz], "blank_line", "text", 1 << 20, "replace"), file_sizes([xz]), spec,
                        block_size=16, last_block="pad", state=StreamState(0, 1), finite=True)
    assert len(list(stream)) == 1 and stream.replaced_bytes == 1


def test_window_seeks_back_within_its_buffer(tmp_path):
    raw = b"".join(b"line %d\n" % i for i in range(50_000))
    path = tmp_path / "w.gz"
    path.write_bytes(gzip.compress(raw))
    fresh = Window(str(path), ".gz", keep=1000)
    fresh.seek(300_001)  # a resume: the first read is a line far past anything decompressed yet
    assert fresh.readline() == raw[300_001:raw.index(b"\n", 300_001) + 1]
    w = Window(str(path), ".gz", keep=1000)
    assert w.readline() == b"line 0\n" and w.read(10) == raw[7:17]
    w.seek(30_000)
    assert w.readline(5) == raw[30_000:30_005]
    w.seek(29_500)  # back, within the kept window
    assert w.read(20) == raw[29_500:29_520]
    assert len(w.buf) < 200_000


def cache_shards(tmp_path, src, workers=2):
    """The shards (token ids, document starts) of a token cache of src, read back."""
    from bertlaunch.data.mlm.cache_build import prepare

    out = tmp_path / f"cache_{str(src).replace('/', '_').replace(':', '_')}"
    meta = prepare([str(src)], "bert-base-uncased", str(out), workers=workers, shard_bytes=8 << 10,
                   shard_records=40)
    return [(np.fromfile(out / s["tokens"], dtype=meta["dtype"]).tolist(), np.load(out / s["docs"]).tolist())
            for s in meta["shards"]]


def test_token_cache_is_the_same_from_every_format(tmp_path, spec):
    """Text is cut by decompressed byte and records by record, so a cache holds the same shards, byte for
    byte, whether the corpus is X.txt or X.txt.gz/.zst, and X.jsonl, X.jsonl.gz/.zst or X.parquet; laid end
    to end, the shards are the token stream that training reads from the file."""
    plain = make_corpus(tmp_path / "x.txt", 300, words_per_doc=(5, 200))
    jsonl, pq_file = parquet_corpus(tmp_path, n=300, row_group=37)
    for files, mode, workers in (((plain, compressed_copy(plain, ".gz"), compressed_copy(plain, ".zst")),
                                  "blank_line", 2),
                                 ((jsonl, compressed_copy(jsonl, ".gz"), compressed_copy(jsonl, ".zst"), pq_file),
                                  "line", 3)):
        shards = [cache_shards(tmp_path, f, workers) for f in files]
        assert len(shards[0]) > 3 and all(s == shards[0] for s in shards[1:])
        (whole,) = [b[0] for b in blocks_of([files[0]], StreamState(0, 1).to_dict(), spec, mode, block=1 << 22)]
        assert [t for tokens, _ in shards[0] for t in tokens] == whole
        assert sum(len(docs) - 1 for _, docs in shards[0]) == (300 if mode == "blank_line" else 299)


def test_record_split_from_the_line_index(tmp_path, monkeypatch):
    """Shard jobs start counting lines at the noted line nearest their first record: with a line noted every
    7 lines (instead of 16384), the shards of .jsonl and .jsonl.gz are unchanged."""

    jsonl, _ = parquet_corpus(tmp_path, n=300, row_group=37)
    gz = compressed_copy(jsonl, ".gz")
    want = [cache_shards(tmp_path / "default", f, workers=1) for f in (jsonl, gz)]
    monkeypatch.setattr(bertlaunch.data.mlm.cache_build, "LINE_STEP", 7)
    assert [cache_shards(tmp_path / "step7", f, workers=1) for f in (jsonl, gz)] == want
    assert len(want[0]) > 5


def parquet_corpus(tmp_path, n=300, row_group=37):
    import pyarrow as pa
    import pyarrow.parquet as pq

    plain = jsonl_corpus(tmp_path / "p.jsonl", n)
    texts = [json.loads(x)["text"] for x in plain.read_text().splitlines()]
    texts[5] = ""  # an empty row is not a document
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": list(range(n)), "text": texts, "score": [0.5] * n}), path,
                   row_group_size=row_group)
    return plain, path


def test_parquet_rows_exactly_once_resume_and_resplit(tmp_path, spec):
    plain, path = parquet_corpus(tmp_path)
    start = StreamState(0, 1).to_dict()
    want = [b[0] for b in blocks_of([plain], start, spec, "line")]
    assert [b[0] for b in blocks_of([path], start, spec, "line")] == want  # several row groups, same tokens
    truth = Counter()
    for _, audit, _ in blocks_of([path], start, spec, "line"):
        for _, doc, k in audit:
            truth[doc] += k
    seen, states = Counter(), []
    for s in range(2):  # 2 streams stop mid row group, then 3 streams take over the rest
        got = blocks_of([path], StreamState(s, 2).to_dict(), spec, "line", n=20 + 9 * s)
        for _, audit, _ in got:
            for _, doc, k in audit:
                seen[doc] += k
        states.append(StreamState.from_dict(got[-1][2]))
    full = blocks_of([path], StreamState(1, 2).to_dict(), spec, "line")
    assert [b[0] for b in blocks_of([path], states[1].to_dict(), spec, "line")] == [b[0] for b in full[29:]]
    for new in replan(states, file_sizes([str(path)]), 3):
        for _, audit, _ in blocks_of([path], new.to_dict(), spec, "line"):
            for _, doc, k in audit:
                seen[doc] += k
    assert seen == truth


def test_bad_parquet_input_is_named(tmp_path, spec):
    _, path = parquet_corpus(tmp_path, n=20)
    with pytest.raises(DataError, match=r"p.parquet: no column 'txt' \(data.text_field\); did you mean 'text'\? "
                                        r"The columns are: id, text, score"):
        text_readers([str(path)], "line", "txt", 1 << 20, "strict")
    with pytest.raises(DataError, match="column 'score' holds double, not text"):
        text_readers([str(path)], "line", "score", 1 << 20, "strict")
    (tmp_path / "broken.parquet").write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        file_sizes([str(tmp_path / "broken.parquet")])
