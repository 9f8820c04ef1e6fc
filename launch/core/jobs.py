"""Running the downstream jobs (launch/core/downstream.py) beside the training, on rank 0, by command line only.

The training never waits for them: `launch` starts an export's jobs (or queues them for a free slot) and returns;
`poll`, called at log steps and checkpoints, looks at them without blocking (a process's exit status, a file) and
writes the rows of the finished ones into metrics.jsonl; `finish`, at the end of the run, waits for the rest, at
most eval.downstream.wait_at_end_s. A job runs as
  - a child process (`process`) in a session of its own, on a GPU that no training rank of this node uses, else on
    the CPU; it writes its exit code to a file when it ends, and is killed when the training process dies
    (PR_SET_PDEATHSIG), so a resumed run reruns a job that was running;
  - a SLURM job (`sbatch`) that writes its exit code to a file; a resumed run finds it (its id is in the job's
    folder) and collects it, running or finished.
Exactly once: a job with a row in metrics.jsonl (up to the resumed checkpoint) is done; one whose exit code is on
disk is collected; any other is started again.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bertlaunch.core import dist
from bertlaunch.core.downstream import (
    EXIT,
    FOLDER,
    LOG,
    RESULT,
    SPEC,
    DownstreamConfig,
    Job,
    failed_row,
    jobs_of,
    ledger,
    scored_row,
    step_folder,
)
from bertlaunch.core.layout import RunDir

SLURM_ID = "slurm_job_id"
EXPORT_INFO = "export.json"  # downstream/step_N/export.json: the export's step, tokens and folder
SLURM_CHECK_S = 30.0  # between two `scontrol show job` of a job whose exit code has not appeared
SLURM_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
               "DEADLINE"}
# A child process is a small Python wrapper around the job's command, as an sbatch job is a shell script around it:
# it writes the command's exit code to the job's exit_code file (so a resumed run collects a job that ended, even when
# the training died before it looked), and it and the command die with the training process (PR_SET_PDEATHSIG, 1),
# also when that one is SIGKILLed, instead of scoring on as orphans that a resumed run would not know of. The
# wrapper is single-threaded, where preexec_fn is safe (in the training process, with its threads, it is not).
WRAPPER = """\
import ctypes, os, signal, subprocess, sys
def die_with_parent():
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except AttributeError:  # no prctl (not Linux)
        pass
die_with_parent()
if os.getppid() != int(sys.argv[1]):  # the training died before the line above
    sys.exit(128 + signal.SIGKILL)
code = subprocess.call(sys.argv[3:], preexec_fn=die_with_parent)
with open(sys.argv[2] + ".part", "w") as f:
    f.write(f"{code}\\n")
os.replace(sys.argv[2] + ".part", sys.argv[2])
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Running:
    job: Job
    handle: object  # a Popen (process) or a SLURM job id (sbatch)
    slot: int | None = None
    started: float = field(default_factory=time.time)
    checked: float = field(default_factory=time.time)  # sbatch: the last `scontrol show job`


def choose_launcher(cfg: DownstreamConfig) -> str:
    if cfg.launcher != "auto":
        return cfg.launcher
    return "sbatch" if dist.in_slurm_job() and shutil.which("sbatch") else "process"


def slots_of(cfg: DownstreamConfig, info: dist.DistInfo) -> list[int | None]:
    """Where child processes run: every GPU of this node past those of the training's local ranks (they use
    0 .. local_world_size-1), one job each; without one, eval.downstream.max_running at once on the CPU."""
    free = list(range(info.local_world_size, dist.gpu_count()))
    return free or [None] * cfg.max_running


class Downstream:
    """Rank 0's downstream jobs. `write` puts a row into metrics.jsonl (and wandb), `say` prints a line."""

    def __init__(self, cfg: DownstreamConfig, output_dir: str, info: dist.DistInfo, write, say, start_step: int):
        self.cfg, self.run_dir, self.write, self.say = cfg, RunDir(output_dir), write, say
        self.launcher = choose_launcher(cfg)
        self.slots = slots_of(cfg, info) if self.launcher == "process" else []
        self.cwd = str(Path.cwd())
        self.queue: list[Job] = []
        self.running: dict[tuple[int, str], Running] = {}
        self.done = ledger(self.run_dir.metrics, start_step)  # metrics.jsonl as the resumed checkpoint left it
        self._recover(start_step)

    # -- the training's calls ----------------------------------------------------------------------
    def launch(self, export: Path, step: int, tokens: int) -> None:
        """Queue the jobs of a new export and start those that have a slot."""
        info = step_folder(self.run_dir.root, step)
        info.mkdir(parents=True, exist_ok=True)
        _write_json(info / EXPORT_INFO, {"step": step, "tokens": tokens, "export": str(export)})
        self._enqueue(jobs_of(self.cfg, self.run_dir.root, export, step, tokens), fresh=True)
        self.poll()

    def poll(self) -> None:
        """Collect the jobs that ended, start queued ones in the freed slots; never waits."""
        for key, r in list(self.running.items()):
            ended = self._ended(r)
            if ended is not None:
                del self.running[key]
                self._record(r, *ended)
        self._start_queued()

    def finish(self, stopping) -> None:
        """End of the run: wait for the queued and running jobs, at most eval.downstream.wait_at_end_s (or until
        `stopping()`, a signal); stop those left and report them."""
        if not (self.queue or self.running):
            return
        self.say(f"downstream: waiting for {len(self.queue) + len(self.running)} job(s), at most "
                 f"{self.cfg.wait_at_end_s:g} s (eval.downstream.wait_at_end_s)")
        deadline = time.time() + self.cfg.wait_at_end_s
        while (self.queue or self.running) and time.time() < deadline and not stopping():
            time.sleep(0.2)
            self.poll()
        if stopping():
            self.close()
            return
        for r in list(self.running.values()):
            self._stop(r)
            self._record(r, None, f"not finished within eval.downstream.wait_at_end_s={self.cfg.wait_at_end_s:g} s: "
                                  "stopped")
        for job in self.queue:
            self._record(Running(job, None), None, f"not started within eval.downstream.wait_at_end_s="
                                                   f"{self.cfg.wait_at_end_s:g} s")
        self.running, self.queue = {}, []

    def close(self) -> None:
        """The run stops early (a signal, a non-finite loss): child processes are stopped and not recorded (a resumed
        run starts them again); SLURM jobs go on (a resumed run collects them)."""
        for r in self.running.values():
            if self.launcher == "process":
                self._stop(r)
        if self.running or self.queue:
            self.say(f"downstream: {len(self.running) + len(self.queue)} job(s) left unscored; a resumed run "
                     f"{'collects' if self.launcher == 'sbatch' else 'reruns'} them")
        self.running, self.queue = {}, []

    # -- resume ------------------------------------------------------------------------------------
    def _recover(self, start_step: int) -> None:
        """A resumed run: the jobs of the exports up to the checkpoint that have no row yet are collected (exit code
        on disk), followed (a SLURM job still queued or running) or started again; those of later exports are
        stale (the run redoes those steps and exports) and are removed."""
        root = self.run_dir.root / FOLDER
        for folder in sorted(root.glob("step_*")) if root.is_dir() else []:
            if folder.name[5:].isdigit() and int(folder.name[5:]) > start_step:
                shutil.rmtree(folder, ignore_errors=True)
        for export in sorted(self.run_dir.exports.glob("step_*")):
            if not export.name[5:].isdigit() or int(export.name[5:]) > start_step:
                continue  # a .part, or a step this run redoes
            step = int(export.name[5:])
            tokens = self._tokens_at(step)
            if tokens is None:
                self.say(f"WARNING: downstream: no token count for {export} (no {EXPORT_INFO} nor checkpoint of "
                         f"step {step}); its jobs are not run")
                continue
            self._enqueue(jobs_of(self.cfg, self.run_dir.root, export, step, tokens), fresh=False)

    def _tokens_at(self, step: int) -> int | None:
        for path, pick in ((step_folder(self.run_dir.root, step) / EXPORT_INFO, lambda d: d["tokens"]),
                           (self.run_dir.checkpoints / f"step_{step:08d}" / "trainer.json",
                            lambda d: d["state"]["tokens"])):
            try:
                return int(pick(json.loads(path.read_text())))
            except (OSError, KeyError, ValueError, TypeError):
                continue
        return None

    def _enqueue(self, jobs: list[Job], fresh: bool) -> None:
        for job in jobs:
            if job.key in self.done or job.key in self.running or any(q.key == job.key for q in self.queue):
                continue
            if not fresh and job.path(EXIT).is_file():  # it ended before the kill: collect it
                self._record(Running(job, None), *self._exit_of(job))
            elif not fresh and self.launcher == "sbatch" and job.path(SLURM_ID).is_file():
                self.running[job.key] = Running(job, job.path(SLURM_ID).read_text().strip(), checked=0.0)
                self.say(f"downstream: following SLURM job {self.running[job.key].handle} ({job.name} of step "
                         f"{job.step}), submitted before the resume")
            else:
                self.queue.append(job)

    # -- one job -----------------------------------------------------------------------------------
    def _start_queued(self) -> None:
        while self.queue:
            if self.launcher == "process":
                busy = {r.slot for r in self.running.values()}
                slot = next((i for i in range(len(self.slots)) if i not in busy), None)
                if slot is None:
                    return
            else:
                slot = None
            job = self.queue.pop(0)
            self._prepare(job)
            try:
                handle, where = self._start(job, slot)
            except (OSError, subprocess.SubprocessError) as e:
                self._record(Running(job, None), None, f"could not start: {e}")
                continue
            self.running[job.key] = Running(job, handle, slot)
            self.say(f"downstream: {job.name} of step {job.step} started ({where}); log: {job.path(LOG)}")

    def _prepare(self, job: Job) -> None:
        job.folder.mkdir(parents=True, exist_ok=True)
        for name in (RESULT, EXIT, SLURM_ID):
            job.path(name).unlink(missing_ok=True)
        _write_json(job.path(SPEC), {**job.spec, "name": job.name, "step": job.step, "tokens": job.tokens,
                                     "export": job.export, "command": job.command})

    def _start(self, job: Job, slot: int | None) -> tuple[object, str]:
        if self.launcher == "sbatch":
            script = job.path("job.sbatch")
            code = shlex.quote(str(job.path(EXIT)))
            script.write_text(f"#!/bin/bash\ncd {shlex.quote(self.cwd)}\n{shlex.join(job.command)}\ncode=$?\n"
                              f"echo $code > {code}.part && mv {code}.part {code}\nexit $code\n")
            cmd = ["sbatch", "--parsable", f"--job-name=downstream-{job.name.replace('/', '-')}-{job.step}",
                   f"--output={job.path(LOG)}", "--open-mode=append", f"--chdir={self.cwd}", *self.cfg.sbatch_args,
                   str(script)]
            res = subprocess.run(cmd, env=dist.job_env(allocation=True), capture_output=True, text=True, timeout=120)
            if res.returncode:
                raise OSError(f"sbatch exited {res.returncode}: {res.stderr.strip()[-500:]}")
            job_id = res.stdout.strip().split(";")[0]
            job.path(SLURM_ID).write_text(job_id + "\n")
            return job_id, f"SLURM job {job_id}"
        gpu = self.slots[slot]
        with open(job.path(LOG), "a") as log:  # appended: a job started again after a resume keeps the first log
            log.write(f"$ {shlex.join(job.command)}\n")
            log.flush()
            cmd = [sys.executable, "-c", WRAPPER, str(os.getpid()), str(job.path(EXIT)), *job.command]
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd,
                                    env=dist.job_env(gpu), start_new_session=True)
        return proc, f"pid {proc.pid}, " + ("CPU" if gpu is None else f"GPU {gpu}")

    def _ended(self, r: Running) -> tuple[int | None, str] | None:
        """None while the job runs; else (exit code, why it failed or '')."""
        if self.launcher == "process":
            code = r.handle.poll()
            if code is None:
                return None
            return self._exit_of(r.job) if r.job.path(EXIT).is_file() else (code, "")  # else: the wrapper died
        if r.job.path(EXIT).is_file():
            return self._exit_of(r.job)
        if time.time() - r.checked < SLURM_CHECK_S:
            return None
        r.checked = time.time()
        state = slurm_state(str(r.handle))
        if state is None or state not in SLURM_ENDED and state != "GONE":
            return None
        if r.job.path(EXIT).is_file():  # it finished between the two looks
            return self._exit_of(r.job)
        return None, f"SLURM job {r.handle} ended ({state}) without an exit code"

    def _exit_of(self, job: Job) -> tuple[int | None, str]:
        try:
            return int(job.path(EXIT).read_text().strip()), ""
        except ValueError:
            return None, f"unreadable {job.path(EXIT)}"

    def _record(self, r: Running, code: int | None, why: str) -> None:
        job = r.job
        seconds = time.time() - r.started if r.handle is not None else None
        if code == 0 and not why:
            row = scored_row(job, seconds)
        else:
            detail = why or (f"exit code {code}" + (f" (signal {-code})" if code < 0 else "")
                             + f": {last_error(job.path(LOG))}")
            row = failed_row(job, detail, code)
        self.write(row)
        self.done.add(job.key)
        d = row["downstream"]
        if "failed" in d:
            self.say(f"WARNING: downstream job {job.name} of step {job.step} FAILED: {d['failed']}; log: "
                     f"{job.path(LOG)}; training goes on")
        else:
            rest = ", ".join(f"{k}={v:.4g}" for k, v in d["scores"].items() if k != d["metric"])
            self.say(f"downstream: {job.name} of step {job.step} ({job.tokens} tokens): {d['metric']} "
                     f"{d['score']:.4g}" + (f" ({rest})" if rest else ""))

    def _stop(self, r: Running) -> None:
        if self.launcher == "process":
            try:
                os.killpg(r.handle.pid, signal.SIGKILL)  # its own session: the command and what it started
            except ProcessLookupError:
                pass
            r.handle.wait()
        else:
            subprocess.run(["scancel", str(r.handle)], capture_output=True, timeout=60)


def slurm_state(job_id: str) -> str | None:
    """A SLURM job's state (PENDING, RUNNING, COMPLETED, ...), GONE once SLURM has forgotten it, None when SLURM
    does not answer."""
    try:
        res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode:
        return "GONE" if "invalid job id" in res.stderr.lower() else None
    fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    return fields.get("JobState")


def last_error(path: Path) -> str:
    """The last line of a log that mentions an error (else its last line)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()[-200:] if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=1))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def describe(cfg: DownstreamConfig, info: dist.DistInfo, output_dir: str, steps: list[int],
             resume_step: int) -> list[str]:
    """The dry run's lines: how the jobs run, then every export's jobs (steps: the export steps, [] when they follow
    a time budget) with what a run would do with each: run it, or nothing (its row is in metrics.jsonl)."""
    run_dir, launcher = RunDir(output_dir), choose_launcher(cfg)
    if launcher == "sbatch":
        how = f"sbatch jobs ({shlex.join(cfg.sbatch_args) or 'no extra sbatch options'})"
    else:
        slots = slots_of(cfg, info)
        how = f"child processes, {len(slots)} at a time on " + (
            f"GPU(s) {', '.join(map(str, slots))}" if slots[0] is not None else "the CPU")
    done = ledger(run_dir.metrics, resume_step)
    lines = [f"downstream    {len(jobs_of(cfg, run_dir.root, run_dir.exports, 0, 0))} job(s) per export as {how}; at "
             f"the end of the run they get at most {cfg.wait_at_end_s:g} s (eval.downstream.wait_at_end_s)"]
    for step in steps:
        jobs = jobs_of(cfg, run_dir.root, run_dir.exports / f"step_{step:08d}", step, 0)
        lines.append(f"  step {step:<8d}" + ", ".join(
            f"{j.name} ({'scored already' if j.key in done else 'to run'})" for j in jobs))
    first = steps[0] if steps else 0
    for job in jobs_of(cfg, run_dir.root, run_dir.exports / f"step_{first:08d}", first, 0):
        lines.append(f"  {job.name}: {shlex.join(job.command)}")
    return lines
