"""Collective save / restore of a training run (all ranks call these together)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from launch import dist
from launch.checkpoint import (
    DS_TAG,
    CheckpointError,
    config_changes,
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


class Checkpointer:
    def __init__(self, output_dir: str, info: dist.DistInfo, keep_last: int, log, meta_writer=None):
        self.root = Path(output_dir) / "checkpoints"
        self.info, self.keep_last, self.log = info, keep_last, log
        self.meta_writer = meta_writer  # rank 0: writes hf_meta/ (model config, tokenizer) into a save
        self.protected: set[int] = set()  # steps never pruned (the best fine-tuning checkpoint)

    # -- save ------------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict) -> Path | None:
        """Write a checkpoint for `step`; None (and the previous one intact) if any rank failed."""
        final, tmp = step_dir(self.root, step), tmp_dir(self.root, step)
        if final.is_dir() and verify(final) is None:
            return final  # already committed (e.g. end of run right after a periodic save)
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "client").mkdir(parents=True, exist_ok=True)
        dist.barrier()
        error = ""
        try:
            engine.save_checkpoint(str(tmp / "ds"), tag=DS_TAG, save_latest=False)
            torch.save(rng_state(), tmp / "client" / f"rank_{self.info.rank:05d}.pt")
            _maybe_fail_for_test(step)
        except Exception as e:  # disk full, I/O error: keep training state, drop this checkpoint
            error = f"{type(e).__name__}: {e}"
        failed = dist.all_reduce([1.0 if error else 0.0], "max")[0] > 0
        if not failed and self.info.is_main:
            try:
                if self.meta_writer is not None:
                    self.meta_writer(tmp / "hf_meta")
                write_json(tmp / "trainer.json", trainer_state)
                fsync_tree(tmp)
                write_manifest(tmp)  # the commit marker, written last
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.root)
                prune(self.root, self.keep_last, self.protected)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        failed = dist.all_reduce([1.0 if error else 0.0], "max")[0] > 0
        if failed:
            if self.info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                prev = list_checkpoints(self.root)
                kept = f"the previous checkpoint {prev[-1][1]} is intact" if prev else "no earlier checkpoint exists"
                self.log(f"ERROR: checkpoint at step {step} failed ({error or 'on another rank'}); {kept}; "
                         "training continues")
            return None
        return final

    # -- resume ----------------------------------------------------------------------------------
    def choose(self, resume: str) -> Path | None:
        """Rank 0 picks the checkpoint (verifying checksums); every rank gets the same answer or error."""
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
        return Path(chosen) if chosen else None

    def check_config(self, ckpt: Path, exact: dict) -> dict:
        trainer = read_trainer(ckpt)
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

    def to_universal(self, ckpt: Path) -> None:
        """Convert the ZeRO checkpoint to DeepSpeed's universal format (once, next to it)."""
        out = ckpt / "universal"
        if self.info.is_main and not (out / DS_TAG).is_dir():
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


def _maybe_fail_for_test(step: int) -> None:
    """Fault injection for the tests (never set in normal use): BERTLAUNCH_FAIL_SAVE_AT=<step> raises
    ENOSPC while saving; BERTLAUNCH_KILL_IN_SAVE_AT=<step> SIGKILLs the process mid-save."""
    if os.environ.get("BERTLAUNCH_FAIL_SAVE_AT") == str(step):
        raise OSError(28, "No space left on device (injected by BERTLAUNCH_FAIL_SAVE_AT)")
    if os.environ.get("BERTLAUNCH_KILL_IN_SAVE_AT") == str(step):
        os.killpg(os.getpgrp(), signal.SIGKILL)

