"""The embedding task's data: the training rows (data/tables/triples.py) and the BEIR set scored at each evaluation
(data/tables/beir.py), both tokenized once with the run's tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from bertlaunch.data.tables.beir import load_beir
from bertlaunch.data.tables.triples import TripleColumns, Triples, load_triples
from bertlaunch.tasks.embed.config import EmbedTaskConfig
from bertlaunch.tasks.embed.retrieval import EncodedSet, tokenize_set


@dataclass
class EmbedData:
    train: Triples
    eval: EncodedSet | None  # task.eval_dir


def load_embed_data(t: EmbedTaskConfig, tokenizer) -> EmbedData:
    train = load_triples(TripleColumns(t.train_file, t.format, t.query, t.positive, t.negative, t.max_length,
                                       t.max_train_examples), tokenizer)
    beir = load_beir(t.eval_dir, t.eval_split) if t.eval_dir else None
    return EmbedData(train, tokenize_set(beir, tokenizer, t.max_length) if beir is not None else None)
