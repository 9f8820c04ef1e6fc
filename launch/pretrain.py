"""Entry point: MLM pretraining.

    deepspeed --num_gpus N launch/pretrain.py --config configs/wikitext2_tiny.yaml [key=value ...]
    torchrun --nproc_per_node N launch/pretrain.py --config ...
    python launch/pretrain.py --config ...          # single process: one GPU or the CPU
    python launch/pretrain.py --config ... --dry-run
"""

import sys

if __name__ == "__main__":
    sys.path.pop(0)  # this script's folder is the package `bertlaunch` (installed by setup.sh), not a module root
    from bertlaunch.cli.commands import pretrain

    sys.exit(pretrain())
