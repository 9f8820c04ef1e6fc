"""What the training loop watches besides the loss: a profiler window, loss spikes, and fault injection
for the tests (inert unless its environment variables are set)."""

from __future__ import annotations

import math
import os
import time

import torch


class Profiler:
    """torch.profiler over steps 11-15 (after warm-up and compilation): a table and a Chrome trace."""

    def __init__(self, output_dir: str, is_main: bool, first: int = 11, last: int = 15):
        self.dir, self.is_main, self.first, self.last, self.prof = output_dir, is_main, first, last, None

    def step(self, step: int) -> None:
        from torch.profiler import ProfilerActivity, profile

        if step == self.first - 1:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        elif step == self.last and self.prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            if self.is_main:
                from pathlib import Path

                key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                table = self.prof.key_averages().table(sort_by=key, row_limit=40)
                (Path(self.dir) / "profile.txt").write_text(table)
                self.prof.export_chrome_trace(str(Path(self.dir) / "profile_trace.json"))
            self.prof = None


class SpikeDetector:
    """Warns when a logged loss jumps far above its recent exponential mean (a sign of divergence)."""

    def __init__(self, alpha: float = 0.1, sigmas: float = 4.0, warmup: int = 5):
        self.alpha, self.sigmas, self.warmup = alpha, sigmas, warmup
        self.mean, self.var, self.n = 0.0, 0.0, 0

    def is_spike(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        spike = self.n >= self.warmup and loss > self.mean + self.sigmas * math.sqrt(self.var) and \
            loss > 1.2 * self.mean
        if not spike:  # spikes do not pollute the running statistics
            d = loss - self.mean if self.n else 0.0
            self.mean = loss if not self.n else self.mean + self.alpha * d
            self.var = (1 - self.alpha) * (self.var + self.alpha * d * d)
            self.n += 1
        return spike


class FaultInjection:
    """Test hooks, inert unless set: BERTLAUNCH_NAN_AT_STEP=k makes step k's loss NaN;
    BERTLAUNCH_HANG_AT_STEP=k with BERTLAUNCH_HANG_RANK=r makes rank r hang at step k."""

    def __init__(self, rank: int, next_step):
        self.rank, self.next_step = rank, next_step
        self.nan_at = int(os.environ.get("BERTLAUNCH_NAN_AT_STEP", 0))
        self.hang_at = int(os.environ.get("BERTLAUNCH_HANG_AT_STEP", 0))
        self.hang_rank = int(os.environ.get("BERTLAUNCH_HANG_RANK", -1))

    def __call__(self, loss):
        step = self.next_step()
        if self.hang_at and step == self.hang_at and self.rank == self.hang_rank:
            time.sleep(1 << 20)
        if self.nan_at and step == self.nan_at:
            return loss * float("nan")
        return loss
