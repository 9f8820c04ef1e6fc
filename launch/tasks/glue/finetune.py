"""One run of the GLUE suite, a (task, seed), as an ordinary fine-tuning config: the suite's shared sections,
the task's tables and columns from the official layout (or the hub), its seed, the task's own defaults
(data/tables/glue.py), then glue.overrides.<task> on top. `cfg` below is the suite's GlueConfig."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from bertlaunch.core import configlib
from bertlaunch.core.layout import FINAL, RunDir
from bertlaunch.data.tables.glue import GlueTask, lookup
from bertlaunch.tasks.classify.config import FinetuneConfig

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
        return RunDir(self.out).eval_results.is_file()


def _task_section(cfg, task: GlueTask) -> dict:
    g = cfg.glue
    common = {"label": task.label, "max_length": g.max_length, "max_train_examples": g.max_train_examples,
              "problem": "regression" if task.labels is None else "classification"}
    if g.dataset:  # hub: ClassLabel ids 0..K-1 are GLUE's label order (data/tables/glue.py)
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


def finetune_dict(cfg, run: Run) -> dict:
    """The run's fine-tuning config as plain data: shared sections, the task's tables and columns, the
    seed, the task's own defaults (data/tables/glue.py), then glue.overrides.<task> on top."""
    d = configlib.to_dict(cfg)
    ft = {k: copy.deepcopy(d[k]) for k in SHARED} | {"output_dir": str(run.out), "task": _task_section(cfg, run.task)}
    ft["train"]["seed"] = run.seed
    ft["eval"]["metric"] = run.task.metrics[0]
    if ft["checkpoint"]["remote"]:  # each run its own remote folder, as its own output_dir
        ft["checkpoint"]["remote"] = f"{ft['checkpoint']['remote'].rstrip('/')}/{run.task.name}/seed_{run.seed}"
    wandb = ft["log"]["wandb"]
    wandb["name"] = f"{wandb['name'] or Path(cfg.output_dir).name}-{run.task.name}-seed{run.seed}"
    wandb["tags"] = list(wandb["tags"]) + ["glue", run.task.name]
    if run.after_mnli:
        ft["model"] = {**ft["model"], "preset": None,
                       "pretrained": str(Path(cfg.output_dir) / "MNLI" / f"seed_{run.seed}" / FINAL)}
    over = next((v for k, v in cfg.glue.overrides.items() if lookup(k) is run.task), {})
    return _merge(_merge(ft, copy.deepcopy(run.task.defaults)), copy.deepcopy(over))


def finetune_config(cfg, run: Run, validate: bool = True) -> FinetuneConfig:
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


def override_problems(cfg) -> list[str]:
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
