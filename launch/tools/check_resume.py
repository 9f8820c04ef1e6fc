"""Check that resuming is exact for *your* config: `bertlaunch check-resume --config F [k=v ...]`.

Runs the config for a few steps straight through, then again with a real SIGKILL of the whole job
after a checkpoint and a resume, and compares per-step losses and the final weights bit for bit.
Exit code 0 when they match, 1 when they do not (the report says from which step).

    bertlaunch check-resume --config configs/wikitext2_tiny.yaml --ranks 2 --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from bertlaunch.core.layout import RunDir

REPO = Path(__file__).resolve().parents[2]


def launch_command(entry: str, ranks: int, config, overrides: list[str], port: int | None = None) -> list[str]:
    """ranks 0: `python launch/<entry>.py` (one process); else the deepspeed launcher with N ranks."""
    script = str(REPO / "launch" / f"{entry}.py")
    args = (["--config", str(config)] if config else []) + list(overrides)
    if ranks == 0:
        return [sys.executable, script] + args
    port = port or 29500 + (os.getpid() * 7 + int(time.time() * 1000)) % 20000
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port), script] + args


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


def losses(out_dir: Path) -> dict[int, float]:
    lines = RunDir(out_dir).metrics.read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, filter(None, lines)) if "loss" in r}


def kill_when(cmd: list[str], out_dir: Path, step: int, env=None, timeout: int = 1800, cwd=REPO) -> int:
    """Start `cmd` in its own process group; SIGKILL the whole group once metrics.jsonl reaches `step`.
    Returns the last step logged before the kill."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit {proc.returncode}) before step {step}:\n"
                                   + proc.stdout.read()[-6000:])
            if last_step(RunDir(out_dir).metrics) >= step:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return last_step(RunDir(out_dir).metrics)
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for step {step}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def compare(straight: Path, resumed: Path) -> list[str]:
    """Differences between two runs logged at every step (log.every=1), both ways: the steps (1..N in both), the
    loss of each step, the names of the tensors of final/model.safetensors and each tensor. Nothing logged or
    no tensor is a difference too: an empty comparison proves nothing."""
    la, lb = losses(straight), losses(resumed)
    problems = [f"{d}: no loss logged" for d, logged in ((straight, la), (resumed, lb)) if not logged]
    for name, steps in (("straight", sorted(la)), ("resumed", sorted(lb))):
        if steps != list(range(1, len(steps) + 1)):
            problems.append(f"the {name} run's logged steps are not 1..N: {steps}")
    problems += [f"step {s}: loss {la.get(s)!r} straight vs {lb.get(s)!r} resumed" for s in sorted(set(la) | set(lb))
                 if la.get(s) != lb.get(s)]
    wa, wb = (load_file(RunDir(d).final / "model.safetensors") for d in (straight, resumed))
    if not wa:
        problems.append(f"{straight}: final/model.safetensors holds no tensor")
    problems += [f"final weight {k}: only in the {'straight' if k in wa else 'resumed'} run"
                 for k in sorted(set(wa) ^ set(wb))]
    problems += [f"final weight {k} differs" for k in sorted(set(wa) & set(wb)) if not wa[k].equal(wb[k])]
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bertlaunch check-resume", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--entry", default="pretrain", choices=["pretrain", "finetune", "embed"])
    p.add_argument("--ranks", type=int, default=0, help="0: one process without a launcher; N: deepspeed, N ranks")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    p.add_argument("--kill-after", type=int, default=None, help="SIGKILL once this step is logged "
                   "(default: steps/2 + 1, just after the checkpoint at steps/2)")
    p.add_argument("--workdir", default=None, help="where the two runs go (default: a temporary folder)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    ckpt_every = max(args.steps // 2, 1)
    kill_after = args.kill_after or ckpt_every + 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="check_resume_"))
    common = list(args.overrides) + [f"train.max_steps={args.steps}", "log.every=1", "eval.every=0",
                                     f"checkpoint.every={ckpt_every}", "log.wandb.mode=disabled", "train.resume=auto"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    runs = {}
    for name in ("straight", "resumed"):
        out = work / name
        shutil.rmtree(out, ignore_errors=True)
        runs[name] = out
    cmd = lambda out: launch_command(args.entry, args.ranks, args.config, common + [f"output_dir={out}"])  # noqa: E731
    print(f"[check_resume] straight run: {args.steps} steps -> {runs['straight']}", flush=True)
    if subprocess.run(cmd(runs["straight"]), cwd=REPO, env=env, stdout=subprocess.DEVNULL).returncode:
        print("[check_resume] the straight run failed; run it by hand to see why", file=sys.stderr)
        return 2
    killed = kill_when(cmd(runs["resumed"]), runs["resumed"], kill_after, env=env)
    print(f"[check_resume] killed (SIGKILL, whole process group) after step {killed}; resuming", flush=True)
    if subprocess.run(cmd(runs["resumed"]), cwd=REPO, env=env, stdout=subprocess.DEVNULL).returncode:
        print("[check_resume] the resumed run failed", file=sys.stderr)
        return 2
    problems = compare(runs["straight"], runs["resumed"])
    if problems:
        print("[check_resume] NOT exact:\n  " + "\n  ".join(problems[:20]))
        return 1
    print(f"[check_resume] exact: {args.steps} per-step losses and all final weights are bit-identical "
          f"(killed after step {killed}, resumed from step {ckpt_every})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
