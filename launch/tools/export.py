"""Export a checkpoint to a Hugging Face model folder: `bertlaunch export CHECKPOINT OUT`
(or `python -m bertlaunch.tools.export`).

Works for every ZeRO stage without GPUs or a process group (launch/core/export.py): the fp32 master weights
are gathered from the per-rank partitions on disk, or read from the model file for stage 0. The checkpoint's
manifest is verified first.
"""

from __future__ import annotations

import argparse
import sys

from bertlaunch.core.exits import EXIT_CONFIG
from bertlaunch.core.export import ExportError, export


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bertlaunch export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="output_dir/checkpoints/step_NNNNNNNN")
    p.add_argument("out", help="folder for the Hugging Face model (config.json, model.safetensors, tokenizer)")
    args = p.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"exported {args.checkpoint} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
