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
    """Stateless 64-bit mixer (Steele et al.); uint64 in, uint64 out; wraps modulo 2**64.
    In place on one temporary: [B, L] inputs run at memory speed, not allocator speed."""
    with np.errstate(over="ignore"):
        z = np.add(x, _GOLD, dtype=np.uint64)
        t = np.empty_like(z)
        for shift, mul in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            np.right_shift(z, np.uint64(shift), out=t)
            np.bitwise_xor(z, t, out=z)
            np.multiply(z, np.uint64(mul), out=z)
        np.right_shift(z, np.uint64(31), out=t)
        return np.bitwise_xor(z, t, out=z)


def block_keys(seed: int, parts: np.ndarray) -> np.ndarray:
    """uint64[B] keys from int[B, k] parts (e.g. epoch, file, offset, used), folded in order."""
    parts = np.asarray(parts, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = splitmix64(np.full(parts.shape[0], seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
        for j in range(parts.shape[1]):
            h = splitmix64(h ^ parts[:, j])
    return h


def block_key(seed: int, *parts: int) -> int:
    """One block's key (same function as block_keys)."""
    return int(block_keys(seed, np.array([parts], dtype=np.int64).reshape(1, -1))[0])


_SELECT_BITS = 24  # bits 40..63 of the token hash: selection
_KIND_MASK = np.uint64((1 << 20) - 1)  # bits 20..39: [MASK] (< 80%) / random (< 90%) / keep


def mask_tokens(ids: np.ndarray, keys: np.ndarray, *, special: np.ndarray, prob: float, mask_id: int,
                vocab_size: int, continuation: np.ndarray | None = None):
    """ids int[B, L] (pad/special included), keys uint64[B] -> (input_ids int64[B, L], labels int64[B, L]).

    special: bool[vocab] (never selected); continuation: bool[vocab] for whole-word masking, or None.
    One 64-bit hash per token supplies the selection and the 80/10/10 choice; the random replacement
    ids are hashed only for the ~1.5% of tokens that need one."""
    out, labels, _ = mask_tokens_rows(ids, keys, special=special, prob=prob, mask_id=mask_id,
                                      vocab_size=vocab_size, continuation=continuation)
    return out, labels


def mask_tokens_rows(ids, keys, *, special, prob, mask_id, vocab_size, continuation=None):
    """`mask_tokens` + int64[M]: the flat indices (into B*L) of the selected positions, ascending.
    After the per-token hash and selection, everything runs on the ~15% selected positions only."""
    ids = np.asarray(ids, dtype=np.int64)
    b, length = ids.shape
    keys = keys.astype(np.uint64)[:, None]
    pos = np.arange(length, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        h = splitmix64(keys ^ (pos * _GOLD))  # [B, L]
    is_special = special[ids]
    threshold = np.uint64(int(prob * (1 << _SELECT_BITS)))
    if continuation is None:
        selected = (h >> np.uint64(64 - _SELECT_BITS)) < threshold
    else:  # a word = a token and the '##' pieces after it (a special token always starts a word)
        word = np.cumsum(~continuation[ids] | is_special, axis=1).astype(np.uint64)
        with np.errstate(over="ignore"):
            h_word = splitmix64(keys ^ (word * np.uint64(0xA24BAED4963EE407)))
        selected = (h_word >> np.uint64(64 - _SELECT_BITS)) < threshold
    selected &= ~is_special
    rows = np.flatnonzero(selected)  # [M]
    original = ids.reshape(-1)[rows]
    labels = np.full_like(ids, -100)
    labels.reshape(-1)[rows] = original
    hs = h.reshape(-1)[rows]
    kind = (hs >> np.uint64(20)) & _KIND_MASK
    to_mask = kind < np.uint64(int(0.8 * (1 << 20)))
    to_random = ~to_mask & (kind < np.uint64(int(0.9 * (1 << 20))))
    new = np.where(to_mask, mask_id, original)
    if to_random.any():
        with np.errstate(over="ignore"):
            r = splitmix64(hs[to_random] ^ np.uint64(0xD1B54A32D192ED03))
        new[to_random] = (((r >> np.uint64(32)) * np.uint64(vocab_size)) >> np.uint64(32)).astype(np.int64)
    out = ids.copy()
    out.reshape(-1)[rows] = new
    return out, labels, rows
