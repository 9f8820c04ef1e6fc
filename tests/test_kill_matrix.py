"""The SIGKILL matrix, on 2 CPU ranks: pretraining x ZeRO 0-3, fine-tuning x ZeRO 0-3, padded and pad-free, and sentence
embeddings at ZeRO 3 with GradCache and oneDNN's linear layers (ZeRO 0-2 with BERTLAUNCH_FULL=1) (and pretraining
at ZeRO 0 killed twice).
Pretraining at ZeRO 1 and 2 runs ModernBERT's recipe on a tiny ModernBERT: documents isolated in the packed blocks,
StableAdamW, a batch-size warmup (the checkpoint of step 3 lies inside it), 30% masking, then a phase at twice the
length with a new RoPE base.

Each case: a straight run; the same run SIGKILLed (the whole job, loader workers included) at a random step after
its first checkpoint, checked to be alive when killed and never finished; the same command again, whose own log
must say that it resumed from the newest committed checkpoint at that step (a silent restart from step 0 would
give the same numbers); then the per-step losses and the final weights of the two runs, bit for bit.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForMaskedLM

from tests.helpers import assert_resumed, compare, full_only, make_corpus, read_metrics, run, run_and_kill, write_pairs

pytestmark = pytest.mark.slow

STEPS, EVERY = 8, 3  # pretraining: steps, checkpoint interval
MODERN = (1, 2)  # the ZeRO stages whose pretraining case is ModernBERT's recipe
# batch warmup 8 -> 16 in 2 stages of 1024 token slots (2 + 2 steps: the checkpoint of step 3 is inside it), the rest
# of phase 0 (3 steps at 16 x 64, 30% masking), then phase 1: 2 steps at 16 x 128 with the global RoPE base at 160k
MODERN_STEPS, MODERN_TOKENS = 9, 2 * 8 * 64 + 2 * 12 * 64 + 3 * 16 * 64 + 2 * 16 * 128
RECIPE = {"model.preset": "modernbert-tiny", "model.rope_theta": 10000.0, "data.isolate_documents": True,
          "train.optimizer": "stableadamw", "train.max_steps": None,
          "train.batch_warmup": {"tokens": 2048, "start": 8, "stages": 2, "multiple_of": 4},
          "train.phases": [{"steps": 5, "block_size": 64, "mlm_probability": 0.3},
                           {"steps": 2, "block_size": 128, "rope_theta": 160000.0}]}


def pretrain_cfg(tiny_config, tmp_path, stage):
    corpus, held_out = make_corpus(tmp_path / "c.txt", 600), make_corpus(tmp_path / "e.txt", 40, seed=9)
    return tiny_config("pretrain", {"data.train_files": [corpus], "data.eval_files": [held_out], "eval.every": 4,
                                    "eval.max_batches": 2, "data.num_workers": 1, "train.max_steps": STEPS,
                                    "train.global_batch_size": 16, "checkpoint.every": EVERY,
                                    "deepspeed.config": f"ds_configs/zero{stage}.json",
                                    **(RECIPE if stage in MODERN else {})}, name=f"zero{stage}.yaml")


def check_plain_pretraining_run(out, stage):
    """The straight run is also checked like any 2-rank run: losses fall, every slot a real token (no epoch ends
    in these steps), the phases and their batch sizes, eval rows, trainer.json, a final/ that loads (ModernBERT:
    with the RoPE base of its last phase)."""
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    steps, tokens, evals = (MODERN_STEPS, MODERN_TOKENS, [4, 8, 9]) if stage in MODERN else (STEPS, STEPS * 16 * 64,
                                                                                              [4, 8])
    assert [r["step"] for r in train] == list(range(1, steps + 1)) and train[-1]["loss"] < train[0]["loss"] - 0.5
    assert train[-1]["tokens"] == tokens
    assert [r["step"] for r in records if "eval_loss" in r] == evals
    if stage in MODERN:
        assert [(r["phase"], r["block_size"]) for r in train] == [(0, 64)] * 2 + [(1, 64)] * 2 + [(2, 64)] * 3 + [
            (3, 128)] * 2
        config = json.loads((out / "final" / "config.json").read_text())
        assert config["rope_parameters"]["full_attention"]["rope_theta"] == 160000.0
    trainer = json.loads((out / "checkpoints" / f"step_{steps:08d}" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["zero_stage"] == stage and len(trainer["streams"]) == 2
    with torch.no_grad():
        logits = AutoModelForMaskedLM.from_pretrained(out / "final")(torch.tensor([[101, 2000, 2001, 103, 102]])).logits
    assert logits.shape == (1, 5, 30522)


def finetune_cfg(tiny_config, tmp_path, stage, unpad):
    train, dev = write_pairs(tmp_path / "train.tsv", 100, seed=1), write_pairs(tmp_path / "dev.tsv", 20, seed=2)
    return tiny_config("finetune", {"task.train_file": train, "task.eval_file": dev, "task.unpad": unpad,
                                    "train.epochs": 1, "train.micro_batch_size": 4, "train.global_batch_size": 16,
                                    "eval.save_best": False, "checkpoint.every": EVERY, "checkpoint.keep_last": 2,
                                    "deepspeed.config": f"ds_configs/zero{stage}.json"}, name=f"ft{stage}{unpad}.yaml")


def kill_and_resume(entry, cfg, straight, killed, end, rng, twice=False):
    """The killed run (twice: killed again after resuming) and its resume; returns the resumed run's output."""
    step = run_and_kill(entry, 2, cfg, [f"output_dir={killed}"], killed, rng.randint(EVERY + 1, end - 3), end)
    if twice:  # held in the step after the second checkpoint, so that it is surely killed before the end
        step = run_and_kill(entry, 2, cfg, [f"output_dir={killed}"], killed, 2 * EVERY, end, hold=True,
                            resumes_from=step)
    proc = run(entry, 2, cfg, [f"output_dir={killed}"])
    assert_resumed(proc.stdout, killed, step)
    assert compare(straight, killed) == []
    return proc


FULL_ONLY = full_only("embeddings are SIGKILLed at ZeRO 3 with GradCache in CI")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_pretraining_sigkill_resume_is_bit_identical(tmp_path, tiny_config, stage):
    cfg = pretrain_cfg(tiny_config, tmp_path, stage)
    straight = tmp_path / "straight"
    slow = {}
    if stage == 3:  # rank 0's final export outlasts train.dist_timeout_s: the other ranks must not be killed
        slow = {"BERTLAUNCH_SLOW_EXPORT_S": 5}
    run("pretrain", 2, cfg, [f"output_dir={straight}"] + (["train.dist_timeout_s=3"] if slow else []), **slow)
    check_plain_pretraining_run(straight, stage)
    # stage 0 is killed twice: the second attempt is itself a resume
    end = MODERN_STEPS if stage in MODERN else STEPS
    kill_and_resume("pretrain", cfg, straight, tmp_path / "killed", end, random.Random(stage), twice=stage == 0)


@pytest.mark.parametrize("unpad", [False, True], ids=["padded", "pad-free"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_finetuning_sigkill_resume_is_bit_identical(tmp_path, tiny_config, stage, unpad):
    cfg = finetune_cfg(tiny_config, tmp_path, stage, unpad)
    straight = tmp_path / "straight"
    run("finetune", 2, cfg, [f"output_dir={straight}"])
    train = [r for r in read_metrics(straight) if "loss" in r]
    assert len(train) == 7 and train[-1]["samples"] == 100  # ceil(100 / 16) steps, the short last batch kept
    kill_and_resume("finetune", cfg, straight, tmp_path / "killed", 7, random.Random(10 + stage))


@pytest.fixture(scope="module")
def embed_straight(tmp_path_factory):
    """straight(stage) -> (config, output_dir) of the uninterrupted 2-rank embedding run at that stage, run once for
    the tests below. Hard negatives, a BEIR folder scored every 3 steps, 100 rows in global batches of 16 (the last
    of the 7 steps is short: 4 rows), dropout off; at stage 3 GradCache in chunks of 4 rows per rank, the linear
    layers multiplied by oneDNN (model.cpu_linear: its products must be as deterministic as torch's)."""
    from tests.conftest import build_config
    from tests.embed_data import write_beir, write_triples

    runs = {}

    def straight(stage):
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"embed{stage}")
            cached = {"task.grad_cache": True, "train.micro_batch_size": 4,
                      "model.cpu_linear": "onednn"} if stage == 3 else {}
            cfg = build_config(tmp, "embed", {
                "task.train_file": write_triples(tmp / "rows.jsonl", 100, negative=True), "task.negative": "negative",
                "task.eval_dir": write_beir(tmp / "beir"), "train.global_batch_size": 16, "eval.every": EVERY,
                "checkpoint.every": EVERY, "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0,
                "deepspeed.config": f"ds_configs/zero{stage}.json", **cached})
            run("embed", 2, cfg, [f"output_dir={tmp / 'straight'}"])
            runs[stage] = cfg, tmp / "straight"
        return runs[stage]

    return straight


def test_two_ranks_with_gathered_negatives_train_as_one_rank(tmp_path, embed_straight, inproc):
    """2 ranks (GradCache in chunks of 4, ZeRO 3), each query scored against the positives and hard negatives of both
    ranks, against 1 rank taking each global batch of 16 in one forward: the same losses and scores, to rounding."""
    cfg, straight = embed_straight(3)
    inproc("embed", cfg, [f"output_dir={tmp_path}", "task.grad_cache=false", "train.micro_batch_size=16",
                          "deepspeed.config=ds_configs/zero0.json"])
    two, one = read_metrics(straight), read_metrics(tmp_path)
    assert [r["step"] for r in two] == [1, 2, 3, 3, 4, 5, 6, 6, 7, 7] and two[-2]["samples"] == 100
    assert [r["step"] for r in one] == [r["step"] for r in two]
    assert all(abs(a.get(k, 0) - b.get(k, 0)) < 2e-5 for a, b in zip(two, one) for k in ("loss", "eval_ndcg@10"))


@pytest.mark.parametrize("stage", [pytest.param(s, marks=[] if s == 3 else [FULL_ONLY]) for s in (0, 1, 2, 3)])
def test_embedding_sigkill_resume_is_bit_identical(tmp_path, embed_straight, stage):
    cfg, straight = embed_straight(stage)
    kill_and_resume("embed", cfg, straight, tmp_path / "killed", 7, random.Random(20 + stage))
