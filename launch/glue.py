"""Entry point: GLUE: every task with its official metrics, several seeds, a results table and submission files.

    deepspeed --num_gpus N launch/glue.py --config configs/glue_minilm.yaml [key=value ...]
    torchrun --nproc_per_node N launch/glue.py --config ...
    python launch/glue.py --config ...          # one process: the CPU, or one run per visible GPU in parallel
    python launch/glue.py --config ... --dry-run
"""

import sys

if __name__ == "__main__":
    sys.path.pop(0)  # this script's folder is the package `bertlaunch` (installed by setup.sh), not a module root
    from bertlaunch.cli.commands import glue

    sys.exit(glue())
