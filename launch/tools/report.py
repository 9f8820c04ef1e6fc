"""Run report without an account: `bertlaunch report OUTPUT_DIR [OUTPUT_DIR ...] [--out DIR]`.

Reads each run's metrics.jsonl and writes PNG plots (loss and eval curves, learning rate, throughput,
MFU, eval.downstream's scores against tokens; several runs overlaid) and report.md (final metrics, tokens, wall
time, GPU-hours, downstream scores and failed downstream jobs) into --out (default: the first run's folder,
report/). A GLUE suite's output_dir stands for all of its runs (<task>/seed_<s>), and its results table heads the
report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bertlaunch.tasks.glue.results import glue_runs

PLOTS = [  # file, title, [(metric key, label)], y log-scale
    ("loss.png", "training loss", [("loss", "train")], False),
    ("eval.png", "evaluation", [("eval_loss", "eval loss"), ("perplexity", "perplexity"),
                                ("eval_accuracy", "accuracy"), ("eval_f1", "F1"), ("eval_matthews", "Matthews"),
                                ("eval_pearson", "Pearson")], False),
    ("lr.png", "learning rate", [("lr", "lr")], False),
    ("throughput.png", "throughput (tokens/s, all ranks)", [("tokens_per_s", "tokens/s")], False),
    ("mfu.png", "model FLOPs utilisation", [("mfu", "MFU")], False),
]


def load(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (is {run} an output_dir of a run?)")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def downstream(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """eval.downstream's scores: '<job> (<metric>)' -> [(tokens, score), ...] in token order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        d = r.get("downstream")
        if isinstance(d, dict) and d.get("score") is not None:
            out.setdefault(f"{d['job']} ({d['metric']})", []).append((r["tokens"], d["score"]))
    return {k: sorted(v) for k, v in out.items()}


def plot_downstream(runs: dict[str, list[dict]], out: Path, plt) -> list[str]:
    """downstream.png: each downstream job's score against the tokens trained (one panel per job)."""
    curves = {name: downstream(records) for name, records in runs.items()}
    jobs = sorted({job for c in curves.values() for job in c})
    if not jobs:
        return []
    fig, axes = plt.subplots(1, len(jobs), figsize=(5.5 * len(jobs), 3.6), squeeze=False)
    for ax, job in zip(axes[0], jobs):
        for name, c in curves.items():
            if job in c:
                ax.plot([t for t, _ in c[job]], [v for _, v in c[job]], marker="o", label=name)
        ax.set_title(f"downstream: {job}")
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "downstream.png", dpi=110)
    plt.close(fig)
    return ["downstream.png"]


def plot(runs: dict[str, list[dict]], out: Path) -> list[str]:
    import matplotlib  # lazy: an optional extra (pip install .[report]); report.md is written without it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend

    written = []
    for fname, title, keys, logy in PLOTS:
        present = [(k, label) for k, label in keys if any(series(r, k)[0] for r in runs.values())]
        if not present:
            continue
        fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 3.6), squeeze=False)
        for ax, (key, label) in zip(axes[0], present):
            for name, records in runs.items():
                x, y = series(records, key)
                if x:
                    ax.plot(x, y, marker="." if len(x) < 30 else None, label=name)
            ax.set_title(f"{title}: {label}" if len(present) > 1 else title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if logy:
                ax.set_yscale("log")
            if len(runs) > 1:
                ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written + plot_downstream(runs, out, plt)


def summary(name: str, records: list[dict], run: Path) -> dict:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    last = train[-1] if train else {}
    world = 1
    trainer = sorted(run.glob("checkpoints/step_*/trainer.json"))
    if trainer:
        world = json.loads(trainer[-1].read_text()).get("world_size", 1)
    hours = (last.get("time") or 0) / 3600
    out = {"run": name, "steps": last.get("step"), "final_loss": last.get("loss"), "tokens": last.get("tokens"),
           "wall_time_h": round(hours, 3), "gpu_hours": round(hours * world, 3), "devices": world}
    tps = [r["tokens_per_s"] for r in train[len(train) // 2:] if r.get("tokens_per_s")]
    if tps:
        out["tokens_per_s (2nd half, median)"] = round(sorted(tps)[len(tps) // 2])
    mfu = [r["mfu"] for r in train if r.get("mfu")]
    if mfu:
        out["mfu (median)"] = round(sorted(mfu)[len(mfu) // 2], 4)
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k.startswith(("eval_", "perplexity"))})
    results = run / "eval_results.json"
    if results.is_file():
        out["best"] = json.loads(results.read_text()).get("best")
    return out


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bertlaunch report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="output_dir of one or more runs")
    p.add_argument("--out", help="where the PNGs and report.md go (default: FIRST_RUN/report)")
    args = p.parse_args(argv)

    paths, head = [], []
    for r in map(Path, args.runs):
        inside = glue_runs(r)
        paths += inside or [r]
        if (r / "glue_results.md").is_file():
            head += (r / "glue_results.md").read_text().replace("# GLUE", "## GLUE").splitlines() + [""]
    names = [f"{p.parent.name}/{p.name}" if p.name.startswith("seed_") else (p.name or str(p)) for p in paths]
    runs = {name: load(p) for name, p in zip(names, paths)}
    out = Path(args.out or Path(args.runs[0]) / "report")
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(runs, out)
    rows = [summary(name, recs, path) for (name, recs), path in zip(runs.items(), paths)]
    keys = [k for k in rows[0] if k != "best"] + sorted({k for r in rows for k in r} - set(rows[0]) - {"best"})
    lines = ["# Run report", ""] + head + ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    for name, records in runs.items():
        for job, points in downstream(records).items():
            lines += ["", f"Downstream {job} of {name}: " + ", ".join(f"{fmt(v)} at {t} tokens" for t, v in points)]
        failed = [(r["step"], r["downstream"]) for r in records if "failed" in (r.get("downstream") or {})]
        lines += [f"- FAILED: {d['job']} of step {step}: {d['failed']} (log: {d['log']})" for step, d in failed]
    for r in rows:
        if r.get("best"):
            lines += ["", f"Best evaluation of {r['run']}: " + ", ".join(f"{k}={fmt(v)}" for k, v in r["best"].items())]
    lines += ["", "GPU-hours = wall time x devices (ranks). Plots:", ""] + [f"![{p}]({p})" for p in pngs]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'report.md'} and {len(pngs)} plot(s): {', '.join(pngs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
