"""Loaders: every format and file type, and a teaching DataError for every bad input."""

from pathlib import Path

import pytest

from chattune.data.formats import load_conversations, read_records
from chattune.errors import DataError

FIX = Path(__file__).parents[1] / "fixtures" / "data"


def roles(conv):
    return [m["role"] for m in conv.messages]


@pytest.mark.parametrize("name,count", [
    ("alpaca.json", 5), ("alpaca.jsonl", 4), ("alpaca.csv", 4), ("alpaca.parquet", 3),
    ("sharegpt.json", 4), ("messages.jsonl", 3), ("qa_pairs.json", 4), ("bom.jsonl", 2),
])
def test_every_valid_fixture_loads(name, count):
    convs, report = load_conversations([FIX / name])
    assert len(convs) == count == report.kept
    for c in convs:
        assert c.messages[-1]["role"] == "assistant"
        assert all(isinstance(m["content"], str) and m["content"] for m in c.messages)


def test_several_files_concatenate_in_order():
    convs, report = load_conversations([FIX / "alpaca.json", FIX / "messages.jsonl"])
    assert len(convs) == 8
    assert report.per_file == {str(FIX / "alpaca.json"): 5, str(FIX / "messages.jsonl"): 3}
    assert convs[5].where.startswith(str(FIX / "messages.jsonl"))


def test_alpaca_user_convention_joins_instruction_and_input():
    convs, _ = load_conversations([FIX / "alpaca.json"], system="SYS")
    with_input = next(c for c in convs if "\n" in c.messages[-2]["content"])
    assert with_input.messages[0] == {"role": "system", "content": "SYS"}
    rec_system = [c for c in convs if c.messages[0]["content"] != "SYS"]
    assert rec_system, "a record's own system field wins over data.system"


def test_alpaca_system_convention_uses_instruction_as_system(tmp_path):
    f = tmp_path / "legal.json"
    f.write_text('[{"instruction": "You are a lawyer.", "input": "Is this legal?", "output": "It depends."}]')
    (c,), _ = load_conversations([f], instruction_as="system", system="ignored")
    assert c.messages == [{"role": "system", "content": "You are a lawyer."},
                          {"role": "user", "content": "Is this legal?"},
                          {"role": "assistant", "content": "It depends."}]
    # Without an input there is no user turn under this convention: say so rather than guess.
    with pytest.raises(DataError, match='"input" is empty, but data.instruction_as=system'):
        load_conversations([FIX / "alpaca.jsonl"], instruction_as="system")


def test_qa_pairs_take_the_fixed_system_prompt():
    convs, _ = load_conversations([FIX / "qa_pairs.json"], system="你是一个法律专家", instruction_as="system")
    assert all(c.messages[0] == {"role": "system", "content": "你是一个法律专家"} for c in convs)
    assert all(roles(c) == ["system", "user", "assistant"] for c in convs)


def test_alpaca_history_becomes_earlier_turns():
    convs, _ = load_conversations([FIX / "alpaca.json"])
    multi = [c for c in convs if roles(c).count("assistant") > 1]
    assert multi and roles(multi[0])[-6:] == ["user", "assistant"] * 3


def test_sharegpt_roles_are_mapped():
    convs, _ = load_conversations([FIX / "sharegpt.json"])
    seen = {r for c in convs for r in roles(c)}
    assert seen <= {"system", "user", "assistant", "tool"} and "tool" in seen
    assert any(c.messages[0]["role"] == "system" for c in convs)


def test_csv_keeps_numbers_and_newlines_as_text():
    convs, _ = load_conversations([FIX / "alpaca.csv"])
    answers = [c.reference for c in convs]
    assert "3" in answers
    assert any("\n" in c.messages[-2]["content"] or "\n" in c.reference for c in convs)


def test_records_carry_line_numbers():
    recs = list(read_records(FIX / "alpaca.jsonl"))
    assert [r.where.rsplit(":", 1)[1] for r in recs] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("name,where,what", [
    ("bad_json.json", "bad_json.json:3", "not valid JSON"),
    ("bad_line.jsonl", "bad_line.jsonl:2", "not valid JSON"),
    ("wrong_top.json", "wrong_top.json", "expected a list"),
    ("empty.json", "empty.json", "empty"),
    ("missing_output.json", "missing_output.json[0]", '"output" is missing'),
    ("empty_output.json", "empty_output.json[0]", '"output" is empty'),
    ("non_string.json", "non_string.json[0]", "expected text"),
    ("latin1.jsonl", "latin1.jsonl:", "not valid UTF-8"),
    ("sharegpt_no_assistant.json", "sharegpt_no_assistant.json[0]", "no assistant turn"),
    ("sharegpt_bad_role.json", "sharegpt_bad_role.json[0]", "unknown role 'robot'"),
    ("sharegpt_order.json", "sharegpt_order.json[0]", "two assistant turns in a row"),
    ("does_not_exist.json", "does_not_exist.json", "file not found"),
])
def test_bad_inputs_raise_teaching_errors(name, where, what):
    with pytest.raises(DataError) as info:
        load_conversations([FIX / name])
    err = info.value
    assert where in err.where and what in err.what
    assert err.render().startswith(err.where)


def test_skip_mode_skips_and_reports(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": ""}\n{"instruction": "d", "output": "e"}\n')
    convs, report = load_conversations([f], on_bad_record="skip")
    assert len(convs) == 2
    assert report.skipped == [(f"{f}:2", 'field "output" is empty')]
    with pytest.raises(DataError, match="on_bad_record=skip"):
        load_conversations([f])


def test_unknown_layout_names_the_keys(tmp_path):
    f = tmp_path / "odd.json"
    f.write_text('[{"question": "q", "answer": "a"}]')
    with pytest.raises(DataError, match="keys: question, answer"):
        load_conversations([f])


def test_limit_stops_early():
    convs, _ = load_conversations([FIX / "alpaca.json", FIX / "messages.jsonl"], limit=3)
    assert len(convs) == 3


def test_jsonl_error_points_at_the_column_where_the_line_breaks_off(tmp_path):
    p = tmp_path / "cut.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError) as info:
        list(read_records(p))
    assert info.value.where == f"{p}:2" and "(column 32)" in str(info.value), str(info.value)


def test_packed_conversations_decode_to_what_the_list_holds():
    from chattune.data.split import split_eval

    paths = [FIX / "alpaca.jsonl", FIX / "messages.jsonl", FIX / "sharegpt.json"]
    plain, _ = load_conversations(paths)
    packed, _ = load_conversations(paths, packed=True)
    assert type(packed).__name__ == "PackedConversations" and len(packed) == len(plain) == 11
    assert [(c.messages, c.where) for c in packed] == [(c.messages, c.where) for c in plain]
    assert [c.where for c in packed[2:5]] == [c.where for c in plain[2:5]]
    train, held = split_eval(packed, size=3, seed=1)
    plain_train, plain_held = split_eval(plain, size=3, seed=1)
    assert type(train) is type(packed) and [c.where for c in held] == [c.where for c in plain_held]
    assert [(c.messages, c.where) for c in train] == [(c.messages, c.where) for c in plain_train]
