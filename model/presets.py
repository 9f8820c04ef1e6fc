"""The model presets by name (no heavy imports: the config checks read them)."""

from __future__ import annotations

import difflib

# BERT: (layers, hidden, heads, intermediate): Google's BERT sizes (+ a tiny one for tests).
PRESETS = {
    "tiny": (2, 64, 2, 256),
    "mini": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
    "bert-base": (12, 768, 12, 3072),
    "bert-large": (24, 1024, 16, 4096),
}

# ModernBERT (Warner et al. 2024, arXiv:2412.13663; answerdotai/ModernBERT-base / -large config.json):
# (layers, hidden, heads, GeGLU intermediate); every preset has the published local window of 128 tokens,
# global attention every 3rd layer (the first included), RoPE, pre-norm, no biases. The small sizes are ours.
MODERNBERT_PRESETS = {
    "modernbert-tiny": (2, 64, 2, 96),
    "modernbert-mini": (4, 256, 4, 384),
    "modernbert-small": (8, 512, 8, 768),
    "modernbert-base": (22, 768, 12, 1152),
    "modernbert-large": (28, 1024, 16, 2624),
}
MODERNBERT_WINDOW, MODERNBERT_GLOBAL_EVERY = 128, 3
ALL_PRESETS = {**PRESETS, **MODERNBERT_PRESETS}


def family(name: str) -> str:
    """The transformers model type a preset builds: bert or modernbert."""
    return "modernbert" if name in MODERNBERT_PRESETS else "bert"


def unknown_preset(name: str) -> str:
    """The problem line for a preset name that does not exist, with a did-you-mean."""
    close = difflib.get_close_matches(name, list(ALL_PRESETS), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"model.preset '{name}' is not a preset: {hint}the presets are {', '.join(ALL_PRESETS)}"
