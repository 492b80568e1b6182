"""MFU's ingredients: the GPU's peak by name, and the FLOPs per token on the 4N basis (issue 17, items 2 and 11)."""

from __future__ import annotations

import pytest
import torch

from chattune.config import ModelConfig
from chattune.model.load import load_model
from chattune.train.throughput import lora_flops_per_token, lora_step_flops, peak_flops


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
    # Per token with every position supervised, the step and the old per-token rule agree.
    assert lora_step_flops(model, tokens=10, supervised=10) == 10 * lora_flops_per_token(model)


def test_4bit_weights_count_unpacked(tiny_model_dir):
    pytest.importorskip("bitsandbytes")  # the qlora extra (bitsandbytes 0.50 runs on CPU)
    full = load_model(tiny_model_dir, ModelConfig(), dtype=torch.float32)
    q4 = load_model(tiny_model_dir, ModelConfig(quantization="4bit"), dtype=torch.float32, device_map={"": "cpu"})
    assert any(type(p).__name__ == "Params4bit" for p in q4.parameters())  # the model really is packed
    assert lora_flops_per_token(q4) == lora_flops_per_token(full)
    assert lora_step_flops(q4, 100, 40) == lora_step_flops(full, 100, 40)
