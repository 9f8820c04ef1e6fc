"""The child process of a GLUE downstream job (launch/core/downstream.py, started by launch/core/jobs.py):

    python -m bertlaunch.tools.downstream output_dir/downstream/step_N/glue_MRPC/job.json

fine-tunes the job's export on its GLUE task with the GLUE suite (launch/tasks/glue/run.py: every seed, resuming a
seed that was interrupted and skipping one that finished), then writes the task's scores on GLUE's 0-100 scale
to result.json beside job.json: its official metrics (means over the seeds) and `score`, their mean. Exit code: the
suite's (0 only when every seed finished), 2 for a bad job file or config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bertlaunch.core import configlib, dist
from bertlaunch.core.downstream import RESULT
from bertlaunch.core.exits import EXIT_CONFIG
from bertlaunch.data.tables.glue import lookup
from bertlaunch.tasks.glue import run as glue_run
from bertlaunch.tasks.glue.downstream import suite_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bertlaunch.tools.downstream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("job", help="the job's job.json (written by the pretraining run)")
    args = p.parse_args(argv)
    try:
        spec = json.loads(Path(args.job).read_text())
        task = lookup(str(spec["task"])) if spec.get("kind") == "glue" else None
        if task is None:
            raise ValueError(f"not a GLUE job (kind {spec.get('kind')!r}, task {spec.get('task')!r})")
        cfg = suite_config(spec["glue"], task.name, spec["model"], spec["out"])
    except (OSError, ValueError, KeyError) as e:  # ConfigError is a ValueError
        print(f"error: {args.job}: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    info = dist.init(cfg.train.dist_timeout_s)
    try:
        code = glue_run.run(cfg, info)
    except (configlib.ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        code = EXIT_CONFIG
    finally:
        dist.destroy()
    if code:
        return code
    scores = json.loads((Path(cfg.output_dir) / "glue_results.json").read_text())["tasks"][task.name]
    result = {"score": scores["score"], **{m: scores[m] for m in task.metrics}}
    out = Path(args.job).with_name(RESULT)
    out.with_name(RESULT + ".part").write_text(json.dumps(result, indent=1))
    os.replace(out.with_name(RESULT + ".part"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
