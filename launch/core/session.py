"""Run set-up shared by every task: the plan, what to resume, the DeepSpeed engine, a ready Trainer."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from launch.core import configlib, dist
from launch.core.checkpoint import DS_TAG, Checkpointer, exact_keys
from launch.core.engine import build_engine, zero_stage
from launch.core.loop import Trainer, TrainState
from launch.core.metrics import MetricsLog, peak_flops
from launch.core.plan import Plan
from launch.core.schedule import lr_scheduler
from launch.core.secrets import redact, write_config
from launch.core.seeding import StopFlag
from launch.core.task import Task


@dataclass
class Session:
    cfg: object
    info: dist.DistInfo
    plan: Plan
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


def open_session(cfg, info: dist.DistInfo, p: Plan, workers: int) -> Session:
    """Pick the checkpoint to resume from (if any), check it fits this config and size, and convert a
    ZeRO checkpoint to the universal format when the world size changed."""
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
            p.ds_config["checkpoint"] = {"load_universal": True}
    return Session(cfg, info, p, saver, ckpt, saved, bool(resized))


def partitioned(ckpt: Path) -> bool:
    """Does the checkpoint hold per-rank optimizer partitions? (Stage 0 in fp32 keeps one whole state.)"""
    return any((ckpt / "ds" / DS_TAG).glob("*optim_states.pt"))


def start(s: Session, module, task: Task, tracker=None, meta_writer=None) -> Trainer:
    """Build the DeepSpeed engine, restore the checkpoint if any, and return a ready Trainer."""
    cfg, info, p = s.cfg, s.info, s.plan
    engine, _, _ = build_engine(module, p.ds_config, cfg.train.weight_decay, lr_scheduler(p.schedule))
    state = TrainState()
    if s.resume_from is not None:
        universal = p.ds_config.get("checkpoint", {}).get("load_universal", False)
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
    metrics = MetricsLog(cfg.output_dir, info.is_main, p.total_steps, state.step,
                         progress=cfg.log.progress, tracker=tracker)
    extra = {"world_size": info.world_size, "exact": exact_keys(cfg), "zero_stage": zero_stage(p.ds_config),
             "precision": p.precision, "command": redact(list(sys.argv)),
             "wandb_id": tracker.run_id if tracker else (s.saved or {}).get("wandb_id")}
    if tracker is not None and s.saved:
        from launch.core.tracking import resume_tracker

        resume_tracker(tracker, cfg.output_dir, state.step, metrics.previous_max_step)
    return Trainer(cfg=cfg, info=info, engine=engine, task=task, state=state, phases=p.phases, schedule=p.schedule,
                   metrics=metrics, saver=s.saver, stop_flag=StopFlag(), trainer_extra=extra,
                   peak_flops=peak_flops(p.precision, cfg.log.peak_tflops))
