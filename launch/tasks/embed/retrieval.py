"""Retrieval scoring on a BEIR set (data/tables/beir.py), on every rank: the queries and the corpus are encoded in
length-sorted batches shared out over the ranks, each rank searches its part of the corpus exactly (every query
against every document of it, on the device, in blocks), the ranks' top 100 per query are merged, and nDCG@10,
Recall@100 and MRR@10 come from ir-measures (trec_eval's measures through pytrec_eval), not from our own code.

Used by the embedding task at each evaluation (`forward` is the DeepSpeed engine) and by
`python -m bertlaunch.tools.retrieval` (a plain module). Collective: every rank calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bertlaunch.core import dist
from bertlaunch.data.tables.beir import BeirSet
from bertlaunch.data.tables.triples import encode_texts, pad_texts

TOP_K = 100  # the deepest cutoff of the metrics (Recall@100)
METRICS = ("ndcg@10", "recall@100", "mrr@10")
QUERY_BLOCK, DOC_BLOCK = 1024, 65536  # score matrices of at most 1024 x 65536 floats at once


@dataclass
class EncodedSet:
    """A BEIR set tokenized once (it is scored at every evaluation)."""

    beir: BeirSet
    queries: list[np.ndarray]
    docs: list[np.ndarray]
    pad_id: int


def tokenize_set(beir: BeirSet, tokenizer, max_length: int) -> EncodedSet:
    return EncodedSet(beir, encode_texts(tokenizer, beir.query_texts, max_length),
                      encode_texts(tokenizer, beir.corpus_texts, max_length), tokenizer.pad_token_id)


def encode_shard(forward: Callable, ids: list[np.ndarray], pad_id: int, batch_size: int, device,
                 rank: int, world: int) -> tuple[np.ndarray, torch.Tensor]:
    """This rank's share of the texts, encoded -> (their indices, float32[n, H] on the device). Texts are sorted by
    length and cut into batches dealt out round-robin; every rank runs the same number of forwards (ZeRO-3 gathers
    the weights collectively), an idle one on a copy of its last batch."""
    order = np.argsort([len(x) for x in ids], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    mine = batches[rank::world]
    rounds = -(-len(batches) // world)
    out = []
    for i in range(rounds):
        idx = mine[i] if i < len(mine) else batches[-1]
        b = pad_texts([ids[j] for j in idx], pad_id)
        emb = forward(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
        if i < len(mine):
            out.append(emb.float())
    index = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    return index, (torch.cat(out) if out else torch.zeros(0, 0, device=device))


def top_k(queries: torch.Tensor, docs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact search: for each query [Q, H] its k best of docs [D, H] by dot product -> (scores, positions) [Q, k']
    with k' = min(k, D); in blocks, so no score matrix exceeds QUERY_BLOCK x DOC_BLOCK."""
    scores, where = [], []
    for q0 in range(0, queries.shape[0], QUERY_BLOCK):
        q = queries[q0:q0 + QUERY_BLOCK]
        best_s = best_i = None
        for d0 in range(0, docs.shape[0], DOC_BLOCK):
            s = q @ docs[d0:d0 + DOC_BLOCK].T  # [q, d]
            s, i = s.topk(min(k, s.shape[1]), dim=1)
            i = i + d0
            if best_s is not None:
                s, j = torch.cat([best_s, s], 1).topk(min(k, best_s.shape[1] + s.shape[1]), dim=1)
                i = torch.cat([best_i, i], 1).gather(1, j)
            best_s, best_i = s, i
        scores.append(best_s)
        where.append(best_i)
    return torch.cat(scores), torch.cat(where)


def score(forward: Callable, data: EncodedSet, batch_size: int, device=None) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 of the model `forward` (input_ids, attention_mask -> embeddings) on `data`,
    the same on every rank. Similarity: the dot product of the embeddings (the cosine when they are normalised)."""
    import ir_measures  # lazy: the metric library, needed only when a retrieval set is scored

    device = device if device is not None else dist.device()
    rank, world = dist.rank_and_world()
    q_idx, q_emb = encode_shard(forward, data.queries, data.pad_id, batch_size, device, rank, world)
    d_idx, d_emb = encode_shard(forward, data.docs, data.pad_id, batch_size, device, rank, world)
    parts = dist.all_gather_object((q_idx, q_emb.cpu().numpy()))  # every rank searches with every query
    order = np.concatenate([p[0] for p in parts])
    queries = torch.from_numpy(np.concatenate([p[1] for p in parts if len(p[0])])).to(device)
    queries = queries[torch.from_numpy(np.argsort(order)).to(device)]  # [Q, H] in the set's order
    k = min(TOP_K, len(data.docs))
    if len(d_idx):
        s, pos = top_k(queries, d_emb, k)
        found = (s.cpu().numpy(), d_idx[pos.cpu().numpy()])  # global document indices
    else:
        found = (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
    merged = dist.all_gather_object(found)
    s = np.concatenate([m[0] for m in merged], 1)
    ids = np.concatenate([m[1] for m in merged], 1)
    best = np.argsort(-s, axis=1, kind="stable")[:, :k]
    beir = data.beir
    run = {qid: {beir.corpus_ids[ids[i, j]]: float(s[i, j]) for j in best[i]} for i, qid in enumerate(beir.query_ids)}
    qrels = {q: docs for q, docs in beir.qrels.items() if q in run}
    measures = {"ndcg@10": ir_measures.nDCG @ 10, "recall@100": ir_measures.R @ 100, "mrr@10": ir_measures.RR @ 10}
    values = ir_measures.calc_aggregate(list(measures.values()), qrels, run)
    return {name: float(values[m]) for name, m in measures.items()}


def table(result: dict, beir: BeirSet, title: str) -> str:
    """The printed results: the set, then one metric per line."""
    lines = [f"{title}: {beir.root} (split {beir.split}): {len(beir.query_ids)} queries, {len(beir.corpus_ids)} "
             "documents", f"  {'metric':<12} value"]
    lines += [f"  {name:<12} {result[name]:.4f}" for name in METRICS]
    return "\n".join(lines)
