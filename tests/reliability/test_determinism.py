"""Same config and seed, same run: the loss curve and the adapter repeat exactly on CPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from chattune import cli

from .conftest import train_argv, train_rows, write_config


# A second 8-step training run (48 s measured in the fast suite on a shared 2-core CPU at load 10, about
# 14 s alone): slow. The baseline it compares with is trained anyway for the resume tests.
@pytest.mark.slow
def test_same_config_and_seed_give_the_same_curve_and_adapter(tmp_path, tiny_model_dir, baseline):
    assert cli.main(train_argv(write_config(tmp_path, tiny_model_dir), tmp_path / "again")) == 0
    rows, ref = train_rows(tmp_path / "again"), train_rows(baseline)
    assert len(rows) == len(ref) > 1
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [r[key] for r in rows] == [r[key] for r in ref], key
    a = load_file(tmp_path / "again" / "adapter" / "adapter_model.safetensors")
    b = load_file(baseline / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    # The probes are greedy answers of the same weights, so they repeat too.
    assert (tmp_path / "again" / "predictions" / "epoch_2.jsonl").read_text() == \
        (baseline / "predictions" / "epoch_2.jsonl").read_text()
