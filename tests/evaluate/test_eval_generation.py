"""`chattune eval --data`: every row answered by the tuned and base model, scored, saved, and shown."""

import hashlib
import json
from pathlib import Path

import pytest

from chattune import cli
from chattune.evaluate import metrics as m

FIX = Path(__file__).parents[1] / "fixtures" / "data"


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    assert cli.main(["eval", str(tiny_run), "--data", str(FIX / "alpaca.json"), "--compare-base", "--limit", "3",
                     "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    result = json.loads((tiny_run / "eval" / "alpaca.json").read_text())
    preds = [json.loads(l) for l in (tiny_run / "eval" / "alpaca.predictions.jsonl").read_text().splitlines()]
    return result, preds


def test_result_file_records_metrics_settings_model_and_data(evaluated, tiny_run):
    result, _ = evaluated
    assert result["kind"] == "generation" and result["rows"] == 3 and result["name"] == "alpaca"
    for who in ("tuned", "base"):
        assert set(result["metrics"][who]) == {"bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact", "answer_chars"}
    assert result["settings"]["max_new_tokens"] == 6 and result["settings"]["limit"] == 3
    assert result["settings"]["metrics"] == ["bleu", "rouge", "exact"]
    assert result["data"]["sha256"] == hashlib.sha256((FIX / "alpaca.json").read_bytes()).hexdigest()
    assert result["model"]["adapter"] == str(tiny_run / "adapter")


def test_every_row_has_both_answers_and_the_averages_are_their_scores(evaluated):
    result, preds = evaluated
    refs = json.loads((FIX / "alpaca.json").read_text())
    assert [p["reference"] for p in preds] == [r["output"] for r in refs[:3]]
    for who in ("tuned", "base"):
        rescored = [m.score_row(p[who], p["reference"], ["bleu", "rouge", "exact"]) for p in preds]
        assert [p["scores"][who] for p in preds] == rescored
        for k, v in m.average(rescored).items():
            assert result["metrics"][who][k] == pytest.approx(v)


def test_tuned_and_base_answers_come_from_different_weights(evaluated, tiny_run):
    # lr 1e-2 on a random model moves the LoRA weights enough to change a greedy answer somewhere.
    _, preds = evaluated
    assert any(p["tuned"] != p["base"] for p in preds)


def test_metrics_subset_and_table(tiny_run, capsys):
    assert cli.main(["eval", str(tiny_run), "--data", str(FIX / "qa_pairs.json"), "--metrics", "exact",
                     "--limit", "2", "--max-new-tokens", "2", "--name", "qa-exact"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tiny_run / "eval" / "qa-exact.json").read_text())
    assert set(result["metrics"]["tuned"]) == {"exact", "answer_chars"} and "base" not in result["metrics"]
    assert "exact match" in out and "BLEU-4" not in out and "tuned model" in out
