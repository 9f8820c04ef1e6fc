"""The one seam where tests reach into a run: an optional hook object, None in normal use.

Production code never reads a test variable. Tests install an object with these methods (tests/faults.py,
from BERTLAUNCH_* variables) before the run starts; the loop picks its step function once at start-up, so a
run without hooks pays nothing per step.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Hooks(Protocol):
    def loss(self, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        """Called with every micro-batch's loss of optimizer step `step`; returns the loss to train on."""

    def saving(self, step: int) -> None:
        """Called on every rank while a checkpoint of `step` is being written (may raise OSError or kill)."""

    def exporting(self) -> None:
        """Called before a checkpoint is exported to a Hugging Face folder."""

    def uploading(self, name: str) -> None:
        """Called in the upload thread before each file of a checkpoint goes to checkpoint.remote."""


installed: Hooks | None = None


def install(hooks: Hooks | None) -> None:
    """Tests only: the hooks of the runs started from now on in this process (None removes them)."""
    global installed
    installed = hooks
