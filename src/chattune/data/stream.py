"""Data files -> raw records, one at a time: the one reader of .json (a list), .jsonl, .csv and .parquet files.

Every record keeps its location ("file:line", "file[index]", "file:row N") so errors point at it. Training
uses read_records, which stops at the first line that is not JSON; the data tools (`data convert`,
`data check`) use iter_records, which yields such a line as a BadRecord and goes on. .jsonl and .parquet
files are streamed, never whole in memory; a file-level problem (missing, empty, not UTF-8) raises DataError.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from chattune.errors import DataError

PARQUET_BATCH = 2048  # rows per read from a parquet file
_EMPTY_FIX = "add records or remove the file from the config"
_PERMISSIONS_FIX = "check the file's permissions"


@dataclass
class Record:
    """One raw record of a data file and its location."""

    data: Any
    where: str


@dataclass
class BadRecord:
    """A record that could not be parsed at all (e.g. a broken JSON line)."""

    where: str
    reason: str


def read_records(path: str | Path) -> Iterator[Record]:
    """Yield the raw records of one file, each with its 'file:line' (or 'file:row N') location; a broken line raises."""
    for rec in iter_records(path):
        if isinstance(rec, BadRecord):
            raise DataError(rec.reason, where=rec.where, fix="each line of a .jsonl file must be one complete JSON object")
        yield rec


def iter_records(path: str | Path) -> Iterator[Record | BadRecord]:
    """Yield each record of a file (or a BadRecord for a line that is not JSON); file-level problems raise DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", where=str(path), fix="check data.train / --data (paths are relative to where you run chattune)")
    if path.is_dir():
        raise DataError("is a folder, not a data file", where=str(path), fix="name a .json, .jsonl, .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix in (".json", ".csv"):
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read file ({exc.strerror})", where=str(path), fix=_PERMISSIONS_FIX) from None
        text = _decode(raw, path)
        if not text.strip():
            raise DataError("file is empty", where=str(path), fix=_EMPTY_FIX)
        yield from (_read_json(path, text) if suffix == ".json" else _read_csv(path, text))
    else:
        raise DataError(f"unsupported file type {suffix or '(none)'!r}", where=str(path), fix="use .json (a list), .jsonl, .csv or .parquet")


def _decode(raw: bytes, path: Path, *, first_line: int = 1, offset: int = 0) -> str:
    """UTF-8 text of a file (offset 0) or of one line at `offset`; else a DataError at file:line naming the byte."""
    bom = len(codecs.BOM_UTF8) if offset == 0 and raw.startswith(codecs.BOM_UTF8) else 0  # common from Windows
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        line = first_line + raw[:at].count(b"\n")
        raise DataError(
            f"the file is not UTF-8 text: byte {offset + at} (0x{raw[at]:02x}) is not valid UTF-8 "
            "(it looks saved as GBK, Latin-1 or another legacy encoding)",
            where=f"{path}:{line}",
            fix=f"re-save the file as UTF-8, e.g. `iconv -f GBK -t UTF-8 in{path.suffix} > out{path.suffix}` (or -f LATIN1)",
        ) from None


def _read_json(path: Path, text: str) -> Iterator[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"not valid JSON: {exc.msg} (column {exc.colno})",
            where=f"{path}:{exc.lineno}",
            fix="fix the syntax there; a file with one JSON object per line must be named .jsonl",
        ) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} wrappers are common
    if not isinstance(data, list):
        raise DataError(
            f"the top level is {json_kind(data)}, expected a list of records",
            where=str(path),
            fix="wrap the records in [ ... ], or use .jsonl with one record per line",
        )
    # Line numbers of list items are not kept by json; record indices are exact and easy to find.
    for i, item in enumerate(data):
        yield Record(item, f"{path}[{i}]")


def _read_jsonl(path: Path) -> Iterator[Record | BadRecord]:
    """One record per line, read line by line; a line that is not JSON becomes a BadRecord naming its column."""
    seen_any = False
    offset = 0
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read file ({exc.strerror})", where=str(path), fix=_PERMISSIONS_FIX) from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, first_line=lineno, offset=offset)
            offset += len(raw)
            if not line.strip():
                continue
            seen_any = True
            try:
                yield Record(json.loads(line.rstrip("\r\n")), f"{path}:{lineno}")
            except json.JSONDecodeError as exc:
                yield BadRecord(f"{path}:{lineno}", f"line is not valid JSON: {exc.msg} (column {exc.colno})")
    if not seen_any:
        raise DataError("file is empty", where=str(path), fix=_EMPTY_FIX)


def _read_csv(path: Path, text: str) -> Iterator[Record]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise DataError("CSV has no header row", where=str(path), fix="the first line must name the columns, e.g. instruction,input,output")
    line = reader.line_num
    for row in reader:
        yield Record({k: v for k, v in row.items() if k is not None}, f"{path}:{line + 1}")
        line = reader.line_num


def _read_parquet(path: Path) -> Iterator[Record]:
    """Rows in batches of PARQUET_BATCH, so a large file is never whole in memory."""
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> DataError:
        return DataError(f"cannot read parquet ({exc})", where=str(path), fix="re-export the file, or convert it to .jsonl")

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise unreadable(exc) from None
    row = 0
    while True:
        try:
            rows = next(batches).to_pylist()
        except StopIteration:
            return
        except Exception as exc:  # a damaged page further into the file
            raise unreadable(exc) from None
        for item in rows:
            row += 1
            yield Record(item, f"{path}:row {row}")


def json_kind(value: Any) -> str:
    """A JSON value's kind in the words of the JSON file, not Python's."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {list: "a list", dict: "an object", str: "text", type(None): "null"}.get(type(value), f"a {type(value).__name__}")
