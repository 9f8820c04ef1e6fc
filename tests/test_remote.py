"""Remote corpora through fsspec, against a real S3 API on localhost (moto server, s3fs): the same token
streams as local files, globs, the token cache, clear errors for 404 / unreachable endpoints, retries of
transient errors, and credentials that never reach config.yaml, checkpoints or metrics."""

import json
import uuid

import pytest

from bertlaunch.data.corpus import storage
from bertlaunch.data.corpus.reader import file_sizes, resolve_files
from bertlaunch.data.corpus.shards import DataError
from bertlaunch.data.mlm.stream import StreamState
from tests.helpers import make_corpus
from tests.test_formats import blocks_of, cache_shards, compressed_copy, parquet_corpus


@pytest.fixture
def bucket(s3_server):
    """upload(local_path, key=None) -> s3:// URL, in a fresh bucket per test."""
    _, client = s3_server
    name = f"corpus-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=name)
    storage.configure({}, retries=5, backoff_s=0.01)

    def upload(path, key=None):
        key = key or path.name
        client.put_object(Bucket=name, Key=key, Body=path.read_bytes())
        return f"s3://{name}/{key}"

    upload.name = name
    yield upload
    storage.configure({}, retries=5, backoff_s=1.0)


def test_s3_files_give_the_local_token_streams(tmp_path, spec, bucket):
    """.jsonl, .jsonl.gz, .jsonl.zst and .parquet (several row groups) on S3 read exactly like the local files,
    from the start and from a saved mid-file position (range requests); globs list the bucket."""
    plain, pq_file = parquet_corpus(tmp_path, n=120, row_group=17)
    locals_ = [plain, compressed_copy(plain, ".gz"), compressed_copy(plain, ".zst"), pq_file]
    urls = [bucket(p, f"data/{p.name}") for p in locals_]
    assert resolve_files([f"s3://{bucket.name}/data/p.jsonl*"]) == sorted(urls[:3])
    assert file_sizes(urls) == file_sizes([str(p) for p in locals_])
    want = None
    for local, url in zip(locals_, urls):
        full = blocks_of([local], StreamState(0, 1).to_dict(), spec, "line")
        assert blocks_of([url], StreamState(0, 1).to_dict(), spec, "line") == full
        got = [b[0] for b in full]
        assert want is None or got == want  # every format: the same blocks
        want = got
        mid = full[len(full) // 2][2]  # resume from a saved position, remotely
        assert [b[0] for b in blocks_of([url], mid, spec, "line")] == want[len(full) // 2 + 1:], url


def test_token_cache_from_s3_equals_local(tmp_path, bucket):
    """bertlaunch prepare on s3://.../X.parquet and s3://.../X.txt.gz: the shards of local X.jsonl
    and X.txt, byte for byte."""
    jsonl, pq_file = parquet_corpus(tmp_path, n=200, row_group=23)
    assert cache_shards(tmp_path, bucket(pq_file)) == cache_shards(tmp_path, jsonl)
    plain = make_corpus(tmp_path / "x.txt", 200, words_per_doc=(5, 200))
    assert cache_shards(tmp_path, bucket(compressed_copy(plain, ".gz"))) == cache_shards(tmp_path, plain)


def test_missing_and_unreachable_remote_files_are_named(tmp_path, bucket):
    with pytest.raises(DataError, match=rf"'s3://{bucket.name}/nope/\*.txt' matches no file"):
        resolve_files([f"s3://{bucket.name}/nope/*.txt"])
    with pytest.raises(DataError, match=rf"s3://{bucket.name}/gone.txt' matches no file"):
        resolve_files([f"s3://{bucket.name}/gone.txt"])
    with pytest.raises(DataError, match=rf"s3://{bucket.name}/gone.txt: not found \(404\)"):
        file_sizes([f"s3://{bucket.name}/gone.txt"])
    # an endpoint that never answers: retried (here 2 attempts), then an error naming the URL and the fix
    storage.configure({"endpoint_url": "http://127.0.0.1:9", "config_kwargs": {"retries": {"max_attempts": 1}}},
                      retries=2, backoff_s=0.01)
    with pytest.raises(DataError, match=r"s3://elsewhere/c.txt: could not read the file size after 2 attempt\(s\) "
                                        r"\(EndpointConnectionError.*check the endpoint and the network"):
        file_sizes(["s3://elsewhere/c.txt"])


def test_transient_read_errors_are_retried_at_the_same_byte(tmp_path, bucket, monkeypatch):
    plain = make_corpus(tmp_path / "c.txt", 50)
    url = bucket(plain)
    f = storage.open_binary(url)
    real_open, fails = f._open, {"n": 0}

    def flaky_read(n=-1):  # every other read breaks the connection
        fails["n"] += 1
        if fails["n"] % 2:
            raise ConnectionResetError("connection reset by peer")
        return inner_read(n)

    inner_read = f.f.read
    f.f.read = flaky_read

    def reopen():
        handle = real_open()
        nonlocal inner_read
        inner_read, handle.read = handle.read, flaky_read
        return handle

    f._open = reopen
    data = b"".join(iter(lambda: f.read(1000), b""))
    assert data == plain.read_bytes() and fails["n"] > 10


def test_pretraining_from_s3_keeps_credentials_out(tmp_path, tiny_config, inproc, bucket):
    """A run reading s3:// with data.storage_options: config.yaml, checkpoints, metrics and logs hold no
    credential (the AWS_* environment ones included)."""
    url = bucket(compressed_copy(make_corpus(tmp_path / "c.txt", 80), ".gz"))
    secret = "sEcReT-storage-key-1234567890"
    cfg = tiny_config("pretrain", {"data.train_files": [url], "data.num_workers": 1, "train.max_steps": 4,
                                   "data.storage_options": {"key": "testing-key-id", "secret": secret,
                                                            "client_kwargs": {"region_name": "us-east-1"}}})
    res = inproc("pretrain", cfg)
    out = tmp_path / "out"
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1]).get("step") == 4
    for path in [p for p in out.rglob("*") if p.is_file()]:
        raw = path.read_bytes()
        for s in (secret, "testing-secret-key-value", "testing-key-id"):
            assert s.encode() not in raw, f"{s} in {path}"
    assert secret not in res.stdout + res.stderr
    assert "storage_options" in (out / "config.yaml").read_text()
