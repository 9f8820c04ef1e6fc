"""wandb on rank 0 only, and never fatal: any wandb failure becomes one warning, metrics.jsonl goes on.

- mode auto: online when an API key is configured (WANDB_API_KEY or a wandb entry in ~/.netrc), else
  offline with a hint on syncing; disabled: no wandb import at all.
- The run id is stored in every checkpoint; a resumed (or SLURM-requeued) run continues the same wandb
  run (resume="allow"). Steps the killed attempt had already logged are not logged again: an exact
  resume reproduces them bit for bit, so the values already in wandb are the right ones.
- The config is logged with secret-looking keys and values removed (launch/run.py: redact).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from launch import configlib
from launch.run import redact


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class Tracker:
    def __init__(self, run, skip_until: int = 0):
        self.run, self.skip_until, self.failed = run, skip_until, False

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record: dict) -> None:
        if self.failed:
            return
        step = int(record.get("step", 0))
        if step <= self.skip_until:
            return
        try:
            self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
        except Exception as e:  # a tracking hiccup must not cost a training run
            self._fail(e)

    def finish(self) -> None:
        if self.failed:
            return
        try:
            self.run.finish()
        except Exception as e:
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        self.failed = True
        warnings.warn(f"wandb failed ({type(e).__name__}: {e}); training continues, metrics.jsonl is complete",
                      stacklevel=3)


def make_tracker(cfg, info, session) -> Tracker | None:
    """Rank 0 only. Returns None when disabled or when wandb cannot start."""
    w = cfg.log.wandb
    if w.mode == "disabled" or not info.is_main:
        return None
    mode = w.mode
    if mode == "auto":
        mode = "online" if api_key_configured() else "offline"
        if mode == "offline":
            print(f"wandb: no API key configured, logging offline to {cfg.output_dir}/wandb "
                  "(upload later with `wandb sync <run dir>`; log.wandb.mode=disabled turns it off)", flush=True)
    saved = session.saved or {}
    try:
        import wandb

        run_id = saved.get("wandb_id") or wandb.util.generate_id()
        # x_disable_meta: no command line / environment / host metadata in the run (they can hold secrets)
        run = wandb.init(project=w.project, entity=w.entity, name=redact(w.name or Path(cfg.output_dir).name),
                         tags=redact(list(w.tags)) or None, id=run_id, resume="allow", mode=mode,
                         dir=cfg.output_dir, config=redact(configlib.to_dict(cfg)),
                         settings=wandb.Settings(silent=True, x_disable_meta=True, save_code=False))
    except Exception as e:
        warnings.warn(f"wandb could not start ({type(e).__name__}: {e}); continuing without it", stacklevel=2)
        return None
    return Tracker(run)
