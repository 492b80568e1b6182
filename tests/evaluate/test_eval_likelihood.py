"""`chattune eval --preference` and `--loss`: numbers recomputed by hand from the model, base vs tuned, files written."""

import json
import math

import pytest
import torch

from chattune import cli
from chattune.data.formats import load_conversations
from chattune.data.preference import load_pairs, render_pairs
from chattune.data.render import IGNORE, render_all
from chattune.errors import ConfigError
from chattune.evaluate.mcq import wilson_interval
from chattune.infer.session import load_session

from .conftest import FIX

PAIRS = FIX / "preference.json"
SYSTEM = "You are a helpful assistant."


def _by_hand(model, samples):
    out = []
    with torch.inference_mode():
        for s in samples:
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1].float()
            target = torch.tensor(s.labels[1:])
            keep = target != IGNORE
            lp = torch.log_softmax(logits[keep], -1).gather(1, target[keep][:, None]).sum().item()
            out.append((lp, int(keep.sum())))
    return out


def test_preference_accuracy_margin_and_interval(tiny_run):
    assert cli.main(["eval", str(tiny_run), "--preference", str(PAIRS), "--compare-base"]) == 0
    record = json.loads((tiny_run / "eval" / "preference.json").read_text())
    assert record["kind"] == "preference" and record["rows"] == 12
    session = load_session(tiny_run)
    samples, _ = render_pairs(session.renderer, load_pairs([PAIRS], system=SYSTEM)[0], max_length=1 << 30)
    for who, ctx in (("tuned", torch.no_grad), ("base", session.model.disable_adapter)):
        with ctx():
            scored = _by_hand(session.model, samples)
        avg = [s / n for s, n in scored]
        margins = [avg[2 * k] - avg[2 * k + 1] for k in range(12)]
        got = record["metrics"][who]
        correct = sum(m > 0 for m in margins)
        assert got["correct"] == correct and got["n"] == 12
        assert got["mean_margin"] == pytest.approx(sum(margins) / 12, abs=1e-3)
        lo, hi = wilson_interval(correct, 12)
        assert got["ci95"] == [round(100 * lo, 2), round(100 * hi, 2)]


def test_loss_and_perplexity_with_the_change(tiny_run):
    data = FIX / "alpaca.json"
    assert cli.main(["eval", str(tiny_run), "--data", str(data), "--loss", "--compare-base", "--name", "general"]) == 0
    record = json.loads((tiny_run / "eval" / "general.json").read_text())
    m = record["metrics"]
    session = load_session(tiny_run)
    convs, _ = load_conversations([data], system=SYSTEM)
    samples, _ = render_all(session.renderer, convs, max_length=1 << 30)
    for who, ctx in (("tuned", torch.no_grad), ("base", session.model.disable_adapter)):
        with ctx():
            scored = _by_hand(session.model, samples)
        loss = -sum(s for s, _ in scored) / sum(n for _, n in scored)
        assert m[who]["loss"] == pytest.approx(loss, abs=1e-4)
        assert m[who]["ppl"] == pytest.approx(math.exp(loss), rel=1e-3)
    assert m["change"]["loss"] == pytest.approx(m["tuned"]["loss"] - m["base"]["loss"], abs=1e-4)
    assert m["tuned"]["loss"] != m["base"]["loss"], "the adapter changed something"
    from chattune.report.html import eval_table

    html = eval_table("general", record)
    assert "tuned − base" in html and f"{m['change']['loss']:.2f}" in html


def test_loss_needs_data(tiny_run):
    from chattune.verbs.eval import run

    with pytest.raises(ConfigError) as info:
        run(tiny_run, loss=True, preference=str(PAIRS))
    assert info.value.where == "--loss"
