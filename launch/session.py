"""Run orchestration shared by pretraining and fine-tuning: config -> engine -> (resume) -> Trainer."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from launch import configlib, dist
from launch.checkpoint import DS_TAG
from launch.config import batch_arithmetic
from launch.engine import build_engine, fill_ds_config, load_ds_json, resolve_precision, schedule, zero_stage
from launch.loop import Trainer, TrainState
from launch.metrics import MetricsLog, peak_flops
from launch.run import StopFlag, exact_keys, redact, write_config
from launch.saver import Checkpointer


@dataclass
class Session:
    cfg: object
    info: dist.DistInfo
    accum: int
    precision: str
    ds_config: dict
    saver: Checkpointer
    resume_from: Path | None
    saved: dict | None  # trainer.json of the checkpoint we resume from
    resized: bool  # resuming with another world size / worker count

    @property
    def start_step(self) -> int:
        return self.saved["state"]["step"] if self.saved else 0


def log0(info: dist.DistInfo):
    def log(msg: str) -> None:
        if info.is_main:
            print(msg, flush=True)
    return log


def plan(cfg, info: dist.DistInfo, workers: int, hidden_size: int | None = None) -> Session:
    """Everything decided before the engine exists: batch arithmetic, DeepSpeed JSON, what to resume."""
    accum, problems = batch_arithmetic(cfg.train, info.world_size)
    precision = resolve_precision(cfg.train.precision)
    ds, more = fill_ds_config(load_ds_json(cfg.deepspeed.config), micro=cfg.train.micro_batch_size,
                              accum=max(accum, 1), world=info.world_size, precision=precision,
                              lr=cfg.train.lr, betas=cfg.train.adam_betas, eps=cfg.train.adam_eps,
                              weight_decay=cfg.train.weight_decay, grad_clip=cfg.train.grad_clip,
                              source=f"deepspeed.config {cfg.deepspeed.config}")
    fill_zero_auto(ds, hidden_size)
    problems += more
    if problems:
        raise configlib.ConfigError(problems, "run config vs DeepSpeed config")
    saver = Checkpointer(cfg.output_dir, info, cfg.checkpoint.keep_last, log0(info))
    ckpt = saver.choose(cfg.train.resume)
    saved = resized = None
    if ckpt is not None:
        saved = saver.check_config(ckpt, exact_keys(cfg))
        resized = (saved["world_size"], saved["workers"]) != (info.world_size, workers)
        if resized and not cfg.checkpoint.allow_resize:
            raise configlib.ConfigError([f"checkpoint {ckpt} was written by {saved['world_size']} rank(s) x "
                                         f"{saved['workers']} worker(s), this run has {info.world_size} x "
                                         f"{workers}: set checkpoint.allow_resize=true to convert it"])
        if resized and saved["world_size"] != info.world_size and partitioned(ckpt):
            saver.to_universal(ckpt)  # ZeRO partitions are per rank: re-split them via the universal format
            ds["checkpoint"] = {"load_universal": True}
    return Session(cfg, info, accum, precision, ds, saver, ckpt, saved, bool(resized))


def partitioned(ckpt: Path) -> bool:
    """Does the checkpoint hold per-rank optimizer partitions? (Stage 0 in fp32 keeps one whole state.)"""
    return any((ckpt / "ds" / DS_TAG).glob("*optim_states.pt"))


def fill_zero_auto(ds: dict, hidden: int | None) -> None:
    """ZeRO-3 bucket sizes left as "auto": the usual hidden-size based values (as HF's Trainer does)."""
    zero = ds.get("zero_optimization", {})
    h = hidden or 768
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value


def start(s: Session, module, task, tracker=None, meta_writer=None) -> Trainer:
    """Build the DeepSpeed engine, restore the checkpoint if any, and return a ready Trainer."""
    cfg, info = s.cfg, s.info
    engine, _, _ = build_engine(module, s.ds_config, cfg.train.weight_decay,
                                schedule(cfg.train.schedule, cfg.train.warmup_steps, task.total_steps))
    state = TrainState()
    if s.resume_from is not None:
        universal = s.ds_config.get("checkpoint", {}).get("load_universal", False)
        s.saver.restore(engine, s.resume_from, universal, same_ranks=s.saved["world_size"] == info.world_size)
        state = TrainState(**s.saved["state"])
        if state.best_step is not None:
            s.saver.protected = {state.best_step}
        log0(info)(f"resumed from {s.resume_from} at step {state.step}"
                   + (f" (resized from {s.saved['world_size']} rank(s) x {s.saved['workers']} worker(s))"
                      if s.resized else ""))
    if info.is_main:
        write_config(cfg, cfg.output_dir)
    s.saver.meta_writer = meta_writer if info.is_main else None
    metrics = MetricsLog(cfg.output_dir, info.is_main, task.total_steps, state.step,
                         progress=cfg.log.progress, tracker=tracker)
    extra = {"world_size": info.world_size, "exact": exact_keys(cfg), "zero_stage": zero_stage(s.ds_config),
             "precision": s.precision, "command": redact(list(sys.argv)),
             "wandb_id": tracker.run_id if tracker else (s.saved or {}).get("wandb_id")}
    if tracker is not None and s.saved:
        from launch.tracking import resume_tracker

        resume_tracker(tracker, cfg.output_dir, state.step, metrics.previous_max_step)
    return Trainer(cfg=cfg, info=info, engine=engine, task=task, state=state, accum=s.accum, metrics=metrics,
                   saver=s.saver, stop_flag=StopFlag(), trainer_extra=extra,
                   peak_flops=peak_flops(s.precision, cfg.log.peak_tflops))

