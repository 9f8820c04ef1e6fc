"""log.profile: a torch.profiler window over a few steps of the run."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class Profiler:
    """torch.profiler over steps 11-15 (after warm-up and compilation): a table and a Chrome trace."""

    def __init__(self, output_dir: str, is_main: bool, first: int = 11, last: int = 15):
        self.dir, self.is_main, self.first, self.last, self.prof = output_dir, is_main, first, last, None

    def step(self, step: int) -> None:
        if step == self.first - 1:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        elif step == self.last and self.prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)
            if self.is_main:
                key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                table = self.prof.key_averages().table(sort_by=key, row_limit=40)
                (Path(self.dir) / "profile.txt").write_text(table)
                self.prof.export_chrome_trace(str(Path(self.dir) / "profile_trace.json"))
            self.prof = None
