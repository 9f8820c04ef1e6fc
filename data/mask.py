"""MLM masking that is a pure function of (seed, block key, position): reproducible on resume.

Each block carries a 64-bit key derived from where it starts in the corpus (epoch, file, piece byte
offset, tokens skipped): the same block gets the same mask no matter which rank, worker or batch it
lands in, and no RNG state has to be saved for it. Random numbers come from a counter-based hash
(splitmix64) evaluated vectorised over [B, L] with numpy.

BERT recipe (and HF DataCollatorForLanguageModeling's): each non-special token is selected with
probability p; of the selected, 80% become [MASK], 10% a random token, 10% stay; labels are the
original ids at selected positions and -100 elsewhere. Whole-word masking selects words (a token and
its following '##' pieces) with probability p and applies 80/10/10 per token.
"""

from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """Stateless 64-bit mixer (Steele et al.); uint64 in, uint64 out; wraps modulo 2**64."""
    with np.errstate(over="ignore"):
        z = x + _GOLD
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def block_key(seed: int, *parts: int) -> int:
    """Fold integers into one 64-bit key (order-sensitive)."""
    h = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    for p in parts:
        with np.errstate(over="ignore"):
            h = splitmix64(h ^ np.array([p & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return int(h[0])


def _uniform(h: np.ndarray, shift: int) -> np.ndarray:
    """24-bit uniform in [0, 1) from bits [shift, shift+24) of h."""
    return ((h >> np.uint64(shift)) & np.uint64(0xFFFFFF)).astype(np.float64) * (1.0 / (1 << 24))


def mask_tokens(ids: np.ndarray, keys: np.ndarray, *, special: np.ndarray, prob: float, mask_id: int,
                vocab_size: int, continuation: np.ndarray | None = None):
    """ids int[B, L] (pad/special included), keys uint64[B] -> (input_ids int64[B, L], labels int64[B, L]).

    special: bool[vocab] (never selected); continuation: bool[vocab] for whole-word masking, or None."""
    ids = np.asarray(ids, dtype=np.int64)
    b, length = ids.shape
    pos = np.arange(length, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        h_tok = splitmix64(keys.astype(np.uint64)[:, None] ^ (pos * _GOLD))  # [B, L]
        h_rnd = splitmix64(h_tok ^ np.uint64(0xD1B54A32D192ED03))
    is_special = special[ids]
    if continuation is None:
        u_select = _uniform(h_tok, 40)
    else:
        # word index of each token: a new word starts at every non-'##' token (and after specials)
        starts = ~continuation[ids] | is_special
        word = np.cumsum(starts, axis=1).astype(np.uint64)
        with np.errstate(over="ignore"):
            h_word = splitmix64(keys.astype(np.uint64)[:, None] ^ (word * np.uint64(0xA24BAED4963EE407)))
        u_select = _uniform(h_word, 40)
    selected = (u_select < prob) & ~is_special
    labels = np.where(selected, ids, -100)
    u_kind = _uniform(h_tok, 8)
    to_mask = selected & (u_kind < 0.8)
    to_random = selected & (u_kind >= 0.8) & (u_kind < 0.9)
    random_ids = ((h_rnd >> np.uint64(32)) * np.uint64(vocab_size)) >> np.uint64(32)
    out = np.where(to_mask, mask_id, np.where(to_random, random_ids.astype(np.int64), ids))
    return out, labels
