"""Exact, atomic checkpoint/resume: SIGKILL at random steps, world-size changes, broken checkpoints."""

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter

import pytest

from data.sources import PieceReader, Segment, file_sizes
from data.tokenize import load_spec
from launch.core.checkpoint import list_checkpoints
from tests.helpers import (
    REPO,
    WIKI_VALID,
    command,
    compare,
    env,
    last_step,
    losses,
    make_corpus,
    needs_shared,
    run,
    run_and_kill,
    write_yaml,
)

pytestmark = pytest.mark.slow


def config(tmp_path, train_files, stage=2, steps=16, every=4, workers=2, micro=8, glob=16, **extra):
    data = {"output_dir": str(tmp_path / "unused"), "model": {"preset": "tiny"},
            "data": {"train_files": [str(f) for f in train_files], "block_size": 64, "num_workers": workers},
            "train": {"max_steps": steps, "micro_batch_size": micro, "global_batch_size": glob, "lr": 2e-3,
                      "warmup_steps": 2, "precision": "fp32"},
            "deepspeed": {"config": f"ds_configs/zero{stage}.json"},
            "log": {"every": 1, "wandb": {"mode": "disabled"}}, "eval": {"every": 0},
            "checkpoint": {"every": every, "keep_last": 3}}
    for key, value in extra.items():
        section, name = key.split("__")
        data[section][name] = value
    return write_yaml(tmp_path / f"zero{stage}.yaml", data)


@needs_shared
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sigkill_twice_resume_is_bit_identical(tmp_path, stage):
    """2 CPU ranks, ZeRO stage N: SIGKILL the launcher's whole process group at two random steps."""
    cfg = config(tmp_path, [WIKI_VALID], stage=stage)
    run("pretrain", 2, cfg, [f"output_dir={tmp_path / 'straight'}"])
    rng = random.Random(stage)
    out = tmp_path / "killed"
    for kill_at in (rng.randint(5, 8), rng.randint(10, 13)):
        reached = run_and_kill("pretrain", 2, cfg, [f"output_dir={out}"], out, kill_at)
        assert reached >= kill_at
    proc = run("pretrain", 2, cfg, [f"output_dir={out}"])
    assert "resumed from" in proc.stdout
    assert compare(tmp_path / "straight", out) == []
    assert len(losses(out)) == 16


def doc_tokens(files, spec):
    """Corpus truth: tokens (with [CLS]/[SEP]) of every document, keyed like the audit's doc ids."""
    out = {}
    for fi, f in enumerate(files):
        for p in PieceReader(f, "blank_line", "text", 1 << 20, "strict").pieces(Segment(0, 0, file_sizes([f])[0])):
            key = fi * (1 << 40) + p.doc_offset
            out[key] = out.get(key, 0) + len(spec.encode([p.text])[0]) + p.doc_start + p.doc_end
    return out


def audited_tokens(out):
    """(epoch, doc) -> tokens trained; a step counts as trained by the last attempt that ran it (all its
    ranks), earlier attempts of that step were killed before their checkpoint."""
    by_step = {}
    for f in sorted((out / "audit").glob("rank_*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            by_step.setdefault(r["step"], {}).setdefault(r["attempt"], []).append(r)
    seen = Counter()
    for attempts in by_step.values():
        for r in attempts[max(attempts)]:
            for epoch, doc, n in r["docs"]:
                seen[(epoch, doc)] += n
    return seen


def test_exactly_once_across_kills_and_world_size_changes(tmp_path):
    """2 ranks x 2 workers -> kill -> 1 rank x 1 worker -> kill -> 2 ranks x 2 workers, several epochs:
    every document of every finished epoch is trained exactly once, token for token."""
    files = [str(make_corpus(tmp_path / f"c{i}.txt", n, seed=i)) for i, n in enumerate([40, 5, 70])]
    cfg = config(tmp_path, files, stage=2, steps=60, every=5, micro=4, glob=8,
                 data__audit=True, data__block_size=32)
    out = tmp_path / "run"
    o = [f"output_dir={out}"]
    run_and_kill("pretrain", 2, cfg, o, out, 13)
    run_and_kill("pretrain", 0, cfg, o + ["data.num_workers=1"], out, 33)  # world 2 -> 1, workers 2 -> 1
    proc = run("pretrain", 2, cfg, o)  # back to 2 ranks x 2 workers
    assert "resized from 1 rank(s) x 1 worker(s)" in proc.stdout
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


def test_killed_during_save_and_corrupt_checkpoint_fall_back(tmp_path):
    corpus = make_corpus(tmp_path / "c.txt", 300)
    cfg = config(tmp_path, [corpus], stage=1, steps=12, every=4, workers=1)
    out = tmp_path / "run"
    run("pretrain", 0, cfg, [f"output_dir={out}"], check=False, BERTLAUNCH_KILL_IN_SAVE_AT=8)
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4]
    assert (out / "checkpoints" / ".tmp-step_00000008").is_dir()  # the half-written save, never committed
    assert "resumed from" in run("pretrain", 0, cfg, [f"output_dir={out}"]).stdout
    # flip one byte in the newest committed checkpoint: checksum catches it, resume falls back
    newest = list_checkpoints(out / "checkpoints")[-1][1]
    shard = next(p for p in (newest / "ds").rglob("*.pt"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    proc = run("pretrain", 0, cfg, [f"output_dir={out}"])
    assert f"checkpoint {newest} is unusable" in proc.stdout and "sha256 mismatch" in proc.stdout
    assert "resumed from" in proc.stdout
    straight = tmp_path / "straight"
    run("pretrain", 0, cfg, [f"output_dir={straight}"])
    assert compare(straight, out) == []
    assert not list((out / "checkpoints").glob(".tmp-step_*"))  # stale temporaries cleaned up
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4, 8, 12]  # keep_last=3


def test_config_change_is_refused_by_key(tmp_path):
    corpus = make_corpus(tmp_path / "c.txt", 200)
    cfg = config(tmp_path, [corpus], stage=0, steps=4, every=2, workers=1)
    out = tmp_path / "run"
    run("pretrain", 0, cfg, [f"output_dir={out}"])
    proc = run("pretrain", 0, cfg, [f"output_dir={out}", "train.max_steps=6", "train.lr=0.005",
                                    "data.block_size=32"], check=False)
    assert proc.returncode == 2
    assert "cannot resume exactly" in proc.stderr
    assert "train.lr: checkpoint has 0.002, config has 0.005" in proc.stderr
    assert "data.block_size: checkpoint has 64, config has 32" in proc.stderr


@pytest.mark.parametrize("ranks", [0, 2])
def test_sigterm_checkpoints_and_exits_for_requeue(tmp_path, ranks):
    corpus = make_corpus(tmp_path / "c.txt", 400)
    cfg = config(tmp_path, [corpus], stage=2, steps=400, every=0, workers=1)
    out = tmp_path / "run"
    proc = subprocess.Popen(command("pretrain", ranks, cfg, [f"output_dir={out}"]), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while last_step(out / "metrics.jsonl") < 3:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # like a scheduler: every process (launcher, ranks, loader workers)
    text = proc.communicate(timeout=120)[0]
    ckpts = list_checkpoints(out / "checkpoints")
    assert len(ckpts) == 1 and 3 <= ckpts[0][0] < 400
    assert f"checkpoint saved at step {ckpts[0][0]}" in text
    if ranks == 0:
        assert proc.returncode == 75
    assert last_step(out / "metrics.jsonl") == ckpts[0][0]


def test_export_cli_and_check_resume_cli(tmp_path):
    corpus = make_corpus(tmp_path / "c.txt", 200)
    cfg = config(tmp_path, [corpus], stage=0, steps=6, every=3, workers=1)
    proc = subprocess.run(["python", "-m", "launch.check_resume", "--config", str(cfg), "--steps", "6",
                           "--workdir", str(tmp_path / "cr")], cwd=REPO, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exact: 6 per-step losses and all final weights are bit-identical" in proc.stdout
    ckpt = list_checkpoints(tmp_path / "cr" / "resumed" / "checkpoints")[0][1]
    proc = subprocess.run(["python", "-m", "launch.export", str(ckpt), str(tmp_path / "hf")], cwd=REPO, env=env(),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").config.num_hidden_layers == 2
    shutil.rmtree(tmp_path / "cr")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_finetune_sigkill_resume_is_bit_identical(tmp_path, stage):
    from tests.test_finetune_data import write_pairs

    files = [write_pairs(tmp_path / f"{n}.tsv", n=k, seed=i) for i, (n, k) in enumerate([("train", 100), ("dev", 20)])]
    cfg = write_yaml(tmp_path / "ft.yaml", {
        "output_dir": str(tmp_path / "unused"), "tokenizer": "bert-base-uncased", "model": {"preset": "tiny"},
        "task": {"train_file": str(files[0]), "eval_file": str(files[1]), "text_a": "a", "text_b": "b",
                 "label": "label"},
        "train": {"epochs": 2, "micro_batch_size": 4, "global_batch_size": 16, "lr": 1e-3, "precision": "fp32"},
        "deepspeed": {"config": f"ds_configs/zero{stage}.json"}, "eval": {"save_best": False},
        "log": {"every": 1, "wandb": {"mode": "disabled"}}, "checkpoint": {"every": 3, "keep_last": 2}})
    run("finetune", 2, cfg, [f"output_dir={tmp_path / 'straight'}"])
    out = tmp_path / "killed"
    rng = random.Random(10 + stage)
    for kill_at in (rng.randint(4, 6), rng.randint(8, 11)):  # 7 steps per epoch: the second kill is in epoch 2
        run_and_kill("finetune", 2, cfg, [f"output_dir={out}"], out, kill_at)
    assert "resumed from" in run("finetune", 2, cfg, [f"output_dir={out}"]).stdout
    assert compare(tmp_path / "straight", out) == []
    assert len(losses(out)) == 14
