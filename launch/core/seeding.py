"""Seeds: the process-wide random state a run sets up before training."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Distinct dropout per rank. A resume at another world size cannot re-split RNG streams, so it
    reseeds from the step it starts at (step 0 for a fresh run; a same-size resume restores the saved
    RNG states instead)."""
    seed_everything(seed + 7919 * rank + 104729 * step)
