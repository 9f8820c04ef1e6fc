"""Pretraining at scale on 2 CPU ranks: sequence-length phases (a SIGKILL right at the boundary and one
inside phase 2 resume bit-identically; every document once per epoch across the boundaries), token budgets,
schedules, the time budget, export_at, LAMB and the shipped recipes."""

import json
import math
import signal

import pytest
import torch

from bertlaunch.core import configlib
from bertlaunch.core.schedule import Schedule
from bertlaunch.data.tokenize import load_spec
from tests.helpers import (
    REPO,
    Job,
    assert_resumed,
    audited_tokens,
    compare,
    doc_tokens,
    read_metrics,
    run,
    run_and_kill,
    saved_on_signal,
)

PHASES = [{"steps": 6, "block_size": 32}, {"steps": 6, "block_size": 64, "micro_batch_size": 4,
                                            "global_batch_size": 16}]


@pytest.mark.slow
def test_phases_resume_bit_identical_at_and_after_the_boundary(tmp_path, tiny_config, corpus):
    files = [str(corpus(70, "a.txt")), str(corpus(30, "b.txt", seed=3))]
    cfg = tiny_config("pretrain", {"data.train_files": files, "data.num_workers": 2, "train.phases": PHASES,
                                   "train.max_steps": None, "train.micro_batch_size": 8,
                                   "train.global_batch_size": 16, "data.audit": True,
                                   "deepspeed.config": "ds_configs/zero1.json", "checkpoint.every": 2,
                                   "train.warmup_steps": 0, "data.block_size": 32})
    straight, out = tmp_path / "straight", tmp_path / "killed"
    run("pretrain", 2, cfg, [f"output_dir={straight}"])
    rows = [r for r in read_metrics(straight) if "loss" in r]
    assert [(r["step"], r["phase"], r["block_size"]) for r in rows] == \
        [(s, 0 if s <= 6 else 1, 32 if s <= 6 else 64) for s in range(1, 13)]
    assert rows[-1]["samples"] == 12 * 16 and rows[5]["tokens"] <= 6 * 16 * 32 < rows[6]["tokens"]
    # one schedule over both phases: linear decay continues across the boundary
    assert rows[5]["lr"] > rows[6]["lr"] > rows[7]["lr"] and rows[-1]["lr"] == 0.0

    # killed in step 7, after the checkpoint of step 6, the boundary; then in step 11, inside phase 2
    assert run_and_kill("pretrain", 2, cfg, [f"output_dir={out}"], out, 6, 12, hold=True) == 6
    assert run_and_kill("pretrain", 2, cfg, [f"output_dir={out}"], out, 10, 12, hold=True, resumes_from=6) == 10
    proc = run("pretrain", 2, cfg, [f"output_dir={out}"])
    assert_resumed(proc.stdout, out, 10)
    assert "phase 1: steps 6-12, block size 64" in proc.stdout
    assert compare(straight, out) == []  # per-step losses and final weights, bit for bit

    truth, epochs = doc_tokens(files, load_spec("bert-base-uncased")), {}
    for run_dir in (straight, out):
        seen = audited_tokens(run_dir)
        trainer = json.loads((run_dir / "checkpoints" / "step_00000012" / "trainer.json").read_text())
        done = min(s["epoch"] for s in trainer["streams"])
        assert done >= 1
        for epoch in range(done):  # every finished epoch: each document exactly once, token for token
            assert {d: n for (e, d), n in seen.items() if e == epoch} == truth, (run_dir.name, epoch)
        epochs[run_dir.name] = seen
    assert epochs["straight"] == epochs["killed"]


def test_plan_from_token_budgets_and_phases(tmp_path, tiny_config):
    from bertlaunch.core.plan import make_plan
    from bertlaunch.tasks.mlm.config import PretrainConfig

    def cfg(**over):
        return configlib.load(PretrainConfig, tiny_config("pretrain", {"data.train_files": [str(REPO / "README.md")],
                                                                       "train.max_steps": None, **over}))

    # max_tokens: ceil(100000 / (global 16 x block 64)) = 98 steps, at any world size
    c = cfg(**{"train.max_tokens": 100_000, "train.warmup_tokens": 10_000, "train.warmup_steps": 0,
               "train.global_batch_size": 16})
    for world in (1, 2):
        p, problems = make_plan(c, world, phases=c.phase_specs(), warmup_tokens=c.train.warmup_tokens)
        assert problems == [] and (p.total_steps, p.warmup_steps) == (98, 10)
    c = cfg(**{"train.phases": [{"tokens": 10240, "block_size": 32}, {"steps": 3, "block_size": 64,
                                                                       "global_batch_size": 32}],
               "train.global_batch_size": 16})
    p, problems = make_plan(c, 2, phases=c.phase_specs())
    assert problems == [] and p.total_steps == 23
    assert [(ph.start, ph.end, ph.block_size, ph.accum) for ph in p.phases] == [(0, 20, 32, 1), (20, 23, 64, 2)]
    assert p.phase_at(19).index == 0 and p.phase_at(20).index == 1 and p.phase_at(23).index == 1
    bad = tiny_config("pretrain", {"data.train_files": [str(REPO / "README.md")], "train.max_tokens": 5,
                                   "train.max_steps": None,
                                   "train.phases": [{"block_size": 1024}, {"steps": 1, "tokens": 9, "block_size": 8}],
                                   "train.decay_ratio": 0.3}, name="bad.yaml")
    with pytest.raises(configlib.ConfigError) as e:
        configlib.load(PretrainConfig, bad)
    for msg in ("train.phases[0]: set exactly one of steps or tokens", "train.phases[1]: set exactly one",
                "train.max_tokens does not apply with train.phases",
                "train.decay_ratio=0.3 only applies to train.schedule=wsd"):
        assert msg in str(e.value)


def test_schedule_values():
    wsd = Schedule("wsd", warmup=10, total=100, min_ratio=0.1, decay_ratio=0.2)
    assert [wsd(s) for s in (0, 5, 10, 50, 79, 80)] == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert wsd(90) == pytest.approx(0.55) and wsd(100) == pytest.approx(0.1)
    lin = Schedule("linear", 10, 110, 0.02)
    assert lin(60) == pytest.approx(0.02 + 0.98 * 0.5) and lin(110) == pytest.approx(0.02)
    cos = Schedule("cosine", 0, 100, 0.1)
    assert cos(50) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    inv = Schedule("inverse_sqrt", 16, 1000, 0.2)
    assert inv(16) == 1.0 and inv(64) == pytest.approx(0.5) and inv(1000) == pytest.approx(0.2)
    # time-based: the same curve at the fraction of the budget used
    assert wsd.at_fraction(0.9) == pytest.approx(0.55) and wsd.at_fraction(1.3) == pytest.approx(0.1)
    assert Schedule("constant", 4, 10).at_fraction(0.5) == 1.0


def test_lamb_update_and_weight_decay_groups():
    from transformers import BertConfig, BertForMaskedLM

    from bertlaunch.core.engine import param_groups
    from bertlaunch.core.lamb import Lamb

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    w.grad = torch.randn(4, 3)
    before = w.detach().clone()
    Lamb([w], lr=0.1, weight_decay=0.01).step()
    # step 1: m_hat = g, v_hat = g^2 -> u = g / (|g| + eps) + wd w; trust = |w| / |u|
    u = w.grad / (w.grad.abs() + 1e-6) + 0.01 * before
    expect = before - 0.1 * (before.norm() / u.norm()) * u
    assert torch.allclose(w.detach(), expect, atol=1e-6)
    model = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert any("word_embeddings" in names[id(p)] for p in decay["params"])


def test_time_budget_stops_at_the_budget_with_the_lr_at_its_floor(tmp_path, tiny_config, corpus, inproc):
    """A 5-second budget, SIGTERM half way, resume: the time of the first attempt counts; the run ends at the
    first step past the budget with the lr at its floor; LAMB on the CPU, padded vocabulary, exports."""
    cfg = tiny_config("pretrain", {"data.train_files": [corpus(200)], "train.max_steps": 100_000,
                                   "train.time_budget_h": 5 / 3600, "train.min_lr_ratio": 0.1,
                                   "train.warmup_steps": 2, "train.optimizer": "lamb", "log.every": 1,
                                   "model.pad_vocab_to_multiple_of": 64, "checkpoint.export_at": [0.5, 1.0]})
    out = tmp_path / "out"
    job = Job("pretrain", 0, cfg, [])
    job.wait_until(lambda: (out / "metrics.jsonl").is_file() and any(
        r.get("time", 0) > 2 for r in read_metrics(out)), 120, "2 s of training")
    job.kill(signal.SIGTERM)
    assert job.wait(60) == 75
    proc = run("pretrain", 0, cfg, [])
    assert_resumed(proc.stdout, out, saved_on_signal(job.output()))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert rows[-1]["time"] >= 5.0 > rows[-2]["time"]  # stopped within one step of the budget
    assert rows[-1]["lr"] == pytest.approx(0.1 * 2e-3)  # the floor: train.min_lr_ratio x train.lr
    assert rows[len(rows) // 2]["lr"] > rows[-1]["lr"]
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    exports = sorted((out / "exports").iterdir())
    assert [p.name for p in exports][-1] == f"step_{rows[-1]['step']:08d}" and len(exports) == 2
    model = AutoModelForMaskedLM.from_pretrained(exports[0])
    tok = AutoTokenizer.from_pretrained(exports[0])
    assert model.config.vocab_size == 30528 and len(tok) == 30522  # padded to a multiple of 64, still loads
    assert model(**tok("river stone", return_tensors="pt")).logits.shape[-1] == 30528
    assert math.isfinite(rows[-1]["loss"])
