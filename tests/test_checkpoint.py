"""Checkpointer in-process (no subprocess, no DeepSpeed): commit by manifest, fallback past a broken newest
checkpoint, pruning, the config-change refusal, and the resume decision (same ranks, resized, universal)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bertlaunch.core import configlib
from bertlaunch.core.assemble import choose_resume
from bertlaunch.core.checkpoint import CheckpointError, list_checkpoints, verify
from bertlaunch.core.checkpointer import Checkpointer
from bertlaunch.core.config import CheckpointConfig
from bertlaunch.core.dist import DistInfo
from bertlaunch.tasks.mlm.config import PretrainConfig

ONE = DistInfo(0, 1, 0, 1, "127.0.0.1", 0, "single")


class FakeEngine:
    """Writes what DeepSpeed would: one model file, and per-rank optimizer partitions when `partitions`."""

    def __init__(self, partitions: int = 0):
        self.partitions = partitions

    def save_checkpoint(self, path, tag, save_latest):
        d = Path(path) / tag
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        for r in range(self.partitions):
            (d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"moments")


def saver(tmp_path, keep_last=3, messages=None) -> Checkpointer:
    log = messages.append if messages is not None else print
    return Checkpointer(str(tmp_path), CheckpointConfig(keep_last=keep_last), ONE, log)


def trainer_json(step: int, world: int = 1, workers: int = 1, exact=None) -> dict:
    return {"state": {"step": step}, "world_size": world, "workers": workers, "exact": exact or {}}


def test_a_save_commits_with_a_manifest_of_every_file(tmp_path):
    s = saver(tmp_path)
    path = s.save(FakeEngine(), 4, trainer_json(4))
    assert path == tmp_path / "checkpoints" / "step_00000004" and verify(path) is None
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert sorted(manifest) == ["client/rank_00000.pt", "ds/state/mp_rank_00_model_states.pt", "trainer.json"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_auto_resume_falls_back_past_a_corrupt_and_an_unfinished_checkpoint(tmp_path):
    messages = []
    s = saver(tmp_path, messages=messages)
    for step in (2, 4, 6):
        s.save(FakeEngine(), step, trainer_json(step))
    newest = tmp_path / "checkpoints" / "step_00000006" / "ds" / "state" / "mp_rank_00_model_states.pt"
    newest.write_bytes(b"weighs!")  # same size, other bytes
    (tmp_path / "checkpoints" / "step_00000004" / "manifest.json").unlink()  # killed before its commit
    assert s.choose("auto") == tmp_path / "checkpoints" / "step_00000002"
    assert any("step_00000006 is unusable" in m and "sha256 mismatch" in m for m in messages)
    assert any("step_00000004 is unusable" in m and "no manifest.json" in m for m in messages)


def test_an_explicit_broken_checkpoint_is_an_error_not_a_fallback(tmp_path):
    s = saver(tmp_path)
    path = s.save(FakeEngine(), 2, trainer_json(2))
    (path / "trainer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="trainer.json: size"):
        s.choose(str(path))


def test_keep_last_prunes_only_after_a_newer_commit_and_spares_the_protected(tmp_path):
    s = saver(tmp_path, keep_last=2)
    s.protected = {2}
    for step in (2, 4, 6, 8):
        s.save(FakeEngine(), step, trainer_json(step))
    assert [step for step, _ in list_checkpoints(s.root)] == [2, 6, 8]


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path):
    class Full(FakeEngine):
        def save_checkpoint(self, path, tag, save_latest):
            raise OSError(28, "No space left on device")

    messages = []
    s = saver(tmp_path, messages=messages)
    s.save(FakeEngine(), 2, trainer_json(2))
    assert s.save(Full(), 4, trainer_json(4)) is None
    assert [step for step, _ in list_checkpoints(s.root)] == [2] and s.choose("auto").name == "step_00000002"
    assert any("checkpoint at step 4 failed (OSError" in m and "step_00000002 is intact" in m for m in messages)


def test_a_changed_exact_key_is_refused_by_name(tmp_path):
    s = saver(tmp_path)
    path = s.save(FakeEngine(), 2, trainer_json(2, exact={"data.block_size": 64, "train.lr": 0.1}))
    with pytest.raises(CheckpointError, match="data.block_size: checkpoint has 64, config has 32"):
        s.check_config(path, {"data.block_size": 32, "train.lr": 0.1})


def resume_cfg(tmp_path, **checkpoint) -> PretrainConfig:
    cfg = PretrainConfig(output_dir=str(tmp_path))
    cfg.checkpoint = CheckpointConfig(**checkpoint)
    return cfg


def save_for(tmp_path, cfg, world: int, workers: int, partitions: int) -> Path:
    from bertlaunch.core.checkpoint import exact_keys

    return saver(tmp_path).save(FakeEngine(partitions), 5, trainer_json(5, world, workers, exact_keys(cfg)))


@pytest.mark.parametrize("saved,now,partitions,expect", [
    ((1, 2), (1, 2), 0, (False, False, False)),  # same ranks and workers: RNG restored, data positions kept
    ((1, 2), (1, 3), 0, (False, True, False)),  # another worker count: the unread data is re-split
    ((2, 2), (1, 2), 2, (True, True, True)),  # another world size with ZeRO partitions: universal format
    ((2, 2), (3, 2), 0, (True, True, False)),  # stage 0 in fp32 has no partitions: loaded as it is
])
def test_the_resume_decision(tmp_path, saved, now, partitions, expect):
    cfg = resume_cfg(tmp_path)
    save_for(tmp_path, cfg, *saved, partitions)
    info = DistInfo(0, now[0], 0, now[0], "127.0.0.1", 0, "single")
    r = choose_resume(saver(tmp_path), cfg, info, now[1])
    assert r.path.name == "step_00000005" and r.step == 5
    assert (r.world_changed, r.resplit, r.universal) == expect


def test_a_resize_is_refused_when_not_allowed(tmp_path):
    cfg = resume_cfg(tmp_path, allow_resize=False)
    save_for(tmp_path, cfg, 2, 1, 2)
    with pytest.raises(configlib.ConfigError, match="set checkpoint.allow_resize=true"):
        choose_resume(saver(tmp_path), cfg, ONE, 1)


def test_no_checkpoint_is_a_fresh_start(tmp_path):
    r = choose_resume(saver(tmp_path), resume_cfg(tmp_path), ONE, 1)
    assert r.path is None and r.step == 0 and not (r.world_changed or r.resplit or r.universal)


def test_resume_none_ignores_checkpoints(tmp_path):
    cfg = resume_cfg(tmp_path)
    save_for(tmp_path, cfg, 1, 1, 0)
    cfg.train.resume = "none"
    assert choose_resume(saver(tmp_path), cfg, ONE, 1).path is None


