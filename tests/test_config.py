"""Config: YAML + overrides, unknown keys, all problems at once, batch arithmetic, DeepSpeed JSON checks."""

import subprocess
import sys

import pytest

from bertlaunch.core import configlib
from bertlaunch.core.engine import fill_ds_config, load_ds_json
from bertlaunch.core.plan import batch_arithmetic, make_plan
from bertlaunch.tasks.classify.config import FinetuneConfig
from bertlaunch.tasks.mlm.config import PretrainConfig
from tests.helpers import REPO, write_yaml


def load_pretrain(path, overrides=None) -> PretrainConfig:
    return configlib.load(PretrainConfig, path, overrides)


def base(tmp_path, **extra):
    data = {"output_dir": str(tmp_path / "out"), "model": {"preset": "tiny"},
            "data": {"train_files": ["embedded:pydoc"]}}
    for k, v in extra.items():
        data[k] = v
    return write_yaml(tmp_path / "c.yaml", data)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_pretrain(str(base(tmp_path)), ["train.lr=3e-4", "data.block_size=256", "train.max_steps=7",
                                              "log.wandb.tags=[a, b]", "train.global_batch_size=null"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.data.block_size == 256 and cfg.train.max_steps == 7
    assert cfg.log.wandb.tags == ["a", "b"] and cfg.train.global_batch_size is None


def test_yaml_string_numbers_accepted(tmp_path):
    path = base(tmp_path, train={"lr": "5e-5"})  # YAML 1.1 reads 5e-5 as a string
    assert load_pretrain(str(path)).train.lr == 5e-5


def test_unknown_keys_did_you_mean_and_all_problems_at_once(tmp_path):
    path = base(tmp_path, train={"lerning_rate": 1e-4, "max_steps": "many", "precision": "fp8"},
                data={"train_files": ["embedded:pydoc"], "blok_size": 64})
    with pytest.raises(configlib.ConfigError) as e:
        load_pretrain(str(path), ["log.evry=3"])
    msg = str(e.value)
    assert "unknown key 'train.lerning_rate'" in msg and "did you mean 'lr'" not in msg  # too far for a guess
    assert "unknown key 'data.blok_size' (did you mean 'block_size'?)" in msg
    assert "unknown key 'log.evry' (did you mean 'every'?)" in msg
    assert "train.max_steps: expected an integer (or null), got 'many'" in msg
    assert "train.precision: must be one of 'auto', 'fp32', 'fp16', 'bf16', got 'fp8'" in msg
    assert len(e.value.problems) == 5


def test_cross_field_validation_reports_everything(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"model": {"preset": "huge"},
                                            "data": {"train_files": ["nope/*.txt"], "mlm_probability": 1.5},
                                            "deepspeed": {"config": "ds_configs/zero9.json"}})
    with pytest.raises(configlib.ConfigError) as e:
        load_pretrain(str(path))
    msg = str(e.value)
    for fragment in ("missing required key 'output_dir'", "model.preset 'huge' is not a preset",
                     "data.train_files: 'nope/*.txt' matches no file", "data.mlm_probability must be in (0, 1)",
                     "deepspeed.config: 'ds_configs/zero9.json' does not exist"):
        assert fragment in msg, fragment


def test_preset_and_pretrained_exclusive(tmp_path):
    with pytest.raises(configlib.ConfigError, match="exactly one of model.preset"):
        load_pretrain(str(base(tmp_path)), ["model.pretrained=" + str(tmp_path)])


def test_block_size_vs_positions(tmp_path, inproc):
    """One position check (model/build.py), on the model the run builds; the dry run lists it with the rest."""
    r = inproc("pretrain", base(tmp_path), ["--dry-run", "data.block_size=1024", "train.phases=[{steps: 2, "
                                              "block_size: 2048}]"], check=False)
    assert r.returncode == 2
    assert "train.phases[0].block_size=2048 exceeds the model's max_position_embeddings=512" in r.stderr


@pytest.mark.parametrize("micro,glob,world,fitted,accum", [
    (8, None, 4, 8, 1), (8, 64, 2, 8, 4), (4, 32, 8, 4, 1),
    (256, 4096, 32, 128, 1),  # bert_base.yaml on 32 GPUs: the micro-batch shrinks, the global batch stays
    (32, 32, 8, 4, 1),  # fine-tuning's batch 32 on 8 GPUs
    (8, 100, 2, 5, 10),  # 50 per rank: 5 is the largest micro-batch at most 8 that divides it
])
def test_the_micro_batch_is_fitted_to_the_global_batch(micro, glob, world, fitted, accum):
    assert batch_arithmetic(micro, glob, world) == (fitted, accum, [])


def test_a_global_batch_the_ranks_cannot_share_proposes_sizes():
    assert batch_arithmetic(256, 4096, 24)[2] == [
        "train.global_batch_size=4096 cannot be shared evenly by 24 rank(s): use 4080 or 4104, or a number of ranks "
        "that divides 4096"]


@pytest.mark.parametrize("world", [1, 8, 32])
def test_the_bert_base_recipe_plans_at_any_world_size(world, tmp_path, monkeypatch, capfd):
    """configs/bert_base.yaml's dry run at 1, 8 and 32 ranks: the global batch (4096) and the token budget hold."""
    from bertlaunch.cli.commands import pretrain

    corpus = tmp_path / "wiki.txt"
    corpus.write_text("a river of stone and light\n\nthe garden window\n" * 2000)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    code = pretrain(["--config", str(REPO / "configs" / "bert_base.yaml"), "--dry-run", f"data.train_files=[{corpus}]",
                     f"output_dir={tmp_path / 'out'}", "data.num_workers=1"])
    out, err = capfd.readouterr()
    assert code == 0, err
    micro = min(256, 4096 // world)
    assert f"global 4096 = micro {micro} x accumulation {4096 // world // micro} x world {world}" in out
    assert "steps         70000 = 36.7B token slots" in out
    assert ("train.micro_batch_size 256 -> 128" in out) == (world == 32)


def test_integer_keys_take_scientific_notation(tmp_path):
    cfg = load_pretrain(str(base(tmp_path)), ["train.max_tokens=20e9", "train.warmup_tokens=1.5e6"])
    assert (cfg.train.max_tokens, cfg.train.warmup_tokens) == (20_000_000_000, 1_500_000)
    with pytest.raises(configlib.ConfigError, match="train.max_tokens: expected an integer .or null., got 0.25"):
        load_pretrain(str(base(tmp_path)), ["train.max_tokens=2.5e-1"])


def test_config_and_plan_problems_come_in_one_round(tmp_path, inproc):
    """A bad key and a global batch the ranks cannot share: both in the first message, before anything starts."""
    r = inproc("pretrain", base(tmp_path), ["train.lr=-1", "train.global_batch_size=7", "train.micro_batch_size=4"],
               check=False, WORLD_SIZE=2, RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=29999)
    assert r.returncode == 2
    assert "train.lr must be > 0, got -1.0" in r.stderr
    assert "train.global_batch_size=7 cannot be shared evenly by 2 rank(s): use 6 or 8" in r.stderr
    assert not (tmp_path / "out").exists()


def test_ds_json_auto_filled_and_conflicts_named():
    ds = load_ds_json(str(REPO / "ds_configs" / "zero2.json"))
    filled, problems = fill_ds_config(ds, micro=8, accum=2, world=2, precision="bf16", lr=1e-4,
                                      betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01, grad_clip=1.0)
    assert problems == []
    assert filled["train_batch_size"] == 32 and filled["gradient_accumulation_steps"] == 2
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["optimizer"]["params"] == {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}
    ds["train_micro_batch_size_per_gpu"] = 4
    ds["bf16"] = {"enabled": True}
    _, problems = fill_ds_config(ds, micro=8, accum=1, world=1, precision="fp32", lr=1e-4, betas=[0.9, 0.999],
                                 eps=1e-8, weight_decay=0.0, grad_clip=1.0, source="zero2.json")
    assert any('"train_micro_batch_size_per_gpu" is 4 but the run config gives 8 (train.micro_batch_size)' in p
               for p in problems)
    assert any('"bf16.enabled" is True but the run config gives False (train.precision)' in p for p in problems)


def test_shipped_configs_validate():
    for name in ("tiny_debug.yaml", "demo.yaml", "pipeline_pretrain.yaml"):
        load_pretrain(str(REPO / "configs" / name))


def test_validation_does_not_rely_on_assert(tmp_path):
    """Under python -O asserts vanish; the same errors must still be raised (both entry points' configs)."""
    path = base(tmp_path, train={"max_steps": 0, "lr": -1})
    ft = write_yaml(tmp_path / "f.yaml", {"output_dir": "x", "model": {"pretrained": "minilm", "preset": "tiny"},
                                          "task": {"train_file": "nope.tsv", "max_length": 2}})
    code = ("from bertlaunch.core import configlib\n"
            "from bertlaunch.tasks.mlm.config import PretrainConfig\n"
            "from bertlaunch.tasks.classify.config import FinetuneConfig\n"
            f"for cls, path in ((PretrainConfig, {str(path)!r}), (FinetuneConfig, {str(ft)!r})):\n"
            "    try:\n        configlib.load(cls, path)\n    except Exception as e:\n        print(e)\n")
    out = subprocess.run([sys.executable, "-O", "-c", code], cwd=REPO, capture_output=True, text=True).stdout
    assert "train.max_steps must be >= 1, got 0" in out and "train.lr must be > 0, got -1.0" in out
    assert "set exactly one of model.preset" in out and "task.train_file: 'nope.tsv' does not exist" in out
    assert "task.max_length must be >= 8, got 2" in out


def test_keys_that_nothing_reads_are_rejected(tmp_path):
    """data.dataset & co. were documented but never read: they are unknown keys until they work."""
    with pytest.raises(configlib.ConfigError) as e:
        load_pretrain(str(base(tmp_path)), ["data.dataset=wikitext", "data.train_split=train"])
    assert "unknown key 'data.dataset'" in str(e.value) and "unknown key 'data.train_split'" in str(e.value)


def test_one_plan_for_the_run_and_the_dry_run(tmp_path):
    """Steps, warmup, accumulation and the filled DeepSpeed JSON come from make_plan alone."""
    cfg = load_pretrain(str(base(tmp_path)), ["train.max_steps=100", "train.warmup_ratio=0.06",
                                              "train.micro_batch_size=4", "train.global_batch_size=32",
                                              "deepspeed.config=ds_configs/zero3.json"])
    p, problems = make_plan(cfg, 2, hidden_size=64)
    assert problems == [] and (p.accum, p.global_batch, p.total_steps, p.warmup_steps) == (4, 32, 100, 6)
    zero = p.ds_config["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["stage3_param_persistence_threshold"] == 640
    assert p.ds_config["train_batch_size"] == 32 and p.steps_per_epoch is None
    cfg.train.warmup_steps = 10  # explicit steps win over the ratio
    assert make_plan(cfg, 2)[0].warmup_steps == 10
    ft = FinetuneConfig(output_dir="x")
    ft.train.micro_batch_size, ft.train.global_batch_size = 8, 16
    p, _ = make_plan(ft, 2, examples=70, epochs=3.0)  # ceil(70 / 16) = 5 steps per epoch; 10% warmup
    assert (p.steps_per_epoch, p.total_steps, p.warmup_steps, p.accum) == (5, 15, 1, 1)
    ft.train.max_steps = 7
    assert make_plan(ft, 2, examples=70, epochs=3.0)[0].total_steps == 7


@pytest.mark.parametrize("key", ["model.sparse_mlm_head=false", "eval.max_batches=4"])
def test_pretraining_only_keys_are_unknown_to_finetuning(tmp_path, key):
    """Fine-tuning has no MLM head and always evaluates the whole dev set: the keys are not offered there."""
    path = write_yaml(tmp_path / "f.yaml", {"output_dir": str(tmp_path / "o"), "model": {"preset": "tiny"},
                                           "task": {"train_file": "t.tsv", "text_a": "a", "label": "label"}})
    with pytest.raises(configlib.ConfigError, match=f"unknown key '{key.split('=')[0]}'"):
        configlib.load(FinetuneConfig, str(path), [key])
