"""Entry point: sentence-embedding training ((query, positive[, negative]) rows, InfoNCE over the global batch,
retrieval scores on a BEIR folder; the result is a sentence-transformers folder).

    deepspeed --num_gpus N launch/embed.py --config configs/embed_minilm.yaml [key=value ...]
    torchrun --nproc_per_node N launch/embed.py --config ...
    srun python launch/embed.py --config ...        # one task per GPU (slurm/embed.sbatch)
    python launch/embed.py --config ...             # single process: one GPU or the CPU
    python launch/embed.py --config ... --dry-run
"""

import sys

if __name__ == "__main__":
    sys.path.pop(0)  # this script's folder is the package `bertlaunch` (installed by setup.sh), not a module root
    from bertlaunch.cli.commands import embed

    sys.exit(embed())
