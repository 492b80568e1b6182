"""The run directory: the contract between `train` and every later verb.

    RUN/
      run_config.yaml        resolved config (later verbs read it instead of asking again)
      chat_template.jinja    the exact template used for training
      tokenizer/             tokenizer files, template included
      adapter/               adapter_config.json + adapter_model.safetensors (no base weights)
      metrics.jsonl          one line per logging step
      predictions/epoch_K.jsonl   probe answers; epoch_0 = before training
      checkpoints/           trainer checkpoints (resume)
      data_report.json       what loading and rendering kept, truncated, skipped
      summary.json           written last: the run finished
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from chattune import config as config_mod
from chattune.errors import ConfigError, LockedError, RunDirError

log = logging.getLogger("chattune")
# Set for the processes a chattune launcher starts while it holds the lock of their output folder.
LOCK_HELD_ENV = "CHATTUNE_LOCK_HELD"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "run_config.yaml"

    @property
    def template_file(self) -> Path:
        return self.root / "chat_template.jinja"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def data_report(self) -> Path:
        return self.root / "data_report.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def wall_time(self) -> Path:
        """Seconds spent by each process that worked on the run (a resumed run has several parts)."""
        return self.root / "wall_time.json"

    def is_finished(self) -> bool:
        """True once training wrote its summary (the last file of a run)."""
        return self.summary.is_file()

    def load_config(self) -> config_mod.RunConfig:
        """The resolved config this run was trained with."""
        if not self.config_file.is_file():
            raise RunDirError(
                "not a chattune run directory (no run_config.yaml)",
                where=str(self.root),
                fix="pass the output_dir of a `chattune train` run, e.g. runs/demo",
            )
        return config_mod.load(self.config_file)

    def require_adapter(self) -> None:
        """Fail with a clear message when training has not produced an adapter yet."""
        if not (self.adapter / "adapter_config.json").is_file():
            raise RunDirError(
                "the run has no adapter yet (training unfinished or failed)",
                where=str(self.adapter),
                fix="finish `chattune train` for this run first",
            )


def prepare_run_dir(cfg: config_mod.RunConfig, *, overwrite: bool, resume: bool = False) -> RunDir:
    """Create the run directory; refuse to train over a finished run unless told to.

    An unfinished run is kept: training resumes it from its last checkpoint (see train/resume.py).
    """
    run_dir = RunDir(Path(cfg.output_dir))
    if overwrite and resume:
        raise ConfigError("--overwrite and --resume contradict each other", where="chattune train",
                          fix="--resume continues the run in output_dir, --overwrite deletes it first: pass one")
    if run_dir.is_finished() and not overwrite:
        raise RunDirError(
            "a finished run is already there" + (", so there is nothing to resume" if resume else ""),
            where=str(run_dir.root),
            fix="pass --overwrite to replace it, or choose another output_dir (e.g. output_dir=runs/demo2)",
        )
    if run_dir.root.exists() and overwrite:
        shutil.rmtree(run_dir.root)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    return run_dir


# ---------------------------------------------------------------------------
# one writer per output: a lock file beside it naming the process that writes there


def lock_path(path: str | Path) -> Path:
    """The lock file of an output folder or file: beside it, so `--overwrite` deleting the folder keeps the lock."""
    path = Path(path).absolute()
    return path.parent / f".{path.name}.lock"


@contextmanager
def run_lock(path: str | Path, purpose: str) -> Iterator[Path]:
    """Hold the lock of output `path` (a run folder, a predictions file, an export folder) while the block runs.

    A live process holding it (this host: its pid runs and started when the lock says; another host: cannot be
    checked) makes this raise LockedError naming its pid, host and purpose. A lock left by a process that is no
    longer running is taken over with a warning. `purpose` is what the lock file says, e.g. "chattune train".
    """
    lock = lock_path(path)
    if os.environ.get(LOCK_HELD_ENV) == str(lock):  # started by a chattune process that holds it for us
        yield lock
        return
    me = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "started_at": time.time(),
          "process_start": _process_start(os.getpid())}
    _acquire(lock, me, Path(path))
    try:
        yield lock
    finally:
        if _read_lock(lock) == me:
            lock.unlink(missing_ok=True)


def _acquire(lock: Path, me: dict[str, Any], target: Path) -> None:
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # another process may take over the same stale lock at the same time: try again
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(lock)
            if holder is not None and _alive(holder):
                raise LockedError(
                    f"{holder.get('purpose', 'another chattune process')} (pid {holder.get('pid')} on host "
                    f"{holder.get('host')}) is writing here now", where=str(target),
                    fix=f"wait for it to finish or stop it, or choose another output; if that process is gone "
                    f"(e.g. its machine restarted), delete {lock}")
            _take_over(lock, holder)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(me) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return
    raise LockedError("could not take the lock: other processes keep taking it", where=str(lock),
                      fix="run one chattune process per output at a time")


def _take_over(lock: Path, holder: dict[str, Any] | None) -> None:
    # Rename first: of two processes taking over the same stale lock, only one rename succeeds.
    stale = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.replace(lock, stale)
    except FileNotFoundError:
        return
    stale.unlink(missing_ok=True)
    who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "an unreadable lock file"
    log.warning("lock: %s was left by %s, which is no longer running; taking it over", lock, who)


def _read_lock(lock: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the process a lock names still runs (a lock from another host counts as alive: it cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    fields = _proc_stat(pid)
    if fields and fields[0] == "Z":  # exited, not yet reaped by its parent
        return False
    start = _process_start(pid)  # the same pid reused by a later process is not the holder
    return start is None or holder.get("process_start") in (None, start)


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None where there is no /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


@contextmanager
def removed_if_left_empty(folder: Path) -> Iterator[None]:
    """When the block fails, remove `folder` if nothing was written into it (a failed run leaves no empty folder)."""
    try:
        yield
    except BaseException:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            pass
        raise
