"""The embedding task on a tiny BERT, in-process: a run scored on a BEIR folder at every epoch, the best checkpoint
exported as a sentence-transformers folder that `bertlaunch retrieval` scores the same; GradCache against the plain
path; pooling; the dry run and config problems. (2 ranks, kill/resume: tests/test_embed_dist.py and the kill matrix;
sentence-transformers itself: tests/test_embed_st.py.)"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
import transformers

from bertlaunch.data.tables.triples import TripleColumns, collate_rows, load_triples
from bertlaunch.data.tokenize import load_hf_tokenizer
from bertlaunch.model.embed import Encoder, pool, read_sentence_transformers
from bertlaunch.tasks.embed.config import EmbedConfig
from bertlaunch.tasks.embed.loss import GradCache, local_cross_entropy
from bertlaunch.tasks.embed.spec import unpadded
from bertlaunch.tasks.embed.task import encode_batch
from bertlaunch.tools import retrieval
from tests.embed_data import write_beir, write_triples
from tests.families import family_config
from tests.helpers import read_metrics

NO_DROPOUT = {"model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}


@pytest.fixture
def embed_config(tmp_path, tiny_config):
    """embed_config(overrides) -> a tiny embedding run on 48 rows with hard negatives, scored on a BEIR folder."""
    train = write_triples(tmp_path / "train.jsonl", 48, negative=True)
    beir = write_beir(tmp_path / "beir")
    return lambda over=None: tiny_config("embed", {"task.train_file": train, "task.negative": "negative",
                                                   "task.eval_dir": beir, "train.global_batch_size": 16,
                                                   "train.micro_batch_size": 16, **(over or {})})


def test_a_run_keeps_the_best_evaluation_and_exports_what_it_scored(tmp_path, embed_config, inproc, capfd):
    cfg = embed_config({"train.epochs": 2, "train.lr": 3e-3})
    inproc("embed", cfg)
    out = tmp_path / "out"
    evals = [r for r in read_metrics(out) if "eval_ndcg@10" in r]
    assert [r["step"] for r in evals] == [3, 6] and all({"eval_recall@100", "eval_mrr@10"} <= set(r) for r in evals)
    best = max(evals, key=lambda r: r["eval_ndcg@10"])
    results = json.loads((out / "eval_results.json").read_text())
    assert results["metric"] == "ndcg@10" and results["best_step"] == best["step"]
    settings = read_sentence_transformers(out / "final")
    assert (settings.pooling, settings.normalize, settings.max_length) == ("mean", True, 32)
    capfd.readouterr()
    assert retrieval.main([str(out / "final"), str(tmp_path / "beir"), "--out", str(tmp_path / "r.json")]) == 0
    scored = json.loads((tmp_path / "r.json").read_text())
    assert all(abs(scored[k] - best[f"eval_{k}"]) < 1e-6 for k in ("ndcg@10", "recall@100", "mrr@10")), (scored, best)
    assert "ndcg@10" in capfd.readouterr().out


def test_grad_cache_gives_the_losses_of_one_big_batch(tmp_path, embed_config, inproc):
    """Dropout off: chunks of 4 with GradCache, and 16 in one forward, give the same losses step by step."""
    cfg = embed_config(NO_DROPOUT)
    inproc("embed", cfg, [f"output_dir={tmp_path / 'plain'}"])
    inproc("embed", cfg, [f"output_dir={tmp_path / 'cached'}", "task.grad_cache=true", "train.micro_batch_size=4"])
    plain, cached = ([r["loss"] for r in read_metrics(tmp_path / n) if "loss" in r] for n in ("plain", "cached"))
    assert len(plain) == 3 and max(abs(a - b) for a, b in zip(plain, cached)) < 1e-5, (plain, cached)


def test_grad_cache_gradients_equal_autograd_with_dropout_drawn_once():
    """GradCache's recompute draws the same dropout as its cached pass: its gradients (as DeepSpeed scales them) are
    autograd's through the same forwards, for hard negatives and a short chunk."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Dropout(0.3))
    chunks = [{"x": torch.randn(3 * n, 8), "meta": {"n": n}} for n in (3, 2, 3)]  # queries, positives, negatives

    def encode(chunk):
        return F.normalize(layer(chunk["x"]), dim=1)

    torch.manual_seed(7)
    rows = torch.cat([encode(c).view(3, c["meta"]["n"], 6) for c in chunks], 1).reshape(-1, 6)
    (local_cross_entropy(rows, [8], 0, 3, 0.05) / 8).backward()
    want = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    torch.manual_seed(7)
    cache = GradCache(encode, chunks, [8], 0, 3, 0.05, 8, 1, len(chunks))
    for a in range(len(chunks)):
        (cache.loss(a) / len(chunks)).backward()  # DeepSpeed divides by the accumulation steps
    assert all(torch.allclose(p.grad, w, atol=1e-6) for p, w in zip(layer.parameters(), want))


def test_pooling_is_masked_mean_or_the_first_token():
    hidden = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, mask, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))


def test_a_plain_hugging_face_folder_is_scored_with_the_pooling_asked_for(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    from bertlaunch.data.tokenize import load_hf_tokenizer

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "m")
    load_hf_tokenizer("bert-base-uncased").save_pretrained(tmp_path / "m")
    beir = write_beir(tmp_path / "beir")
    scores = {}
    for pooling in ("mean", "cls"):
        out = tmp_path / f"{pooling}.json"
        assert retrieval.main([str(tmp_path / "m"), str(beir), "--pooling", pooling, "--out", str(out)]) == 0
        scores[pooling] = json.loads(out.read_text())
    assert scores["mean"]["pooling"] == "mean" and scores["cls"]["pooling"] == "cls"
    assert scores["mean"]["ndcg@10"] != scores["cls"]["ndcg@10"]
    assert retrieval.main([str(tmp_path / "m"), str(tmp_path / "nowhere")]) == 2
    assert "corpus.jsonl: file not found" in capsys.readouterr().err


def test_the_dry_run_shows_the_negatives_and_the_evaluation(embed_config, inproc):
    r = inproc("embed", embed_config({"train.micro_batch_size": 4}), ["--dry-run"])
    assert "16 in-batch positives per query + their hard negatives" not in r.stdout
    assert "4 in-batch positives per query + their hard negatives" in r.stdout
    assert "set task.grad_cache=true for the whole global batch" in r.stdout
    assert "12 queries, 40 documents; nDCG@10, Recall@100, MRR@10" in r.stdout
    assert "4 length groups, pad-free where the model allows it (BERT, MiniLM), else padded" in r.stdout
    r = inproc("embed", embed_config({"train.micro_batch_size": 4, "task.grad_cache": True}), ["--dry-run"])
    assert "16 in-batch positives per query + their hard negatives; GradCache over the global batch" in r.stdout


def test_config_problems_are_listed_at_once(embed_config, inproc):
    r = inproc("embed", embed_config({"task.positive": "query", "task.temperature": 0, "task.pooling": "max"}),
               check=False)
    assert r.returncode == 2
    assert "task.query, task.positive and task.negative must name different columns" in r.stderr
    assert "task.temperature must be > 0, got 0" in r.stderr and "task.pooling" in r.stderr


def embed_and_grads(enc: Encoder, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's embeddings [texts, H] and every parameter's gradient (flat) under a fixed weighting."""
    enc.zero_grad()
    emb = encode_batch(enc, batch, "cpu")
    (emb * torch.linspace(-1, 1, emb.numel()).view_as(emb)).sum().backward()
    return emb.detach(), torch.cat([p.grad.flatten() for p in enc.parameters() if p.grad is not None])


def twelve_rows(tmp_path):
    tok = load_hf_tokenizer("bert-base-uncased")
    return load_triples(TripleColumns(str(write_triples(tmp_path / "t.jsonl", 12, negative=True)), "auto", "query",
                                      "positive", "negative", 32, None), tok)


@pytest.mark.parametrize("family", ["bert", "roberta", "modernbert", "deberta-v2", "electra"])
def test_length_groups_give_the_embeddings_and_gradients_of_one_padded_batch(tmp_path, family):
    """Four length groups (one word-embedding lookup, four encoder passes, the rows put back) against every text
    padded together: the same embeddings and the same gradients, to rounding, in every family (RoBERTa counts its
    positions from the ids, the others from 0)."""
    rows = twelve_rows(tmp_path)
    torch.manual_seed(0)
    enc = Encoder(transformers.AutoModel.from_config(family_config(family)), "mean", True).eval()
    e1, g1 = embed_and_grads(enc, collate_rows(rows, torch.arange(12).numpy(), 1))
    e4, g4 = embed_and_grads(enc, collate_rows(rows, torch.arange(12).numpy(), 4))
    assert e1.shape == (36, 32) and torch.allclose(e1, e4, atol=1e-6)
    assert g1.shape == g4.shape and float((g1 - g4).norm() / g1.norm()) < 1e-5


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_texts_give_the_embeddings_and_gradients_of_one_padded_batch(tmp_path, pooling):
    """Pad-free BERT (the texts end to end, attention in 4 length groups) against every text padded together."""
    rows = twelve_rows(tmp_path)
    torch.manual_seed(0)
    enc = Encoder(transformers.AutoModel.from_config(family_config("bert")), pooling, True, packed=True).eval()
    e1, g1 = embed_and_grads(enc, collate_rows(rows, torch.arange(12).numpy(), 1))
    packed = collate_rows(rows, torch.arange(12).numpy(), 4, packed=True)
    assert packed["inputs"]["input_ids"].dim() == 1  # [T]: no pad token
    ep, gp = embed_and_grads(enc, packed)
    assert e1.shape == (36, 32) and torch.allclose(e1, ep, atol=1e-6)
    assert g1.shape == gp.shape and float((g1 - gp).norm() / g1.norm()) < 1e-5


@pytest.mark.parametrize(("family", "unpad", "compile_", "expect"), [
    ("bert", None, False, True), ("roberta", None, False, False), ("bert", None, True, False),
    ("bert", False, False, False), ("bert", True, False, True),
    ("roberta", True, False, "task.unpad=true: the model is a RobertaModel, not a BertModel (BERT, MiniLM, ...); "
                                "set task.unpad=false"),
    ("bert", True, True, "task.unpad=true: model.compile=true: the pad-free path runs the BERT layers itself")])
def test_task_unpad_is_pad_free_where_the_model_allows_it_and_says_why_not(family, unpad, compile_, expect):
    cfg = EmbedConfig(output_dir="x")
    cfg.task.unpad, cfg.model.compile = unpad, compile_
    hf = transformers.AutoModel.from_config(family_config(family))
    if isinstance(expect, str):
        with pytest.raises(ValueError, match=re.escape(expect)):
            unpadded(cfg, hf)
    else:
        assert unpadded(cfg, hf) is expect
