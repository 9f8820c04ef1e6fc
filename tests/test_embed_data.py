"""The embedding task's inputs: (query, positive[, negative]) rows from every table format, local and on S3, and BEIR
folders; every bad input gives an error naming the file, the line and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bertlaunch.data.corpus.shards import DataError
from bertlaunch.data.tables.beir import load_beir
from bertlaunch.data.tables.triples import TripleColumns, collate_rows, load_triples
from bertlaunch.data.tokenize import load_hf_tokenizer
from tests.embed_data import triples, write_beir, write_triples
from tests.test_remote import bucket  # noqa: F401  (the S3 fixture)


@pytest.fixture(scope="module")
def tok():
    return load_hf_tokenizer("bert-base-uncased")


def columns(path, negative=None, **kw) -> TripleColumns:
    return TripleColumns(str(path), "auto", kw.get("query", "query"), kw.get("positive", "positive"), negative,
                         kw.get("max_length", 32), kw.get("max_train_examples"))


def test_every_format_local_and_remote_gives_the_same_rows(tmp_path, tok, bucket):  # noqa: F811
    rows = triples(30, negative=True)
    files = [write_triples(tmp_path / f"t{ext}", rows=rows) for ext in (".jsonl", ".tsv", ".csv", ".parquet")]
    urls = [bucket(files[0]), bucket(files[3])]
    loaded = [load_triples(columns(f, "negative"), tok) for f in files + urls]
    want = [[x.tolist() for x in col] for col in loaded[0].texts]
    assert len(want) == 3 and len(want[0]) == 30
    assert want[1][0] == tok(rows[0]["positive"])["input_ids"]  # [CLS] text [SEP]
    assert all([[x.tolist() for x in col] for col in d.texts] == want for d in loaded[1:])
    capped = load_triples(columns(files[0], max_length=6, max_train_examples=7), tok)
    assert len(capped) == 7 and max(len(x) for col in capped.texts for x in col) == 6 and len(capped.texts) == 2


def test_bad_rows_name_the_file_line_column_and_fix(tmp_path, tok):
    rows = triples(5)
    rows[2]["query"] = "  "
    bad = write_triples(tmp_path / "bad.jsonl", rows=rows)
    with pytest.raises(DataError, match=rf"{bad}: line 3: column 'query' \(task.query\) is empty; every row needs"):
        load_triples(columns(bad), tok)
    with pytest.raises(DataError, match=r"no column 'positiv' for task.positive \(did you mean 'positive'\?\)"):
        load_triples(columns(bad, positive="positiv"), tok)
    rows = triples(4)
    rows[1]["positive"] = None
    pq_file = write_triples(tmp_path / "null.parquet", rows=rows)
    with pytest.raises(DataError, match=rf"{pq_file}: row 2: column 'positive' \(task.positive\) is missing"):
        load_triples(columns(pq_file), tok)
    with pytest.raises(DataError, match="file not found"):
        load_triples(columns(tmp_path / "nope.jsonl"), tok)


def test_a_beir_folder_reads_with_titles_and_judged_queries_only(tmp_path):
    root = write_beir(tmp_path / "b", n_docs=10, n_queries=4)
    extra = {"_id": "q_unjudged", "text": "not in the qrels"}
    with open(root / "queries.jsonl", "a") as f:
        f.write(json.dumps(extra) + "\n")
    b = load_beir(str(root))
    first = json.loads((root / "corpus.jsonl").read_text().splitlines()[0])
    assert b.corpus_texts[0] == f"{first['title']} {first['text']}" and len(b.corpus_ids) == 10
    assert b.query_ids == ["q0", "q1", "q2", "q3"] and sum(map(len, b.qrels.values())) >= 4


@pytest.mark.parametrize("case", ["corpus field", "queries field", "unknown query", "unknown doc", "empty split",
                                  "missing split"])
def test_beir_problems_name_the_file_line_and_fix(tmp_path, case):
    root = write_beir(tmp_path / "b", n_docs=6, n_queries=3)
    qrels = root / "qrels" / "test.tsv"
    if case == "corpus field":
        (root / "corpus.jsonl").write_text('{"_id": "d0", "text": "a"}\n{"_id": "d1", "body": "b"}\n')
        want = rf"{root}/corpus.jsonl: line 2 has no field 'text' \(it has: _id, body\); every line needs " \
               r'\{"_id": ..., "text": ..., "title": ...\}'
    elif case == "queries field":
        (root / "queries.jsonl").write_text('{"id": "q0", "text": "a"}\n')
        want = rf"{root}/queries.jsonl: line 1 has no field '_id' \(it has: id, text\)"
    elif case == "unknown query":
        qrels.write_text(qrels.read_text() + "q77\td1\t1\n")
        want = rf"{qrels}: line \d+: query-id 'q77' is not in queries.jsonl; fix the id or add the query"
    elif case == "unknown doc":
        qrels.write_text(qrels.read_text() + "q1\td99\t1\n")
        want = rf"{qrels}: line \d+: corpus-id 'd99' is not in corpus.jsonl; fix the id or add the document"
    elif case == "empty split":
        qrels.write_text("query-id\tcorpus-id\tscore\n")
        want = rf"{qrels}: split 'test' is empty: no query has a relevant document \(score > 0\)"
    else:
        qrels.rename(root / "qrels" / "dev.tsv")
        want = rf"{qrels}: no qrels for split 'test'; this folder has: dev \(set the split\)"
    with pytest.raises(DataError, match=want):
        load_beir(str(root))


def test_labelled_pairs_become_training_rows_and_a_beir_folder_our_reader_takes(tmp_path, capsys):
    """tools/pair_retrieval on MRPC's layout (byte-order mark, unbalanced quotes): positive pairs train; the eval
    file's positives are the queries, all its second sentences the corpus."""
    from bertlaunch.tools import pair_retrieval

    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    (tmp_path / "train.tsv").write_text(head + '1\t1\t2\tsaid "yes\tanswered yes\n0\t3\t4\ta cat\ta dog\n')
    (tmp_path / "test.tsv").write_text(head + "1\t5\t6\tred car\ta car that is red\n0\t7\t8\tblue sky\tgreen sea\n")
    assert pair_retrieval.main([str(tmp_path / "out"), "--train", str(tmp_path / "train.tsv"),
                                "--eval", str(tmp_path / "test.tsv")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert rows == [{"query": 'said "yes', "positive": "answered yes"}]
    s = load_beir(str(tmp_path / "out" / "beir"), "test")
    assert (s.corpus_ids, s.corpus_texts) == (["6", "8"], ["a car that is red", "green sea"])
    assert (s.query_ids, s.query_texts, s.qrels) == (["5"], ["red car"], {"5": {"6": 1}})
    assert pair_retrieval.main([str(tmp_path / "o2"), "--train", str(tmp_path / "train.tsv"),
                                "--eval", str(tmp_path / "test.tsv"), "--label", "label"]) == 2
    assert "train.tsv: no column 'label' for --label" in capsys.readouterr().err


def test_length_groups_pad_each_group_to_its_longest_and_restore_the_column_order(tmp_path, tok):
    t = load_triples(columns(write_triples(tmp_path / "t.jsonl", 8, negative=True), "negative"), tok)
    idx = np.array([5, 1, 7, 2])
    one, four = collate_rows(t, idx)["inputs"], collate_rows(t, idx, groups=4)
    texts = [col[i].tolist() for col in t.texts for i in idx]  # 12 texts: queries, positives, negatives
    g = four["inputs"]
    rows = [ids[mask.bool()].tolist() for i, m in zip(g["input_ids"], g["attention_mask"]) for ids, mask in zip(i, m)]
    assert [rows[j] for j in four["restore"].tolist()] == texts
    widths = [ids.shape[1] for ids in g["input_ids"]]
    assert [len(ids) for ids in g["input_ids"]] == [3, 3, 3, 3] and widths == sorted(widths)
    assert widths == [int(m.sum(1).max()) for m in g["attention_mask"]]
    assert four["meta"]["n_slots"] == 3 * sum(widths) < collate_rows(t, idx)["meta"]["n_slots"] == 12 * max(
        map(len, texts))
    assert collate_rows(t, idx)["restore"] is None and one["input_ids"][0].shape == (12, max(map(len, texts)))


def test_packed_texts_end_to_end_with_each_attention_group_padded_to_its_longest(tmp_path, tok):
    t = load_triples(columns(write_triples(tmp_path / "t.jsonl", 8, negative=True), "negative"), tok)
    idx = np.array([5, 1, 7, 2])
    b = collate_rows(t, idx, groups=4, packed=True)
    p, texts = b["inputs"], [col[i].tolist() for col in t.texts for i in idx]
    ids, offsets = p["input_ids"].tolist(), p["offsets"].tolist()
    packed = [ids[a:z] for a, z in zip(offsets, offsets[1:])]
    assert [packed[j] for j in b["restore"].tolist()] == texts and list(map(len, packed)) == sorted(map(len, texts))
    assert p["position_ids"].tolist() == [k for x in packed for k in range(len(x))]
    assert b["meta"]["n_slots"] == b["meta"]["n_real"] == len(ids)
    start = 0
    for g, (index, mask, real) in enumerate(p["groups"]):  # texts 3g..3g+2, each group padded to its longest
        lens = list(map(len, packed[3 * g:3 * g + 3]))
        assert mask.shape == (3, 1, 1, max(lens)) and mask[:, 0, 0].sum(1).tolist() == lens
        tokens = index[real]  # the real positions point at the group's own tokens, in order
        assert tokens.tolist() == list(range(start, start + sum(lens)))
        start += sum(lens)
    assert start == len(ids)
    empty = collate_rows(t, np.array([], dtype=np.int64), groups=4, packed=True)
    assert empty["inputs"]["input_ids"].tolist() == [t.pad_id] and empty["restore"] is None
    assert (empty["meta"]["n_slots"], empty["meta"]["texts"]) == (0, 0)
