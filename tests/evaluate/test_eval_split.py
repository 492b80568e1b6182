"""The eval split: seeded, disjoint from training, and eval loss written to metrics.jsonl during training."""

import json
import math
from pathlib import Path

import pytest

from chattune import cli, config
from chattune.data.split import eval_count, split_eval
from chattune.errors import ConfigError

FIX = Path(__file__).parents[1] / "fixtures" / "data"


def test_split_is_disjoint_complete_and_in_file_order():
    rows = [f"row{i}" for i in range(100)]
    train, evals = split_eval(rows, ratio=0.1, seed=7)
    assert len(evals) == 10 and len(train) == 90
    assert not set(train) & set(evals), "an eval row must never be trained on"
    assert sorted(train + evals, key=rows.index) == rows, "every row lands on exactly one side"
    assert train == sorted(train, key=rows.index) and evals == sorted(evals, key=rows.index)


def test_split_is_deterministic_per_seed():
    rows = list(range(50))
    assert split_eval(rows, size=5, seed=42) == split_eval(rows, size=5, seed=42)
    assert split_eval(rows, size=5, seed=42)[1] != split_eval(rows, size=5, seed=43)[1]
    # Not the first rows: a file sorted by topic would otherwise give a skewed eval set.
    assert split_eval(rows, size=5, seed=42)[1] != rows[:5]


def test_split_counts_and_limits():
    assert eval_count(100, ratio=0.05) == 5
    assert eval_count(10, ratio=0.01) == 1, "a ratio > 0 holds out at least one row"
    assert eval_count(10, size=3) == 3 and eval_count(10) == 0
    assert split_eval([1, 2, 3]) == ([1, 2, 3], [])
    with pytest.raises(ConfigError, match="leaves no training data"):
        split_eval([1, 2, 3], size=3)


def test_eval_sources_are_exclusive():
    with pytest.raises(ConfigError, match="not both"):
        config.load(None, ["data.train=a.json", "data.eval_ratio=0.1", "data.eval_size=2"])
    with pytest.raises(ConfigError, match="data.eval names eval files"):
        config.load(None, ["data.train=a.json", "data.eval=b.json", "data.eval_size=2"])
    with pytest.raises(ConfigError, match="less than 1"):
        config.load(None, ["data.train=a.json", "data.eval_ratio=1"])


def _train(tmp_path, tiny_model_dir, *extra):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n  dtype: fp32\ndata:\n  train: {FIX / 'alpaca.json'}\n")
    out = tmp_path / "run"
    code = cli.main(["train", str(cfg), f"output_dir={out}", "train.batch_size=2", "train.grad_accum=1",
                     "train.learning_rate=1e-2", "train.logging_steps=1", "tracking.probe_size=0",
                     "tracking.backends=[none]", *extra])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows


def test_eval_loss_every_epoch(tmp_path, tiny_model_dir):
    # 5 rows, 1 held out -> 4 training rows, batch 2 -> 2 steps per epoch; 2 epochs -> eval at steps 2 and 4.
    out, rows = _train(tmp_path, tiny_model_dir, "train.epochs=2", "data.eval_size=1")
    evals = [r for r in rows if "eval_loss" in r]
    assert [(r["step"], r["epoch"]) for r in evals] == [(2, 1.0), (4, 2.0)]
    for r in evals:
        assert r["eval_loss"] > 0 and r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4], "training rows are still one per step"
    report = json.loads((out / "data_report.json").read_text())
    assert len(report["eval"]["rows"]) == 1 and report["render"]["conversations"] == 4
    held = report["eval"]["rows"][0]
    again_train, again_eval = split_eval([f"{FIX / 'alpaca.json'}[{i}]" for i in range(5)], size=1, seed=42)
    assert [held] == again_eval and held not in again_train, "the held-out row is the seeded one"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] == evals[-1]["eval_loss"]


def test_eval_files_and_eval_steps(tmp_path, tiny_model_dir):
    out, rows = _train(tmp_path, tiny_model_dir, "train.max_steps=3", "train.eval_steps=2",
                       f"data.eval={FIX / 'alpaca.jsonl'}")
    # every 2 steps, and once more at the end of training
    assert [r["step"] for r in rows if "eval_loss" in r] == [2, 3]
    report = json.loads((out / "data_report.json").read_text())
    assert report["eval"]["source"] == "files" and len(report["eval"]["rows"]) == 4
    assert report["render"]["conversations"] == 5, "eval files take nothing from the training rows"
