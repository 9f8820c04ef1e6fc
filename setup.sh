#!/usr/bin/env bash
# Create ./.venv and install the project with its CPU pins (torch 2.13.0 CPU build, DeepSpeed built
# against it). GPU machines: install your CUDA torch first, then `pip install --no-build-isolation
# deepspeed && pip install -e .` (the package metadata itself does not pin torch).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# torch through pip: the CPU build lies on this kind of machine's disk, where pip finds it (uv does not look there)
python -c "import torch" >/dev/null 2>&1 || pip install -q -c constraints-cpu.txt torch
# the rest through uv when it can be had (the same packages and pins, a few times faster than pip), else pip;
# torch is already installed and pinned by constraints-cpu.txt, so neither installer can move it
INSTALL="pip install -q"
if pip install -q uv >/dev/null 2>&1; then INSTALL="uv pip install -q"; fi
# DeepSpeed ships as source: build it against the torch above (build isolation would fetch a CUDA torch)
python -c "import deepspeed" >/dev/null 2>&1 || $INSTALL --no-build-isolation -c constraints-cpu.txt deepspeed
$INSTALL -c constraints-cpu.txt -e ".[dev,report]"
echo "setup.sh: ready (.venv)"
