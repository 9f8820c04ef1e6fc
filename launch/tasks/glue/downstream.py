"""The GLUE suite of a downstream job (a pretraining's eval.downstream.glue, launch/core/downstream.py): one task on
one export, as an ordinary GLUE suite config, run by launch/tools/downstream.py; and the problems of its settings,
reported with the pretraining config's own."""

from __future__ import annotations

import copy
from dataclasses import asdict

from bertlaunch.core import configlib
from bertlaunch.core.downstream import GlueJobsConfig
from bertlaunch.data.tables.glue import lookup
from bertlaunch.tasks.glue.config import GlueConfig

KEY = "eval.downstream.glue.suite"
SET_BY_JOB = {"": ("output_dir",), "model": ("pretrained", "preset"),
              "glue": ("data_dir", "dataset", "tasks", "seeds", "max_train_examples", "run_index")}
# the job's keys, reported by launch/core/downstream.py's own checks under their eval.downstream names
OWN_PROBLEMS = ("model.pretrained", "glue.data_dir", "glue.tasks", "set exactly one of glue.data_dir")


def suite_dict(glue: dict, task: str, model: str, out: str) -> dict:
    """The suite config of `task` on `model` as plain data: eval.downstream.glue.suite, then the job's own keys;
    wandb off and no progress bar unless the suite settings ask for them."""
    d = copy.deepcopy(glue.get("suite") or {})
    log = d.setdefault("log", {})
    if isinstance(log, dict):
        log.setdefault("progress", False)
        wandb = log.setdefault("wandb", {})
        if isinstance(wandb, dict):
            wandb.setdefault("mode", "disabled")
    d["output_dir"] = out
    d["model"] = {**(d.get("model") or {}), "pretrained": model, "preset": None}
    d["glue"] = {**(d.get("glue") or {}), "data_dir": glue["data_dir"], "tasks": [task], "seeds": glue["seeds"],
                 "max_train_examples": glue["max_train_examples"]}
    return d


def suite_config(glue: dict, task: str, model: str, out: str) -> GlueConfig:
    """The job's typed suite config; ConfigError lists every problem."""
    cfg = configlib.from_dict(GlueConfig, suite_dict(glue, task, model, out), KEY)
    problems = cfg.validate()
    if problems:
        raise configlib.ConfigError(problems, f"the GLUE suite of downstream job glue/{task}")
    return cfg


def suite_problems(g: GlueJobsConfig) -> list[str]:
    """eval.downstream.glue.suite's problems: a key the job sets itself, an unknown or mistyped key, a value the GLUE
    suite's own checks refuse (checked with the packaged model standing in for the exports, which do not exist
    yet)."""
    if not g.tasks:
        return []
    p = []
    for section, keys in SET_BY_JOB.items():
        node = g.suite.get(section) if section else g.suite
        if isinstance(node, dict):
            where = f"{KEY}.{section}." if section else f"{KEY}."
            p += [f"{where}{k}: set by each job (remove it)" for k in keys if k in node]
    task = next((t.name for t in map(lookup, map(str, g.tasks)) if t is not None), None)
    try:
        cfg = configlib.from_dict(GlueConfig, suite_dict(asdict(g), task or "MRPC", "minilm", "downstream"), KEY)
    except configlib.ConfigError as e:
        return p + [f"{KEY}: {x}" for x in e.problems]
    if task is not None and g.data_dir:
        p += [f"{KEY}: {x}" for x in cfg.validate() if not x.startswith(OWN_PROBLEMS)]
    return p
