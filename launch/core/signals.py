"""Stop signals: SIGTERM / SIGUSR1 (a scheduler's preemption or time limit) end a run at a step boundary."""

from __future__ import annotations

import signal


class StopFlag:
    """SIGTERM / SIGUSR1 only set a flag; the loop checkpoints at the next step boundary and exits 75."""

    def __init__(self):
        self.signum = 0
        self.previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handler(self, signum, frame):
        self.signum = signum

    def restore(self) -> None:
        """Put back the handlers that were installed before (a run inside a longer-lived process)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
