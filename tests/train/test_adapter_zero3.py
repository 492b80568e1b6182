"""Under ZeRO-3 the adapter is saved from the trainable parameters alone: only they are gathered, and the
files equal the adapter saved without ZeRO. (The real two-process ZeRO-3 run, where the adapter and the
checkpoints' adapters equal DDP's, is in tests/distributed/test_deepspeed_cpu.py.)"""

import contextlib
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from chattune.config import LoraConfig
from chattune.model.lora import apply_lora
from chattune.train.adapter import save_adapter, write_adapter


def tiny_lora(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), gradient_checkpointing=False)
    with torch.no_grad():  # B starts at zero: make the saved values tell adapters apart
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model


def fake_zero3_trainer(model):
    plugin = SimpleNamespace(zero_stage=3)
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), unwrap_model=lambda m: m,
                                  get_state_dict=lambda *_: (_ for _ in ()).throw(AssertionError("whole model gathered")))
    return SimpleNamespace(model=model, is_deepspeed_enabled=True, accelerator=accelerator)


def test_zero3_save_gathers_only_the_adapter_and_writes_the_same_files(tiny_model_dir, tmp_path, monkeypatch):
    import deepspeed

    model = tiny_lora(tiny_model_dir)
    gathered = []

    @contextlib.contextmanager
    def spy(params, modifier_rank=None, **kw):
        gathered.append((list(params), modifier_rank))
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", spy)
    save_adapter(fake_zero3_trainer(model), tmp_path / "zero3")
    write_adapter(model, tmp_path / "plain")
    [(params, modifier_rank)] = gathered
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(params) == len(lora) == 8 and all(a is b for a, b in zip(params, lora))
    assert modifier_rank is None  # read only: every process gets the values, nobody writes them back
    ours, plain = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("zero3", "plain"))
    assert ours.keys() == plain.keys() and len(ours) == 8
    for k in ours:
        torch.testing.assert_close(ours[k], plain[k], atol=0, rtol=0)
    assert (tmp_path / "zero3" / "adapter_config.json").read_text() == (tmp_path / "plain" / "adapter_config.json").read_text()


def test_checkpoints_under_zero3_take_the_same_path(tiny_model_dir, tmp_path, monkeypatch):
    """ChattuneTrainer.save_model (each checkpoint) saves the gathered trainable parameters, not the engine's dict."""
    import deepspeed

    from chattune.train.trainer import ChattuneTrainer

    model = tiny_lora(tiny_model_dir)
    gathered, saved = [], {}

    @contextlib.contextmanager
    def spy(params, modifier_rank=None, **kw):
        gathered.append(len(list(params)))
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", spy)
    fake = fake_zero3_trainer(model)
    fake.args = SimpleNamespace(should_save=True, output_dir=str(tmp_path))
    fake._save = lambda out, state_dict=None: saved.update(out=out, keys=sorted(state_dict))
    ChattuneTrainer.save_model(fake, str(tmp_path / "ckpt"), _internal_call=True)
    assert gathered == [8]
    assert saved["out"] == str(tmp_path / "ckpt")
    assert saved["keys"] == sorted(n for n, p in model.named_parameters() if p.requires_grad)
