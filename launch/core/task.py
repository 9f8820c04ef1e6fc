"""The contracts of a task: what the run assembly needs to build one (`TaskSpec`), what the training loop may
ask of it (`Task`), and the values passed between them.

Adding a task means writing a spec (and its config): launch/core/assemble.py puts every run together from
one, in one fixed order, so the run and its dry run cannot differ. The loop knows nothing else about a task;
it never reads the task's config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from bertlaunch.core.dist import DistInfo
from bertlaunch.core.plan import Phase, Plan

Batch = dict[str, Any]  # tensors (input_ids int64[B, L], ...) plus "meta": host-side bookkeeping
Counts = dict[str, float]  # real_tokens, slots, sequences, head_rows (+ task extras), summed over a step


@dataclass
class TrainState:
    """The counters a checkpoint saves (trainer.json "state")."""

    step: int = 0
    tokens: int = 0  # real (non-pad) tokens trained, all ranks
    samples: int = 0  # sequences trained, all ranks
    skipped_steps: int = 0  # steps whose every micro-batch had a non-finite loss
    bad_micro_batches: int = 0  # micro-batches dropped for a non-finite loss
    elapsed_s: float = 0.0  # training wall time of earlier attempts (resumed runs)
    best_metric: float | None = None  # fine-tuning: value of eval.metric at the best evaluation
    best_step: int | None = None
    best_result: dict | None = None


@dataclass(frozen=True)
class Resume:
    """Where a run starts: fresh (no checkpoint), or a checkpoint that passed every check."""

    path: Path | None = None  # the checkpoint folder
    saved: dict | None = None  # its trainer.json
    world_changed: bool = False  # another world size: ZeRO state re-split, RNG streams reseeded
    resplit: bool = False  # another world size or dataloader worker count: the unread data is re-split
    universal: bool = False  # the ZeRO partitions go through DeepSpeed's universal format
    source: str | None = None  # the checkpoint.remote URL it was downloaded from (None: it was local)

    @property
    def step(self) -> int:
        return self.saved["state"]["step"] if self.saved else 0


@dataclass
class Model:
    """What a spec builds before the engine exists."""

    module: nn.Module  # the training module: forward(**batch) -> loss (on the meta device in a dry run)
    config: Any  # its transformers config (layers, hidden size, positions, ...)
    write_meta: Callable[[Path], None]  # writes config + tokenizer (+ task.json) into a checkpoint's hf_meta/
    name: str  # the preset or folder it came from (for the dry run)
    params: int = field(init=False)

    def __post_init__(self):
        self.params = sum(p.numel() for p in self.module.parameters())


@dataclass(frozen=True)
class Ending:
    """What a task gets at the end of a run (Task.finish)."""

    engine: Any
    state: TrainState
    checkpoints: Path  # output_dir/checkpoints; the last save is step_dir(checkpoints, state.step)
    log: Callable[[str], None]  # rank 0's console / progress bar


Cfg = TypeVar("Cfg")
Tok = TypeVar("Tok")
Data = TypeVar("Data")


class TaskSpec(Protocol, Generic[Cfg, Tok, Data]):
    """A task described for launch/core/assemble.py. Every method but `task` also runs in the dry run; a
    problem is raised (ConfigError, ValueError, OSError): the run stops with it, the dry run lists it."""

    def workers(self, cfg: Cfg) -> int:
        """Dataloader streams per rank (a checkpoint written with another count is a resize)."""

    def longest(self, cfg: Cfg) -> tuple[str, int]:
        """(config key, length) of the longest sequence the run feeds the model: its positions must cover it."""

    def tokenizer(self, cfg: Cfg) -> Tok:
        """The tokenizer, loaded and checked."""

    def data(self, cfg: Cfg, tok: Tok, info: DistInfo) -> Data:
        """The training (and eval) data, found, read as far as needed and checked for `info`'s ranks."""

    def model(self, cfg: Cfg, tok: Tok, data: Data | None, meta: bool) -> Model | None:
        """The model, seeded already (same weights on every rank); meta=True: on the meta device (dry run).
        `data` is None when it failed in a dry run (its problem is listed): return None when the model needs it."""

    def plan_args(self, cfg: Cfg, data: Data | None) -> dict:
        """make_plan's task arguments: fine-tuning's examples and epochs, or pretraining's phases."""

    def check_resume(self, cfg: Cfg, data: Data, resume: Resume) -> None:
        """Raise when the checkpoint's data no longer matches this run's (its positions would be wrong)."""

    def task(self, cfg: Cfg, info: DistInfo, tok: Tok, data: Data, model: Model, plan: Plan,
             resume: Resume) -> Task:
        """The task the loop drives, positioned at the resumed step."""

    def describe(self, cfg: Cfg, tok: Tok, data: Data, plan: Plan, info: DistInfo) -> None:
        """Dry run: print the data (files, sizes, epochs, ...) and one batch as the run would get it."""


@runtime_checkable
class Task(Protocol):
    total_steps: int
    """Optimizer steps of the whole run."""
    eval_every: int
    """Evaluate every N steps (0: only at the end)."""
    keeps_best: bool
    """True: a checkpoint is saved whenever track_best reports an improvement, and kept (fine-tuning)."""

    def batches(self) -> Iterator[Batch]:
        """This rank's micro-batches from the current data position on (a seek on resume, not a replay)."""

    def set_phase(self, phase: Phase) -> None:
        """From the next batch on, serve `phase`'s block size and micro-batch, continuing from the data
        position of the last consumed batch (called at the start of the run and at each phase boundary)."""

    def consumed(self, batch: Batch, step: int | None) -> None:
        """`batch` is trained in optimizer step `step` (None: passed over, nothing to train in it):
        remember the data position it leaves."""

    def forward(self, engine: Any, batch: Batch) -> torch.Tensor:
        """The micro-batch's mean loss (a scalar tensor on the device)."""

    def null_batch(self) -> Batch:
        """A batch with no targets: zero loss, the same collectives (stands in for a dropped batch)."""

    def counts(self, batch: Batch) -> Counts:
        """Host-side counts of one micro-batch (no device sync)."""

    def flops(self, counts: Counts) -> float:
        """Training FLOPs of the counted work (for MFU)."""

    def log_extra(self, totals: dict) -> dict:
        """Task-specific fields of a metrics row (collective: every rank calls it at log steps)."""

    def evaluate(self, engine: Any) -> dict[str, float]:
        """Held-out metrics ({} when there is no eval set); collective."""

    def track_best(self, state: TrainState, result: dict[str, float]) -> bool:
        """Record `result` in state.best_* if it is the best so far; True when it improved."""

    def data_state(self) -> dict:
        """The data position of every rank, JSON-able, for trainer.json (collective)."""

    def finish(self, end: Ending) -> None:
        """End-of-run outputs (final/ export, predictions). Rank 0's single-rank work comes last, after
        the last collective, so the other ranks never wait on it."""
