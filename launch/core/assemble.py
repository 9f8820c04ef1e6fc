"""The one way a run is put together, for every task and for the dry run.

The order is fixed here, once, because bit-exact resume depends on it:
  tokenizer, data -> seed -> model -> per-rank seed -> plan -> resume (fresh, same ranks, or resized) ->
  task -> engine -> restore -> reseed after a resize -> Trainer.
A task only describes itself (launch/core/task.py: TaskSpec). `--dry-run` runs the same function with a
`Preflight`: the model is built on the meta device, no engine is started and nothing is written, and every
problem is listed instead of raised, so the dry run shows what the run will do because it is the same code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from bertlaunch.core import configlib, dist, preflight
from bertlaunch.core.checkpoint import CheckpointError, exact_keys
from bertlaunch.core.checkpointer import Checkpointer
from bertlaunch.core.dist import DistInfo
from bertlaunch.core.engine import build_engine, zero_stage
from bertlaunch.core.jobs import Downstream
from bertlaunch.core.layout import RunDir
from bertlaunch.core.loop import Trainer
from bertlaunch.core.metrics import MetricsLog, peak_flops
from bertlaunch.core.plan import make_plan
from bertlaunch.core.schedule import lr_scheduler
from bertlaunch.core.secrets import redact, redact_argv, write_config
from bertlaunch.core.seeding import seed_everything, seed_rank
from bertlaunch.core.task import Resume, TaskSpec, TrainState
from bertlaunch.core.tracking import make_tracker, resume_tracker
from bertlaunch.model.build import check_positions
from bertlaunch.model.cpu_linear import use_onednn_linears


def assemble(spec: TaskSpec, cfg, info: DistInfo, dry: preflight.Preflight | None = None) -> Trainer | None:
    """A ready Trainer for `cfg` on this rank; with `dry` (the dry run): the same steps up to the engine,
    printed, with every problem collected in `dry` instead of raised, and None."""
    check = _Checks(dry)
    log = log0(info)
    tok = check(spec.tokenizer, cfg)
    data = check(spec.data, cfg, tok, info) if tok is not None else None
    seed_everything(cfg.train.seed)
    model = check(spec.model, cfg, tok, data, dry is not None) if tok is not None else None  # same weights on all ranks
    if model is not None:
        key, length = spec.longest(cfg)
        check(check_positions, model.config, length, key)
        if cfg.model.cpu_linear == "onednn" and dist.device().type == "cpu":
            layers = check(use_onednn_linears, model.module)
            if dry is None:
                log(f"linear layers: {layers} multiplied by oneDNN (model.cpu_linear)")
    seed_rank(cfg.train.seed, info.rank)  # distinct dropout per rank (restored on resume)
    plan, problems = make_plan(cfg, info.world_size, hidden_size=getattr(model and model.config, "hidden_size", None),
                               **spec.plan_args(cfg, data))
    check.problems(problems, "run config vs DeepSpeed config")
    for note in plan.notes if dry is None else ():
        log(f"note: {note}")
    saver = check(Checkpointer, cfg.output_dir, cfg.checkpoint, info, log, dry is not None)
    resume = (check(choose_resume, saver, cfg, info, spec.workers(cfg)) if saver is not None else None) or Resume()
    if resume.path is not None and data is not None:
        check(spec.check_resume, cfg, data, resume)
    if dry is not None:
        preflight.show(dry, cfg, info, plan, model, resume, spec.workers(cfg), spec.longest(cfg)[1])
        if data is not None:
            check(spec.describe, cfg, tok, data, plan, info)
        return None

    if resume.universal:
        saver.to_universal(resume.path)  # ZeRO partitions are per rank: re-split them via the universal format
    task = spec.task(cfg, info, tok, data, model, plan, resume)
    tracker = make_tracker(cfg.log.wandb, cfg.output_dir, redact(configlib.to_dict(cfg)), info,
                           (resume.saved or {}).get("wandb_id"))
    ds_config = plan.ds_config | ({"checkpoint": {"load_universal": True}} if resume.universal else {})
    engine, _, _ = build_engine(model.module, ds_config, cfg.train.weight_decay, lr_scheduler(plan.schedule))
    state = TrainState()
    if resume.path is not None:
        saver.restore(engine, resume.path, resume.universal, same_ranks=not resume.world_changed)
        state = TrainState(**resume.saved["state"])
        if state.best_step is not None and task.keeps_best:
            saver.protected = {state.best_step}
        saved = resume.saved
        log(f"resumed from {resume.path} at step {state.step}" + (
            f" (resized from {saved['world_size']} rank(s) x {saved['workers']} worker(s))" if resume.resplit else "")
            + (f" (downloaded from {resume.source})" if resume.source else ""))
    if info.is_main:
        write_config(cfg, cfg.output_dir)
    saver.meta_writer = model.write_meta if info.is_main else None
    metrics = MetricsLog(cfg.output_dir, info.is_main, plan.total_steps, state.step, progress=cfg.log.progress,
                         tracker=tracker)
    if tracker is not None and resume.path is not None:
        resume_tracker(tracker, cfg.output_dir, state.step, metrics.previous_max_step)
    scoring = getattr(cfg.eval, "downstream", None)  # pretraining's eval.downstream: its exports scored aside
    downstream = Downstream(scoring, cfg.output_dir, info, metrics.write, metrics.info, state.step) \
        if scoring is not None and scoring.active() and info.is_main else None
    if resume.world_changed:  # RNG streams cannot be re-split over other ranks: reseed from the step
        seed_rank(cfg.train.seed, info.rank, state.step)
    extra = {"world_size": info.world_size, "exact": exact_keys(cfg), "zero_stage": zero_stage(plan.ds_config),
             "precision": plan.precision, "command": redact_argv(sys.argv),
             "wandb_id": tracker.run_id if tracker else (resume.saved or {}).get("wandb_id")}
    return Trainer(train=cfg.train, log=cfg.log, checkpoint=cfg.checkpoint, run_dir=RunDir(cfg.output_dir),
                   info=info, engine=engine, task=task, state=state, plan=plan, metrics=metrics, saver=saver,
                   trainer_extra=extra, peak_flops=peak_flops(plan.precision, cfg.log.peak_tflops),
                   downstream=downstream)


def plan_problems(spec: TaskSpec, cfg, world_size: int) -> list[str]:
    """The plan's problems for this world size (batch arithmetic, the DeepSpeed JSON against the config), which
    need no file but the JSON: entry points report them with the config's own (configlib.load's `more`)."""
    if not cfg.deepspeed.path().is_file():
        return []  # the config check names the missing file
    try:
        return make_plan(cfg, world_size, **spec.plan_args(cfg, None))[1]
    except ValueError as e:  # the DeepSpeed JSON is not valid JSON
        return [str(e)]


def choose_resume(saver: Checkpointer, cfg, info: DistInfo, workers: int) -> Resume:
    """The checkpoint to resume from (train.resume), checked against this config and this size."""
    ckpt = saver.choose(cfg.train.resume)
    if ckpt is None:
        return Resume()
    saved = saver.check_config(ckpt, exact_keys(cfg))
    resplit = (saved["world_size"], saved["workers"]) != (info.world_size, workers)
    if resplit and not cfg.checkpoint.allow_resize:
        raise configlib.ConfigError([f"checkpoint {ckpt} was written by {saved['world_size']} rank(s) x "
                                     f"{saved['workers']} worker(s), this run has {info.world_size} x {workers}: "
                                     "set checkpoint.allow_resize=true to convert it"])
    world_changed = saved["world_size"] != info.world_size
    return Resume(ckpt, saved, world_changed, resplit, world_changed and saver.partitioned(ckpt), saver.source)


class _Checks:
    """A problem raised by a step: re-raised in a run; in a dry run recorded, and the step's result is None."""

    def __init__(self, dry: preflight.Preflight | None):
        self.dry = dry

    def __call__(self, fn: Callable, *args):
        if self.dry is None:
            return fn(*args)
        try:
            return fn(*args)
        except configlib.ConfigError as e:
            self.dry.problems += e.problems
        except (OSError, ValueError, CheckpointError) as e:
            self.dry.problems.append(str(e))
        return None

    def problems(self, problems: list[str], source: str) -> None:
        if self.dry is not None:
            self.dry.problems += problems
        elif problems:
            raise configlib.ConfigError(problems, source)


def log0(info: DistInfo):
    """print() on rank 0 only."""
    def log(msg: str) -> None:
        if info.is_main:
            print(msg, flush=True)
    return log



