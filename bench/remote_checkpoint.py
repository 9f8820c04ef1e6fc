"""What checkpoint.remote costs the training: steps/s with uploads in flight, and the time the ranks are blocked
per checkpoint, against the same run without a remote, side by side (interleaved rounds, one process each).

    python bench/remote_checkpoint.py [--preset small] [--steps 60] [--every 10] [--rounds 3] [--remote s3|file]
                                      [--threads N]

The model is big enough that a checkpoint takes seconds on the CPU (`small`: 4 x 512 BERT, ~29M parameters,
fp32 weights + Adam moments: ~0.35 GB per checkpoint). The remote is a real S3 API on localhost (a moto server
process, reached through s3fs like a cloud bucket) or, with --remote file, a second folder (file://). Both live on
this machine's cores, which the training keeps busy: the uploader thread runs at a lower priority (launch/core/
upload.py `yield_cpu`), and the S3 server at the lowest, standing for a bucket that other machines serve.

From each run's metrics.jsonl (log.every=1: `time` is the training wall time at each step):
- steps/s = steps / training time, the saves and uploads included;
- blocked per checkpoint = the duration of the step that follows a save minus the median step (the save runs
  between two steps; everything the ranks wait for lands there).
Goals (issue 24): steps/s with a remote >= 0.9x without; blocked per checkpoint <= 1.05x.
Writes bench/results/remote_checkpoint_<machine>.json.
"""

from __future__ import annotations

import atexit
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.env import bench_parser, machine_info, repeat_corpus, run_pretrain, write_result  # noqa: E402


def start_s3(tmp: Path) -> str:
    """A moto S3 server on localhost, in a process of its own at the lowest CPU priority (a real bucket is served by
    other machines: here it may only take the cycles the training leaves), with the bucket `bench`; the
    environment of the runs points at it."""
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(tmp / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19))
    atexit.register(server.terminate)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"})
    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="bench")
            return "s3://bench"
        except Exception:  # not listening yet
            time.sleep(0.2)
    raise SystemExit(f"the S3 server did not start: {(tmp / 'moto.log').read_text()[-2000:]}")


def timings(metrics: Path, every: int) -> dict:
    """steps/s and the blocked seconds per checkpoint from one run's metrics.jsonl."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = {r["step"]: r["time"] for r in rows if "loss" in r and "time" in r}
    steps = sorted(times)
    dur = {s: times[s] - times[p] for p, s in zip(steps, steps[1:])}
    after_save = {s for s in dur if (s - 1) % every == 0 and s > 1}
    plain = statistics.median(d for s, d in dur.items() if s not in after_save)
    blocked = [dur[s] - plain for s in sorted(after_save)]
    return {"steps": len(steps), "train_s": times[steps[-1]], "steps_per_s": (steps[-1] - steps[0]) / (
        times[steps[-1]] - times[steps[0]]), "median_step_s": plain, "blocked_per_checkpoint_s": blocked}


def main() -> None:
    ap = bench_parser(__doc__)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--remote", choices=["s3", "file"], default="s3")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the training (default: all cores; 1 on this "
                    "2-core machine leaves a core free, as a GPU node's training does)")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = start_s3(tmp) if args.remote == "s3" else f"file://{tmp / 'second_disk'}"
        corpus = repeat_corpus(args.files, 1, tmp)
        cfg = tmp / "run.yaml"
        cfg.write_text(yaml.safe_dump({
            "model": {"preset": args.preset},
            "data": {"train_files": [str(corpus)], "block_size": 128, "num_workers": 1, "txt_documents": "line"},
            "train": {"max_steps": args.steps, "micro_batch_size": 8, "lr": 1e-4, "warmup_steps": 5,
                      "precision": "fp32"},
            "deepspeed": {"config": "ds_configs/zero0.json"}, "eval": {"every": 0},
            "log": {"every": 1, "progress": False, "wandb": {"mode": "disabled"}},
            "checkpoint": {"every": args.every, "keep_last": 2, "at_end": False}}))
        runs: dict[str, list[dict]] = {"local": [], "remote": []}
        for rnd in range(args.rounds):
            order = ("local", "remote") if rnd % 2 == 0 else ("remote", "local")  # neither always goes first
            for kind in order:
                out = tmp / f"{kind}{rnd}"
                extra = [f"checkpoint.remote={base}/run{rnd}"] if kind == "remote" else []
                wall = run_pretrain(cfg, f"output_dir={out}", *extra)
                t = timings(out / "metrics.jsonl", args.every)
                t["wall_s"] = wall
                if kind == "remote":  # what the run left there: every checkpoint it kept, committed
                    t["checkpoint_bytes"] = sum(p.stat().st_size for p in (out / "checkpoints").rglob("*")
                                                if p.is_file() and f"step_{args.steps - args.steps % args.every:08d}"
                                                in str(p))
                runs[kind].append(t)
                print(kind, rnd, json.dumps({k: v for k, v in t.items() if k != "blocked_per_checkpoint_s"}),
                      flush=True)
    sps = {k: statistics.median(r["steps_per_s"] for r in v) for k, v in runs.items()}
    blocked = {k: statistics.median(b for r in v for b in r["blocked_per_checkpoint_s"]) for k, v in runs.items()}
    ratio_sps = [r["steps_per_s"] / loc["steps_per_s"] for r, loc in zip(runs["remote"], runs["local"])]
    res = {"machine": machine_info(), "command": " ".join(sys.argv), "remote": args.remote, "preset": args.preset,
           "training_threads": args.threads or os.cpu_count(),
           "steps": args.steps, "checkpoint_every": args.every, "runs": runs,
           "summary": {"steps_per_s_local": sps["local"], "steps_per_s_remote": sps["remote"],
                       "steps_per_s_ratio_median_of_rounds": statistics.median(ratio_sps),
                       "blocked_per_checkpoint_s_local": blocked["local"],
                       "blocked_per_checkpoint_s_remote": blocked["remote"],
                       "blocked_ratio": blocked["remote"] / blocked["local"],
                       "checkpoint_bytes": runs["remote"][0].get("checkpoint_bytes"),
                       "goals": "steps_per_s ratio >= 0.9, blocked ratio <= 1.05"}}
    name = f"remote_checkpoint_{args.remote}" + (f"_threads{args.threads}" if args.threads else "")
    write_result(res, name, args.out)


if __name__ == "__main__":
    main()
