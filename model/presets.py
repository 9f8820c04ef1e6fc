"""The model presets by name (no heavy imports: the config checks read them)."""

# (layers, hidden, heads, intermediate): Google's BERT sizes (+ a tiny one for tests).
PRESETS = {
    "tiny": (2, 64, 2, 256),
    "mini": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
    "bert-base": (12, 768, 12, 3072),
    "bert-large": (24, 1024, 16, 4096),
}
