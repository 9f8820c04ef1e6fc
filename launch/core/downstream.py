"""Downstream scores during pretraining (`eval.downstream`): which jobs score each `checkpoint.export_at` export,
their command lines, and their rows in metrics.jsonl.

A job is (export step, name): `glue/<TASK>` fine-tunes the export on a GLUE task (the GLUE suite, run by
`python -m bertlaunch.tools.downstream`), `retrieval/<name>` scores it on a BEIR folder (`python -m
bertlaunch.tools.retrieval`), `command/<name>` runs any command that writes a JSON of scores. Each one runs apart
from the training (launch/core/jobs.py) and leaves its files in output_dir/downstream/step_NNNNNNNN/<job>/.

metrics.jsonl is the ledger: a job's row is written once, with the export's step (so a resume, which keeps the
rows up to its checkpoint, keeps it), and a job with a row is never run again. Rows:
  {"step": 6, "tokens": 3072, "downstream": {"job": "glue/MRPC", "score": 71.2, "scores": {...}, ...}}
  {"step": 6, "tokens": 3072, "downstream": {"job": "glue/RTE", "failed": "exit code 2: ...", "log": ...}}
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from bertlaunch.core.configlib import REQUIRED
from bertlaunch.data.tables.glue import lookup, unknown_task_message

FOLDER = "downstream"  # output_dir/downstream/step_NNNNNNNN/<job>/
RESULT, LOG, EXIT, SPEC = "result.json", "job.log", "exit_code", "job.json"
BEIR_FILES = ("corpus.jsonl", "queries.jsonl")


@dataclass
class GlueJobsConfig:
    tasks: list[str] = field(default_factory=list)
    """GLUE tasks to fine-tune every export on, by GLUE's name (CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE,
    WNLI): one job per task and export, its score the task's GLUE score (mean of its metrics, 0-100)."""
    data_dir: str | None = None
    """The official glue_data/ folder (as glue.data_dir of launch/glue.py)."""
    seeds: list[int] = field(default_factory=lambda: [42])
    """Fine-tuning seeds of every job; its scores are the means over them."""
    max_train_examples: int | None = None
    """Fine-tune on each task's first N training rows only (a quick signal); None: all."""
    suite: dict[str, Any] = field(default_factory=dict)
    """Settings of the GLUE suite each job runs, as in a launch/glue.py config (train, eval, deepspeed, log,
    checkpoint, tokenizer, glue.max_length, glue.overrides, ...), e.g. {train: {epochs: 1, lr: 5e-5}}; the job
    sets output_dir, model.pretrained and glue's data_dir, tasks, seeds and max_train_examples; wandb is off
    unless set here."""


@dataclass
class RetrievalJobConfig:
    data_dir: str = REQUIRED
    """A BEIR folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv."""
    split: str = "test"
    """The qrels split scored."""
    name: str | None = None
    """The job's name, retrieval/<name> (None: the folder's name)."""


@dataclass
class CommandJobConfig:
    name: str = REQUIRED
    """The job's name, command/<name>."""
    command: list[str] = REQUIRED
    """The command line, run in the launch directory, where {model} is the export folder, {out} the JSON file the
    command must write ({"metric": number, ...}) and {python} this Python; e.g. [{python}, score.py, {model},
    {out}]."""
    metric: str | None = None
    """The key of the job's main score in that JSON (None: its first key)."""


@dataclass
class DownstreamConfig:
    glue: GlueJobsConfig = field(default_factory=GlueJobsConfig)
    """GLUE fine-tuning jobs."""
    retrieval: list[RetrievalJobConfig] = field(default_factory=list)
    """Retrieval jobs, one per BEIR folder: [{data_dir, split, name}, ...] (nDCG@10, Recall@100, MRR@10)."""
    commands: list[CommandJobConfig] = field(default_factory=list)
    """Jobs of your own: [{name, command, metric}, ...]."""
    launcher: Literal["auto", "process", "sbatch"] = "auto"
    """How jobs run: process = a child process on a GPU that no training rank of this node uses, else on the CPU;
    sbatch = a SLURM job of its own; auto = sbatch inside a SLURM job (when sbatch is found), else process."""
    max_running: int = 1
    """Child processes at once on the CPU (with free GPUs: one per free GPU); further jobs wait their turn."""
    sbatch_args: list[str] = field(default_factory=list)
    """Options of every sbatch job, e.g. [--partition=eval, --gpus=1, --time=2:00:00]."""
    wait_at_end_s: float = 3600.0
    """At the end of the run, wait at most this long for the jobs still queued or running; those left then are
    stopped and reported as failed (timed out)."""

    def active(self) -> bool:
        return bool(self.glue.tasks or self.retrieval or self.commands)


def validate_downstream(d: DownstreamConfig, export_at: list[float]) -> list[str]:
    """Every problem of eval.downstream that needs no GLUE suite (launch/tasks/glue/downstream.py checks the suite
    settings): unknown GLUE tasks, missing folders and files, names used twice, exports to score."""
    key, p = "eval.downstream", []
    if not d.active():
        return []
    if not export_at:
        p.append(f"{key} scores the checkpoint.export_at exports, and there are none: set checkpoint.export_at, "
                 "e.g. [0.25, 0.5, 0.75, 1.0]")
    g = d.glue
    for name in g.tasks:
        if lookup(str(name)) is None:
            p.append(f"{key}.glue.tasks: {unknown_task_message(name)}")
    if g.tasks and not g.data_dir:
        p.append(f"{key}.glue.data_dir is not set: give the official glue_data/ folder (CoLA/, SST-2/, ...)")
    elif g.tasks and not Path(g.data_dir).is_dir():
        p.append(f"{key}.glue.data_dir: '{g.data_dir}' is not a folder (it should hold CoLA/, SST-2/, ...)")
    elif g.tasks:
        for task in filter(None, map(lookup, map(str, g.tasks))):
            missing = [f for f in task.files(g.data_dir) if not f.is_file()]
            if missing:
                p.append(f"{key}.glue.tasks: {task.name} has no {', '.join(map(str, missing))} (put GLUE's "
                         f"{task.name}/ in {g.data_dir}, or leave {task.name} out)")
    if not g.seeds:
        p.append(f"{key}.glue.seeds is empty: give at least one seed, e.g. [42]")
    if g.max_train_examples is not None and g.max_train_examples < 1:
        p.append(f"{key}.glue.max_train_examples must be >= 1 (or null for all rows), got {g.max_train_examples}")
    for i, r in enumerate(d.retrieval):
        if not r.data_dir:
            continue
        folder, where = Path(r.data_dir), f"{key}.retrieval[{i}].data_dir"
        if not folder.is_dir():
            p.append(f"{where}: '{r.data_dir}' is not a folder (a BEIR folder: corpus.jsonl, queries.jsonl, "
                     "qrels/<split>.tsv)")
            continue
        missing = [f for f in (*BEIR_FILES, f"qrels/{r.split}.tsv") if not (folder / f).is_file()]
        if missing:
            p.append(f"{where}: '{r.data_dir}' has no {', '.join(missing)} (BEIR's layout; split '{r.split}' is "
                     f"{key}.retrieval[{i}].split)")
    for i, c in enumerate(d.commands):
        if c.command is not None and not c.command:
            p.append(f"{key}.commands[{i}].command is empty: give the command line as a list")
        elif c.command and not any("{out}" in arg for arg in c.command):
            p.append(f"{key}.commands[{i}].command never names {{out}}, the JSON file of scores it must write")
    names = job_names(d)
    p += [f"{key}: two jobs are named {n}: give them distinct names" for n in sorted({n for n in names
                                                                                      if names.count(n) > 1})]
    if d.max_running is not None and d.max_running < 1:
        p.append(f"{key}.max_running must be >= 1, got {d.max_running}")
    if d.wait_at_end_s is not None and d.wait_at_end_s < 0:
        p.append(f"{key}.wait_at_end_s must be >= 0, got {d.wait_at_end_s}")
    return p


def job_names(d: DownstreamConfig) -> list[str]:
    """glue/<TASK>, retrieval/<name>, command/<name>, in the order they start."""
    glue = [f"glue/{t.name}" if (t := lookup(str(n))) else f"glue/{n}" for n in d.glue.tasks]
    retrieval = [f"retrieval/{r.name or Path(str(r.data_dir)).name}" for r in d.retrieval]
    return glue + retrieval + [f"command/{c.name}" for c in d.commands]


@dataclass(frozen=True)
class Job:
    """One job of one export."""

    name: str  # glue/MRPC, retrieval/<name>, command/<name>
    step: int  # the export's step
    tokens: int  # tokens trained at that step
    export: str  # the export folder
    folder: Path  # output_dir/downstream/step_NNNNNNNN/<name with / as _>/
    command: list[str]
    metric: str  # the key of the main score in result.json
    spec: dict  # what the child needs besides its command (the GLUE job's settings), written to job.json

    @property
    def key(self) -> tuple[int, str]:
        return self.step, self.name

    def path(self, name: str) -> Path:
        return self.folder / name


def step_folder(root: Path, step: int) -> Path:
    return Path(root) / FOLDER / f"step_{step:08d}"


def jobs_of(d: DownstreamConfig, root: Path, export: Path, step: int, tokens: int) -> list[Job]:
    """The jobs that score `export` (the folder of step `step`), in the order they start."""
    folder = step_folder(root, step)
    out, model = [], str(export)
    for name, task in zip(job_names(d)[:len(d.glue.tasks)], d.glue.tasks):
        here = folder / name.replace("/", "_")
        spec = {"kind": "glue", "task": str(task), "model": model, "out": str(here / "glue"), "glue": asdict(d.glue)}
        out.append(Job(name, step, tokens, model, here, [sys.executable, "-m", "bertlaunch.tools.downstream",
                                                         str(here / SPEC)], "score", spec))
    for name, r in zip(job_names(d)[len(d.glue.tasks):], d.retrieval):
        here = folder / name.replace("/", "_")
        cmd = [sys.executable, "-m", "bertlaunch.tools.retrieval", model, str(r.data_dir), "--split", r.split,
               "--out", str(here / RESULT)]
        out.append(Job(name, step, tokens, model, here, cmd, "ndcg@10", {"kind": "retrieval"}))
    for c in d.commands:
        name = f"command/{c.name}"
        here = folder / name.replace("/", "_")
        fill = {"{model}": model, "{out}": str(here / RESULT), "{python}": sys.executable}
        cmd = [_fill(arg, fill) for arg in c.command]
        out.append(Job(name, step, tokens, model, here, cmd, c.metric or "", {"kind": "command"}))
    return out


def _fill(arg: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        arg = arg.replace(k, v)
    return arg


def ledger(metrics: Path, upto_step: int | None = None) -> set[tuple[int, str]]:
    """(export step, job) of every downstream row in metrics.jsonl (up to a step: what a resume keeps)."""
    done = set()
    if not metrics.is_file():
        return done
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if isinstance(row.get("downstream"), dict) and (upto_step is None or row.get("step", 0) <= upto_step):
            done.add((row["step"], row["downstream"].get("job")))
    return done


def scored_row(job: Job, seconds: float | None) -> dict:
    """The job's row from its result.json; a failed row when the file is missing or holds no usable score."""
    path = job.path(RESULT)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return failed_row(job, f"no readable {path} ({type(e).__name__})", 0)
    scores = {k: float(v) for k, v in raw.items() if isinstance(v, int | float) and not isinstance(v, bool)} \
        if isinstance(raw, dict) else {}
    metric = job.metric or next(iter(scores), "")
    if metric not in scores or not math.isfinite(scores[metric]):
        return failed_row(job, f"{path} has no number under '{metric or 'any key'}' (it has: "
                               f"{', '.join(scores) or 'nothing'})", 0)
    body = {"job": job.name, "score": scores[metric], "metric": metric, "scores": scores, "export": job.export}
    if seconds is not None:
        body["seconds"] = round(seconds, 1)
    return {"step": job.step, "tokens": job.tokens, "downstream": body}


def failed_row(job: Job, why: str, code: int | None) -> dict:
    body = {"job": job.name, "failed": why, "exit_code": code, "log": str(job.path(LOG)), "export": job.export}
    return {"step": job.step, "tokens": job.tokens, "downstream": body}


def export_steps(export_at: list[float], total_steps: int) -> list[int]:
    """The steps at which checkpoint.export_at's fractions export (launch/core/loop.py: the first step at or past
    the fraction), for the dry run."""
    return sorted({min(max(math.ceil(f * total_steps - 1e-9), 1), total_steps) for f in export_at})
