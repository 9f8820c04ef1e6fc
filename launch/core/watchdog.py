"""Hung or dead ranks: fail fast with the rank's name instead of waiting forever in a collective.

Every rank records its progress (step, time) in output_dir/.heartbeat/rank_NNNNN after each step. A
watchdog thread on every rank checks, every few seconds, whether this rank has made no progress for
`train.dist_timeout_s`; if so it reads the other ranks' heartbeats, names the ones that are behind or
silent (the hung or dead ones), and ends the process with exit code 4, so launchers stop the job.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch.distributed

from bertlaunch.core.exits import EXIT_HUNG


class Heartbeat:
    def __init__(self, folder: Path, rank: int, world: int, timeout_s: float, poll_s: float = 2.0):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.timeout, self.poll = rank, world, timeout_s, poll_s
        self.path = self.dir / f"rank_{rank:05d}"
        self.last = time.time()
        self.step = 0
        self.paused = False
        self._lock = threading.Lock()
        self._wrote = None
        self.beat(0)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="bertlaunch-watchdog", daemon=True)
        if world > 1:
            self.thread.start()

    def beat(self, step: int) -> None:
        """Main thread, after each step: records progress in memory only (no file I/O between steps); the
        watchdog thread writes any newer step at each poll, so a rank that hangs right after a step still
        shows that step (and the time of that step) to the others."""
        self.last, self.step = time.time(), step
        if step == 0:
            self._write()

    def _write(self) -> None:
        with self._lock:
            step, last = self.step, self.last
            if (step, last) == self._wrote:
                return
            tmp = self.path.with_suffix(".part")
            tmp.write_text(f"{step} {min(last, time.time()):.3f} {os.getpid()} {socket.gethostname()}\n")
            os.replace(tmp, self.path)
            self._wrote = (step, last)

    def pause(self) -> None:
        """From now on, long single-rank work (rank 0's final export) is not a hang. Later beats (a save)
        still record progress but do not re-arm the watchdog."""
        self.paused = True

    def close(self) -> None:
        """End the watchdog thread (the run is over; the process may go on, e.g. inside tests)."""
        self._stop.set()

    def others(self) -> dict[int, tuple[int, float, str]]:
        """Every rank's last heartbeat: (step, time, host); (-1, 0, "?") when it never wrote one."""
        out = {}
        for r in range(self.world):
            try:
                step, t, _, host = (self.dir / f"rank_{r:05d}").read_text().split()
                out[r] = (int(step), float(t), host)
            except (OSError, ValueError):
                out[r] = (-1, 0.0, "?")
        return out

    def diagnose(self) -> str:
        beats = self.others()
        now = time.time()
        front = max(step for step, _, _ in beats.values())
        culprits = [r for r, (step, t, _) in beats.items()
                    if r != self.rank and (step < front or now - t > self.timeout)]
        if not culprits:
            culprits = [r for r, (step, _, _) in beats.items() if step < front] or sorted(beats)
        desc = ", ".join(f"rank {r} (last step {beats[r][0]}, {now - beats[r][1]:.0f}s ago, on {beats[r][2]})"
                         for r in culprits)
        return desc

    def stalled_for(self) -> float | None:
        """Seconds without progress when that exceeds the timeout (and the watchdog is not paused)."""
        idle = time.time() - self.last
        return idle if idle > self.timeout and not self.paused else None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            self._write()
            idle = self.stalled_for()
            if idle is not None:
                head = (f"[rank {self.rank}] error: no progress for {idle:.0f}s (train.dist_timeout_s="
                        f"{self.timeout:g}) at step {self.step}; ")
                where = main_thread_outside_collectives() if collectives_block() else None
                if where is None:  # this rank waits in a collective (or cannot tell): the culprit is another rank
                    body = f"waiting on {self.diagnose()}: a rank hung or died."
                else:  # every rank's watchdog fires; only the hung one is stuck outside torch.distributed
                    body = (f"this rank (on {socket.gethostname()}) is the one that hung: stuck in {where}, "
                            "outside any collective.")
                print(head + body + " Exiting so the launcher can stop the job; resume from the last checkpoint.",
                      file=sys.stderr, flush=True)
                os._exit(EXIT_HUNG)


def collectives_block() -> bool:
    """True where a rank waiting for the others waits inside the collective call (gloo: CPU ranks). NCCL calls
    return at once and the wait shows later, at a CUDA synchronisation anywhere in the code, so there a main thread
    outside torch.distributed does not mark the rank that hung."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_backend() == "gloo"


def main_thread_outside_collectives() -> str | None:
    """Where the main thread is stuck ("function (file:line)" of its innermost frame), or None when it waits
    in a torch.distributed call: that rank waits for another one, which is the rank to name."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return None
    inner = frame
    while frame is not None:
        if f"torch{os.sep}distributed{os.sep}" in frame.f_code.co_filename:
            return None
        frame = frame.f_back
    return f"{inner.f_code.co_name} ({inner.f_code.co_filename}:{inner.f_lineno})"
