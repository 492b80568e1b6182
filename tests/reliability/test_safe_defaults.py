"""Safe defaults: no remote code, no pickles, damaged weights named, secrets never written, loopback server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune import cli
from chattune.config import RunConfig
from chattune.errors import ModelError
from chattune.model.safety import check_weight_files, safetensors_problem

from .conftest import FIX, train_rows

SECRETS = {
    "SWANLAB_API_KEY": "swanlab-secret-0123456789abcdef",
    "WANDB_API_KEY": "wandb-secret-0123456789abcdef0123456789abcdef",
    "HF_TOKEN": "hf_secretTOKEN0123456789abcdef",
    "CHATTUNE_API_KEY": "chattune-secret-0123456789",
}


def test_risky_options_are_off_by_default():
    cfg = RunConfig.model_validate({"data": {"train": ["x.json"]}})
    assert cfg.model.trust_remote_code is False
    assert cfg.model.allow_pickle is False


@pytest.fixture
def pickle_model(tmp_path, tiny_model_dir) -> Path:
    """The tiny model with its weights in pytorch_model.bin (a pickle) instead of safetensors."""
    out = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, out)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


def test_pickle_weights_are_refused_unless_allowed(pickle_model):
    with pytest.raises(ModelError) as info:
        check_weight_files(pickle_model, allow_pickle=False)
    text = info.value.render()
    assert "pytorch_model.bin" in text and "pickle" in text and "model.allow_pickle=true" in text
    check_weight_files(pickle_model, allow_pickle=True)


def test_safetensors_beside_a_pickle_is_fine(pickle_model, tiny_model_dir):
    shutil.copy(tiny_model_dir / "model.safetensors", pickle_model)
    check_weight_files(pickle_model, allow_pickle=False)  # transformers prefers the safetensors file


def test_allow_pickle_loads_the_model(pickle_model):
    from chattune.config import ModelConfig
    from chattune.model.load import load_model

    model = load_model(pickle_model, ModelConfig(allow_pickle=True), dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_damaged_safetensors_are_found_by_their_header(tmp_path, tiny_model_dir):
    good = tiny_model_dir / "model.safetensors"
    assert safetensors_problem(good) is None
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    assert "cut short" in safetensors_problem(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"<html>404 Not Found</html>")
    assert "header claims" in safetensors_problem(junk)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01")
    assert "too short" in safetensors_problem(tiny)


def test_secrets_never_reach_the_run_directory_logs_or_trackers(tmp_path, tiny_model_dir, monkeypatch, capsys, caplog):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    caplog.set_level("INFO")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n  dtype: fp32\ndata:\n  train: {FIX / 'alpaca.json'}\n"
                   f"tracking:\n  backends: [tensorboard, swanlab]\n  swanlab:\n    mode: local\n    logdir: {tmp_path / 'swanlog'}\n")
    rc = cli.main(["train", str(cfg), f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=2",
                   "train.grad_accum=1", "train.save_steps=1", "tracking.probe_size=1", "tracking.probe_max_new_tokens=4"])
    assert rc == 0
    assert train_rows(tmp_path / "run"), "it trained and logged"
    out = capsys.readouterr()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("swanlog" in p.parts for p in written) and any("tfevents" in p.name for p in written)
    for name, value in SECRETS.items():
        needle = value.encode()
        leaks = [str(p) for p in written if needle in p.read_bytes()]
        assert not leaks, f"{name} written to {leaks}"
        assert value not in out.out + out.err + caplog.text, f"{name} printed"


def test_server_defaults_are_loopback_capped_and_keyable():
    args = cli.build_parser().parse_args(["serve", "runs/demo"])
    assert args.host == "127.0.0.1"
    assert args.api_key is None  # the key comes from --api-key or CHATTUNE_API_KEY, never from a config file
    assert args.max_tokens_limit > 0 and args.max_body_bytes > 0


def test_server_run_takes_the_key_from_the_environment(monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("chattune.verbs.serve")
    fake.run = lambda path, **kw: seen.update(kw, path=path)
    monkeypatch.setitem(__import__("sys").modules, "chattune.verbs.serve", fake)
    import chattune.verbs

    # `from chattune.verbs import serve` reads the package attribute first, set once the real module was imported.
    monkeypatch.setattr(chattune.verbs, "serve", fake, raising=False)
    monkeypatch.setenv("CHATTUNE_API_KEY", "k-from-env")
    assert cli.main(["serve", "runs/demo"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["api_key"] == "k-from-env"
    assert seen["max_tokens_limit"] == 2048 and seen["max_body_bytes"] == 1_000_000


def test_the_server_itself_defaults_to_loopback():
    import inspect

    from chattune.verbs import serve  # chattune's own module: an import error is a failure, not a skip
    for fn in (serve.run, serve.make_server):
        params = inspect.signature(fn).parameters
        assert params["host"].default == "127.0.0.1", fn.__name__
        assert params["api_key"].default is None and params["max_tokens_limit"].default > 0
