"""One run, one curve: a resumed run continues its SwanLab experiment, TensorBoard folder and W&B run instead of
starting a second one, and summary.json's wall_s counts every part of the run."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from chattune import config as config_mod
from chattune.files import append_jsonl
from chattune.rundir import RunDir
from chattune.track import make_trackers
from chattune.train.records import WallClock


def make_cfg(tmp: Path, backends: list[str], **swanlab) -> config_mod.RunConfig:
    return config_mod.validate({"model": {"name_or_path": "x"}, "data": {"train": ["d.json"]},
                                "output_dir": str(tmp / "proj" / "run"),
                                "tracking": {"backends": backends, "swanlab": swanlab}})


def row(step: int) -> dict:
    # a loss that names its step, to find the curve again in what the tracker wrote
    return {"step": step, "epoch": step / 4, "loss": 100.0 + step, "grad_norm": 1.0, "learning_rate": 1e-3,
            "tokens_per_s": 10.0}


def part(cfg, run_dir: RunDir, steps: range, *, resume_step: int | None, finish: bool = True):
    (tracker,) = make_trackers(cfg, run_dir, resume_step=resume_step)
    tracker.start({"lora": {"r": 8}})
    for step in steps:
        append_jsonl(run_dir.metrics, row(step))
        tracker.log_row(row(step), step)
    if finish:
        tracker.finish()
    return tracker


def killed_then_resumed(cfg, run_dir: RunDir, *, finish_first: bool = False):
    """Steps 1-5 logged, killed (no finish); metrics cut back to the checkpoint at step 3; steps 4-8 resumed."""
    run_dir.root.mkdir(parents=True, exist_ok=True)
    first = part(cfg, run_dir, range(1, 6), resume_step=None, finish=finish_first)
    run_dir.metrics.write_text("".join(json.dumps(row(s)) + "\n" for s in (1, 2, 3)))  # resume.prepare_files
    second = part(cfg, run_dir, range(4, 9), resume_step=3)
    return first, second


def test_tensorboard_continues_the_same_folder_without_the_killed_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_cfg(tmp_path, ["tensorboard"])
    run_dir = RunDir(Path(cfg.output_dir))
    first, _ = killed_then_resumed(cfg, run_dir, finish_first=True)
    first.writer = None
    events = EventAccumulator(str(run_dir.root / "tensorboard"))
    events.Reload()
    steps = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert steps == [(s, 100.0 + s) for s in range(1, 9)], "one curve: the killed part's steps 4-5 purged"


def test_wandb_resumes_the_same_run_id(tmp_path, monkeypatch):
    inits = []
    fake = types.SimpleNamespace(
        init=lambda **kw: inits.append(kw) or types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda **k: None),
        Table=None)
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    cfg = make_cfg(tmp_path, ["wandb"])
    run_dir = RunDir(Path(cfg.output_dir))
    killed_then_resumed(cfg, run_dir)
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
    assert json.loads((run_dir.root / "tracking.json").read_text())["wandb"]["id"] == inits[0]["id"]
    # a fresh run (an --overwrite, or another output_dir) gets a new id
    part(cfg, run_dir, range(1, 2), resume_step=None)
    assert inits[2]["id"] != inits[0]["id"]


def test_swanlab_offline_resumes_the_same_experiment_id(tmp_path, monkeypatch, no_credentials):
    import swanlab

    inits = []
    real_init = swanlab.init

    def spy(**kw):
        inits.append(kw)
        return real_init(**kw)

    monkeypatch.setattr(swanlab, "init", spy)
    cfg = make_cfg(tmp_path, ["swanlab"], mode="offline")
    killed_then_resumed(cfg, RunDir(Path(cfg.output_dir)))
    assert inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.delenv("SWANLAB_LOG_DIR", raising=False)


@pytest.mark.slow
# In this one process the "killed" first part's SwanLab thread is still alive and sees its experiment removed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_swanlab_local_shows_one_experiment_with_the_whole_curve(tmp_path, no_credentials):
    from swanboard.db import connect
    from swanboard.db.models import Experiment

    cfg = make_cfg(tmp_path, ["swanlab"], mode="local", project="proj")
    run_dir = RunDir(Path(cfg.output_dir))
    _, second = killed_then_resumed(cfg, run_dir)
    logdir = tmp_path / "proj" / "swanlog"
    connect(autocreate=True, path=str(logdir))
    names = [e.name for e in Experiment.select()]
    assert names == ["run"], f"one experiment, not a second one beside the killed one: {names}"
    assert Experiment.get(name="run").status == 1, "finished, not left running"
    entry = json.loads((run_dir.root / "tracking.json").read_text())["swanlab"]
    losses = []
    for log in (Path(entry["swanlab_run_dir"]) / "logs").rglob("*.log"):
        for line in log.read_text().splitlines():
            item = json.loads(line)
            if isinstance(item.get("data"), (int, float)) and 100 < item["data"] < 200:
                losses.append((item["index"], item["data"]))
    assert sorted(losses) == [(s, 100.0 + s) for s in range(1, 9)], "the kept history replayed, then the rest"


def test_wall_s_adds_every_part(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.root.mkdir()
    run_dir.wall_time.write_text(json.dumps({"parts_s": [120.5, 30.0]}))  # two earlier parts, killed
    clock = WallClock(run_dir, resumed=True)
    assert 150.5 <= clock.seconds() < 150.5 + 60
    clock.record()
    parts = json.loads(run_dir.wall_time.read_text())["parts_s"]
    assert parts[:2] == [120.5, 30.0] and len(parts) == 3
    assert WallClock(run_dir, resumed=False).seconds() < 60, "a fresh start does not count an older run's time"
