"""Entry point: GLUE: every task with its official metrics, several seeds, a results table and submission files.

    deepspeed --num_gpus N launch/glue.py --config configs/glue_minilm.yaml [key=value ...]
    torchrun --nproc_per_node N launch/glue.py --config ...
    python launch/glue.py --config ...          # one process: the CPU, or one run per visible GPU in parallel
    python launch/glue.py --config ... --dry-run
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not launch/

from launch.tasks.glue.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
