"""Records of one layout and file type -> another, through the loader training uses (`chattune data convert`).

Every record goes through formats.to_conversation, so a record that converts is a
record that trains, and a record that would fail training is rejected, with its
location and reason, into OUT's `.rejects.jsonl` neighbour. .jsonl and .parquet are
read and every output is written one record at a time (through files.atomic_path),
so large files never have to fit in memory and a failed conversion leaves no half file.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from tqdm.auto import tqdm

from chattune.data.formats import FORMATS, Conversation, detect_format, to_conversation
from chattune.data.stream import BadRecord
from chattune.errors import ConfigError, DataError
from chattune.files import atomic_open, atomic_path

OUT_SUFFIXES = (".json", ".jsonl", ".parquet")
# The keys each layout reads; everything else (ids, sources, ...) is carried over unchanged.
FORMAT_KEYS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system"),
    "messages": ("messages", "system"),
}
TO_SHAREGPT = {"user": "human", "assistant": "gpt", "tool": "observation", "system": "system"}


@dataclass
class ConvertReport:
    """What a conversion read, wrote and rejected."""

    out: Path
    to: str
    read: int = 0
    written: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)
    source_formats: Counter = field(default_factory=Counter)
    kept_own_instruction: int = 0
    rejects_file: Path | None = None


def parse_map(text: str | None) -> dict[str, str]:
    """'input=question,output=answer' -> {'input': 'question', 'output': 'answer'} (new name = column in the file)."""
    renames: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        new, sep, old = (s.strip() for s in item.partition("="))
        if not sep or not new or not old:
            raise ConfigError(f"{item!r} is not NEW=OLD", where="--map",
                              fix="write e.g. --map input=question,output=answer (the field name chattune reads = the column in your file)")
        renames[new] = old
    return renames


def check_paths(src: Path, out: Path, *, overwrite: bool) -> None:
    """Refuse outputs that would destroy data or that no reader accepts."""
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ConfigError(f"cannot write {out.suffix or 'a file without suffix'!r}", where=str(out),
                          fix=f"name the output {', '.join('*' + s for s in OUT_SUFFIXES)}")
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise ConfigError("the output is the input file", where=str(out), fix="write to a new file")
    if out.exists() and not overwrite:
        raise DataError("the output file already exists", where=str(out), fix="pass --overwrite to replace it, or choose another name")


def rejects_path(out: Path) -> Path:
    """OUT's neighbour that lists rejected records: legal.jsonl -> legal.rejects.jsonl."""
    return out.with_name(f"{out.stem}.rejects.jsonl")


# ---------------------------------------------------------------------------
# records


def convert_records(records: Iterable[Any], *, to: str, instruction: str | None, renames: dict[str, str],
                    system: str | None, instruction_as: str, source_format: str, report: ConvertReport,
                    rejects: "RejectLog") -> Iterator[dict[str, Any]]:
    """Yield each convertible record in the target layout; count and log the others."""
    fmt = None if source_format == "auto" else source_format
    for rec in records:
        report.read += 1
        if isinstance(rec, BadRecord):
            report.rejected.append((rec.where, rec.reason))
            rejects.add(rec.where, rec.reason, None)
            continue
        try:
            data = rename_fields(rec.data, renames)
            if instruction is not None:
                data, kept = add_instruction(data, instruction)
                report.kept_own_instruction += kept
            fmt = fmt or detect_format(data, rec.where)  # like training: the first record decides the file's layout
            conv = to_conversation(data, rec.where, fmt, system=system, instruction_as=instruction_as)
            out = convert_one(data, conv, fmt, to, system=system)
        except DataError as exc:
            report.rejected.append((rec.where, exc.what))
            rejects.add(rec.where, exc.what, rec.data)
            continue
        report.source_formats[fmt] += 1
        yield out


def rename_fields(record: Any, renames: dict[str, str]) -> Any:
    """Rename top-level fields NEW=OLD, keeping the field order."""
    if not renames or not isinstance(record, dict):
        return record
    back = {old: new for new, old in renames.items()}
    out = {}
    for k, v in record.items():
        if k in back:
            out[back[k]] = v
        elif not (k in renames and renames[k] in record):  # a field the mapped column replaces
            out.setdefault(k, v)
    return out


def add_instruction(record: Any, instruction: str) -> tuple[Any, int]:
    """Give a record without an instruction the fixed one; (record, 1) when it kept its own."""
    if not isinstance(record, dict) or "conversations" in record or "messages" in record:
        return record, 0
    own = record.get("instruction")
    if isinstance(own, str) and own.strip():
        return record, 1
    return {"instruction": instruction, **{k: v for k, v in record.items() if k != "instruction"}}, 0


def convert_one(record: dict[str, Any], conv: Conversation, fmt: str, to: str, *, system: str | None) -> dict[str, Any]:
    """One validated record in the target layout, its extra fields carried over."""
    extras = {k: v for k, v in record.items() if k not in FORMAT_KEYS[fmt]}
    if to == fmt:
        return same_layout(record, conv, fmt, system)
    if to == "messages":
        return {"messages": conv.messages, **extras}
    if to == "sharegpt":
        return {**to_sharegpt(conv), **extras}
    return {**to_alpaca(conv), **extras}


def same_layout(record: dict[str, Any], conv: Conversation, fmt: str, system: str | None) -> dict[str, Any]:
    """The record as it is (a file-type change is exact), plus --system where it had no system prompt."""
    # Columnar inputs (parquet) give every row every column; a null optional field is an absent one.
    record = {k: v for k, v in record.items() if not (v is None and k in FORMAT_KEYS[fmt])}
    has_system = conv.messages[0]["role"] == "system"
    if not system or not has_system:
        return record
    if fmt == "alpaca":
        own = record.get("system")
        return record if isinstance(own, str) and own.strip() else {**record, "system": system}
    if fmt == "messages":
        return {**record, "messages": conv.messages}
    first = (record.get("conversations") or [{}])[0]
    has_own = (isinstance(record.get("system"), str) and record["system"].strip()) or first.get("from") == "system"
    return record if has_own else {**record, "system": system}


def to_sharegpt(conv: Conversation) -> dict[str, Any]:
    """ShareGPT: human/gpt/observation turns, the system prompt as a top-level field."""
    msgs = conv.messages
    out: dict[str, Any] = {}
    if msgs[0]["role"] == "system":
        out["system"] = msgs[0]["content"]
        msgs = msgs[1:]
    return {"conversations": [{"from": TO_SHAREGPT[m["role"]], "value": m["content"]} for m in msgs], **out}


def to_alpaca(conv: Conversation) -> dict[str, Any]:
    """Alpaca: the last question as instruction, earlier turns as history, the system prompt as system."""
    msgs = conv.messages
    system = None
    if msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    if any(m["role"] == "tool" for m in msgs):
        raise DataError("the conversation has tool turns, which the alpaca layout cannot hold", where=conv.where,
                        fix="convert to messages or sharegpt instead")
    pairs = [[msgs[i]["content"], msgs[i + 1]["content"]] for i in range(0, len(msgs), 2)]
    out: dict[str, Any] = {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1]}
    if system:
        out["system"] = system
    if len(pairs) > 1:
        out["history"] = pairs[:-1]
    return out


# ---------------------------------------------------------------------------
# writing


class RejectLog:
    """OUT.rejects.jsonl, created only when something is rejected; published (atomically) on close()."""

    def __init__(self, path: Path):
        self.path = path
        self.count = 0
        self._f: IO[str] | None = None
        self._files = ExitStack()
        path.unlink(missing_ok=True)  # an old list from an earlier conversion would mislead

    def add(self, where: str, reason: str, record: Any) -> None:
        if self._f is None:
            self._f = self._files.enter_context(atomic_open(self.path))
        self._f.write(json.dumps({"where": where, "reason": reason, "record": record}, ensure_ascii=False, default=str) + "\n")
        self.count += 1

    def close(self) -> None:
        self._files.close()
        self._f = None


def write_records(out: Path, records: Iterable[dict[str, Any]], *, to: str) -> int:
    """Stream records into OUT through a temporary file (a failed conversion leaves no half file); returns the count."""
    with atomic_path(out) as tmp:
        suffix = out.suffix.lower()
        if suffix == ".parquet":
            return _write_parquet(tmp, records, to)
        with open(tmp, "w", encoding="utf-8") as f:
            return (_write_jsonl if suffix == ".jsonl" else _write_json)(f, records)


def _write_jsonl(f, records: Iterable[dict[str, Any]]) -> int:
    n = 0
    for rec in _progress(records):
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        n += 1
    return n


def _write_json(f, records: Iterable[dict[str, Any]]) -> int:
    n = 0
    f.write("[")
    for rec in _progress(records):
        f.write(("," if n else "") + "\n  " + json.dumps(rec, ensure_ascii=False, indent=2).replace("\n", "\n  "))
        n += 1
    f.write("\n]\n" if n else "]\n")
    return n


# Columns a layout may leave out in some rows: typed up front so that a batch without them still fits.
_OPTIONAL_COLUMNS = {"alpaca": {"system": "string", "history": "list<list<string>>"}, "sharegpt": {"system": "string"}}


def _write_parquet(path: Path, records: Iterable[dict[str, Any]], to: str, batch_size: int = 2048) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer, schema, n, batch = None, None, 0, []

    def flush() -> None:
        nonlocal writer, schema
        if schema is None:
            schema = _parquet_schema(batch, to)
            writer = pq.ParquetWriter(path, schema)
        new = sorted({k for r in batch for k in r} - set(schema.names))
        if new:
            raise DataError(f"field(s) {', '.join(new)} first appear after row {n - len(batch)}; a parquet file needs "
                            "every column in its first rows", where=str(path), fix="write .jsonl instead")
        try:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"a field changes type between rows ({exc})", where=str(path),
                            fix="write .jsonl instead, or fix the field's type in the input") from None
        batch.clear()

    try:
        for rec in _progress(records):
            batch.append(rec)
            n += 1
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    finally:
        if writer is not None:
            writer.close()
    return n


def _parquet_schema(batch: list[dict[str, Any]], to: str) -> Any:
    import pyarrow as pa

    names = list(dict.fromkeys(k for r in batch for k in r))
    table = pa.Table.from_pydict({k: [r.get(k) for r in batch] for k in names})
    fields = []
    for f in table.schema:
        hint = _OPTIONAL_COLUMNS.get(to, {}).get(f.name)
        if pa.types.is_null(f.type):  # a column that is empty in every row of the first batch
            f = f.with_type(pa.string() if hint != "list<list<string>>" else pa.list_(pa.list_(pa.string())))
        fields.append(f)
    for name, hint in _OPTIONAL_COLUMNS.get(to, {}).items():
        if name not in names:
            fields.append(pa.field(name, pa.string() if hint == "string" else pa.list_(pa.list_(pa.string()))))
    return pa.schema(fields)


def _progress(records: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    # disable=None: a bar on a terminal, nothing in logs and pipes.
    return tqdm(records, desc="convert", unit=" rec", disable=None, mininterval=1.0, leave=False)
