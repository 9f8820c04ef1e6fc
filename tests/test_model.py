"""Model: presets, sparse MLM head (same loss as HF's dense head), vocab check."""

import pytest
import torch

from bertlaunch.core.config import ModelConfig
from bertlaunch.core.metrics import encoder_flops
from bertlaunch.model.build import check_vocab, load_mlm
from bertlaunch.model.mlm import MaskedLM


class Spec:
    vocab_size, pad_id = 1000, 0


def tiny(sparse=True, **kw):
    torch.manual_seed(0)
    hf, _ = load_mlm(ModelConfig(preset="tiny", **kw), Spec, None)
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


def test_unpadded_classifier_equals_padded_forward_and_backward():
    """model/unpadded.py: packed sequences (no pads) give the padded path's logits and gradients."""
    import numpy as np

    from bertlaunch.data.tables.pairs import Encoded, collate
    from bertlaunch.model.classify import Classifier, load_classifier

    torch.manual_seed(0)
    hf, _ = load_classifier(ModelConfig(preset="tiny", hidden_dropout=0.0, attention_dropout=0.0), None, 3, None,
                            False, 1000)
    model = Classifier(hf, regression=False)
    rng = np.random.default_rng(0)
    lens = [5, 17, 3, 9, 12]
    enc = Encoded([rng.integers(5, 1000, n) for n in lens], [np.repeat([0, 1], [n // 2, n - n // 2]) for n in lens],
                  np.array([0, 2, 1, 1, 0]))
    idx = np.arange(len(lens))
    padded, packed = collate(enc, idx, 0, False), collate(enc, idx, 0, False, unpad=True)
    assert packed["input_ids"].shape == (sum(lens),) and packed["offsets"].tolist() == [0, 5, 22, 25, 34, 46]
    assert packed["position_ids"][5:22].tolist() == list(range(17)) and packed["meta"]["max_len"] == 17
    assert padded["meta"]["n_real"] == packed["meta"]["n_real"] == packed["meta"]["n_slots"] == sum(lens)

    def run(batch):
        model.zero_grad()
        kw = {k: v for k, v in batch.items() if k != "meta"}
        if "offsets" in batch:
            kw["max_len"] = batch["meta"]["max_len"]
        model(**kw).backward()
        return model(**{k: v for k, v in kw.items() if k != "labels"}), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()  # dropout 0: train mode runs the same arithmetic as eval
    (logits_a, grads_a), (logits_b, grads_b) = run(padded), run(packed)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)
    empty = collate(enc, idx[:0], 0, False, unpad=True)  # a short last global batch's empty slot
    assert empty["offsets"].tolist() == [0, 1] and empty["meta"]["n"] == 0


def test_unpadded_needs_a_bert_classifier():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from bertlaunch.model.unpadded import check_unpadded

    roberta = RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="task.unpad=true: the model is a RobertaForSequenceClassification, not a "
                                         "BertForSequenceClassification .*; set task.unpad=false"):
        check_unpadded(roberta)


def test_unpadded_bert_refuses_compile():
    """model.compile would be silently ignored on the pad-free BERT path: it is an error naming both keys."""
    from transformers import BertConfig, BertForSequenceClassification

    from bertlaunch.model.unpadded import check_unpadded

    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64))
    check_unpadded(bert)
    with pytest.raises(ValueError, match="task.unpad=true with model.compile=true: .*set model.compile=false"):
        check_unpadded(bert, compile_=True)
