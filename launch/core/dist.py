"""The one module that owns RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT.

It reads them from whichever launcher started us:
  - `deepspeed` or `torchrun`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT are in the environment
    (deepspeed also appends --local_rank=N to argv; the environment wins);
  - SLURM `srun` (one task per GPU): SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the job's node
    list (first node = master) and a port derived from the job id;
  - nothing (`python launch/pretrain.py`): a single-process debug run on one GPU or the CPU.
and then exports the standard variables so DeepSpeed / torch.distributed see one consistent picture.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # deepspeed | torchrun | slurm | single

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed node list ('node[01-03,07],gpu5') without needing scontrol."""
    hosts, parts, depth, cur = [], [], 0, ""
    for ch in nodelist:  # split on commas that are not inside brackets
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    parts.append(cur)
    for part in filter(None, parts):
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-")
                hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_nodes(env=None) -> list[str]:
    """The hosts of this SLURM step (or job), in order; [] outside SLURM."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return []
    try:  # scontrol knows every syntax; fall back to our parser where it is missing
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=20, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return expand_nodelist(nodelist)


def slurm_master_addr(env) -> str:
    nodes = slurm_nodes(env)
    return nodes[0] if nodes else "127.0.0.1"


def detect(env=None) -> DistInfo:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", 1))),
                        env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), launcher)
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        # Inside an `srun` step: one task per GPU. (The batch script itself has no step id, so a plain
        # `python launch/pretrain.py` there stays a single process instead of waiting for peers.)
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
        job = int(env.get("SLURM_JOB_ID", 0))
        port = int(env.get("MASTER_PORT", 20000 + job % 20000))
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1"))
        local_world = int(re.match(r"\d+", tasks_per_node).group())
        return DistInfo(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), local_world,
                        env.get("MASTER_ADDR") or slurm_master_addr(env), port, "slurm")
    return DistInfo(0, 1, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "single")


def standalone_env(gpu: int | None = None) -> dict[str, str]:
    """The environment of a child process that is a one-rank job of its own (the GLUE suite's parallel
    runs): no inherited rank or launcher variables, a port of its own, and only GPU number `gpu` (of those
    this process sees) visible when given."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_STEP_ID", "SLURM_PROCID", "TORCHELASTIC_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["MASTER_PORT"] = str(free_port())
    if gpu is not None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[gpu] if visible else str(gpu)
    return env


def in_slurm_job(env=None) -> bool:
    """Inside a SLURM allocation (a batch script, an srun step, salloc)."""
    return "SLURM_JOB_ID" in (os.environ if env is None else env)


def job_env(gpu: int | None = None, allocation: bool = False) -> dict[str, str]:
    """The environment of a job that runs apart from this one (a downstream evaluation): standalone_env, without
    this allocation's SLURM variables (SLURM_CONF kept) nor slurm/run_steps.sh's requeue marker. Its GPUs: number
    `gpu`; or, for a job with an allocation of its own (sbatch), whatever SLURM gives it; else none at all (on a
    CUDA machine the training's GPUs stay its own)."""
    env = {k: v for k, v in standalone_env(gpu).items()
           if not (k.startswith("SLURM_") and k != "SLURM_CONF") and k != "BERTLAUNCH_REQUEUE_FILE"}
    if allocation:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    elif gpu is None and has_cuda():
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def has_cuda() -> bool:
    return torch.cuda.is_available()


def prepare_env(info: DistInfo) -> None:
    """Export the standard variables (before deepspeed is imported: it reads DS_ACCELERATOR at import)."""
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      LOCAL_WORLD_SIZE=str(info.local_world_size), MASTER_ADDR=info.master_addr,
                      MASTER_PORT=str(info.master_port))
    if not has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Each dataloader worker tokenizes on its own; nested Rust thread pools only oversubscribe the cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


COLLECTIVE_MARGIN_S = 30


def init(timeout_s: int = 600) -> DistInfo:
    """Detect, export, and start the process group through DeepSpeed (nccl on GPUs, gloo on the CPU).
    Collectives time out COLLECTIVE_MARGIN_S after `timeout_s`: the watchdog (launch/core/watchdog.py),
    which names the rank that hung, always speaks first; the collective timeout is only the backstop."""
    info = detect()
    prepare_env(info)
    import deepspeed  # lazy: DeepSpeed picks its accelerator at import, from DS_ACCELERATOR set just above
    import deepspeed.ops  # lazy: as deepspeed

    if has_cuda():
        torch.cuda.set_device(info.local_rank)
    else:
        # Late in training Adam's moments and many gradients drift into denormal range, where x86 float math
        # is many times slower; flushing them to zero keeps CPU steps at full speed (results stay reproducible).
        torch.set_flush_denormal(True)
        # DeepSpeed's CPU shared-memory all-reduce serves tensor-parallel inference only, JIT-compiles on the
        # first run (~1 min) and leaves a 66 MB /dev/shm segment per rank per run that it never unlinks
        # (hundreds of runs fill /dev/shm and memory): training does not use it, so it is not started.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if has_cuda() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s + COLLECTIVE_MARGIN_S), verbose=False)
    return info


def device():
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order, differentiable: the backward sums every rank's gradient of the gathered
    rows (an all-reduce) and keeps this rank's own, so each rank's loss reaches the rows it came from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.counts, ctx.rank = counts, rank
        width = max(counts)  # all_gather needs equal shapes: pad every rank's rows to the most any rank has
        padded = torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])]) if x.shape[0] < width else x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.counts[:ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None, None


def gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [counts[rank], ...] on every rank -> [sum(counts), ...], rank 0's rows first; gradients flow back to the
    rank each row came from (summed over the ranks' losses). One rank: x itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return _GatherRows.apply(x, tuple(counts), dist.get_rank())


_CONTROL = None


def _control_group():
    """A gloo group of its own for small host-side decisions (stop flags, elapsed time): no GPU sync, unlike
    a NCCL collective, and an operation left in flight (all_reduce_async) never interleaves with the
    training's collectives on the world group."""
    global _CONTROL
    if _CONTROL is None:
        _CONTROL = dist.new_group(backend="gloo")
    return _CONTROL


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


class Reduced:
    """A host all-reduce started by all_reduce_async; wait() -> the reduced values."""

    def __init__(self, values: list[float], work=None, tensor=None):
        self.values, self.work, self.tensor = values, work, tensor

    @property
    def in_flight(self) -> bool:
        return self.work is not None

    def wait(self) -> list[float]:
        if self.work is not None:
            self.work.wait()
            self.values, self.work = self.tensor.tolist(), None
        return self.values


def all_reduce_async(values: list[float], op: str = "max") -> Reduced:
    """Start reducing a few host scalars over the control group and return at once: the caller waits on the
    result later (a step later), so no rank blocks on the others between steps."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Reduced(list(values))
    t = torch.tensor(values, dtype=torch.float64)
    work = dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=_control_group(), async_op=True)
    return Reduced(list(values), work, t)


def all_reduce(values: list[float], op: str = "sum", host: bool = False) -> list[float]:
    """Reduce a few scalars across ranks in one collective. host=True: over gloo on the CPU, so the GPU
    stream is not synchronised (for values that live on the host anyway)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cpu" if host else device())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]), group=_control_group() if host else None)
    return t.tolist()


def destroy() -> None:
    global _CONTROL
    _CONTROL = None
    if dist.is_initialized():
        import deepspeed.comm  # lazy: only after init() (see there)

        deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups: a later init is clean
        # collect the dead groups now: in a long-lived process (tests) a forked dataloader worker would
        # otherwise run their destructors and deadlock on threads that do not exist in the child
        gc.collect()
