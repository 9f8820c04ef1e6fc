"""Task tables from .tsv, .csv, .jsonl or .parquet, local or remote (fsspec URLs, data/corpus/storage.py), or a
`datasets` hub name: sentence pairs, single sentences, (query, positive, negative) rows.

TSV is read with quoting off (MRPC's sentences contain `"`: with quote processing rows shift).
Labels: integers -> class ids; other strings -> ids in sorted order, inferred from the training file
and stored with the model (id2label / label2id); floats -> regression. Every error names the file,
the line and the column, and says how to fix it.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bertlaunch.data.corpus import storage
from bertlaunch.data.corpus.shards import DataError

csv.field_size_limit(1 << 30)


@dataclass
class Rows:
    path: str
    columns: list[str]
    rows: list[dict]  # column -> raw string (or JSON value)
    lines: list[int]  # 1-based line number of each row in the file (Parquet: row number)

    def where(self, i: int) -> str:
        """Where row i is, for messages: 'line 3' (text tables) or 'row 3' (Parquet)."""
        return f"{'row' if table_format(self.path) == 'parquet' else 'line'} {self.lines[i]}"


def table_format(path: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffix = Path(path).suffix.lower()
    return {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
            ".parquet": "parquet"}.get(suffix, "")


def _open_text(path: str):
    """A local file, or a remote one read whole (tables are read whole anyway) through data/corpus/storage.py."""
    if not storage.is_remote(path):
        return open(path, encoding="utf-8-sig", newline="")
    with storage.open_binary(path) as f:
        return io.StringIO(f.read().decode("utf-8-sig"), newline="")


def _parquet_rows(path: str, only: list[str] | None) -> Rows:
    """The columns `only` (None: all) of a Parquet table; rows numbered from 1."""
    import pyarrow.parquet as pq  # lazy: ~0.3 s to import, only for Parquet tables

    with storage.open_binary(path) as f:
        try:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            table = pf.read(columns=[c for c in only if c in names] if only is not None else None)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    rows = table.to_pylist()
    if not rows:
        raise DataError(f"{path}: no data rows (an empty table)")
    return Rows(path, list(names), rows, list(range(1, len(rows) + 1)))


def json_records(lines, path: str, layout: str = ""):
    """(line number, object) of every non-blank line of JSON-lines text, given as (line number, text) pairs; a line
    that is not a JSON object is an error naming the file, the line and, when given, the `layout` expected."""
    for i, line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {i} is not a JSON object" + (f" ({layout})" if layout else ""))
        yield i, rec


def read_rows(path: str, fmt: str = "auto", columns: list[str] | None = None,
              header_field: str | None = None, only: list[str] | None = None) -> Rows:
    """A table's rows. `columns`: names for a .tsv/.csv without a header line (GLUE's CoLA train/dev); the
    file is still read with its own header when its first line has a field `header_field` (CoLA's test).
    A UTF-8 byte-order mark (GLUE's MRPC) is dropped, so it never sticks to the first column's name.
    `only`: the columns a Parquet table is read for (the others are listed, not loaded). `path` may be an
    fsspec URL (s3://, https://, ...)."""
    if storage.expand(path) != [path]:  # a missing file (a glob is no table path)
        raise DataError(f"{path}: file not found (task.train_file / eval_file / test_file)")
    kind = table_format(path, fmt)
    if not kind:
        raise DataError(f"{path}: unknown table format; use .tsv, .csv, .jsonl or .parquet, or set task.format")
    if kind == "parquet":
        return _parquet_rows(path, only)
    with _open_text(path) as f:
        if kind == "jsonl":
            rows, lines, columns = [], [], []
            for i, rec in json_records(enumerate(f, 1), path):
                columns += [k for k in rec if k not in columns]
                rows.append(rec)
                lines.append(i)
        else:
            reader = csv.reader(f, delimiter="\t" if kind == "tsv" else ",",
                                quoting=csv.QUOTE_NONE if kind == "tsv" else csv.QUOTE_MINIMAL)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty; it needs a header line and at least one row")
            first = None
            if columns and header_field not in [h.strip() for h in header]:  # header-less: line 1 is data
                first, header = header, list(columns)
            columns, rows, lines = [h.strip() for h in header], [], []
            numbered = ((row, reader.line_num) for row in reader)
            for row, line in itertools.chain([(first, 1)] if first else [], numbered):
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(columns):
                    what = "the header has" if first is None else "task.columns names"
                    raise DataError(f"{path}: line {line} has {len(row)} fields, {what} "
                                    f"{len(columns)} (is it {'tab' if kind == 'tsv' else 'comma'}-separated?)")
                rows.append(dict(zip(columns, row)))
                lines.append(line)
    if not rows:
        raise DataError(f"{path}: no data rows (only a header, or an empty file)")
    return Rows(path, columns, rows, lines)


def require_columns(t: Rows, needed: dict[str, str]) -> None:
    """needed: config key -> column name. All missing columns are reported at once."""
    problems = []
    for key, col in needed.items():
        if col not in t.columns:
            close = difflib.get_close_matches(col, t.columns, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{t.path}: no column '{col}' for {key}{hint}; columns are: {', '.join(t.columns)}")
    if problems:
        raise DataError("\n".join(problems))


def _as_number(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        f = float(str(v).strip())
    except ValueError:
        return None
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


@dataclass
class LabelSpace:
    kind: str  # classification | regression
    names: list[str] = field(default_factory=list)  # id -> name (classification)

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.names)

    def encode(self, value, t: Rows, i: int, column: str):
        if self.kind == "regression":
            num = _as_number(value)
            if num is None or (isinstance(num, float) and math.isnan(num)):
                raise DataError(f"{t.path}: line {t.lines[i]}, column '{column}': '{value}' is not a number "
                                "(this task is a regression: every label must be numeric)")
            return float(num)
        key = str(value).strip()
        if key not in self.index:
            raise DataError(f"{t.path}: line {t.lines[i]}, column '{column}': label '{key}' does not occur in "
                            f"the training file (known: {', '.join(self.names)})")
        return self.index[key]

    @property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


def infer_labels(t: Rows, column: str, problem: str = "auto", names: list[str] | None = None) -> LabelSpace:
    """Label space from the training file (or explicit `names`)."""
    values = [r[column] for r in t.rows]
    for i, v in enumerate(values):
        if v is None or str(v).strip() == "":
            raise DataError(f"{t.path}: line {t.lines[i]}, column '{column}': empty label")
    nums = [_as_number(v) for v in values]
    numeric = [n is not None for n in nums]
    if problem == "regression" or (problem == "auto" and all(numeric) and any(isinstance(n, float) for n in nums)):
        if not all(numeric):
            bad = numeric.index(False)
            raise DataError(f"{t.path}: line {t.lines[bad]}, column '{column}': '{values[bad]}' is not a number "
                            "(regression labels must all be numeric)")
        return LabelSpace("regression")
    if names:
        return LabelSpace("classification", [str(n) for n in names])
    if any(numeric) and not all(numeric):
        a, b = numeric.index(True), numeric.index(False)
        raise DataError(f"{t.path}: column '{column}' mixes label types: line {t.lines[a]} has '{values[a]}' "
                        f"(a number), line {t.lines[b]} has '{values[b]}' (text); make them consistent or list "
                        "the labels in task.labels")
    if all(numeric):  # integer classes, in numeric order (0..K-1 stay their own ids)
        return LabelSpace("classification", [str(i) for i in sorted(set(nums))])
    return LabelSpace("classification", sorted({str(v).strip() for v in values}))


def texts(t: Rows, text_a: str, text_b: str | None) -> tuple[list[str], list[str] | None]:
    def col(name):
        out = []
        for i, r in enumerate(t.rows):
            v = r.get(name)
            if v is None:
                raise DataError(f"{t.path}: line {t.lines[i]}: column '{name}' is missing")
            out.append(str(v))
        return out

    return col(text_a), (col(text_b) if text_b else None)
