"""Background `chattune` processes started by the page: training (and eval, merge), found again after a reload.

Each job is the CLI itself (`python -m chattune.cli VERB ...`) in its own process group, its output in a log
file, and a small JSON record (pid, command, log) beside the run directory, so a refreshed page or a second
tab finds the process again. Nothing here imports Gradio.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chattune.errors import RunDirError
from chattune.files import write_json
from chattune.rundir import RunDir

JOBS_DIR = ".chattune-ui"  # beside the run directory: `train --overwrite` deletes the run directory itself
RECENT_S = 120  # metrics written this recently by a process we did not start: a run from the CLI is live


@dataclass(frozen=True)
class Job:
    """One started process: what it runs, where it logs, how to find it again."""

    name: str  # e.g. train
    run_dir: Path
    pid: int
    command: list[str]
    log: Path

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)


def record_path(run_dir: Path, name: str) -> Path:
    return run_dir.parent / JOBS_DIR / f"{run_dir.name}.{name}.json"


def log_path(run_dir: Path, name: str) -> Path:
    return run_dir.parent / JOBS_DIR / f"{run_dir.name}.{name}.log"


def pid_alive(pid: int) -> bool:
    """True while the process runs (a finished child not yet reaped counts as finished)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, PermissionError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def find(run_dir: Path, name: str) -> Job | None:
    """The job last started for this run directory, running or not."""
    path = record_path(run_dir, name)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        return Job(name, run_dir, int(rec["pid"]), list(rec["command"]), Path(rec["log"]))
    except (OSError, ValueError, KeyError):
        return None


def run_in_use(run_dir: Path) -> str | None:
    """Why this run directory is in use by a live training, or None when it is free.

    One place for the question, so it can move to the run directory's lock once rundir.py has one.
    """
    job = find(run_dir, "train")
    if job and job.alive:
        return f"a training started from this page is running there (process {job.pid})"
    metrics = RunDir(run_dir).metrics
    if not metrics.is_file() or RunDir(run_dir).is_finished():
        return None
    written = metrics.stat().st_mtime
    if job and job.log.is_file() and job.log.stat().st_mtime >= written - 1:
        return None  # the last metrics came from the page's own training, which has ended (it logs until it stops)
    if time.time() - written < RECENT_S:
        return f"its metrics.jsonl was written {time.time() - written:.0f} s ago by a running training"
    return None


def start(name: str, run_dir: Path, argv: list[str], cwd: Path) -> Job:
    """Start `chattune ARGV...` in the background; refuse a training into a run directory in use."""
    if name == "train":
        busy = run_in_use(run_dir)
        if busy:
            raise RunDirError(f"this run directory is in use: {busy}", where=str(run_dir),
                              fix="wait for it, stop it on the Train tab, or choose another output_dir")
    log = log_path(run_dir, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "chattune.cli", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()}
    with open(log, "ab") as out:  # the child's own output: appended to, never rewritten (not a files.py record)
        out.write(f"\n$ chattune {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    job = Job(name, run_dir, proc.pid, command, log)
    write_json(record_path(run_dir, name), {"pid": proc.pid, "command": command, "log": str(log),
                                            "started": time.time()})
    _reap_later(proc)
    return job


def _pythonpath() -> str:
    """The child imports this same chattune (a source checkout on PYTHONPATH included)."""
    here = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH", "")
    return here + (os.pathsep + rest if rest else "")


_CHILDREN: list[subprocess.Popen] = []


def _reap_later(proc: subprocess.Popen) -> None:
    """Keep the Popen so finished children are reaped (poll) instead of lingering as zombies."""
    _CHILDREN.append(proc)
    for p in list(_CHILDREN):
        if p.poll() is not None:
            _CHILDREN.remove(p)


def exit_status(job: Job) -> int | None:
    """The exit status of a finished child started by this process; None while running or unknown."""
    for p in _CHILDREN:
        if p.pid == job.pid:
            return p.poll()
    return None


def stop(job: Job) -> bool:
    """Ctrl-C the job (training saves a checkpoint and can resume); False when it was not running."""
    if not job.alive:
        return False
    os.killpg(job.pid, signal.SIGINT)
    return True


_ERROR = re.compile(r"^(error: .+|[A-Za-z_.]*(Error|Exception|Interrupt)\b.*)$")


def last_error(log: Path, tail_bytes: int = 64_000) -> str | None:
    """The last error line of a log: chattune's one-paragraph `error: ...`, or a traceback's final line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    start = max((i for i, line in enumerate(lines) if line.startswith("$ chattune ")), default=0)
    found = [line.strip() for line in lines[start:] if _ERROR.match(line.strip())]
    return found[-1] if found else None


_BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")


def progress(log: Path, tail_bytes: int = 8_000) -> tuple[int, int, str] | None:
    """(step, total steps, ETA) from the training bar's last state in the log."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = _BAR.findall(text)
    if not found:
        return None
    step, total, _, eta = found[-1]
    return int(step), int(total), eta
