"""Compressed corpus files (.gz, .zst, .bz2, .xz), decompressed as a stream, never to disk.

A compressed file cannot be cut into byte ranges, so for training it is a unit of sharding: the stream
whose range holds the file's first byte reads all of it (as if it were one long document) and the other
streams read none of it (data/corpus/reader.py). Positions inside it are offsets in the decompressed bytes; a
resume decompresses from the start and skips to the saved offset, without tokenizing on the way.
`bertlaunch prepare` instead splits the decompressed bytes evenly (every worker skips to its
part), so a token cache of X.jsonl.gz has the same shards as one of X.jsonl.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib

import zstandard

from bertlaunch.data.corpus.storage import open_binary

COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
READ_SIZE = 1 << 16


def compression_of(path: str) -> str | None:
    return next((c for c in COMPRESSIONS if str(path).endswith(c)), None)


def inner_name(path: str) -> str:
    """The file name without its compression suffix (x.jsonl.gz -> x.jsonl): what the contents are."""
    c = compression_of(path)
    return str(path)[: -len(c)] if c else str(path)


class CorruptError(ValueError):
    """A truncated or corrupt compressed stream (raised with the file and the decompressed offset)."""


class _Counting:
    """The compressed file, counting the bytes the decompressor has taken (for ratio estimates)."""

    def __init__(self, path: str):
        self.f, self.n = open_binary(path), 0

    def read(self, n: int = -1) -> bytes:
        out = self.f.read(n)
        self.n += len(out)
        return out

    def readinto(self, b) -> int:
        k = self.f.readinto(b)
        self.n += k
        return k

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.f.close()


def _decompressor(source: _Counting, kind: str):
    if kind == ".gz":
        return gzip.GzipFile(fileobj=source, mode="rb")
    if kind == ".bz2":
        return bz2.BZ2File(source, "rb")
    if kind == ".xz":
        return lzma.LZMAFile(source, "rb")
    return _Zstd(source)


class _Zstd:
    """Zstandard frames one after another (zstd's stream reader returns a truncated frame's bytes
    silently; this raises EOFError when the file ends inside a frame, as gzip, bz2 and xz do)."""

    def __init__(self, source: _Counting):
        self.source, self.d = source, zstandard.ZstdDecompressor()
        self.obj, self.in_frame = self.d.decompressobj(), False

    def read(self, n: int) -> bytes:
        while True:
            chunk = self.source.read(READ_SIZE)
            if not chunk:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstd frame")
                return b""
            out = bytearray()
            while chunk:
                self.in_frame = True
                out += self.obj.decompress(chunk)
                chunk = b""
                if self.obj.eof:  # a frame ended; the bytes after it start the next one
                    chunk, self.obj, self.in_frame = self.obj.unused_data, self.d.decompressobj(), False
            if out:
                return bytes(out)

    def close(self) -> None:
        pass


class Window:
    """A file-like view of a forward-only decompressed stream that also allows seeks back within the last
    `keep` bytes (the text reader peeks at the line after a piece, then returns to it). Memory is bounded
    by about 2 x keep bytes, whatever the file size."""

    def __init__(self, path: str, kind: str, keep: int = 1 << 22):
        self.path, self.kind, self.keep = path, kind, keep
        self.source = _Counting(path)
        self.raw = _decompressor(self.source, kind)
        self.buf, self.base, self.pos, self.eof = bytearray(), 0, 0, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.raw.close()
        self.source.close()

    @property
    def compressed_read(self) -> int:
        """Compressed bytes taken from the file so far (a little ahead of what was returned)."""
        return self.source.n

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int) -> None:
        if pos < self.base:
            raise RuntimeError(f"{self.path}: seek back to {pos} is before the kept window ({self.base})")
        self.pos = pos

    def _fill(self, upto: int) -> None:
        """Decompress until the buffer reaches offset `upto` (or the end of the stream)."""
        while not self.eof and self.base + len(self.buf) < upto:
            try:
                chunk = self.raw.read(READ_SIZE)
            except (EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as e:
                raise CorruptError(f"{self.path}: the compressed stream is truncated or corrupt after "
                                   f"{self.base + len(self.buf)} decompressed bytes ({type(e).__name__}: {e}); "
                                   "re-download or re-create the file") from None
            except Exception as e:  # zstandard.ZstdError
                if type(e).__name__ != "ZstdError":
                    raise
                raise CorruptError(f"{self.path}: the zstd stream is truncated or corrupt after "
                                   f"{self.base + len(self.buf)} decompressed bytes ({e}); re-download or "
                                   "re-create the file") from None
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
            drop = min(self.pos, self.base + len(self.buf)) - self.keep - self.base
            if drop > self.keep:  # forget what lies well behind the read position (a long skip stays small)
                del self.buf[:drop]
                self.base += drop

    def read(self, n: int = -1) -> bytes:
        self._fill(self.pos + n if n >= 0 else float("inf"))
        start = self.pos - self.base
        out = bytes(self.buf[start: start + n] if n >= 0 else self.buf[start:])
        self.pos += len(out)
        return out

    def readline(self, limit: int = -1) -> bytes:
        """Up to and including the next newline, at most `limit` bytes (offsets below are absolute)."""
        end, scan = None, self.pos
        while True:
            nl = self.buf.find(b"\n", scan - self.base)
            if nl >= 0:
                end = self.base + nl + 1
                break
            if self.eof or (limit >= 0 and self.base + len(self.buf) - self.pos >= limit):
                end = self.base + len(self.buf)
                break
            scan = max(self.pos, self.base + len(self.buf))  # after a seek past the buffer: from pos on
            self._fill(scan + READ_SIZE)  # trims only bytes well before self.pos: absolute offsets hold
        if limit >= 0:
            end = min(end, self.pos + limit)
        out = bytes(self.buf[self.pos - self.base: end - self.base])
        self.pos += len(out)
        return out


def open_bytes(path: str):
    """A binary file object over the (decompressed) bytes of `path`."""
    kind = compression_of(path)
    return Window(path, kind) if kind else open_binary(path)


def decompressed_size(path: str) -> int:
    """Bytes of the decompressed contents (one pass through the file)."""
    n = 0
    with Window(path, compression_of(path), keep=0) as w:
        while chunk := w.read(1 << 20):
            n += len(chunk)
    return n
