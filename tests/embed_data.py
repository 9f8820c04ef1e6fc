"""Small embedding-task data for the tests: (query, positive[, negative]) tables in every format the task reads, and
BEIR folders whose queries are a few words of their relevant documents (so that a real model ranks them well)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("river stone house light music paper garden window cloud forest bridge winter letter mirror candle harbor "
         "valley engine silver market island tower basket meadow ladder orchard lantern").split()


def passage(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def triples(n: int, seed: int = 0, negative: bool = False) -> list[dict]:
    """Rows whose query is a piece of its positive (and, with `negative`, a hard negative of other words)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos = passage(rng, rng.randint(6, 24))
        row = {"query": " ".join(pos.split()[:rng.randint(2, 5)]), "positive": pos}
        if negative:
            row["negative"] = passage(rng, rng.randint(6, 24))
        rows.append(row)
    return rows


def write_triples(path: Path, n: int = 64, seed: int = 0, negative: bool = False, rows: list[dict] | None = None
                  ) -> Path:
    """The rows as .jsonl, .tsv, .csv or .parquet (by the suffix)."""
    rows = rows if rows is not None else triples(n, seed, negative)
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix in (".tsv", ".csv"):
        sep = "\t" if path.suffix == ".tsv" else ","
        cols = list(rows[0])
        path.write_text("\n".join([sep.join(cols)] + [sep.join(str(r.get(c, "")) for c in cols) for r in rows]) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_beir(root: Path, n_docs: int = 40, n_queries: int = 12, seed: int = 5, split: str = "test") -> Path:
    """A BEIR folder: documents with titles, queries drawn from 1-2 documents each, qrels/<split>.tsv."""
    rng = random.Random(seed)
    root = Path(root)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    docs = [{"_id": f"d{i}", "title": rng.choice(WORDS), "text": passage(rng, rng.randint(8, 30))}
            for i in range(n_docs)]
    queries, qrels = [], []
    for q in range(n_queries):
        rel = rng.sample(range(n_docs), rng.randint(1, 2))
        words = docs[rel[0]]["text"].split()
        start = rng.randrange(max(1, len(words) - 4))
        queries.append({"_id": f"q{q}", "text": " ".join(words[start:start + 4])})
        qrels += [(f"q{q}", f"d{d}", 1) for d in rel]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                                 + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels))
    return root
