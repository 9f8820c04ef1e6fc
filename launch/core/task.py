"""The contract between the training loop (launch/core/loop.py) and a task (MLM, classification, ...).

The loop knows nothing else about a task: it never reads the task's config. A task owns its data, its
forward pass, its evaluation and what it writes at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from launch.core.loop import Trainer, TrainState
    from launch.core.plan import Phase

Batch = dict[str, Any]  # tensors (input_ids int64[B, L], ...) plus "meta": host-side bookkeeping
Counts = dict[str, float]  # real_tokens, slots, sequences, head_rows (+ task extras), summed over a step


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

    def finish(self, trainer: Trainer) -> None:
        """End-of-run outputs (final/ export, predictions). Rank 0's single-rank work comes last, after
        the last collective, so the other ranks never wait on it."""
