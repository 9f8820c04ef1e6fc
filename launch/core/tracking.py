"""wandb on rank 0 only, and never fatal: any wandb failure becomes one warning, metrics.jsonl goes on.

- mode auto: WANDB_DISABLED=true / WANDB_MODE=disabled|offline|online when set, else online when an API
  key is configured (WANDB_API_KEY or a wandb entry in ~/.netrc), else offline with a hint on syncing;
  disabled: no wandb import at all.
- The run id is stored in every checkpoint; a resumed (or SLURM-requeued) run continues the same wandb
  run (resume="allow"). Steps the killed attempt had already logged are not logged again: an exact
  resume reproduces them bit for bit, so the values already in wandb are the right ones.
- The config is logged with secret-looking keys and values removed (launch/core/secrets.py: redact).
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import warnings
from pathlib import Path

from bertlaunch.core.config import WandbConfig
from bertlaunch.core.layout import RunDir
from bertlaunch.core.secrets import redact


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class Tracker:
    """Rows go to wandb at their step. A downstream score (launch/core/downstream.py) belongs to an export's step,
    long past when it arrives: it goes into the step wandb is filling (`open_step`), under keys of its own job,
    downstream/<job>/<metric>, plotted against downstream/<job>/tokens; a second row of the same job waits for the
    next step (after the run's last row: a step of its own), so that no value overwrites another."""

    def __init__(self, run, skip_until: int = 0):
        self.run, self.failed = run, False
        self.skip_until = skip_until  # steps already in wandb (a resumed run): not logged again
        self.open_step = skip_until + 1
        self.open_jobs: set[str] = set()  # downstream jobs already in open_step
        self.pending: list[dict] = []  # downstream rows waiting for a step without their job
        self.defined: set[str] = set()  # jobs whose x axis (their tokens) wandb knows

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, record: dict) -> None:
        if self.failed:
            return
        if isinstance(record.get("downstream"), dict):
            if "score" in record["downstream"]:  # a failed job has nothing to plot (metrics.jsonl has it)
                self.pending.append(record)
                self._flush_downstream()
            return
        step = int(record.get("step", 0))
        if step <= self.skip_until:
            return
        if step > self.open_step:
            self.open_step, self.open_jobs = step, set()
        try:
            self.run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
        except Exception as e:  # a tracking hiccup must not cost a training run
            self._fail(e)
        self._flush_downstream()

    def _flush_downstream(self) -> None:
        for row in list(self.pending):
            job = row["downstream"]["job"]
            if job in self.open_jobs or self.failed:
                continue
            self.pending.remove(row)
            self.open_jobs.add(job)
            try:
                if job not in self.defined:
                    self.run.define_metric(f"downstream/{job}/tokens")
                    self.run.define_metric(f"downstream/{job}/*", step_metric=f"downstream/{job}/tokens")
                    self.defined.add(job)
                self.run.log(downstream_items(row), step=self.open_step)
            except Exception as e:
                self._fail(e)

    def finish(self) -> None:
        while self.pending and not self.failed:  # nothing follows the run's last row: a step each
            self.open_step, self.open_jobs = self.open_step + 1, set()
            self._flush_downstream()
        if self.failed:
            return
        try:
            self.run.finish()
        except Exception as e:
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        self.failed = True
        warnings.warn(f"wandb failed ({type(e).__name__}: {e}); training continues, metrics.jsonl is complete",
                      stacklevel=3)


def downstream_items(row: dict) -> dict:
    """A downstream row's wandb values: downstream/<job>/<metric> for each score, /score (its main one), /tokens and
    /step (the export's)."""
    d = row["downstream"]
    key = f"downstream/{d['job']}"
    return {f"{key}/{k}": v for k, v in d["scores"].items()} | {
        f"{key}/score": d["score"], f"{key}/tokens": row["tokens"], f"{key}/step": row["step"]}


def auto_mode() -> tuple[str, str]:
    """log.wandb.mode=auto -> (mode, why). The ecosystem's own switches come first: WANDB_DISABLED=true
    (Hugging Face's) or WANDB_MODE=disabled turn wandb off, WANDB_MODE=offline/online picks that mode;
    otherwise online when an API key is configured, else offline."""
    if os.environ.get("WANDB_DISABLED", "").strip().lower() in ("true", "1", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("disabled", "offline", "online"):
        return env, f"WANDB_MODE={env}"
    if env == "dryrun":  # wandb's old name for offline
        return "offline", "WANDB_MODE=dryrun"
    if api_key_configured():
        return "online", "an API key is configured"
    return "offline", "no API key configured"


def make_tracker(w: WandbConfig, output_dir: str, config: dict, info, run_id: str | None) -> Tracker | None:
    """Rank 0's wandb run (its own section, log.wandb; `config` is the run's config, already redacted), continuing
    `run_id` when resuming. None on the other ranks, when disabled, or when wandb cannot start."""
    mode, why = (w.mode, "") if w.mode != "auto" else auto_mode()
    if mode == "disabled" or not info.is_main:
        return None
    if why == "no API key configured":
        print(f"wandb: no API key configured, logging offline to {RunDir(output_dir).wandb} "
              "(upload later with `wandb sync <run dir>`; log.wandb.mode=disabled turns it off)", flush=True)
    try:
        import wandb  # lazy: rank 0 only, and only when tracking is on (a heavy import)

        run_id = run_id or secrets.token_hex(4)  # wandb ids: 8 lowercase alnum
        # x_disable_meta: no command line / environment / host metadata in the run (they can hold secrets);
        # disable_git: the run folder is no git checkout (wandb would warn "git root ... does not exist")
        # flush the run's .wandb log every second (default 15 s): a SIGKILL then loses at most a second
        # of rows, and those are replayed from metrics.jsonl on resume (see `resume_tracker`)
        run = wandb.init(project=w.project, entity=w.entity, name=redact(w.name or Path(output_dir).name),
                         tags=redact(list(w.tags)) or None, id=run_id, resume="allow", mode=mode,
                         dir=output_dir, config=config,
                         settings=wandb.Settings(silent=True, x_disable_meta=True, save_code=False,
                                                 disable_git=True, x_transaction_log_flush_interval=1.0))
    except Exception as e:
        warnings.warn(f"wandb could not start ({type(e).__name__}: {e}); continuing without it", stacklevel=2)
        return None
    return Tracker(run)


def resume_tracker(tracker: Tracker, output_dir: str, start_step: int, previous_max_step: int) -> None:
    """Make a resumed run's wandb history exactly one row per step, as if the job had never stopped.

    The attempt that died may have reached wandb only up to some step (its last flush, or the last upload
    online). Rows after that and up to the checkpoint are replayed from metrics.jsonl (durable, already
    truncated to the checkpoint); rows after the checkpoint are recomputed identically by the resumed run
    and logged live. Downstream scores the resume kept in metrics.jsonl go to wandb when its history lacks them
    (by job and tokens). If what wandb holds cannot be read, nothing is replayed and steps the old attempt
    logged are skipped (the old behaviour: no duplicates, perhaps a gap)."""
    run_id = tracker.run_id
    known, scored = [getattr(tracker.run, "starting_step", 0) - 1], set()
    try:
        for d in RunDir(output_dir).wandb.glob(f"*run-*-{run_id}"):
            for rid, step, items in read_history(d):
                if rid in (run_id, None):
                    known.append(step)
                    scored |= {(k[len("downstream/"):-len("/tokens")], v) for k, v in items.items()
                               if k.startswith("downstream/") and k.endswith("/tokens")}
        last = max(known)
    except Exception:  # an unreadable log (other wandb version): fall back to skipping
        tracker.skip_until, tracker.open_step = previous_max_step, previous_max_step + 1
        return
    tracker.skip_until, tracker.open_step = last, last + 1
    path = RunDir(output_dir).metrics
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    for row in rows:
        d = row.get("downstream")
        if d is None and last < row.get("step", 0) <= start_step:
            tracker.log(row)
        elif isinstance(d, dict) and (d.get("job"), row.get("tokens")) not in scored:  # kept by the resume
            tracker.log(row)


def read_history(run_dir) -> list[tuple[str | None, int, dict]]:
    """(run id, step, {key: value}) of every history row in a wandb run folder's run-*.wandb log.

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each with a 7-byte
    header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) holding a protobuf Record. A record
    cut by a kill ends the scan."""
    from wandb.proto import wandb_internal_pb2 as pb  # lazy: wandb is a heavy import, needed with tracking only

    rows, run_id = [], None
    for path in sorted(Path(run_dir).glob("run-*.wandb")):
        data, block, pos, buf = path.read_bytes(), 32768, 7, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            if left < 7:
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if pos + 7 + length > len(data):
                break
            chunk = data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                rec = pb.Record.FromString(buf + chunk if kind == 4 else chunk)
                which = rec.WhichOneof("record_type")
                if which == "run":
                    run_id = rec.run.run_id
                elif which == "history":
                    items = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                    rows.append((run_id, rec.history.step.num, items))
            elif kind == 2:
                buf = chunk
            elif kind == 3:
                buf += chunk
    return rows
