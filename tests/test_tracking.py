"""wandb (offline), metrics, progress lines, secrets, and the run report."""

import json
import time
import warnings

import pytest

from bertlaunch.core.metrics import truncate_after
from bertlaunch.core.tracking import Tracker, auto_mode
from tests.helpers import assert_resumed, run, run_and_kill, wandb_history

SECRET_ENV = "s3cr3t-env-value-0123456789"
SECRET_CFG = "hf_AbCdEfGhIjKlMnOpQrStUv12"


@pytest.mark.slow
def test_offline_wandb_survives_kill_and_resume_as_one_run_without_secrets(tmp_path, tiny_config, corpus):
    train = corpus(300)
    cfg = tiny_config("pretrain", {"data.train_files": [train], "eval.every": 6, "eval.max_batches": 2,
                                   "log.every": 2, "log.wandb": {"mode": "offline", "project": "t", "name": SECRET_CFG,
                                                                 "tags": ["x"]}})
    out = tmp_path / "out"
    secret_env = {"MY_SERVICE_TOKEN": SECRET_ENV}
    overrides = ["data.eval_files=[" + str(train) + "]"]
    step = run_and_kill("pretrain", 0, cfg, overrides, out, 7, 12, **secret_env)
    proc = run("pretrain", 0, cfg, overrides, **secret_env)
    assert_resumed(proc.stdout, out, step)
    # plain progress lines (stdout is not a terminal here)
    assert "step 12/12 loss=" in proc.stdout and "eta=" in proc.stdout
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2  # the killed attempt and the resumed one ...
    rows = [r for d in run_dirs for r in wandb_history(d)]
    assert len({run_id for run_id, _, _ in rows}) == 1  # ... are one wandb run
    steps = [step for _, step, _ in rows]
    assert sorted(set(steps)) == [2, 4, 6, 8, 10, 12]
    train_rows = [items for _, _, items in rows if "loss" in items]
    assert sorted(s for (_, s, items) in rows if "loss" in items) == [2, 4, 6, 8, 10, 12]  # no step twice
    for key in ("loss", "lr", "tokens", "tokens_per_s", "samples_per_s", "grad_norm", "real_token_frac",
                "packing_efficiency", "epoch", "documents", "skipped_steps"):
        assert all(key in items for items in train_rows), key
    assert any("eval_loss" in items and "perplexity" in items for _, _, items in rows)
    # secrets planted in the environment and the config appear nowhere in the outputs
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET_ENV.encode() not in data and SECRET_CFG.encode() not in data, path
    assert SECRET_CFG not in proc.stdout + proc.stderr
    assert "<redacted>" in (out / "config.yaml").read_text()


def test_tracker_failure_warns_and_training_goes_on():
    class Broken:
        id = "x"

        def log(self, *a, **k):
            raise ConnectionError("wandb backend unreachable")

    t = Tracker(Broken())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t.log({"step": 1, "loss": 1.0})
        t.log({"step": 2, "loss": 0.5})  # after the first failure: silent no-op
    assert t.failed and len(w) == 1 and "training continues" in str(w[0].message)


def test_metrics_truncated_to_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    assert truncate_after(path, 4) == 7
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_report_writes_plots_and_summary(tmp_path):
    for name, scale in (("run_a", 1.0), ("run_b", 0.8)):
        d = tmp_path / name
        d.mkdir()
        lines = [{"step": s, "loss": scale * (10 - s / 10), "lr": 1e-3 * min(1, s / 10), "tokens": 4096 * s,
                  "tokens_per_s": 5000.0 + s, "mfu": 0.3, "time": 2.0 * s} for s in range(1, 51)]
        lines += [{"step": 25, "eval_loss": 6.0 * scale, "perplexity": 400.0}, {"step": 50, "eval_loss": 5.0 * scale,
                                                                                 "perplexity": 148.4}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert run_report(tmp_path / "run_a", tmp_path / "run_b", out=tmp_path / "rep") == 0
    for png in ("loss.png", "eval.png", "lr.png", "throughput.png", "mfu.png"):
        data = (tmp_path / "rep" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| run_a | 50 | 5 | 204800 |" in md and "| run_b | 50 | 4 | 204800 |" in md
    assert "![loss.png](loss.png)" in md


def run_report(*runs, out):
    from bertlaunch.tools import report

    return report.main([*map(str, runs), "--out", str(out)])


def test_resume_replays_rows_wandb_lost_and_skips_rows_it_has(tmp_path):
    """The dead attempt's wandb log reached step 2 only; metrics.jsonl (truncated to the checkpoint, 4)
    has 1..4. Resume replays 3 and 4, then logs the recomputed 5.. live: every step exactly once."""
    import wandb

    from bertlaunch.core.tracking import Tracker, read_history, resume_tracker

    out = tmp_path / "out"
    out.mkdir()
    run = wandb.init(project="t", mode="offline", dir=str(out), id="abcd1234",
                     settings=wandb.Settings(silent=True, x_disable_meta=True))
    for s in (1, 2):
        run.log({"loss": float(s)}, step=s)
    run.finish()
    run_dir = next((out / "wandb").glob("offline-run-*"))
    deadline = time.time() + 30  # wandb's service may still be writing the log after finish() returns
    while len(read_history(run_dir)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in (1, 2, 3, 4)))

    class Fake:
        id, starting_step = "abcd1234", 0

        def __init__(self):
            self.logged = []

        def log(self, items, step):
            self.logged.append(step)

    t = Tracker(Fake())
    resume_tracker(t, str(out), start_step=4, previous_max_step=6)
    for s in (5, 6, 7):
        t.log({"step": s, "loss": 0.0})
    assert t.run.logged == [3, 4, 5, 6, 7], sorted(str(p) for p in out.rglob("*"))
    assert [step for _, step, _ in read_history(run_dir)] == [1, 2]


@pytest.mark.parametrize("env,expected", [
    ({"WANDB_MODE": "disabled"}, "disabled"), ({"WANDB_DISABLED": "true"}, "disabled"),
    ({"WANDB_DISABLED": "true", "WANDB_MODE": "online"}, "disabled"), ({"WANDB_MODE": "offline"}, "offline"),
    ({"WANDB_MODE": "dryrun"}, "offline"), ({"WANDB_API_KEY": "k" * 40}, "online"), ({}, "offline")])
def test_wandb_auto_honours_the_ecosystem_switches(monkeypatch, tmp_path, env, expected):
    for key in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert auto_mode()[0] == expected


def test_auto_disabled_by_the_environment_writes_no_wandb_folder(tmp_path, tiny_config, corpus, inproc):
    cfg = tiny_config("pretrain", {"data.train_files": [corpus(100)], "train.max_steps": 2, "log.wandb.mode": "auto"})
    proc = inproc("pretrain", cfg, WANDB_DISABLED="true")
    assert not (tmp_path / "out" / "wandb").exists() and "wandb" not in proc.stdout
