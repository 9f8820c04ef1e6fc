"""A retrieval set in BEIR's layout, local or remote (data/corpus/storage.py):

    DIR/corpus.jsonl        {"_id": "d1", "title": "...", "text": "..."}   (title optional)
    DIR/queries.jsonl       {"_id": "q1", "text": "..."}
    DIR/qrels/<split>.tsv   query-id <TAB> corpus-id <TAB> score, after a header line

A document's text is its title and text joined by a space, as BEIR's own dense models encode them. The queries
of a split are those its qrels judge; every problem names the file, the line and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from bertlaunch.data.corpus import storage
from bertlaunch.data.corpus.shards import DataError
from bertlaunch.data.tables.read import json_records


@dataclass
class BeirSet:
    root: str
    split: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]  # the split's judged queries, in queries.jsonl order
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {document id: relevance}


def join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


def _lines(path: str, what: str):
    """(line number, text) of a local or remote text file; a missing file names what it should hold."""
    if storage.expand(path) != [path]:
        raise DataError(f"{path}: file not found; a BEIR folder holds corpus.jsonl, queries.jsonl and "
                        f"qrels/<split>.tsv ({what})")
    with storage.open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: byte {e.start} is not valid UTF-8; re-encode the file as UTF-8") from None
    return enumerate(text.splitlines(), 1)


def read_jsonl(path: str, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, dict]:
    """_id -> record, in file order; each line must hold every field of `fields` as a string."""
    out: dict[str, dict] = {}
    layout = "{" + ", ".join(f'"{f}": ...' for f in fields + optional) + "}"
    for i, rec in json_records(_lines(path, f"one JSON object per line: {layout}"), path, f"BEIR's layout: {layout}"):
        for f in fields:
            if not isinstance(rec.get(f), str):
                has = ", ".join(rec) or "nothing"
                raise DataError(f"{path}: line {i} has no field '{f}'" + (" as a string" if f in rec else "")
                                + f" (it has: {has}); every line needs {layout}")
        if rec["_id"] in out:
            raise DataError(f"{path}: line {i}: _id '{rec['_id']}' occurs twice; ids must be unique")
        out[rec["_id"]] = rec
    if not out:
        raise DataError(f"{path}: no records; the file is empty")
    return out


def splits(root: str) -> list[str]:
    """The qrels/<split>.tsv files of a BEIR folder (for messages)."""
    try:
        return sorted(p.rsplit("/", 1)[-1].removesuffix(".tsv") for p in storage.expand(join(root, "qrels", "*.tsv")))
    except (OSError, ValueError):
        return []


def read_qrels(root: str, split: str, queries: dict, corpus: dict) -> dict[str, dict[str, int]]:
    path = join(root, "qrels", f"{split}.tsv")
    if storage.expand(path) != [path]:
        have = splits(root)
        raise DataError(f"{path}: no qrels for split '{split}'; "
                        + (f"this folder has: {', '.join(have)} (set the split)" if have else "qrels/ has no .tsv"))
    qrels: dict[str, dict[str, int]] = {}
    for i, line in _lines(path, "query-id, corpus-id, score per line"):
        cells = line.rstrip("\r").split("\t")
        if i == 1 and cells[-1].strip().lower() == "score":
            continue  # the header line
        if not line.strip():
            continue
        if len(cells) != 3:
            raise DataError(f"{path}: line {i} has {len(cells)} field(s); each line is query-id<TAB>corpus-id<TAB>"
                            "score")
        qid, did, score = (c.strip() for c in cells)
        try:
            rel = int(float(score))
        except ValueError:
            raise DataError(f"{path}: line {i}: score '{score}' is not a number") from None
        if qid not in queries:
            raise DataError(f"{path}: line {i}: query-id '{qid}' is not in queries.jsonl; fix the id or add the "
                            "query")
        if did not in corpus:
            raise DataError(f"{path}: line {i}: corpus-id '{did}' is not in corpus.jsonl; fix the id or add the "
                            "document")
        qrels.setdefault(qid, {})[did] = rel
    if not any(rel > 0 for judged in qrels.values() for rel in judged.values()):
        raise DataError(f"{path}: split '{split}' is empty: no query has a relevant document (score > 0); "
                        "judge some, or pick another split" + (f" ({', '.join(splits(root))})" if splits(root) else ""))
    return qrels


def load_beir(root: str, split: str = "test") -> BeirSet:
    corpus = read_jsonl(join(root, "corpus.jsonl"), ("_id", "text"), ("title",))
    queries = read_jsonl(join(root, "queries.jsonl"), ("_id", "text"))
    qrels = read_qrels(root, split, queries, corpus)
    qids = [q for q in queries if q in qrels]
    texts = [(str(r.get("title") or "") + " " + r["text"]).strip() for r in corpus.values()]
    return BeirSet(root, split, list(corpus), texts, qids, [queries[q]["text"] for q in qids], qrels)
