"""`chattune ui` in a real headless Chromium: configure a run on a tiny model, train it, watch the loss chart gain
points and the probe answers appear, then chat with the tuned run and see the answer stream in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.ui import browser as b
from tests.ui.conftest import serve

FIXTURE = Path(__file__).parents[1] / "fixtures" / "data" / "alpaca.json"

pytestmark = pytest.mark.slow


def tiny_folder(tmp_path: Path, model_dir: Path) -> Path:
    """A working folder with one recipe: the tiny random model, 5 alpaca rows (2 held out as probes), 3 epochs."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    shutil.copy(FIXTURE, tmp_path / "data" / "train.json")
    (tmp_path / "configs" / "tiny.yaml").write_text(
        f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\n"
        "data:\n  train: data/train.json\n  system: You are a terse test bot.\n  max_length: 128\n"
        "train:\n  epochs: 3\n  batch_size: 1\n  grad_accum: 1\n  learning_rate: 5.0e-3\n  logging_steps: 1\n"
        "tracking:\n  backends: [none]\n  probe_size: 2\n  probe_max_new_tokens: 4\n"
        "output_dir: runs/tiny\n", encoding="utf-8")
    return tmp_path


def value(drv, elem_id: str) -> str:
    return b.css(drv, f"#{elem_id} textarea, #{elem_id} input")[0].get_attribute("value")


def loss_points(drv) -> int:
    lines = b.css(drv, "#live svg[data-chart='run-0-loss'] polyline[data-points]")
    return int(lines[0].get_attribute("data-points")) if lines else 0


@pytest.fixture
def page(tmp_path, tiny_model_dir, monkeypatch):
    reason = b.missing()
    if reason:
        pytest.skip(reason)
    demo, url = serve(tiny_folder(tmp_path, tiny_model_dir), monkeypatch)
    drv = b.driver()
    try:
        drv.get(url)
        yield drv, tmp_path
    finally:
        drv.quit()
        demo.close()


def test_configure_train_watch_and_chat_in_chromium(page):
    drv, folder = page
    b.wait_for(lambda: value(drv, "f-output_dir") == "runs/tiny", 60, "the form filled from configs/tiny.yaml")
    # A wrong value: the CLI's message next to its field, nothing else accepted.
    b.fill(drv, "f-train-epochs", "0")
    b.click(drv, "validate")
    err = b.wait_for(lambda: b.css(drv, "[data-field-error='train.epochs']"), 30, "the error under train.epochs")
    assert "train.epochs: Input should be greater than 0 (got 0)" in err[0].text
    b.fill(drv, "f-train-epochs", "3")
    b.click(drv, "validate")
    b.wait_for(lambda: b.css(drv, "[data-valid]"), 30, "the settings accepted")
    assert value(drv, "command") == "chattune train configs/tiny.yaml"
    assert not b.css(drv, "[data-field-error]")

    b.click_tab(drv, "Train")
    b.click(drv, "start")
    b.wait_for(lambda: b.css(drv, "#train-message [data-started]"), 30, "the training process started")
    seen = [loss_points(drv)]  # the process has only just started: no chart yet
    b.click(drv, "start")  # the same run folder again while the first training lives: refused
    refused = b.wait_for(lambda: b.css(drv, "#train-message [data-error]"), 30, "the second start refused")
    assert "this run directory is in use: a training started from this page is running there" in refused[0].text
    drv.refresh()  # a reloaded page finds the running training again
    b.wait_for(lambda: value(drv, "f-output_dir") == "runs/tiny", 60, "the page loaded again")
    b.click_tab(drv, "Train")
    b.wait_for(lambda: b.css(drv, "#live [data-status='running'], #live [data-status='finished']"), 30,
               "the reloaded page attached to the run")

    def finished() -> bool:
        seen.append(loss_points(drv))
        return b.css(drv, "#live [data-status='finished']")

    b.wait_for(finished, 240, "the run to finish on the Train tab", every=0.3)
    rows = [json.loads(x) for x in (folder / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    logged = sum(1 for r in rows if r.get("loss") is not None)
    assert logged == 9  # 3 training rows (2 of 5 held out as probes) x 3 epochs, batch 1, logged every step
    b.wait_for(lambda: loss_points(drv) == logged, 10,
               f"all {logged} logged steps on the loss chart; page: {b.by_id(drv, 'live').get_attribute('innerHTML')[:3000]}")
    assert seen[0] < logged and seen == sorted(seen), f"the chart gains points as training goes: {seen}"
    live = b.by_id(drv, "live").text
    assert "tuned model (epoch 3)" in live and "base model (before training)" in live
    probes = [json.loads(x) for x in (folder / "runs/tiny/predictions/epoch_3.jsonl").read_text().splitlines()]
    assert probes[0]["question"] in live

    b.click_tab(drv, "Chat")
    b.fill(drv, "chat-max", "120")
    drv.execute_script(RECORD_LENGTHS)
    b.fill(drv, "chat-message", "Name the three primary colors.")
    b.click(drv, "chat-send")
    flags = b.wait_for(lambda: len(b.css(drv, "#flag-tuned [data-stopped], #flag-base [data-stopped]")) == 2 and
                       b.css(drv, "#flag-tuned [data-stopped], #flag-base [data-stopped]"), 120, "both answers")
    lengths = drv.execute_script("return window.__tunedLengths")
    assert len(set(lengths)) >= 3, f"the tuned answer arrived piece by piece: lengths seen {lengths}"
    bubbles = b.css(drv, "#chat-tuned .message, #chat-tuned [data-testid='bot']")
    assert bubbles and bubbles[-1].text.strip()
    assert all(f.get_attribute("data-stopped") in ("0", "1") for f in flags)


# Every change of the tuned chat's text, recorded in the page (polling could miss the pieces of a fast stream).
RECORD_LENGTHS = """
window.__tunedLengths = [];
const box = document.getElementById('chat-tuned');
new MutationObserver(() => {
  const bots = box.querySelectorAll("[data-testid='bot']");
  const n = bots.length ? bots[bots.length - 1].innerText.length : 0;
  const seen = window.__tunedLengths;
  if (!seen.length || seen[seen.length - 1] !== n) seen.push(n);
}).observe(box, {subtree: true, childList: true, characterData: true});
"""
