"""The SIGKILL matrix, on 2 CPU ranks: pretraining x ZeRO 0-3 and fine-tuning x ZeRO 0-3, padded and pad-free.

Each case: a straight run; the same run SIGKILLed (the whole job, loader workers included) at a random step after
its first checkpoint, checked to be alive when killed and never finished; the same command again, whose own log
must say that it resumed from the newest committed checkpoint at that step (a silent restart from step 0 would
give the same numbers); then the per-step losses and the final weights of the two runs, bit for bit.
"""

from __future__ import annotations

import random

import pytest

from tests.helpers import assert_resumed, compare, losses, make_corpus, read_metrics, run, run_and_kill, write_pairs

pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 3  # pretraining: steps, checkpoint interval


def pretrain_cfg(tiny_config, tmp_path, stage):
    corpus = make_corpus(tmp_path / "c.txt", 300)
    return tiny_config("pretrain", {"data.train_files": [corpus], "data.num_workers": 1, "train.max_steps": STEPS,
                                    "train.global_batch_size": 16, "checkpoint.every": EVERY,
                                    "deepspeed.config": f"ds_configs/zero{stage}.json"}, name=f"zero{stage}.yaml")


def finetune_cfg(tiny_config, tmp_path, stage, unpad):
    train, dev = write_pairs(tmp_path / "train.tsv", 100, seed=1), write_pairs(tmp_path / "dev.tsv", 20, seed=2)
    return tiny_config("finetune", {"task.train_file": train, "task.eval_file": dev, "task.unpad": unpad,
                                    "train.epochs": 1, "train.micro_batch_size": 4, "train.global_batch_size": 16,
                                    "eval.save_best": False, "checkpoint.every": EVERY, "checkpoint.keep_last": 2,
                                    "deepspeed.config": f"ds_configs/zero{stage}.json"}, name=f"ft{stage}{unpad}.yaml")


def kill_and_resume(entry, cfg, straight, killed, end, rng):
    """The killed run and its resume; returns the resumed run's output."""
    step = run_and_kill(entry, 2, cfg, [f"output_dir={killed}"], killed, rng.randint(EVERY + 1, end - 2), end)
    proc = run(entry, 2, cfg, [f"output_dir={killed}"])
    assert_resumed(proc.stdout, killed, step)
    assert compare(straight, killed) == []
    return proc


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_pretraining_sigkill_resume_is_bit_identical(tmp_path, tiny_config, stage):
    cfg = pretrain_cfg(tiny_config, tmp_path, stage)
    straight = tmp_path / "straight"
    slow = {}
    if stage == 3:  # rank 0's final export outlasts train.dist_timeout_s: the other ranks must not be killed
        slow = {"BERTLAUNCH_SLOW_EXPORT_S": 5}
    run("pretrain", 2, cfg, [f"output_dir={straight}"] + (["train.dist_timeout_s=3"] if slow else []), **slow)
    assert sorted(losses(straight)) == list(range(1, STEPS + 1))
    kill_and_resume("pretrain", cfg, straight, tmp_path / "killed", STEPS, random.Random(stage))


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "pad-free"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_finetuning_sigkill_resume_is_bit_identical(tmp_path, tiny_config, stage, unpad):
    cfg = finetune_cfg(tiny_config, tmp_path, stage, unpad)
    straight = tmp_path / "straight"
    run("finetune", 2, cfg, [f"output_dir={straight}"])
    train = [r for r in read_metrics(straight) if "loss" in r]
    assert len(train) == 7 and train[-1]["samples"] == 100  # ceil(100 / 16) steps, the short last batch kept
    kill_and_resume("finetune", cfg, straight, tmp_path / "killed", 7, random.Random(10 + stage))
