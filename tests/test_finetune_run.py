"""End-to-end fine-tuning runs on a tiny BERT: labels round-trip, regression, 2-rank DeepSpeed, errors."""

import csv
import json

import pytest

from tests.helpers import read_metrics, run, write_yaml
from tests.test_finetune_data import write_pairs

pytestmark = pytest.mark.slow


def rule_label(i, rng):
    return ["contradiction", "entailment", "neutral"][i % 3]


def ft_config(tmp_path, files, **over):
    data = {"output_dir": str(tmp_path / "out"), "tokenizer": "bert-base-uncased", "model": {"preset": "tiny"},
            "task": {"train_file": str(files[0]), "eval_file": str(files[1]),
                     "test_file": str(files[2]) if len(files) > 2 else None, "text_a": "a", "text_b": "b",
                     "label": "label"},
            "train": {"epochs": 2, "micro_batch_size": 8, "lr": 1e-3, "precision": "fp32"},
            "deepspeed": {"config": "ds_configs/zero0.json"},
            "log": {"every": 2, "wandb": {"mode": "disabled"}}, "checkpoint": {"keep_last": 1}}
    for key, value in over.items():
        section, name = key.split("__")
        data[section][name] = value
    return write_yaml(tmp_path / "ft.yaml", data)


def test_string_labels_round_trip_to_predictions(tmp_path):
    files = [write_pairs(tmp_path / f"{n}.tsv", n=k, labels=rule_label, seed=i)
             for i, (n, k) in enumerate([("train", 90), ("dev", 30), ("test", 21)])]
    run("finetune", 0, ft_config(tmp_path, files), [])
    out = tmp_path / "out"
    rows = list(csv.DictReader(open(out / "predictions.tsv"), delimiter="\t"))
    assert len(rows) == 21 and list(rows[0]) == ["index", "prediction", "label", "prob_contradiction",
                                                 "prob_entailment", "prob_neutral"]
    assert {r["prediction"] for r in rows} <= {"contradiction", "entailment", "neutral"}
    assert [r["label"] for r in rows] == [rule_label(i, None) for i in range(21)]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["labels"] == ["contradiction", "entailment", "neutral"] and results["metric"] == "macro_f1"
    assert results["best_step"] in (12, 24) and "test_macro_f1" in results["test"]
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24]  # every epoch: ceil(90 / 8) = 12 steps
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.id2label == {0: "contradiction", 1: "entailment", 2: "neutral"}


def test_regression_path(tmp_path):
    files = [write_pairs(tmp_path / f"{n}.tsv", n=k, labels=lambda i, rng: round(rng.uniform(0, 5), 3), seed=i)
             for i, (n, k) in enumerate([("train", 64), ("dev", 24)])]
    run("finetune", 0, ft_config(tmp_path, files, train__epochs=1), [])
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["metric"] == "pearson" and set(results["best"]) >= {"eval_pearson", "eval_spearman", "eval_mse"}
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tmp_path / "out" / "final")
    assert cfg.num_labels == 1 and cfg.problem_type == "regression"


def test_two_rank_deepspeed_finetune(tmp_path):
    files = [write_pairs(tmp_path / f"{n}.tsv", n=k, seed=i) for i, (n, k) in enumerate([("train", 70), ("dev", 20)])]
    cfg = ft_config(tmp_path, files, deepspeed__config="ds_configs/zero2.json", train__global_batch_size=16)
    run("finetune", 2, cfg, [])
    records = read_metrics(tmp_path / "out")
    train = [r for r in records if "loss" in r]
    assert train[-1]["samples"] == 2 * 70  # two epochs, every example once per epoch, short last batch kept
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 10]


def test_bad_task_inputs_fail_fast_with_the_promised_messages(tmp_path):
    files = [write_pairs(tmp_path / "train.tsv", n=20), write_pairs(tmp_path / "dev.tsv", n=6, labels=("yes", "maybe"))]
    proc = run("finetune", 0, ft_config(tmp_path, files), [], check=False)
    assert proc.returncode == 2
    assert f"{files[1]}: line 3, column 'label': label 'maybe' does not occur in the training file" in proc.stderr
    proc = run("finetune", 0, ft_config(tmp_path, files), ["task.text_b=sentence2"], check=False)
    assert proc.returncode == 2 and "no column 'sentence2' for task.text_b" in proc.stderr
