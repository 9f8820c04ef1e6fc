"""End-to-end pretraining in the single-process debug mode (in-process) and its CLI errors.
The multi-rank runs are in test_resume.py: each straight run there is also checked like a plain run."""

from pathlib import Path

import pytest
import torch

from tests.helpers import read_metrics


def probe_logits(model_dir_or_model, ids):
    from transformers import AutoModelForMaskedLM

    model = (AutoModelForMaskedLM.from_pretrained(model_dir_or_model)
             if isinstance(model_dir_or_model, str) else model_dir_or_model)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_single_process_debug_run_outputs(tmp_path, tiny_config, corpus, inproc):
    cfg = tiny_config("pretrain", {"data.train_files": [corpus(400)], "data.eval_files": [corpus(60, "e.txt", seed=9)],
                                   "train.max_steps": 30, "train.warmup_steps": 3, "eval.every": 15,
                                   "eval.max_batches": 4, "log.every": 5, "checkpoint.every": 0})
    inproc("pretrain", cfg)
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


def test_cli_reports_config_errors_without_training(tmp_path, tiny_config, inproc):
    cfg = tiny_config("pretrain", {"data.train_files": ["embedded:pydoc"], "data.blok_size": 3,
                                   "train.micro_batch_size": 0})
    proc = inproc("pretrain", cfg, ["train.lr=abc"], check=False)
    assert proc.returncode == 2
    assert "unknown key 'data.blok_size' (did you mean 'block_size'?)" in proc.stderr
    assert "train.lr: expected a number, got 'abc'" in proc.stderr
    assert "train.micro_batch_size must be >= 1, got 0" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_command_runs_from_a_project_with_its_own_data_and_model_packages(tmp_path, tiny_config, corpus):
    """A user's project has packages named data/, model/ and launch/ first on its path: ours live under
    bertlaunch.* and are never shadowed (the console command; the entry scripts run in every other test)."""
    import subprocess
    import sys

    from tests.helpers import env

    project = tmp_path / "project"
    for name in ("data", "model", "launch"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"raise ImportError('the user project\\'s own {name} package')\n")
    cfg = tiny_config("pretrain", {"data.train_files": [corpus(40)]})
    bertlaunch = Path(sys.executable).with_name("bertlaunch")
    proc = subprocess.run([str(bertlaunch), "pretrain", "--config", str(cfg), "--dry-run"], cwd=project,
                          capture_output=True, text=True, env=env(PYTHONPATH=str(project)), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run OK" in proc.stdout


def test_keep_last_holds_after_a_resume(tmp_path, tiny_config, corpus, inproc):
    """Pretraining keeps no best checkpoint: after a resume, the best evaluation's step is pruned like any other
    (it once stayed protected for the whole attempt, one checkpoint over checkpoint.keep_last)."""
    from bertlaunch.core.checkpoint import list_checkpoints, read_trainer

    over = {"data.train_files": [corpus(300)], "data.eval_files": [corpus(40, "e.txt", seed=9)], "eval.every": 2,
            "eval.max_batches": 2, "checkpoint.every": 2, "checkpoint.keep_last": 2}
    cfg, ckpts = tiny_config("pretrain", over), tmp_path / "out" / "checkpoints"
    inproc("pretrain", cfg, ["train.max_steps=4"])
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 4]
    assert read_trainer(list_checkpoints(ckpts)[-1][1])["state"]["best_step"] == 2  # saved before step 4's eval
    inproc("pretrain", cfg, ["train.max_steps=8"])
    assert [s for s, _ in list_checkpoints(ckpts)] == [6, 8]


@pytest.mark.slow
def test_zero2_offload_trains_and_resumes_like_zero2(tmp_path, tiny_config, corpus, inproc):
    """ds_configs/zero2_offload.json (the optimizer state on the CPU) runs our AdamW on the offloaded partitions:
    the same losses and weights as ZeRO-2, also across a resume (DeepSpeed refused the client optimizer before)."""
    from tests.helpers import assert_resumed, compare

    over = {"data.train_files": [corpus(300)], "train.max_steps": 4, "train.warmup_steps": 0,
            "train.schedule": "constant", "checkpoint.every": 2}
    plain = tiny_config("pretrain", over | {"deepspeed.config": "ds_configs/zero2.json",
                                            "output_dir": tmp_path / "zero2"}, name="zero2.yaml")
    inproc("pretrain", plain)
    offload = tiny_config("pretrain", over | {"deepspeed.config": "ds_configs/zero2_offload.json"}, name="off.yaml")
    inproc("pretrain", offload, ["train.max_steps=2"])
    assert_resumed(inproc("pretrain", offload).stdout, tmp_path / "out", 2)
    assert compare(tmp_path / "zero2", tmp_path / "out") == []
