"""Downstream scores during pretraining, in real runs (tiny BERT, a few steps): a GLUE job's score in metrics.jsonl
against tokens, a training that does not wait, a failed job reported while the run completes, exactly once across
a SIGKILL and a resume, sbatch jobs on SLURM, and a retrieval job."""

from __future__ import annotations

import contextlib
import io
import json
import os
import time

import pytest

from tests.conftest import build_config, in_process
from tests.helpers import Job, committed_step, last_step, read_metrics, run, write_glue
from tests.test_downstream import SCORE, command

pytestmark = pytest.mark.slow

# a command job that waits for the run's last training row (step 8) before it scores: the run must not wait for it
WAIT_FOR_END = ("import json, sys, time; model, out = sys.argv[1:3]\n"
                "m = model.split('/exports/')[0] + '/metrics.jsonl'\n"
                "while not any(json.loads(x).get('step') == 8 and 'loss' in json.loads(x) for x in open(m)):\n"
                "    time.sleep(0.05)\n"
                "json.dump({'accuracy': 0.5}, open(out, 'w'))")
FAIL = "import sys; print('Traceback ...\\nValueError: no label column'); sys.exit(3)"


def rows_of(out) -> tuple[dict[int, int], list[dict]]:
    """(tokens at each logged training step, the downstream rows) of a run's metrics.jsonl."""
    rows = read_metrics(out) if (out / "metrics.jsonl").is_file() else []
    return {r["step"]: r["tokens"] for r in rows if "loss" in r}, [r for r in rows if "downstream" in r]


def pretrain(cfg, *overrides) -> tuple[int, str]:
    """A pretraining in this process (its output captured)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = in_process("pretrain", ["--config", str(cfg), *overrides])
    return code, out.getvalue()


def test_a_glue_score_of_an_export_lands_in_metrics_against_tokens(tmp_path, corpus):
    glue = write_glue(tmp_path / "glue_data", ["MRPC"], n_train=16, n_dev=8, n_test=4)
    cfg = build_config(tmp_path, "pretrain", {
        "data.train_files": [corpus(200)], "train.max_steps": 6, "log.every": 2, "checkpoint.every": 0,
        "checkpoint.export_at": [1.0], "eval.downstream": {"glue": {
            "tasks": ["MRPC"], "data_dir": str(glue), "seeds": [3], "max_train_examples": 12, "suite": {"train": {
                "epochs": 1, "micro_batch_size": 4, "global_batch_size": 4, "lr": 1e-3, "precision": "fp32"}}}}})
    code, output = pretrain(cfg)
    assert code == 0, output[-3000:]
    tokens, scores = rows_of(tmp_path / "out")
    job = tmp_path / "out" / "downstream" / "step_00000006" / "glue_MRPC"
    suite = json.loads((job / "glue" / "glue_results.json").read_text())["tasks"]["MRPC"]
    assert suite["seeds"] == [3] and suite["score"] == (suite["f1"] + suite["accuracy"]) / 2
    assert len(scores) == 1 and scores[0] == {"step": 6, "tokens": tokens[6], "downstream": {
        "job": "glue/MRPC", "score": suite["score"], "metric": "score", "export": str(tmp_path / "out" / "exports" /
                                                                                       "step_00000006"),
        "scores": {"score": suite["score"], "f1": suite["f1"], "accuracy": suite["accuracy"]},
        "seconds": scores[0]["downstream"]["seconds"]}}
    assert f"downstream: glue/MRPC of step 6 ({tokens[6]} tokens): score {suite['score']:.4g}" in output


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory):
    """One run of 8 steps, exports at steps 4 and 8, each scored by a job that waits for the run's last training
    row and one that fails."""
    tmp = tmp_path_factory.mktemp("downstream")
    from tests.helpers import make_corpus

    cfg = build_config(tmp, "pretrain", {
        "data.train_files": [make_corpus(tmp / "c.txt", 200)], "train.max_steps": 8, "log.every": 2,
        "checkpoint.every": 0, "checkpoint.export_at": [0.5, 1.0], "eval.downstream": {
            "commands": [command("waits", WAIT_FOR_END), command("boom", FAIL)], "max_running": 2}})
    code, output = pretrain(cfg)
    return tmp / "out", code, output


def test_the_training_does_not_wait_for_the_jobs_of_an_export(two_exports):
    out, code, output = two_exports
    tokens, scores = rows_of(out)
    waits = [(r["step"], r["tokens"], r["downstream"]["score"]) for r in scores if r["downstream"]["job"] ==
             "command/waits"]
    assert code == 0 and waits == [(4, tokens[4], 0.5), (8, tokens[8], 0.5)]
    # the job of step 4 started before the run went on to step 8, and it could only end after step 8's row
    assert output.index("command/waits of step 4 started") < output.index("exported step 8")


def test_a_failed_job_is_reported_and_the_pretraining_completes(two_exports):
    out, code, output = two_exports
    _, scores = rows_of(out)
    failed = [r for r in scores if r["downstream"]["job"] == "command/boom"]
    assert code == 0 and (out / "final" / "model.safetensors").is_file()
    for step in (4, 8):
        log = out / "downstream" / f"step_{step:08d}" / "command_boom" / "job.log"
        row = next(r["downstream"] for r in failed if r["step"] == step)
        assert row["failed"] == "exit code 3: ValueError: no label column" and row["exit_code"] == 3
        assert row["log"] == str(log) and "ValueError: no label column" in log.read_text()
        assert (f"WARNING: downstream job command/boom of step {step} FAILED: exit code 3: ValueError: no label "
                f"column; log: {log}; training goes on") in output
    assert len(failed) == 2


HOLD = ("import json, os, sys, time; model, out = sys.argv[1:3]; step = int(model.rsplit('_', 1)[1]); "
        "base = os.path.dirname(os.path.dirname(os.path.dirname(model))); "
        "open(os.path.join(base, 'runs.txt'), 'a').write(f'{step} {os.getpid()}\\n')\n"
        "while os.path.exists(os.path.join(base, f'hold_{step}')):\n    time.sleep(0.05)\n"
        "json.dump({'score': step / 100}, open(out, 'w'))")


def test_a_resume_neither_reruns_nor_duplicates_nor_loses_a_score(tmp_path, corpus):
    """SIGKILL while the job of step 8 runs, after the score of step 4 is in metrics.jsonl: the resumed run keeps
    that score without running its job again, reruns the job of step 8 (killed with the training), and every export
    has its score exactly once."""
    cfg = build_config(tmp_path, "pretrain", {
        "data.train_files": [corpus(600)], "train.max_steps": 100, "log.every": 1, "checkpoint.every": 4,
        "checkpoint.export_at": [0.04, 0.08, 1.0], "eval.downstream": {"commands": [command("score", HOLD)]}})
    out = tmp_path / "out"
    (tmp_path / "hold_8").touch()
    job = Job("pretrain", 0, cfg, [])
    job.wait_until(lambda: [r["step"] for r in rows_of(out)[1]] == [4] and 8 in dict(runs(tmp_path))
                   and committed_step(out) >= 8, 300, "the score of step 4 and the job of step 8")
    job.kill()
    assert last_step(out / "metrics.jsonl") < 100  # killed mid-run: 100 steps leave the jobs time to start
    _wait_dead(dict(runs(tmp_path))[8])  # the job died with the training
    (tmp_path / "hold_8").unlink()
    run("pretrain", 0, cfg, [])
    tokens, scores = rows_of(out)
    assert [(r["step"], r["tokens"], r["downstream"]["score"]) for r in scores] == [
        (4, tokens[4], 0.04), (8, tokens[8], 0.08), (100, tokens[100], 1.0)]
    assert sorted(step for step, _ in runs(tmp_path)) == [4, 8, 8, 100]


def runs(folder) -> list[tuple[int, int]]:
    """(export step, pid) of every start of a HOLD job."""
    path = folder / "runs.txt"
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the downstream job {pid} outlived the training it belonged to")


@pytest.mark.slurm
def test_sbatch_jobs_score_the_exports_on_slurm(tmp_path, corpus):
    from tests.test_slurm import slurm_up

    if slurm_up():
        if os.environ.get("BERTLAUNCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM required here but unavailable: {slurm_up()}")
        pytest.skip(slurm_up())
    where = "import os, socket; print('ran on', socket.gethostname(), 'in SLURM job', os.environ['SLURM_JOB_ID'])"
    cfg = build_config(tmp_path, "pretrain", {
        "data.train_files": [corpus(100)], "train.max_steps": 4, "checkpoint.every": 0, "checkpoint.export_at": [1.0],
        "eval.downstream": {"launcher": "sbatch", "sbatch_args": ["--cpus-per-task=1", "--time=10:00"],
                            "commands": [command("score", where + "; " + SCORE), command("boom", FAIL)]}})
    code, output = pretrain(cfg)
    assert code == 0, output[-3000:]
    tokens, scores = rows_of(tmp_path / "out")
    folder = tmp_path / "out" / "downstream" / "step_00000004"
    job_id = (folder / "command_score" / "slurm_job_id").read_text().strip()
    assert f"in SLURM job {job_id}" in (folder / "command_score" / "job.log").read_text()
    assert f"downstream: command/score of step 4 started (SLURM job {job_id})" in output
    assert sorted((r["downstream"]["job"], r["tokens"], r["downstream"].get("score"), r["downstream"].get("exit_code"))
                  for r in scores) == [("command/boom", tokens[4], None, 3), ("command/score", tokens[4], 0.04, None)]


BEIR = {"corpus": [{"_id": f"d{i}", "title": "", "text": t} for i, t in enumerate(
    ["the river runs by the stone house", "music and paper in the garden", "a cloud over the window",
     "light on the river", "stone walls of the old house"])],
    "queries": [{"_id": "q1", "text": "river"}, {"_id": "q2", "text": "garden music"}],
    "qrels": [("q1", "d0", 1), ("q1", "d3", 1), ("q2", "d1", 1)]}


def test_a_retrieval_score_of_an_export_lands_in_metrics(tmp_path, corpus):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    for name in ("corpus", "queries"):
        (beir / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in BEIR[name]))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, d, s in BEIR["qrels"]))
    cfg = build_config(tmp_path, "pretrain", {
        "data.train_files": [corpus(100)], "train.max_steps": 4, "checkpoint.every": 0, "checkpoint.export_at": [1.0],
        "eval.downstream": {"retrieval": [{"data_dir": str(beir), "name": "tiny"}]}})
    code, output = pretrain(cfg)
    assert code == 0, output[-3000:]
    tokens, scores = rows_of(tmp_path / "out")
    d = scores[0]["downstream"]
    assert len(scores) == 1 and scores[0]["tokens"] == tokens[4] and d["job"] == "retrieval/tiny"
    assert set(d["scores"]) >= {"ndcg@10", "recall@100", "mrr@10"} and d["score"] == d["scores"]["ndcg@10"]
    assert all(0.0 <= d["scores"][k] <= 1.0 for k in ("ndcg@10", "recall@100", "mrr@10"))
