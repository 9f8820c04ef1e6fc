"""The GLUE suite, wired: config -> the (task, seed) runs -> each an ordinary fine-tuning run -> results
table, glue_results.json and the submission folder. Exit code: 0 when every run finished, else the first
failed run's code (glue_results.* are written either way); 75 when stopped for requeue."""

from __future__ import annotations

from pathlib import Path

from launch.cli.entry import entry
from launch.tasks.glue.config import GlueConfig


def main(argv=None) -> int:
    return entry(argv, "launch/glue.py", "Fine-tune and score a BERT-style encoder on the GLUE benchmark.",
                 GlueConfig, dry_run, run)


def run(cfg: GlueConfig, info) -> int:
    from launch.core import configlib
    from launch.core.exits import EXIT_REQUEUE
    from launch.core.secrets import write_config
    from launch.core.session import log0
    from launch.tasks.glue import results, runner, suite

    log = log0(info)
    every = suite.runs(cfg)
    todo = every
    if cfg.glue.run_index is not None:
        if not 0 <= cfg.glue.run_index < len(every):
            raise configlib.ConfigError([f"glue.run_index={cfg.glue.run_index}: this suite has {len(every)} runs "
                                         f"(0..{len(every) - 1}); see --dry-run for the list"])
        todo = [every[cfg.glue.run_index]]
    slots, gpus = runner.slots_for(cfg, info)
    if info.is_main:
        write_config(cfg, cfg.output_dir)
    log(f"glue: {len(todo)} run(s), {slots} at a time: " + ", ".join(r.name for r in todo))
    outcomes = (runner.sequential(cfg, todo, info, log) if slots == 1 else
                runner.parallel(cfg, todo, slots, gpus, log))
    if any(o.code == EXIT_REQUEUE for o in outcomes.values()):
        log("glue: stopped for requeue; rerun the same command to resume")
        return EXIT_REQUEUE
    if info.is_main and cfg.glue.run_index is None:
        ref = results.reference_for(cfg.glue.reference, cfg.model.pretrained)
        res = results.write(every, outcomes, Path(cfg.output_dir), ref, cfg.model.pretrained or cfg.model.preset)
        print((Path(cfg.output_dir) / "glue_results.md").read_text(), flush=True)
        log(f"glue: submission files {', '.join(res['submission']) or 'none (no test sets)'} in "
            f"{Path(cfg.output_dir) / 'submission'} and submission.zip")
    failed = [o.code for o in outcomes.values() if o.code]
    return failed[0] if failed else 0


def dry_run(cfg: GlueConfig) -> int:
    """Every task's files, columns, labels, sizes and steps, and the list of runs; every problem at once."""
    from launch.cli.dryrun import _finish
    from launch.core import configlib, dist
    from launch.core.plan import make_plan
    from launch.tasks.glue import runner, suite

    problems: list[str] = []
    every = suite.runs(cfg)
    info = dist.detect()
    try:
        slots, _ = runner.slots_for(cfg, info)
    except configlib.ConfigError as e:
        problems += e.problems
        slots = 1
    print(f"glue          {len(every)} run(s) = {len(every) // max(len(cfg.glue.seeds), 1)} task(s) x seeds "
          f"{cfg.glue.seeds}; {slots} at a time; world size {info.world_size} ({info.launcher})")
    print(f"model         {cfg.model.pretrained or cfg.model.preset}"
          + (f"; {', '.join(cfg.glue.from_mnli)} start from MNLI's model" if cfg.glue.from_mnli else ""))
    for r in every[::max(len(cfg.glue.seeds), 1)]:
        try:
            ft = suite.finetune_config(cfg, r)
        except configlib.ConfigError as e:
            problems += e.problems
            continue
        rows, where, more = _tables(ft, r)
        problems += more
        p, more = make_plan(ft, info.world_size, examples=rows or 1, epochs=ft.train.epochs)
        problems += [f"{r.task.name}: {m}" for m in more]
        labels = "regression (a score)" if r.task.labels is None else "labels " + "/".join(r.task.labels)
        print(f"{r.task.name:13s} {labels}; metrics {', '.join(r.task.metrics)}; columns {ft.task.text_a!r}"
              + (f" + {ft.task.text_b!r}" if ft.task.text_b else "") + f" -> {ft.task.label!r}; "
              f"{p.total_steps} steps per run (batch {p.global_batch}, {ft.train.epochs:g} epochs, lr {ft.train.lr:g})")
        print(f"  data        {where}")
    for i, r in enumerate(every):
        state = "finished" if r.finished() else "to run"
        print(f"run {i:<9d} {r.name:22s} {state:9s} {r.out}")
    return _finish(problems)


def _tables(ft, run) -> tuple[int, str, list[str]]:
    """Read every table of the run (no tokenizer). -> (training rows, where and how big, problems)."""
    from data.tasks import infer_labels, read_rows, require_columns

    t = ft.task
    if t.dataset:
        return 0, (f"hub {t.dataset} ({t.dataset_config}): splits {t.train_split}, {t.eval_split}, {t.test_split}"
                   + "".join(f", {s}" for s in {**t.extra_eval, **t.extra_test}.values())), []
    needed = {"task.text_a": t.text_a, "task.label": t.label} | ({"task.text_b": t.text_b} if t.text_b else {})
    unlabelled = {k: v for k, v in needed.items() if k != "task.label"}
    tables = [("train", t.train_file, needed), ("dev", t.eval_file, needed)] + \
        [(f"dev {n}", f, needed) for n, f in t.extra_eval.items()] + \
        ([("test", t.test_file, unlabelled)] if t.test_file else []) + \
        [(f"test {n}", f, unlabelled) for n, f in t.extra_test.items()]
    problems, sizes, train_rows = [], [], 0
    for name, path, columns in tables:
        try:
            rows = read_rows(path, t.format, t.columns, t.text_a)
            require_columns(rows, columns)
            if name == "train":
                labels = infer_labels(rows, t.label, t.problem, t.labels)
                for i, row in enumerate(rows.rows):  # a label outside GLUE's set names the line
                    labels.encode(row[t.label], rows, i, t.label)
                train_rows = min(len(rows.rows), t.max_train_examples or len(rows.rows))
            sizes.append(f"{name} {len(rows.rows)}")
        except (ValueError, OSError) as e:
            problems.append(f"{run.task.name}: {e}")
    return train_rows, f"{Path(t.train_file).parent}: {', '.join(sizes)} rows", problems
