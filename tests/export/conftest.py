"""A tiny trained run shared by the export tests (trains in seconds)."""

from pathlib import Path

import pytest

from chattune import cli

FIX = Path(__file__).parents[1] / "fixtures" / "data"
SYSTEM = "You are a terse test bot."


def train_tiny(tmp: Path, model_dir: Path) -> Path:
    """4 LoRA steps of the tiny random model on the alpaca fixture, with a system prompt and 2 probes."""
    cfg = tmp / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\ndata:\n  train: {FIX / 'alpaca.json'}\n"
                   f"  system: {SYSTEM}\n")
    assert cli.main(["train", str(cfg), f"output_dir={tmp / 'run'}", "train.max_steps=4", "train.batch_size=2",
                     "train.grad_accum=1", "train.learning_rate=2e-2", "tracking.probe_size=2",
                     "tracking.probe_max_new_tokens=4", "tracking.backends=[none]"]) == 0
    return tmp / "run"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished run of the tiny random model (fp32)."""
    return train_tiny(tmp_path_factory.mktemp("export-run"), tiny_model_dir)
