"""Two tiny trained runs on the same random base (different system prompts, seeds and so adapters), shared by the
serve tests; each test module makes its own engines from them."""

from pathlib import Path

import pytest

from ..conftest import TINY_RUN_SYSTEM, train_tiny_run

SYSTEM_B = "You are a pirate. Answer like one."


@pytest.fixture(scope="session")
def run_a(tmp_path_factory, tiny_model_dir) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("serve-a"), tiny_model_dir)


@pytest.fixture(scope="session")
def run_b(tmp_path_factory, tiny_model_dir) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("serve-b"), tiny_model_dir, system=SYSTEM_B,
                          overrides=("train.seed=7", "train.learning_rate=2e-2"))


__all__ = ["SYSTEM_B", "TINY_RUN_SYSTEM"]
