"""Local paths and fsspec URLs (s3://, gs://, https://, hf://datasets/...) behind one small interface.

Everything that opens, sizes or globs a corpus file goes through here, so a remote corpus is read exactly
like a local one: byte-range sharding seeks with range requests, compressed files stream through their
decompressor, Parquet reads one row group at a time.

Credentials come from the standard environment (AWS_* including AWS_ENDPOINT_URL, GOOGLE_APPLICATION_
CREDENTIALS, HF_TOKEN) or from `data.storage_options` (passed to fsspec as is). They live only in this
process's memory: config.yaml redacts the mapping, and no message here prints it.

Transient network errors (connection refused or reset, timeouts, 5xx) are retried with exponential backoff
(1, 2, 4, ... s; `data.io_retries` attempts in all); a read that fails half way reopens the file and
continues at the same byte. A missing file (404), a denied one (403) or missing credentials are not retried:
each is a StorageError naming the URL (and, for credentials, where they come from).

A `Policy` is one set of options + retries with the config keys its messages name: the corpora's is the
process default (`configure`), the checkpoint remote (launch/core/remote.py) passes its own.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass, field


class StorageError(ValueError):
    """A file or URL that cannot be listed or read; the message names it and the fix."""


@dataclass
class Policy:
    """fsspec options and the retry policy for one use of remote storage, and the config keys that set them
    (error messages name them)."""

    options: dict = field(default_factory=dict)
    retries: int = 5  # attempts in all
    backoff_s: float = 1.0  # the first wait; doubled after each failed attempt
    options_key: str = "data.storage_options"
    retries_key: str = "data.io_retries"


_SETTINGS = Policy()
# error types that mean "try again" although they are not OSError (botocore, aiohttp)
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
                    "ResponseStreamingError", "IncompleteReadError", "ProtocolError"}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# no credentials at all (botocore, google-auth): a new user's first error, explained instead of a traceback
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}
_CREDENTIAL_SOURCES = {
    "s3": "AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / ~/.aws/credentials, or the instance's or "
          "pod's role; AWS_ENDPOINT_URL for MinIO, R2 or Ceph), or {key}: {{key: ..., secret: ...}}; a public "
          "bucket: {key}: {{anon: true}}",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service-account JSON file) or `gcloud auth application-default "
          "login`, or {key}: {{token: ...}}",
    "hf": "HF_TOKEN (or `huggingface-cli login`), or {key}: {{token: ...}}",
}


def configure(options: dict | None, retries: int | None = None, backoff_s: float | None = None) -> None:
    """Storage options and retry policy for this process (data.storage_options, data.io_retries). Dataloader
    workers fork from the training process and inherit them; spawned processes call this again."""
    _SETTINGS.options = dict(options or {})
    if retries is not None:
        _SETTINGS.retries = max(1, retries)
    if backoff_s is not None:
        _SETTINGS.backoff_s = backoff_s


def settings() -> tuple[dict, int, float]:
    """The current (options, retries, backoff): what a spawned process passes to configure()."""
    return dict(_SETTINGS.options), _SETTINGS.retries, _SETTINGS.backoff_s


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def credential_sources(url: str, options_key: str = "data.storage_options") -> str:
    """Where credentials for `url` come from, for messages."""
    proto = url.split("://", 1)[0].replace("gcs", "gs").replace("s3a", "s3")
    return _CREDENTIAL_SOURCES.get(proto, "{key}").format(key=options_key)


def filesystem(url: str, policy: Policy | None = None):
    """(fsspec filesystem, path inside it) for a URL."""
    import fsspec  # lazy: only for remote URLs (s3fs, gcsfs, ... load with it)

    try:
        return fsspec.core.url_to_fs(url, **(policy or _SETTINGS).options)
    except (ImportError, ValueError) as e:
        proto = url.split("://", 1)[0]
        raise StorageError(f"{url}: cannot open '{proto}://' URLs ({e}); install its fsspec backend "
                           "(s3fs for s3://, gcsfs for gs://, huggingface_hub for hf://)") from None


def _transient(e: BaseException) -> bool:
    if isinstance(e, _PERMANENT):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _TRANSIENT_NAMES:
        return True
    # s3fs/gcsfs report HTTP errors as OSError; 5xx and throttling are worth another try
    return isinstance(e, OSError) and any(s in str(e) for s in ("500", "502", "503", "504", "SlowDown",
                                                                "Throttl", "Timeout", "reset"))


def call(url: str, what: str, fn, policy: Policy | None = None):
    """fn() with retries on transient errors; permanent ones become a StorageError naming the URL."""
    policy = policy or _SETTINGS
    attempts = policy.retries
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below, re-raised with the URL
            if isinstance(e, FileNotFoundError):
                raise StorageError(f"{url}: not found (404) while trying to {what}; check the path or URL") from None
            if isinstance(e, PermissionError):
                raise StorageError(f"{url}: access denied (403) while trying to {what}; check the credentials: "
                                   + credential_sources(url, policy.options_key)) from None
            if type(e).__name__ in _NO_CREDENTIALS:
                raise StorageError(f"{url}: no credentials found while trying to {what} ({type(e).__name__}: {e}); "
                                   "credentials come from " + credential_sources(url, policy.options_key)) from None
            if not _transient(e):
                raise
            if attempt + 1 == attempts:
                raise StorageError(f"{url}: could not {what} after {attempts} attempt(s) "
                                   f"({type(e).__name__}: {e}); check the endpoint and the network, or raise "
                                   f"{policy.retries_key}") from None
            time.sleep(policy.backoff_s * 2 ** attempt)


def expand(pattern: str) -> list[str]:
    """Files matching a path or glob, sorted within the glob (remote ones as full URLs)."""
    has_glob = any(c in pattern for c in "*?[")
    if not is_remote(pattern):
        matches = sorted(glob.glob(pattern)) if has_glob else [pattern]
        return [m for m in matches if os.path.isfile(m)]
    fs, path = filesystem(pattern)
    proto = pattern.split("://", 1)[0]
    if has_glob:
        found = call(pattern, "list the files", lambda: fs.glob(path, detail=True))
        return sorted(f"{proto}://{p}" for p, info in found.items() if info.get("type") != "directory")
    def is_file() -> bool:
        try:
            return fs.isfile(path)
        except FileNotFoundError:  # a missing file is no match, like a local path
            return False

    return [pattern] if call(pattern, "look up the file", is_file) else []


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = filesystem(path)
    return int(call(path, "read the file size", lambda: fs.size(p)))


def open_binary(path: str):
    """A seekable binary file object; remote files are read with range requests and survive transient
    errors (RetryingFile)."""
    if not is_remote(path):
        return open(path, "rb")
    return RetryingFile(path)


class RetryingFile:
    """A remote file whose reads are retried: after a transient error the file is reopened and the read
    repeated from the same offset, so the bytes returned are the same as with no error."""

    def __init__(self, url: str):
        self.url, self.pos = url, 0
        self.fs, self.path = filesystem(url)
        self.f = call(url, "open the file", self._open)

    def _open(self):
        return self.fs.open(self.path, "rb", block_size=1 << 22, cache_type="readahead")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.f.close()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = self.f.seek(pos, whence)
        return self.pos

    def _retry(self, op):
        def attempt():
            try:
                return op()
            except Exception as e:
                if _transient(e):  # reopen at the same offset before the next attempt
                    try:
                        self.f.close()
                    except Exception:  # noqa: BLE001,S110 - the broken handle is dropped either way
                        pass
                    self.f = self._open()
                    self.f.seek(self.pos)
                raise
        out = call(self.url, f"read at byte {self.pos}", attempt)
        self.pos = self.f.tell()
        return out

    def read(self, n: int = -1) -> bytes:
        return self._retry(lambda: self.f.read(n))

    def readline(self, limit: int = -1) -> bytes:
        """Up to and including the next newline, at most `limit` bytes (fsspec files take no limit): read in
        chunks, then seek back to just past the newline (the readahead cache still holds those bytes)."""
        out = bytearray()
        while limit < 0 or len(out) < limit:
            want = 1 << 16 if limit < 0 else min(1 << 16, limit - len(out))
            chunk = self.read(want)
            if not chunk:
                break
            nl = chunk.find(b"\n")
            if nl >= 0:
                out += chunk[: nl + 1]
                self.seek(self.pos - (len(chunk) - nl - 1))
                break
            out += chunk
        return bytes(out)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

