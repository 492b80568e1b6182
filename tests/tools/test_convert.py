"""`chattune data convert`: layouts and file types change, the training conversations do not."""

import json
from pathlib import Path

import pytest

from chattune import cli
from chattune.data.convert import parse_map, rename_fields
from chattune.data.formats import load_conversations, read_records
from chattune.errors import ConfigError

FIX = Path(__file__).parents[1] / "fixtures" / "data"
LEGAL = "你是一个法律专家，请根据用户的问题给出专业的回答"


def convert(src, out, *args) -> int:
    return cli.main(["data", "convert", str(src), str(out), *map(str, args)])


def records(path) -> list:
    return [r.data for r in read_records(path)]


def messages(path, **kw) -> list:
    convs, _ = load_conversations([path], **kw)
    return [c.messages for c in convs]


def test_alpaca_to_messages_to_alpaca_round_trips(tmp_path):
    src = FIX / "alpaca.json"
    assert convert(src, tmp_path / "m.jsonl", "--to", "messages") == 0
    assert convert(tmp_path / "m.jsonl", tmp_path / "a.json", "--to", "alpaca") == 0
    # What training sees is unchanged at every step...
    assert messages(tmp_path / "m.jsonl") == messages(src) == messages(tmp_path / "a.json")
    # ...and a record without input comes back field for field (with input, it joins the instruction).
    for before, after in zip(records(src), records(tmp_path / "a.json")):
        if not before.get("input"):
            assert after == before
        else:
            assert after["instruction"] == f"{before['instruction']}\n{before['input']}" and after["input"] == ""
    first = records(tmp_path / "m.jsonl")[0]
    assert set(first) == {"messages"} and first["messages"][-1]["role"] == "assistant"


def test_fixed_instruction_turns_qa_pairs_into_the_legal_recipe(tmp_path, capsys):
    out = tmp_path / "legal.jsonl"
    assert convert(FIX / "qa_pairs.json", out, "--to", "alpaca", "--instruction", LEGAL) == 0
    assert "read 4 records" in capsys.readouterr().out
    src, got = records(FIX / "qa_pairs.json"), records(out)
    assert got == [{"instruction": LEGAL, "input": r["input"], "output": r["output"], "id": r["id"]} for r in src]
    # With data.instruction_as=system, the instruction is the system prompt and the question the user turn.
    assert messages(out, instruction_as="system") == [
        [{"role": "system", "content": LEGAL}, {"role": "user", "content": r["input"]},
         {"role": "assistant", "content": r["output"]}] for r in src]


def test_own_instructions_are_kept(tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    src.write_text(json.dumps({"instruction": "Mine.", "input": "q", "output": "a"}) + "\n"
                   + json.dumps({"input": "q2", "output": "a2"}) + "\n")
    assert convert(src, tmp_path / "o.jsonl", "--to", "alpaca", "--instruction", "Fixed.") == 0
    assert [r["instruction"] for r in records(tmp_path / "o.jsonl")] == ["Mine.", "Fixed."]
    assert "1 record(s) kept their own instruction" in capsys.readouterr().out


def test_map_renames_columns(tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}", "src": "x"}) + "\n" for i in range(3)))
    assert convert(src, tmp_path / "o.json", "--to", "messages", "--map", "input=question,output=answer",
                   "--system", "Be brief.") == 0
    got = records(tmp_path / "o.json")
    assert got[0] == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q0"},
                                   {"role": "assistant", "content": "a0"}], "src": "x"}
    assert parse_map(" input = question , output=answer ") == {"input": "question", "output": "answer"}
    assert rename_fields({"input": "old", "question": "new"}, {"input": "question"}) == {"input": "new"}
    with pytest.raises(ConfigError, match="is not NEW=OLD"):
        parse_map("input")


def test_sharegpt_and_messages_convert_both_ways(tmp_path):
    src = FIX / "sharegpt.json"
    assert convert(src, tmp_path / "m.jsonl", "--to", "messages") == 0
    assert convert(tmp_path / "m.jsonl", tmp_path / "s.json", "--to", "sharegpt") == 0
    assert messages(src) == messages(tmp_path / "m.jsonl") == messages(tmp_path / "s.json")
    tool = records(tmp_path / "s.json")[3]["conversations"]
    assert [t["from"] for t in tool] == ["human", "gpt", "observation", "gpt"]


@pytest.mark.parametrize("chain", [(".parquet", ".jsonl", ".json"), (".jsonl", ".parquet", ".json")])
def test_file_types_change_exactly(tmp_path, chain):
    path = FIX / "alpaca.json"
    for suffix in chain:
        out = tmp_path / f"x{len(list(tmp_path.iterdir()))}{suffix}"
        assert convert(path, out, "--to", "alpaca") == 0
        path = out
    assert records(path) == records(FIX / "alpaca.json")


def test_parquet_is_written_in_batches_with_late_optional_columns(tmp_path):
    src = tmp_path / "big.jsonl"
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5000)]
    rows[4500]["history"] = [["earlier", "answer"]]
    rows[4600]["system"] = "late system prompt"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert convert(src, tmp_path / "big.parquet", "--to", "alpaca") == 0
    assert convert(tmp_path / "big.parquet", tmp_path / "back.jsonl", "--to", "alpaca") == 0
    assert records(tmp_path / "back.jsonl") == rows


def test_bad_records_are_rejected_with_their_location_and_the_rest_converted(tmp_path, capsys):
    assert convert(FIX / "bad_line.jsonl", tmp_path / "o.jsonl", "--to", "messages") == 0
    out = capsys.readouterr().out
    assert "rejected 1 record(s)" in out and "bad_line.jsonl:2: line is not valid JSON" in out
    assert len(records(tmp_path / "o.jsonl")) == 2
    (reject,) = records(tmp_path / "o.rejects.jsonl")
    assert reject["where"].endswith("bad_line.jsonl:2") and "not valid JSON" in reject["reason"]
    # Alpaca cannot hold tool turns: that conversation is rejected, the others converted.
    assert convert(FIX / "sharegpt.json", tmp_path / "a.jsonl", "--to", "alpaca") == 0
    assert len(records(tmp_path / "a.jsonl")) == 3
    assert "tool turns" in records(tmp_path / "a.rejects.jsonl")[0]["reason"]


def test_user_mistakes_are_one_paragraph(tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    out.write_text("keep me\n")
    assert convert(FIX / "alpaca.json", out, "--to", "alpaca") == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert convert(FIX / "alpaca.json", out, "--to", "alpaca", "--overwrite") == 0
    assert convert(FIX / "alpaca.json", tmp_path / "o.csv", "--to", "alpaca") == 2
    assert convert(FIX / "alpaca.json", FIX / "alpaca.json", "--to", "alpaca", "--overwrite") == 2
    assert convert(FIX / "wrong_top.json", tmp_path / "w.jsonl", "--to", "alpaca") == 2
    assert convert(FIX / "missing_output.json", tmp_path / "m.jsonl", "--to", "messages") == 2
    err = capsys.readouterr().err
    assert "cannot write '.csv'" in err and "the output is the input file" in err
    assert "expected a list of records" in err and "no record could be converted" in err and "Traceback" not in err
    assert not (tmp_path / "m.jsonl").exists()
