"""Mean ± std of fine-tuning results over several runs (seeds, array tasks), or a GLUE suite's table:

    bertlaunch summary runs/mrpc_seed*        # reads each output_dir/eval_results.json
    bertlaunch summary --json runs/mrpc_seed*
    bertlaunch summary runs/glue_minilm       # a GLUE output_dir: its glue_results.md / .json
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import sys
from pathlib import Path


def collect(dirs: list[str]) -> tuple[list[str], dict[str, list[float]]]:
    found, values = [], {}
    for pattern in dirs:
        for d in sorted(glob.glob(pattern)) or [pattern]:
            f = Path(d) / "eval_results.json"
            if not f.is_file():
                print(f"warning: {f} not found (run unfinished?); skipped", file=sys.stderr)
                continue
            res = json.loads(f.read_text())
            found.append(d)
            for section in ("best", "test"):
                for k, v in (res.get(section) or {}).items():
                    if isinstance(v, (int, float)) and not k.endswith("_loss"):
                        values.setdefault(f"{section}.{k}", []).append(float(v))
    return found, values


def stats(xs: list[float]) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bertlaunch summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="fine-tuning output dirs (globs allowed)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    suites = [Path(d) for d in args.dirs if (Path(d) / "glue_results.json").is_file()]
    for d in suites:
        print((d / ("glue_results.json" if args.json else "glue_results.md")).read_text())
    if suites and len(suites) == len(args.dirs):
        return 0
    found, values = collect([d for d in args.dirs if Path(d) not in suites])
    if not found:
        print("error: no eval_results.json found in the given folders", file=sys.stderr)
        return 1
    table = {k: {"mean": stats(v)[0], "std": stats(v)[1], "n": len(v)} for k, v in sorted(values.items())}
    if args.json:
        print(json.dumps({"runs": found, "metrics": table}, indent=1))
        return 0
    print(f"{len(found)} run(s): {', '.join(found)}")
    for k, s in table.items():
        print(f"  {k:28s} {s['mean']:.4f} ± {s['std']:.4f}  (n={s['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
