"""Reliability fixtures: one uninterrupted tiny run to compare interrupted and repeated runs against."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chattune import cli

FIX = Path(__file__).parents[1] / "fixtures" / "data"
DRIVER = Path(__file__).with_name("driver.py")
STEPS = 8
# 4 training samples at batch size 1: 4 steps per epoch, checkpoints at steps 3, 6 and 8 (the end).
COMMON = [f"train.max_steps={STEPS}", "train.batch_size=1", "train.grad_accum=1", "train.learning_rate=1e-2",
          "train.logging_steps=1", "train.save_steps=3", "train.save_total_limit=2", "tracking.backends=[none]",
          "tracking.probe_size=1", "tracking.probe_max_new_tokens=4"]


def write_config(folder: Path, model_dir: Path) -> Path:
    """A config training the tiny model on the alpaca fixture."""
    cfg = folder / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\ndata:\n  train: {FIX / 'alpaca.json'}\n")
    return cfg


def train_argv(cfg: Path, out: Path, *extra: str) -> list[str]:
    """`chattune train` arguments for the shared reliability setup."""
    return ["train", str(cfg), f"output_dir={out}", *COMMON, *extra]


def run_driver(action: str, step: int, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run the CLI in a child process that kills or interrupts itself at `step` (see driver.py)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(DRIVER), action, str(step), *argv], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def metrics(run: Path) -> list[dict]:
    """The rows of RUN/metrics.jsonl."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_rows(run: Path) -> list[dict]:
    """The training-loss rows of RUN/metrics.jsonl."""
    return [r for r in metrics(run) if "loss" in r]


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, tiny_model_dir) -> Path:
    """An uninterrupted run: the reference curve."""
    tmp = tmp_path_factory.mktemp("baseline")
    assert cli.main(train_argv(write_config(tmp, tiny_model_dir), tmp / "run")) == 0
    return tmp / "run"
