"""Bad input, numerical and distributed faults, and unsafe files: each fails fast with the promised message
(or follows its counted policy), never hangs, never trains silently on garbage."""

import json
import os
import pickle
import re
import signal
import socket
import time
import tracemalloc

import pytest

from bertlaunch.core.checkpoint import list_checkpoints
from bertlaunch.data.corpus.reader import PieceReader, text_readers
from bertlaunch.data.corpus.shards import DataError, Segment
from bertlaunch.data.mlm.stream import StreamState, TextStream
from bertlaunch.data.tables.read import infer_labels, read_rows, require_columns
from bertlaunch.data.tokenize import load_spec
from tests.helpers import REPO, Job, assert_resumed, read_metrics, run

BAD = REPO / "tests" / "bad_inputs"


@pytest.fixture
def pretrain_cfg(tiny_config):
    """The robustness runs: 10 steps of 4 x 32 tokens, a checkpoint every 4 steps."""
    def make(files, overrides=None):
        return tiny_config("pretrain", {"data.train_files": files, "data.block_size": 32, "train.max_steps": 10,
                                        "train.micro_batch_size": 4, "train.lr": 1e-3, "train.warmup_steps": 0,
                                        "checkpoint.keep_last": 5, **(overrides or {})})
    return make


# -- bad input files -------------------------------------------------------------------------------
def test_empty_corpus(pretrain_cfg, inproc):
    proc = inproc("pretrain", pretrain_cfg([BAD / "empty.txt"]), check=False)
    assert proc.returncode == 2 and "every file is empty" in proc.stderr


def test_more_streams_than_documents(pretrain_cfg, inproc):
    proc = inproc("pretrain", pretrain_cfg([BAD / "one_doc.txt"], {"data.num_workers": 3}), check=False)
    assert proc.returncode == 2
    assert "2 of 3 data streams (world_size x data.num_workers) would get no document" in proc.stderr


def test_fewer_compressed_files_than_streams(pretrain_cfg, inproc, tmp_path):
    """A compressed file is read whole by one stream: with 1 file and 2 streams the dry run and the run
    both say so and point to the token cache."""
    import gzip

    gz = tmp_path / "c.txt.gz"
    gz.write_bytes(gzip.compress((BAD.parent.parent / "README.md").read_bytes()))
    cfg = pretrain_cfg([gz], {"data.num_workers": 2})
    for args in (["--dry-run"], []):
        proc = inproc("pretrain", cfg, args, check=False)
        assert proc.returncode == 2, args
        err = proc.stderr + proc.stdout
        assert "data.train_files: 1 of 2 data streams (world_size x data.num_workers) would get no document: " \
               "compressed files are read whole, one stream each, and 1 of the 1 file(s) are compressed" in err
        assert "bertlaunch prepare" in err


def test_non_utf8_strict_names_file_line_byte():
    reader = PieceReader(str(BAD / "not_utf8.txt"), "line", "text", 1 << 20, "strict")
    with pytest.raises(DataError) as e:
        list(reader.pieces(Segment(0, 0, 53)))
    assert str(e.value).startswith(f"{BAD / 'not_utf8.txt'}: line 2 (byte 45) is not valid UTF-8")
    assert "set data.encoding_errors=replace" in str(e.value)


def test_an_error_in_a_loader_worker_mid_run_exits_2_with_its_message(tmp_path, pretrain_cfg, inproc):
    """Bad bytes deep in the corpus: the dataloader worker meets them after some steps were trained; the run
    stops with exit 2 and the worker's message (file, line, byte and the fix), through the real loader."""
    lines = [f"doc{i} river stone house light music paper garden" for i in range(1500)]  # 50 bytes each
    corpus = tmp_path / "late.txt"  # the bad line past the first read batch (64 KB) of the worker
    bad = b"\ndoc1400 bad \xff byte\n"
    corpus.write_bytes("\n".join(lines[:1400]).encode() + bad + "\n".join(lines[1401:]).encode())
    r = inproc("pretrain", pretrain_cfg([corpus], {"data.txt_documents": "line", "data.num_workers": 1,
                                                   "train.micro_batch_size": 64, "train.max_steps": 40,
                                                   "checkpoint.every": 0}), check=False)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"{corpus}: line 1401 (byte" in r.stderr and "is not valid UTF-8" in r.stderr
    assert "set data.encoding_errors=replace" in r.stderr
    assert 2 < max(row["step"] for row in read_metrics(tmp_path / "out")) < 40  # it failed mid-run


def test_non_utf8_replace_is_counted(tmp_path, pretrain_cfg, inproc):
    cfg = pretrain_cfg([BAD / "not_utf8.txt"], {"data.encoding_errors": "replace", "data.txt_documents": "line",
                                                "train.max_steps": 2, "data.block_size": 8,
                                                "train.micro_batch_size": 1})
    inproc("pretrain", cfg)
    assert [r for r in read_metrics(tmp_path / "out") if "replaced_bytes" in r][-1]["replaced_bytes"] == 2


def test_jsonl_errors_name_line_and_field():
    with pytest.raises(DataError, match="bad_json.jsonl: line 2 is not valid JSON"):
        list(PieceReader(str(BAD / "bad_json.jsonl"), "line", "text", 1 << 20, "strict").pieces(Segment(0, 0, 38)))
    with pytest.raises(DataError, match=r"missing_field.jsonl: line 2 has no field 'text' \(it has: body\); "
                                        r"set data.text_field"):
        list(PieceReader(str(BAD / "missing_field.jsonl"), "line", "text", 1 << 20, "strict").pieces(
            Segment(0, 0, 46)))


def test_a_50mb_line_streams_without_being_held(tmp_path):
    path = tmp_path / "huge.txt"
    word = b"lorem ipsum dolor sit amet consectetur "
    with open(path, "wb") as f:
        f.write(word * ((50 << 20) // len(word)) + b"\n")
    spec = load_spec("bert-base-uncased")
    stream = TextStream(text_readers([str(path)], "line", "text", 1 << 20, "strict"), [path.stat().st_size], spec,
                        block_size=128, last_block="pad", state=StreamState(0, 1), finite=True)
    tracemalloc.start()
    for i, block in enumerate(stream):
        assert len(block.tokens) == 128
        if i == 3000:  # well past the first 1 MB piece
            break
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 24 << 20  # a few 1 MB pieces and their tokens, never the 50 MB line


def test_task_table_errors():
    require_columns(read_rows(str(BAD / "pairs_train.tsv")), {"task.text_a": "sentence1"})
    with pytest.raises(DataError, match="no column 'sentence2' for task.text_b \\(did you mean 'sentence_2'\\?\\)"):
        require_columns(read_rows(str(BAD / "pairs_misspelled_column.tsv")), {"task.text_b": "sentence2"})
    with pytest.raises(DataError, match="mixes label types: line 2 has '1' \\(a number\\), line 3 has 'positive'"):
        infer_labels(read_rows(str(BAD / "pairs_mixed_labels.tsv")), "label")
    with pytest.raises(DataError, match="header_only.csv: no data rows"):
        read_rows(str(BAD / "header_only.csv"))
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        read_rows(str(BAD / "empty.txt"), "tsv")


def test_unknown_label_and_position_limit_in_finetune(tiny_config, inproc):
    cfg = tiny_config("finetune", {"model.preset": None, "model.pretrained": "minilm", "tokenizer": None,
                                   "task.text_a": "sentence1", "task.text_b": "sentence2",
                                   "task.train_file": BAD / "pairs_train.tsv",
                                   "task.eval_file": BAD / "pairs_unknown_label.tsv"})
    proc = inproc("finetune", cfg, check=False)
    assert proc.returncode == 2
    assert "pairs_unknown_label.tsv: line 3, column 'label': label 'maybe' does not occur in the training file" \
        in proc.stderr
    proc = inproc("finetune", cfg, ["task.eval_file=null", "task.max_length=1024"], check=False)
    assert proc.returncode == 2 and "task.max_length=1024 exceeds the model's max_position_embeddings=512" \
        in proc.stderr


def test_tokenizer_larger_than_model_vocab(tmp_path, pretrain_cfg, inproc):
    from bertlaunch.data.tokenize import load_hf_tokenizer

    tok = load_hf_tokenizer("bert-base-uncased")
    tok.add_tokens(["newtokenaaa", "newtokenbbb"])
    tok.save_pretrained(tmp_path / "tok")
    cfg = pretrain_cfg([BAD / "pairs_train.tsv"])
    proc = inproc("pretrain", cfg, ["model.preset=null", "model.pretrained=minilm", f"tokenizer={tmp_path / 'tok'}",
                                    "data.train_files=[embedded:pydoc]"], check=False)
    assert proc.returncode == 2
    assert "the tokenizer has 30524 tokens but the model's embedding has 30522" in proc.stderr


def test_ds_json_contradicting_the_run_config(tmp_path, pretrain_cfg, inproc):
    ds = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 16
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    proc = inproc("pretrain", pretrain_cfg([BAD / "one_doc.txt"]), [f"deepspeed.config={tmp_path / 'ds.json'}"],
                  check=False)
    assert proc.returncode == 2
    assert '"train_micro_batch_size_per_gpu" is 16 but the run config gives 4 (train.micro_batch_size)' in proc.stderr


def test_dry_run_prints_the_plan_and_a_batch(tmp_path, pretrain_cfg, tiny_config, corpus, inproc):
    cfg = pretrain_cfg([corpus(100)])
    proc = inproc("pretrain", cfg, ["--dry-run"])
    for fragment in ("world size 1", "global 4 = micro 4 x accumulation 1 x world 1", "2.1M parameters",
                     "stage 3:", "tokens per epoch", "one block", "[MASK]", "dry run OK"):
        assert fragment in proc.stdout, fragment
    assert not (tmp_path / "out").exists()
    two = {"WORLD_SIZE": 2, "RANK": 0}  # the world the dry run plans for, as a launcher sets it
    proc = inproc("pretrain", cfg, ["--dry-run", "train.global_batch_size=7"], check=False, **two)
    assert proc.returncode == 2 and "use 6 or 8" in proc.stderr
    # a tokenizer that cannot load does not hide the plan's problems: every one is listed
    proc = inproc("pretrain", cfg, ["--dry-run", "train.global_batch_size=7", f"tokenizer={tmp_path / 'nope'}"],
                  check=False, **two)
    assert proc.returncode == 2 and "2 problem(s)" in proc.stderr and "use 6 or 8" in proc.stderr
    assert f"tokenizer '{tmp_path / 'nope'}' is not a folder" in proc.stderr
    ft = tiny_config("finetune", {"model.preset": None, "model.pretrained": "minilm", "tokenizer": None,
                                  "task.text_a": "sentence1", "task.text_b": "sentence2",
                                  "task.train_file": BAD / "pairs_train.tsv"})
    proc = inproc("finetune", ft, ["--dry-run"])
    assert "classification, 2 output(s), labels ['no', 'yes']" in proc.stdout and "22.7M parameters" in proc.stdout


# -- numerical faults ------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_at_step_k(tmp_path, policy, pretrain_cfg, corpus, inproc):
    cfg = pretrain_cfg([corpus(200)], {"train.nan_policy": policy})
    proc = inproc("pretrain", cfg, check=False, BERTLAUNCH_NAN_AT_STEP=6)
    records = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert "step 6: 1/1 micro-batch(es) had a non-finite loss and were dropped" in proc.stdout
    if policy == "skip":
        assert proc.returncode == 0 and [r["step"] for r in records] == list(range(1, 11))
        assert records[5]["skipped_steps"] == 1 and all(r["loss"] is not None for r in records)
    else:
        assert proc.returncode == 3 and "stopping: non-finite loss at step 6" in proc.stdout
        assert [s for s, _ in list_checkpoints(tmp_path / "out" / "checkpoints")][-1] == 6


def test_nan_with_log_step_checks_stops(pretrain_cfg, corpus, inproc):
    cfg = pretrain_cfg([corpus(200)], {"train.nan_check": "log_steps"})
    proc = inproc("pretrain", cfg, check=False, BERTLAUNCH_NAN_AT_STEP=3)
    assert proc.returncode == 3 and "non-finite loss in the steps before 3" in proc.stdout


# -- distributed faults ----------------------------------------------------------------------------
@pytest.mark.slow
def test_hung_rank_is_named_and_the_others_exit_within_the_timeout(pretrain_cfg, corpus):
    cfg = pretrain_cfg([corpus(300)], {"train.dist_timeout_s": 15, "train.max_steps": 200})
    t0 = time.time()
    proc = run("pretrain", 2, cfg, [], check=False, timeout=240, BERTLAUNCH_HANG_RANK=1, BERTLAUNCH_HANG_AT_STEP=4)
    assert proc.returncode != 0 and time.time() - t0 < 150
    # Every rank's watchdog fires, at about the same time. The hung rank (not in a collective: gloo ones block)
    # names itself, its host and where it is stuck; rank 0, waiting in a collective, names rank 1 when it gets to
    # print before the first exit ends the job.
    host = re.escape(socket.gethostname())
    by_itself = (rf"\[rank 1\] error: no progress for \d+s .* at step 3; this rank \(on {host}\) is the one that "
                 r"hung: stuck in loss \(\S*faults.py:\d+\), outside any collective")
    by_rank_0 = (r"\[rank 0\] error: no progress for \d+s .* at step 3; waiting on rank 1 "
                 rf"\(last step 3, \d+s ago, on {host}\)")
    assert re.search(by_itself, proc.stderr), proc.stderr[-2000:]
    assert "[rank 0] error" not in proc.stderr or re.search(by_rank_0, proc.stderr), proc.stderr[-2000:]


@pytest.mark.slow
def test_killed_rank_ends_the_job(tmp_path, pretrain_cfg, corpus):
    """Through the real `deepspeed` launcher: a rank SIGKILLed mid-run ends the whole job quickly."""
    cfg = pretrain_cfg([corpus(300)], {"train.dist_timeout_s": 12, "train.max_steps": 400})
    job = Job("pretrain", 2, cfg, [], launcher="deepspeed")
    beats = tmp_path / "out" / ".heartbeat" / "rank_00001"
    job.wait_until(lambda: beats.is_file() and int(beats.read_text().split()[0]) >= 3, 300, "rank 1 at step 3")
    os.kill(int(beats.read_text().split()[2]), signal.SIGKILL)
    t0 = time.time()
    code = job.wait(120)
    assert code != 0 and time.time() - t0 < 45, job.output()[-3000:]


def test_disk_full_keeps_the_last_checkpoint(tmp_path, pretrain_cfg, corpus, inproc):
    cfg = pretrain_cfg([corpus(200)])
    proc = inproc("pretrain", cfg, BERTLAUNCH_FAIL_SAVE_AT=8)
    assert "checkpoint at step 8 failed (OSError: [Errno 28] No space left on device" in proc.stdout
    assert "step_00000004 is intact; training continues" in proc.stdout
    ckpts = [s for s, _ in list_checkpoints(tmp_path / "out" / "checkpoints")]
    assert ckpts == [4, 10] and not list((tmp_path / "out" / "checkpoints").glob(".tmp-*"))
    proc = inproc("pretrain", cfg, [f"train.resume={tmp_path / 'out' / 'checkpoints' / 'step_00000004'}",
                                    "train.max_steps=10"])
    assert_resumed(proc.stdout, tmp_path / "out", 4)


# -- unsafe files ----------------------------------------------------------------------------------
class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates a file when unpickled


def plant(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"module": Exploit(str(marker))}, f)


def test_foreign_checkpoint_with_a_malicious_pickle_is_refused(tmp_path, pretrain_cfg, inproc):
    foreign = tmp_path / "foreign" / "step_00000004"
    (foreign / "ds" / "state").mkdir(parents=True)
    marker = tmp_path / "PWNED"
    plant(foreign / "ds" / "state" / "mp_rank_00_model_states.pt", marker)
    proc = inproc("pretrain", pretrain_cfg([BAD / "one_doc.txt"]), [f"train.resume={foreign}"], check=False)
    assert proc.returncode == 2 and "checkpoint unusable: no manifest.json" in proc.stderr
    assert not marker.exists()


def test_model_folder_with_a_malicious_pickle_is_refused(tmp_path):
    from bertlaunch.core.config import ModelConfig
    from bertlaunch.data.corpus.embedded import minilm_dir
    from bertlaunch.model.build import load_mlm

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((minilm_dir() / "config.json").read_text())
    marker = tmp_path / "PWNED"
    plant(folder / "pytorch_model.bin", marker)

    class Spec:
        vocab_size, pad_id = 30522, 0

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # transformers: weights_only
        load_mlm(ModelConfig(pretrained=str(folder)), Spec, str(folder))
    assert not marker.exists()
