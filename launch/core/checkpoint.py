"""Atomic, verified checkpoints: DeepSpeed engine state + our client state, committed by a manifest.

Layout of output_dir/checkpoints/step_00000100/ (written as .tmp-step_00000100/, then renamed):
  ds/state/...            DeepSpeed's files (model, optimizer, scheduler; per-rank ZeRO partitions)
  client/rank_00000.pt    per rank: RNG states (python, numpy, torch, CUDA), weights_only-loadable
  trainer.json            step/token counters, every data stream's position, world size, wandb id,
                          the values of the config keys that must not change on resume
  manifest.json           written last: every file with size and sha256 = the commit marker

A checkpoint counts only once manifest.json is present and verifies. Older checkpoints are deleted only
after a newer one is committed. Saves that fail (disk full, I/O error) leave the previous one intact.

This module holds the file primitives and RNG state (top) and which config keys a resume may change
(`exact_keys`); launch/core/checkpointer.py has `Checkpointer`, the collective save / choose / restore that all
ranks call together, and launch/core/remote.py + upload.py the copy in checkpoint.remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from bertlaunch.core import configlib
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


def file_entries(ckpt: Path) -> dict[str, dict]:
    """Every file under the folder (but the manifest): relative path -> {size, sha256}."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(ckpt).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}


def write_manifest(ckpt: Path, entries: dict[str, dict]) -> None:
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
