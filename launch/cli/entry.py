"""The body of every entry point: arguments -> config (every problem at once) -> dry run, or distributed
set-up -> the task's run -> exit code (launch/core/exits.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from launch.core import configlib
from launch.core.exits import EXIT_CONFIG, launcher_exit


def parse_args(argv: list[str] | None, prog: str, doc: str):
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                epilog="Overrides: dotted keys, e.g. train.lr=3e-4 data.block_size=256")
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate everything, print the plan and one batch, train nothing")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p.parse_intermixed_args(argv)


def entry(argv: list[str] | None, prog: str, description: str, config_cls: type,
          dry_run: Callable[[object], int], run: Callable[[object, object], int]) -> int:
    """dry_run(cfg) and run(cfg, dist_info) return exit codes."""
    from launch.core import dist
    from launch.core.checkpoint import CheckpointError

    args = parse_args(argv, prog, description)
    try:
        cfg = configlib.load(config_cls, args.config, args.overrides)
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


def fail(msg: str, code: int = EXIT_CONFIG) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code
