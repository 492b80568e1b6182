"""Two CPU processes (gloo) under torchrun train the demo config on the tiny model.

One run directory, one adapter, one loss curve written once, the same LoRA weights on every rank after
every step, and the same losses and weights as one process with twice the per-device batch.
"""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from chattune import cli
from tests.distributed.launch import PER_DEVICE, ROOT, STEPS, TRAIN_ROWS, overrides, rows, torchrun

pytestmark = pytest.mark.slow  # every test here uses the two-process torchrun run (tests/distributed/conftest.py)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir):
    """The same training in one process with the doubled per-device batch."""
    tmp = tmp_path_factory.mktemp("single")
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATTUNE_CACHE", str(tmp / "cache"))
        mp.chdir(ROOT)
        assert cli.main(["train", "configs/demo.yaml", *overrides(tiny_model_dir, out, 2 * PER_DEVICE)]) == 0
    return out


def test_one_run_directory_with_one_adapter(ddp):
    assert [p.name for p in (ddp.tmp / "runs").iterdir()] == ["ddp"]
    files = {p.relative_to(ddp.run).as_posix() for p in ddp.run.rglob("*") if p.is_file()}
    for required in ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "run_config.yaml",
                     "chat_template.jinja", "tokenizer/tokenizer.json", "metrics.jsonl", "predictions/epoch_0.jsonl",
                     "data_report.json", "model_info.json", "summary.json"]:
        assert required in files, required
    assert [f for f in files if f.endswith("adapter_model.safetensors") and not f.startswith("checkpoints/")] == \
        ["adapter/adapter_model.safetensors"]
    assert not [f for f in files if ".tmp" in f or ".staging" in f]
    probes = (ddp.run / "predictions" / "epoch_0.jsonl").read_text().splitlines()
    assert len(probes) == 2  # written once, by the main process


def test_loss_curve_is_written_once_and_the_data_is_sharded(ddp):
    r = rows(ddp.run)
    assert [x["step"] for x in r] == list(range(1, STEPS + 1))  # no line twice
    assert all(math.isfinite(x["loss"]) and x["loss"] > 0 and x["tokens_per_s"] > 0 for x in r)
    # 2 processes x 4 samples: an epoch of 98 rows takes 13 optimizer steps, not 25.
    steps_per_epoch = math.ceil(TRAIN_ROWS / (2 * PER_DEVICE))
    assert r[-1]["epoch"] == pytest.approx(STEPS / steps_per_epoch, abs=1e-4)
    summary = json.loads((ddp.run / "summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["final_loss"] == r[-1]["loss"]


def test_every_rank_holds_the_same_lora_weights_after_every_step(ddp):
    hashes = {}
    for step in range(1, STEPS + 1):
        a, b = ((ddp.dump / f"rank{r}_step{step}.txt").read_text() for r in (0, 1))
        assert a == b, f"ranks differ after step {step}"
        hashes[step] = a
    assert len(set(hashes.values())) == STEPS  # and the weights did move every step


def test_log_states_processes_and_global_batch_once(ddp):
    assert ("distributed: 2 processes (DDP, gloo); global batch 8 samples = 4 per device x 1 grad_accum x "
            "2 processes") in ddp.log
    assert ddp.log.count("model: ") == 1 and ddp.log.count("data: ") >= 1
    assert ddp.log.count("run directory: ") == 1  # the other rank's log is kept to warnings


def test_checkpoints_hold_every_ranks_state(ddp):
    for step in (2, 4):
        ckpt = ddp.run / "checkpoints" / f"checkpoint-{step}"
        names = {p.name for p in ckpt.iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "chattune_checkpoint.json", "adapter_model.safetensors",
                "optimizer.pt"} <= names


def test_same_loss_and_weights_as_one_process_with_double_batch(ddp, single):
    # Padding-free batches, a loss over supervised tokens only, and average_tokens_across_devices (each process
    # divides its token-loss sum by the token count of all processes): 2 x 4 samples is 1 x 8 samples.
    two, one = rows(ddp.run), rows(single)
    assert [x["step"] for x in one] == [x["step"] for x in two]
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3), (a, b)
    wa = load_file(ddp.run / "adapter" / "adapter_model.safetensors")
    wb = load_file(single / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_resume_continues_the_curve_where_the_checkpoint_left_it(ddp, tiny_model_dir):
    run = ddp.tmp / "runs_resume" / "ddp"
    shutil.copytree(ddp.run, run)
    # An unfinished run killed after its step-2 checkpoint (rows after it are cut back by the resume).
    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    (run / "summary.json").unlink()
    env = {k: v for k, v in ddp.env.items() if k != "CHATTUNE_TEST_DUMP"}
    proc = torchrun(2, ["train", "configs/demo.yaml", *overrides(tiny_model_dir, run, PER_DEVICE)], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resume: continuing from" in proc.stderr
    resumed, original = rows(run), rows(ddp.run)
    assert [x["step"] for x in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, original):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    wa = load_file(run / "adapter" / "adapter_model.safetensors")
    wb = load_file(ddp.run / "adapter" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
