"""One writer per output: a second `chattune train` (or predict, merge, export, eval) into an output a live process is writing
is refused naming its pid and host; a lock left by a dead process is taken over with a message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from chattune import cli
from chattune.errors import LockedError
from chattune.rundir import lock_path, run_lock

from .conftest import FIX, train_argv, train_rows, write_config

DRIVER = Path(__file__).with_name("fault_driver.py")
SRC = str(Path(__file__).parents[2] / "src")


def hold_lock(path: Path, purpose: str = "chattune predict") -> subprocess.Popen:
    """A real second process holding the lock of `path` until its stdin is closed."""
    code = textwrap.dedent(f"""
        import sys
        from chattune.rundir import run_lock
        with run_lock({str(path)!r}, {purpose!r}):
            print("LOCKED", flush=True)
            sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "LOCKED"
    return proc


def release(proc: subprocess.Popen) -> int:
    proc.stdin.close()
    return proc.wait(timeout=600)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_second_train_into_a_live_runs_folder_is_refused(tmp_path, tiny_model_dir, capsys):
    argv = train_argv(write_config(tmp_path, tiny_model_dir), tmp_path / "run")
    # The first `chattune train` pauses, alive, while it appends its 2nd metrics line.
    first = subprocess.Popen([sys.executable, str(DRIVER), "append", "metrics.jsonl", "2", "pause", "--", *argv],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        while (line := first.stdout.readline()) and line.strip() != "PAUSED":
            pass
        assert line.strip() == "PAUSED", "the first run never reached its 2nd metrics line"
        before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
        for extra in ([], ["--overwrite"]):
            assert cli.main(argv + extra) == 2
            err = capsys.readouterr().err
            assert f"pid {first.pid} on host {socket.gethostname()}" in err and "chattune train" in err, err
            assert "is writing here now" in err
        after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
        assert before == after, "the refused runs touched nothing (not even with --overwrite)"
    finally:
        rc = release(first)
    assert rc == 0
    assert [r["step"] for r in train_rows(tmp_path / "run")] == list(range(1, 9))
    assert not lock_path(tmp_path / "run").exists(), "the lock goes with the run"


def test_predict_out_is_locked_by_a_live_process(tmp_path, baseline, capsys):
    out = tmp_path / "answers.jsonl"
    holder = hold_lock(out)
    try:
        rc = cli.main(["predict", str(baseline), "--data", str(FIX / "alpaca.json"), "--out", str(out)])
        err = capsys.readouterr().err
    finally:
        release(holder)
    assert rc == 2 and f"pid {holder.pid}" in err and "chattune predict" in err, err
    assert not out.exists()


def test_an_eval_result_is_locked_by_a_live_process(tmp_path, baseline, capsys):
    # Two evals under one --name would interleave one result's two files; the second is refused before loading.
    result = baseline / "eval" / "held.json"
    argv = ["eval", str(baseline), "--data", str(FIX / "alpaca.json"), "--name", "held", "--limit", "2",
            "--max-new-tokens", "4"]
    holder = hold_lock(result, "chattune eval")
    try:
        rc = cli.main(argv)
        err = capsys.readouterr().err
    finally:
        release(holder)
    assert rc == 2 and f"pid {holder.pid}" in err and "chattune eval" in err, err
    assert not result.exists()
    assert cli.main(argv) == 0 and result.exists()
    assert not lock_path(result).exists(), "the lock goes with the eval that held it"


def test_a_live_lock_names_pid_host_and_purpose(tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out, "chattune train")
    try:
        with pytest.raises(LockedError) as exc, run_lock(out, "chattune train"):
            pass
    finally:
        release(holder)
    text = exc.value.render()
    assert f"chattune train (pid {holder.pid} on host {socket.gethostname()}) is writing here now" in text
    assert str(lock_path(out)) in text, "the fix names the lock file to delete if that process is gone"
    with run_lock(out, "chattune train"):  # released by the holder: free again
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def _write_lock(out: Path, **fields) -> None:
    lock_path(out).parent.mkdir(parents=True, exist_ok=True)
    lock_path(out).write_text(json.dumps({"purpose": "chattune train", "host": socket.gethostname(), **fields}))


@pytest.mark.parametrize("how", ["dead pid", "reused pid", "unreadable"])
def test_a_stale_lock_is_taken_over_with_a_message(tmp_path, caplog, how):
    out = tmp_path / "run"
    if how == "dead pid":
        _write_lock(out, pid=dead_pid(), process_start=1)
    elif how == "reused pid":  # our own pid, but the lock's process started at another time
        _write_lock(out, pid=os.getpid(), process_start=-1)
    else:
        lock_path(out).parent.mkdir(parents=True, exist_ok=True)
        lock_path(out).write_text('{"pid": 12')  # cut short
    caplog.set_level("WARNING", logger="chattune")
    with run_lock(out, "chattune train"):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert "no longer running; taking it over" in caplog.text
    assert not lock_path(out).exists()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "run"
    _write_lock(out, pid=1, host="some-other-machine")
    with pytest.raises(LockedError, match="some-other-machine"), run_lock(out, "chattune train"):
        pass
    assert lock_path(out).exists(), "left for its owner"


def test_the_same_process_cannot_write_one_output_twice(tmp_path):
    # e.g. two runs started from the same `chattune ui` process into one folder
    with run_lock(tmp_path / "run", "chattune ui"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"), run_lock(tmp_path / "run", "chattune train"):
            pass


def test_export_out_is_locked_by_a_live_process(tmp_path, baseline, capsys):
    # A second export into a folder another export is writing: refused before any merge or conversion starts, and
    # even --overwrite leaves the earlier export's files as they were.
    out = tmp_path / "gguf"
    out.mkdir()
    (out / "Modelfile").write_text("FROM earlier.gguf\n")
    holder = hold_lock(out, "chattune export")
    try:
        rc = cli.main(["export", str(baseline), "--out", str(out), "--quant", "f16", "--overwrite", "--no-check"])
        err = capsys.readouterr().err
    finally:
        release(holder)
    assert rc == 2 and f"pid {holder.pid}" in err and "chattune export" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile"]
    assert (out / "Modelfile").read_text() == "FROM earlier.gguf\n"
    assert not any(p.name.startswith(".gguf.tmp-") for p in tmp_path.iterdir()), "no half-written folder left beside"
