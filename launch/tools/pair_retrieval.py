"""`python -m bertlaunch.tools.pair_retrieval --train TRAIN.tsv --eval EVAL.tsv OUT`: a retrieval set made of
labelled sentence pairs (MRPC's layout by default), for training and scoring sentence embeddings on data at hand.

    OUT/train.jsonl          {"query": first sentence, "positive": second sentence}, one per positive pair of TRAIN
    OUT/beir/corpus.jsonl    every second sentence of EVAL (by its id, once)
    OUT/beir/queries.jsonl   the first sentence of every positive pair of EVAL
    OUT/beir/qrels/test.tsv  query -> its paraphrase (relevance 1)

A query must find its paraphrase among all of EVAL's second sentences, the non-paraphrases included (MRPC's
negatives are close in wording: a hard set for their size). The tables are tab-separated with a header and no
quoting (MRPC's strings hold unbalanced quotes); the first line may carry a byte-order mark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bertlaunch.core.exits import EXIT_CONFIG, EXIT_OK
from bertlaunch.data.corpus.shards import DataError
from bertlaunch.data.tables.read import read_rows, require_columns


def read_pairs(path: Path, cols: dict[str, str]) -> list[dict[str, str]]:
    """The rows of a tab-separated table (data/tables/read.py: header, byte-order mark, no quoting), each with the
    columns named in `cols` (option -> column), under the option's name."""
    table = read_rows(str(path), "tsv")
    require_columns(table, {f"--{opt.replace('_', '-')}": c for opt, c in cols.items()})
    return [{opt: row[c] for opt, c in cols.items()} for row in table.rows]


def positive(row: dict[str, str]) -> bool:
    return row["label"].strip() == "1"


def build(train: Path, eval_: Path, out: Path, cols: dict[str, str]) -> dict[str, int]:
    """Write OUT/train.jsonl and OUT/beir/; returns the counts."""
    train_rows = [r for r in read_pairs(train, cols) if positive(r)]
    eval_rows = read_pairs(eval_, cols)
    corpus = {r["second_id"]: r["second"] for r in eval_rows}
    queries = {r["first_id"]: (r["first"], r["second_id"]) for r in eval_rows if positive(r)}
    if not train_rows or not queries:
        raise DataError(f"no positive pair (label 1) in {train if not train_rows else eval_}")
    (out / "beir" / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"query": r["first"], "positive": r["second"]}) + "\n" for r in train_rows)
    with open(out / "beir" / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": i, "text": t}) + "\n" for i, t in corpus.items())
    with open(out / "beir" / "queries.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": i, "text": t}) + "\n" for i, (t, _) in queries.items())
    with open(out / "beir" / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{i}\t{doc}\t1\n" for i, (_, doc) in queries.items())
    return {"train_rows": len(train_rows), "corpus": len(corpus), "queries": len(queries)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bertlaunch.tools.pair_retrieval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (train.jsonl and beir/)")
    p.add_argument("--train", required=True, help="labelled pairs to train on (e.g. ../shared/data/mrpc/train.tsv)")
    p.add_argument("--eval", required=True, help="labelled pairs to score on (e.g. ../shared/data/mrpc/test.tsv)")
    p.add_argument("--first", default="#1 String")
    p.add_argument("--second", default="#2 String")
    p.add_argument("--label", default="Quality", help="the label column (1: a paraphrase)")
    p.add_argument("--first-id", default="#1 ID")
    p.add_argument("--second-id", default="#2 ID")
    a = p.parse_args(argv)
    cols = {"first": a.first, "second": a.second, "label": a.label, "first_id": a.first_id, "second_id": a.second_id}
    try:
        counts = build(Path(a.train), Path(a.eval), Path(a.out), cols)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{a.out}: {counts['train_rows']} training pairs; {counts['queries']} queries over {counts['corpus']} "
          "documents (beir/)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
