"""Seeds and stop signals: the process-wide state a run sets up before training."""

from __future__ import annotations

import random
import signal

import numpy as np


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Distinct dropout per rank. A resume at another world size cannot re-split RNG streams, so it
    reseeds from the step it starts at (step 0 for a fresh run; a same-size resume restores the saved
    RNG states instead)."""
    seed_everything(seed + 7919 * rank + 104729 * step)


class StopFlag:
    """SIGTERM / SIGUSR1 only set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handler(self, signum, frame):
        self.signum = signum

    def restore(self) -> None:
        """Put back the handlers that were installed before (a run inside a longer-lived process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
