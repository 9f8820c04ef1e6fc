"""Fault injection for the tests, installed through launch/core/hooks.py (production code never reads these):

  BERTLAUNCH_NAN_AT_STEP=k                      step k's loss is NaN
  BERTLAUNCH_HANG_AT_STEP=k BERTLAUNCH_HANG_RANK=r   rank r hangs in step k
  BERTLAUNCH_FAIL_SAVE_AT=k                     the checkpoint of step k fails with ENOSPC
  BERTLAUNCH_KILL_IN_SAVE_AT=k                  the job is SIGKILLed while writing the checkpoint of step k
  BERTLAUNCH_SLOW_EXPORT_S=s                    every export takes s seconds longer (a BERT-large export)
  BERTLAUNCH_SLOW_UPLOAD_S=s                    every checkpoint file takes s seconds longer to upload (a slow network)
  BERTLAUNCH_SLOW_STEP_S=s                      every micro-batch takes s seconds longer (time to signal a run)

`install_from_env()` is called by the in-process runs (tests/conftest.py `inproc`), the forked ones
(tests/zygote.py) and, through tests/hookpath/sitecustomize.py on PYTHONPATH, by real entry scripts (srun).
"""

from __future__ import annotations

import os
import signal
import time

VARIABLES = ("BERTLAUNCH_NAN_AT_STEP", "BERTLAUNCH_HANG_AT_STEP", "BERTLAUNCH_HANG_RANK", "BERTLAUNCH_FAIL_SAVE_AT",
             "BERTLAUNCH_KILL_IN_SAVE_AT", "BERTLAUNCH_SLOW_EXPORT_S",
             "BERTLAUNCH_SLOW_UPLOAD_S", "BERTLAUNCH_SLOW_STEP_S")


class EnvFaults:
    def __init__(self, env):
        self.nan_at = int(env.get("BERTLAUNCH_NAN_AT_STEP", 0))
        self.hang_at = int(env.get("BERTLAUNCH_HANG_AT_STEP", 0))
        self.hang_rank = int(env.get("BERTLAUNCH_HANG_RANK", -1))
        self.fail_save_at = int(env.get("BERTLAUNCH_FAIL_SAVE_AT", 0))
        self.kill_save_at = int(env.get("BERTLAUNCH_KILL_IN_SAVE_AT", 0))
        self.slow_export_s = float(env.get("BERTLAUNCH_SLOW_EXPORT_S", 0))
        self.slow_upload_s = float(env.get("BERTLAUNCH_SLOW_UPLOAD_S", 0))
        self.slow_step_s = float(env.get("BERTLAUNCH_SLOW_STEP_S", 0))

    def loss(self, step, rank, loss):
        if self.slow_step_s:
            time.sleep(self.slow_step_s)
        if self.hang_at and step == self.hang_at and rank == self.hang_rank:
            time.sleep(1 << 20)
        if self.nan_at and step == self.nan_at:
            return loss * float("nan")
        return loss

    def saving(self, step):
        if step == self.fail_save_at:
            raise OSError(28, "No space left on device (injected by BERTLAUNCH_FAIL_SAVE_AT)")
        if step == self.kill_save_at:
            os.killpg(os.getpgrp(), signal.SIGKILL)

    def exporting(self):
        time.sleep(self.slow_export_s)

    def uploading(self, name):
        time.sleep(self.slow_upload_s)


def install_from_env(env=None) -> None:
    """Install EnvFaults when any of the variables is set, else remove any hooks."""
    from bertlaunch.core import hooks

    env = os.environ if env is None else env
    hooks.install(EnvFaults(env) if any(env.get(k) for k in VARIABLES) else None)
