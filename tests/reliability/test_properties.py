"""Property-based tests of the loaders and the label renderer (hypothesis).

Well-formed conversations in any of the three layouts load back unchanged and render with exactly the
assistant turns supervised (their text and end-of-turn token, nothing else). A well-formed record broken
in a way people break them raises DataError naming it (and is skipped, counted, with on_bad_record=skip);
arbitrary records and bytes load as well-formed conversations or raise DataError, never another exception.
"""

from __future__ import annotations

import json
import tempfile
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chattune.data.formats import load_conversations
from chattune.data.render import IGNORE, ChatRenderer
from chattune.errors import DataError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any text a person could write, except lone surrogates (not encodable as UTF-8) and the template's own
# control tokens ("<|im_end|>" inside an answer would end the turn: that is the tokenizer's rule, not ours).
# Nor text the tokenizer's NFC normaliser rewrites (the CJK compatibility ideograph U+FA15 decodes as U+51DE,
# found by hypothesis): the tokenizer's rule again. Whitespace, punctuation and CJK are drawn often: they are
# where tokenizers merge across turn boundaries.
CHARS = st.characters(exclude_categories=("Cs",)) | st.sampled_from(list("\n\n \t\r.!?{}#字é") + ["\n\n", "  ", "\u3000"])
TEXT = st.lists(CHARS, min_size=1, max_size=20).map("".join).filter(
    lambda t: t.strip() and "<|" not in t and unicodedata.normalize("NFC", t) == t)


@st.composite
def conversations(draw):
    """(system or None, [(user, assistant), ...]) with 1 to 3 exchanges."""
    system = draw(st.none() | TEXT)
    pairs = draw(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3))
    return system, pairs


def as_messages(system, pairs) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    for user, answer in pairs:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return msgs


SHAREGPT_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}


def as_record(layout: str, system, pairs) -> dict:
    """One conversation as a record of `layout`."""
    if layout == "messages":
        return {"messages": as_messages(system, pairs)}
    if layout == "sharegpt":
        return {"conversations": [{"from": SHAREGPT_NAMES[m["role"]], "value": m["content"]}
                                  for m in as_messages(system, pairs)]}
    # alpaca: the last exchange is instruction/output, earlier ones are history.
    *history, (user, answer) = pairs
    record = {"instruction": user, "output": answer, "history": [list(p) for p in history]}
    if system:
        record["system"] = system
    return record


def write(layout: str, system, pairs, folder: Path) -> tuple[Path, list[dict]]:
    """One record in `layout`, and the messages loading it must give back."""
    record = as_record(layout, system, pairs)
    if layout == "messages":
        path = folder / "m.jsonl"
        path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
        return path, as_messages(system, pairs)
    path = folder / ("s.json" if layout == "sharegpt" else "a.json")
    path.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    if layout == "sharegpt":
        return path, as_messages(system, pairs)
    # alpaca strips the instruction and the system prompt.
    *history, (user, answer) = pairs
    return path, as_messages(system.strip() if system else None, history + [(user.strip(), answer)])


@pytest.fixture(scope="module")
def renderer(tiny_model_dir):
    from transformers import AutoTokenizer

    return ChatRenderer(AutoTokenizer.from_pretrained(tiny_model_dir))


def supervised_segments(renderer, samples) -> list[str]:
    """The decoded runs of supervised tokens, over all samples in order."""
    tok, out = renderer.tokenizer, []
    for s in samples:
        assert len(s.labels) == len(s.input_ids)
        run: list[int] = []
        for token, label in zip(s.input_ids + [None], s.labels + [IGNORE]):
            if label != IGNORE:
                assert label == token, "a supervised label is the token itself"
                run.append(label)
            elif run:
                out.append(tok.decode(run, clean_up_tokenization_spaces=False))
                run = []
    return out


@pytest.mark.parametrize("layout", ["messages", "sharegpt", "alpaca"])
@SETTINGS
@given(conv=conversations())
@example(conv=(None, [("Hi?", "\nAn answer that starts on a new line.")]))  # once a false "not prefix-stable"
def test_well_formed_conversations_load_and_supervise_exactly_the_answers(renderer, layout, conv):
    system, pairs = conv
    with tempfile.TemporaryDirectory() as tmp:
        path, expected = write(layout, system, pairs, Path(tmp))
        (loaded,), report = load_conversations([path])
    assert loaded.messages == expected and report.kept == 1
    for train_on in ("all_assistant", "last_assistant"):
        samples, _ = renderer.render(loaded, train_on=train_on)
        answers = [m["content"] for m in expected if m["role"] == "assistant"]
        if train_on == "last_assistant":
            answers = answers[-1:]
        assert supervised_segments(renderer, samples) == [a + "<|im_end|>" for a in answers]
        # What the model is trained to continue is exactly what inference feeds it.
        for s in samples:
            start = next(i for i, label in enumerate(s.labels) if label != IGNORE)
            assert s.input_ids[:start] == renderer.prompt_ids(_prefix_before(expected, s, renderer))


def _prefix_before(messages, sample, renderer) -> list[dict]:
    """The messages before the first supervised answer of a sample (its first assistant turn's context)."""
    first = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and len(renderer.prompt_ids(messages[:i])) == first:
            return messages[:i]
    raise AssertionError("no assistant turn starts where the supervision starts")


# ---------------------------------------------------------------------------
# malformed input

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KEYS = ["instruction", "input", "output", "system", "history", "conversations", "messages", "from", "value",
        "role", "content"]
# Records that look like ours, with any value under any of our keys: the likeliest malformed input.
RECORDS = JSON | st.dictionaries(st.sampled_from(KEYS), JSON, min_size=1, max_size=5)


def loads_or_data_error(path: Path, **kw) -> tuple[list, object] | None:
    """load_conversations either gives well-formed conversations or raises DataError; nothing else.

    Returns what it loaded (conversations, report), or None when it raised DataError.
    """
    try:
        convs, report = load_conversations([path], **kw)
    except DataError as exc:
        assert exc.where and exc.what
        return None
    for c in convs:
        roles = [m["role"] for m in c.messages]
        assert roles[-1] == "assistant" and "user" in roles
        assert all(isinstance(m["content"], str) for m in c.messages)
    return convs, report


@SETTINGS
@given(records=st.lists(RECORDS, min_size=1, max_size=4), fmt=st.sampled_from(["auto", "alpaca", "sharegpt", "messages"]),
       skip=st.booleans())
def test_any_records_load_as_conversations_or_raise_data_error(records, fmt, skip):
    """Drawn records may happen to be well formed; whatever loads is well formed and every record is accounted for."""
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "r.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        loaded = loads_or_data_error(jsonl, fmt=fmt, on_bad_record="skip" if skip else "error")
        if loaded is not None:
            convs, report = loaded
            assert report.kept == len(convs)
            # Nothing dropped silently: a record either loaded or is listed as skipped (only when skipping).
            assert report.kept + len(report.skipped) == len(records)
            assert skip or not report.skipped
        whole = Path(tmp) / "r.json"
        whole.write_text(json.dumps(records), encoding="utf-8")
        loaded = loads_or_data_error(whole, fmt=fmt)
        if loaded is not None:
            assert len(loaded[0]) == len(records), "with on_bad_record=error every record loaded, or it raised"


# Ways a person breaks a well-formed record, per layout: each must be refused with DataError.
BREAKS = ["no answer field", "empty answer", "answer not text", "wrong structure", "bad turn"]


def broken(layout: str, record: dict, how: str) -> dict:
    """A copy of a well-formed record with one mistake in it."""
    record = json.loads(json.dumps(record))
    if layout == "alpaca":
        if how == "no answer field":
            del record["output"]
        elif how in ("empty answer", "answer not text"):
            record["output"] = " \n" if how == "empty answer" else 3
        elif how == "wrong structure":
            record["history"] = "not a list of pairs"
        else:
            record["history"] = [["a question without its answer"]]  # bad turn
        return record
    key, role, text = ("messages", "role", "content") if layout == "messages" else ("conversations", "from", "value")
    last = record[key][-1]
    if how == "no answer field":
        del last[text]
    elif how in ("empty answer", "answer not text"):
        last[text] = " \n" if how == "empty answer" else 3
    elif how == "wrong structure":
        record[key].append(dict(last))  # two assistant turns in a row
    else:
        last[role] = "robot"  # bad turn
    return record


@pytest.mark.parametrize("layout", ["messages", "sharegpt", "alpaca"])
@SETTINGS
@given(conv=conversations(), how=st.sampled_from(BREAKS), auto=st.booleans())
def test_malformed_records_raise_data_error(layout, conv, how, auto):
    """A well-formed record, then a broken one: DataError names the broken record; skipping keeps the good one."""
    system, pairs = conv
    good = as_record(layout, system, pairs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "r.json"
        path.write_text(json.dumps([good, broken(layout, good, how)], ensure_ascii=False), encoding="utf-8")
        fmt = "auto" if auto else layout
        with pytest.raises(DataError) as info:
            load_conversations([path], fmt=fmt)
        assert info.value.where.startswith(f"{path}[1]") and info.value.what, info.value.where
        convs, report = load_conversations([path], fmt=fmt, on_bad_record="skip")
        assert len(convs) == report.kept == 1 and [where for where, _ in report.skipped] == [f"{path}[1]"]


@SETTINGS
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".json", ".jsonl", ".csv"]))
def test_arbitrary_bytes_load_or_raise_only_data_error(content, suffix):
    """Any bytes in a data file: never a crash of another kind (bytes that happen to be valid data may load)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f{suffix}"
        path.write_bytes(content)
        loads_or_data_error(path)
