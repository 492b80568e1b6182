"""Preference pairs: a prompt with a chosen and a rejected answer, read, checked and rendered like SFT data.

Layouts (one record each):
- LLaMA-Factory's: sharegpt ``conversations`` (ending with the user's turn) + ``chosen`` + ``rejected``,
  each side a ``{"from": "gpt", "value": ...}`` turn (../shared/data/dpo_en_demo.json);
  its alpaca form ``instruction`` (+ ``input``) + ``chosen`` + ``rejected`` texts;
- flat: ``prompt`` (text or a messages list) or ``messages`` + ``chosen`` + ``rejected`` (text or one message).

Each side becomes a Conversation (prompt + that answer) and is rendered by the same ChatRenderer as SFT,
supervising the last assistant turn only: the prompt is exactly what inference sends, the answer is learned
through its end-of-turn token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from chattune.data.formats import (MESSAGE_ROLES, SHAREGPT_ROLES, Conversation, LoadReport, _check_order,
                                   _from_alpaca, _from_roles)
from chattune.data.render import ChatRenderer, RenderStats, Sample, apply_max_length
from chattune.data.stream import json_kind, read_records
from chattune.errors import DataError

SIDES = ("chosen", "rejected")
LAYOUT = ("preference records: LLaMA-Factory's {conversations, chosen, rejected} (sharegpt turns) or "
          "{instruction, input, chosen, rejected}, or flat {prompt|messages, chosen, rejected}")
SFT_LAYOUT = "SFT records: alpaca {instruction, input, output}, sharegpt {conversations} or {messages}"


@dataclass
class PreferencePair:
    """A prompt (messages ending with the user's turn), the preferred and the dispreferred answer, and its place."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    where: str

    def side(self, name: str) -> Conversation:
        """The prompt followed by one answer, as a Conversation."""
        return Conversation([*self.prompt, {"role": "assistant", "content": getattr(self, name)}], self.where)


def is_preference_record(record: Any) -> bool:
    """True for a record that carries both answers (or either: a half pair is a bad preference record)."""
    return isinstance(record, dict) and any(k in record for k in SIDES)


def check_layout(paths: Iterable[str | Path], method: str) -> None:
    """Refuse a preference file for SFT and SFT data for a preference method, from each file's first record."""
    for path in paths:
        first = next(iter(read_records(path)), None)
        if first is None:
            continue
        preference = is_preference_record(first.data)
        if method == "sft" and preference:
            raise DataError("this is preference data (chosen/rejected answers), but train.method=sft", where=first.where,
                            fix=f"set train.method=dpo, orpo or simpo, or give {SFT_LAYOUT}")
        if method != "sft" and not preference:
            raise DataError(f"train.method={method} needs {LAYOUT}; this record has no chosen/rejected answers",
                            where=first.where, fix="convert the file to one of those layouts, or set train.method=sft")


def to_pair(record: Any, where: str, *, system: str | None = None) -> PreferencePair:
    """One record -> a checked PreferencePair (missing side, empty answer, identical sides are errors)."""
    if not isinstance(record, dict):
        raise DataError(f"record is {json_kind(record)}, expected an object", where=where, fix=f"give {LAYOUT}")
    answers = [_answer(record, side, where) for side in SIDES]
    if answers[0].strip() == answers[1].strip():
        raise DataError("the chosen and rejected answers are identical: nothing to prefer", where=where,
                        fix="fix one side or remove the record (or set data.on_bad_record=skip)")
    prompt = _prompt(record, where)
    if prompt[0]["role"] != "system":
        own = record.get("system")
        text = own if isinstance(own, str) and own.strip() else system
        if text:
            prompt.insert(0, {"role": "system", "content": text})
    _check_order(prompt, where, require_answer=False)
    if prompt[-1]["role"] != "user":
        raise DataError("the prompt must end with the user's turn (the answers follow it)", where=where,
                        fix="move the last assistant turn into chosen/rejected, or drop it")
    return PreferencePair(prompt, answers[0], answers[1], where)


def _answer(record: dict, side: str, where: str) -> str:
    value = record.get(side)
    if value is None:
        raise DataError(f'field "{side}" is missing', where=where, fix=f"a preference record needs both answers: {LAYOUT}")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise DataError(f'field "{side}" is {json_kind(value)}, expected the answer text or one assistant turn',
                        where=where, fix=f'write "{side}": "..." or "{side}": {{"from": "gpt", "value": "..."}}')
    if not value.strip():
        raise DataError(f'the "{side}" answer is empty', where=where, fix="fill it or set data.on_bad_record=skip")
    return value


def _prompt(record: dict, where: str) -> list[dict[str, str]]:
    if "conversations" in record:
        return _from_roles(record, "conversations", "from", "value", SHAREGPT_ROLES, where)
    if "messages" in record:
        return _from_roles(record, "messages", "role", "content", {r: r for r in MESSAGE_ROLES}, where)
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return _from_roles(record, "prompt", "role", "content", {r: r for r in MESSAGE_ROLES}, where)
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if "instruction" in record or "input" in record:
        return _from_alpaca({**record, "output": ""}, where, None, "user", require_answer=False)
    raise DataError("no prompt (looked for conversations, messages, prompt, instruction)", where=where, fix=f"give {LAYOUT}")


def load_pairs(paths: Iterable[str | Path], *, system: str | None = None, on_bad_record: str = "error",
               limit: int | None = None) -> tuple[list[PreferencePair], LoadReport]:
    """Read every file's preference records; bad ones raise (file:line) or are skipped and reported."""
    pairs: list[PreferencePair] = []
    report = LoadReport()
    paths = list(paths)
    for path in paths:
        count = 0
        for rec in read_records(path):
            try:
                pairs.append(to_pair(rec.data, rec.where, system=system))
                count += 1
            except DataError as exc:
                if on_bad_record != "skip":
                    raise
                report.skipped.append((rec.where, exc.what))
            if limit and len(pairs) >= limit:
                break
        report.per_file[str(path)] = count
        if limit and len(pairs) >= limit:
            break
    report.kept = len(pairs)
    if not pairs:
        raise DataError("no usable preference records", where=", ".join(map(str, paths)), fix=f"give {LAYOUT}")
    return pairs, report


def pair_conversations(pairs: Sequence[PreferencePair]) -> list[Conversation]:
    """chosen, rejected, chosen, rejected, ...: the order samples are kept in."""
    return [pair.side(side) for pair in pairs for side in SIDES]


def render_pairs(renderer: ChatRenderer, pairs: Sequence[PreferencePair], *, max_length: int,
                 overlength: str = "truncate") -> tuple[list[Sample], RenderStats]:
    """Samples chosen_0, rejected_0, chosen_1, ...; a pair one of whose sides is dropped is dropped whole."""
    rendered = renderer.render_many(pair_conversations(pairs), train_on="last_assistant")
    stats = RenderStats(conversations=len(pairs))
    out: list[Sample] = []
    for k in range(len(pairs)):
        kept, st = apply_max_length(rendered[2 * k:2 * k + 2], 2, max_length=max_length, overlength=overlength)
        for name in ("truncated", "lost_end_of_turn", "dropped_overlength", "dropped_no_labels"):
            setattr(stats, name, getattr(stats, name) + getattr(st, name))
        stats.examples_truncated += st.examples_truncated[: max(0, 5 - len(stats.examples_truncated))]
        if len(kept) == 2:
            out += kept
            stats.tokens += st.tokens
            stats.supervised_tokens += st.supervised_tokens
    stats.samples = len(out)
    return out, stats
