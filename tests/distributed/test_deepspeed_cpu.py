"""DeepSpeed ZeRO-2 / ZeRO-3 on two CPU processes (gloo): the same training as DDP.

Same losses and adapter as the DDP run (the ZeRO-3 adapter gathered from the shards), probe answers
generated with sharded weights, complete checkpoints, and a resume that continues the same curve.
"""

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed.launch import PER_DEVICE, STEPS, overrides, rows, torchrun

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"),
]


def train(mode, run, tiny_model_dir, env):
    env = {**env, "CHATTUNE_TEST_LOAD_REPORT": str(run.parent)}  # tests/distributed/worker.py: params after load
    proc = torchrun(2, ["train", "configs/demo.yaml",
                        *overrides(tiny_model_dir, run, PER_DEVICE, f"train.distributed={mode}")], env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stderr


def assert_same_adapter(a, b, sub="adapter"):
    wa, wb = load_file(a / sub / "adapter_model.safetensors"), load_file(b / sub / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].shape == wb[k].shape and wa[k].numel() > 0, k  # gathered, not one process's empty shard
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def env(ddp):
    return {k: v for k, v in ddp.env.items() if k != "CHATTUNE_TEST_DUMP"}


@pytest.fixture(scope="module")
def zero3(tmp_path_factory, tiny_model_dir, env):
    run = tmp_path_factory.mktemp("zero3") / "run"
    return run, train("deepspeed_zero3", run, tiny_model_dir, env)


@pytest.mark.parametrize("mode", ["deepspeed_zero2", "deepspeed_zero3"])
def test_zero_trains_like_ddp(mode, ddp, zero3, tiny_model_dir, env, tmp_path):
    if mode == "deepspeed_zero3":
        run, log = zero3
    else:
        run = tmp_path / "run"
        log = train(mode, run, tiny_model_dir, env)
    assert f"distributed: 2 processes (deepspeed ZeRO-{mode[-1]}, gloo); global batch 8 samples" in log
    got, want = rows(run), rows(ddp.run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
    assert_same_adapter(run, ddp.run)
    # Probes: with ZeRO-3 every process generates (the weights are split), the main process writes.
    base = [json.loads(line) for line in (run / "predictions" / "epoch_0.jsonl").read_text().splitlines()]
    assert base == [json.loads(line) for line in (ddp.run / "predictions" / "epoch_0.jsonl").read_text().splitlines()]
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        assert (ckpt / "chattune_checkpoint.json").is_file() and (ckpt / f"global_step{step}").is_dir()
        # the checkpoint's adapter (ZeRO-3: gathered from the trainable parameters alone) is DDP's
        assert_same_adapter(run, ddp.run, f"checkpoints/checkpoint-{step}")


def test_zero3_loads_the_model_sharded(zero3):
    """The model is loaded under zero.Init: right after loading each process holds only its shard of every
    base weight (a zero-size placeholder locally), not the whole model."""
    run, _ = zero3
    for rank in (0, 1):
        report = json.loads((run.parent / f"load_rank{rank}.json").read_text())
        assert report["zero3_enabled"] and report["base_params"] > 0
        assert report["partitioned"] == report["base_params"], report
        assert report["local_numel"] == 0 and report["full_numel"] > 1_000_000, report


def test_zero3_resumes_from_its_checkpoint(ddp, zero3, tiny_model_dir, env):
    first, _ = zero3
    run = first.parent / "resumed"
    shutil.copytree(first, run)
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    log = train("deepspeed_zero3", run, tiny_model_dir, env)
    assert "resume: continuing from" in log
    got = rows(run)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, rows(first)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert_same_adapter(run, first)
