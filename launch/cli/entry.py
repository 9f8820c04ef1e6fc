"""The body of every entry point: arguments -> config (every problem at once) -> the dry run, or distributed
set-up -> the run -> exit code (launch/core/exits.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from bertlaunch.core import configlib, dist
from bertlaunch.core.checkpoint import CheckpointError
from bertlaunch.core.exits import EXIT_CONFIG, launcher_exit


@dataclass(frozen=True)
class Command:
    """An entry point: its config class, its run and its dry run (each returns an exit code)."""

    prog: str
    description: str
    config: type
    run: Callable[[object, dist.DistInfo], int]  # under an initialised process group
    dry_run: Callable[[object, dist.DistInfo], int]  # no process group: the world as the launcher set it up
    plan_problems: Callable[[object, int], list[str]]  # the batch plan at this world size, reported with the config's


def parse_args(argv: list[str] | None, prog: str, doc: str):
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                epilog="Overrides: dotted keys, e.g. train.lr=3e-4 data.block_size=256")
    p.add_argument("--config", help="YAML run config (see configs/)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate everything, print the plan and one batch, train nothing")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p.parse_intermixed_args(argv)


def entry(argv: list[str] | None, command: Command) -> int:
    args = parse_args(argv, command.prog, command.description)
    world = dist.detect().world_size
    # a run: the config's problems and the plan's (batch arithmetic at this world size, the DeepSpeed JSON) in one
    # round, before anything starts; a dry run lists the plan's with all the others it finds
    more = None if args.dry_run else (lambda c: command.plan_problems(c, world))
    try:
        cfg = configlib.load(command.config, args.config, args.overrides, more=more)
    except configlib.ConfigError as e:
        return fail(str(e))
    if args.dry_run:
        return command.dry_run(cfg, dist.detect())
    info = dist.init(cfg.train.dist_timeout_s)
    try:
        return launcher_exit(command.run(cfg, info), info.is_main)
    except (configlib.ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"[rank {info.rank}] error: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        dist.destroy()


def fail(msg: str, code: int = EXIT_CONFIG) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code
