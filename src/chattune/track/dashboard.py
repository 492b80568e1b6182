"""Where a run's local SwanLab dashboard data is (its swanlog folder and experiment id), and whether it can be served."""

from __future__ import annotations

import json
import socket
import sqlite3
from pathlib import Path

from chattune.errors import ChattuneError, RunDirError, installed

HOST = "127.0.0.1"  # loopback only: the dashboard has no login, so it is not offered to the network
DB_NAME = "runs.swanlab"  # the dashboard's database inside a swanlog folder


def find_logdir(path: Path) -> Path:
    """The swanlog folder for a swanlog folder, a run folder (its tracking.json or ../swanlog) or a project folder."""
    if not path.is_dir():
        raise RunDirError("no such folder", where=str(path),
                          fix="pass a run directory (e.g. runs/demo) or the folder holding several runs (e.g. runs)")
    candidates = [path, *_recorded_logdir(path), path.parent / "swanlog" if _is_run_dir(path) else None,
                  path / "swanlog"]
    for c in [c for c in candidates if c is not None]:
        if (c / DB_NAME).is_file():
            return c.resolve()
    offline = [c for c in candidates if c is not None and any(c.glob("run-*/*.swanlab"))]
    if offline:
        raise RunDirError("these SwanLab logs were written in offline/cloud mode, which the local dashboard cannot show",
                          where=str(offline[0]),
                          fix="upload them with `swanlab sync`, or train with tracking.swanlab.mode=local")
    raise RunDirError(
        "no local SwanLab logs found here (looked for swanlog/runs.swanlab)",
        where=str(path),
        fix="train with tracking.backends=[swanlab] and tracking.swanlab.mode=local (the defaults), then pass the "
            "run directory or the folder holding it; or pass the swanlog folder itself",
    )


def swanboard_installed() -> bool:
    """True when the dashboard package (swanlab[dashboard]) can be imported."""
    return installed("swanboard")


def check_port_free(port: int) -> None:
    """Refuse early, with the fix, when something already listens on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise ChattuneError(f"port {port} on {HOST} is already in use",
                                fix=f"choose another one, e.g. --port {port + 1}") from None


def experiment_id(path: Path, logdir: Path) -> int | None:
    """The dashboard's id of the experiment a run folder logged (None for a project folder or an unknown run)."""
    swan_run = _tracking(path).get("swanlab_run_dir")
    if not swan_run:
        return None
    try:
        with sqlite3.connect(f"file:{logdir / DB_NAME}?mode=ro", uri=True) as db:
            row = db.execute("SELECT id FROM experiment WHERE run_id = ?", (Path(swan_run).name,)).fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _is_run_dir(path: Path) -> bool:
    return (path / "run_config.yaml").is_file()


def _tracking(path: Path) -> dict:
    f = path / "tracking.json"
    return json.loads(f.read_text(encoding="utf-8")).get("swanlab", {}) if f.is_file() else {}


def _recorded_logdir(path: Path) -> list[Path]:
    logdir = _tracking(path).get("logdir")
    return [Path(logdir)] if logdir else []
