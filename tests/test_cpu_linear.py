"""model.cpu_linear=onednn (model/cpu_linear.py): oneDNN's products give torch's linear layers, forward and backward, to
rounding; everything it does not cover takes torch's own path; a model keeps its weights and state dict; a run is
deterministic and trains like torch's (its SIGKILL resume: tests/test_kill_matrix.py, embeddings at ZeRO 3)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
import transformers

from bertlaunch.model.cpu_linear import onednn_linear, use_onednn_linears
from tests.families import family_config
from tests.helpers import read_metrics


def grads(fn, x, w, b):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    y = fn(*leaves, *([None] if b is None else []))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(37, 48), (3, 11, 48)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_onednn_products_give_torchs_outputs_and_gradients(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(80, 48, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    ours, theirs = grads(onednn_linear, x, w, b), grads(F.linear, x, w, b)
    assert [t.shape for t in ours] == [t.shape for t in theirs]
    for a, t in zip(ours, theirs):  # output, dx, dW(, db)
        assert float((a - t).norm() / t.norm()) < 1e-6


def test_what_onednn_does_not_cover_takes_torchs_own_path():
    x, w = torch.randn(5, 8), torch.randn(4, 8)
    half = x.bfloat16(), w.bfloat16()
    assert torch.equal(onednn_linear(*half), F.linear(*half))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(onednn_linear(x, w), F.linear(x, w))
    assert onednn_linear(x[:0], w).shape == (0, 4)


def test_a_model_keeps_its_weights_and_state_dict_and_gives_its_outputs():
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(family_config("bert")).eval()
    ids = torch.randint(1000, 2000, (3, 9))
    before, keys = model(input_ids=ids).last_hidden_state, list(model.state_dict())
    assert use_onednn_linears(model) == 2 * 6 + 1  # per layer q, k, v, attention out, intermediate, out; pooler
    after = model(input_ids=ids).last_hidden_state
    assert list(model.state_dict()) == keys and torch.allclose(before, after, atol=1e-5)
    assert "forward" in model.encoder.layer[0].attention.self.query.__dict__


@pytest.mark.parametrize("kind", ["embed", "pretrain", "finetune"])
def test_a_run_is_deterministic_and_trains_like_torchs(tmp_path, tiny_config, inproc, corpus, pairs, kind):
    """Every task's model (the MLM head tied to the embeddings, a classifier, an encoder) through oneDNN: two runs
    give the same losses bit for bit, and torch's products the same to rounding."""
    from tests.embed_data import write_triples

    data = {"embed": {"task.train_file": write_triples(tmp_path / "t.jsonl", 48), "train.global_batch_size": 16},
            "pretrain": {"data.train_files": [corpus(200)], "train.global_batch_size": 8},
            "finetune": {"task.train_file": pairs("train.tsv"), "train.global_batch_size": 8}}[kind]
    cfg = tiny_config(kind, {**data, "train.max_steps": 4, "log.every": 1})
    logs = {name: inproc(kind, cfg, [f"output_dir={tmp_path / name}", f"model.cpu_linear={kernel}"]).stdout
            for name, kernel in (("a", "onednn"), ("b", "onednn"), ("torch", "torch"))}
    assert re.search(r"linear layers: [1-9]\d* multiplied by oneDNN", logs["a"]) and "oneDNN" not in logs["torch"]
    a, b, ref = ([r["loss"] for r in read_metrics(tmp_path / n) if "loss" in r] for n in ("a", "b", "torch"))
    assert len(a) == 4 and a == b
    assert max(abs(x - y) / abs(y) for x, y in zip(a, ref)) < 1e-4


def test_the_dry_run_says_who_multiplies_and_compile_is_refused(tmp_path, tiny_config, inproc):
    from tests.embed_data import write_triples

    cfg = tiny_config("embed", {"task.train_file": write_triples(tmp_path / "t.jsonl", 48)})
    r = inproc("embed", cfg, ["--dry-run", "model.cpu_linear=onednn"])
    assert "linear layers multiplied by oneDNN (model.cpu_linear)" in r.stdout
    r = inproc("embed", cfg, ["--dry-run", "model.cpu_linear=onednn", "model.compile=true"], check=False)
    assert r.returncode == 2 and "model.cpu_linear=onednn with model.compile=true" in r.stderr
