"""Entry point: Fine-tuning (sentence pairs or single sentences: classification, regression).

    deepspeed --num_gpus N launch/finetune.py --config configs/mrpc_minilm.yaml [key=value ...]
    torchrun --nproc_per_node N launch/finetune.py --config ...
    python launch/finetune.py --config ...          # single process: one GPU or the CPU
    python launch/finetune.py --config ... --dry-run
"""

import os
import sys

# Python puts this script's folder first on sys.path; it is the installed package `bertlaunch`, whose folders
# (core/, tasks/, ...) must not also be importable as top-level modules
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

try:
    from bertlaunch.cli.commands import finetune
except ModuleNotFoundError as e:
    if e.name != "bertlaunch":
        raise
    sys.exit("error: the bertlaunch package is not installed: run `bash setup.sh`, or `pip install -e .` in "
             "the repository")

if __name__ == "__main__":
    sys.exit(finetune())
