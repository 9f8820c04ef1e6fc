"""What both entry points share: arguments, output folder, seeding, signals, exit codes."""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import yaml

from launch import configlib

EXIT_OK = 0
EXIT_CONFIG = 2  # bad config or input: nothing was trained
EXIT_NONFINITE = 3  # train.nan_policy=stop (or too many bad steps): last good state checkpointed
EXIT_REQUEUE = 75  # SIGTERM/SIGUSR1: checkpoint saved, rerun the same command to resume (EX_TEMPFAIL)

# Config keys whose change makes a resume inexact (checked against the checkpoint, reported by name).
VOLATILE_PREFIXES = ("output_dir", "eval.", "log.", "checkpoint.", "train.resume", "train.max_steps",
                     "train.epochs", "train.nan_policy", "train.max_bad_steps", "train.dist_timeout_s",
                     "data.num_workers", "data.audit", "task.test_file", "model.compile")

SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "auth", "credential")


def parse_args(argv: list[str] | None, prog: str, doc: str):
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                epilog="Overrides: dotted keys, e.g. train.lr=3e-4 data.block_size=256")
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate everything, print the plan and one batch, train nothing")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p.parse_intermixed_args(argv)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def exact_keys(cfg) -> dict:
    """The config values that must not change between a checkpoint and its resume (secrets redacted:
    they are stored in the checkpoint)."""
    return {k: v for k, v in redact(flatten(configlib.to_dict(cfg))).items()
            if not k.startswith(VOLATILE_PREFIXES)}


def looks_secret(key: str, value) -> bool:
    k = key.lower()
    if any(w in k for w in SECRET_WORDS) and not k.endswith(("tokenizer", "tokens", "_tokens")):
        return True
    return isinstance(value, str) and _secret_value(value)


def _secret_value(value: str) -> bool:
    v = value.strip()
    if v.startswith(("hf_", "sk-", "ghp_", "wandb_", "xoxb-", "AKIA")) and len(v) >= 16:
        return True
    env_secrets = [val for name, val in os.environ.items()
                   if val and len(val) >= 12 and any(w in name.lower() for w in SECRET_WORDS)]
    return any(s in v for s in env_secrets)


def redact(obj, prefix: str = ""):
    """Config dict with secret-looking keys/values replaced (for config.yaml, wandb, logs)."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if looks_secret(f"{prefix}{k}", v) and not isinstance(v, dict)
                    else redact(v, f"{prefix}{k}.")) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, prefix) for v in obj]
    return "<redacted>" if isinstance(obj, str) and _secret_value(obj) else obj


def write_config(cfg, output_dir: str) -> None:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(redact(configlib.to_dict(cfg)), sort_keys=False)
    tmp = out / "config.yaml.part"
    tmp.write_text(text)
    os.replace(tmp, out / "config.yaml")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class StopFlag:
    """SIGTERM / SIGUSR1 only set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum

    def __bool__(self) -> bool:
        return bool(self.signum)


def entry(argv, prog: str, description: str, load, dry_run, run) -> int:
    """The body of both entry points: config (every problem at once) -> dry run, or distributed setup ->
    run -> exit code. load(path, overrides) -> config; dry_run(cfg) and run(cfg, dist_info) -> exit code."""
    from launch import configlib, dist
    from launch.checkpoint import CheckpointError

    args = parse_args(argv, prog, description)
    try:
        cfg = load(args.config, args.overrides)
    except configlib.ConfigError as e:
        return fail(str(e))
    if args.dry_run:
        return dry_run(cfg)
    info = dist.init(cfg.train.dist_timeout_s)
    try:
        return launcher_exit(run(cfg, info), info.is_main)
    except (configlib.ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"[rank {info.rank}] error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        dist.destroy()


def launcher_exit(code: int, is_main: bool) -> int:
    """The process exit code. Under slurm/run_steps.sh (BERTLAUNCH_REQUEUE_FILE set) a checkpoint-and-stop
    exits 0 and rank 0 leaves the file: srun --kill-on-bad-exit would otherwise kill the ranks still
    closing (wandb, files) as soon as the first one exits 75. Everywhere else: 75."""
    marker = os.environ.get("BERTLAUNCH_REQUEUE_FILE")
    if code != EXIT_REQUEUE or not marker:
        return code
    if is_main:
        Path(marker).write_text(f"{EXIT_REQUEUE}\n")
    return EXIT_OK


def fail(msg: str, code: int = EXIT_CONFIG) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
