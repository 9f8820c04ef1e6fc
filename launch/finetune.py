"""Entry point: Fine-tuning (sentence pairs or single sentences: classification, regression).

    deepspeed --num_gpus N launch/finetune.py --config configs/mrpc_minilm.yaml [key=value ...]
    torchrun --nproc_per_node N launch/finetune.py --config ...
    python launch/finetune.py --config ...          # single process: one GPU or the CPU
    python launch/finetune.py --config ... --dry-run
"""

import sys

if __name__ == "__main__":
    sys.path.pop(0)  # this script's folder is the package `bertlaunch` (installed by setup.sh), not a module root
    from bertlaunch.cli.commands import finetune

    sys.exit(finetune())
