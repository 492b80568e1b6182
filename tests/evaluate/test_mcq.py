"""Multiple choice: file layouts, letter-likelihood scoring with a forced preference, Wilson intervals, the CLI."""

import csv
import hashlib
import json
import math

import pytest
import torch

from chattune import cli
from chattune.data.render import ChatRenderer
from chattune.errors import DataError
from chattune.evaluate import mcq
from chattune.verbs import eval as eval_verb

ANSWERS = "BADCBBCADB"  # 4 x B of 10


def write_csv(path, answers):
    """The DISC-Law layout: input, output (answer letter), A, B, C, D, source, multichoice."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input", "output", "A", "B", "C", "D", "source", "multichoice"])
        for i, a in enumerate(answers):
            w.writerow([f"第{i}题：哪一项是正确的？", a, f"甲{i}", f"乙{i}", f"丙{i}", f"丁{i}", "test", "False"])
    return path


def prefer(model, letter_id):
    """Give the model's output layer a bias that makes one token overwhelmingly likely (weights shared)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    old = base.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True, dtype=old.weight.dtype)
    head.weight = old.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[letter_id] = 1000.0
    base.set_output_embeddings(head)
    return lambda: base.set_output_embeddings(old)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, ChatRenderer(tok)


# -- reading --------------------------------------------------------------


def test_disc_law_csv_layout(tmp_path):
    qs = mcq.load_questions(write_csv(tmp_path / "q.csv", "BA"))
    assert [q.answer for q in qs] == ["B", "A"]
    assert qs[0].options == {"A": "甲0", "B": "乙0", "C": "丙0", "D": "丁0"}
    assert qs[0].question == "第0题：哪一项是正确的？" and qs[0].where.endswith("q.csv:2")


def test_json_option_lists_and_dicts(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps({"question": "2+2?", "options": ["3", "4", "5"], "answer": "b."}) + "\n"
                 + json.dumps({"question": "Sky?", "choices": {"a": "blue", "b": "green"}, "answer": "A"}) + "\n")
    qs = mcq.load_questions(p)
    assert qs[0].options == {"A": "3", "B": "4", "C": "5"} and qs[0].answer == "B"
    assert qs[1].options == {"A": "blue", "B": "green"} and qs[1].answer == "A"
    assert mcq.question_text(qs[0]).splitlines() == [mcq.HEAD_EN, "", "2+2?", "A. 3", "B. 4", "C. 5"]


@pytest.mark.parametrize("record, message", [
    ({"question": "q", "A": "x", "B": "y", "answer": "E"}, "not one of the option letters A, B"),
    ({"question": "q", "A": "x", "B": "y", "answer": "AB"}, "names several options"),
    ({"question": "q", "A": "x", "answer": "A"}, "at least two options"),
    ({"A": "x", "B": "y", "answer": "A"}, "no question text"),
    ({"question": "q", "A": "x", "B": "y"}, "no answer letter"),
])
def test_bad_records_say_what_and_where(tmp_path, record, message):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([record]))
    with pytest.raises(DataError, match=message) as info:
        mcq.load_questions(p)
    assert info.value.where == f"{p}[0]"


# -- scoring --------------------------------------------------------------


def test_forced_preference_gets_every_b_right(tmp_path, tiny):
    model, renderer = tiny
    b_id = mcq.letter_token_ids(renderer.tokenizer, "B")["B"]
    qs = mcq.load_questions(write_csv(tmp_path / "q.csv", ANSWERS))
    prompts = [mcq.build_messages(q, [], "You are a helpful assistant.") for q in qs]
    undo = prefer(model, b_id)
    try:
        lps = mcq.option_logprobs(model, renderer, prompts, [list(q.options) for q in qs], batch_size=3)
    finally:
        undo()
    choices = [mcq.choose(lp) for lp in lps]
    assert choices == ["B"] * len(qs)
    # All-B answers: 100 %; the mixed file: exactly the 4 questions whose answer is B.
    assert sum(c == "B" for c in choices) == len(qs)
    assert sum(c == q.answer for c, q in zip(choices, qs)) == ANSWERS.count("B") == 4
    assert all(lp["B"] > -1e-3 for lp in lps), "log P(B) ~ 0 when B takes all the mass"


def test_batched_scores_equal_one_at_a_time(tmp_path, tiny):
    # Left padding must not change a question's scores: positions count from each row's first real token.
    model, renderer = tiny
    qs = mcq.load_questions(write_csv(tmp_path / "q.csv", "ABCDA"))
    qs[1].question += "，这一题的题干更长一些，" * 5  # different prompt lengths inside one batch
    prompts = [mcq.build_messages(q, qs[:1], None) for q in qs]
    letters = [list(q.options) for q in qs]
    one = mcq.option_logprobs(model, renderer, prompts, letters, batch_size=1)
    batched = mcq.option_logprobs(model, renderer, prompts, letters, batch_size=5)
    for a, b in zip(one, batched):
        assert a.keys() == b.keys() == {"A", "B", "C", "D"}
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-4)


def test_scores_are_the_models_own_next_token_log_probabilities(tmp_path, tiny):
    model, renderer = tiny
    q = mcq.load_questions(write_csv(tmp_path / "q.csv", "C"))[0]
    prompt = mcq.build_messages(q, [], "sys")
    got = mcq.option_logprobs(model, renderer, [prompt], [list(q.options)])[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([renderer.prompt_ids(prompt)])).logits[0, -1]
    want = torch.log_softmax(logits.float(), dim=-1)
    ids = mcq.letter_token_ids(renderer.tokenizer, "ABCD")
    for letter, lp in got.items():
        assert lp == pytest.approx(want[ids[letter]].item(), abs=1e-4)


def test_k_shot_examples_are_prior_turns():
    q = mcq.Question("Q?", {"A": "x", "B": "y"}, "A", "f:1")
    shot = mcq.Question("S?", {"A": "u", "B": "v"}, "B", "f:0")
    msgs = mcq.build_messages(q, [shot], "sys")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "B" and msgs[1]["content"].endswith("B. v") and msgs[3]["content"].endswith("B. y")


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: p = 0.8, z^2/n = 0.384146, denominator 1.384146
    #   centre = (0.8 + 0.192073) / 1.384146 = 0.716740
    #   half   = 1.959964 / 1.384146 * sqrt(0.8 * 0.2 / 10 + 3.841459 / 400)
    #          = 1.416010 * sqrt(0.025604) = 1.416010 * 0.160011 = 0.226578
    #   -> [0.490162, 0.943318]
    lo, hi = mcq.wilson_interval(8, 10)
    assert lo == pytest.approx(0.716740 - 0.226578, abs=1e-5) and hi == pytest.approx(0.716740 + 0.226578, abs=1e-5)
    # 0 of 10: [0, z^2/(n + z^2)] = [0, 3.841459 / 13.841459] = [0, 0.277533]
    assert mcq.wilson_interval(0, 10) == (0.0, pytest.approx(3.841459 / 13.841459, abs=1e-6))
    assert mcq.wilson_interval(10, 10) == (pytest.approx(1 - 3.841459 / 13.841459, abs=1e-6), 1.0)
    # 50 of 100: centre 0.5, half = 1.959964 * sqrt(0.0025 + 0.00009604) / 1.0384146 = 0.096170
    lo, hi = mcq.wilson_interval(50, 100)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(2 * 1.959964 * math.sqrt(0.0025 + 3.841459 / 40000) / 1.0384146, abs=1e-5)
    assert mcq.accuracy(8, 10) == {"accuracy": 80.0, "correct": 8, "n": 10, "ci95": [49.02, 94.33]}


# -- the CLI on a trained run -------------------------------------------------


def force_b(monkeypatch):
    """Make every model that `chattune eval` loads prefer the letter B (tuned and base alike)."""
    real = eval_verb.load_session

    def load(*a, **k):
        s = real(*a, **k)
        b_id = mcq.letter_token_ids(s.renderer.tokenizer, "B")["B"]
        prefer(s.model, b_id)
        return s

    monkeypatch.setattr(eval_verb, "load_session", load)


def test_cli_mcq_with_shots_and_base(tmp_path, tiny_run, monkeypatch, capsys):
    force_b(monkeypatch)
    f = write_csv(tmp_path / "law.csv", ANSWERS)
    assert cli.main(["eval", str(tiny_run), "--mcq", str(f), "--compare-base", "--shots", "2", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tiny_run / "eval" / "law.json").read_text())
    # The first 2 rows are the worked examples and are not scored: answers "DCBBCADB" hold 3 x B.
    assert result["rows"] == 8 and result["settings"]["shots"] == 2
    for who in ("tuned", "base"):
        assert result["metrics"][who]["correct"] == 3 and result["metrics"][who]["accuracy"] == 37.5
        assert result["metrics"][who]["ci95"] == [round(100 * x, 2) for x in mcq.wilson_interval(3, 8)]
    assert result["data"]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert result["chance"] == 25.0 and result["model"]["compared_with_base"] is True
    preds = [json.loads(l) for l in (tiny_run / "eval" / "law.predictions.jsonl").read_text().splitlines()]
    assert [p["answer"] for p in preds] == list(ANSWERS[2:])
    assert all(p["tuned"]["choice"] == "B" and p["base"]["choice"] == "B" for p in preds)
    assert "base model" in out and "tuned model" in out and "37.5%" in out and "3/8" in out


def test_cli_all_b_file_scores_100(tmp_path, tiny_run, monkeypatch):
    force_b(monkeypatch)
    f = write_csv(tmp_path / "allb.csv", "B" * 6)
    assert cli.main(["eval", str(tiny_run), "--mcq", str(f), "--name", "allb-run", "--limit", "5"]) == 0
    result = json.loads((tiny_run / "eval" / "allb-run.json").read_text())
    assert result["metrics"]["tuned"]["accuracy"] == 100.0 and result["rows"] == 5
    assert "base" not in result["metrics"], "the base model is scored only with --compare-base"


def test_cli_mistakes_are_one_paragraph(tmp_path, tiny_run, capsys):
    f = write_csv(tmp_path / "two.csv", "AB")
    assert cli.main(["eval", str(tiny_run)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert cli.main(["eval", str(tiny_run), "--mcq", str(f), "--shots", "2"]) == 2
    err = capsys.readouterr().err
    assert "leaving none to score" in err and "Traceback" not in err
    assert cli.main(["eval", str(tiny_run), "--data", str(f), "--metrics", "bleu,meteor"]) == 2
    assert "unknown metric" in capsys.readouterr().err


def test_results_go_to_the_trackers_without_moving_the_training_pointer(tmp_path, tiny_run, monkeypatch):
    import chattune.track as track

    calls = []

    class Fake:
        name = "fake"

        def start(self, info):
            calls.append(("start", info["name"], info["kind"]))
            (tiny_run / "tracking.json").write_text('{"swanlab": "the eval experiment"}')

        def log_scalars(self, scalars, step):
            calls.append(("log", scalars, step))

        def finish(self, ok=True):
            calls.append(("finish", ok))

    made = []
    monkeypatch.setattr(track, "make_trackers", lambda cfg, rd: made.append(cfg) or [Fake()])
    force_b(monkeypatch)
    (tiny_run / "tracking.json").write_text('{"swanlab": "the training experiment"}')
    f = write_csv(tmp_path / "law.csv", "BBAA")
    assert cli.main(["eval", str(tiny_run), "--mcq", str(f), "--name", "trk"]) == 0
    assert made[0].tracking.swanlab.experiment == "run-eval-trk", "a separate experiment per result name"
    assert [c[0] for c in calls] == ["start", "log", "finish"] and calls[0][1:] == ("trk", "mcq")
    scalars, step = calls[1][1], calls[1][2]
    assert scalars["eval/trk/tuned/accuracy"] == 50.0 and scalars["eval/trk/tuned/correct"] == 2.0
    assert scalars["eval/trk/tuned/ci95_low"] < 50.0 < scalars["eval/trk/tuned/ci95_high"]
    assert step == json.loads((tiny_run / "summary.json").read_text())["global_step"] == 2
    assert json.loads((tiny_run / "tracking.json").read_text()) == {"swanlab": "the training experiment"}
