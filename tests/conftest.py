"""Shared fixtures: the tokenizer spec, one tiny-config builder for every test file, corpus and pair-table
writers, and `inproc`, which runs an entry point inside the test process (no interpreter start, no
torch/transformers/deepspeed import: seconds instead of ~12 s a run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _k, _v in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline",
                   TOKENIZERS_PARALLELISM="false").items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

from tests.helpers import Result, make_corpus, write_pairs, write_yaml  # noqa: E402

# the subprocess runs use OMP_NUM_THREADS=1: in-process runs match them bit for bit only with one thread
torch.set_num_threads(1)

BASE = {
    "pretrain": {
        "model": {"preset": "tiny"},
        "data": {"train_files": [], "block_size": 64, "num_workers": 1},
        "train": {"max_steps": 12, "micro_batch_size": 8, "lr": 2e-3, "warmup_steps": 2, "precision": "fp32"},
        "deepspeed": {"config": "ds_configs/zero0.json"},
        "eval": {"every": 0}, "log": {"every": 1, "wandb": {"mode": "disabled"}},
        "checkpoint": {"every": 4, "keep_last": 3}},
    "finetune": {
        "tokenizer": "bert-base-uncased", "model": {"preset": "tiny"},
        "task": {"text_a": "a", "text_b": "b", "label": "label"},
        "train": {"epochs": 2, "micro_batch_size": 8, "global_batch_size": 8, "lr": 1e-3, "precision": "fp32"},
        "deepspeed": {"config": "ds_configs/zero0.json"},
        "log": {"every": 1, "wandb": {"mode": "disabled"}}, "checkpoint": {"keep_last": 1}},
    "embed": {
        "tokenizer": "bert-base-uncased", "model": {"preset": "tiny"}, "task": {"max_length": 32},
        "train": {"epochs": 1, "micro_batch_size": 8, "global_batch_size": 8, "lr": 1e-3, "precision": "fp32"},
        "deepspeed": {"config": "ds_configs/zero0.json"}, "eval": {"micro_batch_size": 16},
        "log": {"every": 1, "wandb": {"mode": "disabled"}}, "checkpoint": {"keep_last": 1}},
    "glue": {
        "tokenizer": "bert-base-uncased", "model": {"preset": "tiny"}, "glue": {"seeds": [1]},
        "train": {"epochs": 2, "micro_batch_size": 8, "global_batch_size": 8, "lr": 1e-3, "precision": "fp32"},
        "deepspeed": {"config": "ds_configs/zero0.json"},
        "log": {"every": 1, "wandb": {"mode": "disabled"}}, "checkpoint": {"keep_last": 1}},
}


def build_config(tmp_path: Path, kind: str = "pretrain", overrides: dict | None = None,
                 name: str | None = None) -> Path:
    """A tiny-BERT run config (output_dir = tmp_path/out) with dotted-key overrides:
    build_config(tmp_path, "pretrain", {"data.train_files": [path], "train.max_steps": 6})."""
    import copy

    data = copy.deepcopy(BASE[kind])
    data["output_dir"] = str(tmp_path / "out")
    for key, value in (overrides or {}).items():
        *sections, leaf = key.split(".")
        target = data
        for part in sections:
            target = target.setdefault(part, {})
        target[leaf] = [_plain(v) for v in value] if isinstance(value, list) else _plain(value)
    return write_yaml(tmp_path / (name or f"{kind}.yaml"), data)


def _plain(value):
    """Paths as strings: YAML has no Path."""
    return str(value) if isinstance(value, Path) else value


@pytest.fixture
def tiny_config(tmp_path):
    """tiny_config(kind="pretrain", overrides={dotted.key: value}, name=None) -> path of the YAML."""
    return lambda kind="pretrain", overrides=None, name=None: build_config(tmp_path, kind, overrides, name)


@pytest.fixture
def corpus(tmp_path):
    """corpus(n_docs, name="c.txt", **make_corpus options) -> path of a text corpus with unique doc ids."""
    return lambda n_docs, name="c.txt", **kw: make_corpus(tmp_path / name, n_docs, **kw)


@pytest.fixture
def pairs(tmp_path):
    """pairs(name, n, **write_pairs options) -> path of a sentence-pair .tsv (columns a, b, label)."""
    return lambda name, n=60, **kw: write_pairs(tmp_path / name, n, **kw)


@pytest.fixture(scope="session")
def spec():
    from bertlaunch.data.tokenize import load_spec

    return load_spec("bert-base-uncased")


def in_process(entry: str, argv: list[str]) -> int:
    """main() of launch/<entry>.py in this process; the environment changes the run makes (RANK, MASTER_PORT, ...)
    are undone afterwards, and BERTLAUNCH_* fault variables install tests/faults.py's hooks for the run."""
    from bertlaunch.cli.commands import embed, finetune, glue, pretrain
    from tests.faults import install_from_env

    saved = dict(os.environ)
    install_from_env()
    try:
        return {"pretrain": pretrain, "finetune": finetune, "glue": glue, "embed": embed}[entry](argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        install_from_env({})


@pytest.fixture
def inproc(capfd, monkeypatch):
    """inproc(entry, config, overrides=(), check=True, **env) -> Result: run `main()` of launch/<entry>.py
    in this process (single process, as `python launch/<entry>.py`). Environment changes made by the run
    (RANK, MASTER_PORT, ...) are undone afterwards."""
    def run(entry: str, config, overrides=(), check: bool = True, **env) -> Result:
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))
        capfd.readouterr()
        code = in_process(entry, (["--config", str(config)] if config else []) + [str(o) for o in overrides])
        out, err = capfd.readouterr()
        if check and code != 0:
            raise AssertionError(f"exit {code}\n--- stdout\n{out[-6000:]}\n--- stderr\n{err[-6000:]}")
        return Result(code, out, err)

    return run


class S3Server:
    """A real S3 API on localhost: moto in server mode, in this process (its buckets live here, so stop() and
    start() again on the same port keep them, and another server on another address serves the same buckets)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]
        self.endpoint = f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on localhost (moto in server mode), reached through s3fs exactly like a cloud bucket:
    AWS_ENDPOINT_URL and test credentials are set for the session. Yields (S3Server, boto3 client)."""
    import boto3

    server = S3Server()
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing-key-id",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-key-value", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server, boto3.client("s3")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_collection_modifyitems(items):
    """test.sh runs the suite on two pytest-xdist workers (--dist loadgroup): the tests that submit SLURM jobs share
    the two-node cluster and go to one worker, one after another."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
