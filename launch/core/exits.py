"""Process exit codes (the README's table) and how a stop for requeue is reported to the launcher."""

from __future__ import annotations

import os
from pathlib import Path

EXIT_OK = 0
EXIT_CONFIG = 2  # bad config or input: nothing was trained
EXIT_NONFINITE = 3  # train.nan_policy=stop (or too many bad steps): last good state checkpointed
EXIT_HUNG = 4  # a rank hung or died (launch/core/watchdog.py names it)
EXIT_REQUEUE = 75  # SIGTERM/SIGUSR1: checkpoint saved, rerun the same command to resume (EX_TEMPFAIL)


def launcher_exit(code: int, is_main: bool) -> int:
    """The process exit code. Under slurm/run_steps.sh (BERTLAUNCH_REQUEUE_FILE set) a checkpoint-and-stop
    exits 0 and rank 0 leaves the file: srun --kill-on-bad-exit would otherwise kill the ranks still
    closing (wandb, files) as soon as the first one exits 75. Everywhere else: 75."""
    marker = os.environ.get("BERTLAUNCH_REQUEUE_FILE")
    if code != EXIT_REQUEUE or not marker:
        return code
    if is_main:
        Path(marker).write_text(f"{EXIT_REQUEUE}\n")
    return EXIT_OK
