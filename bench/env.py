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


def write_result(res: dict, name: str, out_dir: str) -> None:
    """bench/results/<name>_<machine kind>.json; prints the summary."""
    import json
    from pathlib import Path

    out = Path(out_dir) / f"{name}_{res['machine']['kind']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res["summary"], indent=2))
    print(f"wrote {out}")
