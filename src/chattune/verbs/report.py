"""`chattune report`: one self-contained HTML page for one or more runs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from chattune.files import write_text
from chattune.report.html import build
from chattune.report.runs import load_runs


def run(run_dirs: Sequence[str], *, out: str = "report.html") -> Path:
    """Write the HTML report of one or more run directories (or folders holding runs) to `out`."""
    runs = load_runs(run_dirs)
    path = Path(out)
    write_text(path, build(runs))
    print(f"wrote {path} ({len(runs)} run{'s' if len(runs) != 1 else ''}; self-contained, open it in any browser)")
    return path
