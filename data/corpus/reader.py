"""Corpus files -> documents -> pieces, read from the byte ranges (data/corpus/shards.py) streams own, without
loading the corpus: resolving paths and globs, file sizes, and the text / JSON-lines reader.

A long line is read in pieces of at most `max_chunk_bytes`, cut at whitespace, so a 50 MB line streams
through tokenizer and packer without being held whole. Each piece records its file byte offset: a
stream's position is (file, piece offset, tokens of that piece already used), so resuming seeks.
"""

from __future__ import annotations

import json

from bertlaunch.data.corpus.compressed import COMPRESSIONS, CorruptError, compression_of, inner_name, open_bytes
from bertlaunch.data.corpus.embedded import resolve_embedded
from bertlaunch.data.corpus.parquet import ParquetReader, is_parquet
from bertlaunch.data.corpus.shards import DataError, Piece, Segment
from bertlaunch.data.corpus.storage import StorageError, expand, size

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


def resolve_files(patterns: list[str]) -> list[str]:
    """Expand paths/globs in order (sorted within a glob), dropping duplicates; error on no match."""
    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith("embedded:"):
            matches = [resolve_embedded(pattern)]
        else:
            try:
                matches = expand(pattern)
            except StorageError as e:
                raise DataError(str(e)) from None
        if not matches:
            raise DataError(f"'{pattern}' matches no file: check the path in data.train_files/eval_files")
        for m in matches:
            if not inner_name(m).endswith(TEXT_SUFFIXES + JSONL_SUFFIXES) and not is_parquet(m):
                raise DataError(f"{m}: unsupported file type; use .txt (documents separated per "
                                "data.txt_documents), .jsonl (one JSON object per line), either of them "
                                f"optionally compressed ({', '.join(COMPRESSIONS)}), or .parquet")
            if m not in out:
                out.append(m)
    return out


class PieceReader:
    """Reads one file's pieces for a Segment. Blank-line docs, line docs, or jsonl records.

    A compressed file (data/corpus/compressed.py) is read as its decompressed bytes. With `whole_compressed`
    (training: segments are in compressed bytes) it is one unit: the fresh segment that holds its middle
    byte reads all of it (the middle, not the first byte, so that files of similar size spread evenly over
    as many streams), the others read nothing, and a resumed segment reads on from its saved (decompressed)
    offset; data/mlm/stream.py keeps a started unit in one piece when it re-splits. Without it (the token cache
    build) segments are decompressed byte ranges."""

    def __init__(self, path: str, mode: str, text_field: str, max_chunk_bytes: int, errors: str,
                 whole_compressed: bool = True):
        self.path, self.mode, self.text_field = path, mode, text_field
        self.jsonl = inner_name(path).endswith(JSONL_SUFFIXES)
        self.whole = bool(compression_of(path)) and whole_compressed
        self.middle = size(path) // 2 if self.whole else 0
        self.max_chunk, self.errors = max_chunk_bytes, errors
        self.replaced = 0  # count of undecodable bytes replaced (errors="replace")

    # -- low level -------------------------------------------------------------------------------
    def _decode(self, raw: bytes, offset: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if self.errors != "replace":
                line = _line_number(self.path, offset + e.start)
                raise DataError(f"{self.path}: line {line} (byte {offset + e.start}) is not valid UTF-8 "
                                f"({e.reason}); fix the file or set data.encoding_errors=replace") from None
            text = raw.decode("utf-8", errors="replace")
            self.replaced += text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
            return text

    def _read_chunk(self, f, pos: int) -> tuple[bytes, int, bool]:
        """Bytes of one piece starting at pos: (raw, next_pos, line_complete)."""
        f.seek(pos)
        raw = f.readline(self.max_chunk)
        if not raw:
            return b"", pos, True
        if raw.endswith(b"\n"):
            return raw, pos + len(raw), True
        if len(raw) < self.max_chunk or self.jsonl:
            if self.jsonl and len(raw) == self.max_chunk:  # JSON cannot be cut: read the whole record
                raw += f.readline()
            return raw, pos + len(raw), True  # last line of the file without a newline
        cut = max(raw.rfind(b" "), raw.rfind(b"\t"))
        if cut <= 0:  # no whitespace: cut anywhere, but not inside a UTF-8 sequence
            cut = len(raw) - 1
            while cut > 0 and (raw[cut] & 0xC0) == 0x80:
                cut -= 1
            cut -= 1
        raw = raw[: cut + 1]
        return raw, pos + len(raw), False

    def _is_line_start(self, f, pos: int) -> bool:
        if pos == 0:
            return True
        f.seek(pos - 1)
        return f.read(1) == b"\n"

    def _prev_line_blank(self, f, pos: int) -> bool:
        """For a line starting at pos: is the line before it blank (or is this the first line)?"""
        if pos == 0:
            return True
        lo = max(0, pos - 4096)
        f.seek(lo)
        before = f.read(pos - lo)[:-1]  # drop the newline that ends the previous line
        nl = before.rfind(b"\n")
        if nl < 0 and lo > 0:
            return False  # a previous line longer than the window is not blank
        return before[nl + 1:].strip() == b""

    def _next_line_start(self, f, pos: int) -> int:
        if self._is_line_start(f, pos):
            return pos
        f.seek(pos)
        while True:  # skip the rest of a (possibly very long) line in bounded reads
            chunk = f.readline(self.max_chunk)
            pos += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                return pos

    # -- documents -------------------------------------------------------------------------------
    def pieces(self, seg: Segment):
        """Yield the pieces of the documents that start in [seg.lo, seg.hi)."""
        if self.whole:
            if seg.resume is None and not seg.lo <= self.middle < max(seg.hi, 1):
                return  # the file belongs to the stream whose range holds its middle byte
            seg = Segment(seg.file, seg.lo, 1 << 62, seg.resume)  # to the end of the decompressed bytes
        try:
            with open_bytes(self.path) as f:
                if self.jsonl or self.mode == "line":
                    yield from self._line_docs(f, seg)
                else:
                    yield from self._block_docs(f, seg)
        except CorruptError as e:
            raise DataError(str(e)) from None

    def _text_of(self, raw: bytes, pos: int) -> str:
        text = self._decode(raw, pos)
        if not self.jsonl:
            return text.strip("\r\n")
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{self.path}: line {_line_number(self.path, pos)} is not valid JSON ({e.msg}); "
                            "each line of a .jsonl file must be one JSON object") from None
        if not isinstance(rec, dict) or self.text_field not in rec:
            keys = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{self.path}: line {_line_number(self.path, pos)} has no field "
                            f"'{self.text_field}' (it has: {keys}); set data.text_field")
        value = rec[self.text_field]
        return value if isinstance(value, str) else str(value)

    def _line_docs(self, f, seg: Segment):
        if seg.resume is not None:
            pos, first_is_start, doc_offset = seg.lo, seg.resume[1], seg.resume[2]
        else:
            pos, first_is_start = self._next_line_start(f, seg.lo), True
            doc_offset = pos
        doc_start, in_doc = first_is_start, seg.resume is not None and not first_is_start
        while True:
            if not in_doc and pos >= seg.hi:
                return
            raw, nxt, complete = self._read_chunk(f, pos)
            if not raw:
                return
            text = self._text_of(raw, pos)
            if doc_start and complete and not text.strip():  # empty line / record: not a document
                pos = nxt
                continue
            if doc_start:
                doc_offset = pos
            yield Piece(pos, doc_offset, text, doc_start, complete, nxt)
            pos, in_doc, doc_start = nxt, not complete, complete

    def _block_docs(self, f, seg: Segment):
        if seg.resume is not None:
            pos, doc_start, in_doc = seg.lo, seg.resume[1], True
            doc_offset = seg.resume[2]
            line_complete_before = self._is_line_start(f, pos)
        else:
            pos = self._next_line_start(f, seg.lo)
            doc_start, in_doc, line_complete_before, doc_offset = False, False, True, pos
            # a mid-document start belongs to the previous range: skip to the next document start
            prev_blank = self._prev_line_blank(f, pos)
        while True:
            raw, nxt, complete = self._read_chunk(f, pos)
            blank = (not raw) or (line_complete_before and complete and not raw.strip())
            if not in_doc:
                if not raw:
                    return
                if blank:
                    prev_blank, pos = True, nxt
                    continue
                if not prev_blank or not line_complete_before:
                    prev_blank, pos, line_complete_before = False, nxt, complete
                    continue
                if pos >= seg.hi:
                    return
                in_doc, doc_start, doc_offset = True, True, pos
            elif blank:  # a blank line (or EOF) ends the document; the previous piece carried doc_end
                in_doc, prev_blank, pos, line_complete_before = False, True, nxt, True
                continue
            text = self._decode(raw, pos).rstrip("\r\n")
            end = complete and self._doc_ends_after(f, nxt)
            yield Piece(pos, doc_offset, text + ("\n" if complete and not end else ""), doc_start, end, nxt)
            doc_start, pos, line_complete_before = False, nxt, complete
            if end:
                in_doc, prev_blank = False, False

    def _doc_ends_after(self, f, pos: int) -> bool:
        """In blank-line mode: is the line at pos blank or missing (so the document ends before it)?"""
        f.seek(pos)
        nxt = f.readline(4096)
        return not nxt or (nxt.endswith(b"\n") and not nxt.strip()) or (len(nxt) < 4096 and not nxt.strip())


def _line_number(path: str, offset: int) -> int:
    """1-based line of a byte offset (only computed on the error path)."""
    n, done = 1, 0
    with open_bytes(path) as f:
        while done < offset:
            chunk = f.read(min(1 << 20, offset - done))
            if not chunk:
                break
            n += chunk.count(b"\n")
            done += len(chunk)
    return n


def file_sizes(files: list[str]) -> list[int]:
    """Each file's extent in the sharding byte space: its bytes (Parquet: rows x average bytes per row)."""
    try:
        return [ParquetReader(p, None).virtual_size if is_parquet(p) else size(p) for p in files]
    except StorageError as e:
        raise DataError(str(e)) from None


def text_readers(files: list[str], mode: str, text_field: str, max_chunk_bytes: int, errors: str,
                 whole_compressed: bool = True) -> list:
    """One reader per file: Parquet rows, or text / JSON lines (plain or compressed)."""
    return [ParquetReader(p, text_field) if is_parquet(p) else
            PieceReader(p, mode, text_field, max_chunk_bytes, errors, whole_compressed) for p in files]
