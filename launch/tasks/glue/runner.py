"""Running the suite's fine-tuning runs: one after another in this process (on a CPU, or on all ranks of a
multi-rank launch together), or as child processes side by side, one per GPU (`glue.parallel`).

A run that fails is recorded with its reason and the suite goes on. A stop for requeue (SIGTERM/SIGUSR1)
stops the suite: the interrupted runs have checkpointed, and the same command resumes them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from bertlaunch.core import configlib, dist
from bertlaunch.core.assemble import assemble
from bertlaunch.core.checkpoint import CheckpointError
from bertlaunch.core.exits import EXIT_CONFIG, EXIT_REQUEUE
from bertlaunch.core.layout import FINAL
from bertlaunch.tasks.classify.spec import FINETUNE
from bertlaunch.tasks.glue.config import GlueConfig
from bertlaunch.tasks.glue.finetune import Run, finetune_config, finetune_dict
from bertlaunch.tasks.glue.suite import stale


@dataclass
class Outcome:
    code: int  # 0: trained (or already finished); else the run's exit code
    message: str = ""  # why it failed
    skipped: bool = False  # finished before this call


def prepare(cfg: GlueConfig, run: Run, done: dict[str, Outcome]) -> Outcome | None:
    """None when the run should train now; else its outcome without training (finished, or cannot run)."""
    if run.after_mnli and not run.finished():
        mnli = done.get(f"MNLI/seed_{run.seed}")
        if mnli is not None and mnli.code != 0:
            return Outcome(EXIT_CONFIG, f"starts from MNLI seed {run.seed}, which failed")
        if not (run.out.parent.parent / "MNLI" / f"seed_{run.seed}" / FINAL).is_dir():
            return Outcome(EXIT_CONFIG, f"starts from MNLI seed {run.seed}'s model, which does not exist yet (a job "
                                        "array's final plain run trains it once MNLI has finished)")
    try:
        ft = finetune_config(cfg, run)
    except (ValueError, OSError) as e:
        return Outcome(EXIT_CONFIG, reason(e))
    if run.finished():
        changes = stale(run, ft)
        if changes:
            return Outcome(EXIT_CONFIG, f"{run.out} finished with another config ({'; '.join(changes)}): delete "
                                        "that folder or use a new output_dir")
        return Outcome(0, skipped=True)
    return None


def sequential(cfg: GlueConfig, todo: list[Run], info: dist.DistInfo, log) -> dict[str, Outcome]:
    """Each run in this process, with every rank of the launch (the process group stays up in between)."""
    done: dict[str, Outcome] = {}
    for run in todo:
        outcome = prepare(cfg, run, done)
        if outcome is None:
            log(f"glue: {run.name} -> {run.out}")
            try:
                code = assemble(FINETUNE, finetune_config(cfg, run), info).fit()
                outcome = Outcome(code, "" if code == 0 else f"exit code {code}")
            except (ValueError, OSError, CheckpointError) as e:  # bad input or config (DataError, ConfigError, ...)
                outcome = Outcome(EXIT_CONFIG, reason(e))
            except Exception as e:  # noqa: BLE001 - one failed task must not end the suite
                traceback.print_exc()
                outcome = Outcome(1, f"{type(e).__name__}: {e}")
        done[run.name] = outcome
        report(log, run, outcome)
        if outcome.code == EXIT_REQUEUE:
            break
    return done


def parallel(cfg: GlueConfig, todo: list[Run], slots: int, gpus: bool, log) -> dict[str, Outcome]:
    """Up to `slots` runs at once, each a one-rank `launch/finetune.py` with a GPU of its own (when `gpus`);
    its output goes to <run>/glue.log. SIGTERM/SIGUSR1 is passed on to every running child."""
    done: dict[str, Outcome] = {}
    pending, running = list(todo), {}  # slot -> (run, Popen)
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)
        for _, proc in running.values():
            proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while pending or running:
            for slot in [s for s in range(slots) if s not in running]:
                run = next((r for r in pending if not stopping and ready(r, done)), None)
                if run is None:
                    break
                pending.remove(run)
                outcome = prepare(cfg, run, done)
                if outcome is not None:
                    done[run.name] = outcome
                    report(log, run, outcome)
                    continue
                running[slot] = (run, start_child(cfg, run, slot if gpus else None))
                log(f"glue: {run.name} started (slot {slot}) -> {run.out}/glue.log")
            for slot, (run, proc) in list(running.items()):
                if proc.poll() is not None:
                    del running[slot]
                    done[run.name] = Outcome(proc.returncode, "" if proc.returncode == 0 else
                                             f"exit code {proc.returncode}: {last_error(run.out / 'glue.log')}")
                    report(log, run, done[run.name])
                    if proc.returncode == EXIT_REQUEUE:  # stopped by a signal we did not see: stop the suite too
                        stopping.append(signal.SIGTERM)
            if stopping and not running:
                break
            time.sleep(0.2)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if stopping:
        for run in pending:
            done.setdefault(run.name, Outcome(EXIT_REQUEUE, "not started: the suite was stopped"))
    return done


def report(log, run: Run, outcome: Outcome) -> None:
    log(f"glue: {run.name}: " + ("finished earlier, skipped" if outcome.skipped else
                                 "done" if outcome.code == 0 else f"FAILED ({outcome.message})"))


def reason(e: Exception) -> str:
    """One line for the results table: a ConfigError's problems joined, else the message."""
    return "; ".join(e.problems) if isinstance(e, configlib.ConfigError) else str(e)


def ready(run: Run, done: dict[str, Outcome]) -> bool:
    """A run that starts from MNLI's model waits for that MNLI run to end."""
    return not run.after_mnli or f"MNLI/seed_{run.seed}" in done


def start_child(cfg: GlueConfig, run: Run, gpu: int | None) -> subprocess.Popen:
    run.out.mkdir(parents=True, exist_ok=True)
    config = run.out / "glue_run.yaml"
    config.write_text(yaml.safe_dump(finetune_dict(cfg, run), sort_keys=False))
    log = open(run.out / "glue.log", "a")
    cmd = [sys.executable, "-m", "bertlaunch", "finetune", "--config", str(config)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dist.standalone_env(gpu), cwd=Path.cwd())


def last_error(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def slots_for(cfg: GlueConfig, info: dist.DistInfo) -> tuple[int, bool]:
    """(runs at once, one GPU each?). Several ranks already share each run, so they go one at a time."""
    gpus = dist.gpu_count()
    if info.world_size > 1:
        return 1, False
    n = cfg.glue.parallel if cfg.glue.parallel != "auto" else max(gpus, 1)
    if gpus and n > gpus:
        raise configlib.ConfigError([f"glue.parallel={n} but only {gpus} GPU(s) are visible: one run per GPU"])
    return n, bool(gpus)

