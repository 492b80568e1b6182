"""Each lora.variant trains the tiny model, saves an adapter that chat loads, and merges with the logit check."""

import json

import pytest

from chattune import cli

from ..conftest import train_tiny_run_with


@pytest.mark.parametrize("variant", [
    pytest.param("pissa", marks=pytest.mark.slow),  # 10-25 s each on 2 cores; tests/model/test_lora_variants.py is the fast check
    pytest.param("dora", marks=pytest.mark.slow),
    pytest.param("rslora", marks=pytest.mark.slow),
    pytest.param("loraplus", marks=pytest.mark.slow),
    pytest.param("lora", marks=pytest.mark.slow),
])
def test_variant_trains_chats_and_merges(variant, tiny_model_dir, tmp_path, capsys):
    run = train_tiny_run_with(tmp_path, tiny_model_dir, f"lora.variant={variant}", "lora.r=4")
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["use_dora"] is (variant == "dora") and adapter["use_rslora"] is (variant == "rslora")
    assert adapter["r"] == (8 if variant == "pissa" else 4), "PiSSA is written as a rank-2r LoRA of the original base"
    assert adapter["init_lora_weights"] is True, "chat, eval and merge load it onto the untouched base"
    assert cli.main(["chat", str(run), "--prompt", "Hello there", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    out = tmp_path / "merged"
    assert cli.main(["merge", str(run), "--out", str(out), "--dtype", "fp32"]) == 0
    check = json.loads((out / "chattune.json").read_text())["check"]
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]
    assert check["adapter_effect"] > check["tolerance"], "the adapter really changes the logits the check compares"
