"""Checkpoint and resume beyond the SIGKILL matrix (tests/test_kill_matrix.py): world-size and micro-batch changes
with every document exactly once, a kill during a save and a corrupt checkpoint, config changes, signals, the
export and check-resume commands."""

import json
import shutil
import signal

import pytest

from bertlaunch.core.checkpoint import list_checkpoints
from bertlaunch.data.tokenize import load_spec
from tests.helpers import (
    Job,
    assert_resumed,
    audited_tokens,
    compare,
    doc_tokens,
    last_step,
    make_corpus,
    read_metrics,
    run,
    run_and_kill,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def resume_cfg(tiny_config):
    """2 ranks x `workers` loader workers, 16 steps of 16 x 64 tokens, a checkpoint every 4 steps."""
    def make(files, stage=2, overrides=None):
        return tiny_config("pretrain", {"data.train_files": files, "data.num_workers": 2, "train.max_steps": 16,
                                        "train.global_batch_size": 16,
                                        "deepspeed.config": f"ds_configs/zero{stage}.json", **(overrides or {})},
                           name=f"zero{stage}.yaml")
    return make


def test_exactly_once_across_kills_and_world_size_changes(tmp_path, resume_cfg):
    """2 ranks x 2 workers -> kill -> 1 rank x 1 worker with a bigger micro-batch -> kill -> 3 ranks x 2 workers,
    several epochs: the global batch (12) holds at every size, its micro-batch and accumulation re-planned, and
    every document of every finished epoch is trained exactly once, token for token."""
    files = [str(make_corpus(tmp_path / f"c{i}.txt", n, seed=i)) for i, n in enumerate([40, 5, 70])]
    cfg = resume_cfg(files, 2, {"train.max_steps": 60, "checkpoint.every": 5, "train.micro_batch_size": 4,
                                "train.global_batch_size": 12, "data.audit": True, "data.block_size": 32})
    out = tmp_path / "run"
    o = [f"output_dir={out}"]
    first = run_and_kill("pretrain", 2, cfg, o, out, 13, 60)  # micro 4 -> 3, accumulation 2
    second = run_and_kill("pretrain", 0, cfg, o + ["data.num_workers=1", "train.micro_batch_size=12"], out, 33, 60,
                          resumes_from=first)  # world 2 -> 1, workers 2 -> 1: micro 12, accumulation 1
    proc = run("pretrain", 3, cfg, o)  # 3 ranks x 2 workers: micro 4, accumulation 1
    assert_resumed(proc.stdout, out, second)
    assert "resized from 1 rank(s) x 1 worker(s)" in proc.stdout
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 61)) and all(r["samples"] == 12 * r["step"] for r in rows)
    trainer = json.loads((list_checkpoints(out / "checkpoints")[-1][1] / "trainer.json").read_text())
    done_epochs = min(s["epoch"] for s in trainer["streams"])
    assert done_epochs >= 2
    truth = doc_tokens(files, load_spec("bert-base-uncased"))
    seen = audited_tokens(out)
    for epoch in range(done_epochs):
        got = {doc: n for (e, doc), n in seen.items() if e == epoch}
        assert got == truth, f"epoch {epoch}"
    for (_, doc), n in seen.items():  # epochs still in flight: nothing trained twice
        assert n <= truth[doc]


def test_killed_during_save_and_corrupt_checkpoint_fall_back(tmp_path, resume_cfg, corpus):
    cfg = resume_cfg([corpus(300)], 1, {"train.max_steps": 12, "data.num_workers": 1})
    out = tmp_path / "run"
    run("pretrain", 0, cfg, [f"output_dir={out}"], check=False, BERTLAUNCH_KILL_IN_SAVE_AT=8)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4]
    assert (out / "checkpoints" / ".tmp-step_00000008").is_dir()  # the half-written save, never committed
    assert_resumed(run("pretrain", 0, cfg, [f"output_dir={out}"]).stdout, out, 4)
    # flip one byte in the newest committed checkpoint: checksum catches it, resume falls back
    newest = list_checkpoints(out / "checkpoints")[-1][1]
    shard = next(p for p in (newest / "ds").rglob("*.pt"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    proc = run("pretrain", 0, cfg, [f"output_dir={out}"])
    assert f"checkpoint {newest} is unusable" in proc.stdout and "sha256 mismatch" in proc.stdout
    assert newest.name == "step_00000012"
    assert_resumed(proc.stdout, out, 8)
    straight = tmp_path / "straight"
    run("pretrain", 0, cfg, [f"output_dir={straight}"])
    assert compare(straight, out) == []
    assert not list((out / "checkpoints").glob(".tmp-step_*"))  # stale temporaries cleaned up
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4, 8, 12]  # keep_last=3


def test_config_change_is_refused_by_key(tmp_path, resume_cfg, corpus, inproc):
    cfg = resume_cfg([corpus(200)], 0, {"train.max_steps": 4, "checkpoint.every": 2, "data.num_workers": 1})
    inproc("pretrain", cfg)
    proc = inproc("pretrain", cfg, ["train.max_steps=6", "train.lr=0.005", "data.block_size=32"], check=False)
    assert proc.returncode == 2
    assert "cannot resume exactly" in proc.stderr
    assert "train.lr: checkpoint has 0.002, config has 0.005" in proc.stderr
    assert "data.block_size: checkpoint has 64, config has 32" in proc.stderr


@pytest.mark.parametrize("ranks", [0, 2])
def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path, resume_cfg, corpus, ranks):
    cfg = resume_cfg([corpus(400)], 2, {"train.max_steps": 400, "checkpoint.every": 0, "data.num_workers": 1})
    out = tmp_path / "run"
    job = Job("pretrain", ranks, cfg, [f"output_dir={out}"])
    job.wait_until(lambda: last_step(out / "metrics.jsonl") >= 3, 300, "step 3")
    job.kill(signal.SIGTERM)  # like a scheduler: every process (launcher, ranks, loader workers)
    code = job.wait(120)
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and 3 <= ckpts[0][0] < 400
    assert f"checkpoint saved at step {ckpts[0][0]}" in job.stdout
    assert code == 75
    assert last_step(out / "metrics.jsonl") == ckpts[0][0]


def test_export_cli_and_check_resume_cli(tmp_path, resume_cfg, corpus, capsys):
    """check_resume runs the entry script itself (python launch/pretrain.py) straight, killed and resumed."""
    from bertlaunch.tools import check_resume, export

    cfg = resume_cfg([corpus(200)], 0, {"data.num_workers": 1})
    assert check_resume.main(["--config", str(cfg), "--steps", "6", "--workdir", str(tmp_path / "cr")]) == 0
    assert "exact: 6 per-step losses and all final weights are bit-identical" in capsys.readouterr().out
    ckpt = list_checkpoints(tmp_path / "cr" / "resumed" / "checkpoints")[0][1]
    assert export.main([str(ckpt), str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 2
    shutil.rmtree(tmp_path / "cr")
