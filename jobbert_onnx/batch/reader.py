"""Input tables, streamed in chunks: .txt, .csv, .tsv, .jsonl, .parquet.

A reader yields `Rows`: each row's id (the `--id-column` value, else its row
number) and its raw cell, which may be None or not a string; deciding what to
do with such cells is the caller's job (`--on-bad-row`).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobbert_onnx.errors import JobbertOnnxError

SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")


class InputError(JobbertOnnxError, ValueError):
    """The input file cannot be read as asked."""


@dataclass(frozen=True)
class Rows:
    """A chunk of input rows: `start` is the row number of the first."""

    start: int
    ids: list[Any]
    cells: list[Any]


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: unknown input type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    return suffix


class TableReader:
    """One input file and the columns to read from it."""

    def __init__(self, path: str | Path, column: str | None = None, id_column: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path} does not exist or is not a file")
        self.kind = _suffix(self.path)
        if self.kind == ".txt" and (column or id_column):
            raise InputError(
                f"{self.path} is plain text (one text per line): it has no columns; drop --column/--id-column"
            )
        self.column = column
        self.id_column = id_column
        if self.kind in (".csv", ".tsv"):
            self.column = self._pick_csv_column()
        elif self.kind == ".parquet":
            self.column = self._pick_parquet_column()
        elif self.kind == ".jsonl":
            self.column = column or "text"

    def count(self) -> int:
        """Number of rows, read cheaply (parquet: from its metadata)."""
        if self.kind == ".parquet":
            return int(self._parquet().metadata.num_rows)
        return sum(1 for _ in self._records())

    def chunks(self, size: int) -> Iterator[Rows]:
        """The rows in order, `size` at a time."""
        if self.kind == ".parquet":
            yield from self._parquet_chunks(size)
            return
        start, ids, cells = 0, [], []
        for number, (row_id, cell) in enumerate(self._records()):
            ids.append(number if row_id is _ROW_NUMBER else row_id)
            cells.append(cell)
            if len(cells) == size:
                yield Rows(start, ids, cells)
                start, ids, cells = number + 1, [], []
        if cells:
            yield Rows(start, ids, cells)

    # -- formats ---------------------------------------------------------------

    def _records(self) -> Iterator[tuple[Any, Any]]:
        if self.kind == ".txt":
            with open(self.path, encoding="utf-8", newline="") as handle:
                for line in handle:
                    yield _ROW_NUMBER, line.rstrip("\r\n")
        elif self.kind == ".jsonl":
            with open(self.path, encoding="utf-8") as handle:
                for number, line in enumerate(handle):
                    yield self._json_record(line, number)
        else:
            # Cells may be long (a whole posting); the csv module's default cap is 128 KiB.
            csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
            with open(self.path, encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle, delimiter="\t" if self.kind == ".tsv" else ",")
                for record in reader:
                    yield (record[self.id_column] if self.id_column else _ROW_NUMBER), record[self.column or ""]

    def _json_record(self, line: str, number: int) -> tuple[Any, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{self.path}: line {number + 1} is not JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise InputError(f"{self.path}: line {number + 1} is not a JSON object")
        if self.column not in record:
            raise InputError(
                f"{self.path}: line {number + 1} has no {self.column!r} field (it has {list(record)}); use --column"
            )
        if self.id_column is None:
            return _ROW_NUMBER, record[self.column]
        if self.id_column not in record:
            raise InputError(f"{self.path}: line {number + 1} has no id field {self.id_column!r}")
        return record[self.id_column], record[self.column]

    def _pick_csv_column(self) -> str:
        with open(self.path, encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle, delimiter="\t" if self.kind == ".tsv" else ","), [])
        return self._check_columns(header)

    def _check_columns(self, header: list[str]) -> str:
        for name in (self.column, self.id_column):
            if name is not None and name not in header:
                raise InputError(f"{self.path} has no column {name!r}; its columns are: {', '.join(header)}")
        if self.column:
            return self.column
        if len(header) == 1:
            return header[0]
        if "text" in header:
            return "text"
        raise InputError(f"{self.path} has several columns ({', '.join(header)}); choose one with --column")

    def _parquet(self) -> Any:
        try:
            import pyarrow.parquet as pq
        except ImportError as error:
            raise InputError("reading .parquet needs pyarrow: pip install 'jobbert-onnx[batch]'") from error
        return pq.ParquetFile(self.path)

    def _pick_parquet_column(self) -> str:
        return self._check_columns(list(self._parquet().schema_arrow.names))

    def _parquet_chunks(self, size: int) -> Iterator[Rows]:
        columns = [self.column] + ([self.id_column] if self.id_column else [])
        start = 0
        for batch in self._parquet().iter_batches(batch_size=size, columns=columns):
            cells = batch.column(self.column).to_pylist()
            ids = batch.column(self.id_column).to_pylist() if self.id_column else list(range(start, start + len(cells)))
            yield Rows(start, ids, cells)
            start += len(cells)


_ROW_NUMBER = object()


def fingerprint(path: Path) -> dict[str, Any]:
    """What identifies an input for resuming: size, modification time, and a hash of its first and last MiB."""
    import hashlib

    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if stat.st_size > 1 << 20:
            handle.seek(max(stat.st_size - (1 << 20), 1 << 20))
            digest.update(handle.read())
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256_ends": digest.hexdigest(),
    }
