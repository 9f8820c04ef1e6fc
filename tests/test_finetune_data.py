"""Fine-tuning data: table reading, labels, errors, dynamic padding, length grouping, metrics."""

import json
import random

import numpy as np
import pytest

from bertlaunch.data.corpus.shards import DataError
from bertlaunch.data.tables.pairs import Encoded, collate, encode_pairs, epoch_order, pad_fraction, split_global
from bertlaunch.data.tables.read import infer_labels, read_rows, require_columns
from bertlaunch.data.tokenize import load_hf_tokenizer
from bertlaunch.tasks.classify.scores import task_metrics
from tests.helpers import MRPC, needs_shared, write_pairs


def test_tsv_is_read_without_quote_processing(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text('Quality\t#1 String\t#2 String\n1\tHe said "hello\tand left.\n0\t"quoted"\tplain\n')
    t = read_rows(str(p))
    assert [r["#1 String"] for r in t.rows] == ['He said "hello', '"quoted"'] and t.lines == [2, 3]


@needs_shared
def test_mrpc_reads_every_row():
    for name, n in (("train.tsv", 3668), ("dev.tsv", 408), ("test.tsv", 1725)):
        t = read_rows(str(MRPC / name))
        assert len(t.rows) == n and set(r["Quality"] for r in t.rows) == {"0", "1"}


def test_missing_column_error_names_file_and_fix(tmp_path):
    t = read_rows(str(write_pairs(tmp_path / "t.tsv")))
    with pytest.raises(DataError) as e:
        require_columns(t, {"task.text_a": "sentence1", "task.label": "lable"})
    msg = str(e.value)
    assert f"{t.path}: no column 'sentence1' for task.text_a; columns are: a, b, label" in msg
    assert "no column 'lable' for task.label (did you mean 'label'?)" in msg


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "e.tsv").write_text("")
    (tmp_path / "h.csv").write_text("a,b,label\n")
    with pytest.raises(DataError, match="e.tsv: the file is empty"):
        read_rows(str(tmp_path / "e.tsv"))
    with pytest.raises(DataError, match="h.csv: no data rows"):
        read_rows(str(tmp_path / "h.csv"))


def test_labels_strings_ints_floats_and_errors(tmp_path):
    t = read_rows(str(write_pairs(tmp_path / "s.tsv", labels=("neutral", "entail", "contra"))))
    space = infer_labels(t, "label")
    assert space.kind == "classification" and space.names == ["contra", "entail", "neutral"]
    ev = read_rows(str(write_pairs(tmp_path / "ev.tsv", n=5, labels=("entail", "maybe"))))
    with pytest.raises(DataError) as e:
        [space.encode(r["label"], ev, i, "label") for i, r in enumerate(ev.rows)]
    assert str(e.value) == (f"{ev.path}: line 3, column 'label': label 'maybe' does not occur in the training "
                            "file (known: contra, entail, neutral)")
    reg = read_rows(str(write_pairs(tmp_path / "r.tsv", labels=lambda i, rng: round(rng.uniform(0, 5), 2))))
    assert infer_labels(reg, "label").kind == "regression"
    ints = read_rows(str(write_pairs(tmp_path / "i.tsv", labels=(0, 1))))
    assert infer_labels(ints, "label").names == ["0", "1"]
    mixed = read_rows(str(write_pairs(tmp_path / "m.tsv", labels=(1, "two"))))
    with pytest.raises(DataError, match=r"m.tsv: column 'label' mixes label types: line 2 has '1' \(a number\), "
                                        r"line 3 has 'two' \(text\)"):
        infer_labels(mixed, "label")


def test_jsonl_and_csv_tables(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"s{i}", "label": i % 3}) for i in range(9)) + "\n")
    assert infer_labels(read_rows(str(p)), "label").names == ["0", "1", "2"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not valid JSON"):
        read_rows(str(tmp_path / "bad.jsonl"))
    t = read_rows(str(write_pairs(tmp_path / "t.csv", sep=",")))
    assert len(t.rows) == 60


@pytest.fixture(scope="module")
def enc():
    tok = load_hf_tokenizer("bert-base-uncased")
    rng = random.Random(1)
    a = [" ".join(["word"] * rng.randint(1, 60)) for _ in range(500)]
    b = [" ".join(["other"] * rng.randint(1, 60)) for _ in range(500)]
    return encode_pairs(tok, a, b, np.arange(500) % 2, max_length=128)


def test_pair_encoding_has_segments_and_truncation(enc):
    assert max(enc.lengths) <= 128
    i = int(np.argmin(enc.lengths))
    ids, types = enc.ids[i], enc.types[i]
    assert ids[0] == 101 and ids[-1] == 102 and types[0] == 0 and types[-1] == 1


def test_dynamic_padding_to_longest_in_batch(enc):
    idx = np.array([3, 10, 42, 7])
    batch = collate(enc, idx, 0, regression=False)
    longest = max(len(enc.ids[i]) for i in idx)
    assert batch["input_ids"].shape == (4, longest)
    assert batch["attention_mask"].sum().item() == sum(len(enc.ids[i]) for i in idx)
    assert collate(enc, idx, 0, False, pad_to_multiple_of=8)["input_ids"].shape[1] % 8 == 0


def test_length_grouping_covers_every_example_once_and_is_reproducible(enc):
    for epoch in range(3):
        order = epoch_order(enc.lengths, 32, seed=7, epoch=epoch, group=True, group_factor=4)
        flat = np.concatenate(order)
        assert sorted(flat.tolist()) == list(range(500))
        again = epoch_order(enc.lengths, 32, seed=7, epoch=epoch, group=True, group_factor=4)
        assert all(np.array_equal(x, y) for x, y in zip(order, again, strict=True))
    e0, e1 = (np.concatenate(epoch_order(enc.lengths, 32, 7, e, True, 4)) for e in (0, 1))
    assert not np.array_equal(e0, e1)
    grouped = pad_fraction(enc, epoch_order(enc.lengths, 32, 7, 0, True, 50), 8)
    random_order = pad_fraction(enc, epoch_order(enc.lengths, 32, 7, 0, False), 8)
    fixed = pad_fraction(enc, epoch_order(enc.lengths, 32, 7, 0, False), 8, fixed_width=128)
    assert grouped < random_order / 3 and grouped < fixed / 4


def test_global_batch_split_is_world_size_independent():
    batch = np.arange(100, 132)
    one = split_global(batch, micro=8, world=1, accum=4)
    two = split_global(batch, micro=8, world=2, accum=2)
    assert np.array_equal(np.concatenate(one[0]), batch)
    assert sorted(np.concatenate([m for r in two for m in r]).tolist()) == batch.tolist()
    short = split_global(np.arange(5), micro=8, world=2, accum=2)  # last, smaller global batch
    assert sorted(np.concatenate([m for r in short for m in r]).tolist()) == list(range(5))
    assert sum(len(m) == 0 for r in short for m in r) == 1


def test_metrics_equal_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    m = task_metrics("classification", 2, pred, gold)
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(gold, pred), abs=1e-12)
    gold3, pred3 = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    assert task_metrics("classification", 3, pred3, gold3)["macro_f1"] == pytest.approx(
        f1_score(gold3, pred3, average="macro"), abs=1e-12)
    x = rng.normal(size=200)
    y = np.round(x + rng.normal(size=200), 1)  # ties
    r = task_metrics("regression", 1, x, y)
    assert r["pearson"] == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    assert r["spearman"] == pytest.approx(spearmanr(x, y)[0], abs=1e-12)


def test_encoded_dataclass_len():
    e = Encoded([np.zeros(3, np.int32)], [np.zeros(3, np.int8)], np.zeros(1))
    assert len(e) == 1 and e.lengths.tolist() == [3]
