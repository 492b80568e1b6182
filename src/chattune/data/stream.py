"""Records one at a time, bad ones included: the readers behind `data convert` and `data check`.

formats.read_records stops at the first unreadable line, which is right for
training. The data tools must instead report every bad line and go on, and read
.jsonl and .parquet files without holding the whole file in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chattune.data.formats import Record, read_records
from chattune.errors import DataError

PARQUET_BATCH = 2048  # rows per read from a parquet file


@dataclass
class BadRecord:
    """A record that could not be parsed at all (e.g. a broken JSON line)."""

    where: str
    reason: str


def iter_records(path: str | Path) -> Iterator[Record | BadRecord]:
    """Yield each record of a file (or a BadRecord for a line that is not JSON); file-level problems raise DataError."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".jsonl":
        yield from _jsonl(path)
    elif path.is_file() and suffix == ".parquet":
        yield from _parquet(path)
    else:  # .json is one document and .csv is small; read_records also names every file-level mistake
        yield from read_records(path)


def _jsonl(path: Path) -> Iterator[Record | BadRecord]:
    seen_any = False
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"byte {exc.start} of the line is not valid UTF-8 ({raw[exc.start:exc.start + 1]!r})",
                    where=f"{path}:{lineno}",
                    fix="re-save the file as UTF-8, e.g. `iconv -f GBK -t UTF-8 in.jsonl > out.jsonl`",
                ) from None
            if not line.strip():
                continue
            seen_any = True
            try:
                yield Record(json.loads(line.rstrip("\r\n")), f"{path}:{lineno}")
            except json.JSONDecodeError as exc:
                yield BadRecord(f"{path}:{lineno}", f"line is not valid JSON: {exc.msg} (column {exc.colno})")
    if not seen_any:
        raise DataError("file is empty", where=str(path), fix="add records or remove the file")


def _parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"cannot read parquet ({exc})", where=str(path), fix="re-export the file, or convert it to .jsonl") from None
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH):
        for item in batch.to_pylist():
            row += 1
            yield Record(item, f"{path}:row {row}")
