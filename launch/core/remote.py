"""checkpoint.remote: the run's checkpoints in object storage (s3://, gs://, hf://, https://) or on a second disk
(file://), through fsspec, with data/corpus/storage.py's retries and error messages.

Layout under the URL, as in output_dir:
  step_NNNNNNNN/...             a checkpoint, file for file as in output_dir/checkpoints/step_NNNNNNNN/
  step_NNNNNNNN/manifest.json   written last, once every rank's files are up: the commit marker there too
  final/, exports/step_NNNNNNNN/, metrics.jsonl, config.yaml and the run's other top-level files

A step folder without manifest.json is an upload that did not finish: it is never resumed from, and pruning
removes it once a newer checkpoint committed. A download is verified against the manifest (the size and sha256
of every file) before it is used. Secrets (checkpoint.storage_options, credentials in the environment) are
never part of a message from here: `scrub` removes them from the errors of the storage libraries.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bertlaunch.core.checkpoint import MANIFEST, STEP_RE, verify, write_json
from bertlaunch.core.config import CheckpointConfig
from bertlaunch.core.secrets import scrub, secret_values
from bertlaunch.data.corpus.storage import Policy, StorageError, call, filesystem


@dataclass(frozen=True)
class RemoteStep:
    step: int
    committed: bool  # its manifest.json is there
    files: int  # objects under it (manifest included)
    bytes: int


class RemoteCheckpoints:
    """One checkpoint.remote URL. Every operation retries transient errors (checkpoint.io_retries) and raises
    StorageError naming the URL otherwise."""

    def __init__(self, checkpoint: CheckpointConfig, backoff_s: float = 1.0):
        self.url = checkpoint.remote.rstrip("/")
        self.policy = Policy(dict(checkpoint.storage_options), checkpoint.io_retries, backoff_s,
                             "checkpoint.storage_options", "checkpoint.io_retries")
        self.fs, self.root = filesystem(self.url, self.policy)
        self.root = self.root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.secrets = secret_values(self.policy.options)

    def where(self, rel: str = "") -> str:
        """The URL of `rel` (for messages)."""
        return f"{self.url}/{rel}" if rel else self.url

    def _call(self, rel: str, what: str, fn):
        try:
            return call(self.where(rel), what, fn, self.policy)
        except StorageError as e:
            raise StorageError(self.scrub(str(e))) from None
        except Exception as e:  # noqa: BLE001 - any other library error: named, with the secrets taken out
            raise StorageError(self.scrub(f"{self.where(rel)}: could not {what} ({type(e).__name__}: {e})")) from None

    def scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

    # -- listing ----------------------------------------------------------------------------------
    def steps(self) -> list[RemoteStep]:
        """Every step folder under the URL, oldest first, committed or not (one listing)."""
        def find():
            self.fs.invalidate_cache()
            try:
                return self.fs.find(self.root, detail=True)
            except FileNotFoundError:  # nothing uploaded yet
                return {}

        found: dict[int, list] = {}
        committed: set[int] = set()
        for path, info in self._call("", "list the checkpoints", find).items():
            rel = path[len(self.root):].lstrip("/") if path.startswith(self.root) else path
            parts = rel.split("/")
            m = STEP_RE.match(parts[0])
            if m and len(parts) > 1:
                step = int(m.group(1))
                found.setdefault(step, []).append(int(info.get("size") or 0))
                committed |= {step} if parts[1:] == [MANIFEST] else set()
        return [RemoteStep(s, s in committed, len(sizes), sum(sizes)) for s, sizes in sorted(found.items())]

    def committed(self) -> list[int]:
        return [s.step for s in self.steps() if s.committed]

    def read_json(self, rel: str) -> dict:
        return json.loads(self._call(rel, "read it", lambda: self.fs.cat_file(f"{self.root}/{rel}")))

    # -- upload -----------------------------------------------------------------------------------
    def put(self, local: Path, rel: str) -> None:
        """Upload one file (an object store's PUT is whole or nothing; a local copy goes through a temporary
        name and a rename)."""
        target = f"{self.root}/{rel}"

        def put():
            if not self.local:
                return self.fs.put_file(str(local), target)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.put_file(str(local), target + ".part")
            os.replace(target + ".part", target)

        self._call(rel, "upload it", put)

    def put_bytes(self, rel: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload"
            path.write_bytes(data)
            self.put(path, rel)

    def put_json(self, rel: str, obj) -> None:
        self.put_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def put_tree(self, local: Path, rel: str) -> None:
        """A folder (final/, an export), file by file."""
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            self.put(path, f"{rel}/{path.relative_to(local).as_posix()}")

    def remove(self, rel: str) -> None:
        def rm():
            try:
                self.fs.rm(f"{self.root}/{rel}", recursive=True)
            except FileNotFoundError:
                pass

        self._call(rel, "delete it", rm)

    def prune(self, keep_last: int, protected: set[int]) -> list[int]:
        """After a commit: delete all but the newest keep_last committed checkpoints (and `protected` steps), and
        the unfinished uploads older than the newest commit (newer ones may still be under way). Returns the
        steps deleted."""
        steps = self.steps()
        committed = [s.step for s in steps if s.committed]
        if not committed:
            return []
        keep = set(committed[-keep_last:]) | protected
        gone = [s.step for s in steps if s.step not in keep and (s.committed or s.step < committed[-1])]
        for step in gone:
            self.remove(f"step_{step:08d}")
        return gone

    # -- download ---------------------------------------------------------------------------------
    def download(self, step: int, dest: Path) -> str | None:
        """Fetch step_N into `dest` (a fresh folder), manifest last, and verify it: None when every file's size
        and sha256 match the manifest, else the reason."""
        rel = f"step_{step:08d}"
        manifest = self.read_json(f"{rel}/{MANIFEST}")
        names = sorted(manifest["files"])
        shutil.rmtree(dest, ignore_errors=True)
        for name in names:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
        self._call(rel, "download it", lambda: self.fs.get([f"{self.root}/{rel}/{n}" for n in names],
                                                            [str(dest / n) for n in names]))
        write_json(dest / MANIFEST, manifest)
        return verify(dest)

    def get_file(self, rel: str, dest: Path) -> bool:
        """Fetch one file if it exists (metrics.jsonl on a new node); False when it does not."""
        def get():
            try:
                self.fs.get_file(f"{self.root}/{rel}", str(dest))
                return True
            except FileNotFoundError:
                return False

        return self._call(rel, "download it", get)

