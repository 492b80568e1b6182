"""A tiny trained run shared by the export tests (trains in seconds); a run of their own, so nothing they write leaks into other packages' tests."""

from pathlib import Path

import pytest

from ..conftest import TINY_RUN_SYSTEM as SYSTEM, train_tiny_run

__all__ = ["SYSTEM"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished run of the tiny random model (fp32)."""
    return train_tiny_run(tmp_path_factory.mktemp("export-run"), tiny_model_dir)
