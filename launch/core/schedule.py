"""Learning-rate schedules: the lr multiplier as a function of the optimizer step (or, with a time budget, of
the fraction of the budget used). One formula per schedule, so the run, the dry run and `bertlaunch report`
(which plots it) cannot disagree.

    linear        warmup, then straight down to the floor at the last step
    cosine        warmup, then half a cosine down to the floor
    constant      warmup, then flat
    wsd           warmup, stable (flat) until the last `decay_ratio` of the run, then linear down to the floor
    inverse_sqrt  warmup, then sqrt(warmup / step), never below the floor

The floor is `min_ratio` x the peak lr (train.min_lr_ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("linear", "cosine", "constant", "wsd", "inverse_sqrt")


@dataclass(frozen=True)
class Schedule:
    kind: str
    warmup: int  # optimizer steps of linear warmup from 0
    total: int  # optimizer steps of the whole run
    min_ratio: float = 0.0  # floor, as a fraction of the peak lr
    decay_ratio: float = 0.2  # wsd: the final fraction of the run that decays

    def __call__(self, step: float) -> float:
        """The lr multiplier for the update at optimizer step `step` (0-based, as torch's LambdaLR counts)."""
        if step < self.warmup:
            return step / max(1, self.warmup)
        return self.after_warmup(step)

    def after_warmup(self, step: float) -> float:
        floor = self.min_ratio
        if self.kind == "constant":
            return 1.0
        if self.kind == "inverse_sqrt":
            return max(floor, math.sqrt(max(self.warmup, 1) / max(step, 1)))
        if self.kind == "wsd":
            start = self.total - int(round(self.decay_ratio * self.total))
            if step < start:
                return 1.0
            progress = min(1.0, (step - start) / max(1, self.total - start))
            return floor + (1.0 - floor) * (1.0 - progress)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = (1.0 - progress) if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * shape

    def at_fraction(self, fraction: float) -> float:
        """The post-warmup curve when `fraction` of the run is done (position fraction x total, never before the
        end of warmup): what a time budget follows once its warmup steps are over."""
        return self.after_warmup(max(min(max(fraction, 0.0), 1.0) * self.total, self.warmup))


class TimedSchedule:
    """train.time_budget_h (academic-budget-bert's time-based schedule): warmup over the first `warmup` steps,
    then the schedule's curve at the fraction of the time budget used, which the trainer sets after every step
    from the elapsed training time of all attempts (the same value on every rank)."""

    def __init__(self, schedule: Schedule):
        self.schedule, self.fraction = schedule, 0.0

    def __call__(self, step: float) -> float:
        if step < self.schedule.warmup:
            return self.schedule(step)
        return self.schedule.at_fraction(self.fraction)


def lr_scheduler(schedule: Schedule | TimedSchedule):
    """Callable optimizer -> torch LambdaLR following `schedule` (DeepSpeed steps it once per optimizer step;
    its state is the step count, saved and restored with the checkpoint)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
