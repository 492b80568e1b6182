"""LoRA application: config conversion, shared dropout masks, and teaching errors for wrong target names."""

import pytest
import torch

from chattune.config import LoraConfig
from chattune.errors import ConfigError
from chattune.model.lora import SharedDropout, apply_lora, to_lora_config


def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_to_lora_config():
    c = to_lora_config(LoraConfig(r=64, alpha=16, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert (c.r, c.lora_alpha, c.lora_dropout, set(c.target_modules)) == (64, 16, 0.1, {"q_proj", "v_proj"})
    assert c.task_type == "CAUSAL_LM"


def capture_lora_inputs(model, x_ids):
    seen = {}

    def keep(name):
        def hook(mod, inp, out):
            seen.setdefault(name, inp[0].clone())  # returns None: a hook's return value would replace the output
        return hook

    hooks = [m.lora_A["default"].register_forward_hook(keep(n))
             for n, m in model.named_modules() if hasattr(m, "lora_A") and "layers.0." in n]
    model(input_ids=x_ids)
    for h in hooks:
        h.remove()
    return {k.rsplit(".", 1)[-1]: v for k, v in seen.items()}


def test_qkv_adapters_share_one_mask_and_o_does_not(tiny_model_dir):
    model = apply_lora(tiny(tiny_model_dir), LoraConfig(r=4, dropout=0.5), gradient_checkpointing=False)
    model.train()
    torch.manual_seed(0)
    seen = capture_lora_inputs(model, torch.randint(10, 1000, (1, 16)))
    assert torch.equal(seen["q_proj"], seen["k_proj"]) and torch.equal(seen["q_proj"], seen["v_proj"])
    assert torch.equal(seen["gate_proj"], seen["up_proj"])
    zeros = (seen["q_proj"] == 0).float().mean().item()
    assert 0.35 < zeros < 0.65, "half of the inputs dropped with p=0.5"
    assert seen["o_proj"].shape != seen["q_proj"].shape or not torch.equal(seen["o_proj"], seen["q_proj"])


def test_eval_mode_drops_nothing(tiny_model_dir):
    model = apply_lora(tiny(tiny_model_dir), LoraConfig(r=4, dropout=0.5), gradient_checkpointing=False)
    model.eval()
    seen = capture_lora_inputs(model, torch.randint(10, 1000, (1, 16)))
    assert (seen["q_proj"] != 0).all()


def test_independent_masks_when_asked(tiny_model_dir):
    model = apply_lora(tiny(tiny_model_dir), LoraConfig(r=4, dropout=0.5, shared_dropout=False), gradient_checkpointing=False)
    assert not any(isinstance(m, SharedDropout) for m in model.modules())
    model.train()
    seen = capture_lora_inputs(model, torch.randint(10, 1000, (1, 16)))
    assert not torch.equal(seen["q_proj"], seen["k_proj"])


def test_wrong_target_names_list_the_real_ones(tiny_model_dir):
    with pytest.raises(ConfigError) as info:
        apply_lora(tiny(tiny_model_dir), LoraConfig(target_modules=["c_attn", "w1"]), gradient_checkpointing=False)
    assert info.value.where == "lora.target_modules" and "q_proj" in info.value.fix
