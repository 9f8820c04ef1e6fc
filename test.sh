#!/usr/bin/env bash
# Set up (setup.sh) and run the whole test suite on the CPU, slow multi-rank tests included.
#   bash test.sh                 # everything CI runs
#   bash test.sh -m "not slow"   # the quick unit tests only (extra args go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline DS_ACCELERATOR=cpu PYTHONUNBUFFERED=1
ruff check .
# SLURM for the tests marked `slurm`: two emulated nodes (network namespaces, see the script), else one
# node (the multi-node tests then skip, or fail under CI), else none (the slurm tests skip and say so)
bash .ci/slurm-cluster.sh --nodes 2 || bash .ci/slurm-cluster.sh \
    || echo "test.sh: SLURM could not be started; the slurm tests will be skipped and say so"
# two workers (pytest-xdist): the multi-rank tests spend much of their time waiting (on timeouts, the scheduler,
# child processes), so two run side by side on two cores; the SLURM tests share one worker (tests/conftest.py).
# pytest's own exit code is kept: 5 (no tests collected) fails like any other failure
python -m pytest -q --durations=15 -n 2 --dist loadgroup -m "slow or not slow" "$@" tests/
