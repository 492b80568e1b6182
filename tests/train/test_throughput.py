"""MFU's ingredients: the GPU's peak by name, the FLOPs of a step on the 4N basis (issue 17, items 2 and 11),
and the progress callback's MFU from the tokens and supervised positions it counted."""

from __future__ import annotations

import pytest
import torch

from chattune.config import ModelConfig
from chattune.model.load import load_model
from chattune.data.render import IGNORE
from chattune.train import callbacks
from chattune.train.callbacks import ProgressAndMetrics, TokenCounter
from chattune.train.throughput import lora_step_flops, peak_flops, step_flops_counter


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),  # SXM
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA H800 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("Tesla T4", 65e12),
    ("Tesla V100-SXM2-32GB", 125e12),
])
def test_peak_by_device_name(name, peak):
    assert peak_flops(name) == peak


def test_unknown_gpu_has_no_peak():
    assert peak_flops("Some Future GPU") is None


def _tiny(tie: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_step_flops_charge_the_head_for_supervised_positions_only(tie):
    model = _tiny(tie)
    n = sum(p.numel() for p in model.parameters())
    table = 100 * 32  # the embedding table, and the head's weights (the same tensor when tied)
    body = n - table - (0 if tie else table)
    assert lora_step_flops(model, tokens=1000, supervised=300) == 4.0 * (body * 1000 + table * 300)
    # Every position supervised: the 4N rule of every weight that takes part in the forward pass.
    assert lora_step_flops(model, tokens=10, supervised=10) == 10 * 4.0 * (n - (0 if tie else table))
    assert step_flops_counter(model)(1000, 300) == lora_step_flops(model, 1000, 300)


def test_4bit_weights_count_unpacked(tiny_model_dir):
    pytest.importorskip("bitsandbytes")  # the qlora extra (bitsandbytes 0.50 runs on CPU)
    full = load_model(tiny_model_dir, ModelConfig(), dtype=torch.float32)
    q4 = load_model(tiny_model_dir, ModelConfig(quantization="4bit"), dtype=torch.float32, device_map={"": "cpu"})
    assert any(type(p).__name__ == "Params4bit" for p in q4.parameters())  # the model really is packed
    assert lora_step_flops(q4, 100, 40) == lora_step_flops(full, 100, 40)


def test_the_counter_counts_the_positions_whose_logits_the_loss_computes():
    counter = TokenCounter()
    # One packed row of two samples (padding-free): each sample's first label is IGNORE, so the position before
    # it predicts nothing; the loss keeps position t when labels[t + 1] is supervised (train/loss.py).
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE, IGNORE, 7]])
    counter.add({"input_ids": torch.zeros(1, 7, dtype=torch.long), "labels": labels})
    padded = torch.tensor([[IGNORE, 3, 4, IGNORE], [IGNORE, 8, IGNORE, IGNORE]])
    counter.add({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": padded,
                 "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])})
    assert (counter.tokens, counter.supervised) == (7 + 5, 3 + 3)


def test_mfu_charges_the_head_for_the_supervised_positions_of_the_logged_steps(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(callbacks, "gpu_stats", lambda flops_per_s: seen.append(flops_per_s) or {})
    counter = TokenCounter()
    cb = ProgressAndMetrics(tmp_path / "metrics.jsonl", counter, step_flops=lambda t, s: 10.0 * t + 1000.0 * s)
    state = type("State", (), {"is_world_process_zero": False, "global_step": 1, "epoch": 0.5, "max_steps": 2})()
    counter.add({"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.tensor([[IGNORE, IGNORE, 1, 2]])})
    cb.on_train_begin(None, state, None)  # what was counted before training (e.g. a probe pass) is not this step's
    counter.add({"input_ids": torch.zeros(1, 6, dtype=torch.long), "labels": torch.tensor([[IGNORE, 1, 2, 3, IGNORE, 4]])})
    cb._train_time = 2.0
    cb.on_log(None, state, None, logs={"loss": 1.0, "learning_rate": 1e-4})
    assert seen == [(10.0 * 6 + 1000.0 * 4) / 2.0]
