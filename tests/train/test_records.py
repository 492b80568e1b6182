"""records.finish: summary.json and the closing line, for runs with and without logged steps."""

from __future__ import annotations

import json
import logging
import types

from chattune.files import append_jsonl
from chattune.rundir import RunDir
from chattune.train.records import WallClock, finish


def _finish(tmp_path, rows, caplog):
    run_dir = RunDir(tmp_path / "run")
    run_dir.root.mkdir()
    for row in rows:
        append_jsonl(run_dir.metrics, row)
    result = types.SimpleNamespace(global_step=3, training_loss=3.25)
    with caplog.at_level(logging.INFO, logger="chattune"):
        finish(run_dir, result, WallClock(run_dir, resumed=False), {})
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    return json.loads(run_dir.summary.read_text()), done


def test_logged_steps_give_the_first_and_last_loss(tmp_path, caplog):
    summary, done = _finish(tmp_path, [{"step": 1, "loss": 3.5}, {"step": 3, "loss": 3.0}], caplog)
    assert (summary["first_loss"], summary["final_loss"], summary["train_loss"]) == (3.5, 3.0, 3.25)
    assert len(done) == 1 and done[0].endswith("loss 3.5000 -> 3.0000")


def test_a_run_shorter_than_logging_steps_reports_its_mean_loss_not_n_a(tmp_path, caplog):
    summary, done = _finish(tmp_path, [], caplog)
    assert summary["first_loss"] is None and summary["train_loss"] == 3.25
    assert len(done) == 1 and "mean loss 3.2500" in done[0] and "logging_steps" in done[0]
    assert "n/a" not in done[0]
