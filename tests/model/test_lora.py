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
    # The mask is what is shared, so compare where the zeros are, not the values: o_proj reads another
    # tensor, so equal values would prove nothing, but an equal zero pattern would mean q's mask was reused.
    dropped = {name: x == 0 for name, x in seen.items()}
    assert torch.equal(dropped["q_proj"], dropped["k_proj"]) and torch.equal(dropped["q_proj"], dropped["v_proj"])
    assert torch.equal(dropped["gate_proj"], dropped["up_proj"])
    assert dropped["o_proj"].shape == dropped["q_proj"].shape, "same width, so the patterns are comparable"
    assert not torch.equal(dropped["o_proj"], dropped["q_proj"]), "o_proj reads another input: its own mask"
    assert not torch.equal(dropped["gate_proj"], dropped["q_proj"]), "the MLP's input gets a mask of its own"


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


def test_bf16_model_under_autocast_draws_one_mask_per_input(tiny_model_dir):
    """bf16 base + fp32 adapters, as training runs: peft's cast must not hide the shared input."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = apply_lora(base, LoraConfig(r=4, dropout=0.5), gradient_checkpointing=False)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    model.train()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = capture_lora_inputs(model, torch.randint(10, 1000, (1, 16)))
    assert seen["q_proj"].dtype == torch.bfloat16, "no fp32 round trip before the adapter"
    assert torch.equal(seen["q_proj"], seen["k_proj"]) and torch.equal(seen["q_proj"], seen["v_proj"])
    assert torch.equal(seen["gate_proj"], seen["up_proj"])


def test_keep_mask_rate_and_rescale():
    from chattune.model.lora import keep_mask

    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1001, 257]), 0.1, torch.device("cpu"))
    assert keep.shape == (1001, 257) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.9) < 0.003
    assert scale * 0.9 == pytest.approx(1.0, abs=1e-4)
    x = torch.ones(200_000)
    out = x * keep_mask(x.shape, 0.3, x.device)[0] * keep_mask(x.shape, 0.3, x.device)[1]
    assert out.mean().item() == pytest.approx(1.0, abs=0.01), "expectation preserved"
    assert keep_mask(torch.Size([64]), 0.0, torch.device("cpu"))[0].all()
    first, second = (keep_mask(torch.Size([4096]), 0.5, torch.device("cpu"))[0] for _ in range(2))
    assert 0.4 < (first != second).float().mean().item() < 0.6, "each draw is a fresh mask, independent of the last"
    torch.manual_seed(5)
    again = keep_mask(torch.Size([4096]), 0.5, torch.device("cpu"))[0]
    torch.manual_seed(5)
    assert torch.equal(again, keep_mask(torch.Size([4096]), 0.5, torch.device("cpu"))[0]), "torch's seed fixes the mask"
    torch.manual_seed(3)
    as_bool = keep_mask(torch.Size([70, 9]), 0.1, torch.device("cpu"))[0]
    torch.manual_seed(3)
    as_bf16 = keep_mask(torch.Size([70, 9]), 0.1, torch.device("cpu"), torch.bfloat16)[0]
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, as_bool.to(torch.bfloat16)), "the same draw, as 0/1"


def test_dropout_gradient_flows_through_kept_positions_only(tiny_model_dir):
    from chattune.model.lora import SharedDropout

    drop = SharedDropout(0.5, {}).train()
    x = torch.randn(32, 16, requires_grad=True)
    torch.manual_seed(1)
    y = drop(x)
    y.sum().backward()
    kept = y != 0
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 2.0, dtype=x.grad.dtype), atol=1e-3)
    assert (x.grad[~kept] == 0).all()


def _lora_pair(tiny_model_dir, dtype):
    """The same adapters twice: peft's plain LoRA and ours (FusedScaleAdd, shared-mask dropout off for parity)."""
    from peft import get_peft_model

    from chattune.model.lora import FusedScaleAdd, to_lora_config

    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(r=4, alpha=16, dropout=0.0, shared_dropout=False)
    torch.manual_seed(0)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), to_lora_config(cfg))
    torch.manual_seed(0)
    ours = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype), cfg, gradient_checkpointing=False)
    for (name, p), (_, q) in zip(plain.named_parameters(), ours.named_parameters()):
        if "lora_B" in name:  # B starts at zero; give both the same non-zero B so the update shows
            torch.manual_seed(len(name))
            p.data.normal_(0, 0.1)
            q.data.copy_(p.data)
    assert any(isinstance(v, FusedScaleAdd) for m in ours.modules() for v in getattr(m, "lora_variant", {}).values())
    return plain, ours


def test_fused_scale_add_equals_plain_lora_in_value_and_gradients(tiny_model_dir):
    plain, ours = _lora_pair(tiny_model_dir, torch.float32)
    ids = torch.randint(10, 1000, (2, 11))
    for model in (plain, ours):
        model.train()
        model(input_ids=ids).logits.pow(2).mean().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_fused_scale_add_under_autocast_and_after_merge(tiny_model_dir):
    plain, ours = _lora_pair(tiny_model_dir, torch.bfloat16)
    ids = torch.randint(10, 1000, (2, 11))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = plain(input_ids=ids).logits.float(), ours(input_ids=ids).logits.float()
    assert (a - b).abs().max() < 0.05 * a.abs().max(), "same sum, fewer bf16 roundings"
    with torch.no_grad():
        unmerged = ours(input_ids=ids).logits.float()  # outside autocast: peft's own mixed-dtype arithmetic
        merged = ours.merge_and_unload()(input_ids=ids).logits.float()
        reference = plain.merge_and_unload()(input_ids=ids).logits.float()
    torch.testing.assert_close(merged, reference, atol=0, rtol=0)
    assert (merged - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_checkpointing_is_switched_on_without_the_deprecated_alias(tiny_model_dir):
    import warnings

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = apply_lora(model, LoraConfig(), gradient_checkpointing=True)
    assert model.is_activation_checkpointing  # really on: the layers recompute in the backward
    assert not [w for w in caught if "gradient_checkpointing_enable" in str(w.message)]  # not on every run
    ids = torch.tensor([[1, 2, 3, 4]])
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


def test_shared_mask_rescale_rides_on_the_lora_scaling(tiny_model_dir):
    """Our adapter with dropout: base + scaling * ((x * keep * 1/(1-p)) A^T) B^T, the same mask as keep_mask draws."""
    from chattune.model.lora import FusedScaleAdd, keep_mask

    model = apply_lora(tiny(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.3), gradient_checkpointing=False)
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    assert isinstance(layer.lora_variant["default"], FusedScaleAdd)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    B.data.normal_(0, 0.1)
    model.train()
    x = torch.randn(3, 7, A.shape[1], requires_grad=True)
    torch.manual_seed(5)
    ours = layer(x)
    grads = torch.autograd.grad(ours.sum(), (x, A, B))
    torch.manual_seed(5)
    keep, scale = keep_mask(x.shape, 0.3, x.device)
    xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (x, A, B))
    ref = layer.base_layer(xr) + ((xr * keep * scale) @ Ar.t()) @ Br.t() * layer.scaling["default"]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(ref.sum(), (xr, Ar, Br))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
