"""The shipped sbatch scripts on a real one-node SLURM (started by .ci/slurm-cluster.sh from test.sh).

Skipped, with the reason, where no SLURM answers; BERTLAUNCH_REQUIRE_SLURM=1 (CI) turns that into a failure.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from tests.helpers import REPO, assert_resumed, compare, env, full_only, last_step, run, saved_on_signal

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


def sbatch(script: str, args: list[str], opts: list[str], tmp_path, **env_extra) -> str:
    cmd = ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/slurm-%j.out", *CPU_ONLY, *opts,
           str(REPO / "slurm" / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True)
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


REQUEUED_AT: dict[str, float] = {}


def release_requeued(job: str, info: dict) -> bool:
    """True once the job was requeued. SLURM holds a requeued job back (its begin time, ~3 min here) before
    it may start again; the test lets it start 3 s after the requeue (scontrol update StartTime=now, which
    also wakes the scheduler). Not at once: slurmd refuses a credential of the job made in the same second
    as the old one's revocation ("Job credential revoked"), which failed this test now and then."""
    if int(info.get("Restarts", 0)) < 1:
        return False
    if info.get("JobState") == "PENDING":
        first = REQUEUED_AT.setdefault(job, time.time())
        if time.time() - first >= 3:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
    return True


def log_of(tmp_path, job) -> str:
    path = tmp_path / f"slurm-{job}.out"
    return path.read_text() if path.is_file() else ""


def two_nodes() -> list[str]:
    """The cluster's nodes when it has two or more (.ci/slurm-cluster.sh --nodes 2, as CI starts it); else the
    multi-node tests skip, or fail where BERTLAUNCH_REQUIRE_SLURM=1 (CI)."""
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    if len(nodes) < 2:
        msg = f"a 2-node cluster is needed (bash .ci/slurm-cluster.sh --nodes 2); this one has {nodes}"
        if os.environ.get("BERTLAUNCH_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return sorted(nodes)[:2]


def two_node_config(tiny_config, corpus):
    # a constant lr: a shorter run's losses are the first ones of a longer run (the torchrun check)
    return tiny_config("pretrain", {"data.train_files": [corpus(600)], "train.max_steps": 16, "train.warmup_steps": 0,
                                    "train.schedule": "constant", "deepspeed.config": "ds_configs/zero2.json",
                                    "log.wandb.mode": "offline", "checkpoint.every": 4, "checkpoint.keep_last": 2})


def test_two_nodes_match_one_machine_through_preemption_on_wiped_disks(tmp_path, tiny_config, corpus, s3_server):
    """sbatch --nodes=2 --ntasks-per-node=1 trains bit-identically to 2 ranks on one machine (which srun's ranks
    on one node also match), also when preempted mid-run (USR1 to the batch script, checkpoint, upload, exit 75,
    requeue) onto nodes whose output_dirs were wiped meanwhile: each node writes its own disk
    (output_dir=.../$SLURMD_NODENAME), and the requeued job resumes from checkpoint.remote (a real S3 API)."""
    from tests.conftest import S3Server

    nodes = two_nodes()
    _, client = s3_server
    bucket = f"slurm-{os.getpid()}"
    client.create_bucket(Bucket=bucket)
    # the nodes reach the host at the bridge's address (.ci/slurm-cluster.sh); the same moto backend serves it
    bridge = S3Server(host="10.77.0.1")
    cfg = two_node_config(tiny_config, corpus)
    one_node, disks = tmp_path / "one_node", tmp_path / "disks"
    run("pretrain", 2, cfg, [f"output_dir={one_node}", "log.wandb.mode=disabled"])
    job = sbatch("pretrain.sbatch", [str(cfg), f"output_dir={disks}/$SLURMD_NODENAME",
                                     f"checkpoint.remote=s3://{bucket}/run"], ["--nodes=2", "--ntasks-per-node=1"],
                 tmp_path, AWS_ENDPOINT_URL=bridge.endpoint)
    rank0 = disks / nodes[0]  # the first node of the allocation holds rank 0
    wait_done(job, until=lambda i: last_step(rank0 / "metrics.jsonl") >= 6)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1 does
    first_run: set[str] = set()

    def requeued_on_new_disks(info: dict) -> bool:
        if int(info.get("Restarts", 0)) >= 1 and info.get("JobState") == "PENDING" and disks.exists():
            first_run.update(p.name.rsplit("-", 1)[-1] for p in (rank0 / "wandb").glob("offline-run-*"))
            shutil.rmtree(disks)  # both nodes' disks: new nodes
        return release_requeued(job, info) and info.get("JobState") == "COMPLETED"

    try:
        info = wait_done(job, until=requeued_on_new_disks)
    finally:
        bridge.stop()
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    assert f"on {nodes[0][:-1]}[1-2]" in log or f"on {','.join(nodes)}" in log, log[:500]
    assert "ranks exited with code 75" in log and "requeueing job" in log
    step = saved_on_signal(log)
    assert_resumed(log, rank0, step)  # the requeued job's own line
    assert f"(downloaded from s3://{bucket}/run/step_{step:08d})" in log
    assert compare(one_node, rank0) == []  # losses and final weights bit-identical across nodes and preemption
    trainers = sorted((rank0 / "checkpoints").glob("step_*/trainer.json"))
    assert json.loads(trainers[-1].read_text())["world_size"] == 2
    # the requeued job continued the same (offline) wandb run: its id came back with the checkpoint
    runs = {p.name.rsplit("-", 1)[-1] for p in (rank0 / "wandb").glob("offline-run-*")}
    assert len(first_run) == 1 and runs == first_run


def test_embedding_job_preempted_and_requeued_matches_a_straight_run(tmp_path, tiny_config):
    """slurm/embed.sbatch with 2 tasks (each query's negatives gathered from both of srun's ranks), preempted
    mid-run (USR1 to the batch script, checkpoint, exit 75, requeue): the requeued job resumes, and its losses
    and final weights are bit-identical to 2 ranks trained without a stop."""
    from tests.embed_data import write_triples

    cfg = tiny_config("embed", {"task.train_file": write_triples(tmp_path / "rows.jsonl", 96),
                                "train.global_batch_size": 8, "train.micro_batch_size": 4, "checkpoint.every": 4,
                                "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}, name="embed.yaml")
    straight, out = tmp_path / "straight", tmp_path / "slurm_out"
    run("embed", 2, cfg, [f"output_dir={straight}"])
    job = sbatch("embed.sbatch", [str(cfg), f"output_dir={out}"], ["--nodes=1", "--ntasks-per-node=2"], tmp_path,
                 BERTLAUNCH_SLOW_STEP_S=0.3)  # 12 steps of at least 0.3 s: time to signal mid-run
    wait_done(job, until=lambda i: last_step(out / "metrics.jsonl") >= 3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_done(job, until=lambda i: release_requeued(job, i) and i.get("JobState") == "COMPLETED")
    log = log_of(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, log
    assert "ranks exited with code 75" in log and "requeueing job" in log
    step = saved_on_signal(log)
    assert 3 <= step < 12
    assert_resumed(log, out, step)
    assert compare(straight, out) == []  # losses and final weights
    assert (out / "final" / "modules.json").is_file()


@full_only("about 40 s; the 2-node bit-identity is checked through sbatch above, torchrun's variables in "
           "test_dist.py")
def test_torchrun_across_two_nodes_matches_one_machine(tmp_path, tiny_config, corpus):
    """Without SLURM: torchrun --nnodes 2 (c10d rendezvous on node1), one agent in each node's namespaces."""
    nodes = two_nodes()
    cfg = two_node_config(tiny_config, corpus)
    one_node, with_torchrun = tmp_path / "one_node", tmp_path / "torchrun"
    run("pretrain", 2, cfg, [f"output_dir={one_node}", "log.wandb.mode=disabled", "train.max_steps=6"])
    agents = [subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{node}", "unshare", "--uts", "sh", "-c",
         f"hostname {node} && exec {REPO}/.venv/bin/python -m torch.distributed.run --nnodes 2 --nproc_per_node 1 "
         f"--rdzv_backend c10d --rdzv_endpoint {nodes[0]}:29477 --rdzv_id t{os.getpid()} launch/pretrain.py "
         f"--config {cfg} output_dir={with_torchrun} log.wandb.mode=disabled train.max_steps=6"],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in nodes]
    outs = [a.communicate(timeout=600)[0] for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert compare(one_node, with_torchrun) == []


def kill_rank_1_in_step_5(job: str, out, tmp_path) -> str:
    """Rank 1 is held inside step 5 by a test hook (the job was submitted with HOLD), so that it is surely
    alive, mid-step, when it is SIGKILLed. Checks that the job then fails within a minute with exit 4, names
    rank 1 and its node, and is not requeued (a crash is not a preemption: the README's policy)."""
    beat = out / ".heartbeat" / "rank_00001"
    wait_done(job, until=lambda i: beat.is_file() and int(beat.read_text().split()[0]) >= 4)
    _, _, pid, host = beat.read_text().split()
    assert job_info(job)["JobState"] == "RUNNING", log_of(tmp_path, job)[-3000:]
    os.kill(int(pid), signal.SIGKILL)
    killed_at = time.time()
    info = wait_done(job)
    log = log_of(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "4:0" and int(info["Restarts"]) == 0, log[-3000:]
    assert time.time() - killed_at < 60, log[-3000:]
    assert f"rank 1 on {host} died (Killed)" in log, log[-3000:]
    return host


HOLD = "--export=ALL,BERTLAUNCH_HANG_RANK=1,BERTLAUNCH_HANG_AT_STEP=5"


@full_only("a killed rank ending the job: test_robustness.py; resume on other world sizes: test_resume.py")
def test_two_node_job_with_a_killed_task_fails_fast_and_resumes_on_one_task_exactly_once(tmp_path, tiny_config,
                                                                                           corpus):
    """--dry-run under srun on 2 nodes names both. A 2-node job whose rank 1 (on node2) is SIGKILLed mid-step
    fails fast with exit 4 naming rank and node, and is not requeued; submitted again as 1 task on 1 node (a
    resize), it resumes from the 2-node checkpoint, and every document of every finished epoch is trained
    exactly once (audit)."""
    from bertlaunch.data.tokenize import load_spec
    from tests.helpers import audited_tokens, doc_tokens

    nodes = two_nodes()
    files = [corpus(20, name="a.txt", seed=1), corpus(12, name="b.txt", seed=2)]
    cfg = tiny_config("pretrain", {"data.train_files": files, "train.max_steps": 24, "train.warmup_steps": 0,
                                   "data.block_size": 32, "data.audit": True, "train.micro_batch_size": 4,
                                   "train.global_batch_size": 8, "checkpoint.every": 3,
                                   "deepspeed.config": "ds_configs/zero1.json"})
    out = tmp_path / "out"
    dry = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", *CPU_ONLY, str(REPO / ".venv/bin/python"),
                          "launch/pretrain.py", "--config", str(cfg), "--dry-run"], cwd=REPO, env=env(),
                         capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "world size 2" in dry.stdout and "node1" in dry.stdout and "node2" in dry.stdout, dry.stdout[:1500]
    job = sbatch("pretrain.sbatch", [str(cfg)], ["--nodes=2", "--ntasks-per-node=1", HOLD], tmp_path)
    assert kill_rank_1_in_step_5(job, out, tmp_path) == nodes[1]
    job = sbatch("pretrain.sbatch", [str(cfg)], ["--nodes=1", "--ntasks-per-node=1"], tmp_path)
    assert wait_done(job)["JobState"] == "COMPLETED", log_of(tmp_path, job)
    assert "resized from 2 rank(s)" in log_of(tmp_path, job)
    assert_resumed(log_of(tmp_path, job), out, 3)
    trainer = json.loads(sorted((out / "checkpoints").glob("step_*/trainer.json"))[-1].read_text())
    done = min(st["epoch"] for st in trainer["streams"])
    assert done >= 1
    truth, seen = doc_tokens([str(f) for f in files], load_spec("bert-base-uncased")), audited_tokens(out)
    for epoch in range(done):
        assert {d: n for (e, d), n in seen.items() if e == epoch} == truth, epoch
    assert all(n <= truth[d] for (_, d), n in seen.items())


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


@full_only("job arrays: test_job_array_of_two_finetunes; the GLUE gathering of finished runs: test_glue.py")
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
