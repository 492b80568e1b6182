"""The tracker factory, the names trackers log under, credentials, and `chattune dashboard`'s folder finding."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from chattune import cli
from chattune.config import validate
from chattune.data.formats import Conversation
from chattune.errors import ChattuneError, ConfigError, MissingDependencyError, RunDirError
from chattune.rundir import RunDir
from chattune.track import make_trackers
from chattune.verbs import dashboard
from chattune.track.base import Tracker, prediction_text, train_scalars

SECRET = "sk-chattune-test-0123456789abcdef"
ROW = {"step": 3, "epoch": 0.75, "loss": 1.5, "grad_norm": 0.25, "learning_rate": 1e-3, "tokens_per_s": 99.0}
PROBES = [{"epoch": 0, "step": 0, "question": "Who are you?", "answer": "A model.", "reference": "Lumi.", "where": "p:1"}]


def make_cfg(tmp_path: Path, **tracking):
    return validate({"data": {"train": ["x.json"]}, "output_dir": str(tmp_path / "proj" / "run"), "tracking": tracking})


class Recorder(Tracker):
    def __init__(self):
        self.calls = []

    def log_scalars(self, scalars, step):
        self.calls.append((step, scalars))


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No SwanLab key anywhere SwanLab looks: environment, ~/.swanlab, ./.swanlab, ./.env."""
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path / "home" / ".swanlab"))
    monkeypatch.chdir(tmp_path)


def test_default_backend_is_swanlab_in_local_mode(tmp_path):
    cfg = validate({"data": {"train": ["x.json"]}})
    assert cfg.tracking.backends == ["swanlab"] and cfg.tracking.swanlab.mode == "local"


def test_none_gives_no_trackers_and_repeats_collapse(tmp_path):
    assert make_trackers(make_cfg(tmp_path, backends=["none"]), RunDir(tmp_path)) == []
    trackers = make_trackers(make_cfg(tmp_path, backends=["swanlab", "tensorboard", "swanlab", "none"]), RunDir(tmp_path))
    assert [t.name for t in trackers] == ["swanlab", "tensorboard"]


def test_only_the_main_process_tracks(tmp_path, monkeypatch):
    import chattune.track as track

    monkeypatch.setattr(track, "is_main_process", lambda: False)
    assert make_trackers(make_cfg(tmp_path, backends=["swanlab", "tensorboard"]), RunDir(tmp_path)) == []


def test_metric_rows_use_the_tutorial_names():
    assert train_scalars(ROW) == {"train/loss": 1.5, "train/grad_norm": 0.25, "train/learning_rate": 1e-3,
                                  "train/epoch": 0.75, "train/tokens_per_s": 99.0}
    on_gpu = {**ROW, "mfu": 0.41, "peak_mem_gib": 12.5}  # gpu_stats' keys, on a CUDA device only
    assert train_scalars(on_gpu) == {**train_scalars(ROW), "train/mfu": 0.41, "train/peak_mem_gib": 12.5}
    rec = Recorder()
    rec.log_row(ROW, 3)
    rec.log_row({"step": 4, "epoch": 1.0, "eval_loss": 2.0, "eval_ppl": 7.39}, 4)
    assert rec.calls[1] == (4, {"eval/loss": 2.0, "eval/ppl": 7.39}), "an eval row logs eval/... only"


def test_prediction_text_holds_question_answer_and_ground_truth():
    assert prediction_text(PROBES[0]) == "question: Who are you?\nanswer: A model.\nground truth: Lumi."


def test_probes_come_from_eval_rows_when_there_are_some(tmp_path):
    from chattune.train.inputs import split_probes

    conv = lambda i: Conversation([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], f"f:{i}")
    train, evals = [conv(i) for i in range(5)], [conv(i) for i in range(10, 13)]
    cfg = make_cfg(tmp_path, probe_size=2)
    probes, rest = split_probes(cfg, train, evals)
    assert [p.where for p in probes] == ["f:10", "f:11"] and rest == train, "eval rows are never trained on"
    probes, rest = split_probes(cfg, train, [])
    assert [p.where for p in probes] == ["f:0", "f:1"] and rest == train[2:], "else held out of training"


def test_missing_swanlab_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "swanlab", None)
    with pytest.raises(MissingDependencyError, match="chattune\\[swanlab\\]"):
        make_trackers(make_cfg(tmp_path), RunDir(tmp_path))


def test_cloud_mode_without_a_key_says_how_to_get_one(tmp_path, no_credentials):
    with pytest.raises(ConfigError, match="SWANLAB_API_KEY"):
        make_trackers(make_cfg(tmp_path, swanlab={"mode": "cloud"}), RunDir(tmp_path))


def test_cloud_mode_leaves_the_key_to_swanlab(tmp_path, no_credentials, monkeypatch):
    import swanlab

    from chattune import config as config_mod

    monkeypatch.setenv("SWANLAB_API_KEY", SECRET)
    seen = {}

    def fake_init(**kw):
        seen.update(kw)
        return types.SimpleNamespace(name="run", dir=tmp_path / "swanlog" / "run-x", log=lambda *a, **k: None,
                                     finish=lambda **k: None)

    monkeypatch.setattr(swanlab, "init", fake_init)
    cfg = make_cfg(tmp_path, swanlab={"mode": "cloud", "project": "legal"})
    run_dir = RunDir(tmp_path / "proj" / "run")
    run_dir.root.mkdir(parents=True)
    config_mod.dump(cfg, run_dir.config_file)
    (tracker,) = make_trackers(cfg, run_dir)
    tracker.start({"lora": {"r": 8}})
    tracker.finish()
    assert seen["settings"].mode == "online" and seen["project"] == "legal" and seen["name"] == "run"
    assert SECRET not in repr({k: v for k, v in seen.items() if k != "settings"}), "the key is not passed as config"
    for f in run_dir.root.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(encoding="utf-8"), f


def test_offline_logs_never_contain_the_key(tmp_path, no_credentials, monkeypatch, network_attempts):
    monkeypatch.setenv("SWANLAB_API_KEY", SECRET)
    # SwanLab would post to this at init; outside cloud mode chattune switches it off.
    monkeypatch.setenv("SWANLAB_WEBHOOK", "http://hooks.example.invalid/x")
    cfg = make_cfg(tmp_path, swanlab={"mode": "offline"})
    run_dir = RunDir(tmp_path / "proj" / "run")
    run_dir.root.mkdir(parents=True)
    (tracker,) = make_trackers(cfg, run_dir)
    tracker.start({"lora": {"r": 8}})
    tracker.log_row(ROW, 3)
    tracker.log_predictions(PROBES, 0, 0)
    tracker.finish()
    files = [f for f in (tmp_path / "proj").rglob("*") if f.is_file()]
    assert any(f.suffix == ".swanlab" for f in files), "offline mode wrote its logs"
    for f in files:
        assert SECRET.encode() not in f.read_bytes(), f
    assert network_attempts == []


def test_wandb_tracker_logs_the_same_names(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self, exit_code):
            calls.append(("finish", exit_code))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    fake.Table = lambda columns, data: {"columns": columns, "data": data}
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_NAME", raising=False)
    (tracker,) = make_trackers(make_cfg(tmp_path, backends=["wandb"]), RunDir(tmp_path / "proj" / "run"))
    tracker.start({"lora": {"r": 8}})
    tracker.log_row(ROW, 3)
    tracker.log_predictions(PROBES, 0, 0)
    tracker.finish()
    assert calls[0][1]["project"] == "proj" and calls[0][1]["name"] == "run" and calls[0][1]["config"] == {"lora": {"r": 8}}
    assert calls[1] == ("log", train_scalars(ROW), 3)
    assert calls[2][1]["Prediction"]["data"] == [[0, "Who are you?", "A model.", "Lumi."]] and calls[2][2] == 0
    assert calls[3] == ("finish", 0)


# ---------------------------------------------------------------------------
# chattune dashboard: which folder, and the errors


def test_dashboard_finds_the_swanlog_folder_from_run_project_or_itself(tmp_path):
    log = tmp_path / "proj" / "swanlog"
    log.mkdir(parents=True)
    (log / "runs.swanlab").write_bytes(b"")
    run = tmp_path / "proj" / "run"
    run.mkdir()
    (run / "run_config.yaml").write_text("{}")
    for p in (run, tmp_path / "proj", log):
        assert dashboard.find_logdir(p) == log.resolve()
    custom = tmp_path / "elsewhere"
    custom.mkdir()
    (custom / "runs.swanlab").write_bytes(b"")
    (run / "tracking.json").write_text(json.dumps({"swanlab": {"logdir": str(custom)}}))
    assert dashboard.find_logdir(run) == custom.resolve(), "tracking.swanlab.logdir recorded by the run wins"


def test_dashboard_errors_are_one_paragraph(tmp_path, monkeypatch, capsys):
    assert cli.main(["dashboard", str(tmp_path / "missing")]) == 2
    assert cli.main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and "no local SwanLab logs" in err and "Traceback" not in err
    offline = tmp_path / "swanlog" / "run-1"
    offline.mkdir(parents=True)
    (offline / "run-1.swanlab").write_bytes(b"")
    with pytest.raises(RunDirError, match="offline"):
        dashboard.find_logdir(tmp_path)
    (tmp_path / "swanlog" / "runs.swanlab").write_bytes(b"")
    monkeypatch.setattr(dashboard, "swanboard_installed", lambda: False)
    with pytest.raises(ChattuneError, match=r"swanlab\]"):
        dashboard.run(str(tmp_path))


def test_dashboard_refuses_a_busy_port(tmp_path):
    import socket

    (tmp_path / "swanlog").mkdir()
    (tmp_path / "swanlog" / "runs.swanlab").write_bytes(b"")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ChattuneError, match=f"--port {port + 1}"):
            dashboard.run(str(tmp_path), port=port)


def test_legal_recipe_config():
    from chattune import config

    cfg = config.load(Path(__file__).parents[2] / "configs" / "legal_qwen2.5_coder.yaml")
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
    assert sorted(cfg.lora.target_modules) == sorted(f"{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down"))
    t = cfg.train
    assert (t.batch_size, t.grad_accum, t.learning_rate, t.epochs) == (2, 8, 1e-4, 1)
    assert cfg.data.instruction_as == "system" and cfg.data.system == "你是一个法律专家，请根据用户的问题给出专业的回答"
    assert cfg.tracking.probe_size == 5 and cfg.tracking.backends == ["swanlab"]
    assert cfg.tracking.swanlab.project and cfg.tracking.swanlab.experiment


def test_disabled_mode_writes_nothing(tmp_path, no_credentials, network_attempts):
    run_dir = RunDir(tmp_path / "proj" / "run")
    run_dir.root.mkdir(parents=True)
    (tracker,) = make_trackers(make_cfg(tmp_path, swanlab={"mode": "disabled"}), run_dir)
    tracker.start({"lora": {"r": 8}})
    tracker.log_row(ROW, 3)
    tracker.log_predictions(PROBES, 0, 0)
    tracker.finish()
    assert [p.name for p in (tmp_path / "proj").iterdir()] == ["run"] and not any(run_dir.root.iterdir())
    assert network_attempts == []
