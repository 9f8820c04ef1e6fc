"""The background upload of checkpoints to checkpoint.remote: the ranks wait only for the local write.

Every rank uploads, in a thread of its own, the files of a checkpoint it was given (`share_out`: a checkpoint's
files are spread over the ranks that see them, by size; on a shared file system that is every rank, with one disk
per node it is the node's own ranks, so each node uploads what it wrote). When every rank's files are up, rank 0
writes the manifest (the commit marker), syncs metrics.jsonl and config.yaml, then prunes the remote.

The ranks agree without waiting on each other: each adds two numbers to the loop's per-step host all-reduce
(launch/core/loop.py `_agree`): the newest upload it has finished, and the newest that failed on it. Every rank
sees the same reduced values at the same step, so all start the same upload at the same step and see it end at
the same step. A checkpoint saved while an upload is in flight waits as the pending one; a newer save replaces a
pending one that has not started (at most one upload in flight, the newest next). A failed upload (after
checkpoint.io_retries) warns; training goes on, and the next checkpoint is uploaded. `drain` runs the same
agreement in a loop at the end of the run and before exit 75, until the newest checkpoint is up or
checkpoint.upload_timeout_s has passed.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bertlaunch.core import dist, hooks
from bertlaunch.core.checkpoint import MANIFEST
from bertlaunch.core.layout import CONFIG, FINAL, METRICS, RunDir
from bertlaunch.core.remote import RemoteCheckpoints
from bertlaunch.data.corpus.storage import StorageError


def share_out(manifest: dict[str, dict], groups: list[tuple[list[int], set[str]]]) -> dict[int, list[str]]:
    """Which rank uploads which file: each file goes to the least-loaded (in bytes) rank among those whose
    group holds it, largest files first. The same answer on every rank (no collective)."""
    load: dict[int, int] = {r: 0 for ranks, _ in groups for r in ranks}
    out: dict[int, list[str]] = {r: [] for r in load}
    for name in sorted(manifest, key=lambda n: (-manifest[n]["size"], n)):
        ranks = [r for ranks, names in groups if name in names for r in ranks]
        if ranks:
            r = min(ranks, key=lambda x: (load[x], x))
            out[r].append(name)
            load[r] += manifest[name]["size"]
    return out


def yield_cpu() -> None:
    """The calling thread runs at a lower priority (nice +10, Linux: a thread is a task of its own), so that
    hashing and copying checkpoint files takes the cycles the training leaves, not the training's own. Elsewhere,
    or where the system refuses, nothing changes."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + 10, 19))
    except (AttributeError, OSError):
        pass


@dataclass
class Job:
    seq: int  # the how-manieth checkpoint submitted (the same on every rank)
    step: int
    folder: Path  # the local checkpoint
    mine: list[str]  # the files this rank uploads
    manifest: dict[str, dict]  # every file of the checkpoint: what rank 0 commits
    protected: set[int] = field(default_factory=set)  # steps remote pruning keeps (the best fine-tuning one)


class Uploads:
    """One rank's uploads. The main thread calls submit / report / agreed / drain / outputs; the uploader
    thread (started with the first upload) runs the queued work one item at a time."""

    def __init__(self, remote: RemoteCheckpoints, info: dist.DistInfo, log, keep_last: int, timeout_s: float,
                 run_dir: RunDir):
        self.remote, self.info, self.log, self.keep_last = remote, info, log, keep_last
        self.timeout_s, self.run_dir = timeout_s, run_dir
        self.seq = 0
        self.current: Job | None = None  # started on every rank, files not all up yet
        self.pending: Job | None = None  # saved while another was in flight
        self.finished = self.failed = 0  # (thread) seq of the newest job whose files are done / that failed
        self.work: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.news: queue.Queue = queue.Queue()  # (thread) rank 0's messages, printed by the main thread between steps

    # -- main thread -----------------------------------------------------------------------------
    def submit(self, step: int, folder: Path, mine: list[str], manifest: dict, protected: set[int]) -> None:
        """A checkpoint committed locally (called at the same step on every rank)."""
        self.seq += 1
        if self.pending is not None:
            self.log(f"note: the upload of step {self.pending.step} had not started: step {step} replaces it")
        self.pending = Job(self.seq, step, folder, mine, manifest, protected)

    def in_use(self) -> set[int]:
        """Steps whose local copy an upload still reads (local pruning keeps them)."""
        return {j.step for j in (self.current, self.pending) if j is not None}

    def report(self) -> list[float]:
        """This rank's part of the per-step all-reduce (max): minus the newest finished job (so the max is minus
        the oldest finished over the ranks), and the newest failed one."""
        return [-float(self.finished), float(self.failed)]

    def agreed(self, values: list[float]) -> None:
        """The reduced report (the same on every rank at the same step): end the current upload when every
        rank's files are up (rank 0 then commits it), and start the pending one when none is in flight."""
        self._say()
        finished, failed = -values[0], values[1]
        job = self.current
        if job is not None and finished >= job.seq:
            self.current = None
            if failed >= job.seq:
                self.log(f"WARNING: checkpoint step {job.step} could not be uploaded to {self.remote.where()} "
                         "(see the rank's warning); the remote's newest complete checkpoint stays as it was, the "
                         "local checkpoints remain, training goes on; the next checkpoint will be uploaded")
            elif self.info.is_main:
                self._queue(lambda job=job: self._commit(job))
        if self.current is None and self.pending is not None:
            self.current, self.pending = self.pending, None
            self._queue(lambda job=self.current: self._upload(job))

    def drain(self) -> None:
        """Collective, at the end of the run or before exit 75: run the agreement until the newest checkpoint is up
        (manifest included), or checkpoint.upload_timeout_s has passed."""
        deadline = time.time() + self.timeout_s
        while self.current is not None or self.pending is not None:
            late = time.time() > deadline
            values = dist.all_reduce(self.report() + [1.0 if late else 0.0], "max", host=True)
            self.agreed(values[:2])
            if values[2] and (self.current is not None or self.pending is not None):
                steps = sorted(self.in_use())
                self.log(f"WARNING: the upload of checkpoint step(s) {steps} to {self.remote.where()} did not "
                         f"finish within checkpoint.upload_timeout_s={self.timeout_s:g}; the local checkpoint is "
                         "complete, the remote keeps its newest committed one")
                return
            time.sleep(0.05)
        self._idle(deadline)
        self._say()

    def export(self, folder: Path) -> None:
        """Rank 0: an export_at folder (exports/step_N), after the checkpoint uploads queued before it."""
        self._queue(lambda: self._put_tree(folder, f"{folder.parent.name}/{folder.name}"))

    def outputs(self) -> None:
        """Rank 0, at the very end: final/ and the run's top-level files (metrics.jsonl, config.yaml, results)."""
        if self.run_dir.final.is_dir():
            self._queue(lambda: self._put_tree(self.run_dir.final, FINAL))
        for path in sorted(p for p in self.run_dir.root.iterdir() if p.is_file() and not p.name.endswith(".part")):
            self._queue(lambda path=path: self._put(path, path.name))
        self._idle(time.time() + self.timeout_s)
        self._say()

    def close(self) -> None:
        """The thread ends after the work queued so far (the process may live on: tests run in-process)."""
        if self.thread is not None:
            self.work.put(None)

    # -- the uploader thread ------------------------------------------------------------------------
    def _queue(self, fn) -> None:
        if self.thread is None:  # started late: dataloader workers fork before it exists where they can
            self.thread = threading.Thread(target=self._run, name="bertlaunch-upload", daemon=True)
            self.thread.start()
        self.work.put(fn)

    def _idle(self, deadline: float) -> bool:
        while self.work.unfinished_tasks and time.time() < deadline:
            time.sleep(0.05)
        if self.work.unfinished_tasks:
            self._warn(f"uploads to {self.remote.where()} still under way after checkpoint.upload_timeout_s="
                       f"{self.timeout_s:g}; exiting without them (the local files are complete)")
        return not self.work.unfinished_tasks

    def _run(self) -> None:
        yield_cpu()
        while (fn := self.work.get()) is not None:
            try:
                fn()
            finally:
                self.work.task_done()
        self.work.task_done()

    def _say(self) -> None:
        """Main thread: print what the uploader thread had to say (never in the middle of a progress line)."""
        while not self.news.empty():
            self.log(self.news.get())

    def _warn(self, msg: str) -> None:
        sys.stderr.write(f"[rank {self.info.rank}] WARNING: {self.remote.scrub(msg)}\n")  # one write: no interleaving
        sys.stderr.flush()

    def _upload(self, job: Job) -> None:
        try:
            for name in job.mine:
                if hooks.installed is not None:  # tests only: a slow upload, to act while it is in flight
                    hooks.installed.uploading(name)
                self.remote.put(job.folder / name, f"{job.folder.name}/{name}")
        except (StorageError, OSError) as e:
            self.failed = job.seq
            self._warn(f"uploading checkpoint step {job.step} failed: {e}")
        finally:
            self.finished = job.seq

    def _commit(self, job: Job) -> None:
        """Rank 0, once every rank's files of the job are up: the manifest last, then the run's log files, then
        pruning (only now that a newer checkpoint committed)."""
        try:
            self.remote.put_json(f"{job.folder.name}/{MANIFEST}", {"version": 1, "files": job.manifest})
            self.news.put(f"checkpoint step {job.step} uploaded: {self.remote.where(job.folder.name)}")
            for name in (METRICS, CONFIG):
                self._put(self.run_dir.root / name, name)
            self.remote.prune(self.keep_last, job.protected)
        except StorageError as e:
            self._warn(f"committing checkpoint step {job.step} to the remote failed: {e}")

    def _put(self, path: Path, rel: str) -> None:
        """One top-level file; metrics.jsonl up to its last whole line (the run appends to it meanwhile)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        if path.name == METRICS:
            data = data[: data.rfind(b"\n") + 1]
        try:
            self.remote.put_bytes(rel, data)
        except StorageError as e:
            self._warn(f"uploading {rel} failed: {e}")

    def _put_tree(self, folder: Path, rel: str) -> None:
        try:
            self.remote.put_tree(folder, rel)
        except (StorageError, OSError) as e:
            self._warn(f"uploading {rel}/ failed: {e}")
