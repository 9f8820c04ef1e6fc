#!/usr/bin/env bash
# Create ./.venv and install the project with its CPU pins (torch 2.13.0 CPU build, DeepSpeed built
# against it). GPU machines: install your CUDA torch first, then `pip install --no-build-isolation
# deepspeed && pip install -e .` (the package metadata itself does not pin torch).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel
pip install -q -c constraints-cpu.txt torch
# DeepSpeed ships as source: build it against the torch above (build isolation would fetch a CUDA torch)
python -c "import deepspeed" >/dev/null 2>&1 || pip install -q --no-build-isolation -c constraints-cpu.txt deepspeed
pip install -q -c constraints-cpu.txt -e ".[dev,report]"
echo "setup.sh: ready (.venv)"
