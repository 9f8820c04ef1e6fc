"""End-to-end pretraining runs: single-process debug mode and 2-rank DeepSpeed on the CPU."""

import json

import pytest
import torch

from tests.helpers import (
    REPO,
    WIKI_TEST,
    WIKI_VALID,
    make_corpus,
    needs_shared,
    read_metrics,
    run,
    write_yaml,
)


def tiny_config(tmp_path, train_files, eval_files=(), **over):
    data = {"output_dir": str(tmp_path / "out"), "model": {"preset": "tiny"},
            "data": {"train_files": [str(f) for f in train_files], "eval_files": [str(f) for f in eval_files],
                     "block_size": 64, "num_workers": 1},
            "train": {"max_steps": 30, "micro_batch_size": 8, "lr": 2e-3, "warmup_steps": 3, "precision": "fp32"},
            "deepspeed": {"config": "ds_configs/zero0.json"},
            "eval": {"every": 15, "max_batches": 4}, "log": {"every": 5, "wandb": {"mode": "disabled"}},
            "checkpoint": {"every": 0}}
    for key, value in over.items():
        section, name = key.split("__")
        data[section][name] = value
    return write_yaml(tmp_path / "run.yaml", data)


def probe_logits(model_dir_or_model, ids):
    from transformers import AutoModelForMaskedLM

    model = (AutoModelForMaskedLM.from_pretrained(model_dir_or_model)
             if isinstance(model_dir_or_model, str) else model_dir_or_model)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.slow
def test_single_process_debug_run_outputs(tmp_path):
    corpus = make_corpus(tmp_path / "train.txt", 400)
    held_out = make_corpus(tmp_path / "eval.txt", 60, seed=9)
    cfg = tiny_config(tmp_path, [corpus], [held_out])
    run("pretrain", 0, cfg, [])
    out = tmp_path / "out"
    assert (out / "config.yaml").is_file()
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"):
        assert all(r.get(key) is not None for r in train), key
    assert train[-1]["tokens"] == 30 * 8 * 64  # every slot is a real token: packed, no padding
    assert [r["step"] for r in evals] == [15, 30] and all(r["perplexity"] > 1 for r in evals)
    assert train[-1]["loss"] < train[0]["loss"] - 1.0
    # final/: Hugging Face format with the tokenizer, same logits as the trained weights
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(final)
    ids = tok(["the river and the stone house"], return_tensors="pt")["input_ids"]
    ds_state = torch.load(out / "checkpoints" / "step_00000030" / "ds" / "state" / "mp_rank_00_model_states.pt",
                          map_location="cpu", weights_only=False)["module"]
    live = BertForMaskedLM(BertConfig.from_pretrained(final))
    live.load_state_dict({k.removeprefix("hf."): v for k, v in ds_state.items()})
    assert torch.equal(probe_logits(str(final), ids), probe_logits(live, ids))


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_deepspeed_on_wikitext(tmp_path, stage):
    cfg = tiny_config(tmp_path, [WIKI_VALID], [WIKI_TEST], deepspeed__config=f"ds_configs/zero{stage}.json",
                      data__num_workers=2, train__global_batch_size=32, data__block_size=128)
    run("pretrain", 2, cfg, ["train.max_steps=24", "eval.every=12", "log.every=4"])
    out = tmp_path / "out"
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] - 0.8
    assert train[-1]["tokens"] == 24 * 32 * 128
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    trainer = json.loads((out / "checkpoints" / "step_00000024" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["zero_stage"] == stage and len(trainer["streams"]) == 4
    ids = torch.tensor([[101, 2000, 2001, 103, 2003, 102]])
    assert probe_logits(str(out / "final"), ids).shape == (1, 6, 30522)


def test_cli_reports_config_errors_without_training(tmp_path):
    cfg = write_yaml(tmp_path / "bad.yaml", {"output_dir": str(tmp_path / "o"), "model": {"preset": "tiny"},
                                            "data": {"train_files": ["embedded:pydoc"], "blok_size": 3},
                                            "train": {"micro_batch_size": 0}})
    proc = run("pretrain", 0, cfg, ["train.lr=abc"], check=False)
    assert proc.returncode == 2
    assert "unknown key 'data.blok_size' (did you mean 'block_size'?)" in proc.stderr
    assert "train.lr: expected a number, got 'abc'" in proc.stderr
    assert not (tmp_path / "o").exists()
    assert REPO.is_dir()
