"""A two-run sweep of the tiny model, shared by the sweep and report tests (trains in seconds, in-process)."""

from pathlib import Path

import pytest

from chattune import cli

FIX = Path(__file__).parents[1] / "fixtures" / "data"


def write_config(folder: Path, model_dir: Path, **extra: str) -> Path:
    """A config for the tiny model on the alpaca fixture: 2 eval rows (also the probes), no trackers."""
    lines = [f"model:\n  name_or_path: {model_dir}\n  dtype: fp32",
             f"data:\n  train: {FIX / 'alpaca.json'}\n  eval_size: 2",
             "train:\n  max_steps: 2\n  batch_size: 2\n  grad_accum: 1\n  learning_rate: 1.0e-2\n  eval_steps: 1",
             "tracking:\n  backends: [none]\n  probe_size: 2\n  probe_max_new_tokens: 4",
             f"output_dir: {folder / 'sweep'}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path = folder / "sweep.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    """Rich wraps at 80 columns when output is captured; long lines stay whole for the assertions."""
    monkeypatch.setenv("COLUMNS", "250")


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """`chattune sweep` over lora.r=4,8 with train.max_steps=2: two finished runs and the comparison files."""
    tmp = tmp_path_factory.mktemp("sweep")
    cfg = write_config(tmp, tiny_model_dir)
    assert cli.main(["sweep", str(cfg), "--grid", "lora.r=4,8", "train.max_steps=2", "--in-process"]) == 0
    return tmp / "sweep"
