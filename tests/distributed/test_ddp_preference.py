"""DPO with `chattune train --nproc 2` (torchrun, gloo on CPU) on the tiny model, as a user starts it.

The same kind of run directory and adapter as a one-process DPO run, a curve written once with the
reward columns, and the same losses and weights as one process with twice the per-device batch.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune import cli
from tests.distributed.launch import ROOT
from tests.train.test_preference import PAIRS

pytestmark = pytest.mark.slow  # spawns torchrun and two processes that import torch

STEPS = 2
PER_DEVICE = 2  # pairs per process per step


def _config(tmp: Path, model_dir: Path) -> Path:
    cfg = tmp / "dpo.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\ndata:\n  train: {PAIRS}\n"
                   "train:\n  method: dpo\n  beta: 0.1\n")
    return cfg


def _overrides(out: Path, batch_size: int) -> list[str]:
    return [f"output_dir={out}", f"train.max_steps={STEPS}", f"train.batch_size={batch_size}", "train.grad_accum=1",
            "train.logging_steps=1", "train.save_steps=1000", "train.learning_rate=5e-3",
            # each process draws its own dropout masks: without dropout 2 x 2 and 1 x 4 pairs are the same math
            "lora.dropout=0", "tracking.backends=[none]", "tracking.probe_size=2", "tracking.probe_max_new_tokens=4"]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ddp_dpo")
    cfg = _config(tmp, tiny_model_dir)
    src = str(ROOT / "src")
    env = {**os.environ, "CHATTUNE_CACHE": str(tmp / "cache"),
           "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    two = tmp / "two"
    proc = subprocess.run([sys.executable, "-m", "chattune.cli", "train", str(cfg), *_overrides(two, PER_DEVICE),
                           "--nproc", "2"], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one = tmp / "one"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATTUNE_CACHE", str(tmp / "cache"))
        assert cli.main(["train", str(cfg), *_overrides(one, 2 * PER_DEVICE)]) == 0
    return two, one, proc.stderr


def test_two_processes_train_dpo_and_log_the_rewards_once(runs):
    two, _, log = runs
    assert "distributed: 2 processes (DDP, gloo)" in log
    rows = _rows(two)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # no line twice
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= r.keys()
    assert json.loads((two / "summary.json").read_text())["global_step"] == STEPS
    assert len((two / "predictions" / "epoch_0.jsonl").read_text().splitlines()) == 2  # probes, main process only


def test_the_same_kind_of_adapter_as_one_process(runs):
    two, one, _ = runs
    files = {p.relative_to(two).as_posix() for p in two.rglob("*") if p.is_file()}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "run_config.yaml",
            "chat_template.jinja", "metrics.jsonl"} <= files
    assert not [f for f in files if ".tmp" in f or ".staging" in f]
    cfg_two, cfg_one = (json.loads((r / "adapter" / "adapter_config.json").read_text()) for r in (two, one))
    kind = ("r", "lora_alpha", "peft_type", "use_dora", "use_rslora")
    assert {k: cfg_two[k] for k in kind} == {k: cfg_one[k] for k in kind}
    assert sorted(cfg_two["target_modules"]) == sorted(cfg_one["target_modules"])  # peft saves a set, any order
    wa = load_file(two / "adapter" / "adapter_model.safetensors")
    wb = load_file(one / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
    assert any(wa[k].abs().sum() > 0 for k in wa if "lora_B" in k), "B moved from its zero start: it trained"


def test_same_losses_and_weights_as_one_process_with_double_batch(runs):
    # Every process scores its own pairs against its own reference; DDP averages the gradients, and each
    # process holds as many pairs: 2 x 2 pairs is 1 x 4 pairs.
    two, one, _ = runs
    for a, b in zip(_rows(two), _rows(one), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-3, abs=1e-6), (a, b)
    wa = load_file(two / "adapter" / "adapter_model.safetensors")
    wb = load_file(one / "adapter" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
