"""The GLUE suite's runs, one per (task, seed), in the order they run (launch/tasks/glue/finetune.py makes each
an ordinary fine-tuning config).

A run is finished when its output_dir has eval_results.json (written last, by rank 0) from the same config;
an unfinished one resumes exactly from its checkpoints (fine-tuning's own resume).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from bertlaunch.core import configlib
from bertlaunch.core.checkpoint import config_changes, exact_keys
from bertlaunch.core.layout import RunDir
from bertlaunch.data.tables.glue import TASKS, GlueTask, lookup, present
from bertlaunch.tasks.classify.config import FinetuneConfig
from bertlaunch.tasks.glue.config import GlueConfig
from bertlaunch.tasks.glue.finetune import Run


def selected(cfg: GlueConfig) -> list[GlueTask]:
    """The tasks to run, in GLUE's order; MNLI is added when glue.from_mnli needs it."""
    g = cfg.glue
    if g.tasks:
        names = {lookup(n).name for n in g.tasks}
    else:
        names = {t.name for t in present(g.data_dir)} if g.data_dir else set(TASKS)
    if g.from_mnli:
        names.add("MNLI")
    return [t for t in TASKS.values() if t.name in names]


def count_rows(task: GlueTask, cfg: GlueConfig) -> int:
    """Training rows of a glue_data task (data lines: a header-less file counts every line)."""
    if not cfg.glue.data_dir:
        return 0
    path = task.folder(cfg.glue.data_dir) / task.train.file
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip()) - (0 if task.columns else 1)
    return min(n, cfg.glue.max_train_examples or n)


def runs(cfg: GlueConfig) -> list[Run]:
    """Every (task, seed), largest task first (the long runs start early when runs go in parallel); MNLI
    before the tasks that start from it."""
    from_mnli = {lookup(n).name for n in cfg.glue.from_mnli}
    out = Path(cfg.output_dir)
    tasks = sorted(selected(cfg), key=lambda t: (t.name in from_mnli, -count_rows(t, cfg)))
    return [Run(t, s, out / t.name / f"seed_{s}", count_rows(t, cfg), t.name in from_mnli)
            for t in tasks for s in cfg.glue.seeds]


def stale(run: Run, ft: FinetuneConfig) -> list[str]:
    """How a finished run's saved config differs from the one this suite would run now (empty: same)."""
    saved = RunDir(run.out).config
    if not saved.is_file():
        return []
    old = configlib.from_dict(FinetuneConfig, yaml.safe_load(saved.read_text()) or {}, str(saved))
    return config_changes(exact_keys(old), exact_keys(ft))
