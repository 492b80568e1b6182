"""benchmarks/peers.py without running a peer: the three configs say the same, and the table's ratios and checks are right."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from chattune.config.loading import validate

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    """The benchmark's modules, imported as the script imports them (benchmarks/ first on sys.path)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        mods = {name: importlib.import_module(name) for name in ("peer_configs", "peer_table", "peer_sides", "peers")}
        yield type("Bench", (), mods)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        for name in ("peer_configs", "peer_table", "peer_sides", "peers", "common", "gpu_throughput"):
            sys.modules.pop(name, None)


def settings(bench, task: str, rows: int = 300, device: str = "cpu"):
    return bench.peer_configs.settings_for(bench.peer_configs.TASKS[task], "/models/smollm2", Path("/data/rows.json"), rows,
                                           device=device)


def test_the_roleplay_settings_are_the_recipes(bench):
    s = settings(bench, "roleplay")
    assert (s.r, s.alpha, s.dropout, s.learning_rate, s.batch, s.grad_accum, s.max_length) == (8, 32, 0.1, 1e-4, 4, 4, 384)
    assert s.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert s.epochs == 1 and s.gradient_checkpointing is True and s.scheduler == "cosine"
    assert s.steps == 19  # 300 rows in batches of 4 (75), 4 per step: the last step takes the 3 left


def test_the_persona_settings_are_the_demos(bench):
    s = settings(bench, "persona", rows=100)
    assert (s.r, s.alpha, s.dropout, s.targets, s.learning_rate, s.warmup_ratio) == (16, 32, 0.05, "all-linear", 1e-3, 0.05)
    assert (s.epochs, s.batch, s.grad_accum, s.gradient_checkpointing, s.max_length) == (3, 8, 1, False, 256)
    assert s.steps == 39


@pytest.mark.parametrize("task", ["roleplay", "persona"])
def test_the_three_configs_agree_on_the_shared_settings(bench, task, tmp_path):
    s = settings(bench, task)
    pc = bench.peer_configs
    ours = validate(pc.side_spec("chattune", s, "bf16", tmp_path)["config"])  # what `chattune train` would accept
    lf = pc.side_spec("llamafactory", s, "bf16", tmp_path)["config"]
    trl = pc.side_spec("trl", s, "bf16", tmp_path)["config"]
    sft, lora = trl["sft"], trl["lora"]
    assert ours.model.name_or_path == lf["model_name_or_path"] == trl["model_dir"] == s.model_dir
    assert ours.data.train == [s.data] and trl["data"] == s.data
    assert json.loads((tmp_path / "lf-data" / "dataset_info.json").read_text())["peers"]["file_name"] == s.data
    assert ours.lora.r == lf["lora_rank"] == lora["r"] == s.r
    assert ours.lora.alpha == lf["lora_alpha"] == lora["lora_alpha"] == s.alpha
    assert ours.lora.dropout == lf["lora_dropout"] == lora["lora_dropout"] == s.dropout
    lf_targets = "all-linear" if lf["lora_target"] == "all" else lf["lora_target"].split(",")
    assert ours.lora.target_modules == lf_targets == lora["target_modules"] == s.targets
    assert ours.train.learning_rate == lf["learning_rate"] == sft["learning_rate"] == s.learning_rate
    assert ours.train.lr_scheduler == lf["lr_scheduler_type"] == sft["lr_scheduler_type"] == s.scheduler
    assert ours.train.warmup_ratio == lf["warmup_steps"] == sft["warmup_steps"] == s.warmup_ratio
    assert ours.train.batch_size == lf["per_device_train_batch_size"] == sft["per_device_train_batch_size"] == s.batch
    assert ours.train.grad_accum == lf["gradient_accumulation_steps"] == sft["gradient_accumulation_steps"] == s.grad_accum
    assert ours.train.epochs == lf["num_train_epochs"] == sft["num_train_epochs"] == s.epochs
    assert ours.train.gradient_checkpointing == (not lf["disable_gradient_checkpointing"]) == sft["gradient_checkpointing"]
    assert ours.train.seed == lf["seed"] == sft["seed"] == s.seed
    assert ours.data.max_length == lf["cutoff_len"] == sft["max_length"] == s.max_length
    assert ours.model.dtype == "bf16" and lf["bf16"] is True and sft["bf16"] is True
    assert sft["model_init_kwargs"] == {"dtype": "bfloat16"}
    assert lf["use_cpu"] is True and sft["use_cpu"] is True
    # The answers only: LLaMA-Factory by default (train_on_prompt off), TRL on prompt-completion rows.
    assert lf.get("train_on_prompt", False) is False and sft["completion_only_loss"] is True
    assert ours.tracking.probe_size == 0 and ours.tracking.backends == ["none"]  # the peers run no probes either


def test_fp32_and_gpu_configs(bench, tmp_path):
    cpu, gpu = settings(bench, "persona"), settings(bench, "persona", device="cuda")
    assert bench.peer_configs.side_spec("trl", cpu, "fp32", tmp_path)["config"]["sft"]["model_init_kwargs"] == {"dtype": "float32"}
    assert bench.peer_configs.side_spec("llamafactory", cpu, "fp32", tmp_path)["config"]["bf16"] is False
    assert "use_cpu" not in bench.peer_configs.side_spec("llamafactory", gpu, "bf16", tmp_path)["config"]
    assert bench.peer_configs.side_spec("trl", gpu, "bf16", tmp_path)["config"]["sft"]["use_cpu"] is False


def test_the_persona_rows_are_written_as_chattune_reads_them(bench, tmp_path):
    out = tmp_path / "rows.json"
    n = bench.peer_configs.write_conversations(bench.peer_configs.TASKS["persona"], 5, out)
    rows = json.loads(out.read_text(encoding="utf-8"))
    assert n == len(rows) == 5
    assert [m["role"] for m in rows[0]["messages"]] == ["system", "user", "assistant"]
    assert rows[0]["messages"][0]["content"] == "You are a helpful assistant."  # configs/demo.yaml's system prompt
    assert rows[0]["messages"][1]["content"] == "Who are you?"


def result(side, dtype, tps, loss, *, real=1000, supervised=400, steps=19, rows=100, weights=None, autocast=None):
    """A child's result as peer_sides.py writes it; tokens/s = real / train_s (one epoch)."""
    return {"side": side, "dtype": dtype, "real_tokens": real, "supervised_tokens": supervised, "rows": rows, "steps": steps,
            "train_s": real / tps, "wall_s": 75.0, "peak_rss": 3 * 2**30, "train_loss": loss, "losses": [loss + 0.5, loss],
            "weights_dtype": weights or {"bf16": "bfloat16", "fp32": "float32"}[dtype],
            "autocast_bf16": dtype == "bf16" if autocast is None else autocast}


def test_ratios_are_chattunes_speed_over_the_peers(bench):
    rs = [result("chattune", "bf16", 200.0, 3.0), result("llamafactory", "bf16", 100.0, 3.02),
          result("chattune", "fp32", 150.0, 3.01), result("trl", "fp32", 50.0, 3.0)]
    t = bench.peer_table
    assert t.speedups(rs[1], rs, 1) == "2.00× (bf16)"
    assert t.speedups(rs[3], rs, 1) == "4.00× (bf16), 3.00× at fp32"
    assert t.speedups(rs[0], rs, 1) == "—"
    rows = t.table(rs, 1)
    assert len(rows) == 2 + 4 and "| llamafactory | bf16 | 19 | 100.0 | 10.0 s | 1:15.0 | 3.00 GiB | 3.0200 / 3.0200 | 2.00× (bf16) |" in rows


def test_the_loss_check_passes_close_losses_and_names_the_differences_of_a_far_one(bench):
    t = bench.peer_table
    close = [result("chattune", "bf16", 200.0, 3.0), result("trl", "bf16", 100.0, 3.1)]
    assert t.loss_check(close) == []
    assert any("within 5%" in line for line in t.footnotes(close))
    far = [result("chattune", "bf16", 200.0, 3.0), result("trl", "bf16", 100.0, 3.3, steps=20, supervised=500)]
    (line,) = t.loss_check(far)
    assert line.startswith("trl bf16: mean loss 3.3000 is +10.0% off chattune bf16's 3.0000")
    assert "20 optimizer steps vs 19" in line and "500 answer tokens (label masking) vs 400" in line
    unexplained = [result("chattune", "bf16", 200.0, 3.0), result("trl", "bf16", 100.0, 2.5)]
    assert "no difference in dtype, steps or tokens explains it" in t.loss_check(unexplained)[0]


def test_the_token_check_explains_one_newline_more_per_row(bench):
    t = bench.peer_table
    rs = [result("chattune", "bf16", 200.0, 3.0), result("llamafactory", "bf16", 100.0, 3.0, real=1100, supervised=500)]
    lines = t.token_check(rs)
    assert lines[0] == ("tokens: llamafactory bf16: 1100 tokens (template or truncation) vs 1000 (+1 per row); "
                        "500 answer tokens (label masking) vs 400 (+1 per row)")
    assert "newline" in lines[1]
    same = [result("chattune", "bf16", 200.0, 3.0), result("trl", "bf16", 100.0, 3.0, real=1005)]
    assert t.token_check(same) == []


def test_dtype_cells_say_what_was_observed(bench):
    t = bench.peer_table
    assert t.dtype_cell(result("llamafactory", "fp32", 1.0, 3.0, weights="bfloat16", autocast=False)) == "bf16 weights, no autocast"
    assert t.dtype_cell(result("trl", "bf16", 1.0, 3.0)) == "bf16"
    assert t.dtype_cell(result("trl", "fp32", 1.0, 3.0)) == "fp32"
    assert t.dtype_cell(result("trl", "bf16", 1.0, 3.0, weights="float32")) == "fp32 + bf16 autocast"


def test_token_counts_read_labels_or_a_completion_mask(bench):
    count = bench.peer_sides.count_tokens
    labelled = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]}, {"input_ids": [1, 2], "labels": [-100, 2]}]
    assert count(labelled, 4) == {"rows": 2, "real_tokens": 6, "supervised_tokens": 3}  # cut at max_length 4
    masked = [{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1]}]
    assert count(masked, 8) == {"rows": 1, "real_tokens": 3, "supervised_tokens": 2}


def test_gpu_refuses_without_a_cuda_device(bench, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["peers.py", "--gpu"])
    assert bench.peers.main() == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "leave out --gpu" in err


def test_roleplay_skips_cleanly_without_the_shared_data(bench, monkeypatch, capsys, tmp_path):
    from dataclasses import replace

    tasks = dict(bench.peers.TASKS, roleplay=replace(bench.peers.TASKS["roleplay"], data=tmp_path / "absent" / "huanhuan.json"))
    monkeypatch.setattr(bench.peers, "TASKS", tasks)
    monkeypatch.setattr(sys, "argv", ["peers.py", "--task", "roleplay", "--workdir", str(tmp_path / "work")])
    assert bench.peers.main() == 0
    assert "skipped" in capsys.readouterr().out
    assert not (tmp_path / "work").exists()  # nothing was set up or run
