"""Parquet corpora (Wikipedia, FineWeb, ... as shipped on the hub): one document per row of the text column.

Only `data.text_field` is read, one row group at a time, so memory is bounded by a row group, not by the
file. For sharding, row r of a file sits at the virtual byte offset r x B, where B is the file's average
bytes per row (at least 1): the file's virtual size is about its real size, so Parquet and text files
share one byte space and split evenly over the (rank, worker) streams, and a position is (file, row,
tokens used): a resume opens the row group holding the row and reads on from it.
"""

from __future__ import annotations

import difflib
import math

from bertlaunch.data.corpus.shards import DataError, Piece
from bertlaunch.data.corpus.storage import StorageError, open_binary, size


def is_parquet(path: str) -> bool:
    return str(path).endswith(".parquet")


class ParquetReader:
    """Pieces (one per non-empty row) of the rows whose virtual offset lies in a Segment."""

    def __init__(self, path: str, text_field: str | None):
        """text_field None: only the layout (rows, virtual size), no column check."""
        import pyarrow.parquet as pq  # lazy: ~0.3 s to import, only for Parquet corpora

        self.path, self.text_field = path, text_field
        try:
            with open_binary(path) as f:
                self.meta = pq.ParquetFile(f).metadata
        except StorageError as e:
            raise DataError(str(e)) from None
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        schema = self.meta.schema.to_arrow_schema()
        if text_field is not None and text_field not in schema.names:
            close = difflib.get_close_matches(text_field, schema.names, n=1, cutoff=0.5)
            raise DataError(f"{path}: no column '{text_field}' (data.text_field)"
                            + (f"; did you mean '{close[0]}'?" if close else "")
                            + f" The columns are: {', '.join(schema.names)}")
        kind = schema.field(text_field).type if text_field is not None else "string"
        if str(kind) not in ("string", "large_string", "string_view"):
            raise DataError(f"{path}: column '{text_field}' holds {kind}, not text; point data.text_field at a "
                            "string column")
        self.rows = self.meta.num_rows
        self.per_row = max(1, math.ceil(size(path) / max(self.rows, 1)))
        self.starts = [0]
        for i in range(self.meta.num_row_groups):
            self.starts.append(self.starts[-1] + self.meta.row_group(i).num_rows)
        self.replaced = 0

    @property
    def virtual_size(self) -> int:
        return self.rows * self.per_row

    def pieces(self, seg):
        import pyarrow.parquet as pq  # lazy: ~0.3 s to import, only for Parquet corpora

        b = self.per_row
        first = seg.lo // b if seg.resume is not None else -(-seg.lo // b)  # a resume points at its row
        last = -(-seg.hi // b)  # rows whose offset r x b < hi
        if seg.resume is not None:
            last = max(last, first + 1)
        with open_binary(self.path) as fh:
            yield from self._rows(pq.ParquetFile(fh), first, last, b)

    def _rows(self, f, first: int, last: int, b: int):
        for g in range(self.meta.num_row_groups):
            lo, hi = max(first, self.starts[g]), min(last, self.starts[g + 1])
            if lo >= hi:
                continue
            column = f.read_row_group(g, columns=[self.text_field]).column(0)  # one row group in memory
            for r, text in enumerate(column.slice(lo - self.starts[g], hi - lo).to_pylist(), lo):
                if text is None or not text.strip():
                    continue  # an empty row is not a document
                yield Piece(r * b, r * b, text, True, True, (r + 1) * b)
