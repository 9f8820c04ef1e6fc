"""Shared test helpers: tiny corpora, launching real runs, killing them mid-run, reading outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    script = str(REPO / "launch" / f"{entry}.py")
    args = (["--config", str(config)] if config else []) + list(overrides)
    if ranks == 0:
        return [sys.executable, script] + args
    port = 29500 + (os.getpid() * 7 + int(time.time() * 1000)) % 20000
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port), script] + args


def run(entry: str, ranks: int, config, overrides, timeout: int = 600, check: bool = True, **env_extra):
    """ranks=0: plain `python launch/<entry>.py` (single process); else the deepspeed launcher."""
    proc = subprocess.run(command(entry, ranks, config, overrides), cwd=REPO, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_and_kill(entry: str, ranks: int, config, overrides, out_dir: Path, kill_after_step: int,
                 timeout: int = 600, **env_extra):
    """Start a run in its own process group; SIGKILL the whole group once metrics.jsonl reaches the step."""
    proc = subprocess.Popen(command(entry, ranks, config, overrides), cwd=REPO, env=env(**env_extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"run ended (exit {proc.returncode}) before step {kill_after_step}:\n"
                                     + proc.stdout.read()[-6000:])
            if last_step(out_dir / "metrics.jsonl") >= kill_after_step:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return last_step(out_dir / "metrics.jsonl")
            time.sleep(0.05)
        raise AssertionError("timed out waiting for the run to reach the kill step")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def last_step(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    best = 0
    for line in metrics.read_text().splitlines():
        try:
            best = max(best, json.loads(line).get("step", 0))
        except json.JSONDecodeError:
            pass
    return best


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]


def losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


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
