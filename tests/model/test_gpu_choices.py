"""What chattune chooses on a GPU machine, shown on the CPU by pretending CUDA is there (issue 17, items 1, 7, 8, 11):
where inference and training load the model, which dtype `auto` means per compute capability, fp16 kept stable,
one process refused on a multi-GPU box."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from chattune import cli
from chattune import config as config_mod
from chattune.config import LoraConfig, ModelConfig
from chattune.errors import ConfigError
from chattune.model import load as load_mod
from chattune.model.lora import apply_lora
from chattune.model.placement import (
    inference_device_map,
    map_device,
    model_devices,
    place_for_inference,
    training_device_map,
)

FIX = Path(__file__).parents[1] / "fixtures" / "data"


def fake_gpus(monkeypatch, count: int = 1, capability: tuple[int, int] = (9, 0)) -> None:
    """torch.cuda as a machine with `count` GPUs of this compute capability would answer."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return True if including_emulation else capability >= (8, 0)  # what torch 2.13 answers

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


# --- item 1: inference goes to the GPU ----------------------------------------------------------


def test_inference_loads_straight_onto_the_gpu(monkeypatch):
    fake_gpus(monkeypatch)
    assert inference_device_map(ModelConfig()) == {"": 0}
    assert inference_device_map(ModelConfig(quantization="4bit")) == {"": 0}
    assert inference_device_map(ModelConfig(device_map="auto")) == "auto"  # accelerate spreads it
    assert map_device({"": 0}) == "cuda" and map_device("auto") == "cuda"
    assert map_device({"": "cpu"}) == "cpu" and map_device("cpu") == "cpu"


def test_without_a_gpu_inference_stays_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device_map(ModelConfig()) is None
    assert map_device(None) == "cpu" and map_device("auto") == "cpu"


class Recorder(torch.nn.Linear):
    """A model that records where it is asked to move instead of moving."""

    def __init__(self):
        super().__init__(1, 1)
        self.moved_to = []

    def to(self, *args, **kwargs):
        self.moved_to.append(args[0] if args else kwargs)
        return self


def test_place_for_inference_moves_plain_models_and_keeps_accelerate_placements(monkeypatch):
    fake_gpus(monkeypatch, count=2)
    plain = Recorder()
    assert place_for_inference(plain) is plain and plain.moved_to == ["cuda"]
    spread = Recorder()
    spread.hf_device_map = {"model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}  # serve with device_map=auto
    place_for_inference(spread)
    assert spread.moved_to == []  # not collapsed onto cuda:0 under accelerate's hooks
    quantised = Recorder()
    quantised.is_loaded_in_4bit = True
    place_for_inference(quantised)
    assert quantised.moved_to == []
    assert model_devices(plain) == "cpu"


def _run_dir(tmp_path: Path, model_dir: Path, *overrides: str) -> Path:
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    for f in model_dir.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "merges", "special", "chat_template")):
            shutil.copy(f, run / "tokenizer")
    (run / "chat_template.jinja").write_text((model_dir / "chat_template.jinja").read_text())
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model:\n  name_or_path: {model_dir}\ndata:\n  train: {FIX / 'alpaca.json'}\n")
    config_mod.dump(config_mod.load(yaml, list(overrides)), run / "run_config.yaml")
    return run


@pytest.mark.parametrize("overrides, device_map, dtype", [
    ((), {"": 0}, torch.bfloat16),  # dtype auto on an H100: bf16, on the GPU
    (("model.device_map=cpu",), "cpu", torch.float32),  # kept on the CPU: the CPU's rule, never bf16 for the GPU's sake
    (("model.device_map=auto",), "auto", torch.bfloat16),
])
def test_session_loads_on_the_gpu_in_the_gpu_dtype(tmp_path, tiny_model_dir, monkeypatch, caplog, overrides,
                                                   device_map, dtype):
    from chattune.infer import session as session_mod

    fake_gpus(monkeypatch)
    monkeypatch.setattr(load_mod, "cpu_has_fast_bf16", lambda: False)
    run = _run_dir(tmp_path, tiny_model_dir, *overrides)
    seen, placed = {}, []

    def fake_load_model(model_dir, cfg, *, dtype, device_map=None, **extra):
        seen.update(dtype=dtype, device_map=device_map)
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(session_mod, "load_model", fake_load_model)
    monkeypatch.setattr(session_mod, "place_for_inference", lambda m: placed.append(m) or m)
    with caplog.at_level(logging.INFO, logger="chattune"):
        session = session_mod.load_session(run, base_only=True)
    assert seen == {"dtype": dtype, "device_map": device_map}
    assert placed == [session.model]  # every session goes through the one placement rule
    assert "model loaded on cpu" in caplog.text  # the log names the real devices (here the fake's)


# --- item 11: DDP ranks load onto their own GPU ----------------------------------------------


def test_each_ddp_rank_loads_onto_its_own_gpu(monkeypatch):
    fake_gpus(monkeypatch, count=4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert training_device_map(ModelConfig()) == {"": 3}  # not the whole model in host RAM first
    assert training_device_map(ModelConfig(), distributed="deepspeed_zero2") == {"": 3}
    assert training_device_map(ModelConfig(quantization="4bit"), distributed="ddp") == {"": 3}
    # ZeRO-3 and FSDP shard the weights themselves while or right after loading
    assert training_device_map(ModelConfig(), distributed="deepspeed_zero3") is None
    assert training_device_map(ModelConfig(), distributed="fsdp") is None


def test_cpu_training_is_left_to_the_trainer(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device_map(ModelConfig()) is None


# --- item 7: dtype auto by compute capability ----------------------------------------------------


@pytest.mark.parametrize("capability, dtype", [
    ((7, 0), torch.float16),  # V100: bf16 only emulated
    ((7, 5), torch.float16),  # T4
    ((8, 0), torch.bfloat16),  # A100
    ((8, 9), torch.bfloat16),  # L4 / L40S
    ((9, 0), torch.bfloat16),  # H100
])
def test_dtype_auto_by_compute_capability(monkeypatch, capability, dtype):
    fake_gpus(monkeypatch, capability=capability)
    assert load_mod.resolve_dtype("auto") == dtype
    assert load_mod.resolve_dtype("bf16") == torch.bfloat16  # an explicit choice is kept
    monkeypatch.setattr(load_mod, "cpu_has_fast_bf16", lambda: True)
    assert load_mod.resolve_dtype("auto", device="cpu") == torch.bfloat16


def test_explicit_bf16_on_an_old_gpu_is_kept_with_a_warning(monkeypatch, caplog):
    fake_gpus(monkeypatch, capability=(7, 5))
    with caplog.at_level(logging.WARNING):
        assert load_mod.resolve_dtype("bf16") == torch.bfloat16
    assert "emulated" in caplog.text and "model.dtype=auto" in caplog.text
    caplog.clear()
    fake_gpus(monkeypatch, capability=(8, 0))
    with caplog.at_level(logging.WARNING):
        load_mod.resolve_dtype("bf16")
    assert caplog.text == ""


def test_a_model_too_large_for_the_gpu_says_how_to_spread_it(tiny_model_dir, monkeypatch):
    import transformers

    from chattune.errors import ModelError

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    with pytest.raises(ModelError) as info:
        load_mod.load_model(tiny_model_dir, ModelConfig(), dtype=torch.float32, device_map={"": 0})
    assert "does not fit" in info.value.what and "model.device_map=auto" in info.value.fix


def test_tf32_only_where_the_gpu_has_it(monkeypatch, tmp_path):
    from chattune.train import trainer as trainer_mod

    fake_gpus(monkeypatch, capability=(7, 0))
    assert load_mod.cuda_has_native_bf16() is False
    fake_gpus(monkeypatch, capability=(8, 0))
    assert load_mod.cuda_has_native_bf16() is True
    assert trainer_mod.cuda_has_native_bf16 is load_mod.cuda_has_native_bf16  # what TrainingArguments(tf32=) reads


@pytest.fixture
def tiny_fp16(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)


def test_fp16_training_keeps_lora_in_fp32_and_the_residual_stream_in_fp32(tiny_fp16, tiny_model_dir):
    from chattune.config import RunConfig
    from chattune.data.render import ChatRenderer
    from chattune.infer.generate import generate_batch
    from chattune.model.load import load_tokenizer

    model = tiny_fp16
    assert load_mod.keep_fp16_training_stable(model, torch.bfloat16) is False  # bf16 needs nothing
    assert load_mod.keep_fp16_training_stable(model, torch.float16) is True
    assert model.dtype == torch.float16  # weights (and the KV cache generation allocates) stay fp16
    ids = torch.arange(10, 30).unsqueeze(0)
    with torch.autocast("cpu", dtype=torch.float16):  # what the Trainer's fp16 steps run under
        out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert all(h.dtype == torch.float32 for h in out.hidden_states)  # the residual stream, layer by layer
    assert torch.isfinite(out.loss)
    plain = model(input_ids=ids, output_hidden_states=True)
    assert all(h.dtype == torch.float16 for h in plain.hidden_states)  # outside autocast: plain fp16
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=False)
    lora = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)  # what the GradScaler unscales
    # The probes generate outside the Trainer's autocast: that must still work.
    renderer = ChatRenderer(load_tokenizer(tiny_model_dir, RunConfig.model_validate(
        {"model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": "x.json"}}).model), {})
    answers = generate_batch(peft_model, renderer, [[{"role": "user", "content": "hi"}]], max_new_tokens=3)
    assert len(answers) == 1 and isinstance(answers[0], str)


# --- item 8: no nn.DataParallel --------------------------------------------------------------


def test_one_process_on_a_multi_gpu_machine_is_refused(monkeypatch, tmp_path, tiny_model_dir, capsys):
    from chattune.train import launcher

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    fake_gpus(monkeypatch, count=4)
    with pytest.raises(ConfigError) as info:
        launcher.check_one_gpu_per_process()
    assert "4 GPUs" in info.value.what and "DataParallel" in info.value.what
    assert "--nproc 4" in info.value.fix and "CUDA_VISIBLE_DEVICES=0" in info.value.fix
    # Through the CLI, before anything is loaded: one paragraph, exit status 2.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train: {FIX / 'alpaca.json'}\n"
                   f"output_dir: {tmp_path / 'run'}\n")
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "--nproc 4" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_one_gpu_or_a_launcher_is_accepted(monkeypatch):
    from chattune.train import launcher

    fake_gpus(monkeypatch, count=1)
    launcher.check_one_gpu_per_process()  # one GPU: no DataParallel possible
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    launcher.check_one_gpu_per_process()


def test_train_loads_each_ddp_process_onto_its_gpu(tmp_path, tiny_model_dir, monkeypatch):
    """Through `chattune train` as torchrun starts it (LOCAL_RANK set): load_model gets this process's GPU."""
    from chattune.errors import ModelError
    from chattune.verbs import train as train_run

    fake_gpus(monkeypatch, count=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "0")  # the main process's view of the run directory, no process group
    monkeypatch.setenv("WORLD_SIZE", "1")
    seen = {}

    def fake_load_model(model_dir, cfg, *, dtype, device_map=None, **extra):
        seen.update(device_map=device_map, dtype=dtype)
        raise ModelError("stop here")

    monkeypatch.setattr(train_run, "load_model", fake_load_model)
    # Where the TrainingArguments come before the model (ZeRO-3's zero.Init), they would join a process group.
    monkeypatch.setattr(train_run, "to_training_args", lambda *a, **k: None, raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  train: {FIX / 'alpaca.json'}\n"
                   f"tracking:\n  backends: [none]\n  probe_size: 0\noutput_dir: {tmp_path / 'run'}\n")
    assert cli.main(["train", str(cfg)]) == 2
    assert seen == {"device_map": {"": 1}, "dtype": torch.bfloat16}
