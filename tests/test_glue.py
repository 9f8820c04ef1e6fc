"""The GLUE suite: the release's layouts read unchanged, the official metrics and score, per-(task, seed)
runs that skip when finished and resume exactly, submission files, dry run and bad input."""

from __future__ import annotations

import csv
import json
import signal
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest

from bertlaunch.core.checkpoint import list_checkpoints, verify
from bertlaunch.data.tables.glue import TASKS, lookup, unknown_task_message
from bertlaunch.tasks.classify.scores import matthews
from bertlaunch.tools.report import main as report_main
from bertlaunch.tools.summary import main as summary_main
from tests.helpers import Job, assert_resumed, committed_step, compare, full_only, saved_on_signal, write_glue

SUITE = {"glue.tasks": ["CoLA", "STS-B", "MNLI", "RTE", "WNLI"], "glue.seeds": [1, 2], "glue.from_mnli": ["RTE"],
         "checkpoint.every": 2, "glue.max_train_examples": 40, "glue.overrides": {"cola": {"train": {"lr": 3e-3}}}}


def test_registry_names_and_matthews():
    assert [lookup(n).name for n in ("cola", "SST2", "sts-b", "Mnli", "wnli")] == ["CoLA", "SST-2", "STS-B", "MNLI",
                                                                                    "WNLI"]
    assert lookup("mnli-mm") is None and "did you mean 'MNLI'" in unknown_task_message("MNLL")
    assert len(TASKS) == 9
    # against the definition, worked by hand: tp=3 tn=2 fp=1 fn=2 -> (6-2)/sqrt(4*5*3*4)
    pred, gold = np.array([1, 1, 1, 1, 0, 0, 0, 0]), np.array([1, 1, 1, 0, 1, 1, 0, 0])
    assert matthews(pred, gold) == pytest.approx(4 / np.sqrt(240), abs=1e-12)
    assert matthews(np.ones(4), np.array([1, 0, 1, 0])) == 0.0  # a constant predictor


def test_dry_run_reads_every_task_of_the_release_layout(tmp_path, tiny_config, inproc):
    root = write_glue(tmp_path / "glue_data")
    r = inproc("glue", tiny_config("glue", {"glue.data_dir": root}), ["--dry-run"])
    for name in TASKS:
        assert f"\n{name:13s} " in r.stdout, name
    assert "CoLA          labels 0/1; metrics matthews" in r.stdout
    assert "examples; columns 'sentence' -> 'label'" in r.stdout  # CoLA: header-less, named by task.columns
    assert "columns '#1 String' + '#2 String' -> 'Quality'" in r.stdout  # MRPC: the byte-order mark is gone
    assert "train 48, eval 16, eval mm 16, test 12, test mm 12, test ax 10 examples" in r.stdout  # MNLI
    assert "STS-B         regression" in r.stdout and r.stdout.count("to run") == 9


def test_bad_glue_inputs_are_named(tmp_path, tiny_config, inproc):
    root = write_glue(tmp_path / "glue_data", ["MRPC", "QNLI"])
    rows = (root / "QNLI" / "dev.tsv").read_text().splitlines()
    (root / "QNLI" / "dev.tsv").write_text("\n".join([rows[0].replace("question", "questions")] + rows[1:]) + "\n")
    train = (root / "MRPC" / "train.tsv").read_text().splitlines()
    train[3] = "maybe\t" + train[3].split("\t", 1)[1]  # line 4: a label outside MRPC's 0/1
    (root / "MRPC" / "train.tsv").write_text("\n".join(train) + "\n")
    cfg = tiny_config("glue", {"glue.data_dir": root, "glue.tasks": ["MRPC", "QNLI", "RTE"]})
    r = inproc("glue", cfg, ["--dry-run"], check=False)
    assert r.returncode == 2
    assert "QNLI/dev.tsv: no column 'question' for task.text_a (did you mean 'questions'?)" in r.stderr
    assert "MRPC/train.tsv: line 4, column 'Quality': label 'maybe'" in r.stderr
    assert "RTE: no folder" in r.stderr and "leave RTE out of glue.tasks" in r.stderr
    r = inproc("glue", cfg, ["glue.tasks=[MRPC,QNLII]", "glue.overrides.RTE.train.lrr=1", "glue.seeds=[]"],
               check=False)
    assert r.returncode == 2
    for msg in ("unknown GLUE task 'QNLII' (did you mean 'QNLI'?)", "glue.overrides.RTE: unknown key 'train.lrr'",
                "glue.seeds is empty"):
        assert msg in r.stderr


def expected_score(out, task, seed, metrics):
    best = json.loads((out / task / f"seed_{seed}" / "eval_results.json").read_text())["best"]
    return [100 * best[f"eval_{m}"] for m in metrics]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One suite, run once for the tests below: CoLA, STS-B, MNLI, RTE (from MNLI's model) and WNLI, 2 seeds,
    in this process; WNLI's training table has a changed column layout, so its runs fail."""
    from tests.conftest import build_config, in_process

    tmp = tmp_path_factory.mktemp("suite")
    root = write_glue(tmp / "glue_data", ["CoLA", "STS-B", "MNLI", "RTE", "WNLI"])
    wnli = root / "WNLI" / "train.tsv"
    wnli.write_text(wnli.read_text().replace("sentence2", "hypothesis", 1))
    cfg = build_config(tmp, "glue", {"glue.data_dir": root, **SUITE})
    code = in_process("glue", ["--config", str(cfg)])
    return SimpleNamespace(cfg=cfg, out=tmp / "out", code=code, tmp=tmp)


def test_a_failed_task_is_listed_and_the_others_still_run(suite):
    assert suite.code == 2
    res = json.loads((suite.out / "glue_results.json").read_text())
    assert set(res["tasks"]) == {"MNLI", "CoLA", "STS-B", "RTE", "WNLI"} and not res["complete"]
    assert res["tasks"]["WNLI"]["failed"].keys() == {"1", "2"} and "hypothesis" not in res["tasks"]["WNLI"]
    assert "no column 'sentence2'" in res["tasks"]["WNLI"]["failed"]["1"]


def test_task_scores_are_means_over_seeds_and_the_glue_score_a_mean_over_tasks(suite):
    res = json.loads((suite.out / "glue_results.json").read_text())
    task_scores = []
    for name, metrics in (("CoLA", ["matthews"]), ("STS-B", ["pearson", "spearman"]),
                          ("MNLI", ["accuracy", "mm_accuracy"]), ("RTE", ["accuracy"])):
        t = res["tasks"][name]
        per_seed = [expected_score(suite.out, name, s, metrics) for s in (1, 2)]
        for i, m in enumerate(metrics):
            assert t[f"{m}_per_seed"] == {"1": per_seed[0][i], "2": per_seed[1][i]}
            assert t[m] == pytest.approx((per_seed[0][i] + per_seed[1][i]) / 2, abs=1e-9)
        task_scores.append(sum(t[m] for m in metrics) / len(metrics))
    assert res["score"] == pytest.approx(sum(task_scores) / 4, abs=1e-9)


def test_the_table_the_summary_and_the_report(suite, capfd):
    assert "| CoLA | matthews |" in (suite.out / "glue_results.md").read_text()
    assert summary_main([str(suite.out)]) == 0 and "| MNLI | mm_accuracy |" in capfd.readouterr().out
    assert report_main([str(suite.out)]) == 0
    assert "| CoLA/seed_2 |" in (suite.out / "report" / "report.md").read_text()


def test_rte_starts_from_mnli_and_per_task_settings_apply(suite):
    out = suite.out
    assert f"pretrained: {out}/MNLI/seed_2/final" in (out / "RTE/seed_2/config.yaml").read_text()
    assert "lr: 0.003" in (out / "CoLA/seed_1/config.yaml").read_text()  # glue.overrides.cola (any case)
    assert "lr: 0.001" in (out / "MNLI/seed_1/config.yaml").read_text()
    assert json.loads((out / "STS-B/seed_1/eval_results.json").read_text())["train_examples"] == 40


def test_the_submission_has_every_test_row_of_every_task(suite):
    sub = suite.out / "submission"
    labels = {"CoLA.tsv": {"0", "1"}, "RTE.tsv": {"entailment", "not_entailment"}, "AX.tsv": None,
              "MNLI-m.tsv": {"entailment", "neutral", "contradiction"}, "STS-B.tsv": None,
              "MNLI-mm.tsv": {"entailment", "neutral", "contradiction"}}
    rows_of = {"AX.tsv": 10}  # diagnostic/diagnostic.tsv; every other test table of write_glue has 12 rows
    assert {p.name for p in sub.iterdir()} == set(labels)
    assert set(zipfile.ZipFile(suite.out / "submission.zip").namelist()) == set(labels)
    for file, allowed in labels.items():
        rows = list(csv.reader(open(sub / file), delimiter="\t"))
        n = rows_of.get(file, 12)
        assert rows[0] == ["index", "prediction"] and [r[0] for r in rows[1:]] == [str(i) for i in range(n)], file
        assert allowed is None or {r[1] for r in rows[1:]} <= allowed, file
    assert all(0 <= float(r[1]) <= 5 for r in list(csv.reader(open(sub / "STS-B.tsv"), delimiter="\t"))[1:])


def test_the_same_command_again_skips_every_finished_run(suite, inproc):
    before = (suite.out / "MNLI/seed_1/eval_results.json").stat().st_mtime_ns
    r = inproc("glue", suite.cfg, ["glue.tasks=[CoLA,STS-B,MNLI,RTE]"])
    assert r.stdout.count("finished earlier, skipped") == 8
    assert (suite.out / "MNLI/seed_1/eval_results.json").stat().st_mtime_ns == before


def committed(run_dir):
    return lambda: any(verify(p) is None for _, p in list_checkpoints(run_dir / "checkpoints"))


@pytest.mark.slow
def test_a_preempted_then_killed_suite_resumes_bit_identically(suite):
    """SIGTERM in MNLI once it has committed a checkpoint (exit 75), then SIGKILL in RTE once it has: the same
    command each time, and the suite ends with the losses, scores and weights of the uninterrupted one."""
    again = suite.tmp / "again"
    over = [f"output_dir={again}", "glue.tasks=[MNLI,RTE]", "glue.seeds=[1]"]
    job = Job("glue", 0, suite.cfg, over)
    job.wait_until(committed(again / "MNLI/seed_1"), 120, "a committed MNLI checkpoint")
    job.kill(signal.SIGTERM)
    assert job.wait(120) == 75, job.output()[-3000:]
    assert not (again / "MNLI/seed_1/eval_results.json").exists()
    mnli_step = saved_on_signal(job.output())
    job = Job("glue", 0, suite.cfg, over)
    job.wait_until(committed(again / "RTE/seed_1"), 120, "a committed RTE checkpoint")
    job.kill()
    assert_resumed(job.output(), again / "MNLI/seed_1", mnli_step)
    assert not (again / "RTE/seed_1/eval_results.json").exists()
    rte_step = committed_step(again / "RTE/seed_1")
    job = Job("glue", 0, suite.cfg, over)
    assert job.wait(180) == 0, job.output()[-3000:]
    assert_resumed(job.output(), again / "RTE/seed_1", rte_step)
    for run in ("MNLI/seed_1", "RTE/seed_1"):
        assert compare(suite.out / run, again / run) == [], run
        a, b = (json.loads((d / run / "eval_results.json").read_text())["best"] for d in (again, suite.out))
        assert a == b


@pytest.mark.slow
@full_only("2-rank fine-tuning runs (what each GLUE run is): test_kill_matrix.py")
def test_two_ranks_and_parallel_runs_give_the_same_results(tmp_path, tiny_config, inproc):
    root = write_glue(tmp_path / "glue_data", ["SST-2", "MRPC"])
    cfg = tiny_config("glue", {"glue.data_dir": root})
    inproc("glue", cfg)
    par = tmp_path / "par"
    inproc("glue", cfg, [f"output_dir={par}", "glue.parallel=2"], OMP_NUM_THREADS=1)
    one = json.loads((tmp_path / "out/glue_results.json").read_text())
    assert json.loads((par / "glue_results.json").read_text())["tasks"] == one["tasks"]
    assert (par / "SST-2/seed_1/glue.log").is_file() and (par / "MRPC/seed_1/glue.log").is_file()
    two = tmp_path / "two"
    job = Job("glue", 2, cfg, [f"output_dir={two}"])
    assert job.wait(240) == 0, job.output()[-3000:]
    res = json.loads((two / "glue_results.json").read_text())
    assert res["tasks"].keys() == {"SST-2", "MRPC"} and res["complete"]
    for name in ("SST-2", "MRPC"):  # 2 ranks: the same global batches; sums in another order
        assert res["tasks"][name]["score"] == pytest.approx(one["tasks"][name]["score"], abs=5.0)


def test_hub_dataset_columns_and_label_ids(tmp_path, tiny_config, inproc, monkeypatch):
    """glue.dataset: the hub's column names and ClassLabel ids (hidden test labels are -1), offline through a
    stand-in for datasets.load_dataset that serves nyu-mll/glue's layout."""
    import datasets

    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        n = {"train": 40}.get(split, 12)
        rows = {"premise": [f"river {i} stone" for i in range(n)], "hypothesis": [f"house {i}" for i in range(n)],
                "label": [-1] * n if "test" in split else [i % 3 for i in range(n)], "idx": list(range(n))}
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = tiny_config("glue", {"glue.dataset": "nyu-mll/glue", "glue.tasks": ["mnli"], "train.epochs": 1})
    inproc("glue", cfg)
    assert {c[2] for c in calls} >= {"train", "validation_matched", "validation_mismatched", "test_matched",
                                      "test_mismatched"} and ("nyu-mll/glue", "ax", "test") in calls
    res = json.loads((tmp_path / "out/glue_results.json").read_text())
    assert set(res["tasks"]["MNLI"]) >= {"accuracy", "mm_accuracy"} and res["complete"]
    sub = tmp_path / "out/submission"
    assert sorted(p.name for p in sub.iterdir()) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv"]
    predicted = {r[1] for r in list(csv.reader(open(sub / "MNLI-m.tsv"), delimiter="\t"))[1:]}
    assert predicted <= {"entailment", "neutral", "contradiction"}  # ids mapped back to GLUE's names


def test_settings_the_suite_would_override_are_errors(tmp_path, tiny_config):
    """train.seed and eval.metric at the top, and a per-task seed or process-group timeout, would be silently
    replaced by each run's own: every one is reported at once, with the key to use instead."""
    from bertlaunch.core import configlib
    from bertlaunch.tasks.glue.config import GlueConfig

    path = tiny_config("glue", {"glue.data_dir": write_glue(tmp_path / "glue_data"), "train.seed": 1,
                                "eval.metric": "f1", "glue.overrides": {"MRPC": {"train": {"seed": 3,
                                                                                          "dist_timeout_s": 60}}}})
    with pytest.raises(configlib.ConfigError) as e:
        configlib.load(GlueConfig, path)
    assert sorted(e.value.problems) == [
        "eval.metric is not used by GLUE (each task has its official metric): set it for one task with "
        "glue.overrides.<task>.eval.metric",
        "glue.overrides.MRPC.train.dist_timeout_s: one process group serves every run: set train.dist_timeout_s",
        "glue.overrides.MRPC.train.seed: the seeds come from glue.seeds",
        "train.seed is not used by GLUE: set glue.seeds (one run per seed), e.g. glue.seeds=[42]"]
