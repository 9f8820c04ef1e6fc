"""Model: presets, sparse MLM head (same loss as HF's dense head), vocab check."""

import pytest
import torch

from launch.core.config import ModelConfig
from launch.core.metrics import encoder_flops
from model.build import check_vocab, load_mlm
from model.mlm import MaskedLM


class Spec:
    vocab_size, pad_id = 1000, 0


def tiny(sparse=True, **kw):
    hf, _ = load_mlm(ModelConfig(preset="tiny", **kw), Spec, seed=0)
    return MaskedLM(hf, sparse_head=sparse).eval()


def test_sparse_head_loss_equals_dense():
    torch.manual_seed(0)
    model = tiny()
    ids = torch.randint(5, 1000, (4, 32))
    labels = torch.where(torch.rand(4, 32) < 0.15, ids, torch.full_like(ids, -100))
    attn = torch.ones_like(ids)
    attn[3, 20:] = 0
    labels[3, 20:] = -100
    dense = model.hf(input_ids=ids, attention_mask=attn, labels=labels).loss
    sparse = model(input_ids=ids, labels=labels, attention_mask=attn)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-6)
    dense.backward()
    g_dense = model.hf.bert.encoder.layer[0].attention.self.query.weight.grad.clone()
    model.zero_grad()
    model(input_ids=ids, labels=labels, attention_mask=attn).backward()
    torch.testing.assert_close(model.hf.bert.encoder.layer[0].attention.self.query.weight.grad, g_dense,
                               rtol=1e-5, atol=1e-7)


def test_nothing_masked_gives_zero_not_nan():
    model = tiny()
    ids = torch.randint(5, 1000, (2, 8))
    loss = model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert loss.item() == 0.0


def test_same_seed_same_weights_and_dropout_override():
    a, b = tiny(hidden_dropout=0.0), tiny(hidden_dropout=0.0)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert a.hf.config.hidden_dropout_prob == 0.0


def test_vocab_mismatch_is_an_error():
    with pytest.raises(ValueError, match="tokenizer has 30522 tokens but the model's embedding has 1000"):
        check_vocab(1000, 30522, "preset tiny")


def test_flops_formula_matches_hand_count():
    # BERT-base, seq 128, dense head: the 668 MFLOP/token reference figure
    per_token = encoder_flops(layers=12, hidden=768, intermediate=3072, seq=128, vocab=30522, tokens=1,
                              head_rows=1)
    assert round(per_token / 1e6) == 668
    # hand count for a tiny config: L=2, H=4, I=8, S=3, V=10, 6 tokens, 2 rows through the head
    layer = 8 * 4 * 4 + 4 * 4 * 8 + 4 * 3 * 4  # 128 + 128 + 48 = 304
    head = 2 * 4 * 4 + 2 * 4 * 10  # 112
    assert encoder_flops(layers=2, hidden=4, intermediate=8, seq=3, vocab=10, tokens=6,
                         head_rows=2) == 3 * (6 * 2 * layer + 2 * head)
