"""The one place that turns a config and a world size into numbers: accumulation, steps, warmup, and the
filled DeepSpeed config. The real run and the dry run both call `make_plan`, so they cannot disagree."""

from __future__ import annotations

import math
from dataclasses import dataclass

from launch.core import configlib
from launch.core.engine import fill_ds_config, load_ds_json, resolve_precision
from launch.core.schedule import Schedule


@dataclass(frozen=True)
class TokenBudget:
    """Pretraining budgets in tokens: each optimizer step trains global batch x seq_len token slots."""

    seq_len: int  # token slots per sequence (data.block_size)
    max_tokens: int | None  # train.max_tokens: derives the step count
    warmup_tokens: int | None  # train.warmup_tokens: derives the warmup steps


@dataclass(frozen=True)
class Plan:
    world_size: int
    accum: int  # gradient-accumulation micro-batches per optimizer step
    global_batch: int  # sequences per optimizer step, all ranks = micro x accum x world
    total_steps: int
    steps_per_epoch: int | None  # fine-tuning: ceil(examples / global_batch); None for streamed corpora
    warmup_steps: int  # train.warmup_steps, or train.warmup_ratio x total_steps
    schedule: Schedule  # the lr multiplier per optimizer step
    precision: str  # fp32 | fp16 | bf16 (auto resolved for this machine)
    ds_config: dict  # the DeepSpeed JSON with every "auto" filled


def batch_arithmetic(train, world_size: int) -> tuple[int, list[str]]:
    """Gradient-accumulation steps implied by global = micro x accum x world; problems if it is not whole."""
    micro = train.micro_batch_size
    glob_bs = train.global_batch_size or micro * world_size
    per_step = micro * world_size
    if glob_bs % per_step:
        lo = max(per_step, glob_bs // per_step * per_step)
        return 0, [f"train.global_batch_size={glob_bs} is not a multiple of micro_batch_size x world_size "
                   f"= {micro} x {world_size} = {per_step}: use {lo} or {lo + per_step}, or change "
                   "train.micro_batch_size"]
    return glob_bs // per_step, []


def make_plan(cfg, world_size: int, *, hidden_size: int | None = None, examples: int | None = None,
              epochs: float | None = None, tokens: TokenBudget | None = None) -> tuple[Plan, list[str]]:
    """-> (plan, problems). `examples`/`epochs`: a fine-tuning table's size and passes over it (the step
    count then follows from them unless train.max_steps is set); pretraining gives neither, and `tokens`
    when its budgets are in tokens (they then set the steps and the warmup)."""
    t = cfg.train
    accum, problems = batch_arithmetic(t, world_size)
    accum = max(accum, 1)
    global_batch = t.micro_batch_size * accum * world_size
    steps_per_epoch = math.ceil(examples / global_batch) if examples is not None else None
    total = t.max_steps or math.ceil((epochs or 1.0) * (steps_per_epoch or 1))
    step_tokens = global_batch * tokens.seq_len if tokens else 0
    if tokens and tokens.max_tokens:
        total = math.ceil(tokens.max_tokens / step_tokens)
    warmup = t.warmup_steps or int(t.warmup_ratio * total)
    if tokens and tokens.warmup_tokens:
        warmup = math.ceil(tokens.warmup_tokens / step_tokens)
    precision = resolve_precision(t.precision)
    ds, more = fill_ds_config(load_ds_json(cfg.deepspeed.config), micro=t.micro_batch_size, accum=accum,
                              world=world_size, precision=precision, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                              weight_decay=t.weight_decay, grad_clip=t.grad_clip, optimizer=t.optimizer,
                              source=f"deepspeed.config {cfg.deepspeed.config}")
    fill_zero_auto(ds, hidden_size)
    sched = Schedule(t.schedule, warmup, total, t.min_lr_ratio, t.decay_ratio)
    return Plan(world_size, accum, global_batch, total, steps_per_epoch, warmup, sched, precision, ds), problems + more


def plan(cfg, world_size: int, **kwargs) -> Plan:
    """make_plan for a run: any problem is a ConfigError (all of them at once)."""
    p, problems = make_plan(cfg, world_size, **kwargs)
    if problems:
        raise configlib.ConfigError(problems, "run config vs DeepSpeed config")
    return p


def fill_zero_auto(ds: dict, hidden: int | None) -> None:
    """ZeRO-3 bucket sizes left as "auto": the usual hidden-size based values (as HF's Trainer does)."""
    zero = ds.get("zero_optimization", {})
    h = hidden or 768
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value
