"""Downstream scores during pretraining (eval.downstream): the checks that need no training run. The runs (a GLUE
job, failures, kill and resume, SLURM) are in tests/test_downstream_runs.py."""

from __future__ import annotations

import json
import sys

import pytest

from bertlaunch.core import dist, jobs
from bertlaunch.core.downstream import DownstreamConfig, ledger
from bertlaunch.core.jobs import Downstream
from bertlaunch.core.tracking import Tracker
from tests.helpers import write_glue

# a command job: writes {"score": <export step> / 100} and appends "<step> <pid>" to <output_dir>/runs.txt
SCORE = ("import json, os, sys; model, out = sys.argv[1:3]; step = int(model.rsplit('_', 1)[1]); "
         "runs = os.path.join(os.path.dirname(os.path.dirname(model)), 'runs.txt'); "
         "open(runs, 'a').write(f'{step} {os.getpid()}\\n'); json.dump({'score': step / 100}, open(out, 'w'))")


def command(name: str, script: str = SCORE) -> dict:
    return {"name": name, "command": ["{python}", "-c", script, "{model}", "{out}"]}


def downstream_config(**kw) -> DownstreamConfig:
    from bertlaunch.core import configlib

    return configlib.from_dict(DownstreamConfig, kw)


def test_config_problems_are_reported_together_with_the_others(tmp_path, tiny_config, corpus, inproc):
    glue = write_glue(tmp_path / "glue_data", ["MRPC"])
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("{}\n")
    cfg = tiny_config("pretrain", {"data.train_files": [corpus(40)], "train.lr": -1, "eval.downstream": {
        "glue": {"tasks": ["MRCP", "RTE"], "data_dir": str(glue), "suite": {"train": {"lrr": 1}, "output_dir": "x"}},
        "retrieval": [{"data_dir": str(beir)}, {"data_dir": str(tmp_path / "nowhere")}],
        "commands": [{"name": "mine", "command": ["score.sh", "{model}"]}]}})
    r = inproc("pretrain", cfg, check=False)
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    for line in ["train.lr must be > 0, got -1",
                 "eval.downstream scores the checkpoint.export_at exports, and there are none: set "
                 "checkpoint.export_at",
                 "eval.downstream.glue.tasks: unknown GLUE task 'MRCP' (did you mean 'MRPC'?)",
                 f"eval.downstream.glue.tasks: RTE has no {glue / 'RTE' / 'train.tsv'}",
                 f"eval.downstream.retrieval[0].data_dir: '{beir}' has no queries.jsonl, qrels/test.tsv (BEIR's layout",
                 f"eval.downstream.retrieval[1].data_dir: '{tmp_path / 'nowhere'}' is not a folder",
                 "eval.downstream.commands[0].command never names {out}, the JSON file of scores it must write",
                 "eval.downstream.glue.suite.output_dir: set by each job (remove it)",
                 "eval.downstream.glue.suite: unknown key 'train.lrr' (did you mean 'lr'?)"]:
        assert line in r.stderr, line


def test_the_dry_run_lists_the_jobs_of_every_export(tmp_path, tiny_config, corpus, inproc):
    glue = write_glue(tmp_path / "glue_data", ["MRPC"])
    cfg = tiny_config("pretrain", {"data.train_files": [corpus(100)], "checkpoint.export_at": [0.5, 1.0],
                                   "eval.downstream": {"glue": {"tasks": ["mrpc"], "data_dir": str(glue)},
                                                       "commands": [command("mine")]}})
    r = inproc("pretrain", cfg, ["--dry-run"])
    out = tmp_path / "out"
    assert f"exports       50%, 100% = step(s) 6, 12 -> {out}/exports/step_N/" in r.stdout
    assert "downstream    2 job(s) per export as child processes, 1 at a time on the CPU" in r.stdout
    assert "  step 6       glue/MRPC (to run), command/mine (to run)" in r.stdout
    assert "  step 12      glue/MRPC (to run), command/mine (to run)" in r.stdout
    assert (f"  glue/MRPC: {sys.executable} -m bertlaunch.tools.downstream "
            f"{out}/downstream/step_00000006/glue_MRPC/job.json") in r.stdout
    assert not out.exists()


def test_a_resumed_run_collects_ended_jobs_reruns_the_others_and_skips_scored_ones(tmp_path):
    """Exactly once across a kill: at the resume (checkpoint of step 6) the job with a row is left alone, the one whose
    exit code is on disk is collected without running, the one that was running runs again, and the folders of
    exports after the checkpoint (the run redoes them) are removed."""
    out = tmp_path / "out"
    for step in (3, 6, 9):
        (out / "exports" / f"step_{step:08d}").mkdir(parents=True)
    cfg = downstream_config(commands=[command("a"), command("b")])
    folder = out / "downstream" / "step_00000003"
    (folder / "command_b").mkdir(parents=True)
    (folder / "export.json").write_text(json.dumps({"step": 3, "tokens": 300}))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 3, "tokens": 300, "downstream": {
        "job": "command/a", "score": 0.03, "metric": "score", "scores": {"score": 0.03}}}) + "\n")
    (folder / "command_b" / "result.json").write_text('{"score": 0.5}')  # ended before the kill, not yet recorded
    (folder / "command_b" / "exit_code").write_text("0\n")
    (out / "downstream" / "step_00000006").mkdir()
    (out / "downstream" / "step_00000006" / "export.json").write_text(json.dumps({"step": 6, "tokens": 600}))
    (out / "downstream" / "step_00000009").mkdir()  # after the checkpoint: stale
    rows, lines = [], []
    info = dist.DistInfo(0, 1, 0, 1, "127.0.0.1", 0, "single")

    def write(row):
        rows.append(row)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    d = Downstream(cfg, str(out), info, write, lines.append, start_step=6)
    d.finish(lambda: False)
    assert not (out / "downstream" / "step_00000009").exists()
    assert [(r["step"], r["downstream"]["job"], r["downstream"]["score"]) for r in rows] == [
        (3, "command/b", 0.5), (6, "command/a", 0.06), (6, "command/b", 0.06)]
    assert sorted(int(x.split()[0]) for x in (out / "runs.txt").read_text().splitlines()) == [6, 6]
    assert ledger(out / "metrics.jsonl") == {(3, "command/a"), (3, "command/b"), (6, "command/a"), (6, "command/b")}
    assert [r["tokens"] for r in rows] == [300, 600, 600]


def test_a_failed_job_is_a_row_with_its_exit_code_and_log(tmp_path):
    out = tmp_path / "out"
    (out / "exports" / "step_00000004").mkdir(parents=True)
    cfg = downstream_config(commands=[command("boom", "import sys; print('error: no such metric'); sys.exit(3)"),
                                      command("fine")])
    rows, lines = [], []
    d = Downstream(cfg, str(out), dist.DistInfo(0, 1, 0, 1, "127.0.0.1", 0, "single"), rows.append, lines.append, 0)
    d.launch(out / "exports" / "step_00000004", 4, 512)
    d.finish(lambda: False)
    log = out / "downstream" / "step_00000004" / "command_boom" / "job.log"
    failed = rows[0]
    assert failed == {"step": 4, "tokens": 512, "downstream": {
        "job": "command/boom", "failed": "exit code 3: error: no such metric", "exit_code": 3, "log": str(log),
        "export": str(out / "exports" / "step_00000004")}}
    assert rows[1]["downstream"]["score"] == 0.04
    assert any(f"WARNING: downstream job command/boom of step 4 FAILED: exit code 3: error: no such metric; log: {log}"
               in line for line in lines)


def test_jobs_left_at_the_end_are_stopped_after_the_wait_and_reported(tmp_path):
    out = tmp_path / "out"
    (out / "exports" / "step_00000002").mkdir(parents=True)
    cfg = downstream_config(commands=[command("slow", "import time; time.sleep(60)")], wait_at_end_s=0.5)
    rows = []
    d = Downstream(cfg, str(out), dist.DistInfo(0, 1, 0, 1, "127.0.0.1", 0, "single"), rows.append, print, 0)
    d.launch(out / "exports" / "step_00000002", 2, 64)
    pid = next(iter(d.running.values())).handle.pid
    d.finish(lambda: False)
    assert rows[0]["downstream"]["failed"] == ("not finished within eval.downstream.wait_at_end_s=0.5 s: stopped")
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


def test_the_launcher_and_the_devices_of_child_processes(monkeypatch):
    cfg = DownstreamConfig(max_running=2)
    monkeypatch.setattr(jobs.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert jobs.choose_launcher(cfg) == "sbatch"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert jobs.choose_launcher(cfg) == "process"
    assert jobs.choose_launcher(DownstreamConfig(launcher="sbatch")) == "sbatch"
    node = dist.DistInfo(0, 8, 0, 4, "127.0.0.1", 0, "torchrun")  # 4 training ranks on this node
    monkeypatch.setattr(dist, "gpu_count", lambda: 6)
    assert jobs.slots_of(cfg, node) == [4, 5]  # the GPUs no rank uses, one job each
    monkeypatch.setattr(dist, "gpu_count", lambda: 4)
    assert jobs.slots_of(cfg, node) == [None, None]  # none free: the CPU, max_running at once
    monkeypatch.setattr(dist, "has_cuda", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,6,7")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("BERTLAUNCH_REQUEUE_FILE", "/tmp/x")
    assert dist.job_env(4)["CUDA_VISIBLE_DEVICES"] == "6"
    cpu = dist.job_env()
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and "SLURM_PROCID" not in cpu and "BERTLAUNCH_REQUEUE_FILE" not in cpu
    assert "CUDA_VISIBLE_DEVICES" not in dist.job_env(allocation=True)


class FakeRun:
    id = "abcd1234"

    def __init__(self):
        self.calls = []

    def log(self, items, step):
        self.calls.append((step, sorted(items)))

    def define_metric(self, name, step_metric=None):
        self.calls.append(("define", name, step_metric))

    def finish(self):
        self.calls.append("finish")


def score_row(step, tokens, job="glue/MRPC", score=50.0):
    return {"step": step, "tokens": tokens, "downstream": {"job": job, "score": score, "metric": "score",
                                                           "scores": {"score": score, "f1": 60.0}}}


def test_wandb_gets_each_score_once_against_tokens_without_going_back_in_steps():
    """A score arrives after its export's step: it goes into the step wandb is filling, never an earlier one; a second
    score of the same job waits for the next step (or, after the last row, a step of its own)."""
    run = FakeRun()
    t = Tracker(run)
    t.log({"step": 2, "loss": 1.0})
    t.log(score_row(1, 100))
    t.log(score_row(2, 200))  # the same job again: waits for step 4
    t.log({"step": 4, "downstream": {"job": "glue/RTE", "failed": "exit code 2"}})  # nothing to plot
    t.log({"step": 4, "loss": 0.5})
    t.log(score_row(4, 400))
    t.finish()
    keys = ["downstream/glue/MRPC/f1", "downstream/glue/MRPC/score", "downstream/glue/MRPC/step",
            "downstream/glue/MRPC/tokens"]
    assert run.calls == [
        (2, ["loss"]), ("define", "downstream/glue/MRPC/tokens", None),
        ("define", "downstream/glue/MRPC/*", "downstream/glue/MRPC/tokens"), (2, keys),
        (4, ["loss"]), (4, keys), (5, keys), "finish"]


def test_a_resumed_run_follows_its_slurm_jobs_and_reports_one_that_vanished(tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "exports" / "step_00000004").mkdir(parents=True)
    folder = out / "downstream" / "step_00000004"
    for name, job_id in (("command_a", "77"), ("command_b", "78")):
        (folder / name).mkdir(parents=True)
        (folder / name / "slurm_job_id").write_text(job_id + "\n")
    (folder / "export.json").write_text(json.dumps({"step": 4, "tokens": 400}))
    states = {"77": "RUNNING", "78": "GONE"}
    monkeypatch.setattr(jobs, "slurm_state", lambda job_id: states[job_id])
    rows, lines = [], []
    cfg = downstream_config(commands=[command("a"), command("b")], launcher="sbatch")
    d = Downstream(cfg, str(out), dist.DistInfo(0, 1, 0, 1, "127.0.0.1", 0, "single"), rows.append, lines.append, 4)
    assert "downstream: following SLURM job 77 (command/a of step 4), submitted before the resume" in lines
    d.poll()
    assert [r["downstream"] for r in rows] == [{
        "job": "command/b", "failed": "SLURM job 78 ended (GONE) without an exit code", "exit_code": None,
        "log": str(folder / "command_b" / "job.log"), "export": str(out / "exports" / "step_00000004")}]
    (folder / "command_a" / "result.json").write_text('{"score": 0.7}')
    (folder / "command_a" / "exit_code").write_text("0\n")
    d.poll()
    assert [(r["downstream"]["job"], r["tokens"], r["downstream"].get("score")) for r in rows] == [
        ("command/b", 400, None), ("command/a", 400, 0.7)]
    assert not (d.running or d.queue)


def test_a_resumed_wandb_run_gets_the_kept_scores_it_lacks(tmp_path, monkeypatch):
    """The killed attempt's wandb history has the score of step 2 but not that of step 4 (both kept in metrics.jsonl
    by the resume from step 4): only the latter is replayed, into the first step wandb does not have."""
    from bertlaunch.core import tracking

    out = tmp_path / "out"
    (out / "wandb" / "offline-run-1-abcd1234").mkdir(parents=True)
    rows = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)] + [score_row(2, 200), score_row(4, 400)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    history = [("abcd1234", 1, {"loss": 1.0}), ("abcd1234", 2, {"loss": 1.0, "downstream/glue/MRPC/tokens": 200})]
    monkeypatch.setattr(tracking, "read_history", lambda folder: history)
    run = FakeRun()
    run.starting_step = 3
    t = Tracker(run)
    tracking.resume_tracker(t, str(out), start_step=4, previous_max_step=5)
    t.log({"step": 5, "loss": 0.5})
    keys = ["downstream/glue/MRPC/f1", "downstream/glue/MRPC/score", "downstream/glue/MRPC/step",
            "downstream/glue/MRPC/tokens"]
    assert [c for c in run.calls if c[0] != "define"] == [(3, ["loss"]), (4, ["loss"]), (4, keys), (5, ["loss"])]


def test_the_report_plots_each_downstream_score_against_tokens(tmp_path):
    from bertlaunch.tools import report

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3, "tokens": 1000 * s, "time": float(s)} for s in range(1, 9)]
    rows += [score_row(4, 4000, score=55.0), score_row(8, 8000, score=61.5),
             score_row(8, 8000, job="retrieval/scifact", score=0.21),
             {"step": 8, "tokens": 8000, "downstream": {"job": "glue/RTE", "failed": "exit code 2: bad label",
                                                        "exit_code": 2, "log": "/x/job.log", "export": "/x"}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report.downstream(rows) == {"glue/MRPC (score)": [(4000, 55.0), (8000, 61.5)],
                                       "retrieval/scifact (score)": [(8000, 0.21)]}
    assert report.main([str(run), "--out", str(tmp_path / "rep")]) == 0
    png = (tmp_path / "rep" / "downstream.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Downstream glue/MRPC (score) of run: 55 at 4000 tokens, 61.5 at 8000 tokens" in md
    assert "- FAILED: glue/RTE of step 8: exit code 2: bad label (log: /x/job.log)" in md
    assert "![downstream.png](downstream.png)" in md
