"""The collective checkpoint: save / choose / restore, called by all ranks together (launch/core/checkpoint.py has
the file primitives it uses).

Which ranks share an output_dir is looked up once (`storage_groups`): all of them on a shared file system, one
group per node where each node has its own disk. The lowest rank of each group (its leader) prepares, commits and
prunes the group's copy; the manifest lists the files of every group, so a node-local copy verifies only once it
holds all of them (from checkpoint.remote, which gets every group's files: launch/core/upload.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from bertlaunch.core import dist, hooks
from bertlaunch.core.checkpoint import (
    DS_TAG,
    MANIFEST,
    CheckpointError,
    config_changes,
    file_entries,
    find_resume,
    fsync_dir,
    fsync_tree,
    list_checkpoints,
    load_client,
    prune,
    read_trainer,
    rng_state,
    set_rng_state,
    step_dir,
    tmp_dir,
    verify,
    write_json,
    write_manifest,
)
from bertlaunch.core.config import CheckpointConfig
from bertlaunch.core.layout import HF_META, METRICS, RunDir
from bertlaunch.core.remote import RemoteCheckpoints
from bertlaunch.core.upload import Uploads, share_out
from bertlaunch.data.corpus.storage import StorageError


def storage_groups(run_dir: RunDir, info: dist.DistInfo) -> list[list[int]]:
    """The ranks that see the same output_dir, grouped: each rank writes a file with this attempt's id, and
    lists whose files it sees (names never used before: no stale cache entry of a network file system)."""
    if info.world_size == 1:
        return [[0]]
    attempt = dist.all_gather_object(uuid.uuid4().hex if info.is_main else None)[0]
    probe = run_dir.root / ".ranks"
    probe.mkdir(parents=True, exist_ok=True)
    mine = probe / f"{attempt}-{info.rank:05d}"
    mine.write_text(attempt)
    dist.barrier()
    seen = [r for r in range(info.world_size) if (probe / f"{attempt}-{r:05d}").is_file()]
    groups = dist.all_gather_object(seen)
    mine.unlink()
    return [list(g) for g in sorted({tuple(g) for g in groups})]


class Checkpointer:
    """Reads only its config section, `checkpoint`, and the output_dir. dry=True (the dry run): no process group,
    nothing written, downloads only listed."""

    def __init__(self, output_dir: str, checkpoint: CheckpointConfig, info: dist.DistInfo, log, dry: bool = False):
        self.run_dir = RunDir(output_dir)
        self.root = self.run_dir.checkpoints
        self.info, self.keep_last, self.log, self.dry = info, checkpoint.keep_last, log, dry
        self.meta_writer = None  # rank 0: writes hf_meta/ (model config, tokenizer) into a save
        self.protected: set[int] = set()  # steps never pruned (the best fine-tuning checkpoint)
        self.remote = RemoteCheckpoints(checkpoint) if checkpoint.remote else None
        self.groups = [list(range(info.world_size))] if dry else storage_groups(self.run_dir, info)
        self.group = next(g for g in self.groups if info.rank in g) if not dry else [info.rank]
        self.leader = info.rank == self.group[0]
        self.uploads = None if dry or self.remote is None else Uploads(
            self.remote, info, log, checkpoint.keep_last, checkpoint.upload_timeout_s, self.run_dir)
        self.source: str | None = None  # the remote URL the chosen checkpoint came from
        self.last_saved: int | None = None  # the step of the checkpoint in output_dir that holds the current state
        if len(self.groups) > 1 and info.is_main:
            log(f"note: output_dir is not shared by all ranks ({len(self.groups)} groups of ranks see different "
                "copies, e.g. one disk per node): a local checkpoint holds only its own ranks' files, "
                + ("checkpoint.remote holds them all" if self.remote else
                   "so a resume needs them all: set checkpoint.remote (or use a shared file system)"))

    # -- save ------------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict) -> Path | None:
        """Write a checkpoint for `step`; None (and the previous one intact) if any rank failed."""
        final, tmp = step_dir(self.root, step), tmp_dir(self.root, step)
        if step == self.last_saved:
            return final  # already committed (e.g. end of run right after a periodic save, or the resumed step)
        if self.leader:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "client").mkdir(parents=True, exist_ok=True)
        dist.barrier()
        error = ""
        try:
            engine.save_checkpoint(str(tmp / "ds"), tag=DS_TAG, save_latest=False)
            torch.save(rng_state(), tmp / "client" / f"rank_{self.info.rank:05d}.pt")
            if hooks.installed is not None:  # tests only: a failing or killed save
                hooks.installed.saving(step)
        except Exception as e:  # disk full, I/O error: keep training state, drop this checkpoint
            error = f"{type(e).__name__}: {e}"
        failed = dist.all_reduce([1.0 if error else 0.0], "max")[0] > 0
        entries: dict = {}
        if not failed and self.leader:
            try:
                if self.info.is_main:
                    if self.meta_writer is not None:
                        self.meta_writer(tmp / HF_META)
                    write_json(tmp / "trainer.json", trainer_state)
                fsync_tree(tmp)
                entries = file_entries(tmp)  # this group's files: sizes and sha256
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        gathered = dist.all_gather_object((error, entries))  # every group's files, on every rank
        error = error or ("on another rank" if any(e for e, _ in gathered) else "")
        manifest = {name: meta for _, files in gathered for name, meta in files.items()}
        if not error and self.leader:
            try:
                write_manifest(tmp, manifest)  # the commit marker, written last
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.root)
                prune(self.root, self.keep_last, self.protected | self._uploading())
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        failed = dist.all_reduce([1.0 if error else 0.0], "max")[0] > 0 or failed
        if failed:
            if self.leader:
                shutil.rmtree(tmp, ignore_errors=True)
            if self.info.is_main:
                prev = list_checkpoints(self.root)
                kept = f"the previous checkpoint {prev[-1][1]} is intact" if prev else "no earlier checkpoint exists"
                self.log(f"ERROR: checkpoint at step {step} failed ({error or 'on another rank'}); {kept}; "
                         "training continues")
            return None
        self.last_saved = step
        if self.uploads is not None:
            have = {g[0]: set(gathered[g[0]][1]) for g in self.groups}
            mine = share_out(manifest, [(g, have[g[0]]) for g in self.groups]).get(self.info.rank, [])
            self.uploads.submit(step, final, mine, manifest, set(self.protected))
        return final

    def _uploading(self) -> set[int]:
        return self.uploads.in_use() if self.uploads is not None else set()

    # -- resume ----------------------------------------------------------------------------------
    def choose(self, resume: str) -> Path | None:
        """Rank 0 picks the checkpoint (verifying checksums); every rank gets the same answer or error. With
        checkpoint.remote and resume=auto, a newer remote checkpoint is downloaded first (`source` says from where)."""
        path, error = None, ""
        if self.info.is_main:
            if resume == "auto":
                path = find_resume(self.root, self.log)
            elif resume not in ("none", None, ""):
                reason = verify(Path(resume))
                if reason:
                    error = f"train.resume={resume}: checkpoint unusable: {reason}"
                path = Path(resume)
        chosen, error = dist.all_gather_object((str(path) if path else None, error))[0]
        if error:
            raise CheckpointError(error)
        chosen = Path(chosen) if chosen else None
        if self.remote is None:
            return chosen
        steps = self._remote_steps(chosen)  # also checks that the remote can be reached, whatever train.resume
        return self._newer_remote(chosen, steps) if resume == "auto" else chosen

    def _remote_steps(self, local: Path | None) -> list[int]:
        """Rank 0 lists the remote's committed checkpoints (and shows the listing); an unreachable remote or missing
        credentials stop the run here, with the URL and the fix."""
        steps, error = [], ""
        if self.info.is_main:
            try:
                steps = self._show_remote(int(local.name.split("_")[1]) if local is not None else -1)
            except StorageError as e:
                error = str(e)
        steps, error = dist.all_gather_object((steps, error))[0]
        if error:
            raise CheckpointError(f"checkpoint.remote: {error}")
        return steps

    def _complete_everywhere(self, ckpt: Path | None) -> bool:
        """Does every group's copy of `ckpt` verify? (On a shared file system rank 0 already checked it.)"""
        if ckpt is None or len(self.groups) == 1:
            return ckpt is not None
        ok = not self.leader or self.info.is_main or verify(ckpt) is None
        return dist.all_reduce([1.0 if ok else 0.0], "min", host=True)[0] > 0

    def _newer_remote(self, local: Path | None, steps: list[int]) -> Path | None:
        """The newest remote checkpoint newer than `local` that downloads and verifies, else `local`."""
        local_step = int(local.name.split("_")[1]) if local is not None else -1
        complete = self._complete_everywhere(local)
        for step in [s for s in reversed(steps) if s > local_step or (s == local_step and not complete)]:
            if self.dry:
                self.source = self.remote.where(f"step_{step:08d}")
                return step_dir(self.root, step)
            reasons = dist.all_gather_object(self._fetch(step) if self.leader else None)
            reason = next((r for r in reasons if r), None)
            if reason is None:
                self.source = self.remote.where(f"step_{step:08d}")
                if self.info.is_main:
                    self._fetch_metrics(step)
                return step_dir(self.root, step)
            self.log(f"WARNING: remote checkpoint {self.remote.where(f'step_{step:08d}')} is unusable ({reason}); "
                     "trying an older one")
        if local is not None and not complete:
            raise CheckpointError(f"checkpoint {local} is not complete on every node (the ranks' output_dirs are "
                                  "separate disks) and no remote copy in checkpoint.remote verifies; start fresh "
                                  "with train.resume=none")
        return local

    def _show_remote(self, local_step: int) -> list[int]:
        """Rank 0: what the remote holds and which checkpoint a resume takes (the dry run and the run alike);
        returns the committed steps."""
        listing = self.remote.steps()
        self.log(f"remote        {self.remote.where()}: " + (", ".join(
            f"step {s.step} ({s.files} file(s), {s.bytes / 2**20:.1f} MiB"
            + ("" if s.committed else ", incomplete: no manifest, ignored") + ")" for s in listing)
            or "no checkpoint yet"))
        committed = [s.step for s in listing if s.committed]
        if max(committed, default=-1) > local_step:
            self.log(f"remote        train.resume=auto takes remote step {committed[-1]} (newer than the local "
                     + (f"step {local_step})" if local_step >= 0 else "output_dir, which has none)")
                     + ", verified by sha256 when downloaded (an older one if it does not verify)")
        return committed

    def _fetch(self, step: int) -> str | None:
        """Leader of a group: make its copy of step_N whole from the remote; None when it verifies."""
        final = step_dir(self.root, step)
        if final.is_dir() and verify(final) is None:
            return None
        work = self.root / f".remote-step_{step:08d}"
        try:
            reason = self.remote.download(step, work)
        except (StorageError, OSError, ValueError, KeyError) as e:
            reason = f"{type(e).__name__}: {e}"
        if reason is None:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
            fsync_dir(self.root)
        else:
            shutil.rmtree(work, ignore_errors=True)
        return reason

    def _fetch_metrics(self, step: int) -> None:
        """A new node: the run's metrics.jsonl from the remote (the resumed run cuts it at `step`), unless the
        local one already reaches that step."""
        path = self.run_dir.metrics
        try:
            last = json.loads(path.read_text().strip().splitlines()[-1]).get("step", -1)
        except (OSError, IndexError, ValueError):
            last = -1
        if last >= step:
            return
        part = path.with_name(path.name + ".remote")
        try:
            if self.remote.get_file(METRICS, part):
                os.replace(part, path)
        except StorageError as e:
            self.log(f"WARNING: {e}: metrics.jsonl starts again at step {step}")

    def check_config(self, ckpt: Path, exact: dict) -> dict:
        trainer = self.remote.read_json(f"{ckpt.name}/trainer.json") if self.dry and self.source else read_trainer(
            ckpt)
        changes = config_changes(trainer["exact"], exact)
        if changes:
            raise CheckpointError(f"cannot resume exactly from {ckpt}: the config changed:\n  "
                                  + "\n  ".join(changes) + "\nrestore these values, start a new output_dir, "
                                  "or set train.resume=none to start fresh")
        return trainer

    def restore(self, engine, ckpt: Path, universal: bool, same_ranks: bool) -> None:
        tag_dir = ckpt / ("universal" if universal else "ds")
        path, _ = engine.load_checkpoint(str(tag_dir), tag=DS_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:  # DeepSpeed returns (None, None) instead of raising
            raise CheckpointError(f"DeepSpeed found no engine state under {tag_dir}/{DS_TAG}")
        if same_ranks:  # per-rank RNG streams only make sense for the same ranks
            set_rng_state(load_client(ckpt, self.info.rank))
        if ckpt.parent == self.root:
            self.last_saved = read_trainer(ckpt)["state"]["step"]

    def complete(self, steps: set[int]) -> None:
        """Node-local output_dirs, at the end (after the uploads drained): every group's copy of these checkpoints is
        made whole from checkpoint.remote, for what the end of the run reads (the export to final/, the best
        fine-tuning weights). A shared output_dir holds them whole already."""
        if len(self.groups) == 1 or self.remote is None:
            return
        for step in sorted(steps):
            reason = self._fetch(step) if self.leader and step_dir(self.root, step).is_dir() else None
            if reason:
                print(f"[rank {self.info.rank}] WARNING: checkpoint step {step} could not be completed from "
                      f"{self.remote.where()} ({reason}); the end of the run needs all its files", file=sys.stderr)
        dist.barrier()

    def partitioned(self, ckpt: Path) -> bool:
        """Does the checkpoint hold per-rank optimizer partitions? (Stage 0 in fp32 keeps one whole state.)"""
        if self.dry and self.source:
            return any(n.endswith("optim_states.pt") for n in self.remote.read_json(f"{ckpt.name}/{MANIFEST}")["files"])
        return any((ckpt / "ds" / DS_TAG).glob("*optim_states.pt"))

    def to_universal(self, ckpt: Path) -> None:
        """Convert the ZeRO checkpoint to DeepSpeed's universal format (once, next to it, in every group's copy)."""
        out = ckpt / "universal"
        if self.leader and not (out / DS_TAG).is_dir():
            work = ckpt / ".universal-tmp"
            shutil.rmtree(work, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   str(ckpt / "ds" / DS_TAG), "--output_folder", str(work / DS_TAG), "--no_strict",
                   "--inject_missing_state"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise CheckpointError(f"converting {ckpt} to DeepSpeed's universal format failed:\n"
                                      f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
            os.replace(work, out)
        dist.barrier()
