"""The GLUE suite's runs: one ordinary fine-tuning config per (task, seed), in the order they run.

A run is finished when its output_dir has eval_results.json (written last, by rank 0) from the same config;
an unfinished one resumes exactly from its checkpoints (fine-tuning's own resume).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from data.glue import TASKS, GlueTask, lookup, present
from launch.core import configlib
from launch.core.checkpoint import config_changes, exact_keys
from launch.tasks.classify.config import FinetuneConfig
from launch.tasks.glue.config import GlueConfig

SHARED = ("tokenizer", "model", "train", "deepspeed", "eval", "log", "checkpoint")


@dataclass
class Run:
    task: GlueTask
    seed: int
    out: Path  # the run's fine-tuning output_dir
    train_rows: int  # training examples (after glue.max_train_examples); 0 when unknown (hub)
    after_mnli: bool  # starts from MNLI's model of the same seed

    @property
    def name(self) -> str:
        return f"{self.task.name}/seed_{self.seed}"

    def finished(self) -> bool:
        return (self.out / "eval_results.json").is_file()


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


def _task_section(cfg: GlueConfig, task: GlueTask) -> dict:
    g = cfg.glue
    common = {"label": task.label, "max_length": g.max_length, "max_train_examples": g.max_train_examples,
              "problem": "regression" if task.labels is None else "classification"}
    if g.dataset:  # hub: ClassLabel ids 0..K-1 are GLUE's label order (data/glue.py)
        return common | {
            "dataset": g.dataset, "dataset_config": task.hub_config, "train_split": task.train.hub,
            "eval_split": task.dev.hub, "test_split": task.test.hub, "label": "label",
            "text_a": task.hub_columns[0], "text_b": task.hub_columns[1],
            "labels": [str(i) for i in range(len(task.labels))] if task.labels else None,
            "extra_eval": {n: s.hub for n, s in task.extra_dev.items()},
            "extra_test": {n: s.hub for n, (s, _) in task.extra_test.items()}}
    d = task.folder(g.data_dir)
    tests = task.test_files(g.data_dir)
    return common | {
        "train_file": str(d / task.train.file), "eval_file": str(d / task.dev.file), "test_file": (
            str(tests[""]) if "" in tests else None), "text_a": task.text_a, "text_b": task.text_b,
        "labels": list(task.labels) if task.labels else None, "columns": list(task.columns) if task.columns else None,
        "extra_eval": {n: str(d / s.file) for n, s in task.extra_dev.items()},
        "extra_test": {n: str(p) for n, p in tests.items() if n}}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k) or {}, v) if isinstance(v, dict) and isinstance(base.get(k), dict | None) \
            else v
    return base


def finetune_dict(cfg: GlueConfig, run: Run) -> dict:
    """The run's fine-tuning config as plain data: shared sections, the task's tables and columns, the
    seed, the task's own defaults (data/glue.py), then glue.overrides.<task> on top."""
    d = configlib.to_dict(cfg)
    ft = {k: copy.deepcopy(d[k]) for k in SHARED} | {"output_dir": str(run.out), "task": _task_section(cfg, run.task)}
    ft["train"]["seed"] = run.seed
    ft["eval"]["metric"] = run.task.metrics[0]
    wandb = ft["log"]["wandb"]
    wandb["name"] = f"{wandb['name'] or Path(cfg.output_dir).name}-{run.task.name}-seed{run.seed}"
    wandb["tags"] = list(wandb["tags"]) + ["glue", run.task.name]
    if run.after_mnli:
        ft["model"] = {**ft["model"], "preset": None,
                       "pretrained": str(Path(cfg.output_dir) / "MNLI" / f"seed_{run.seed}" / "final")}
    over = next((v for k, v in cfg.glue.overrides.items() if lookup(k) is run.task), {})
    return _merge(_merge(ft, copy.deepcopy(run.task.defaults)), copy.deepcopy(over))


def finetune_config(cfg: GlueConfig, run: Run, validate: bool = True) -> FinetuneConfig:
    """The run's typed fine-tuning config; ConfigError lists every problem (an override key that does not
    exist, a missing file...)."""
    folder = run.task.folder(cfg.glue.data_dir) if cfg.glue.data_dir else None
    if validate and folder is not None and not folder.is_dir():
        raise configlib.ConfigError([f"{run.task.name}: no folder {folder} in glue.data_dir (put GLUE's "
                                     f"{run.task.name}/ there, or leave {run.task.name} out of glue.tasks)"],
                                    f"glue run {run.name}")
    data = finetune_dict(cfg, run)
    ft = configlib.from_dict(FinetuneConfig, data, f"glue run {run.name}")
    problems = ft.validate() if validate else []
    if run.after_mnli:  # MNLI's model is made by this suite: it does not exist yet at the start
        problems = [p for p in problems if not p.startswith("model.pretrained")]
    if problems:
        raise configlib.ConfigError(problems, f"glue run {run.name}")
    return ft


def override_problems(cfg: GlueConfig) -> list[str]:
    """Problems of glue.overrides that only a built fine-tuning config shows (unknown or mistyped keys)."""
    out = []
    for name in cfg.glue.overrides:
        task = lookup(str(name))
        if task is None:
            continue
        run = Run(task, cfg.glue.seeds[0] if cfg.glue.seeds else 0, Path(cfg.output_dir), 0, False)
        try:
            finetune_config(cfg, run, validate=False)
        except configlib.ConfigError as e:
            out += [f"glue.overrides.{name}: {p}" for p in e.problems]
    return out


def stale(run: Run, ft: FinetuneConfig) -> list[str]:
    """How a finished run's saved config differs from the one this suite would run now (empty: same)."""
    saved = run.out / "config.yaml"
    if not saved.is_file():
        return []
    old = configlib.from_dict(FinetuneConfig, yaml.safe_load(saved.read_text()) or {}, str(saved))
    return config_changes(exact_keys(old), exact_keys(ft))
