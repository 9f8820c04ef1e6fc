"""Machine and version facts recorded in every benchmark JSON."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path


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


REPO = Path(__file__).resolve().parent.parent


def portable(obj, tmp_dirs=()):
    """`obj` with the paths of this machine made relative: the repository -> `.`, the shared data ->
    `../shared`, this interpreter -> `python`, a temporary folder -> `<tmp>` (results name files as a reader's
    checkout does, not as the machine that ran them did)."""
    if isinstance(obj, dict):
        return {k: portable(v, tmp_dirs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, tmp_dirs) for v in obj]
    if not isinstance(obj, str):
        return obj
    for tmp in tmp_dirs:
        obj = obj.replace(str(tmp), "<tmp>")
    obj = obj.replace(sys.executable, "python")
    obj = re.sub(r"/tmp/[\w.-]+", "<tmp>", obj)
    return obj.replace(str(REPO.parent / "shared"), "../shared").replace(str(REPO) + "/", "").replace(str(REPO), ".")


def save_json(res: dict, out: Path, indent: int = 2) -> None:
    """Write a result with portable paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(portable(res), indent=indent) + "\n")


def write_result(res: dict, name: str, out_dir: str) -> None:
    """bench/results/<name>_<machine kind>.json; prints the summary."""
    out = Path(out_dir) / f"{name}_{res['machine']['kind']}.json"
    save_json(res, out)
    print(json.dumps(res["summary"], indent=2))
    print(f"wrote {out}")


def bench_parser(doc: str):
    """argparse with the options every CPU bench shares: --files (WikiText-2 valid+test) and --out."""
    import argparse
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    shared = repo.parent / "shared" / "data" / "wikitext2"
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--files", nargs="+", default=[str(shared / "valid.txt"), str(shared / "test.txt")])
    ap.add_argument("--out", default=str(repo / "bench" / "results"))
    return ap


def repeat_corpus(files: list[str], repeat: int, tmp):
    """The files concatenated `repeat` times into tmp/corpus.txt (one file: same text for every path)."""
    from pathlib import Path

    text = "".join(Path(f).read_text(encoding="utf-8") for f in files)
    out = Path(tmp) / "corpus.txt"
    out.write_text(text * repeat, encoding="utf-8")
    return out


def run_pretrain(cfg_path, *overrides: str) -> float:
    """`python launch/pretrain.py --config CFG [overrides]` on the CPU; returns its wall time in seconds."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--config", str(cfg_path), *overrides], cwd=repo,
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0
