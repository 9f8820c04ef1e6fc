"""The one place that turns a config and a world size into numbers: accumulation, steps, warmup, and the
filled DeepSpeed config. The real run and the dry run both call `make_plan`, so they cannot disagree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bertlaunch.core.engine import fill_ds_config, load_ds_json, resolve_precision
from bertlaunch.core.schedule import Schedule, TimedSchedule


@dataclass(frozen=True)
class PhaseSpec:
    """What a pretraining phase asks for (train.phases, or the whole run as one phase)."""

    steps: int | None  # optimizer steps, or
    tokens: int | None  # token slots (global batch x block size per step), which set the steps
    block_size: int
    micro_batch_size: int | None = None  # None: train.micro_batch_size
    global_batch_size: int | None = None  # None: train.global_batch_size
    settings: dict = field(default_factory=dict)  # the task's own per-phase values (masking rate, RoPE base, label)


@dataclass(frozen=True)
class Phase:
    """A phase as it runs: steps [start, end) of the run, its sequence length and batch arithmetic."""

    index: int
    start: int
    end: int
    block_size: int | None  # None: fine-tuning (dynamic lengths)
    micro: int
    accum: int
    global_batch: int
    settings: dict = field(default_factory=dict)  # PhaseSpec.settings: what the task changes at this phase


@dataclass(frozen=True)
class Plan:
    world_size: int
    accum: int  # gradient-accumulation micro-batches per optimizer step (first phase)
    global_batch: int  # sequences per optimizer step, all ranks = micro x accum x world (first phase)
    total_steps: int
    phases: tuple[Phase, ...]  # one, or train.phases in order; they tile [0, total_steps)
    steps_per_epoch: int | None  # fine-tuning: ceil(examples / global_batch); None for streamed corpora
    warmup_steps: int  # train.warmup_steps, or train.warmup_ratio x total_steps
    schedule: Schedule | TimedSchedule  # the lr multiplier per optimizer step (or per fraction of a time budget)
    precision: str  # fp32 | fp16 | bf16 (auto resolved for this machine)
    ds_config: dict  # the DeepSpeed JSON with every "auto" filled
    notes: tuple[str, ...] = ()  # what the plan changed of the config (a micro-batch fitted to the world size)


    def phase_at(self, step: int) -> Phase:
        return phase_at(self.phases, step)


def steps_for_tokens(phases: list[Phase], tokens: int) -> int:
    """The number of steps from the start after which `tokens` token slots are trained."""
    for ph in phases:
        per_step = ph.global_batch * ph.block_size
        if tokens <= per_step * (ph.end - ph.start):
            return ph.start + math.ceil(tokens / per_step)
        tokens -= per_step * (ph.end - ph.start)
    return phases[-1].end


def phase_at(phases: tuple[Phase, ...], step: int) -> Phase:
    """The phase of the step after `step` steps are done (the last phase once the run is over)."""
    return next((ph for ph in phases if step < ph.end), phases[-1])


def batch_arithmetic(micro: int, global_batch: int | None, world_size: int, where: str = "train"
                     ) -> tuple[int, int, list[str]]:
    """-> (micro-batch, accumulation steps, problems) with global = micro x accum x world.

    The global batch is the recipe and stays as given (default: micro x world); the micro-batch is a per-device
    memory setting, so when it does not divide the global batch's share of one rank, the largest micro-batch
    below it that does is used. A global batch that the ranks cannot share evenly is a problem that proposes
    sizes that can."""
    glob_bs = global_batch or micro * world_size
    if glob_bs % world_size:
        lo = max(world_size, glob_bs // world_size * world_size)
        return micro, 1, [f"{where}.global_batch_size={glob_bs} cannot be shared evenly by {world_size} rank(s): "
                          f"use {lo} or {lo + world_size}, or a number of ranks that divides {glob_bs}"]
    per_rank = glob_bs // world_size
    fitted = max(m for m in range(1, min(micro, per_rank) + 1) if per_rank % m == 0)
    return fitted, per_rank // fitted, []


def make_plan(cfg, world_size: int, *, hidden_size: int | None = None, examples: int | None = None,
              epochs: float | None = None, phases: list[PhaseSpec] | None = None,
              warmup_tokens: int | None = None) -> tuple[Plan, list[str]]:
    """-> (plan, problems). `examples`/`epochs`: a fine-tuning table's size and passes over it (the step
    count then follows from them unless train.max_steps is set). Pretraining gives `phases` (its whole run
    as one phase, or train.phases), whose steps or tokens make the run; `warmup_tokens` sets the warmup."""
    t = cfg.train
    problems: list[str] = []
    notes: list[str] = []
    runs: list[Phase] = []
    for i, spec in enumerate(phases or [PhaseSpec(None, None, None)]):
        where = spec.settings.get("key") or (f"train.phases[{i}]" if phases and len(phases) > 1 else "train")
        asked = spec.micro_batch_size or t.micro_batch_size
        micro, accum, more = batch_arithmetic(asked, spec.global_batch_size or t.global_batch_size, world_size, where)
        problems += more
        if micro != asked and not more:
            notes.append(f"{where}.micro_batch_size {asked} -> {micro}: the largest that divides the "
                         f"{micro * accum} sequences per rank of the global batch {micro * accum * world_size} over "
                         f"{world_size} rank(s)")
        global_batch = micro * accum * world_size
        if spec.tokens:
            steps = math.ceil(spec.tokens / (global_batch * spec.block_size))
        elif spec.steps:
            steps = spec.steps
        else:  # fine-tuning: epochs over the table, unless train.max_steps
            steps = t.max_steps or math.ceil((epochs or 1.0) * math.ceil((examples or global_batch) / global_batch))
        start = runs[-1].end if runs else 0
        runs.append(Phase(i, start, start + steps, spec.block_size, micro, accum, global_batch, spec.settings))
    first, total = runs[0], runs[-1].end
    steps_per_epoch = math.ceil(examples / first.global_batch) if examples is not None else None
    warmup = t.warmup_steps or int(t.warmup_ratio * total)
    if warmup_tokens:  # token slots, counted through the phases (their batch and block sizes differ)
        warmup = steps_for_tokens(runs, warmup_tokens)
    precision = resolve_precision(t.precision)
    ds, more = fill_ds_config(load_ds_json(str(cfg.deepspeed.path())), micro=first.micro, accum=first.accum,
                              world=world_size, precision=precision, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                              weight_decay=t.weight_decay, grad_clip=t.grad_clip, optimizer=t.optimizer,
                              source=f"deepspeed.config {cfg.deepspeed.config}")
    fill_zero_auto(ds, hidden_size)
    sched = Schedule(t.schedule, warmup, total, t.min_lr_ratio, t.decay_ratio)
    if t.time_budget_h:
        sched = TimedSchedule(sched)
    return Plan(world_size, first.accum, first.global_batch, total, tuple(runs), steps_per_epoch, warmup, sched,
                precision, ds, tuple(notes)), problems + more


def fill_zero_auto(ds: dict, hidden: int | None) -> None:
    """ZeRO-3 bucket sizes left as "auto": the usual hidden-size based values (as HF's Trainer does)."""
    zero = ds.get("zero_optimization", {})
    h = hidden or 768
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value
