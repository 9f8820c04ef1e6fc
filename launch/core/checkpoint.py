"""Atomic, verified checkpoints: DeepSpeed engine state + our client state, committed by a manifest.

Layout of output_dir/checkpoints/step_00000100/ (written as .tmp-step_00000100/, then renamed):
  ds/state/...            DeepSpeed's files (model, optimizer, scheduler; per-rank ZeRO partitions)
  client/rank_00000.pt    per rank: RNG states (python, numpy, torch, CUDA), weights_only-loadable
  trainer.json            step/token counters, every data stream's position, world size, wandb id,
                          the values of the config keys that must not change on resume
  manifest.json           written last: every file with size and sha256 = the commit marker

A checkpoint counts only once manifest.json is present and verifies. Older checkpoints are deleted only
after a newer one is committed. Saves that fail (disk full, I/O error) leave the previous one intact.

This module is the whole unit: the file primitives and RNG state (top), which config keys a resume may
change (`exact_keys`), and `Checkpointer`, the collective save / choose / restore that all ranks call
together (bottom).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from bertlaunch.core import configlib, dist, hooks
from bertlaunch.core.config import CheckpointConfig
from bertlaunch.core.layout import HF_META, RunDir
from bertlaunch.core.secrets import redact

MANIFEST = "manifest.json"
DS_TAG = "state"
STEP_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    pass


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return root / f".tmp-step_{step:08d}"


# -- files ---------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(ckpt: Path) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
    write_json(ckpt / MANIFEST, {"version": 1, "files": entries})


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not."""
    man = ckpt / MANIFEST
    if not man.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        entries = json.loads(man.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for rel, meta in entries.items():
        p = ckpt / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != meta["size"]:
            return f"{rel}: size {p.stat().st_size} != {meta['size']}"
        if sha256(p) != meta["sha256"]:
            return f"{rel}: sha256 mismatch (corrupt)"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(out)


def find_resume(root: Path, log=print) -> Path | None:
    """Newest checkpoint whose manifest verifies; warns about (and skips) broken newer ones."""
    for _, path in reversed(list_checkpoints(root)):
        reason = verify(path)
        if reason is None:
            return path
        log(f"WARNING: checkpoint {path} is unusable ({reason}); falling back to an older one")
    return None


def prune(root: Path, keep_last: int, protected: set[int] = frozenset()) -> None:
    """Delete all but the newest keep_last committed checkpoints (and `protected` steps), and stale
    temporary folders."""
    ckpts = list_checkpoints(root)
    for step, path in ckpts[:-keep_last] if keep_last > 0 else []:
        if step not in protected:
            shutil.rmtree(path, ignore_errors=True)
    newest = ckpts[-1][0] if ckpts else -1
    for p in root.glob(".tmp-step_*"):
        m = re.match(r"\.tmp-step_(\d+)", p.name)
        if m and int(m.group(1)) <= newest:
            shutil.rmtree(p, ignore_errors=True)


# -- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state(legacy=True)
    state = {"python": _tuples_to_lists(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_lists_to_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x


def load_client(ckpt: Path, rank: int) -> dict:
    """Our own per-rank file: plain tensors and containers only, so weights_only=True suffices."""
    return torch.load(ckpt / "client" / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=True)


def read_trainer(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer.json").read_text())


# -- what must not change between a checkpoint and its resume ----------------------------------------
# Config keys whose change keeps a resume exact (everything else is compared and reported by name).
# The micro-batch is a per-device memory setting: a resume re-plans it (and the accumulation) for its world size,
# keeping the global batch.
VOLATILE_PREFIXES = ("output_dir", "eval.", "log.", "checkpoint.", "train.resume", "train.max_steps",
                     "train.epochs", "train.nan_policy", "train.max_bad_steps", "train.dist_timeout_s",
                     "train.micro_batch_size", "data.num_workers", "data.audit", "task.test_file", "model.compile")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def exact_keys(cfg) -> dict:
    """The config values that must not change between a checkpoint and its resume (secrets redacted:
    they are stored in the checkpoint)."""
    flat = redact(flatten(configlib.to_dict(cfg)))
    if isinstance(flat.get("train.phases"), list):  # a phase's micro-batch is as volatile as train.micro_batch_size
        flat["train.phases"] = [{k: v for k, v in ph.items() if k != "micro_batch_size"} for ph in flat["train.phases"]]
    return {k: v for k, v in flat.items() if not k.startswith(VOLATILE_PREFIXES)}


def config_changes(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between the checkpoint's run and this one."""
    out = []
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            out.append(f"{key}: checkpoint has {saved.get(key)!r}, config has {current.get(key)!r}")
    return out


# -- collective save / restore (all ranks call these together) ---------------------------------------
class Checkpointer:
    """Reads only its config section, `checkpoint` (keep_last), and the output_dir."""

    def __init__(self, output_dir: str, checkpoint: CheckpointConfig, info: dist.DistInfo, log, meta_writer=None):
        self.root = RunDir(output_dir).checkpoints
        self.info, self.keep_last, self.log = info, checkpoint.keep_last, log
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
            if hooks.installed is not None:  # tests only: a failing or killed save
                hooks.installed.saving(step)
        except Exception as e:  # disk full, I/O error: keep training state, drop this checkpoint
            error = f"{type(e).__name__}: {e}"
        failed = dist.all_reduce([1.0 if error else 0.0], "max")[0] > 0
        if not failed and self.info.is_main:
            try:
                if self.meta_writer is not None:
                    self.meta_writer(tmp / HF_META)
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

    @staticmethod
    def partitioned(ckpt: Path) -> bool:
        """Does the checkpoint hold per-rank optimizer partitions? (Stage 0 in fp32 keeps one whole state.)"""
        return any((ckpt / "ds" / DS_TAG).glob("*optim_states.pt"))

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

