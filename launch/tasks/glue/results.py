"""The suite's outputs in output_dir: glue_results.json, glue_results.md, submission/ and submission.zip.

Scores are on GLUE's 0-100 scale. A task's score is the mean of its official metrics (each averaged over
seeds); the GLUE score is the mean of the task scores, as the leaderboard computes it. The submission
takes each task's test predictions from its best seed on dev.
"""

from __future__ import annotations

import csv
import json
import math
import os
import zipfile
from pathlib import Path

from bertlaunch.data.tables.glue import TASKS, GlueTask
from bertlaunch.tasks.glue.runner import Outcome
from bertlaunch.tasks.glue.suite import Run

# Dev-set numbers of bert-base-uncased fine-tuned with run_glue.py (batch 32, lr 2e-5, 3 epochs; MRPC and
# WNLI 5 epochs), from Hugging Face transformers' examples/pytorch/text-classification/README.md.
REFERENCE = {"bert-base-uncased": {
    "CoLA": {"matthews": 56.53}, "SST-2": {"accuracy": 92.32}, "MRPC": {"f1": 88.85, "accuracy": 84.07},
    "STS-B": {"pearson": 88.64, "spearman": 88.48}, "QQP": {"f1": 87.49, "accuracy": 90.71},
    "MNLI": {"accuracy": 83.91, "mm_accuracy": 84.10}, "QNLI": {"accuracy": 90.66}, "RTE": {"accuracy": 65.70},
    "WNLI": {"accuracy": 56.34}}}
REFERENCE_SOURCE = ("Hugging Face transformers, examples/pytorch/text-classification/README.md (bert-base-uncased, "
                    "dev sets, batch 32, lr 2e-5, 3 epochs; MRPC and WNLI 5)")


def in_glue_order(runs: list[Run]) -> list[GlueTask]:
    """The runs' tasks in the benchmark's own order (the runs themselves go largest first)."""
    return sorted({id(r.task): r.task for r in runs}.values(), key=lambda t: list(TASKS).index(t.name))


def reference_for(setting: str, pretrained: str | None) -> str | None:
    if setting != "auto":
        return None if setting == "none" else setting
    name = Path(str(pretrained or "")).name.lower()
    return next((k for k in REFERENCE if k in name), None)


def _stats(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    return mean, (math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def seed_scores(run: Run) -> dict[str, float] | None:
    """The run's official metrics (0-100) at its best checkpoint; None when it has not finished."""
    path = run.out / "eval_results.json"
    if not path.is_file():
        return None
    best = json.loads(path.read_text()).get("best") or {}
    values = {m: 100 * best[f"eval_{m}"] for m in run.task.metrics if f"eval_{m}" in best}
    return values if len(values) == len(run.task.metrics) else None


def collect(runs: list[Run], outcomes: dict[str, Outcome], reference: str | None) -> dict:
    tasks: dict[str, dict] = {}
    for task in in_glue_order(runs):
        mine = [r for r in runs if r.task is task]
        scores = {r.seed: seed_scores(r) for r in mine}
        entry: dict = {"seeds": [s for s, v in scores.items() if v is not None], "failed": {
            str(r.seed): (outcomes[r.name].message if r.name in outcomes else "not run yet")
            for r in mine if scores[r.seed] is None}}
        if entry["seeds"]:
            for m in task.metrics:
                values = {str(s): v[m] for s, v in scores.items() if v is not None}
                entry[m], entry[f"{m}_std"] = _stats(list(values.values()))
                entry[f"{m}_per_seed"] = values
            entry["score"] = sum(entry[m] for m in task.metrics) / len(task.metrics)
        if reference and task.name in REFERENCE[reference]:
            entry["reference"] = REFERENCE[reference][task.name]
        tasks[task.name] = entry
    scored = [t["score"] for t in tasks.values() if "score" in t]
    return {"tasks": tasks, "score": sum(scored) / len(scored) if scored else None,
            "complete": len(scored) == len(tasks), "scale": "0-100", "reference": reference,
            "reference_source": REFERENCE_SOURCE if reference else None}


def markdown(results: dict, tasks: list[GlueTask], title: str) -> str:
    ref = results["reference"]
    lines = [f"# GLUE dev results: {title}", "",
             f"| Task | Metric | Ours (mean ± std) | Per seed | {ref or 'Reference'} |", "|---|---|---|---|---|"]
    for task in tasks:
        t = results["tasks"][task.name]
        for m in task.metrics:
            if m in t:
                per = ", ".join(f"{v:.2f}" for v in t[f"{m}_per_seed"].values())
                ours = f"{t[m]:.2f} ± {t[m + '_std']:.2f}"
            else:
                per, ours = "", "failed"
            r = t.get("reference", {}).get(m)
            lines.append(f"| {task.name} | {m} | {ours} | {per} | {'' if r is None else f'{r:.2f}'} |")
    score = results["score"]
    ref_scores = [sum(v.values()) / len(v) for v in (results["tasks"][t.name].get("reference") for t in tasks) if v]
    ref_score = f"{sum(ref_scores) / len(ref_scores):.2f}" if ref_scores and len(ref_scores) == len(tasks) else ""
    lines.append(f"| **GLUE score** | mean of task means | **{'n/a' if score is None else f'{score:.2f}'}**"
                 f"{'' if results['complete'] else ' (incomplete)'} | | {ref_score} |")
    failed = [f"- {name} seed {s}: {msg}" for name, t in results["tasks"].items() for s, msg in t["failed"].items()]
    if failed:
        lines += ["", "Failed or unfinished runs (left out of the score):"] + failed
    if ref:
        lines += ["", f"Reference: {results['reference_source']}."]
    return "\n".join(lines) + "\n"


def _prediction(value: str, task: GlueTask) -> str:
    """Our predictions file -> the GLUE server's spelling: a label name, or STS-B's score in [0, 5]."""
    if task.labels is None:
        return f"{min(max(float(value), 0.0), 5.0):.3f}"
    return value if value in task.labels else task.labels[int(value)]  # hub runs name labels by id


def submission(runs: list[Run], results: dict, out: Path) -> list[str]:
    """submission/<file>.tsv per test set (index<TAB>prediction) from each task's best seed, and a zip."""
    folder = out / "submission"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, t in results["tasks"].items():
        if "score" not in t:
            continue
        mine = [r for r in runs if r.task.name == name and r.seed in t["seeds"]]
        best = max(mine, key=lambda r: sum(t[f"{m}_per_seed"][str(r.seed)] for m in r.task.metrics))
        files = {"": best.task.submission} | {n: f for n, (_, f) in best.task.extra_test.items()}
        for key, target in files.items():
            source = best.out / (f"predictions_{key}.tsv" if key else "predictions.tsv")
            if not source.is_file():
                continue
            with open(source, newline="") as f:
                rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            tmp = folder / (target + ".part")
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f, delimiter="\t", lineterminator="\n")
                w.writerow(["index", "prediction"])
                w.writerows([row["index"], _prediction(row["prediction"], best.task)] for row in rows)
            os.replace(tmp, folder / target)
            written.append(target)
    tmp = out / "submission.zip.part"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for target in sorted(written):
            z.write(folder / target, target)  # the server wants the files at the top of the zip
    os.replace(tmp, out / "submission.zip")
    return written


def write(runs: list[Run], outcomes: dict[str, Outcome], out: Path, reference: str | None, title: str) -> dict:
    results = collect(runs, outcomes, reference)
    results["submission"] = submission(runs, results, out)
    tasks = in_glue_order(runs)
    for name, text in (("glue_results.json", json.dumps(results, indent=1)),
                       ("glue_results.md", markdown(results, tasks, title))):
        (out / (name + ".part")).write_text(text)
        os.replace(out / (name + ".part"), out / name)
    return results


def glue_runs(folder: Path) -> list[Path]:
    """The run folders (<task>/seed_<s>/) of a GLUE suite's output_dir; [] for any other folder."""
    return sorted(p.parent for p in Path(folder).glob("*/seed_*/metrics.jsonl"))
