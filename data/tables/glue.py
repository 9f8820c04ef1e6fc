"""The GLUE benchmark's tasks: where each lives in the official `glue_data/` release and on the hub
(`nyu-mll/glue`), its columns, its labels in GLUE's spelling, its official metrics and its submission files.

The release is read unchanged: CoLA's train/dev have no header line, MRPC's header starts with a byte-order
mark, MNLI has matched and mismatched dev/test sets, and AX (`diagnostic/diagnostic.tsv`) is predicted
with the MNLI model. Label ids follow the order of `labels`, which is also the hub's ClassLabel order, so a
model trained from either source writes the same submission.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Split:
    """One dev or test table: its file in the task folder (relative, may climb to diagnostic/), its hub split."""

    file: str
    hub: str


@dataclass(frozen=True, eq=False)  # one object per task: compared and hashed by identity
class GlueTask:
    name: str  # GLUE's spelling: CoLA, SST-2, ...
    hub_config: str  # nyu-mll/glue configuration name
    text_a: str
    text_b: str | None
    label: str
    hub_columns: tuple[str, str | None]  # text_a, text_b on the hub (the label is always `label` there)
    labels: tuple[str, ...] | None  # GLUE's label spelling in id order; None: a regression (STS-B)
    metrics: tuple[str, ...]  # official metrics; the first one picks the best checkpoint
    train: Split = Split("train.tsv", "train")
    dev: Split = Split("dev.tsv", "validation")
    test: Split = Split("test.tsv", "test")
    submission: str = ""  # file name of the test predictions for the GLUE server
    columns: tuple[str, ...] | None = None  # names of a header-less release (CoLA train/dev)
    extra_dev: dict[str, Split] = field(default_factory=dict)  # scored as eval_<name>_<metric>
    extra_test: dict[str, tuple[Split, str]] = field(default_factory=dict)  # name -> (table, submission file)
    defaults: dict = field(default_factory=dict)  # fine-tuning settings of this task (glue.overrides win)

    def folder(self, data_dir: str | Path) -> Path:
        return Path(data_dir) / self.name

    def files(self, data_dir: str | Path) -> list[Path]:
        """Every table the task reads from a glue_data folder (the test tables are optional)."""
        d = self.folder(data_dir)
        return [d / self.train.file, d / self.dev.file] + [d / s.file for s in self.extra_dev.values()]

    def test_files(self, data_dir: str | Path) -> dict[str, Path]:
        """'' (the main test set) and extra test names -> their paths, when present."""
        d = self.folder(data_dir)
        out = {"": d / self.test.file} | {n: d / s.file for n, (s, _) in self.extra_test.items()}
        return {n: p for n, p in out.items() if p.is_file()}


_BINARY = ("0", "1")
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("CoLA", "cola", "sentence", None, "label", ("sentence", None), _BINARY, ("matthews",),
             submission="CoLA.tsv", columns=("source", "label", "original_mark", "sentence")),
    GlueTask("SST-2", "sst2", "sentence", None, "label", ("sentence", None), _BINARY, ("accuracy",),
             submission="SST-2.tsv"),
    GlueTask("MRPC", "mrpc", "#1 String", "#2 String", "Quality", ("sentence1", "sentence2"), _BINARY,
             ("f1", "accuracy"), submission="MRPC.tsv"),
    GlueTask("STS-B", "stsb", "sentence1", "sentence2", "score", ("sentence1", "sentence2"), None,
             ("pearson", "spearman"), submission="STS-B.tsv"),
    GlueTask("QQP", "qqp", "question1", "question2", "is_duplicate", ("question1", "question2"), _BINARY,
             ("f1", "accuracy"), submission="QQP.tsv"),
    GlueTask("MNLI", "mnli", "sentence1", "sentence2", "gold_label", ("premise", "hypothesis"), _NLI3,
             ("accuracy", "mm_accuracy"), dev=Split("dev_matched.tsv", "validation_matched"),
             test=Split("test_matched.tsv", "test_matched"), submission="MNLI-m.tsv",
             extra_dev={"mm": Split("dev_mismatched.tsv", "validation_mismatched")},
             extra_test={"mm": (Split("test_mismatched.tsv", "test_mismatched"), "MNLI-mm.tsv"),
                         "ax": (Split("../diagnostic/diagnostic.tsv", "ax:test"), "AX.tsv")}),
    GlueTask("QNLI", "qnli", "question", "sentence", "label", ("question", "sentence"), _NLI2, ("accuracy",),
             submission="QNLI.tsv"),
    GlueTask("RTE", "rte", "sentence1", "sentence2", "label", ("sentence1", "sentence2"), _NLI2, ("accuracy",),
             submission="RTE.tsv"),
    # WNLI: 635 training pairs, 20 batches an epoch, so grouping by length saves nothing; it would also put a
    # premise's two hypotheses (same length, opposite labels) in one batch, which lets a model fit the train
    # pairs whose dev twins carry the other label (measured: dev accuracy 0.30 with grouping, 0.52 without).
    GlueTask("WNLI", "wnli", "sentence1", "sentence2", "label", ("sentence1", "sentence2"), _BINARY,
             ("accuracy",), submission="WNLI.tsv", defaults={"task": {"length_grouping": False}}),
]}


def lookup(name: str) -> GlueTask | None:
    """A task by GLUE's name, case-insensitive, with or without the dash (sst2, STS-B, mnli...)."""
    key = name.lower().replace("-", "")
    return next((t for t in TASKS.values() if t.name.lower().replace("-", "") == key), None)


def unknown_task_message(name: str) -> str:
    close = difflib.get_close_matches(name.upper(), [t.upper() for t in TASKS], n=1, cutoff=0.5)
    hint = f" (did you mean '{next(t for t in TASKS if t.upper() == close[0])}'?)" if close else ""
    return f"unknown GLUE task '{name}'{hint}; the tasks are: {', '.join(TASKS)}"


def present(data_dir: str | Path) -> list[GlueTask]:
    """The tasks whose folder exists in a glue_data folder, in GLUE's order."""
    return [t for t in TASKS.values() if t.folder(data_dir).is_dir()]
