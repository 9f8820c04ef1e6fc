"""launch/core/dist.py: rank / world / master address from each launcher's environment (multi-node SLURM too)."""

from bertlaunch.core.dist import detect, expand_nodelist


def test_expand_nodelist():
    assert expand_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_nodelist("a[9-11]b,c") == ["a9b", "a10b", "a11b", "c"]


def test_two_node_srun_step():
    """Task 3 of a 2-node x 2-task srun step: global rank 3, local rank 1, master = the first node,
    port from the job id (the same on every node, no communication needed)."""
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_NODELIST": "gpu-[07-08]"}
    info = detect(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert info.master_addr == "gpu-07" and info.master_port == 20000 + 123456 % 20000
    assert info.launcher == "slurm" and not info.is_main


def test_batch_script_without_step_is_single_process():
    info = detect({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")


def test_torchrun_and_deepspeed_variables():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
    info = detect(env)
    assert (info.rank, info.world_size, info.master_addr, info.master_port, info.launcher) == \
        (1, 2, "10.0.0.1", 29400, "torchrun")
    del env["TORCHELASTIC_RUN_ID"]
    assert detect(env).launcher == "deepspeed"
