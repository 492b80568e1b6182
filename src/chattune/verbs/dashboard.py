"""`chattune dashboard`: the local SwanLab dashboard (what `swanlab watch` starts) for a run or project folder."""

from __future__ import annotations

import os
from pathlib import Path

from chattune.errors import MissingDependencyError
from chattune.track.dashboard import HOST, check_port_free, experiment_id, find_logdir, swanboard_installed


def run(path: str, *, port: int = 5092) -> None:
    """Serve the local SwanLab dashboard of a run folder, a project folder or a swanlog folder until Ctrl+C."""
    logdir = find_logdir(Path(path))
    if not swanboard_installed():
        raise MissingDependencyError("swanboard", pip="pip install 'chattune[swanlab]'", note="installs swanlab[dashboard]",
                                     what="the local SwanLab dashboard (swanboard) is not installed")
    check_port_free(port)
    url = f"http://{HOST}:{port}"
    print(f"SwanLab dashboard: {url}  (logs: {logdir}; Ctrl+C stops it)", flush=True)
    exp_id = experiment_id(Path(path), logdir)
    if exp_id is not None:
        print(f"this run:          {url}/experiment/{exp_id}/chart", flush=True)
    # swanboard reads its log folder from the environment when it is imported.
    os.environ["SWANLAB_LOG_DIR"] = str(logdir)
    from swanboard import SwanBoardRun

    try:
        SwanBoardRun.run(path=str(logdir), host=HOST, port=port)
    except KeyboardInterrupt:
        pass

