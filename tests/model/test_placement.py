"""Checks before loading: device placement for training vs inference, attention kernel, remote code."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from chattune import cli
from chattune import config as config_mod
from chattune.config import ModelConfig
from chattune.errors import MissingDependencyError, ModelError
from chattune.model.load import load_model, load_tokenizer
from chattune.model.placement import (
    check_attn_implementation,
    check_remote_code,
    explain_load_error,
    inference_device_map,
    training_device_map,
)

FIX = Path(__file__).parents[1] / "fixtures" / "data"
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU placement")


def tiny_config(tmp_path: Path, model_dir: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {model_dir}\n  dtype: fp32\ndata:\n  train: {FIX / 'alpaca.json'}\n"
                   f"tracking:\n  backends: [none]\n  probe_size: 0\noutput_dir: {tmp_path / 'run'}\n")
    return cfg


# --- placement ----------------------------------------------------------------------------------


def test_training_never_spreads_the_model(caplog):
    assert training_device_map(ModelConfig()) is None  # the Trainer moves it to its one device
    with caplog.at_level(logging.INFO):
        assert training_device_map(ModelConfig(device_map="auto")) is None
    assert "inference only" in caplog.text


@needs_no_gpu
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantised_training_loads_on_the_one_device_it_trains_on(mode):
    # The Trainer never moves a bitsandbytes model, so it is loaded in place; never "auto".
    assert training_device_map(ModelConfig(quantization=mode, device_map="auto")) == {"": "cpu"}


@needs_no_gpu
def test_inference_uses_model_device_map():
    assert inference_device_map(ModelConfig(device_map="auto")) == "auto"
    assert inference_device_map(ModelConfig()) is None
    assert inference_device_map(ModelConfig(quantization="4bit")) == {"": "cpu"}


def test_train_passes_the_training_placement_to_load_model(tmp_path, tiny_model_dir, monkeypatch):
    from chattune.verbs import train as train_run

    seen = {}

    def fake_load_model(model_dir, cfg, *, dtype, device_map=None, **extra):
        seen["device_map"] = device_map
        raise ModelError("stop here")

    monkeypatch.setattr(train_run, "load_model", fake_load_model)
    assert cli.main(["train", str(tiny_config(tmp_path, tiny_model_dir)), "model.device_map=auto"]) == 2
    assert seen == {"device_map": None}


@pytest.mark.parametrize("compiled", [True, False])
def test_train_starts_the_cpu_isa_probe_before_loading_when_norms_compile(tmp_path, tiny_model_dir, monkeypatch, compiled):
    from chattune.verbs import train as train_run

    events = []

    def fake_load_model(*args, **kwargs):
        events.append("load")
        raise ModelError("stop here")

    monkeypatch.setattr(train_run, "probe_cpu_in_background", lambda: events.append("probe"))
    monkeypatch.setattr(train_run, "load_model", fake_load_model)
    overrides = [f"train.compiled_norms={str(compiled).lower()}"]
    assert cli.main(["train", str(tiny_config(tmp_path, tiny_model_dir)), *overrides]) == 2
    assert events == (["probe", "load"] if compiled and not torch.cuda.is_available() else ["load"])


def test_session_passes_model_device_map(tmp_path, tiny_model_dir, monkeypatch):
    from chattune.infer import session as session_mod

    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    for f in tiny_model_dir.glob("*"):
        if f.name.startswith(("tokenizer", "vocab", "merges", "special", "chat_template")):
            shutil.copy(f, run / "tokenizer")
    (run / "chat_template.jinja").write_text((tiny_model_dir / "chat_template.jinja").read_text())
    cfg = config_mod.load(tiny_config(tmp_path, tiny_model_dir), ["model.device_map=auto"])
    config_mod.dump(cfg, run / "run_config.yaml")
    seen = {}

    def fake_load_model(model_dir, cfg, *, dtype, device_map=None, **extra):
        seen["device_map"] = device_map
        return torch.nn.Linear(1, 1)

    monkeypatch.setattr(session_mod, "load_model", fake_load_model)
    session_mod.load_session(run, base_only=True)
    assert seen == {"device_map": "auto"}


# --- attention kernel ---------------------------------------------------------------------------


def test_sdpa_and_eager_pass():
    check_attn_implementation("sdpa")
    check_attn_implementation("eager")


@pytest.mark.skipif(__import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_unavailable_flash_attention_is_a_clear_error(tmp_path, tiny_model_dir, capsys):
    with pytest.raises(MissingDependencyError) as info:
        check_attn_implementation("flash_attention_2")
    assert info.value.where == "model.attn_implementation"
    assert "flash-attn package is not installed" in info.value.what and "sdpa" in info.value.fix
    # Through the CLI: one paragraph, exit status 2, no traceback.
    assert cli.main(["train", str(tiny_config(tmp_path, tiny_model_dir)),
                     "model.attn_implementation=flash_attention_2"]) == 2
    err = capsys.readouterr().err
    assert "error: model.attn_implementation: attn_implementation=flash_attention_2 is unavailable" in err
    assert "Traceback" not in err


def test_flash_attention_error_comes_before_loading(tiny_model_dir, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("from_pretrained must not be reached")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    with pytest.raises((ModelError, MissingDependencyError), match="flash_attention_2 is unavailable"):
        load_model(tiny_model_dir, ModelConfig(attn_implementation="flash_attention_2"), dtype=torch.float32)


def test_model_without_sdpa_names_eager():
    msg = ("QWenLMHeadModel does not support an attention implementation through "
           "torch.nn.functional.scaled_dot_product_attention yet.")
    err = explain_load_error(msg)
    assert err.where == "model.attn_implementation" and "eager" in err.fix
    assert explain_load_error("some other problem") is None


# --- trust_remote_code --------------------------------------------------------------------------


def remote_code_folder(tmp_path: Path, tiny_model_dir: Path, model_type: str = "qwen") -> Path:
    """A Qwen-7B-style folder: config.json maps to modeling code shipped beside it, model_type unknown to transformers."""
    folder = tmp_path / f"remote-{model_type}"
    shutil.copytree(tiny_model_dir, folder)
    conf = json.loads((folder / "config.json").read_text())
    conf.update(model_type=model_type, architectures=["QWenLMHeadModel"],
                auto_map={"AutoConfig": "configuration_qwen.QWenConfig",
                          "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"})
    (folder / "config.json").write_text(json.dumps(conf))
    return folder


def test_trust_remote_code_defaults_to_false():
    assert ModelConfig().trust_remote_code is False


def test_model_needing_remote_code_names_the_key(tmp_path, tiny_model_dir):
    folder = remote_code_folder(tmp_path, tiny_model_dir)
    for load in (lambda: load_tokenizer(folder, ModelConfig()),
                 lambda: load_model(folder, ModelConfig(), dtype=torch.float32)):
        with pytest.raises(ModelError) as info:
            load()
        assert info.value.where == "model.trust_remote_code"
        assert "'qwen'" in info.value.what and "model.trust_remote_code=true" in info.value.fix


def test_remote_code_error_through_the_cli(tmp_path, tiny_model_dir, capsys):
    folder = remote_code_folder(tmp_path, tiny_model_dir)
    assert cli.main(["train", str(tiny_config(tmp_path, folder))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.trust_remote_code:") and "Traceback" not in err
    assert len(err.splitlines()) == 1, "one paragraph"
    assert not (tmp_path / "run" / "adapter").exists()


def test_trusting_remote_code_lets_the_check_pass(tmp_path, tiny_model_dir):
    folder = remote_code_folder(tmp_path, tiny_model_dir)
    check_remote_code(folder, ModelConfig(trust_remote_code=True))


def test_auto_map_on_a_model_transformers_knows_needs_no_trust(tmp_path, tiny_model_dir):
    # Many repos ship code for old transformers versions but load natively now (model_type qwen2 here).
    folder = remote_code_folder(tmp_path, tiny_model_dir, model_type="qwen2")
    check_remote_code(folder, ModelConfig())
    assert load_tokenizer(folder, ModelConfig()).chat_template
