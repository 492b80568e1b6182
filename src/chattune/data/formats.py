"""Data files -> records -> Conversations.

Reads records with data/stream.py (.json lists, .jsonl, .csv and .parquet files);
recognises alpaca, sharegpt and OpenAI-messages records; and turns each into a
Conversation: a list of {"role", "content"} messages that tokenizer chat
templates accept. Every record keeps its location ("file:line") so errors point at it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, overload

from chattune.data.stream import Record, json_kind, read_records
from chattune.errors import DataError

# Record and read_records live in data/stream.py (the one file reader) and are importable from here too.
__all__ = ["FORMATS", "Conversation", "LoadReport", "Record", "detect_format", "load_conversations", "read_records",
           "to_conversation"]

SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "function_call": "assistant",
    "system": "system",
    "observation": "tool", "tool": "tool", "function_response": "tool",
}
MESSAGE_ROLES = {"system", "user", "assistant", "tool"}
FORMATS = ("alpaca", "sharegpt", "messages")


@dataclass
class Conversation:
    """One training sample: chat messages plus where they came from."""

    messages: list[dict[str, str]]
    where: str

    @property
    def prompt(self) -> list[dict[str, str]]:
        """Everything before the last assistant turn (what a user would send)."""
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        """The last assistant answer (the ground truth for probes and evaluation)."""
        return self.messages[-1]["content"]


class PackedConversations(Sequence[Conversation]):
    """Conversations held as one bytes object each (location, then the messages' JSON), decoded on access.

    About a third of the memory of the same conversations as dicts and strs: what lets `chattune train` hold
    a large training file (docs/reliability.md, "Memory-bounded data"). Slices and select() are packed too.
    """

    def __init__(self, blobs: list[bytes] | None = None):
        self._blobs = blobs if blobs is not None else []

    def append(self, conv: Conversation) -> None:
        self._blobs.append(conv.where.encode() + b"\0" + json.dumps(conv.messages, ensure_ascii=False).encode())

    def select(self, indices: Iterable[int]) -> "PackedConversations":
        """The conversations at these indices, in that order (packed, sharing the bytes)."""
        return PackedConversations([self._blobs[i] for i in indices])

    def __len__(self) -> int:
        return len(self._blobs)

    @overload
    def __getitem__(self, i: int) -> Conversation: ...

    @overload
    def __getitem__(self, i: slice) -> "PackedConversations": ...

    def __getitem__(self, i: int | slice) -> "Conversation | PackedConversations":
        if isinstance(i, slice):
            return PackedConversations(self._blobs[i])
        where, _, messages = self._blobs[i].partition(b"\0")
        return Conversation(json.loads(messages), where.decode())


@dataclass
class LoadReport:
    """What loading kept and skipped, for the terminal and the run directory."""

    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    per_file: dict[str, int] = field(default_factory=dict)
    mix: dict[str, dict[str, Any]] = field(default_factory=dict)  # data.train {path, fraction|samples}: rows, used

    def skipped_summary(self) -> str:
        """One line: how many records were skipped, grouped by reason, with the first place of each."""
        by_reason: dict[str, list[str]] = {}
        for where, reason in self.skipped:
            by_reason.setdefault(reason, []).append(where)
        parts = [f"{len(w)}x {reason} (first at {w[0]})" for reason, w in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]
        total = self.kept + len(self.skipped)
        return f"skipped {len(self.skipped)} of {total} record(s) (data.on_bad_record=skip): " + "; ".join(parts)


# ---------------------------------------------------------------------------
# records -> conversations


def detect_format(record: Any, where: str) -> str:
    """Guess the record layout from its keys."""
    if isinstance(record, dict):
        if "conversations" in record:
            return "sharegpt"
        if "messages" in record:
            return "messages"
        if "output" in record or "instruction" in record:
            return "alpaca"
        keys = ", ".join(map(str, record)) or "none"
    else:
        keys = f"a {type(record).__name__}, not an object"
    raise DataError(
        f"cannot tell the record format (keys: {keys})",
        where=where,
        fix="use alpaca (instruction/input/output), sharegpt (conversations) or messages (messages), "
        "or rename columns with `chattune data convert --map`",
    )


def to_conversation(
    record: Any, where: str, fmt: str, *, system: str | None = None, instruction_as: str = "user",
    require_answer: bool = True,
) -> Conversation:
    """Convert one raw record of format `fmt` to a validated Conversation (prompt-only when not require_answer)."""
    if not isinstance(record, dict):
        raise DataError(f"record is {json_kind(record)}, expected an object", where=where, fix="each record must be a JSON object")
    if fmt == "alpaca":
        messages = _from_alpaca(record, where, system, instruction_as, require_answer)
    elif fmt == "sharegpt":
        messages = _from_roles(record, "conversations", "from", "value", SHAREGPT_ROLES, where)
    elif fmt == "messages":
        messages = _from_roles(record, "messages", "role", "content", {r: r for r in MESSAGE_ROLES}, where)
    else:
        raise DataError(f"unknown format {fmt!r}", where=where, fix=f"data.format must be auto or one of {', '.join(FORMATS)}")
    if fmt != "alpaca":
        record_system = record.get("system")
        if messages[0]["role"] != "system":
            sys_text = record_system if isinstance(record_system, str) and record_system.strip() else system
            if sys_text:
                messages.insert(0, {"role": "system", "content": sys_text})
    _check_order(messages, where, require_answer)
    return Conversation(messages, where)


def _text(record: dict, key: str, where: str, *, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(f'field "{key}" is missing', where=where, fix=f'add "{key}", or set data.on_bad_record=skip')
        return ""
    if not isinstance(value, str):
        raise DataError(
            f'field "{key}" is {json_kind(value)} ({json.dumps(value, ensure_ascii=False)[:60]}), expected text',
            where=where, fix=f'write the value of "{key}" in double quotes, e.g. "{key}": "..."',
        )
    if required and not value.strip():
        raise DataError(f'field "{key}" is empty', where=where, fix="fill it or set data.on_bad_record=skip")
    return value


def _from_alpaca(record: dict, where: str, system: str | None, instruction_as: str,
                 require_answer: bool = True) -> list[dict[str, str]]:
    instruction = _text(record, "instruction", where, required=False).strip()
    inp = _text(record, "input", where, required=False).strip()
    output = _text(record, "output", where, required=require_answer)
    sys_text = _text(record, "system", where, required=False).strip() or system
    if instruction_as == "system":
        # The legal Q&A recipe: the (fixed) instruction is the system prompt, the input is the question.
        sys_text = instruction or sys_text
        user = inp or (instruction if not sys_text else "")
        if not user:
            raise DataError(
                'field "input" is empty, but data.instruction_as=system makes it the user turn',
                where=where,
                fix="fill input, or set data.instruction_as=user",
            )
    else:
        user = "\n".join(p for p in (instruction, inp) if p)
        if not user:
            raise DataError('fields "instruction" and "input" are both empty', where=where, fix="give the question in instruction or input")
    messages: list[dict[str, str]] = []
    if sys_text:
        messages.append({"role": "system", "content": sys_text})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError('field "history" must be a list of [question, answer] pairs', where=where)
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise DataError(f"history[{i}] is not a [question, answer] pair of non-empty texts", where=where)
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": user})
    if output.strip() or require_answer:  # predict answers rows that have no output yet
        messages.append({"role": "assistant", "content": output})
    return messages


def _from_roles(record: dict, key: str, role_key: str, text_key: str, roles: dict[str, str], where: str) -> list[dict[str, str]]:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f'field "{key}" must be a non-empty list of turns', where=where, fix=f'give "{key}": [{{"{role_key}": ..., "{text_key}": ...}}, ...]')
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where} {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"turn is {json_kind(turn)}, expected an object", where=at,
                            fix=f'write each turn as {{"{role_key}": ..., "{text_key}": ...}}')
        role = turn.get(role_key)
        if role not in roles:
            raise DataError(
                f'unknown role {role!r} in "{role_key}"',
                where=at,
                fix=f"use one of: {', '.join(sorted(roles))}",
            )
        content = turn.get(text_key)
        if not isinstance(content, str) or not content.strip():
            raise DataError(f'"{text_key}" is missing, empty or not text', where=at, fix="give every turn some text")
        messages.append({"role": roles[role], "content": content})
    return messages


def _check_order(messages: list[dict[str, str]], where: str, require_answer: bool = True) -> None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise DataError("a system turn appears after the start", where=where, fix="put the system prompt first, or drop it")
    if not body or body[0] != "user":
        raise DataError("the conversation must start with a user turn (after an optional system prompt)", where=where)
    if require_answer and "assistant" not in body:
        raise DataError("the conversation has no assistant turn, so nothing can be learned from it", where=where, fix="add the answer, or set data.on_bad_record=skip")
    if body[-1] != "assistant" and (require_answer or body[-1] != "user"):
        raise DataError(f"the conversation ends with a {body[-1]} turn; the last turn must be the assistant's answer", where=where)
    for prev, cur in zip(body, body[1:]):
        if prev == cur and cur in ("user", "assistant"):
            raise DataError(f"two {cur} turns in a row; user and assistant turns must alternate", where=where, fix="merge the two turns into one")


# ---------------------------------------------------------------------------
# the public entry point


def load_conversations(
    paths: Iterable[str | Path],
    *,
    fmt: str = "auto",
    system: str | None = None,
    instruction_as: str = "user",
    on_bad_record: str = "error",
    limit: int | None = None,
    require_answer: bool = True,
    packed: bool = False,
) -> tuple[list[Conversation], LoadReport]:
    """Read every file, convert every record; bad records raise or are skipped and reported.

    require_answer=False also accepts prompt-only records (no output, or ending with a user turn), for predict.
    packed=True returns a PackedConversations (training's large files) instead of a list.
    """
    conversations: Any = PackedConversations() if packed else []
    report = LoadReport()
    for path in paths:
        file_fmt = None if fmt == "auto" else fmt
        count = 0
        for rec in read_records(path):
            try:
                file_fmt = file_fmt or detect_format(rec.data, rec.where)
                conversations.append(to_conversation(rec.data, rec.where, file_fmt, system=system, instruction_as=instruction_as,
                                                     require_answer=require_answer))
                count += 1
            except DataError as exc:
                if on_bad_record != "skip" or file_fmt is None:
                    raise
                report.skipped.append((rec.where, exc.what))
            if limit and len(conversations) >= limit:
                break
        report.per_file[str(path)] = count
        if limit and len(conversations) >= limit:
            break
    report.kept = len(conversations)
    if not conversations:
        raise DataError("no usable records", where=", ".join(map(str, paths)), fix="check the files and data.format")
    return conversations, report
