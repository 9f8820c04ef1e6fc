"""Sharding: every document is read by exactly one (rank, worker) stream, whatever the file layout."""

import json
import os
import random
from collections import Counter

import pytest
import torch

from bertlaunch.data.corpus.reader import PieceReader, file_sizes, text_readers
from bertlaunch.data.corpus.shards import Segment, partition
from bertlaunch.data.mlm.batches import MLMDataset, MLMSettings, initial_states, make_loader
from bertlaunch.data.mlm.stream import StreamState, TextStream, replan
from tests.helpers import make_corpus


def reference_docs(path, mode):
    text = open(path, encoding="utf-8").read()
    if path.endswith(".jsonl"):
        return [json.loads(x)["text"] for x in text.splitlines() if x.strip() and json.loads(x)["text"].strip()]
    if mode == "line":
        return [x for x in text.split("\n") if x.strip()]
    docs, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    return docs + (["\n".join(cur)] if cur else [])


def read_stream_docs(files, segs, mode, max_chunk=1 << 20):
    """Documents (as text) that one stream reads, by joining its pieces."""
    docs, cur = [], None
    for seg in segs:
        reader = PieceReader(files[seg.file], mode, "text", max_chunk, "strict")
        for p in reader.pieces(seg):
            cur = p.text if p.doc_start else cur + p.text
            if p.doc_end:
                docs.append(cur.rstrip("\n"))
    return docs


def uneven_files(tmp_path, mode, n_files=3):
    sizes = [1, 40, 7, 300, 2][:n_files]
    return [str(make_corpus(tmp_path / f"f{i}.txt", n, seed=i, mode=mode)) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("mode", ["blank_line", "line"])
@pytest.mark.parametrize("n_files,n_streams", [(3, 4), (5, 2), (1, 4), (5, 7), (2, 1)])
def test_every_document_exactly_once(tmp_path, mode, n_files, n_streams):
    files = uneven_files(tmp_path, mode, n_files)
    expected = Counter(d for f in files for d in reference_docs(f, mode))
    parts = partition(file_sizes(files), n_streams)
    got = Counter(d for segs in parts for d in read_stream_docs(files, segs, mode))
    assert got == expected
    assert sum(expected.values()) == sum(len(reference_docs(f, mode)) for f in files)


def test_jsonl_documents_and_blank_records(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": f"record {i} " + "word " * (i % 13), "id": i} for i in range(200)]
    rows.insert(50, {"text": "   ", "id": -1})  # whitespace-only: not a document
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    files = [str(path)]
    expected = Counter(reference_docs(files[0], "line"))
    got = Counter(d for segs in partition(file_sizes(files), 3) for d in read_stream_docs(files, segs, "line"))
    assert got == expected and len(expected) == 200


def test_long_line_streams_in_pieces(tmp_path, spec):
    """A 3 MB line is read in <= 64 KB pieces cut at whitespace; its tokens equal the whole line's."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta"]
    line = " ".join(rng.choice(words) for _ in range(450_000))
    path = tmp_path / "long.txt"
    path.write_text("short doc one\n" + line + "\nshort doc two\n")
    reader = PieceReader(str(path), "line", "text", 1 << 16, "strict")
    pieces = list(reader.pieces(Segment(0, 0, path.stat().st_size)))
    assert len(pieces) > 40 and max(len(p.text.encode()) for p in pieces) <= 1 << 16
    assert [p.doc_start for p in pieces].count(True) == 3 and [p.doc_end for p in pieces].count(True) == 3
    stream = TextStream(text_readers([str(path)], "line", "text", 1 << 16, "strict"), file_sizes([str(path)]),
                        spec, block_size=128, last_block="pad", state=StreamState(0, 1), finite=True)
    ours = torch.tensor([t for b in stream for t in b.tokens.tolist()])
    ref = []
    for text in ["short doc one", line, "short doc two"]:
        ref += [spec.cls_id] + spec.encode([text])[0] + [spec.sep_id]
    assert torch.equal(ours, torch.tensor(ref))


def audit_loader(files, spec, world, workers, block=32, micro=4):
    """Run the real loader (worker processes) for every rank, one epoch; doc -> tokens trained."""
    settings = MLMSettings(block, micro, 0.15, False, 0, audit=True)
    per_doc = Counter()
    for rank in range(world):
        ds = MLMDataset(files, file_sizes(files), spec, settings, initial_states(rank, world, workers),
                        finite=True)
        for batch in make_loader(ds, workers):
            for _, doc, n in batch["meta"]["audit"]:
                per_doc[doc] += n
    return per_doc


def test_worker_batches_equal_in_process_batches(tmp_path, spec):
    """Batches from a loader worker cross the pipe compacted (16-bit ids, row lengths, masked rows) and are
    rebuilt in the training process: the same int64 tensors, value for value, as made in-process."""
    files = uneven_files(tmp_path, "blank_line", 3)
    settings = MLMSettings(32, 4, 0.15, False, 0)

    def batches(workers):
        ds = MLMDataset(files, file_sizes(files), spec, settings, initial_states(0, 1, 1), finite=True)
        return list(make_loader(ds, workers))

    local, remote = batches(0), batches(1)
    assert len(local) == len(remote) > 5
    for a, b in zip(local, remote):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if k == "meta":
                assert v == b[k]
            else:
                assert v.dtype == b[k].dtype == torch.int64 and torch.equal(v, b[k]), k


def test_wire_form_keeps_ids_above_16_bits():
    from bertlaunch.data.mlm.batches import compact, from_wire

    ids = torch.tensor([[70000, 5, 1, 0], [3, 65536, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
             "labels": torch.tensor([[70000, -100, -100, -100], [-100, 65536, -100, -100]]),
             "mlm_rows": torch.tensor([0, 5, 0, 0]), "mlm_targets": torch.tensor([70000, 65536, -100, -100]),
             "meta": {"n_masked": 2}}
    back = from_wire(*compact(batch)["wire"], batch["meta"])
    for k in ("input_ids", "attention_mask", "labels", "mlm_rows", "mlm_targets"):
        assert back[k].dtype == torch.int64 and torch.equal(back[k], batch[k]), k


def doc_token_counts(files, spec, mode="blank_line"):
    out = {}
    for fi, f in enumerate(files):
        reader = PieceReader(f, mode, "text", 1 << 20, "strict")
        for p in reader.pieces(Segment(0, 0, file_sizes([f])[0])):
            key = fi * (1 << 40) + p.doc_offset
            out[key] = out.get(key, 0) + len(spec.encode([p.text])[0]) + p.doc_start + p.doc_end
    return out


def test_two_ranks_two_workers_real_loader(tmp_path, spec):
    files = uneven_files(tmp_path, "blank_line", 3)
    expected = doc_token_counts(files, spec)
    assert audit_loader(files, spec, world=2, workers=2) == expected
    assert audit_loader(files, spec, world=1, workers=1) == expected


def consume(state_dict, files, spec, n_blocks, block=32):
    """Blocks of one stream from a saved state; returns (docs->tokens of those blocks, state after)."""
    stream = TextStream(text_readers(files, "blank_line", "text", 1 << 20, "strict"), file_sizes(files), spec,
                        block_size=block, last_block="pad", state=StreamState.from_dict(state_dict), finite=True,
                        audit=True)
    seen, state, blocks = Counter(), state_dict, []
    for i, b in enumerate(stream):
        if i == n_blocks:
            break
        for _, doc, n in b.audit:
            seen[doc] += n
        state, blocks = stream.state.to_dict(), blocks + [b.tokens.tolist()]
    return seen, state, blocks


def test_resume_from_any_block_is_exact(tmp_path, spec):
    files = uneven_files(tmp_path, "blank_line", 3)
    start = StreamState(1, 3).to_dict()
    _, _, all_blocks = consume(start, files, spec, 10_000)
    for k in (0, 1, 7, len(all_blocks) - 1):
        _, state, _ = consume(start, files, spec, k)
        _, _, rest = consume(state, files, spec, 10_000)
        assert rest == all_blocks[k:], k


@pytest.mark.parametrize("old_n,new_n", [(3, 2), (1, 2), (2, 1), (4, 3)])
def test_replan_keeps_exactly_once(tmp_path, spec, old_n, new_n):
    """Stop every stream at a different point, re-split the rest over new_n streams: no doc lost or repeated."""
    files = uneven_files(tmp_path, "blank_line", 4)
    sizes = file_sizes(files)
    seen, states = Counter(), []
    for s in range(old_n):
        got, state, _ = consume(StreamState(s, old_n).to_dict(), files, spec, 3 + 5 * s)
        seen += got
        states.append(StreamState.from_dict(state))
    for new in replan(states, sizes, new_n):
        got, _, _ = consume(new.to_dict(), files, spec, 10_000)
        seen += got
    assert seen == doc_token_counts(files, spec)


def loader_process(files, then: str) -> str:
    """A python -c script: a training process's 2-worker loader over `files` (batches carry the worker's pid in
    meta["pid"]), `batches` iterated once, then the code `then`."""

    return f"""
import os, sys, time
from bertlaunch.data.corpus.reader import file_sizes
from bertlaunch.data.mlm.batches import MLMDataset, MLMSettings, initial_states, make_loader
from bertlaunch.data.tokenize import load_spec

class Pids(MLMDataset):
    def __iter__(self):
        for batch in super().__iter__():
            batch["meta"]["pid"] = os.getpid()
            yield batch

files = {files!r}
ds = Pids(files, file_sizes(files), load_spec("bert-base-uncased"), MLMSettings(32, 2, 0.15, False, 0),
          initial_states(0, 1, 2))
batches = iter(make_loader(ds, 2))
first = next(batches)
{then}
"""


def test_training_process_leaving_on_an_error_does_not_wait_for_its_workers(tmp_path):
    """Workers ignore SIGTERM, and multiprocessing's exit handler terminates then joins daemon children: a process
    leaving on an error with its loader open (a dead peer rank, any crash) used to hang there for good."""
    import subprocess
    import sys

    script = loader_process(uneven_files(tmp_path, "blank_line", 2), 'raise RuntimeError("a peer rank died")')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.rstrip().endswith("RuntimeError: a peer rank died"), proc.stderr


def test_loader_workers_die_with_their_training_process(tmp_path):
    """Workers ignore SIGTERM (they serve batches until the checkpoint) but must not outlive a training process
    that was SIGKILLed: the kernel ends them at once (otherwise DeepSpeed's launcher waits 30 s for them)."""
    import signal
    import subprocess
    import sys
    import time

    script = loader_process(uneven_files(tmp_path, "blank_line", 2), """
print(sorted({first["meta"]["pid"]} | {next(batches)["meta"]["pid"] for _ in range(3)}), flush=True)
time.sleep(600)""")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    workers = json.loads(proc.stdout.readline())
    assert len(workers) == 2 and all(os.path.exists(f"/proc/{w}") for w in workers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def running(pid):  # a killed worker may linger a moment as a zombie until init reaps it
        try:
            return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 3
    while time.time() < deadline and any(map(running, workers)):
        time.sleep(0.05)
    assert [w for w in workers if running(w)] == []
