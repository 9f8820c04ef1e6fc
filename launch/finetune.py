"""Entry point: Fine-tuning (sentence pairs or single sentences: classification, regression).

    deepspeed --num_gpus N launch/finetune.py --config configs/mrpc_minilm.yaml [key=value ...]
    torchrun --nproc_per_node N launch/finetune.py --config ...
    python launch/finetune.py --config ...          # single process: one GPU or the CPU
    python launch/finetune.py --config ... --dry-run
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not launch/

from launch.tasks.classify.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
