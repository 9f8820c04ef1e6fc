"""checkpoint.remote: the upload protocol (files by every rank, the manifest last and only once all are up, a pending
upload replaced by a newer one), resume from the newest remote checkpoint that verifies, remote pruning, the dry
run's listing, and clear errors for missing credentials (checkpoint.remote and remote corpora alike). In-process,
against a second-disk remote (file://) or a real S3 API on localhost (moto); the multi-process runs (SIGKILL,
an S3 outage, SIGTERM during an upload) are in tests/test_remote_runs.py."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from bertlaunch.core import hooks
from bertlaunch.core.checkpoint import list_checkpoints, verify
from bertlaunch.core.checkpointer import Checkpointer
from bertlaunch.core.config import CheckpointConfig
from bertlaunch.core.dist import DistInfo
from bertlaunch.core.layout import RunDir
from bertlaunch.core.remote import RemoteCheckpoints
from bertlaunch.core.upload import Uploads, share_out
from tests.helpers import make_corpus
from tests.test_checkpoint import ONE, FakeEngine, trainer_json


def remote_cfg(tmp_path, **kw) -> CheckpointConfig:
    return CheckpointConfig(remote=f"file://{tmp_path}/remote", io_retries=1, **kw)


def test_files_are_shared_out_over_the_ranks_that_hold_them():
    """Largest first to the least-loaded rank of a group that has the file: on a shared disk every rank takes a
    part; with one disk per node a node's files go to that node's ranks only."""
    manifest = {"a": {"size": 50}, "b": {"size": 40}, "c": {"size": 30}, "d": {"size": 5}}
    assert share_out(manifest, [([0, 1, 2], set(manifest))]) == {0: ["a"], 1: ["b"], 2: ["c", "d"]}
    nodes = [([0, 1], {"a", "d"}), ([2, 3], {"b", "c"})]
    assert share_out(manifest, nodes) == {0: ["a"], 1: ["d"], 2: ["b"], 3: ["c"]}


class Gate:
    """hooks.uploading: holds the upload of the named files until released."""

    def __init__(self, held: set[str]):
        self.held, self.open, self.started = held, threading.Event(), []

    def uploading(self, name):
        self.started.append(name)
        if name in self.held:
            assert self.open.wait(30)


def agree(ranks: list[Uploads]) -> None:
    """The loop's per-step all-reduce (max), between in-process 'ranks'."""
    values = [max(v) for v in zip(*(u.report() for u in ranks))]
    for u in ranks:
        u.agreed(values)


def wait_for(cond, what: str, timeout: float = 20):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.01)


def test_the_manifest_is_written_last_once_every_rank_uploaded_and_a_newer_save_replaces_a_pending_one(tmp_path):
    remote = RemoteCheckpoints(remote_cfg(tmp_path))
    messages = []
    ranks = [Uploads(remote, DistInfo(r, 2, r, 2, "127.0.0.1", 0, "single"), messages.append if r == 0 else print,
                     3, 30, RunDir(tmp_path / "out")) for r in (0, 1)]
    folders = {}
    for step in (2, 4, 6):
        folders[step] = tmp_path / "out" / "checkpoints" / f"step_{step:08d}"
        for name in ("x0", "x1"):
            (folders[step] / name).parent.mkdir(parents=True, exist_ok=True)
            (folders[step] / name).write_bytes(f"{name}@{step}".encode())
    manifest = {n: {"size": 4, "sha256": "-"} for n in ("x0", "x1")}
    gate = Gate({"x1"})  # rank 1's file of every checkpoint is held
    hooks.install(gate)
    try:
        for u, name in zip(ranks, ("x0", "x1")):
            u.submit(2, folders[2], [name], manifest, set())
        agree(ranks)  # step 2 starts on both ranks at the same step
        wait_for(lambda: (tmp_path / "remote" / "step_00000002" / "x0").is_file(), "rank 0's file")
        for _ in range(5):
            agree(ranks)
        assert not (tmp_path / "remote" / "step_00000002" / "manifest.json").exists()  # rank 1 is not done
        for step in (4, 6):  # saved while step 2 is in flight: 4 waits, then 6 replaces it
            for u, name in zip(ranks, ("x0", "x1")):
                u.submit(step, folders[step], [name], manifest, set())
            agree(ranks)
        assert messages[-1] == "note: the upload of step 4 had not started: step 6 replaces it"
        assert [u.in_use() for u in ranks] == [{2, 6}, {2, 6}]  # never pruned locally meanwhile
        gate.open.set()
        wait_for(lambda: agree(ranks) or all(not u.in_use() for u in ranks), "both uploads")
        for u in ranks:
            u.drain()  # nothing in flight any more: waits for rank 0's commit and prints its news
        committed = remote.committed()
    finally:
        hooks.install(None)
        for u in ranks:
            u.close()
    assert committed == [2, 6] and not (tmp_path / "remote" / "step_00000004").exists()
    assert json.loads((tmp_path / "remote" / "step_00000006" / "manifest.json").read_text())["files"] == manifest
    assert (tmp_path / "remote" / "step_00000006" / "x1").read_bytes() == b"x1@6"
    assert any(m == f"checkpoint step 6 uploaded: {remote.where('step_00000006')}" for m in messages)


def saved_and_uploaded(tmp_path, steps, **kw) -> Checkpointer:
    s = Checkpointer(str(tmp_path / "first"), remote_cfg(tmp_path, **kw), ONE, print)
    for step in steps:
        s.save(FakeEngine(), step, trainer_json(step))
        s.uploads.drain()
    s.uploads.close()
    return s


def test_resume_downloads_the_newest_remote_checkpoint_that_verifies_and_ignores_a_half_upload(tmp_path):
    saved_and_uploaded(tmp_path, (2, 4, 6))
    remote = tmp_path / "remote"
    model = remote / "step_00000006" / "ds" / "state" / "mp_rank_00_model_states.pt"
    model.write_bytes(b"weighs!")  # same size, other bytes
    (remote / "step_00000008" / "ds").mkdir(parents=True)  # an upload that never finished: no manifest
    (remote / "step_00000008" / "trainer.json").write_text("{}")
    messages = []
    fresh = Checkpointer(str(tmp_path / "new_node"), remote_cfg(tmp_path), ONE, messages.append)
    chosen = fresh.choose("auto")
    assert chosen == tmp_path / "new_node" / "checkpoints" / "step_00000004" and verify(chosen) is None
    assert fresh.source == f"file://{remote}/step_00000004"
    assert any("step 8 (1 file(s), 0.0 MiB, incomplete: no manifest, ignored)" in m for m in messages)
    assert any(f"file://{remote}/step_00000006 is unusable (ds/state/mp_rank_00_model_states.pt: sha256 mismatch"
               in m for m in messages)
    assert [s for s, _ in list_checkpoints(fresh.root)] == [4]  # the corrupt download was not kept


def test_a_local_checkpoint_as_new_as_the_remote_one_is_used_as_it_is(tmp_path):
    s = saved_and_uploaded(tmp_path, (2, 4))
    again = Checkpointer(str(s.run_dir.root), remote_cfg(tmp_path), ONE, print)
    assert again.choose("auto") == s.root / "step_00000004" and again.source is None


def test_remote_pruning_keeps_the_newest_commits_and_uploads_still_under_way(tmp_path):
    """keep_last=2 of the committed ones; a half upload older than the newest commit goes, a newer one (maybe still
    under way) stays."""
    saved_and_uploaded(tmp_path, (2, 4, 6, 8), keep_last=5)
    remote = RemoteCheckpoints(remote_cfg(tmp_path))
    (tmp_path / "remote" / "step_00000004" / "manifest.json").unlink()
    (tmp_path / "remote" / "step_00000010").mkdir()
    (tmp_path / "remote" / "step_00000010" / "trainer.json").write_text("{}")
    assert remote.prune(2, protected=set()) == [2, 4]
    assert [(s.step, s.committed) for s in remote.steps()] == [(6, True), (8, True), (10, False)]


def test_the_dry_run_lists_the_remote_and_the_checkpoint_it_would_take(tmp_path, tiny_config, inproc):
    cfg = tiny_config("pretrain", {"data.train_files": [make_corpus(tmp_path / "c.txt", 50)], "train.max_steps": 4,
                                   "checkpoint.every": 2, "checkpoint.remote": f"file://{tmp_path}/remote"})
    inproc("pretrain", cfg)
    shutil.rmtree(tmp_path / "out")  # a new node
    res = inproc("pretrain", cfg, ["--dry-run", "train.max_steps=8"])
    assert f"remote        file://{tmp_path}/remote: step 2 (7 file(s)" in res.stdout
    assert "train.resume=auto takes remote step 4 (newer than the local output_dir, which has none)" in res.stdout
    assert (f"resume        from {tmp_path}/out/checkpoints/step_00000004 at step 4 (to be downloaded from "
            f"file://{tmp_path}/remote/step_00000004)") in res.stdout
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing downloaded


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """A new user's machine: no AWS variables, no ~/.aws files, no instance role."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # in-process runs: an S3 filesystem that an earlier test made (with the moto session's credentials) is cached
    # by fsspec per constructor arguments, and would be handed back instead of a fresh one reading this environment
    # (and the one made here without credentials must not be handed to a later test)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_an_s3_corpus_without_credentials_is_a_clear_error(tmp_path, tiny_config, inproc, no_aws_credentials):
    cfg = tiny_config("pretrain", {"data.train_files": ["s3://bucket/x/*.txt"]})
    res = inproc("pretrain", cfg, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert ("s3://bucket/x/*.txt: no credentials found while trying to list the files (NoCredentialsError: Unable to "
            "locate credentials); credentials come from AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY") in res.stderr
    assert "or data.storage_options: {key: ..., secret: ...}" in res.stderr


def test_a_checkpoint_remote_without_credentials_is_a_clear_error(tmp_path, tiny_config, inproc, no_aws_credentials):
    cfg = tiny_config("pretrain", {"data.train_files": [make_corpus(tmp_path / "c.txt", 50)],
                                   "checkpoint.remote": "s3://bucket/runs/x"})
    res = inproc("pretrain", cfg, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert ("checkpoint.remote: s3://bucket/runs/x: no credentials found while trying to list the checkpoints "
            "(NoCredentialsError") in res.stderr
    assert "or checkpoint.storage_options: {key: ..., secret: ...}" in res.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_secrets_reach_neither_the_outputs_nor_the_remote_nor_the_logs(tmp_path, tiny_config, inproc, s3_server,
                                                                      monkeypatch):
    """checkpoint.storage_options credentials, one of them given on the command line: config.yaml, checkpoints
    (trainer.json's command line included), metrics, the offline wandb run, every object on the remote and the
    run's output hold none of them."""
    _, client = s3_server
    client.create_bucket(Bucket="secrets")
    key, secret = "AKIAEXAMPLEKEY0123456", "sEcReT-remote-key-9876543210"
    cfg = tiny_config("pretrain", {"data.train_files": [make_corpus(tmp_path / "c.txt", 80)], "train.max_steps": 4,
                                   "checkpoint.every": 2, "checkpoint.remote": "s3://secrets/run",
                                   "checkpoint.storage_options": {"key": key}, "log.wandb.mode": "offline"})
    argv = ["--config", str(cfg), f"checkpoint.storage_options.secret={secret}"]
    monkeypatch.setattr("sys.argv", ["launch/pretrain.py", *argv])
    res = inproc("pretrain", None, argv)
    objects = [o["Key"] for o in client.list_objects_v2(Bucket="secrets")["Contents"]]
    assert "run/step_00000004/manifest.json" in objects and "run/config.yaml" in objects
    blobs = {f"s3://secrets/{k}": client.get_object(Bucket="secrets", Key=k)["Body"].read() for k in objects}
    blobs |= {str(p): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert any("wandb" in name for name in blobs) and any(name.endswith("trainer.json") for name in blobs)
    for name, raw in blobs.items():
        for s in (key, secret):
            assert s.encode() not in raw, f"{s} in {name}"
    assert key not in res.stdout + res.stderr and secret not in res.stdout + res.stderr
    trainer = json.loads((tmp_path / "out" / "checkpoints" / "step_00000004" / "trainer.json").read_text())
    assert trainer["command"][-1] == "checkpoint.storage_options.secret=<redacted>"


def test_storage_errors_are_scrubbed_of_the_credentials(tmp_path):
    options = {"token": "tok-12345678"}
    remote = RemoteCheckpoints(CheckpointConfig(remote=f"file://{tmp_path}/r", storage_options=options))
    assert remote.scrub("403 for token tok-12345678 at file://x") == "403 for token <redacted> at file://x"


def test_the_uploader_thread_yields_the_cpu_to_the_training():
    """yield_cpu lowers the priority of the thread that calls it (the uploader's), not the process's."""
    import os
    import threading

    from bertlaunch.core.upload import yield_cpu

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def uploader():
        yield_cpu()
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=uploader)
    t.start()
    t.join()
    assert seen["nice"] == min(main + 10, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main
