"""Crash-safe resume: kill -9 or Ctrl-C anywhere, re-run, and the run continues as if nothing happened."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chattune import cli
from chattune.rundir import RunDir
from chattune.train import checkpoints, resume
from chattune.train.adapter import write_adapter

from .conftest import STEPS, run_driver, train_argv, train_rows, write_config

CURVE_KEYS = ("loss", "grad_norm", "learning_rate")


def assert_same_curve(run: Path, baseline: Path) -> None:
    """One row per step 1..STEPS, and the same numbers as the uninterrupted run (bit for bit on CPU)."""
    rows, ref = train_rows(run), train_rows(baseline)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), "each step exactly once"
    for key in CURVE_KEYS:
        assert [r[key] for r in rows] == [r[key] for r in ref], key


def assert_same_adapter(run: Path, baseline: Path) -> None:
    a, b = load_file(run / "adapter" / "adapter_model.safetensors"), load_file(baseline / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Ctrl-C arrives while this optimizer step runs: neither a save step (3, 6) nor an epoch's last step (4, 8).
CTRL_C_STEP = 2


def ctrl_c_during_step(argv: list[str]) -> tuple[int, str]:
    """The child presses Ctrl-C on itself while step CTRL_C_STEP runs (driver.py 'sigint'). (exit status, stderr)"""
    proc = run_driver("sigint", CTRL_C_STEP, argv)
    return proc.returncode, proc.stderr


def test_checkpoints_are_complete_and_only_the_last_n_are_kept(baseline):
    names = sorted(p.name for p in (baseline / "checkpoints").iterdir())
    assert names == ["checkpoint-6", "checkpoint-8"], "train.save_total_limit=2 keeps the last two"
    for name in names:
        marker = json.loads((baseline / "checkpoints" / name / checkpoints.MARKER).read_text())
        assert marker["step"] == int(name.split("-")[1])
        assert set(marker["fingerprints"]) == set(resume.FINGERPRINTS)
        assert (baseline / "checkpoints" / name / "adapter_model.safetensors").is_file()
        assert (baseline / "checkpoints" / name / "optimizer.pt").is_file()
        assert (baseline / "checkpoints" / name / "rng_state.pth").is_file()


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_with_the_same_curve(tmp_path, tiny_model_dir, baseline, caplog):
    argv = train_argv(write_config(tmp_path, tiny_model_dir), tmp_path / "run")
    proc = run_driver("kill", 5, argv)  # dies before step 6, after the checkpoint of step 3
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / "run"
    assert [r["step"] for r in train_rows(run)] == [1, 2, 3, 4, 5]
    assert not (run / "summary.json").exists()

    caplog.set_level("INFO", logger="chattune")
    assert cli.main(argv) == 0, "an unfinished run resumes without --overwrite"
    assert "resume: continuing from" in caplog.text
    assert_same_curve(run, baseline)
    assert_same_adapter(run, baseline)
    # Earlier epochs' probe answers are kept, later ones are those of the same weights.
    for name in ("epoch_0.jsonl", "epoch_1.jsonl", "epoch_2.jsonl"):
        assert (run / "predictions" / name).read_text() == (baseline / "predictions" / name).read_text(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["first_loss"] == train_rows(baseline)[0]["loss"]


@pytest.mark.slow
def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path, tiny_model_dir, baseline, caplog):
    argv = train_argv(write_config(tmp_path, tiny_model_dir), tmp_path / "run")
    proc = run_driver("kill-in-save", 6, argv)  # dies while checkpoint-6 is being written
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert not (ckpts / "checkpoint-6").exists(), "the half-written checkpoint has no final name"
    assert (ckpts / checkpoints.STAGING / "checkpoint-6").is_dir()
    assert checkpoints.last_checkpoint(RunDir(tmp_path / "run")).name == "checkpoint-3"

    caplog.set_level("INFO", logger="chattune")
    assert cli.main(argv) == 0
    assert "checkpoint-3 (step 3" in caplog.text
    assert not (ckpts / checkpoints.STAGING).exists()
    assert_same_curve(tmp_path / "run", baseline)


@pytest.mark.slow
def test_killed_after_the_last_step_finishes_the_run(tmp_path, tiny_model_dir, baseline):
    argv = train_argv(write_config(tmp_path, tiny_model_dir), tmp_path / "run")
    assert run_driver("kill-in-probes", 2, argv).returncode == -signal.SIGKILL  # the last epoch's probe answers
    run = tmp_path / "run"
    assert not (run / "predictions" / "epoch_2.jsonl").exists() and not (run / "summary.json").exists()
    assert cli.main(argv) == 0
    assert_same_curve(run, baseline)
    assert (run / "predictions" / "epoch_2.jsonl").read_text() == (baseline / "predictions" / "epoch_2.jsonl").read_text()
    assert json.loads((run / "summary.json").read_text())["global_step"] == STEPS


@pytest.mark.slow
def test_killed_before_the_first_checkpoint_starts_over_cleanly(tmp_path, tiny_model_dir, baseline):
    argv = train_argv(write_config(tmp_path, tiny_model_dir), tmp_path / "run")
    assert run_driver("kill", 2, argv).returncode == -signal.SIGKILL
    assert cli.main(argv) == 0
    assert_same_curve(tmp_path / "run", baseline)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_adapter_and_says_how_to_resume(tmp_path, tiny_model_dir, baseline, capsys):
    argv = train_argv(write_config(tmp_path, tiny_model_dir), tmp_path / "run")
    run = tmp_path / "run"
    returncode, err = ctrl_c_during_step(argv)
    assert returncode == 130, err[-3000:]
    assert "Traceback" not in err
    stopped = train_rows(run)[-1]["step"]
    assert stopped == CTRL_C_STEP, "the step running at Ctrl-C is finished, and no other"
    assert (run / "checkpoints" / f"checkpoint-{stopped}" / checkpoints.MARKER).is_file(), "saved at the step it stopped"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "summary.json").exists(), "an interrupted run is not finished"
    hint = next(line for line in err.splitlines() if "resume with:" in line)
    command = shlex.split(hint.split("resume with:", 1)[1])
    assert command[:2] == ["chattune", "train"] and "--overwrite" not in command

    assert cli.main(command[1:]) == 0
    assert_same_curve(run, baseline)
    assert_same_adapter(run, baseline)


@pytest.fixture(scope="module")
def crashed_template(tmp_path_factory, tiny_model_dir):
    """A run that crashed during step 5, with checkpoint-3 on disk (trained once per module)."""
    from chattune.train.trainer import ChattuneTrainer

    real = ChattuneTrainer.training_step

    def crash(self, *a, **k):
        if self.state.global_step == 4:
            raise RuntimeError("simulated crash")
        return real(self, *a, **k)

    tmp = tmp_path_factory.mktemp("crashed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ChattuneTrainer, "training_step", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            cli.main(train_argv(write_config(tmp, tiny_model_dir), tmp / "run"))
    return tmp / "run"


@pytest.fixture
def crashed_run(crashed_template, tmp_path, tiny_model_dir):
    """(argv, run): a private copy of the crashed run and the command that trained it."""
    shutil.copytree(crashed_template, tmp_path / "run")
    return train_argv(write_config(tmp_path, tiny_model_dir), tmp_path / "run"), tmp_path / "run"


@pytest.mark.parametrize("change,named", [
    (["data.max_length=64"], "data.max_length"),
    (["lora.r=4"], "LoRA shape"),
    (["lora.target_modules=[q_proj,v_proj]"], "LoRA shape"),
    (["data.limit=3"], "the training data changed"),
    (["data.template_kwargs={enable_thinking: false}"], "chat template"),
])
def test_resume_is_refused_when_inputs_changed(crashed_run, change, named, capsys):
    argv, run = crashed_run
    before = {p: p.read_bytes() for p in (run / "run_config.yaml", run / "metrics.jsonl")}
    capsys.readouterr()
    assert cli.main(argv + change) == 2
    err = capsys.readouterr().err
    assert "cannot resume from checkpoint-3" in err and named in err, err
    assert "--resume-force" in err and "--overwrite" in err and "Traceback" not in err
    assert all(p.read_bytes() == b for p, b in before.items()), "a refused resume leaves the run untouched"


def test_resume_force_continues_with_a_warning(crashed_run, caplog):
    argv, run = crashed_run
    caplog.set_level("INFO", logger="chattune")
    assert cli.main(argv + ["data.max_length=512", "--resume-force"]) == 0
    assert "--resume-force" in caplog.text and "data.max_length" in caplog.text
    assert [r["step"] for r in train_rows(run)] == list(range(1, STEPS + 1))


def test_resume_flag_needs_a_checkpoint(tmp_path, tiny_model_dir, capsys):
    argv = train_argv(write_config(tmp_path, tiny_model_dir), tmp_path / "run")
    assert cli.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "drop --resume" in err


def test_resume_flag_on_a_finished_run_and_with_overwrite(baseline, tmp_path, tiny_model_dir, capsys):
    cfg = write_config(tmp_path, tiny_model_dir)
    assert cli.main(train_argv(cfg, baseline, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main(train_argv(cfg, baseline, "--resume", "--overwrite")) == 2
    assert "contradict" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# the pieces, without training


def test_truncate_metrics_drops_later_rows_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}, {"step": 3, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert resume.truncate_metrics(path, 2) == 2
    assert [json.loads(l) for l in path.read_text().splitlines()] == rows[:3]


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    for n in (1, 2, 10, 11):
        (tmp_path / f"checkpoint-{n}").mkdir()
        (tmp_path / f"checkpoint-{n}" / checkpoints.MARKER).write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # no marker: a crash leftover
    checkpoints.rotate_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-11"], "by step, not by name"


def test_adapter_save_is_all_or_nothing(tmp_path):
    dest = tmp_path / "adapter"
    dest.mkdir()
    (dest / "adapter_model.safetensors").write_text("old")

    class Failing:
        def save_pretrained(self, folder):
            Path(folder, "adapter_model.safetensors").write_text("half")
            raise OSError("disk full")

    class Good:
        def save_pretrained(self, folder):
            Path(folder, "adapter_model.safetensors").write_text("new")

    with pytest.raises(OSError):
        write_adapter(Failing(), dest)
    assert (dest / "adapter_model.safetensors").read_text() == "old"
    write_adapter(Good(), dest)
    assert (dest / "adapter_model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no temporary folders left behind"


def test_resume_command_repeats_the_users_command_without_overwrite(monkeypatch, tmp_path):
    run_dir = RunDir(tmp_path / "run")
    monkeypatch.setattr(sys, "argv", ["/usr/bin/chattune", "train", "configs/demo.yaml", "output_dir=runs/my run",
                                      "--overwrite"])
    assert resume.resume_command(run_dir) == "chattune train configs/demo.yaml 'output_dir=runs/my run'"
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert resume.resume_command(run_dir) == f"chattune train {run_dir.config_file} --resume"


@pytest.mark.slow
def test_ctrl_c_with_swanlab_tracking_still_saves_and_exits_130(tmp_path, tiny_model_dir):
    """swanlab.init installs its own SIGINT handler; ours must stay in charge (save, hint, exit 130)."""
    pytest.importorskip("swanlab")
    run = tmp_path / "run"
    argv = train_argv(write_config(tmp_path, tiny_model_dir), run, "tracking.backends=[swanlab]",
                      "tracking.swanlab.mode=offline", f"tracking.swanlab.logdir={tmp_path / 'swanlog'}")
    returncode, err = ctrl_c_during_step(argv)
    assert returncode == 130, err[-3000:]
    assert "Traceback" not in err and "resume with:" in err
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    stopped = train_rows(run)[-1]["step"]
    assert stopped == CTRL_C_STEP
    assert sorted(p.name for p in (run / "predictions").iterdir()) == ["epoch_0.jsonl"], \
        f"no answers for the epoch cut short at step {stopped}"
