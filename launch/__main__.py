"""`bertlaunch COMMAND [args]` (or `python -m bertlaunch COMMAND`): every entry point under one name.

    bertlaunch pretrain --config C [--dry-run] [key=value ...]   (= python launch/pretrain.py)
    bertlaunch finetune --config C ...                            (= python launch/finetune.py)
    bertlaunch glue --config C ...                                (= python launch/glue.py)
    bertlaunch embed --config C ...                               (= python launch/embed.py)
    bertlaunch prepare --config C --out DIR                       token cache
    bertlaunch export CHECKPOINT OUT                              a checkpoint as a Hugging Face folder
    bertlaunch report OUTPUT_DIR ...                              plots and report.md
    bertlaunch summary OUTPUT_DIR ...                             mean ± std over seeds, GLUE tables
    bertlaunch retrieval MODEL DATA_DIR [--split S] [--out F]     nDCG@10, Recall@100, MRR@10 on a BEIR folder
    bertlaunch check-resume --config C [--ranks N]                SIGKILL + resume vs a straight run

Multi-process launches keep using the entry scripts: `deepspeed launch/pretrain.py ...`, `torchrun ...`, `srun ...`.
"""

from __future__ import annotations

import difflib
import sys

from bertlaunch.cli.commands import embed, finetune, glue, pretrain
from bertlaunch.tools import check_resume, export, prepare, report, retrieval, summary

COMMANDS = {"pretrain": pretrain, "finetune": finetune, "glue": glue, "embed": embed, "prepare": prepare.main,
            "export": export.main, "report": report.main, "summary": summary.main, "retrieval": retrieval.main,
            "check-resume": check_resume.main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        print(f"error: unknown command '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
              + f"; the commands are: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[name](rest)


if __name__ == "__main__":
    sys.exit(main())
