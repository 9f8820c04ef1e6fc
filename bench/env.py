"""Machine and version facts recorded in every benchmark JSON."""

from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    import torch
    import transformers

    out = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "kind": "cpu"}
    for name in ("tokenizers", "datasets", "deepspeed"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
        out["kind"] = out["device"].replace("NVIDIA ", "").split()[0].lower()
    else:
        out["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return out
