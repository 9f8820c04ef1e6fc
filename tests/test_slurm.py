"""The shipped sbatch scripts on a real one-node SLURM (started by .ci/slurm-cluster.sh from test.sh).

Skipped, with the reason, where no SLURM answers; BERTLAUNCH_REQUIRE_SLURM=1 (CI) turns that into a failure.
"""

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import yaml

from tests.helpers import REPO, env, last_step, losses, run

pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def slurm_up() -> str:
    if not shutil.which("sbatch"):
        return "sbatch not installed"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if proc.returncode or not re.search(r"idle|mixed|alloc", proc.stdout):
        return f"no SLURM node is up ({proc.stdout.strip() or proc.stderr.strip()})"
    return ""


@pytest.fixture(autouse=True)
def need_slurm():
    reason = slurm_up()
    if reason:
        if os.environ.get("BERTLAUNCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM required here but unavailable: {reason}")
        pytest.skip(reason)


# the shipped scripts ask for GPUs; this CPU-only cluster has none, and runs DeepSpeed on the CPU
CPU_ONLY = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=30:00"]


def sbatch(script: str, args: list[str], opts: list[str], tmp_path) -> str:
    cmd = ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/slurm-%j.out", *CPU_ONLY, *opts,
           str(REPO / "slurm" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_done(job: str, timeout=900, until=None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if until is not None and until(info):
            return info
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish in {timeout}s: {job_info(job)}")


RELEASED: set[str] = set()


def release_requeued(job: str, info: dict) -> bool:
    """True once the job was requeued. SLURM holds a requeued job back (its begin time, ~3 min here) before
    it may start again; the test lets it start 3 s later, once. Not at once: slurmd refuses a credential of
    the job made in the same second as the old one's revocation ("Job credential revoked"), which failed
    this test now and then when it released the job with StartTime=now."""
    if int(info.get("Restarts", 0)) < 1:
        return False
    if info.get("JobState") == "PENDING" and job not in RELEASED:
        RELEASED.add(job)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], capture_output=True)
    return True


def log_of(tmp_path, job) -> str:
    path = tmp_path / f"slurm-{job}.out"
    return path.read_text() if path.is_file() else ""


def test_two_task_pretraining_job_preempted_requeues_and_matches(tmp_path, tiny_config, corpus):
    """The reference is the same config run as 2 ranks outside SLURM: srun's ranks must train identically."""
    cfg = tiny_config("pretrain", {"data.train_files": [corpus(600)], "train.max_steps": 40, "train.warmup_steps": 0,
                                   "deepspeed.config": "ds_configs/zero2.json", "log.wandb.mode": "offline",
                                   "checkpoint.every": 5, "checkpoint.keep_last": 2})
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    run("pretrain", 2, cfg, [f"output_dir={straight}", "log.wandb.mode=disabled"])

    job = sbatch("pretrain.sbatch", [str(cfg), f"output_dir={preempted}"], ["--ntasks-per-node=2"], tmp_path)
    wait_done(job, until=lambda i: last_step(preempted / "metrics.jsonl") >= 12)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1 does
    info = wait_done(job, until=lambda i: release_requeued(job, i) and i.get("JobState") == "COMPLETED")
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log_of(tmp_path, job)
    log = log_of(tmp_path, job)
    assert "ranks exited with code 75" in log and "requeueing job" in log and "resumed from" in log
    assert losses(preempted) == losses(straight)  # per-step losses bit-identical across the preemption
    trainers = sorted((preempted / "checkpoints").glob("step_*/trainer.json"))
    assert json.loads(trainers[-1].read_text())["world_size"] == 2
    # the requeued job continued the same (offline) wandb run
    runs = {p.name.rsplit("-", 1)[-1] for p in (preempted / "wandb").glob("offline-run-*")}
    assert len(runs) == 1


def test_job_array_of_two_finetunes(tmp_path, tiny_config, pairs):
    files = [pairs(f"{n}.tsv", k, seed=i) for i, (n, k) in enumerate([("train", 40), ("dev", 12)])]
    cfg = tiny_config("finetune", {"task.train_file": files[0], "task.eval_file": files[1], "train.epochs": 1},
                      name="ft.yaml")
    opts = ["--array=0-1", f"--output={tmp_path}/slurm-%A_%a.out"]
    cmd = ["sbatch", "--parsable", f"--chdir={tmp_path}", *CPU_ONLY, *opts,
           str(REPO / "slurm" / "finetune_array.sbatch"), str(cfg)]
    # the array script writes runs/<name>_<job>_<task> relative to the submit dir: submit from tmp_path
    shutil.copytree(REPO / "slurm", tmp_path / "slurm")
    for name in ("launch", "data", "model", "ds_configs"):
        (tmp_path / name).symlink_to(REPO / name)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(SEEDS="7 8", PYTHON=str(REPO / ".venv" / "bin" / "python")),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    for task in (0, 1):
        info = wait_done(f"{job}_{task}")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"slurm-{job}_{task}.out").read_text()
    outs = sorted((tmp_path / "runs").glob(f"ft_{job}_*"))
    assert [o.name for o in outs] == [f"ft_{job}_0", f"ft_{job}_1"]
    assert [yaml.safe_load((o / "config.yaml").read_text())["train"]["seed"] for o in outs] == [7, 8]
    assert all((o / "eval_results.json").is_file() for o in outs)


def test_glue_job_array_then_gathering_run(tmp_path, tiny_config):
    """slurm/glue_array.sbatch: one array task per (task, seed) run, then one plain run of the same config
    that skips them all and writes the table and the submission."""
    from tests.helpers import write_glue

    out = tmp_path / "glue"
    cfg = tiny_config("glue", {"glue.data_dir": write_glue(tmp_path / "glue_data", ["SST-2", "MRPC"], n_train=24),
                               "train.epochs": 1, "output_dir": out}, name="glue.yaml")
    job = sbatch("glue_array.sbatch", [str(cfg)], ["--array=0-1", f"--output={tmp_path}/slurm-%A_%a.out"], tmp_path)
    for task in (0, 1):
        info = wait_done(f"{job}_{task}")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"slurm-{job}_{task}.out").read_text()
    assert all((out / t / "seed_1" / "eval_results.json").is_file() for t in ("SST-2", "MRPC"))
    assert not (out / "glue_results.json").exists()  # array tasks train; the gathering run writes the table
    gather = sbatch("glue_array.sbatch", [str(cfg)], ["--array=0", "--export=ALL,GLUE_GATHER=1",
                                                      f"--output={tmp_path}/slurm-%A_%a.out"], tmp_path)
    info = wait_done(f"{gather}_0")
    log = (tmp_path / f"slurm-{gather}_0.out").read_text()
    assert info["JobState"] == "COMPLETED" and log.count("finished earlier, skipped") == 2, log
    res = json.loads((out / "glue_results.json").read_text())
    assert res["complete"] and sorted(p.name for p in (out / "submission").iterdir()) == ["MRPC.tsv", "SST-2.tsv"]
