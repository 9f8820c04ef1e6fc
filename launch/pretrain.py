"""Entry point: MLM pretraining.

    deepspeed --num_gpus N launch/pretrain.py --config configs/wikitext2_tiny.yaml [key=value ...]
    torchrun --nproc_per_node N launch/pretrain.py --config ...
    python launch/pretrain.py --config ...          # single process: one GPU or the CPU
    python launch/pretrain.py --config ... --dry-run
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not launch/

from launch.tasks.mlm.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
