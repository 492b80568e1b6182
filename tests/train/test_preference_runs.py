"""Preference runs as SFT runs: resume continues bit for bit; SFT -> DPO starts from the SFT run's adapter."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from chattune import cli
from chattune.config import load
from chattune.verbs.train import load_lora_model

from ..conftest import train_tiny_run
from .test_preference import PAIRS


def _argv(tmp_path, model_dir, out, *extra):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\ndata:\n  train: {PAIRS}\n")
    return ["train", str(cfg), f"output_dir={out}", "train.method=dpo", "train.max_steps=4", "train.save_steps=2",
            "train.batch_size=2", "train.grad_accum=1", "train.learning_rate=5e-3", "tracking.probe_size=0",
            "tracking.backends=[none]", *extra]


def _rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


@pytest.mark.slow
def test_dpo_resume_gives_the_same_curve_and_adapter(tmp_path, tiny_model_dir):
    baseline = tmp_path / "baseline"
    assert cli.main(_argv(tmp_path, tiny_model_dir, baseline)) == 0
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    for gone in ("summary.json", "adapter", "checkpoints/checkpoint-4"):  # as if killed after step 2's checkpoint
        shutil.rmtree(run / gone) if (run / gone).is_dir() else (run / gone).unlink()
    assert cli.main(_argv(tmp_path, tiny_model_dir, run, "--resume")) == 0
    rows, ref = _rows(run), _rows(baseline)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "grad_norm"):
        assert [r[key] for r in rows] == [r[key] for r in ref], key
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(baseline / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("sft"), tiny_model_dir)


def test_model_adapter_starts_from_the_sft_runs_weights_trainable(sft_run, tiny_model_dir, tmp_path):
    cfg = load(None, [f"model.name_or_path={tiny_model_dir}", "model.dtype=fp32", f"data.train={PAIRS}",
                      "train.method=dpo", f"model.adapter={sft_run}"])
    model = load_lora_model(cfg, tiny_model_dir, torch.float32)
    saved = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert saved and set(saved) == set(params)
    assert all(torch.equal(saved[k], params[k].detach()) for k in saved), "the SFT adapter, not fresh weights"
    assert all(p.requires_grad for p in params.values())
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k), "SFT moved B away from its zero start"


def test_model_adapter_that_is_not_there_fails_before_loading(tmp_path, tiny_model_dir):
    from chattune.errors import ConfigError

    from chattune.verbs.train import run

    argv = _argv(tmp_path, tiny_model_dir, tmp_path / "run", f"model.adapter={tmp_path / 'nope'}")
    with pytest.raises(ConfigError) as info:
        run(load(argv[1], argv[2:]))
    assert info.value.where == "model.adapter"
    assert not (tmp_path / "run").exists(), "nothing written"


@pytest.mark.slow
def test_sft_then_dpo_end_to_end(sft_run, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "dpo"
    assert cli.main(_argv(tmp_path, tiny_model_dir, run, f"model.adapter={sft_run}")) == 0
    rows = _rows(run)
    assert len(rows) == 4 and all("rewards/margins" in r for r in rows)
    assert cli.main(["chat", str(run), "--prompt", "What is 2+2?", "--max-new-tokens", "4"]) == 0
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(sft_run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), "DPO changed the SFT adapter"


def test_data_check_shows_both_sides(tmp_path, tiny_model_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train: {PAIRS}\ntrain:\n  method: dpo\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    assert cli.main(["data", "check", str(cfg), "--preview", "1"]) == 0
    out = capsys.readouterr().out
    assert "What is 2+2?" in out and "4.<|im_end|>" in out and "5.<|im_end|>" in out
    assert "24 samples" in out
