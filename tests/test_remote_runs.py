"""checkpoint.remote in real runs, against a real S3 API on localhost (moto server, s3fs): a 2-rank run SIGKILLed
and resumed on wiped disks bit-identically, an S3 outage during an upload that training rides out, SIGTERM during an
upload, and secrets kept out of everything the run writes or uploads. (The protocol itself, in-process:
tests/test_remote_checkpoint.py; the 2-node SLURM preemption with wiped output_dirs: tests/test_slurm.py.)"""

from __future__ import annotations

import shutil
import signal
import uuid

import pytest

from bertlaunch.core.checkpoint import verify
from bertlaunch.core.config import CheckpointConfig
from bertlaunch.core.remote import RemoteCheckpoints
from tests.conftest import build_config
from tests.helpers import Job, assert_resumed, compare, last_step, make_corpus, run, saved_on_signal

pytestmark = pytest.mark.slow


STEPS = 12
# 2 ranks, ZeRO-2: each rank writes its own optimizer partition
TWO_RANKS = {"train.max_steps": STEPS, "train.global_batch_size": 16, "deepspeed.config": "ds_configs/zero2.json"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """(corpus, output_dir) of the run the resumed ones must equal bit for bit: the same 2-rank run, straight
    through, no remote (checkpoints change nothing in training, so their cadence may differ)."""
    tmp = tmp_path_factory.mktemp("straight")
    corpus = make_corpus(tmp / "c.txt", 600)
    cfg = build_config(tmp, "pretrain", {"data.train_files": [corpus], **TWO_RANKS, "checkpoint.every": 0})
    run("pretrain", 2, cfg, [])
    return corpus, tmp / "out"


@pytest.fixture
def remote(s3_server):
    """A fresh bucket; returns its run prefix as a RemoteCheckpoints (its .url is the checkpoint.remote value)."""
    _, client = s3_server
    name = f"ckpt-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name)
    return RemoteCheckpoints(CheckpointConfig(remote=f"s3://{name}/runs/a", io_retries=2), backoff_s=0.1)


def committed(remote) -> list[int]:
    return remote.committed()


def under_way(remote) -> int | None:
    """A step whose upload has started but not committed (files there, no manifest)."""
    return next((s.step for s in remote.steps() if not s.committed), None)


def downloads_and_verifies(remote, step, tmp_path) -> bool:
    return remote.download(step, tmp_path / f"check_{step}") is None


def test_two_ranks_killed_then_resumed_from_s3_on_wiped_disks_is_bit_identical(tmp_path, tiny_config, remote,
                                                                                 straight):
    """Each rank has its own output_dir (node-local disks: output_dir=.../node$RANK), so each uploads the files it
    wrote (its ZeRO-2 partition among them). SIGKILLed after a remote commit, both disks wiped, the same command
    resumes from S3 on both ranks: losses and final weights bit-identical to a straight run."""
    corpus, plain = straight
    cfg = tiny_config("pretrain", {"data.train_files": [corpus], **TWO_RANKS, "checkpoint.every": 4,
                                   "checkpoint.remote": remote.url, "output_dir": str(tmp_path / "node$RANK")})
    # rank 0 is held inside step 11: the remote commit of step 4 or 8 happens at a step before (it needs steps to run)
    job = Job("pretrain", 2, cfg, [], BERTLAUNCH_HANG_RANK=0, BERTLAUNCH_HANG_AT_STEP=11)
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    job.wait_until(lambda: last_step(node0 / "metrics.jsonl") >= 10 and committed(remote), 120, "a remote commit")
    job.kill()
    step = committed(remote)[-1]
    assert "note: output_dir is not shared by all ranks (2 groups" in job.stdout
    manifest = remote.read_json(f"step_{step:08d}/manifest.json")["files"]
    assert {"ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt", "ds/state/zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "client/rank_00000.pt", "client/rank_00001.pt"} <= set(manifest)
    shutil.rmtree(node0)  # new nodes: empty disks
    shutil.rmtree(node1)
    res = run("pretrain", 2, cfg, [])
    assert_resumed(res.stdout, node0, step)
    assert f"(downloaded from {remote.url}/step_{step:08d})" in res.stdout
    assert verify(node1 / "checkpoints" / f"step_{STEPS:08d}") is None  # node1's copy made whole for the export
    assert compare(plain, node0) == []


def test_an_s3_outage_during_an_upload_never_stops_training(tmp_path, tiny_config, remote, s3_server):
    """The server is stopped while a checkpoint is half uploaded and started again later: training goes on (every
    step logged, exit 0), the upload warns; meanwhile the remote's newest commit stays whole and the half upload
    is not taken for one; after the outage uploads resume and pruning removes the half upload."""
    server, _ = s3_server
    steps = 80
    cfg = tiny_config("pretrain", {"data.train_files": [make_corpus(tmp_path / "c.txt", 600)],
                                   "train.max_steps": steps, "checkpoint.every": 8, "checkpoint.keep_last": 1,
                                   "checkpoint.remote": remote.url, "checkpoint.io_retries": 2,
                                   # one attempt per boto call: the outage is seen in ~3 s, not ~11
                                   "checkpoint.storage_options": {"config_kwargs": {"retries": {"max_attempts": 1}}}})
    out = tmp_path / "out"
    job = Job("pretrain", 0, cfg, [], BERTLAUNCH_SLOW_UPLOAD_S=0.2)  # 7 files: ~1.4 s an upload
    job.wait_until(lambda: committed(remote) and under_way(remote), 120, "an upload under way after a commit")
    half, whole = under_way(remote), committed(remote)[-1]
    server.stop()
    try:
        stopped_at = last_step(out / "metrics.jsonl")
        job.wait_until(lambda: f"uploading checkpoint step {half} failed" in job.stderr
                       and last_step(out / "metrics.jsonl") >= stopped_at + 8, 120, "training on through the outage")
    finally:
        server.start()
    # back up: no upload can commit within the next ~1.4 s (the slow upload); the remote is as it was
    assert committed(remote) == [whole] and under_way(remote) == half
    assert downloads_and_verifies(remote, whole, tmp_path)
    assert job.wait(180) == 0, job.output()[-3000:]
    assert last_step(out / "metrics.jsonl") == steps
    assert [s.step for s in remote.steps()] == [steps] and downloads_and_verifies(remote, steps, tmp_path)


def test_sigterm_during_an_upload_finishes_it_before_exit_75_and_an_empty_node_resumes(tmp_path, tiny_config,
                                                                                        remote, straight):
    """SIGTERM while a checkpoint is uploading (2 ranks, one shared output_dir): the ranks checkpoint, the upload in
    flight and the signal's checkpoint are both committed to S3 before the exit 75; the same command on an empty
    output_dir then resumes from the signal's checkpoint, downloaded, and ends as the straight run did."""
    corpus, plain = straight
    cfg = tiny_config("pretrain", {"data.train_files": [corpus], **TWO_RANKS, "checkpoint.every": 3,
                                   "checkpoint.remote": remote.url})
    out = tmp_path / "out"
    job = Job("pretrain", 2, cfg, [], BERTLAUNCH_SLOW_UPLOAD_S=0.3)
    job.wait_until(lambda: under_way(remote) is not None, 120, "an upload under way")
    in_flight = under_way(remote)
    job.kill(signal.SIGTERM)
    assert job.wait(120) == 75, job.output()[-3000:]
    saved = saved_on_signal(job.stdout)
    assert in_flight in committed(remote) and committed(remote)[-1] == saved > in_flight
    assert "did not finish" not in job.output()
    shutil.rmtree(out)
    res = run("pretrain", 2, cfg, [])
    assert_resumed(res.stdout, out, saved)
    assert f"(downloaded from {remote.url}/step_{saved:08d})" in res.stdout
    assert compare(plain, out) == []
