"""train.distributed without GPUs: config validation, the TrainingArguments converters, the shipped engine files,
what is refused, and the torchrun launcher's command line."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from chattune import cli, config
from chattune.errors import ConfigError
from chattune.train import engines, interrupt, launcher

ROOT = Path(__file__).parents[2]
MODES = ["ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]


def load(tmp_path, *overrides):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: x.json\n")
    return config.load(p, list(overrides))


@pytest.fixture
def no_launcher(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(k, raising=False)


# ---------------------------------------------------------------------------
# config


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_validates_and_round_trips(tmp_path, mode):
    offload = [] if mode == "ddp" else ["train.cpu_offload=true"]
    cfg = load(tmp_path, f"train.distributed={mode}", "train.nproc=4", *offload)
    assert cfg.train.distributed == mode and cfg.train.nproc == 4 and cfg.train.cpu_offload is (mode != "ddp")
    config.dump(cfg, tmp_path / "run_config.yaml")
    assert config.load(tmp_path / "run_config.yaml") == cfg


def test_defaults_are_one_process_of_ddp(tmp_path):
    t = load(tmp_path).train
    assert (t.nproc, t.distributed, t.cpu_offload, t.deepspeed_config) == (1, "ddp", False, None)


@pytest.mark.parametrize("overrides, message", [
    (["train.distributed=zero3"], "train.distributed: Input should be 'ddp', 'deepspeed_zero2', 'deepspeed_zero3' or 'fsdp'"),
    (["train.nproc=0"], "train.nproc: Input should be greater than or equal to 1"),
    (["train.cpu_offload=true"], "train.cpu_offload needs train.distributed=deepspeed_zero2, deepspeed_zero3 or fsdp"),
    (["train.distributed=fsdp", "train.deepspeed_config=ds.json"], "train.deepspeed_config needs train.distributed=deepspeed"),
])
def test_contradictions_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path, *overrides)


# ---------------------------------------------------------------------------
# converters


def test_ddp_fields_only_with_several_processes(tmp_path):
    cfg = load(tmp_path)
    assert engines.training_args_kwargs(cfg, cuda=False, world_size=1) == {}
    assert engines.training_args_kwargs(cfg, cuda=False, world_size=2) == {"ddp_backend": "gloo",
                                                                        "ddp_find_unused_parameters": False}
    assert engines.training_args_kwargs(cfg, cuda=True, world_size=8)["ddp_backend"] is None  # nccl, the default


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("offload", [False, True])
def test_deepspeed_fields_and_shipped_files(tmp_path, stage, offload):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    cfg = load(tmp_path, f"train.distributed=deepspeed_zero{stage}", f"train.cpu_offload={str(offload).lower()}")
    kw = engines.training_args_kwargs(cfg, cuda=True, world_size=4)
    conf = kw["deepspeed"]
    assert "fsdp" not in kw and "accelerator_config" not in kw
    hf = HfTrainerDeepSpeedConfig(conf)
    assert hf.is_zero3() is (stage == 3) and hf.is_offload() is offload
    if stage == 3:  # the adapter is saved from gathered weights
        assert conf["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    shipped = ROOT / "configs" / "distributed" / f"deepspeed_zero{stage}{'_offload' if offload else ''}.json"
    assert json.loads(shipped.read_text()) == conf, f"{shipped.name} drifted from distributed.deepspeed_config()"
    # On CPU processes the gloo state made by init_process_group is handed to TrainingArguments.
    cpu = engines.training_args_kwargs(cfg, cuda=False, world_size=2)
    assert cpu["accelerator_config"] == {"use_configured_state": True} and cpu["ddp_backend"] == "gloo"


def test_every_shipped_engine_file_parses():
    files = sorted((ROOT / "configs" / "distributed").glob("*.json"))
    assert len(files) == 4
    for f in files:
        assert json.loads(f.read_text())["zero_optimization"]["stage"] in (2, 3)


def test_own_deepspeed_file_is_passed_as_a_path(tmp_path, no_launcher):
    path = ROOT / "configs" / "distributed" / "deepspeed_zero3.json"
    cfg = load(tmp_path, "train.distributed=deepspeed_zero3", f"train.deepspeed_config={path}")
    assert engines.training_args_kwargs(cfg, cuda=True, world_size=2)["deepspeed"] == str(path)
    engines.check_supported(cfg)  # the stage matches


@pytest.mark.parametrize("offload", [False, True])
def test_fsdp_fields_make_an_fsdp2_plugin(tmp_path, offload):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    cfg = load(tmp_path, "train.distributed=fsdp", f"train.cpu_offload={str(offload).lower()}")
    kw = engines.training_args_kwargs(cfg, cuda=True, world_size=4)
    assert kw["fsdp"] is True and "deepspeed" not in kw
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", fsdp=kw["fsdp"],
                             fsdp_config=kw["fsdp_config"])
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    assert (type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy") is offload  # the base OffloadPolicy: none


def test_describe_states_the_global_batch():
    line = engines.describe(4, 2, 8, 1e-4, mode="DDP", backend="nccl", max_steps=100)
    assert "4 processes (DDP, nccl); global batch 64 samples = 2 per device x 8 grad_accum x 4 processes" in line
    assert "100 optimizer steps" in line and "learning_rate 0.0001 applies to that global batch" in line


# ---------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
@pytest.mark.parametrize("mode", ["deepspeed_zero3", "fsdp"])
def test_qlora_with_sharded_weights_is_refused(tmp_path, no_launcher, quant, mode):
    cfg = load(tmp_path, f"model.quantization={quant}", f"train.distributed={mode}", "train.nproc=2")
    with pytest.raises(ConfigError) as info:
        engines.check_supported(cfg)
    text = info.value.render()
    assert f"model.quantization={quant} cannot be combined with train.distributed={mode}" in text
    assert "ddp or deepspeed_zero2" in text  # what works instead


@pytest.mark.parametrize("mode", ["ddp", "deepspeed_zero2"])
def test_qlora_with_replicated_weights_is_allowed(tmp_path, no_launcher, mode):
    engines.check_supported(load(tmp_path, "model.quantization=4bit", f"train.distributed={mode}", "train.nproc=2"))


def test_qlora_with_offload_is_refused(tmp_path, no_launcher):
    cfg = load(tmp_path, "model.quantization=4bit", "train.distributed=deepspeed_zero2", "train.cpu_offload=true")
    with pytest.raises(ConfigError, match="train.cpu_offload"):
        engines.check_supported(cfg)


def test_fsdp_needs_gpus_and_several_processes(tmp_path, no_launcher, monkeypatch):
    import torch

    cfg = load(tmp_path, "train.distributed=fsdp", "train.nproc=2")
    with pytest.raises(ConfigError, match="needs GPUs"):  # accelerate would silently run DDP on CPU processes
        engines.check_supported(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engines.check_supported(cfg)
    with pytest.raises(ConfigError, match="only one is started"):
        engines.check_supported(load(tmp_path, "train.distributed=fsdp"))


def test_deepspeed_file_must_match_the_stage(tmp_path, no_launcher):
    cfg = load(tmp_path, "train.distributed=deepspeed_zero2",
               f"train.deepspeed_config={ROOT / 'configs/distributed/deepspeed_zero3.json'}")
    with pytest.raises(ConfigError, match="stage=3 but train.distributed=deepspeed_zero2 asks for stage 2"):
        engines.check_supported(cfg)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        engines.check_supported(load(tmp_path, "train.distributed=deepspeed_zero2", f"train.deepspeed_config={bad}"))


def test_accelerate_engine_must_agree_with_the_config(tmp_path, no_launcher, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="set train.distributed=deepspeed_zero2 or deepspeed_zero3"):
        engines.check_supported(load(tmp_path))


def test_engines_need_a_launcher(tmp_path, no_launcher):
    with pytest.raises(ConfigError, match="runs under a distributed launcher"):
        launcher.setup(load(tmp_path, "train.distributed=deepspeed_zero2"))
    assert launcher.setup(load(tmp_path)).size == 1  # plain single-process training is untouched


# ---------------------------------------------------------------------------
# the launcher


def test_when_chattune_starts_torchrun(tmp_path, no_launcher, monkeypatch):
    assert not launcher.needs_launch(load(tmp_path))
    assert launcher.needs_launch(load(tmp_path, "train.nproc=2"))
    assert launcher.needs_launch(load(tmp_path, "train.distributed=deepspeed_zero3"))  # one GPU + ZeRO-3 offload
    monkeypatch.setenv("LOCAL_RANK", "0")  # already a torchrun / accelerate worker: never again
    assert not launcher.needs_launch(load(tmp_path, "train.nproc=2"))


def test_launch_command_reruns_the_same_train_command():
    args = SimpleNamespace(config="configs/demo.yaml", overrides=["train.epochs=1", "output_dir=runs/x"],
                           overwrite=True, resume=False, resume_force=False, debug=False)
    argv = launcher.worker_argv(args, 2)
    assert argv == ["train", "configs/demo.yaml", "train.epochs=1", "output_dir=runs/x", "train.nproc=2", "--overwrite"]
    assert launcher.launch_command(argv, 2) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                            "--nproc_per_node=2", "--shutdown-timeout=900",
                                            "-m", "chattune.cli", *argv]


def test_cli_nproc_hands_over_to_the_launcher(tmp_path, no_launcher, monkeypatch):
    seen = {}

    def fake_launch(cfg, args):
        seen.update(nproc=cfg.train.nproc, argv=launcher.worker_argv(args, cfg.train.nproc))
        return 7

    monkeypatch.setattr(launcher, "launch", fake_launch)
    monkeypatch.chdir(ROOT)
    assert cli.main(["train", "configs/demo.yaml", "--nproc", "2", "train.epochs=1"]) == 7  # torchrun's status
    assert seen["nproc"] == 2
    assert seen["argv"] == ["train", "configs/demo.yaml", "train.epochs=1", "train.nproc=2"]


def test_finished_run_is_refused_before_any_process_starts(tmp_path, no_launcher, monkeypatch, capsys):
    import subprocess

    run = tmp_path / "done"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("torchrun must not start"))
    monkeypatch.chdir(ROOT)
    assert cli.main(["train", "configs/demo.yaml", "--nproc", "2", f"output_dir={run}"]) == 2
    assert "a finished run is already there" in capsys.readouterr().err


def test_interrupt_is_shared_only_with_several_processes(no_launcher, monkeypatch):
    inner = SimpleNamespace(requested=False)
    assert interrupt.synced(inner) is inner
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert isinstance(interrupt.synced(inner), interrupt.SyncedInterrupt)
