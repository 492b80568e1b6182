"""lora.variant: DoRA, rsLoRA, PiSSA and LoRA+ through peft; chattune's fast paths step aside where a variant has
its own forward; a PiSSA run is saved as plain LoRA of the untouched base; config mistakes are caught early."""

import pytest
import torch

from chattune.config import LoraConfig, validate
from chattune.errors import ConfigError
from chattune.model.lora import FusedScaleAdd, SharedDropout, apply_lora, save_kwargs, to_lora_config


def tiny(tiny_model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)


def test_variants_become_peft_settings():
    assert to_lora_config(LoraConfig(variant="dora")).use_dora
    assert to_lora_config(LoraConfig(variant="rslora")).use_rslora
    assert to_lora_config(LoraConfig(variant="pissa")).init_lora_weights == "pissa_niter_16"
    assert to_lora_config(LoraConfig(variant="pissa", pissa_niter=0)).init_lora_weights == "pissa"
    plain = to_lora_config(LoraConfig(variant="loraplus"))  # LoRA+ only changes the optimizer
    assert (plain.use_dora, plain.use_rslora, plain.init_lora_weights) == (False, False, True)


def test_dora_keeps_peft_forward_and_its_loss(tiny_model_dir):
    """DoRA's layers get neither the fused scale-add nor the shared mask, and the loss is peft's own, bit for bit."""
    from peft import get_peft_model

    cfg = LoraConfig(r=4, alpha=16, dropout=0.1, variant="dora")
    torch.manual_seed(0)
    ours = apply_lora(tiny(tiny_model_dir), cfg, gradient_checkpointing=False)
    torch.manual_seed(0)
    plain = get_peft_model(tiny(tiny_model_dir), to_lora_config(cfg))
    layers = [m for m in ours.modules() if hasattr(m, "lora_variant") and m.lora_A]
    assert layers and all(type(m.lora_variant["default"]).__name__ == "DoraLinearVariant" for m in layers)
    assert not any(isinstance(v, FusedScaleAdd) for m in layers for v in m.lora_variant.values())
    assert not any(isinstance(m, SharedDropout) for m in ours.modules()), "peft's own dropout under DoRA"
    for (name, p), (_, q) in zip(plain.named_parameters(), ours.named_parameters()):
        if "lora_B" in name:
            torch.manual_seed(len(name))
            p.data.normal_(0, 0.1)
            q.data.copy_(p.data)
    ids = torch.randint(10, 1000, (2, 11))
    losses = []
    for model in (plain, ours):
        model.train()
        torch.manual_seed(3)  # same dropout draws: both use torch's dropout in the same order
        losses.append(model(input_ids=ids, labels=ids).loss)
    assert losses[0].item() == losses[1].item()


def test_plain_lora_still_takes_the_fast_paths(tiny_model_dir):
    model = apply_lora(tiny(tiny_model_dir), LoraConfig(r=4, dropout=0.1, variant="rslora"), gradient_checkpointing=False)
    assert any(isinstance(v, FusedScaleAdd) for m in model.modules() for v in getattr(m, "lora_variant", {}).values())
    assert any(isinstance(m, SharedDropout) for m in model.modules())
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(16 / 4 ** 0.5), "rsLoRA: alpha / sqrt(r), not alpha / r = 4"


def test_pissa_is_saved_as_plain_lora_of_the_original_base(tiny_model_dir, tmp_path):
    """After a step, the written adapter on the untouched base gives the PiSSA model's logits."""
    from peft import PeftModel

    model = apply_lora(tiny(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=0.0, variant="pissa", pissa_niter=0),
                       gradient_checkpointing=False)
    original = tiny(tiny_model_dir)
    w0 = original.model.layers[0].self_attn.q_proj.weight
    w_res = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(w0, w_res), "PiSSA moved the top singular directions out of the base"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(10, 1000, (2, 11))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path / "adapter"), **save_kwargs(model))
    reloaded = PeftModel.from_pretrained(original, str(tmp_path / "adapter")).eval()
    assert reloaded.peft_config["default"].r == 8 and reloaded.peft_config["default"].init_lora_weights is True
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_pissa_with_dropout_starts_away_from_the_base_and_says_so(tiny_model_dir, dropout, caplog):
    # The demo config's lora.dropout=0.05 with lora.variant=pissa began at loss 3.80 where the base and every
    # other variant give 2.95: dropout also drops the principal part of W that PiSSA moved into the adapter.
    ids = torch.randint(10, 1000, (2, 11))
    with torch.no_grad():
        base = tiny(tiny_model_dir)(input_ids=ids, labels=ids).loss
    with caplog.at_level("WARNING", logger="chattune"):
        model = apply_lora(tiny(tiny_model_dir), LoraConfig(r=4, alpha=8, dropout=dropout, variant="pissa",
                                                            pissa_niter=0), gradient_checkpointing=False)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        start = model(input_ids=ids, labels=ids).loss
    warned = [r.getMessage() for r in caplog.records if "lora.dropout" in r.getMessage()]
    if dropout:
        assert abs(start - base) > 1e-3 and warned and "lora.dropout=0" in warned[0]
    else:
        torch.testing.assert_close(start, base, atol=1e-4, rtol=1e-4)
        assert not warned


def test_loraplus_optimizer_gives_b_the_higher_rate(tiny_model_dir):
    from chattune.model.lora import loraplus_optimizer

    model = apply_lora(tiny(tiny_model_dir), LoraConfig(r=4, variant="loraplus"), gradient_checkpointing=False)
    opt = loraplus_optimizer(model, lr=1e-4, ratio=16, weight_decay=0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    rates = {("lora_B" in names[id(p)]): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert rates == {False: pytest.approx(1e-4), True: pytest.approx(16e-4)}


@pytest.mark.parametrize("raw, key", [
    ({"lora": {"variant": "pissa"}, "model": {"quantization": "4bit"}}, "lora.variant=pissa"),
    ({"lora": {"variant": "dorra"}}, "lora.variant"),
    ({"lora": {"variant": "loraplus", "loraplus_lr_ratio": 0.5}}, "lora.loraplus_lr_ratio"),
])
def test_variant_mistakes_are_config_errors(raw, key):
    with pytest.raises(ConfigError) as info:
        validate({"data": {"train": ["x.json"]}, **raw})
    assert key in info.value.what
