"""`chattune predict` and batched generation: batched == one at a time, the run's template, resumable output."""

import json
import logging
from pathlib import Path

import pytest
import torch

from chattune import cli
from chattune.data.formats import load_conversations
from chattune.errors import DataError
from chattune.infer import predict
from chattune.infer.generate import generate_batch
from chattune.infer.session import load_session, with_system

from .conftest import SYSTEM

# Eight questions whose rendered prompts all have different lengths (left padding differs in every row).
QUESTIONS = ["Hi", "What is 2+2?", "Name three colours.", "请问你是哪位？",
             "Tell me about the sea in one short sentence, please.", "Why is the sky blue? Explain briefly.",
             "Write one line about a lighthouse keeper who lost his cat on a stormy night.",
             "你的名字是什么呀？能讲讲你是谁吗？我很好奇，也想知道你住在哪里。"]


def _prompts(system):
    return [with_system([{"role": "user", "content": q}], system) for q in QUESTIONS]


def _assert_batched_equals_single(model, renderer, system, max_new_tokens):
    prompts = _prompts(system)
    assert len({len(renderer.prompt_ids(p)) for p in prompts}) == 8, "every row needs its own padding"
    batched = generate_batch(model, renderer, prompts, max_new_tokens=max_new_tokens, batch_size=8)
    single = generate_batch(model, renderer, prompts, max_new_tokens=max_new_tokens, batch_size=1)
    assert batched == single
    assert len(set(single)) > 1 and any(single), "the comparison must not be vacuous"
    return single


def test_batched_equals_one_at_a_time_tiny(tiny_run):
    session = load_session(tiny_run)
    _assert_batched_equals_single(session.model, session.renderer, session.system, max_new_tokens=12)


@pytest.mark.slow
def test_batched_equals_one_at_a_time_smollm2(smollm2_dir):
    # fp32: in bf16 left padding changes the attention's summation order, which moves logits by up to ~0.7
    # (measured on SmolLM2-135M), so a near-tie can flip; fp32 keeps rows equal to ~1e-5. See docs/inference.md.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chattune.data.render import ChatRenderer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    tok.pad_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    answers = _assert_batched_equals_single(model, ChatRenderer(tok), "You are a helpful assistant.", max_new_tokens=24)
    assert sum(bool(a.strip()) for a in answers) == 8


def _data(tmp_path: Path) -> Path:
    """Alpaca rows, one without an output (predict must answer it anyway)."""
    rows = [{"instruction": q, "output": f"ref {i}"} for i, q in enumerate(QUESTIONS[:5])]
    rows.append({"instruction": "No answer yet: what is your name?"})
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def _run(run, data, out, *extra):
    return cli.main(["predict", str(run), "--data", str(data), "--out", str(out), "--batch-size", "4",
                     "--max-new-tokens", "6", *extra])


def _lines(out: Path):
    return [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def counted(monkeypatch):
    """Count the prompts predict hands to generation."""
    calls = []
    real = predict.generate_batch

    def spy(model, renderer, prompts, **kw):
        calls.append(len(prompts))
        return real(model, renderer, prompts, **kw)

    monkeypatch.setattr(predict, "generate_batch", spy)
    return calls


def test_predict_answers_every_row_with_the_runs_template_and_system(tiny_run, tmp_path, counted):
    data, out = _data(tmp_path), tmp_path / "out" / "pred.jsonl"
    assert _run(tiny_run, data, out) == 0
    assert torch.is_grad_enabled(), "no global grad switch left behind (a later training in-process needs it)"
    rows = _lines(out)
    assert [r["index"] for r in rows] == list(range(6)), "written back in input order"
    assert counted == [4, 2], "batches of --batch-size"
    assert [r["question"] for r in rows[:5]] == QUESTIONS[:5]
    assert [r.get("reference") for r in rows] == [f"ref {i}" for i in range(5)] + [None]
    # The same answers as generating directly with the run's system prompt: the template and system are the run's.
    session = load_session(tiny_run)
    convs, _ = load_conversations([data], require_answer=False, system=SYSTEM)
    prompts = [c.messages[:-1] if c.messages[-1]["role"] == "assistant" else c.messages for c in convs]
    assert all(p[0] == {"role": "system", "content": SYSTEM} for p in prompts)
    expected = generate_batch(session.model, session.renderer, prompts, max_new_tokens=6, batch_size=1)
    assert [r["answer"] for r in rows] == expected
    assert [r["prompt_hash"] for r in rows] == [predict.prompt_hash(p) for p in prompts]


def test_predict_resumes_without_regenerating_finished_rows(tiny_run, tmp_path, counted, caplog):
    data, out = _data(tmp_path), tmp_path / "pred.jsonl"
    assert _run(tiny_run, data, out) == 0
    full = out.read_text(encoding="utf-8").splitlines()
    # A crash after two rows, in the middle of writing the third line.
    out.write_text("\n".join(full[:2]) + "\n" + full[2][:15], encoding="utf-8")
    counted.clear()
    caplog.set_level(logging.INFO, logger="chattune")
    assert _run(tiny_run, data, out) == 0
    assert sum(counted) == 4, "only the rows missing from OUT are generated"
    assert "2 of 6 rows already in" in caplog.text
    assert out.read_text(encoding="utf-8").splitlines() == full
    counted.clear()
    assert _run(tiny_run, data, out) == 0
    assert counted == [], "a finished OUT generates nothing"


def test_predict_refuses_an_out_file_of_other_prompts(tiny_run, tmp_path, capsys):
    data, out = _data(tmp_path), tmp_path / "pred.jsonl"
    out.write_text(json.dumps({"index": 0, "prompt_hash": "0000", "answer": "x"}) + "\n", encoding="utf-8")
    capsys.readouterr()
    assert _run(tiny_run, data, out) == 2
    err = capsys.readouterr().err
    assert "not in --data" in err and "Traceback" not in err


def test_loaders_accept_rows_without_an_answer_only_when_asked(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                             {"role": "user", "content": "c"}]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="ends with a user turn"):
        load_conversations([path])
    convs, _ = load_conversations([path], require_answer=False)
    row = predict.to_row(0, convs[0])
    assert row.prompt[-1] == {"role": "user", "content": "c"} and row.reference is None
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "q"}]), encoding="utf-8")
    with pytest.raises(DataError, match='"output" is missing'):
        load_conversations([alpaca])
    assert load_conversations([alpaca], require_answer=False)[0][0].messages == [{"role": "user", "content": "q"}]
