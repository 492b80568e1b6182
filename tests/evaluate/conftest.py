"""A tiny trained run shared by the evaluation tests (trains in seconds)."""

from pathlib import Path

import pytest

from chattune import cli

FIX = Path(__file__).parents[1] / "fixtures" / "data"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished run of the tiny random model: 2 steps of LoRA on the alpaca fixture."""
    tmp = tmp_path_factory.mktemp("eval-run")
    cfg = tmp / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n  dtype: fp32\ndata:\n  train: {FIX / 'alpaca.json'}\n"
                   "  system: You are a helpful assistant.\n")
    assert cli.main(["train", str(cfg), f"output_dir={tmp / 'run'}", "train.max_steps=2", "train.batch_size=2",
                     "train.grad_accum=1", "train.learning_rate=1e-2", "tracking.probe_size=0",
                     "tracking.backends=[none]"]) == 0
    return tmp / "run"
