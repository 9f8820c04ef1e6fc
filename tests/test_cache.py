"""Token cache: built in parallel, equal to streaming token for token, same sharding/resume guarantees."""

from collections import Counter

import numpy as np
import pytest

from bertlaunch.data.corpus.reader import file_sizes, text_readers
from bertlaunch.data.corpus.shards import DataError
from bertlaunch.data.mlm.cache import cache_readers, check_tokenizer, read_meta, shard_names_and_sizes
from bertlaunch.data.mlm.cache_build import prepare
from bertlaunch.data.mlm.stream import StreamState, TextStream
from bertlaunch.data.tokenize import load_spec
from tests.helpers import make_corpus, read_metrics


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Three uneven corpus files and their token cache (many small shards)."""
    d = tmp_path_factory.mktemp("cache")
    files = [str(make_corpus(d / f"f{i}.txt", n, seed=i)) for i, n in enumerate([120, 3, 260])]
    meta = prepare(files, "bert-base-uncased", str(d / "cache"), workers=2, shard_bytes=4096)
    return files, str(d / "cache"), meta


def blocks(readers, sizes, spec, state, n=None, block=32):
    stream = TextStream(readers, sizes, spec, block_size=block, last_block="pad", state=state, finite=True)
    out = []
    for b in stream:
        out.append(b.tokens.tolist())
        if n is not None and len(out) == n:
            return out, stream.state.to_dict()
    return out, stream.state.to_dict()


def test_cache_equals_streaming_token_for_token(cached, spec):
    files, cache, meta = cached
    assert len(meta["shards"]) > 2 and meta["n_docs"] == 383
    text_tokens, _ = blocks(text_readers(files, "blank_line", "text", 1 << 20, "strict"), file_sizes(files),
                            spec, StreamState(0, 1))
    _, sizes = shard_names_and_sizes(cache)
    cache_tokens, _ = blocks(cache_readers(cache), sizes, spec, StreamState(0, 1))
    assert cache_tokens == text_tokens  # same blocks, same remainders carried, same tail


def split_docs(seq, cls_id):
    docs, cur = [], []
    for t in seq:
        if t == cls_id and cur:
            docs.append(tuple(cur))
            cur = []
        cur.append(t)
    return docs + ([tuple(cur)] if cur else [])


@pytest.mark.parametrize("n", [2, 5])
def test_cache_sharding_every_document_once(cached, spec, n):
    _, cache, _ = cached
    _, sizes = shard_names_and_sizes(cache)
    full, _ = blocks(cache_readers(cache), sizes, spec, StreamState(0, 1))
    expected = Counter(split_docs([t for b in full for t in b], spec.cls_id))
    got = Counter()
    for s in range(n):
        out, _ = blocks(cache_readers(cache), sizes, spec, StreamState(s, n))
        got += Counter(split_docs([t for b in out for t in b], spec.cls_id))
    assert got == expected


def test_cache_resume_mid_piece_is_exact(cached, spec):
    _, cache, _ = cached
    _, sizes = shard_names_and_sizes(cache)
    everything, _ = blocks(cache_readers(cache), sizes, spec, StreamState(1, 2))
    for k in (1, 5, len(everything) // 2):
        _, state = blocks(cache_readers(cache), sizes, spec, StreamState(1, 2), n=k)
        rest, _ = blocks(cache_readers(cache), sizes, spec, StreamState.from_dict(state))
        assert rest == everything[k:]


def test_cache_refuses_another_tokenizer(cached, tmp_path):
    _, cache, _ = cached
    meta = read_meta(cache)
    meta["tokenizer"]["sha256"] = "0" * 64
    with pytest.raises(DataError, match="was built with another tokenizer"):
        check_tokenizer(meta, load_spec("bert-base-uncased"), cache)
    with pytest.raises(DataError, match="no meta.json"):
        read_meta(str(tmp_path))


def test_training_from_the_cache(cached, tmp_path, tiny_config, inproc):
    _, cache, _ = cached
    cfg = tiny_config("pretrain", {"data.train_files": [], "data.cache": cache, "data.block_size": 32,
                                   "data.num_workers": 2, "train.max_steps": 6, "train.micro_batch_size": 4,
                                   "log.every": 2, "checkpoint.every": 0})
    inproc("pretrain", cfg)
    rows = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6] and np.isfinite([r["loss"] for r in rows]).all()
    assert rows[-1]["tokens"] == 6 * 4 * 32  # full blocks only: the cache is long enough
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("source", ["cache", "text"])
def test_runs_of_blocks_equal_one_by_one(cached, spec, source):
    """Runs of k blocks cut at once (from one cache piece, or across a read batch of text pieces) give the
    same tokens, mask keys and stream states (documents counted included), batch by batch, as cutting blocks
    one at a time. The text case has documents split into several pieces (max_chunk_bytes) and resumes."""
    from bertlaunch.data.mlm.batches import MLMDataset, MLMSettings, initial_states

    files, cache, _ = cached
    if source == "cache":
        _, sizes, files = *shard_names_and_sizes(cache), None
    else:
        sizes, cache = file_sizes(files), None
    s = MLMSettings(block_size=16, micro_batch_size=7, mlm_probability=0.15, whole_word_masking=False, seed=3,
                    max_chunk_bytes=48)
    runs_seen = []

    def batches(max_run_cap, state=None):
        ds = MLMDataset(files, sizes, spec, s, [state] if state else initial_states(0, 1, 1), finite=True,
                        cache=cache)
        stream = ds.stream_for(ds.states[0])
        original = type(stream).__iter__

        def capped(self):
            gen = original(self)
            while True:
                self.max_run = min(self.max_run, max_run_cap)
                try:
                    blk = next(gen)
                except StopIteration:
                    return
                runs_seen.append(blk.count)
                yield blk
        type(stream).__iter__ = capped
        try:
            ds.stream_for = lambda state: stream
            return list(iter(ds))
        finally:
            type(stream).__iter__ = original

    one = batches(1)
    assert max(runs_seen) == 1
    runs = batches(10**6)
    assert max(runs_seen) > 1  # the fast path was taken
    assert len(one) == len(runs) > 10
    for a, b in zip(one, runs):
        for key in ("input_ids", "labels", "attention_mask", "mlm_rows", "mlm_targets"):
            assert a[key].equal(b[key]), key
        assert a["meta"]["state"] == b["meta"]["state"]
    assert one[-1]["meta"]["state"]["docs"] == 383  # every document counted once
    # resumed from a mid-epoch state, runs continue exactly as the uninterrupted ones (docs not recounted)
    k = len(one) // 3
    resumed = batches(10**6, one[k]["meta"]["state"])
    assert [b["meta"]["state"] for b in resumed] == [b["meta"]["state"] for b in one[k + 1:]]
    assert all(a["input_ids"].equal(b["input_ids"]) for a, b in zip(resumed, one[k + 1:]))


def test_prepare_cli_builds_the_same_cache(cached, tmp_path, capsys):
    from bertlaunch.tools import prepare as cli

    files, cache, meta = cached
    assert cli.main(["--files", *files, "--out", str(tmp_path / "c2"), "--workers", "1"]) == 0
    assert f"token cache {tmp_path / 'c2'}: {meta['n_tokens']} tokens, {meta['n_docs']} documents" in \
        capsys.readouterr().out
    assert cli.main(["--out", str(tmp_path / "c3")]) == 2


def test_cache_document_starts_equal_streaming(cached, spec):
    """data.isolate_documents: a token-cache piece holds many documents and its blocks come in runs; where the
    documents start in each block is the same as when streaming the text one block at a time."""
    files, cache, _ = cached

    def starts(readers, sizes, run):
        stream = TextStream(readers, sizes, spec, block_size=32, last_block="pad", state=StreamState(0, 1),
                            finite=True, doc_starts=True)
        stream.max_run, out = run, []
        for b in stream:
            k = b.count or 1
            out += [b.starts[(b.starts >= j * 32) & (b.starts < (j + 1) * 32)].tolist() for j in range(k)]
            out[-k:] = [[x - j * 32 for x in row] for j, row in enumerate(out[-k:])]
        return out

    text = starts(text_readers(files, "blank_line", "text", 1 << 20, "strict"), file_sizes(files), 1)
    runs = starts(cache_readers(cache), shard_names_and_sizes(cache)[1], 8)
    assert runs == text and sum(map(len, text)) == 383  # every document's start, once
