"""Every write of `chattune train` (and of predict / merge) failing or killed half way: the next run of the same
command resumes or restarts and ends with the adapter of an uninterrupted run, bit for bit, or refuses with a
clear message; a half-written file is never taken for a whole one. faults.py injects the faults.

The tests of the tests (test_a_plain_writer_fails_the_suite) swap the atomic writer for plain writes and check
that the same checks then fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from chattune import cli
from chattune.data.store import SampleStore
from chattune.rundir import RunDir
from chattune.train.checkpoints import last_checkpoint

from . import faults
from .conftest import FIX, STEPS, train_argv, write_config
from .test_resume import assert_same_adapter, assert_same_curve

DRIVER = Path(__file__).with_name("fault_driver.py")

# (name, kind, path contains, nth such write). The reliability config trains 8 steps, 4 per epoch, with
# checkpoints at steps 3, 6 and 8 and probe answers after epochs 0, 1 and 2.
POINTS = {
    "run config": ("atomic", "run_config.yaml", 1),
    "data report": ("atomic", "data_report.json", 1),
    "tokenisation cache": ("atomic", "tokenized", 1),
    "probe answers": ("atomic", "epoch_1.jsonl", 1),
    "metrics line": ("append", "metrics.jsonl", 5),
    "checkpoint weights": ("safetensors", "checkpoints", 2),
    "checkpoint optimizer": ("torch_save", "optimizer.pt", 2),
    "checkpoint rng state": ("torch_save", "rng_state", 3),
    "checkpoint marker": ("atomic", "chattune_checkpoint.json", 2),
    "wall time": ("atomic", "wall_time.json", 4),
    "adapter weights": ("safetensors", ".adapter.tmp", 1),
    "adapter swap": ("atomic_dir", "adapter", 1),
    "summary": ("atomic", "summary.json", 1),
}
FAST = {"checkpoint marker", "metrics line", "summary"}  # in the fast loop; every point runs in the slow one


def _param(name: str, how: str, always_slow: bool = False):
    slow = always_slow or name not in FAST
    return pytest.param(name, how, id=f"{name}-{how}", marks=[pytest.mark.slow] if slow else [])


def assert_no_half_files(run: Path) -> None:
    """Every file a later run or verb reads under its real name is whole (temporary names start with a dot)."""
    for path in run.rglob("*"):
        try:
            _check_whole(run, path)
        except Exception as exc:
            raise AssertionError(f"{path} is not whole: {exc}") from exc


def _check_whole(run: Path, path: Path) -> None:
    rel = path.relative_to(run)
    if not path.is_file() or any(part.startswith(".") for part in rel.parts):
        return
    if path.suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif path.suffix == ".yaml":
        yaml.safe_load(path.read_text(encoding="utf-8"))
    elif path.suffix == ".safetensors":
        load_file(path)
    elif path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.name == "metrics.jsonl" and lines:
            lines = lines[:-1]  # appended line by line: a torn last line is expected and dropped on resume
        for line in lines:
            json.loads(line)


def _argv(tmp: Path, model_dir: Path) -> list[str]:
    return train_argv(write_config(tmp, model_dir), tmp / "run")


def fail_then_rerun(tmp: Path, model_dir: Path, baseline: Path, mp: pytest.MonkeyPatch, name: str, how: str,
                    capsys, *, plain: bool = False) -> None:
    """Train with the fault armed, check what is left, then run the same command and compare with the baseline."""
    kind, match, nth = POINTS[name]
    argv = _argv(tmp, model_dir)
    mp.setenv("CHATTUNE_CACHE", str(tmp / "cache"))  # a fresh tokenisation cache: its write happens
    if how == "kill":
        flags = ["--plain"] if plain else []
        proc = subprocess.run([sys.executable, str(DRIVER), kind, match, str(nth), how, *flags, "--", *argv],
                              capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == -9, f"the fault never fired ({name}): {proc.stderr[-3000:]}"
    else:
        with pytest.MonkeyPatch.context() as armed:
            if plain:
                faults.plain_writers(armed)
            fault = faults.armed(kind, match, nth, how)(armed)
            rc = cli.main(argv)
        assert fault.fired, f"the fault never fired ({name}); writes of {kind}: {fault.seen}"
        err = capsys.readouterr().err
        if rc != 0:  # the fault stopped the run: one paragraph naming the file and what to do
            assert rc == 2 and "Traceback" not in err, err[-3000:]
            message = err.strip().splitlines()[-1]
            assert message.startswith("error: ") and fault.fired in message, message
            assert ("no space left" in message) if how == "enospc" else ("permission denied" in message), message
    run = tmp / "run"
    assert_no_half_files(run)
    resumes = last_checkpoint(RunDir(run)) is not None
    for entry in (tmp / "cache").rglob("*.arrow"):  # a cache entry under its real name is whole
        try:
            [s.input_ids for s in SampleStore(entry)]
        except Exception as exc:
            raise AssertionError(f"{entry} is not whole: {exc}") from exc
    assert cli.main(argv) == 0, f"the same command after the fault ({name}) did not finish the run"
    assert_same_curve(run, baseline)
    assert_same_adapter(run, baseline)
    for epoch in (0, 1, 2):
        name_ = f"epoch_{epoch}.jsonl"
        assert (run / "predictions" / name_).read_text() == (baseline / "predictions" / name_).read_text(), name_
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == STEPS
    parts = json.loads((run / "wall_time.json").read_text())["parts_s"]
    assert len(parts) == (2 if resumes else 1), "a resumed run adds its time to the killed part's"
    assert abs(summary["wall_s"] - sum(parts)) <= 0.1 * len(parts) + 0.05, (summary["wall_s"], parts)


@pytest.mark.parametrize("name,how", [_param(n, "enospc") for n in POINTS])
def test_a_failed_write_then_the_same_command_gives_the_uninterrupted_adapter(name, how, tmp_path, tiny_model_dir,
                                                                               baseline, monkeypatch, capsys):
    fail_then_rerun(tmp_path, tiny_model_dir, baseline, monkeypatch, name, how, capsys)


@pytest.mark.parametrize("name,how", [_param(n, "eacces") for n in ("checkpoint optimizer", "summary")])
def test_a_write_refused_for_permission_then_the_same_command(name, how, tmp_path, tiny_model_dir, baseline,
                                                              monkeypatch, capsys):
    fail_then_rerun(tmp_path, tiny_model_dir, baseline, monkeypatch, name, how, capsys)


@pytest.mark.parametrize("name,how", [_param(n, "kill", always_slow=True) for n in POINTS])
def test_killed_in_a_write_then_the_same_command_gives_the_uninterrupted_adapter(name, how, tmp_path, tiny_model_dir,
                                                                                  baseline, monkeypatch, capsys):
    fail_then_rerun(tmp_path, tiny_model_dir, baseline, monkeypatch, name, how, capsys)


# The test of the tests: with plain writes into the real paths, the same faults leave a half file under its real
# name, and the checks above notice (a half summary.json taken for a finished run, so the rerun is refused; half
# probe answers or a half cache entry under the real name). The checkpoint marker is written inside the staged
# folder, which is published by a rename only when whole, so it stays safe even then.
@pytest.mark.parametrize("name", ["summary", pytest.param("probe answers", marks=pytest.mark.slow),
                                  pytest.param("tokenisation cache", marks=pytest.mark.slow),
                                  pytest.param("data report", marks=pytest.mark.slow)])
def test_a_plain_writer_fails_the_suite(name, tmp_path, tiny_model_dir, baseline, monkeypatch, capsys):
    with pytest.raises(AssertionError):
        fail_then_rerun(tmp_path, tiny_model_dir, baseline, monkeypatch, name, "enospc", capsys, plain=True)


def test_enospc_names_the_path_the_space_and_the_checkpoint_that_is_intact(tmp_path, tiny_model_dir, monkeypatch,
                                                                            capsys):
    argv = _argv(tmp_path, tiny_model_dir)
    fault = faults.armed("torch_save", "optimizer.pt", 2, "enospc")(monkeypatch)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: "), "the progress bar is closed before the message"
    ckpt3 = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    assert fault.fired.endswith("optimizer.pt") and fault.fired in err
    assert "no space left on device" in err and "needed" in err and "free there" in err
    assert f"the last complete checkpoint, {ckpt3}, is intact" in err and "chattune train" in err
    assert len(err) < 800 and "Traceback" not in err
    # checkpoint-3 is untouched and complete: the staged checkpoint-6 is not published
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if not p.name.startswith(".")) == \
        ["checkpoint-3"]


@pytest.mark.slow
def test_kill_9_at_five_random_points_then_the_same_command_gives_the_uninterrupted_adapter(tmp_path, tiny_model_dir,
                                                                                           baseline):
    """The acceptance run: the same command killed with SIGKILL five times, at seeded random steps (a later step
    each time, so each kill lands), then run to the end: the adapter of the uninterrupted run, bit for bit."""
    import random

    from .conftest import run_driver

    argv = _argv(tmp_path, tiny_model_dir)
    points = sorted(random.Random(23).sample(range(1, STEPS), 5))  # global steps; the kill comes before step + 1
    run = tmp_path / "run"
    for step in points:
        proc = run_driver("kill", step, argv)
        assert proc.returncode == -9, f"kill at step {step}: {proc.stderr[-2000:]}"
        assert not (run / "summary.json").exists()
        assert_no_half_files(run)
    assert cli.main(argv) == 0
    assert_same_curve(run, baseline)
    assert_same_adapter(run, baseline)
    parts = json.loads((run / "wall_time.json").read_text())["parts_s"]
    assert len(parts) >= 2, "the parts after the first checkpoint add up"


# ---------------------------------------------------------------------------
# the outputs of later verbs


def _predict(run: Path, out: Path) -> int:
    return cli.main(["predict", str(run), "--data", str(FIX / "alpaca.json"), "--out", str(out),
                     "--max-new-tokens", "4", "--batch-size", "1"])


@pytest.fixture(scope="module")
def predicted(baseline, tmp_path_factory) -> Path:
    """An uninterrupted `chattune predict` of the baseline run: the reference OUT."""
    out = tmp_path_factory.mktemp("predict") / "answers.jsonl"
    assert _predict(baseline, out) == 0
    return out


@pytest.mark.parametrize("how", ["enospc", pytest.param("kill", marks=pytest.mark.slow)])
def test_predict_failing_in_an_append_then_the_same_command_gives_the_same_out(how, baseline, predicted, tmp_path,
                                                                              monkeypatch, capsys):
    out = tmp_path / "answers.jsonl"
    argv = ["predict", str(baseline), "--data", str(FIX / "alpaca.json"), "--out", str(out), "--max-new-tokens", "4",
            "--batch-size", "1"]
    if how == "kill":
        proc = subprocess.run([sys.executable, str(DRIVER), "append", "answers.jsonl", "3", "kill", "--", *argv],
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == -9, proc.stderr[-2000:]
    else:
        with pytest.MonkeyPatch.context() as armed:
            faults.armed("append", "answers.jsonl", 3, "enospc")(armed)
            assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {out}: cannot write it: no space left on device" in err
    lines = out.read_text().split("\n")
    assert len(lines) == 3 and lines[-1] and not lines[-1].endswith("}"), "two answers and a torn third line"
    assert cli.main(argv) == 0
    assert out.read_text() == predicted.read_text()


@pytest.mark.slow
def test_merge_failing_before_its_folder_is_published_leaves_no_out(baseline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged"
    with pytest.MonkeyPatch.context() as armed:
        faults.armed("safetensors", ".merged.tmp", 1, "enospc")(armed)
        assert cli.main(["merge", str(baseline), "--out", str(out)]) == 2
    assert "no space left on device" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")], \
        "no half-written OUT and no leftovers"
    assert cli.main(["merge", str(baseline), "--out", str(out)]) == 0
    assert load_file(next(out.glob("*.safetensors")))  # whole


def test_eval_failing_to_write_its_result_then_the_same_command_gives_the_same_result(baseline, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(baseline, run)
    argv = ["eval", str(run), "--data", str(FIX / "alpaca.json"), "--metrics", "exact", "--max-new-tokens", "4",
            "--name", "faulty"]
    with pytest.MonkeyPatch.context() as armed:
        fault = faults.armed("atomic", "faulty.json", 1, "enospc")(armed)
        assert cli.main(argv) == 2
    assert fault.fired and "no space left on device" in capsys.readouterr().err
    assert not (run / "eval" / "faulty.json").exists(), "no half result under the real name"
    assert_no_half_files(run)
    assert cli.main(argv) == 0
    result = json.loads((run / "eval" / "faulty.json").read_text())
    predictions = (run / "eval" / "faulty.predictions.jsonl").read_text().splitlines()
    assert result["predictions"].endswith("faulty.predictions.jsonl") and len(predictions) == 5
    assert all(json.loads(line) for line in predictions)
