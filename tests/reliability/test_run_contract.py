"""The run-directory contract, checked by content on the reliability baseline run (already trained for the
resume tests, so this costs no training): what later verbs read is there and holds what it should.

tests/e2e/test_demo.py checks the same contract on the real demo run (slow).
"""

import shutil

import pytest

from ..conftest import check_run_directory


def test_run_directory_holds_what_later_verbs_read(baseline, tiny_model_dir):
    check_run_directory(baseline, tiny_model_dir)


def test_the_contract_check_fails_on_a_wrong_adapter_shape(baseline, tiny_model_dir, tmp_path):
    """The check itself can fail: an adapter whose rank is not run_config.yaml's lora.r is caught."""
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(baseline, run, ignore=shutil.ignore_patterns("checkpoints"))
    adapter = run / "adapter" / "adapter_model.safetensors"
    save_file({k: v[:-1] if ".lora_A." in k else v for k, v in load_file(adapter).items()}, adapter)
    with pytest.raises(AssertionError, match="lora_A"):
        check_run_directory(run, tiny_model_dir)
