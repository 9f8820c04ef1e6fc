"""Fast-tokenizer access for dataloader workers (Rust `tokenizers`, no per-call Python overhead)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from pathlib import Path

import numpy as np
import tokenizers

from bertlaunch.data.corpus.embedded import resolve_tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """Picklable description of a tokenizer: workers re-open it from `path` (a tokenizer.json)."""

    path: str
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    unk_id: int
    vocab_size: int
    special_ids: tuple[int, ...]

    @cached_property
    def backend(self):
        tok = tokenizers.Tokenizer.from_file(self.path)
        tok.no_truncation()  # packing needs whole documents; some tokenizer.json files ship truncation on
        tok.no_padding()
        return tok

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    @cached_property
    def is_continuation(self) -> np.ndarray:
        """bool[vocab]: WordPiece '##' continuation tokens (whole-word masking groups them)."""
        out = np.zeros(self.vocab_size, dtype=bool)
        for token, idx in self.backend.get_vocab().items():
            if token.startswith("##") and idx < self.vocab_size:
                out[idx] = True
        return out

    @cached_property
    def special_table(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, dtype=bool)
        out[list(self.special_ids)] = True
        return out

    def __getstate__(self):  # drop cached Rust objects when sent to worker processes
        return {k: v for k, v in self.__dict__.items() if k not in ("backend", "is_continuation",
                                                                     "special_table")}

    def __setstate__(self, state):
        self.__dict__.update(state)


def find_tokenizer_json(name: str) -> Path:
    path = Path(resolve_tokenizer(name))
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no tokenizer.json at '{path}'; give a folder saved with "
                                "save_pretrained() by a fast tokenizer, or a tokenizer.json file")
    return path


def load_spec(name: str) -> TokenizerSpec:
    path = find_tokenizer_json(name)
    tok = tokenizers.Tokenizer.from_file(str(path))
    vocab = tok.get_vocab()
    cfg_file = path.parent / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}

    def token_id(key: str, default: str) -> int:
        tok_str = cfg.get(key, default)
        if isinstance(tok_str, dict):
            tok_str = tok_str.get("content", default)
        if tok_str not in vocab:
            raise ValueError(f"tokenizer {path}: special token {key}='{tok_str}' is not in the vocab; "
                             "a BERT-style tokenizer needs [CLS], [SEP], [PAD], [MASK], [UNK]")
        return vocab[tok_str]

    ids = {k: token_id(f"{k}_token", d) for k, d in
           (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("mask", "[MASK]"), ("unk", "[UNK]"))}
    special = tuple(sorted(set(ids.values()) | set(_added_special(tok))))
    return TokenizerSpec(str(path), ids["cls"], ids["sep"], ids["pad"], ids["mask"], ids["unk"],
                         tok.get_vocab_size(with_added_tokens=True), special)


def _added_special(tok) -> list[int]:
    try:
        return [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
    except AttributeError:
        return []


def load_hf_tokenizer(name: str):
    """transformers fast tokenizer (for saving next to the model and for fine-tuning pairs)."""
    # lazy: transformers takes seconds to import, and the token-cache build's spawned workers never need it
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # lazy: see above
    path = Path(resolve_tokenizer(name))
    if path.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path), unk_token="[UNK]", sep_token="[SEP]",
                                      pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    else:
        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
    if not tok.is_fast:
        raise ValueError(f"tokenizer '{name}' has no fast (Rust) version; convert it with "
                         "transformers and save tokenizer.json")
    backend = tok.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return tok


def flatten(ids: list[list[int]]) -> np.ndarray:
    total = sum(map(len, ids))
    return np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=total)
