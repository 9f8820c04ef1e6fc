"""The GLUE suite: config -> the (task, seed) runs -> each an ordinary fine-tuning run (launch/core/assemble.py)
-> results table, glue_results.json and the submission folder. Exit code: 0 when every run finished, else the
first failed run's code (glue_results.* are written either way); 75 when stopped for requeue."""

from __future__ import annotations

from pathlib import Path

from bertlaunch.core import configlib, dist
from bertlaunch.core.assemble import assemble, log0
from bertlaunch.core.assemble import plan_problems as assemble_plan_problems
from bertlaunch.core.exits import EXIT_REQUEUE
from bertlaunch.core.preflight import Preflight
from bertlaunch.core.secrets import write_config
from bertlaunch.tasks.classify.spec import FINETUNE
from bertlaunch.tasks.glue import results, runner, suite
from bertlaunch.tasks.glue.config import GlueConfig
from bertlaunch.tasks.glue.finetune import finetune_config


def run(cfg: GlueConfig, info: dist.DistInfo) -> int:
    log = log0(info)
    every = suite.runs(cfg)
    todo = every
    if cfg.glue.run_index is not None:
        if not 0 <= cfg.glue.run_index < len(every):
            raise configlib.ConfigError([f"glue.run_index={cfg.glue.run_index}: this suite has {len(every)} runs "
                                         f"(0..{len(every) - 1}); see --dry-run for the list"])
        todo = [every[cfg.glue.run_index]]
    slots, gpus = runner.slots_for(cfg, info)
    if info.is_main:
        write_config(cfg, cfg.output_dir)
    log(f"glue: {len(todo)} run(s), {slots} at a time: " + ", ".join(r.name for r in todo))
    outcomes = (runner.sequential(cfg, todo, info, log) if slots == 1 else
                runner.parallel(cfg, todo, slots, gpus, log))
    if any(o.code == EXIT_REQUEUE for o in outcomes.values()):
        log("glue: stopped for requeue; rerun the same command to resume")
        return EXIT_REQUEUE
    if info.is_main and cfg.glue.run_index is None:
        ref = results.reference_for(cfg.glue.reference, cfg.model.pretrained)
        res = results.write(every, outcomes, Path(cfg.output_dir), ref, cfg.model.pretrained or cfg.model.preset)
        print((Path(cfg.output_dir) / "glue_results.md").read_text(), flush=True)
        log(f"glue: submission files {', '.join(res['submission']) or 'none (no test sets)'} in "
            f"{Path(cfg.output_dir) / 'submission'} and submission.zip")
    failed = [o.code for o in outcomes.values() if o.code]
    return failed[0] if failed else 0


def plan_problems(cfg: GlueConfig, world_size: int) -> list[str]:
    """Every task's batch plan at this world size (its fine-tuning config with its overrides); a problem that
    several tasks share is listed once, with their names."""
    tasks: dict[str, list[str]] = {}
    for r in suite.runs(cfg)[::max(len(cfg.glue.seeds), 1)]:
        try:
            for p in assemble_plan_problems(FINETUNE, finetune_config(cfg, r, False), world_size):
                tasks.setdefault(p, []).append(r.task.name)
        except configlib.ConfigError:
            pass  # the config check lists it
    return [f"{', '.join(names)}: {p}" for p, names in tasks.items()]


def dry_run(cfg: GlueConfig, info: dist.DistInfo) -> int:
    """The list of runs, then each task's fine-tuning dry run (its first seed), through the same assembly as
    the run: files, columns, labels, plan, model and one batch; every problem at once."""
    dry = Preflight()
    every = suite.runs(cfg)
    try:
        slots, _ = runner.slots_for(cfg, info)
    except configlib.ConfigError as e:
        dry.problems += e.problems
        slots = 1
    seeds = max(len(cfg.glue.seeds), 1)
    print(f"glue          {len(every)} run(s) = {len(every) // seeds} task(s) x seeds {cfg.glue.seeds}; {slots} at a "
          f"time; world size {info.world_size} ({info.launcher})")
    print(f"model         {cfg.model.pretrained or cfg.model.preset}"
          + (f"; {', '.join(cfg.glue.from_mnli)} start from MNLI's model" if cfg.glue.from_mnli else ""))
    for i, r in enumerate(every):
        print(f"run {i:<9d} {r.name:22s} {'finished' if r.finished() else 'to run':9s} {r.out}")
    for r in every[::seeds]:
        labels = "regression (a score)" if r.task.labels is None else "labels " + "/".join(r.task.labels)
        print(f"\n{r.task.name:13s} {labels}; metrics {', '.join(r.task.metrics)}")
        try:
            ft = finetune_config(cfg, r)
        except configlib.ConfigError as e:
            dry.problems += e.problems
            continue
        if r.after_mnli:  # MNLI's model does not exist before the suite has run
            print(f"starts from   {ft.model.pretrained} (made by this suite)")
            continue
        task_dry = Preflight()
        assemble(FINETUNE, ft, info, task_dry)
        dry.problems += [f"{r.task.name}: {p}" for p in task_dry.problems]
    return dry.finish()
