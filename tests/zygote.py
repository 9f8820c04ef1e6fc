"""A warm process that forks test runs, so each run skips the ~8 s import of torch, transformers and
DeepSpeed (a 2-rank run: ~17 s -> ~8 s on 2 cores). Test-only; see tests/helpers.py `Job`.

Protocol: one JSON request per line on stdin, {"entry", "argv", "envs" (one environment per rank), "logs"};
the answer is one line with the pid of a job leader. The leader is the head of a new process group, forks
one process per rank (each runs the entry's main(argv) with its environment, stdout/stderr in
logs/<rank>.out|err), kills the others a few seconds after one fails (as launchers do), writes logs/exit and exits with
the job's code. A SIGKILL of the group is a kill of the whole job, dataloader workers included.

Nothing here runs a torch operation before forking: no thread pool exists yet, so the forks are clean.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

GRACE_S = 5.0


def run_rank(entry: str, argv: list[str], env: dict, logs: str, rank: int) -> int:
    os.environ.clear()
    os.environ.update(env)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the leader ignores them (a launcher); a rank must not
        signal.signal(sig, signal.SIG_DFL)
    for fd, name in ((1, f"{rank}.out"), (2, f"{rank}.err")):
        os.dup2(os.open(os.path.join(logs, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [f"launch/{entry}.py", *argv]
    from bertlaunch.cli.commands import embed, finetune, glue, pretrain
    from tests.faults import install_from_env

    install_from_env()
    try:
        return {"pretrain": pretrain, "finetune": finetune, "glue": glue, "embed": embed}[entry](argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def lead(req: dict) -> int:
    """In the leader: one child per rank; the job's exit code is the first failing rank's. Like a launcher,
    the leader outlives a SIGTERM / SIGUSR1 sent to the whole group: the ranks checkpoint and exit."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    pids = []
    for rank, env in enumerate(req["envs"]):
        pid = os.fork()
        if pid == 0:
            os._exit(run_rank(req["entry"], req["argv"], env, req["logs"], rank))
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = None  # after the first failure: the others get GRACE_S to report (their own watchdog), then die
    while len(codes) < len(pids):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            codes[pid] = os.waitstatus_to_exitcode(status)
            if codes[pid] != 0 and deadline is None:
                deadline = time.time() + GRACE_S
            continue
        if deadline is not None and time.time() > deadline:
            for other in set(pids) - set(codes):
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.02)
    code = next((codes[p] for p in pids if codes[p] != 0), 0)
    code = code if code >= 0 else 128 - code  # killed by a signal: like a shell reports it
    with open(os.path.join(req["logs"], "exit.part"), "w") as f:
        f.write(str(code))
    os.replace(os.path.join(req["logs"], "exit.part"), os.path.join(req["logs"], "exit"))
    return code


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401
    from transformers import BertForMaskedLM, BertForSequenceClassification  # noqa: F401

    import bertlaunch.cli.commands  # noqa: F401  (every task, the core, data and model)
    import tests.faults  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # leaders are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os._exit(lead(req))
        os.setpgid(pid, pid)  # also here: the group exists before the caller can signal it
        print(json.dumps({"pid": pid}), flush=True)


if __name__ == "__main__":
    main()
