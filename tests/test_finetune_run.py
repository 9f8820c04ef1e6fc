"""End-to-end fine-tuning on a tiny BERT (in-process): labels round-trip, regression, input errors.
The 2-rank runs are in test_resume.py (their straight runs are checked like plain runs)."""

import csv
import json

from tests.helpers import read_metrics


def rule_label(i, rng):
    return ["contradiction", "entailment", "neutral"][i % 3]


def test_string_labels_round_trip_to_predictions(tmp_path, tiny_config, pairs, inproc):
    files = [pairs(f"{n}.tsv", k, labels=rule_label, seed=i)
             for i, (n, k) in enumerate([("train", 90), ("dev", 30), ("test", 21)])]
    inproc("finetune", tiny_config("finetune", {"task.train_file": files[0], "task.eval_file": files[1],
                                                "task.test_file": files[2], "log.every": 2}))
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


def test_regression_path(tmp_path, tiny_config, pairs, inproc):
    files = [pairs(f"{n}.tsv", k, labels=lambda i, rng: round(rng.uniform(0, 5), 3), seed=i)
             for i, (n, k) in enumerate([("train", 64), ("dev", 24)])]
    inproc("finetune", tiny_config("finetune", {"task.train_file": files[0], "task.eval_file": files[1],
                                                "train.epochs": 1}))
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["metric"] == "pearson" and set(results["best"]) >= {"eval_pearson", "eval_spearman", "eval_mse"}
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tmp_path / "out" / "final")
    assert cfg.num_labels == 1 and cfg.problem_type == "regression"


def test_bad_task_inputs_fail_fast_with_the_promised_messages(tiny_config, pairs, inproc):
    files = [pairs("train.tsv", 20), pairs("dev.tsv", 6, labels=("yes", "maybe"))]
    cfg = tiny_config("finetune", {"task.train_file": files[0], "task.eval_file": files[1]})
    proc = inproc("finetune", cfg, check=False)
    assert proc.returncode == 2
    assert f"{files[1]}: line 3, column 'label': label 'maybe' does not occur in the training file" in proc.stderr
    proc = inproc("finetune", cfg, ["task.text_b=sentence2"], check=False)
    assert proc.returncode == 2 and "no column 'sentence2' for task.text_b" in proc.stderr


def test_a_metric_the_labels_do_not_have_fails_before_training(tmp_path, tiny_config, pairs, inproc):
    """f1 exists for binary labels only: on three classes it once raised KeyError at the first evaluation."""
    train = pairs("train.tsv", 30, labels=("a", "b", "c"))
    proc = inproc("finetune", tiny_config("finetune", {"task.train_file": train, "eval.metric": "f1"}), check=False)
    assert proc.returncode == 2
    assert (f"eval.metric=f1 does not exist for {train} (3-class labels): use one of accuracy, macro_f1, eval_loss"
            in proc.stderr)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_unpadded_run_matches_the_padded_run(tmp_path, tiny_config, pairs, inproc):
    """task.unpad=true (no pad token computed): with dropout off, the padded run's losses and dev metrics up to
    float rounding, and real_token_frac 1."""
    files = [pairs(f"{n}.tsv", k, seed=i) for i, (n, k) in enumerate([("train", 64), ("dev", 24)])]
    over = {"task.train_file": files[0], "task.eval_file": files[1], "train.epochs": 1, "log.every": 1,
            "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}
    cfg = tiny_config("finetune", over)
    inproc("finetune", cfg, [f"output_dir={tmp_path / 'padded'}"])
    inproc("finetune", cfg, [f"output_dir={tmp_path / 'packed'}", "task.unpad=true"])
    padded, packed = (read_metrics(tmp_path / name) for name in ("padded", "packed"))
    train = [(a["loss"], b["loss"]) for a, b in zip(padded, packed) if "loss" in a]
    assert len(train) == 8 and all(abs(a - b) < 1e-5 for a, b in train), train
    assert all(r["real_token_frac"] == 1 for r in packed if "loss" in r)
    assert min(r["real_token_frac"] for r in padded if "loss" in r) < 0.95  # the padded run did compute pads
    ev_a, ev_b = (json.loads((tmp_path / name / "eval_results.json").read_text())["best"]
                  for name in ("padded", "packed"))
    assert ev_a.keys() == ev_b.keys() and all(abs(ev_a[k] - ev_b[k]) < 1e-4 for k in ev_a), (ev_a, ev_b)


def test_model_compile_compiles_the_encoder(tiny_config, pairs):
    """model.compile is honoured by fine-tuning too (not only documented): the encoder is wrapped, the head is not."""
    from bertlaunch.core import configlib
    from bertlaunch.tasks.classify.config import FinetuneConfig
    from bertlaunch.tasks.classify.spec import FinetuneSpec

    spec = FinetuneSpec()
    for compile_ in (False, True):
        cfg = configlib.load(FinetuneConfig, tiny_config("finetune", {"task.train_file": pairs("t.tsv"),
                                                                      "model.compile": compile_}))
        tok = spec.tokenizer(cfg)
        hf = spec.model(cfg, tok, spec.data(cfg, tok, None), meta=False).module.hf
        assert (hf.base_model._compiled_call_impl is not None) is compile_
        assert hf.classifier._compiled_call_impl is None
