"""Packing (concat-then-cut with the remainder carried) and MLM masking (rates, specials, reproducible)."""

import numpy as np
import pytest

from bertlaunch.data.corpus.reader import file_sizes, text_readers
from bertlaunch.data.mlm.batches import MLMSettings, collate_blocks
from bertlaunch.data.mlm.mask import block_key, mask_tokens
from bertlaunch.data.mlm.pack import Packer, PieceTokens
from bertlaunch.data.mlm.stream import StreamState, TextStream
from tests.helpers import WIKI_VALID, make_corpus, needs_shared


def stream_blocks(files, spec, block, last_block="pad", n_streams=1, mode="blank_line"):
    out = []
    for s in range(n_streams):
        out += list(TextStream(text_readers(files, mode, "text", 1 << 20, "strict"), file_sizes(files), spec,
                               block_size=block, last_block=last_block, state=StreamState(s, n_streams), finite=True))
    return out


def concat_reference(path, spec):
    text = open(path, encoding="utf-8").read()
    paras, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    paras += ["\n".join(cur)] if cur else []
    return np.concatenate([[spec.cls_id] + ids + [spec.sep_id] for ids in spec.encode(paras)])


@needs_shared
def test_packing_equals_concat_then_cut_on_wikitext(spec):
    ref = concat_reference(str(WIKI_VALID), spec)
    blocks = stream_blocks([str(WIKI_VALID)], spec, 128)
    ours = np.concatenate([b.tokens for b in blocks])
    assert np.array_equal(ours, ref)  # nothing dropped, nothing reordered, separators in place
    assert all(len(b.tokens) == 128 for b in blocks[:-1]) and 0 < len(blocks[-1].tokens) <= 128
    # real-token fraction: only the one tail block of the epoch is short
    assert len(ref) / (128 * len(blocks)) >= 0.995


def test_remainder_is_carried_not_dropped():
    packer = Packer(block_size=4)
    for i, n in enumerate([3, 3, 3]):  # 9 tokens -> two full blocks + 1 carried
        packer.add(PieceTokens(0, i, True, np.arange(10 * i, 10 * i + n, dtype=np.int32)))
    assert packer.take().tolist() == [0, 1, 2, 10]
    assert packer.take().tolist() == [11, 12, 20, 21]
    assert packer.available == 1 and packer.position() == (0, 2, 2, True, -1)
    assert packer.take().tolist() == [22]


@pytest.mark.parametrize("last_block", ["pad", "drop"])
def test_short_tail_padded_or_dropped_and_counted(tmp_path, spec, last_block):
    path = str(make_corpus(tmp_path / "c.txt", 30))
    blocks = stream_blocks([path], spec, 64, last_block)
    ref = concat_reference(path, spec)
    tail = len(ref) % 64
    assert tail  # the corpus is chosen so that there is a tail
    if last_block == "pad":
        assert len(blocks[-1].tokens) == tail and blocks[-1].dropped == 0
        batch = collate_blocks(blocks[-2:], spec, MLMSettings(64, 2, 0.15, False, 0))
        assert batch["meta"]["n_real"] == 64 + tail and batch["attention_mask"][1, tail:].sum() == 0
        assert (batch["labels"][1, tail:] == -100).all() and (batch["input_ids"][1, tail:] == spec.pad_id).all()
    else:
        assert len(blocks[-1].tokens) == 0 and blocks[-1].dropped == tail


def test_mask_rates_and_special_tokens(spec):
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, size=(256, 128))
    ids[:, 0], ids[:, -1], ids[:, 60:64] = spec.cls_id, spec.sep_id, spec.pad_id
    keys = np.array([block_key(42, i) for i in range(256)], dtype=np.uint64)
    inputs, labels = mask_tokens(ids, keys, special=spec.special_table, prob=0.15, mask_id=spec.mask_id,
                                 vocab_size=spec.vocab_size)
    selected = labels != -100
    special = spec.special_table[ids]
    assert not (selected & special).any() and (inputs[special] == ids[special]).all()
    rate = selected.sum() / (~special).sum()
    assert abs(rate - 0.15) < 0.005
    sel_in, sel_orig = inputs[selected], ids[selected]
    frac_mask = (sel_in == spec.mask_id).mean()
    frac_kept = (sel_in == sel_orig).mean()
    assert abs(frac_mask - 0.8) < 0.015 and abs(frac_kept - 0.1) < 0.012  # ~10% random, ~10% kept
    assert (labels[selected] == ids[selected]).all() and (inputs[~selected] == ids[~selected]).all()


def test_mask_is_a_function_of_key_only(spec):
    ids = np.full((4, 64), 2000)
    k = np.array([block_key(1, 5, 0, 123, 0)] * 2 + [block_key(1, 5, 0, 124, 0)] * 2, dtype=np.uint64)
    a, la = mask_tokens(ids, k, special=spec.special_table, prob=0.15, mask_id=spec.mask_id,
                        vocab_size=spec.vocab_size)
    b, lb = mask_tokens(ids[::-1].copy(), k[::-1].copy(), special=spec.special_table, prob=0.15,
                        mask_id=spec.mask_id, vocab_size=spec.vocab_size)
    assert np.array_equal(a[0], a[1]) and not np.array_equal(la[1], la[2])  # same key, same mask
    assert np.array_equal(a, b[::-1]) and np.array_equal(la, lb[::-1])  # position in the batch is irrelevant


@pytest.mark.parametrize("prob", [0.15, 0.3])  # 0.3: MosaicBERT's rate
def test_whole_word_masking_selects_all_pieces(spec, prob):
    tokens = spec.encode(["unbelievably tokenization internationalization " * 40])[0][:120]
    ids = np.array([tokens] * 64)
    keys = np.array([block_key(3, i) for i in range(64)], dtype=np.uint64)
    inputs, labels = mask_tokens(ids, keys, special=spec.special_table, prob=prob, mask_id=spec.mask_id,
                                 vocab_size=spec.vocab_size, continuation=spec.is_continuation)
    cont = spec.is_continuation[ids]
    sel = labels != -100
    # a '##' piece is selected exactly when the token before it is
    assert np.array_equal(sel[:, 1:][cont[:, 1:]], sel[:, :-1][cont[:, 1:]])
    assert prob - 0.05 < sel.mean() < prob + 0.05
    assert abs((inputs[sel] == spec.mask_id).mean() - 0.8) < 0.03  # 80/10/10 holds at either rate
