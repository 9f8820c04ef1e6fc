"""Shared test helpers: tiny corpora, launching real runs, killing them mid-run, reading outputs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from launch.tools.check_resume import compare, kill_when, last_step, launch_command, losses  # noqa: F401

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
WIKI_VALID = SHARED / "wikitext2" / "valid.txt"
WIKI_TEST = SHARED / "wikitext2" / "test.txt"
MRPC = SHARED / "mrpc"

needs_shared = pytest.mark.skipif(not WIKI_VALID.is_file(), reason="../shared/data is not present")


def env(**extra) -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline",
             PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def command(entry: str, ranks: int, config: str | Path | None, overrides: list[str]) -> list[str]:
    return launch_command(entry, ranks, config, overrides)


def run(entry: str, ranks: int, config, overrides, timeout: int = 900, check: bool = True, **env_extra):
    """ranks=0: plain `python launch/<entry>.py` (single process); else the deepspeed launcher."""
    proc = subprocess.run(command(entry, ranks, config, overrides), cwd=REPO, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_and_kill(entry: str, ranks: int, config, overrides, out_dir: Path, kill_after_step: int,
                 timeout: int = 900, **env_extra) -> int:
    """SIGKILL the whole process group once metrics.jsonl reaches the step; returns the last logged step."""
    return kill_when(command(entry, ranks, config, overrides), Path(out_dir), kill_after_step,
                     env=env(**env_extra), timeout=timeout)


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def make_corpus(path: Path, n_docs: int, words_per_doc=(5, 60), seed: int = 0, mode: str = "blank_line") -> Path:
    """Documents with unique ids so that coverage can be audited."""
    import random

    rng = random.Random(seed)
    vocab = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda river stone house "
             "light music paper garden window cloud").split()
    docs = []
    for i in range(n_docs):
        n = rng.randint(*words_per_doc)
        docs.append(f"doc{i} " + " ".join(rng.choice(vocab) for _ in range(n)))
    sep = "\n\n" if mode == "blank_line" else "\n"
    path.write_text(sep.join(docs) + "\n")
    return path


def wandb_history(run_dir: Path) -> list[tuple[str, int, dict]]:
    from launch.core.tracking import read_history

    return read_history(run_dir)
