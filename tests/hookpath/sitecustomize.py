"""Tests only: on PYTHONPATH of runs started as real processes (srun, the entry scripts), this installs the
fault hooks of tests/faults.py from the environment at interpreter start."""

import os
import sys

if any(k.startswith("BERTLAUNCH_") for k in os.environ):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests.faults import install_from_env

    install_from_env()
